//! The REST shim with an HTTP client, against a running agent with real
//! traffic between two namespaces.

use packet_capture_test_support::privileged;
use serde_json::json;

use crate::common::{Node, RIGHT_IP, Rest, json_of, tshark};

#[tokio::test]
async fn rest_capture_end_to_end() {
    if !privileged("rest_capture_end_to_end") {
        return;
    }
    let node = Node::new();
    let agent = node.agent(&["--insecure-no-auth"], &[]);
    let c = Rest::new(&agent);

    let health = c.json("/health").await;
    assert_eq!(health["status"], "ok");
    assert_eq!(health["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(health["node"], "test-node");
    let backend = health["backend"].as_str().unwrap().to_owned();
    assert!(["ebpf", "pcap"].contains(&backend.as_str()), "{health}");
    let interfaces: Vec<&str> = health["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_str().unwrap())
        .collect();
    assert!(interfaces.contains(&node.veth.a.as_str()), "{health}");

    let body = json!({
        "id": "ping-1", "targetIPs": [RIGHT_IP], "duration": 30, "maxPackets": 6,
        "outputFormat": "pcap", "filter": "icmp"
    });
    let r = c.post("/api/v1/captures", &body).await;
    assert_eq!(r.status(), 201);
    let started = json_of(r).await;
    assert_eq!(started["id"], "ping-1");
    assert_eq!(started["name"], "ping-1", "the name defaults to the id");
    assert_eq!(started["status"], "running");
    assert_eq!(started["node"], "test-node");
    assert_eq!(
        started["spec"],
        json!({"targetIPs": [RIGHT_IP], "targetPorts": [], "duration": 30, "maxPackets": 6,
               "outputFormat": "pcap", "filter": "icmp", "snaplen": 262144, "direction": "both", "keepCopies": false,
               "onlyTargets": false, "pods": []})
    );
    for field in ["packets", "dropped", "filtered", "file_size"] {
        assert!(started[field].is_u64(), "{field} in {started}");
    }
    assert!(started["start_time"].as_str().unwrap().ends_with('Z'));
    assert!(started["end_time"].is_null());

    // The same request again: the same capture, 200.
    let r = c.post("/api/v1/captures", &body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(json_of(r).await["start_time"], started["start_time"]);
    // Another spec or name under the id: 409.
    for other in [
        json!({"id": "ping-1", "targetIPs": [RIGHT_IP], "duration": 30, "maxPackets": 7, "filter": "icmp"}),
        json!({"id": "ping-1", "name": "other", "targetIPs": [RIGHT_IP], "duration": 30, "maxPackets": 6, "filter": "icmp"}),
    ] {
        let r = c.post("/api/v1/captures", &other).await;
        assert_eq!(r.status(), 409);
        let err = json_of(r).await;
        assert!(err["error"].as_str().unwrap().starts_with("id: "), "{err}");
    }

    // Three requests and three replies end the capture at maxPackets.
    node.ping(3);
    let done = c.ended("ping-1").await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["packets"], 6, "{done}");
    let filter_path = done["filter_path"].as_str().unwrap();
    if backend == "ebpf" {
        assert_eq!(filter_path, "kernel", "{done}");
    } else {
        assert!(filter_path.starts_with("user space ("), "{done}");
    }
    assert!(
        done["message"].as_str().unwrap().contains("maxPackets"),
        "{done}"
    );
    assert!(done["end_time"].as_str().unwrap().ends_with('Z'));

    let list = c.json("/api/v1/captures").await;
    assert_eq!(list["captures"].as_array().unwrap().len(), 1);
    assert_eq!(list["captures"][0]["id"], "ping-1");
    // By the start of the id (percent-encoded as any query value).
    for (prefix, count) in [
        ("ping", 1),
        ("ping-1", 1),
        ("ping-2", 0),
        ("%70ing", 1),
        ("", 1),
    ] {
        let list = c.json(&format!("/api/v1/captures?idPrefix={prefix}")).await;
        assert_eq!(
            list["captures"].as_array().unwrap().len(),
            count,
            "{prefix}: {list}"
        );
    }

    // The file: listed, downloaded byte for byte, readable by tshark.
    let output = std::path::PathBuf::from(done["output_file"].as_str().unwrap());
    let name = output.file_name().unwrap().to_str().unwrap().to_owned();
    assert!(
        name.starts_with("ping-1-") && name.ends_with(".pcap"),
        "{name}"
    );
    let files = c.json("/api/v1/files").await;
    assert_eq!(files["files"][0]["name"], name.as_str(), "{files}");
    assert_eq!(files["files"][0]["size"], done["file_size"], "{files}");
    assert!(
        files["files"][0]["modified"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
    let r = c.get(&format!("/api/v1/files/{name}")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/vnd.tcpdump.pcap");
    assert_eq!(
        r.headers()["content-disposition"],
        format!("attachment; filename=\"{name}\"").as_str()
    );
    let bytes = r.bytes().await.unwrap();
    assert_eq!(bytes, std::fs::read(node.dir.path().join(&name)).unwrap());
    let copy = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(copy.path(), &bytes).unwrap();
    let packets = tshark(copy.path(), &["ip.src", "ip.dst", "icmp.type"]);
    assert_eq!(packets.len(), 6, "{packets:?}");
    let left = crate::common::LEFT_IP;
    assert_eq!(
        packets
            .iter()
            .filter(|p| **p == format!("{left}\t{RIGHT_IP}\t8"))
            .count(),
        3,
        "{packets:?}"
    );

    // Metrics tell the same story.
    let r = c.get("/metrics").await;
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let metrics = r.text().await.unwrap();
    for line in [
        format!(
            "packet_capture_agent_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        ),
        format!("packet_capture_agent_backend_info{{backend=\"{backend}\"}} 1"),
        format!("packet_capture_agent_interfaces {}", interfaces.len()),
        "packet_capture_agent_captures{state=\"completed\"} 1".into(),
        "packet_capture_agent_captures{state=\"running\"} 0".into(),
        "packet_capture_agent_capture_packets_total{id=\"ping-1\",name=\"ping-1\"} 6".into(),
        "packet_capture_agent_capture_dropped_total{id=\"ping-1\",name=\"ping-1\"} 0".into(),
        "packet_capture_agent_capture_filtered_total{id=\"ping-1\",name=\"ping-1\"} ".into(),
        "packet_capture_agent_capture_filtered_in_kernel_total{id=\"ping-1\",name=\"ping-1\"} "
            .into(),
        // The eBPF backend runs the filter in the kernel, libpcap's in user space.
        format!(
            "packet_capture_agent_capture_filter_in_kernel{{id=\"ping-1\",name=\"ping-1\"}} {}",
            u8::from(backend == "ebpf")
        ),
        format!(
            "packet_capture_agent_capture_file_bytes{{id=\"ping-1\",name=\"ping-1\"}} {}",
            bytes.len()
        ),
        "packet_capture_agent_ring_lost_records_total ".into(),
        // One capture so far: every byte written is its file's.
        format!("packet_capture_agent_written_bytes_total {}", bytes.len()),
        "packet_capture_agent_api_requests_total{transport=\"rest\",route=\"/api/v1/captures\",code=\"201\"} 1".into(),
        "packet_capture_agent_api_requests_total{transport=\"rest\",route=\"/api/v1/captures\",code=\"409\"} 2".into(),
    ] {
        assert!(metrics.contains(&line), "{line:?} not in\n{metrics}");
    }

    // Stopping an ended capture returns it as it is; unknown ids are 404.
    let r = c.delete("/api/v1/captures/ping-1").await;
    assert_eq!(r.status(), 200);
    assert_eq!(json_of(r).await["status"], "completed");
    for r in [
        c.get("/api/v1/captures/nope").await,
        c.delete("/api/v1/captures/nope").await,
    ] {
        assert_eq!(r.status(), 404);
        assert!(
            json_of(r).await["error"]
                .as_str()
                .unwrap()
                .starts_with("id: ")
        );
    }

    // A running capture stops on DELETE, its file finished.
    let r = c
        .post(
            "/api/v1/captures",
            &json!({"id": "long-1", "duration": 600, "outputFormat": "pcapng"}),
        )
        .await;
    assert_eq!(r.status(), 201);
    node.ping(2);
    let r = c.delete("/api/v1/captures/long-1").await;
    assert_eq!(r.status(), 200);
    let stopped = json_of(r).await;
    assert_eq!(stopped["status"], "stopped", "{stopped}");
    assert_eq!(stopped["message"], "stopped by request");
    let file = std::path::Path::new(stopped["output_file"].as_str().unwrap());
    assert!(file.extension().unwrap() == "pcapng", "{stopped}");
    let read = tshark(file, &["frame.number"]);
    assert_eq!(read.len() as u64, stopped["packets"].as_u64().unwrap());
    assert!(read.len() >= 4, "{read:?}");
}

#[tokio::test]
async fn rest_bad_input_is_refused_and_starts_nothing() {
    if !privileged("rest_bad_input_is_refused_and_starts_nothing") {
        return;
    }
    let node = Node::new();
    let agent = node.agent(&["--insecure-no-auth"], &[]);
    let c = Rest::new(&agent);
    let huge = format!(r#"{{"id":"a","filter":"{}"}}"#, "x".repeat(1 << 20));
    let long_filter = format!(r#"{{"id":"a","filter":"{}"}}"#, "x".repeat(5_000));
    let long_id = format!(r#"{{"id":"{}"}}"#, "a".repeat(201));
    let cases: Vec<(&str, u16, &str)> = vec![
        ("{", 400, "body: EOF"),
        ("", 400, "body: must be a JSON object"),
        ("not json", 400, "body: must be a JSON object"),
        ("[1, 2]", 400, "body: must be a JSON object"),
        ("{]", 400, "body: "),
        (r#"{"id":"a"} {}"#, 400, "body: trailing"),
        (
            r#"{"id":"a","colour":"red"}"#,
            400,
            "unknown field `colour`",
        ),
        (
            r#"{"id":"a","duration":-5}"#,
            400,
            "duration: must be at least 1, got -5",
        ),
        (
            r#"{"id":"a","duration":0}"#,
            400,
            "duration: must be at least 1, got 0",
        ),
        (
            r#"{"id":"a","duration":99999999999}"#,
            400,
            "duration: must be at most",
        ),
        (
            r#"{"id":"a","duration":"60"}"#,
            400,
            "duration: invalid type",
        ),
        (
            r#"{"id":"a","duration":1.5}"#,
            400,
            "duration: invalid type",
        ),
        (
            r#"{"id":"a","maxPackets":-1}"#,
            400,
            "maxPackets: must be at least 1",
        ),
        (
            r#"{"id":"a","targetPorts":[-1]}"#,
            400,
            "targetPorts[0]: -1 is not a port",
        ),
        (
            r#"{"id":"a","targetPorts":[80,70000]}"#,
            400,
            "targetPorts[1]: 70000 is not a port",
        ),
        (
            r#"{"id":"a","targetPorts":"80"}"#,
            400,
            "targetPorts: invalid type",
        ),
        (
            r#"{"id":"a","targetIPs":["10.0.0.1","10.0.0.256"]}"#,
            400,
            "targetIPs[1]: \"10.0.0.256\"",
        ),
        (
            r#"{"id":"a","targetIPs":["10.0.0.1/24"]}"#,
            400,
            "targetIPs[0]: \"10.0.0.1/24\" has host bits",
        ),
        (
            r#"{"id":"a","targetIPs":[7]}"#,
            400,
            "targetIPs[0]: invalid type",
        ),
        (r#"{"id":"a","filter":"tcp port"}"#, 400, "filter: "),
        (
            r#"{"id":"a","filter":"no such primitive"}"#,
            400,
            "filter: ",
        ),
        (
            r#"{"id":"a","outputFormat":"json"}"#,
            400,
            "outputFormat: unknown variant `json`",
        ),
        (
            r#"{"id":"a","snaplen":0}"#,
            400,
            "snaplen: 0 is out of range",
        ),
        (
            r#"{"id":"a","snaplen":262145}"#,
            400,
            "snaplen: 262145 is out of range",
        ),
        (r#"{}"#, 400, "id: must not be empty"),
        (r#"{"id":"../../etc/x"}"#, 400, "id: "),
        (r#"{"id":"a/b"}"#, 400, "id: "),
        (r#"{"id":"Caps"}"#, 400, "id: "),
        (
            r#"{"id":".hidden"}"#,
            400,
            "id: \".hidden\" must not start with '.'",
        ),
        (r#"{"id":"ok","name":"../x"}"#, 400, "name: "),
        (long_id.as_str(), 400, "id: longer than 200 characters"),
        (long_filter.as_str(), 400, "filter: 5000 bytes long"),
        (huge.as_str(), 413, "body: larger than 1048576 bytes"),
    ];
    for (body, status, error) in cases {
        let r = c
            .request(reqwest::Method::POST, "/api/v1/captures")
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        let short: String = body.chars().take(80).collect();
        assert_eq!(r.status(), status, "{short}");
        let err = json_of(r).await;
        let message = err["error"].as_str().unwrap();
        assert!(
            message.starts_with(error) || (error.starts_with("unknown") && message.contains(error)),
            "{short}: {message}"
        );
    }
    // Methods a route does not have: 405, JSON too.
    let r = c
        .request(reqwest::Method::PUT, "/api/v1/captures")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert!(
        json_of(r).await["error"]
            .as_str()
            .unwrap()
            .starts_with("method: ")
    );
    let r = c.get("/api/v2/nothing").await;
    assert_eq!(r.status(), 404);
    json_of(r).await;

    // Nothing was started, no file was made.
    let list = c.json("/api/v1/captures").await;
    assert_eq!(list, json!({"captures": []}));
    let left: Vec<_> = std::fs::read_dir(node.dir.path()).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

/// The ceilings of the ConfigMap keys MAX_CAPTURE_DURATION,
/// MAX_CAPTURE_PACKETS and MAX_CONCURRENT_CAPTURES hold for every caller,
/// with the field and the key named.
#[tokio::test]
async fn the_configured_limits_hold_and_are_named() {
    if !privileged("the_configured_limits_hold_and_are_named") {
        return;
    }
    let node = Node::new();
    let agent = node.agent(
        &["--insecure-no-auth"],
        &[
            ("MAX_CAPTURE_DURATION", "60"),
            ("MAX_CAPTURE_PACKETS", "100"),
            ("MAX_CONCURRENT_CAPTURES", "1"),
        ],
    );
    let c = Rest::new(&agent);
    for (body, error) in [
        (
            json!({"id": "long", "duration": 61, "maxPackets": 100}),
            "duration: 61 is over this cluster's limit of 60 (MAX_CAPTURE_DURATION)",
        ),
        (
            json!({"id": "many", "duration": 60, "maxPackets": 101}),
            "maxPackets: 101 is over this cluster's limit of 100 (MAX_CAPTURE_PACKETS)",
        ),
    ] {
        let r = c.post("/api/v1/captures", &body).await;
        assert_eq!(r.status(), 400, "{body}");
        assert_eq!(json_of(r).await["error"], error);
    }
    let within = |id: &str| json!({"id": id, "duration": 60, "maxPackets": 100});
    assert_eq!(
        c.post("/api/v1/captures", &within("one")).await.status(),
        201
    );
    let r = c.post("/api/v1/captures", &within("two")).await;
    assert_eq!(r.status(), 503);
    assert_eq!(
        json_of(r).await["error"],
        "this node runs 1 captures, its limit (MAX_CONCURRENT_CAPTURES)"
    );
    // Over gRPC the controller tells it from an agent it cannot reach.
    let full = crate::common::grpc(&agent)
        .await
        .start_capture(packet_capture_proto::v1::StartCaptureRequest {
            id: "two".into(),
            spec: Some(packet_capture_proto::v1::CaptureSpec {
                duration_seconds: 60,
                max_packets: 100,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(full.code(), tonic::Code::ResourceExhausted, "{full}");
    // Once the first has ended there is room again.
    assert_eq!(c.delete("/api/v1/captures/one").await.status(), 200);
    assert_eq!(
        c.post("/api/v1/captures", &within("two")).await.status(),
        201
    );
}

/// A node's share of a large selection: 1024 targets and the long names of
/// their pods, far more than 64 KiB, start a capture (REST) and change its
/// targets (gRPC); the file names every target; one target more is refused
/// by name and changes nothing.
#[tokio::test]
async fn a_thousand_targets_and_their_pods_are_one_request() {
    if !privileged("a_thousand_targets_and_their_pods_are_one_request") {
        return;
    }
    use packet_capture_common::crd::MAX_NODE_TARGETS;
    use packet_capture_proto::v1 as pb;
    let node = Node::new();
    let agent = node.agent(&["--insecure-no-auth"], &[("CAPTURE_BACKEND", "ebpf")]);
    let c = Rest::new(&agent);
    let mut grpc = crate::common::grpc(&agent).await;
    // The pinged address, and pods' addresses no packet here has.
    let elsewhere = |n: usize| format!("fd00:1234:5678:9abc::{n:x}");
    let ips: Vec<String> = std::iter::once(RIGHT_IP.to_owned())
        .chain((1..MAX_NODE_TARGETS).map(elsewhere))
        .collect();
    let pod = |i: usize, ip: &str| pb::TargetPod {
        namespace: "a-namespace-of-the-shop".into(),
        name: format!("checkout-deployment-7d9f8b6c5d-{i:05}"),
        ips: vec![ip.to_owned()],
    };
    let pods: Vec<pb::TargetPod> = ips.iter().enumerate().map(|(i, ip)| pod(i, ip)).collect();
    let pods_json: Vec<serde_json::Value> = pods
        .iter()
        .map(|p| json!({"namespace": p.namespace, "name": p.name, "ips": p.ips}))
        .collect();
    let body = json!({
        "id": "many-1", "targetIPs": ips, "pods": pods_json, "duration": 60, "maxPackets": 4,
        "outputFormat": "pcapng", "filter": "icmp"
    });
    assert!(body.to_string().len() > 128 * 1024, "a large request");
    let r = c.post("/api/v1/captures", &body).await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());

    let targets = |ips: Vec<String>, pods: Vec<pb::TargetPod>| pb::SetTargetsRequest {
        id: "many-1".into(),
        target_ips: ips,
        pods,
    };
    let mut more = ips.clone();
    more.push(elsewhere(MAX_NODE_TARGETS));
    let err = grpc
        .set_targets(targets(more, pods.clone()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message()
            .starts_with("targetIPs: 1025 entries, at most 1024 are allowed"),
        "{err:?}"
    );
    // The same addresses again, now as the controller sends a change.
    let changed = grpc
        .set_targets(targets(ips.clone(), pods))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(changed.spec.unwrap().target_ips.len(), MAX_NODE_TARGETS);

    node.ping(2);
    let done = c.ended("many-1").await;
    assert_eq!(done["status"], "completed", "{done}");
    let file = std::path::PathBuf::from(done["output_file"].as_str().unwrap());
    assert_eq!(tshark(&file, &["icmp.type"]), ["8", "0", "8", "0"]);
    let info = packet_capture_test_support::netns::run(
        std::process::Command::new("capinfos").arg("-k").arg(&file),
    );
    let info = String::from_utf8_lossy(&info.stdout);
    let last = elsewhere(MAX_NODE_TARGETS - 1);
    assert!(
        info.contains(&format!("host {last}")),
        "the comment names every target:\n{info}"
    );
}

/// libpcap compiles each socket's selection, in seconds past 256 hosts:
/// that backend refuses more by name, at the start (nothing of the capture
/// stays) and as new targets (the capture keeps its own).
#[tokio::test]
async fn the_libpcap_backend_refuses_more_than_256_targets() {
    if !privileged("the_libpcap_backend_refuses_more_than_256_targets") {
        return;
    }
    let node = Node::new();
    let agent = node.agent(&["--insecure-no-auth"], &[("CAPTURE_BACKEND", "pcap")]);
    let c = Rest::new(&agent);
    let ips: Vec<String> = (0..257)
        .map(|n| format!("10.99.{}.{}", n / 256, n % 256))
        .collect();
    let r = c
        .post(
            "/api/v1/captures",
            &json!({"id": "many-2", "targetIPs": ips}),
        )
        .await;
    assert_eq!(r.status(), 400);
    let err = json_of(r).await;
    assert_eq!(
        err["error"], "targetIPs: 257 entries, the libpcap backend takes at most 256",
        "{err}"
    );
    assert_eq!(c.json("/api/v1/captures").await["captures"], json!([]));
    assert_eq!(c.json("/api/v1/files").await["files"], json!([]));
    let entries = std::fs::read_dir(node.dir.path()).unwrap().count();
    assert_eq!(entries, 0, "no unfinished file either");

    let r = c
        .post(
            "/api/v1/captures",
            &json!({"id": "many-3", "targetIPs": [RIGHT_IP], "duration": 60}),
        )
        .await;
    assert_eq!(r.status(), 201);
    // Refused, the capture keeps those of its targets the new ones name.
    let refused_change = async |ips: &[String]| {
        let r = c
            .request(reqwest::Method::PUT, "/api/v1/captures/many-3/targets")
            .json(&json!({ "targetIPs": ips }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        let err = json_of(r).await;
        assert_eq!(
            err["error"], "targetIPs: 257 entries, the libpcap backend takes at most 256",
            "{err}"
        );
        let spec = c.json("/api/v1/captures/many-3").await["spec"].clone();
        (spec["targetIPs"].clone(), spec["onlyTargets"].clone())
    };
    let with_peer = [&ips[..256], &[RIGHT_IP.to_owned()]].concat();
    assert_eq!(
        refused_change(&with_peer).await,
        (json!([RIGHT_IP]), json!(true))
    );
    // None of the new ones is the peer: it goes, and nothing is selected.
    assert_eq!(refused_change(&ips).await, (json!([]), json!(true)));
}
