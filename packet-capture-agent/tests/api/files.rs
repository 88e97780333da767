//! Downloads serve only regular files directly inside the capture
//! directory: no `..`, no absolute paths, no encoded tricks, no symbolic
//! links, no directories; REST and gRPC alike. A download resumes from a
//! byte range.

use packet_capture_proto::v1 as pb;
use packet_capture_test_support::privileged;
use tonic::Code;

use crate::common::{Node, Rest, chunks_of, grpc, grpc_download, json_of, raw_get};

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
            .download_file(pb::DownloadFileRequest {
                name: name.into(),
                ..Default::default()
            })
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

#[tokio::test]
async fn a_download_resumes_from_where_it_broke_off() {
    if !privileged("a_download_resumes_from_where_it_broke_off") {
        return;
    }
    let node = Node::new();
    let made: Vec<u8> = (0..150_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(node.dir.path().join(MADE), &made).unwrap();
    let agent = node.agent(&["--insecure-no-auth"], &[]);
    let rest = Rest::new(&agent);
    let path = format!("/api/v1/files/{MADE}");
    let get_with = |headers: &[(&str, &str)]| {
        let mut req = rest.request(reqwest::Method::GET, &path);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        async move { req.send().await.unwrap() }
    };
    let get = |range: &str, if_range: Option<&str>| match if_range {
        Some(v) => get_with(&[("range", range), ("if-range", v)]),
        None => get_with(&[("range", range)]),
    };

    // One range: 206 and those bytes, the last ones however many are asked.
    for (range, bytes) in [
        ("bytes=100000-", 100_000..150_000),
        ("bytes=10-19", 10..20),
        ("bytes=149990-200000", 149_990..150_000),
        ("bytes=-5", 149_995..150_000),
    ] {
        let r = get(range, None).await;
        assert_eq!(r.status(), 206, "{range}");
        let content_range = format!("bytes {}-{}/150000", bytes.start, bytes.end - 1);
        assert_eq!(r.headers()["content-range"], content_range.as_str());
        assert_eq!(
            r.headers()["content-length"],
            bytes.clone().count().to_string().as_str()
        );
        assert_eq!(
            r.bytes().await.unwrap(),
            made[bytes.start..bytes.end],
            "{range}"
        );
    }
    // None of the file's bytes: 416, naming the header and the size.
    let r = get("bytes=150000-", None).await;
    assert_eq!(r.status(), 416);
    assert_eq!(r.headers()["content-range"], "bytes */150000");
    let error = json_of(r).await["error"].as_str().unwrap().to_owned();
    assert!(error.starts_with("Range: \"bytes=150000-\""), "{error}");
    // The file's validators: a strong ETag and its modification time.
    let whole = get("bytes=0-", None).await;
    let header = |name| whole.headers()[name].to_str().unwrap().to_owned();
    let (etag, modified) = (header("etag"), header("last-modified"));
    assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");
    let weak = format!("W/{etag}");
    // An If-Range naming the file as it is: the part.
    for if_range in [&*etag, &modified] {
        let r = get("bytes=10-19", Some(if_range)).await;
        assert_eq!(r.status(), 206, "{if_range}");
        assert_eq!(r.headers()["etag"], etag.as_str());
        assert_eq!(r.bytes().await.unwrap(), made[10..20], "{if_range}");
    }
    // Several ranges, another unit, or another version of the file named
    // (a weak ETag never matches): the whole file.
    for (range, if_range) in [
        ("bytes=0-1,5-6", None),
        ("lines=1-2", None),
        ("bytes=10-", Some("\"an-etag\"")),
        ("bytes=10-", Some(&*weak)),
        ("bytes=10-", Some("Thu, 01 Jan 1970 00:00:00 GMT")),
        ("bytes=10-", Some("yesterday")),
    ] {
        let r = get(range, if_range).await;
        assert_eq!(r.status(), 200, "{range} {if_range:?}");
        assert_eq!(r.headers()["accept-ranges"], "bytes");
        assert_eq!(r.bytes().await.unwrap(), made, "{range}");
    }

    // A copy that is still the file: 304, its validators, no bytes. The
    // ETag is compared weakly here; If-None-Match decides alone when it is
    // there, and before the range.
    let in_1970 = "Thu, 01 Jan 1970 00:00:00 GMT";
    for conditions in [
        &[("if-none-match", &*etag)][..],
        &[("if-none-match", &*weak)],
        &[("if-none-match", "\"other\", *")],
        &[("if-modified-since", &*modified)],
        &[("if-modified-since", "Sat, 01 Jan 2050 00:00:00 GMT")],
        &[("if-none-match", &*etag), ("if-modified-since", in_1970)],
        &[("if-none-match", &*etag), ("range", "bytes=10-19")],
    ] {
        let r = get_with(conditions).await;
        assert_eq!(r.status(), 304, "{conditions:?}");
        assert_eq!(r.headers()["etag"], etag.as_str());
        assert_eq!(r.headers()["last-modified"], modified.as_str());
        assert!(r.bytes().await.unwrap().is_empty(), "{conditions:?}");
    }
    for conditions in [
        &[("if-none-match", "\"other\"")][..],
        &[("if-modified-since", in_1970)],
        &[("if-modified-since", "yesterday")],
        &[
            ("if-none-match", "\"other\""),
            ("if-modified-since", &*modified),
        ],
    ] {
        let r = get_with(conditions).await;
        assert_eq!(r.status(), 200, "{conditions:?}");
        assert_eq!(r.bytes().await.unwrap(), made, "{conditions:?}");
    }

    // curl -R dates its copy with the file's Last-Modified.
    let copy = tempfile::NamedTempFile::new().unwrap();
    let curl = std::process::Command::new("curl")
        .args(["-sSfR", "-o"])
        .arg(copy.path())
        .arg(format!("{}{path}", agent.url()))
        .output()
        .expect("curl");
    assert!(curl.status.success(), "{curl:?}");
    let mtime = |p: &std::path::Path| {
        std::fs::metadata(p)
            .unwrap()
            .modified()
            .unwrap()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    assert_eq!(mtime(copy.path()), mtime(&node.dir.path().join(MADE)));
    // Fetched again over that copy only if the file is newer (curl -z:
    // If-Modified-Since the copy's time): 304, and the copy stays.
    let curl = std::process::Command::new("curl")
        .args(["-sSf", "-w", "%{http_code}", "-z"])
        .arg(copy.path())
        .arg("-o")
        .arg(copy.path())
        .arg(format!("{}{path}", agent.url()))
        .output()
        .expect("curl");
    assert!(curl.status.success(), "{curl:?}");
    assert_eq!(String::from_utf8_lossy(&curl.stdout), "304");
    assert_eq!(std::fs::read(copy.path()).unwrap(), made);

    // curl -C - finishes a file that holds the first bytes.
    let partial = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(partial.path(), &made[..70_000]).unwrap();
    let curl = std::process::Command::new("curl")
        .args(["-sSf", "-C", "-", "-o"])
        .arg(partial.path())
        .arg(format!("{}{path}", agent.url()))
        .output()
        .expect("curl");
    assert!(curl.status.success(), "{curl:?}");
    assert_eq!(std::fs::read(partial.path()).unwrap(), made);

    // gRPC: the same range, the part's bytes said in the metadata.
    let mut g = grpc(&agent).await;
    let answer = g
        .download_file(pb::DownloadFileRequest {
            name: MADE.into(),
            range: "bytes=70000-".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(answer.metadata().get("file-size").unwrap(), "150000");
    assert_eq!(
        answer.metadata().get("content-range").unwrap(),
        "bytes 70000-149999/150000"
    );
    assert_eq!(
        chunks_of(answer.into_inner()).await.concat(),
        made[70_000..]
    );
    let refused = g
        .download_file(pb::DownloadFileRequest {
            name: MADE.into(),
            range: "bytes=-0".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::OutOfRange);
    assert_eq!(
        refused.metadata().get("content-range").unwrap(),
        "bytes */150000"
    );
    assert!(refused.message().starts_with("Range: "), "{refused:?}");
    // The same validators; an If-Range naming the file: the part.
    let part = g
        .download_file(pb::DownloadFileRequest {
            name: MADE.into(),
            range: "bytes=149990-".into(),
            if_range: etag.clone(),
        })
        .await
        .unwrap();
    assert_eq!(part.metadata().get("etag").unwrap(), etag.as_str());
    assert_eq!(
        part.metadata().get("last-modified").unwrap(),
        modified.as_str()
    );
    assert_eq!(chunks_of(part.into_inner()).await.concat(), made[149_990..]);
    // With an If-Range naming another: the whole file, no part in the metadata.
    let whole = g
        .download_file(pb::DownloadFileRequest {
            name: MADE.into(),
            range: "bytes=-0".into(),
            if_range: "\"an-etag\"".into(),
        })
        .await
        .unwrap();
    assert_eq!(whole.metadata().get("content-range"), None);
    assert_eq!(chunks_of(whole.into_inner()).await.concat(), made);

    // A file put in its place under the same name, of the same size, is
    // another version: a download that named the first gets it whole.
    let other: Vec<u8> = made.iter().map(|b| b ^ 0xff).collect();
    let replacement = node.dir.path().join("replacement.tmp");
    std::fs::write(&replacement, &other).unwrap();
    std::fs::rename(&replacement, node.dir.path().join(MADE)).unwrap();
    let r = get("bytes=70000-", Some(&etag)).await;
    assert_eq!(r.status(), 200);
    assert_ne!(r.headers()["etag"], etag.as_str());
    assert_eq!(r.bytes().await.unwrap(), other);
}
