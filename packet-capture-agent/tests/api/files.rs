//! Downloads serve only regular files directly inside the capture
//! directory: no `..`, no absolute paths, no encoded tricks, no symbolic
//! links, no directories; REST and gRPC alike.

use packet_capture_proto::v1 as pb;
use packet_capture_test_support::privileged;
use tonic::Code;

use crate::common::{Node, Rest, grpc, grpc_download, raw_get};

const MADE: &str = "made-20260101-000000.pcap";

#[tokio::test]
async fn downloads_stay_inside_the_capture_dir() {
    if !privileged("downloads_stay_inside_the_capture_dir") {
        return;
    }
    let node = Node::new();
    let dir = node.dir.path();
    // A file bigger than two chunks, a symlink to /etc/passwd, a symlink to
    // /etc, a directory and an unfinished file.
    let made: Vec<u8> = (0..150_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(dir.join(MADE), &made).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", dir.join("evil.pcap")).unwrap();
    std::os::unix::fs::symlink("/etc", dir.join("etc")).unwrap();
    std::fs::create_dir(dir.join("dir.pcap")).unwrap();
    std::fs::write(dir.join(".half.pcap.partial"), b"half").unwrap();
    let agent = node.agent(&["--insecure-no-auth"], &[]);
    let passwd = std::fs::read("/etc/passwd").unwrap();
    let secret = &passwd[..passwd.len().min(16)];

    for path in [
        "/api/v1/files/..",
        "/api/v1/files/%2e%2e",
        "/api/v1/files/%2E%2E%2Fetc%2Fpasswd",
        "/api/v1/files/..%2F..%2F..%2Fetc%2Fpasswd",
        "/api/v1/files/..%2f..%2f..%2fetc%2fpasswd",
        "/api/v1/files/%2Fetc%2Fpasswd",
        "/api/v1/files/../../../../etc/passwd",
        "/api/v1/files//etc/passwd",
        "/api/v1/files/etc/passwd",
        "/api/v1/files/etc%2Fpasswd",
        "/api/v1/files/evil.pcap",
        "/api/v1/files/dir.pcap",
        "/api/v1/files/.half.pcap.partial",
        "/api/v1/files/%252e%252e",
        "/api/v1/files/a%00.pcap",
        "/api/v1/files/%ff",
    ] {
        let (status, head, body) = raw_get(agent.port(), path);
        assert!(status == 400 || status == 404, "{path}: {status}");
        assert!(
            head.contains("content-type: application/json"),
            "{path}: {head}"
        );
        assert!(
            !body.windows(secret.len()).any(|w| w == secret),
            "{path} served /etc/passwd"
        );
    }

    let listed = Rest::new(&agent).json("/api/v1/files").await;
    let names: Vec<&str> = listed["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, [MADE], "only the regular file is listed");
    let (status, _, body) = raw_get(agent.port(), &format!("/api/v1/files/{MADE}"));
    assert_eq!(status, 200);
    assert_eq!(body, made);

    let mut g = grpc(&agent).await;
    for (name, code) in [
        ("..", Code::InvalidArgument),
        ("../../etc/passwd", Code::InvalidArgument),
        ("/etc/passwd", Code::InvalidArgument),
        ("etc/passwd", Code::InvalidArgument),
        (".half.pcap.partial", Code::InvalidArgument),
        ("", Code::InvalidArgument),
        ("evil.pcap", Code::NotFound),
        ("dir.pcap", Code::NotFound),
        ("missing.pcap", Code::NotFound),
    ] {
        let err = g
            .download_file(pb::DownloadFileRequest { name: name.into() })
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{name:?}: {err:?}");
        assert!(err.message().starts_with("name: "), "{err:?}");
    }
    let files = g
        .list_files(pb::ListFilesRequest {})
        .await
        .unwrap()
        .into_inner()
        .files;
    assert_eq!(files.len(), 1);
    assert_eq!(files[0].name, MADE);
    let chunks = grpc_download(&mut g, MADE).await;
    let sizes: Vec<usize> = chunks.iter().map(Vec::len).collect();
    let bytes = chunks.concat();
    assert_eq!(sizes, [65_536, 65_536, 150_000 - 2 * 65_536]);
    assert_eq!(bytes, made);
}
