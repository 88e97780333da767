//! `packetcapture.v1.Agent` with the generated tonic client: the same
//! semantics as REST, WatchCapture to the end, DownloadFile in chunks.

use packet_capture_proto::v1 as pb;
use packet_capture_test_support::privileged;
use tonic::Code;

use crate::common::{Node, RIGHT_IP, grpc, grpc_download, tshark};

fn ping_capture(id: &str, max_packets: u32) -> pb::StartCaptureRequest {
    pb::StartCaptureRequest {
        id: id.into(),
        name: String::new(),
        spec: Some(pb::CaptureSpec {
            target_ips: vec![RIGHT_IP.into()],
            target_ports: vec![],
            duration_seconds: 30,
            max_packets,
            output_format: pb::OutputFormat::Pcapng.into(),
            filter: "icmp".into(),
            ..Default::default()
        }),
    }
}

#[tokio::test]
async fn grpc_capture_watch_and_download() {
    if !privileged("grpc_capture_watch_and_download") {
        return;
    }
    let node = Node::new();
    let agent = node.agent(&["--insecure-no-auth"], &[]);
    let mut c = grpc(&agent).await;

    let health = c.health(pb::HealthRequest {}).await.unwrap().into_inner();
    assert_eq!(health.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(health.node_name, "test-node");
    assert!(["ebpf", "pcap"].contains(&health.backend.as_str()));
    assert!(health.interfaces.contains(&node.veth.a), "{health:?}");

    let started = c
        .start_capture(ping_capture("watch-1", 4))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(started.name, "watch-1");
    assert_eq!(started.state(), pb::CaptureState::Running);
    assert_eq!(started.node_name, "test-node");
    let spec = started.spec.clone().unwrap();
    assert_eq!(spec.target_ips, [RIGHT_IP]);
    assert_eq!(spec.snaplen, 262_144, "0 means the default");
    let again = c
        .start_capture(ping_capture("watch-1", 4))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.start_time, started.start_time, "idempotent");
    let err = c
        .start_capture(ping_capture("watch-1", 5))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");

    // Invalid requests: INVALID_ARGUMENT naming the field, nothing started.
    let invalid = |f: &dyn Fn(&mut pb::StartCaptureRequest)| {
        let mut r = ping_capture("bad-1", 4);
        f(&mut r);
        r
    };
    for (req, message) in [
        (
            invalid(&|r| r.spec.as_mut().unwrap().target_ips = vec!["10.0.0.300".into()]),
            "targetIPs[0]: ",
        ),
        (
            invalid(&|r| r.spec.as_mut().unwrap().target_ports = vec![70_000]),
            "targetPorts[0]: 70000",
        ),
        (
            invalid(&|r| r.spec.as_mut().unwrap().filter = "tcp port".into()),
            "filter: ",
        ),
        (
            invalid(&|r| r.spec.as_mut().unwrap().duration_seconds = 0),
            "duration: must be at least 1, got 0",
        ),
        (
            invalid(&|r| r.spec.as_mut().unwrap().max_packets = 0),
            "maxPackets: must be at least 1",
        ),
        (
            invalid(&|r| r.spec.as_mut().unwrap().output_format = 9),
            "outputFormat: 9",
        ),
        (invalid(&|r| r.spec = None), "spec: is required"),
        (invalid(&|r| r.id = "../etc".into()), "id: "),
        (invalid(&|r| r.id = String::new()), "id: must not be empty"),
        (invalid(&|r| r.name = "Name".into()), "name: "),
    ] {
        let err = c.start_capture(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().starts_with(message), "{message}: {err:?}");
    }
    let huge = invalid(&|r| r.spec.as_mut().unwrap().filter = "x".repeat(1 << 20));
    let err = c.start_capture(huge).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    let listed = c
        .list_captures(pb::ListCapturesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .captures;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, "watch-1");

    // New targets, in place; bad ones name the entry and change nothing.
    let targets = |id: &str, ips: &[&str]| pb::SetTargetsRequest {
        id: id.into(),
        target_ips: ips.iter().map(|s| s.to_string()).collect(),
        pods: vec![pb::TargetPod {
            namespace: "lab".into(),
            name: "right".into(),
            ips: ips.iter().map(|s| s.to_string()).collect(),
        }],
    };
    let err = c
        .set_targets(targets("watch-1", &[RIGHT_IP, "10.0.0.0/8x"]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("targetIPs[1]: "), "{err:?}");
    let retargeted = c
        .set_targets(targets("watch-1", &[RIGHT_IP]))
        .await
        .unwrap()
        .into_inner();
    let spec = retargeted.spec.unwrap();
    assert!(
        spec.only_targets && spec.target_ips == [RIGHT_IP],
        "{spec:?}"
    );
    assert_eq!(spec.pods[0].name, "right", "{spec:?}");
    assert_eq!(
        retargeted.start_time, started.start_time,
        "the same capture"
    );

    // Watch: the state now, progress, the final state, then the end.
    let mut updates = c
        .watch_capture(pb::WatchCaptureRequest {
            id: "watch-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = updates.message().await.unwrap().expect("the current state");
    assert_eq!(first.state(), pb::CaptureState::Running);
    node.ping(2);
    let mut last = first;
    while let Some(update) = updates.message().await.unwrap() {
        assert!(update.packets >= last.packets, "counters only grow");
        assert!(
            !last.state().eq(&pb::CaptureState::Completed),
            "nothing after the final state"
        );
        last = update;
    }
    assert_eq!(last.state(), pb::CaptureState::Completed, "{last:?}");
    assert_eq!(last.packets, 4);
    assert!(last.end_time.is_some());

    let got = c
        .get_capture(pb::GetCaptureRequest {
            id: "watch-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.state(), pb::CaptureState::Completed);
    let stopped = c
        .stop_capture(pb::StopCaptureRequest {
            id: "watch-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        stopped.state(),
        pb::CaptureState::Completed,
        "an ended capture stays as it is"
    );
    let err = c.set_targets(targets("watch-1", &[])).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    for err in [
        c.set_targets(targets("nope", &[])).await.unwrap_err(),
        c.get_capture(pb::GetCaptureRequest { id: "nope".into() })
            .await
            .unwrap_err(),
        c.stop_capture(pb::StopCaptureRequest { id: "nope".into() })
            .await
            .unwrap_err(),
        c.watch_capture(pb::WatchCaptureRequest { id: "nope".into() })
            .await
            .unwrap_err(),
    ] {
        assert_eq!(err.code(), Code::NotFound, "{err:?}");
    }

    // The file, listed and downloaded.
    let files = c
        .list_files(pb::ListFilesRequest {})
        .await
        .unwrap()
        .into_inner()
        .files;
    assert_eq!(files.len(), 1);
    assert!(last.output_file.ends_with(&files[0].name), "{files:?}");
    assert!(files[0].name.ends_with(".pcapng"));
    let bytes = grpc_download(&mut c, &files[0].name).await.concat();
    let on_disk = node.dir.path().join(&files[0].name);
    assert_eq!(bytes, std::fs::read(&on_disk).unwrap());
    assert_eq!(bytes.len() as u64, files[0].size);
    let packets = tshark(&on_disk, &["ip.src", "ip.dst"]);
    assert_eq!(packets.len(), 4, "{packets:?}");
}

/// grpcurl, an independent gRPC client, finds the services through server
/// reflection and calls them from their descriptors alone.
#[tokio::test]
async fn grpcurl_uses_reflection() {
    if !privileged("grpcurl_uses_reflection") {
        return;
    }
    let grpcurl = packet_capture_test_support::tools::grpcurl();
    let node = Node::new();
    let agent = node.agent(&["--insecure-no-auth"], &[]);
    let target = format!("127.0.0.1:{}", agent.port());
    let call = |args: &[&str]| {
        let out = packet_capture_test_support::netns::run(
            node.left
                .command(grpcurl.to_str().unwrap())
                .arg("-plaintext")
                .args(args),
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let services = call(&[&target, "list"]);
    for service in [
        "packetcapture.v1.Agent",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(
            services.lines().any(|l| l == service),
            "{service} in {services}"
        );
    }
    let described = call(&[&target, "describe", "packetcapture.v1.Agent"]);
    assert!(
        described.contains("rpc WatchCapture ( .packetcapture.v1.WatchCaptureRequest ) returns ( stream .packetcapture.v1.Capture );"),
        "{described}"
    );
    let health = call(&[&target, "packetcapture.v1.Agent/Health"]);
    let health: serde_json::Value = serde_json::from_str(&health).unwrap();
    assert_eq!(health["nodeName"], "test-node");
    let started = call(&[
        "-d",
        r#"{"id":"grpcurl-1","spec":{"targetIps":["10.77.0.2"],"durationSeconds":30,"maxPackets":2,"outputFormat":"OUTPUT_FORMAT_TEXT","filter":"icmp"}}"#,
        &target,
        "packetcapture.v1.Agent/StartCapture",
    ]);
    let started: serde_json::Value = serde_json::from_str(&started).unwrap();
    assert_eq!(started["state"], "CAPTURE_STATE_RUNNING", "{started}");
    node.ping(1);
    let watched = call(&[
        "-d",
        r#"{"id":"grpcurl-1"}"#,
        &target,
        "packetcapture.v1.Agent/WatchCapture",
    ]);
    assert!(watched.contains("CAPTURE_STATE_COMPLETED"), "{watched}");
    let checked = call(&[&target, "grpc.health.v1.Health/Check"]);
    assert!(checked.contains("SERVING"), "{checked}");
}

/// The services open to every caller (health, reflection), and the Agent
/// service's open Health, take messages of at most 64 KiB, where the Agent
/// service's other calls take a MiB.
#[tokio::test]
async fn open_grpc_services_refuse_large_messages() {
    if !privileged("open_grpc_services_refuse_large_messages") {
        return;
    }
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let node = Node::new();
    let agent = node.agent(&["--insecure-no-auth"], &[]);
    let channel = crate::common::channel(&agent.url(), None).await;
    let mut health = HealthClient::new(channel.clone());
    let check = |service: String| HealthCheckRequest { service };
    assert!(health.check(check(String::new())).await.is_ok());
    let refused = health
        .check(check("x".repeat(100_000)))
        .await
        .expect_err("a 100 kB health check");
    assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");
    assert!(health.check(check(String::new())).await.is_ok());

    // Agent/Health takes no field: this one's is skipped, once read.
    let mut raw = tonic::client::Grpc::new(channel);
    let mut agent_health = async |request: HealthCheckRequest| {
        raw.ready().await.unwrap();
        raw.unary(
            tonic::Request::new(request),
            tonic::codegen::http::uri::PathAndQuery::from_static("/packetcapture.v1.Agent/Health"),
            tonic_prost::ProstCodec::<HealthCheckRequest, pb::HealthResponse>::default(),
        )
        .await
    };
    let small = agent_health(check("x".repeat(1000))).await.unwrap();
    assert_eq!(small.into_inner().node_name, "test-node");
    let refused = agent_health(check("x".repeat(100_000)))
        .await
        .expect_err("a 100 kB Agent/Health call");
    assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");
    assert_eq!(
        refused.message(),
        "the message is larger than 65536 bytes",
        "{refused:?}"
    );
}

/// The address maps hold 16384 prefixes per family, every capture's
/// together. A start that finds them full is RESOURCE_EXHAUSTED (as a node
/// at its limit of captures: no agent the controller cannot reach) and
/// leaves nothing; a change of targets that does not fit keeps the old
/// ones.
#[tokio::test]
async fn full_address_maps_refuse_a_start_as_exhausted_and_leave_nothing() {
    if !privileged("full_address_maps_refuse_a_start_as_exhausted_and_leave_nothing") {
        return;
    }
    use packet_capture_common::abi::MAX_PREFIXES;
    use packet_capture_common::crd::MAX_NODE_TARGETS;
    let node = Node::new();
    let agent = node.agent(
        &["--insecure-no-auth"],
        &[
            ("CAPTURE_BACKEND", "ebpf"),
            ("MAX_CONCURRENT_CAPTURES", "64"),
        ],
    );
    let mut c = grpc(&agent).await;
    // The `n`th capture's first `count` addresses, none another's.
    let addresses = |n: usize, count: usize| -> Vec<String> {
        (0..count)
            .map(|i| std::net::Ipv4Addr::from(0x0a00_0000 + (n * MAX_NODE_TARGETS + i) as u32))
            .map(|a| a.to_string())
            .collect()
    };
    let start = |n: usize, count: usize| {
        let mut req = ping_capture(&format!("full-{n}"), 4);
        let spec = req.spec.as_mut().unwrap();
        spec.target_ips = addresses(n, count);
        // Outlasts the test: no capture ends to make room.
        spec.duration_seconds = 3600;
        req
    };
    // Captures of one address short of the most, and one of the rest: the
    // maps are full, and each capture could take one more.
    let (room, each) = (MAX_PREFIXES as usize, MAX_NODE_TARGETS - 1);
    let sizes: Vec<usize> = (0..room / each)
        .map(|_| each)
        .chain([room % each])
        .collect();
    for (n, &count) in sizes.iter().enumerate() {
        c.start_capture(start(n, count)).await.unwrap();
    }
    let refused = sizes.len();
    let err = c.start_capture(start(refused, 1)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message()
            .starts_with("the node's address maps have no room"),
        "{err:?}"
    );
    let listed = c
        .list_captures(pb::ListCapturesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .captures;
    assert_eq!(listed.len(), refused, "the refused start left no capture");
    // By the start of their ids, as the controller lists one resource's.
    let listed = c
        .list_captures(pb::ListCapturesRequest {
            id_prefix: "full-1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .captures;
    let ids: Vec<&str> = listed.iter().map(|c| c.id.as_str()).collect();
    let mut wanted: Vec<String> = (0..refused)
        .map(|n| format!("full-{n}"))
        .filter(|id| id.starts_with("full-1"))
        .collect();
    wanted.sort();
    assert_eq!(ids, wanted, "by id");
    let files: Vec<_> = std::fs::read_dir(node.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(files.len(), refused, "nor a file: {files:?}");

    // The first capture's targets and one address more: no room, and the
    // capture keeps what it had.
    let mut set_first = async |target_ips: Vec<String>| {
        let err = c
            .set_targets(pb::SetTargetsRequest {
                id: "full-0".into(),
                target_ips,
                pods: vec![],
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
        let kept = c
            .get_capture(pb::GetCaptureRequest {
                id: "full-0".into(),
            })
            .await
            .unwrap()
            .into_inner();
        kept.spec.unwrap().target_ips
    };
    assert_eq!(set_first(addresses(0, each + 1)).await, addresses(0, each));
    // Its first address out, two new in: no room, and the one left out is
    // out even so.
    let fewer = addresses(0, each).split_off(1);
    assert_eq!(
        set_first([fewer.clone(), addresses(refused, 2)].concat()).await,
        fewer
    );

    // One capture ends: its room takes the refused one (two addresses: the
    // one its narrowing freed is not enough).
    let err = c.start_capture(start(refused, 2)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    c.stop_capture(pb::StopCaptureRequest {
        id: "full-1".into(),
    })
    .await
    .unwrap();
    c.start_capture(start(refused, 2)).await.unwrap();
}
