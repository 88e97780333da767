//! `kubectl pcap` through the aggregated API `pcap.packet.io`: the files of
//! every node merged into one pcapng (checked against mergecap), live
//! packets while they are captured, and refusals that name the permission,
//! with nothing but the API server's address and a user's own token.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
use kube::runtime::wait::await_condition;
use kube::{Api, ResourceExt as _};
use packet_capture_common::crd::{
    OutputFormat, PacketCaptureConfigSpec, Phase, STOP_REQUESTED, stopped_generation,
};
use packet_capture_test_support::capfile::{self, if_name};
use packet_capture_test_support::cluster::COMPONENT_NAMESPACE;
use packet_capture_test_support::workspace_binary;
use serde_json::json;

use crate::world::{
    API_SERVICE_TURN, Certs, READER, READER_BEYOND_ASCII, Setup, TWO_NODES, WORLD_LABEL, World,
    labelled,
};
use crate::{Deletes, kubectl_apply};

const API_SERVICE: &str = "v1.pcap.packet.io";
const SERVICE: &str = "packet-capture-webhook";

/// How long a live stream is read before its capture is stopped: longer
/// than the local API server's request timeout (20 s), which a stream must
/// outlast.
const OUTLAST: Duration = Duration::from_secs(25);

/// The live capture's duration: long enough that it is the stop, not its
/// end, that ends the stream, however late its status says it runs.
const LIVE_SECONDS: u32 = 300;

fn kubectl_pcap() -> PathBuf {
    workspace_binary(
        "kubectl-pcap",
        "kubectl-pcap",
        &["kubectl-pcap/src", "packet-capture-common/src"],
    )
}

/// The aggregated API on this world's controller, as the chart registers it
/// (an APIService for the Service of the webhooks' port) with the Service's
/// endpoint at the controller on the host, where no kube-proxy is needed:
/// the API server routes to endpoints.
async fn register_api(w: &World) -> Deletes {
    let hook = w
        .webhook
        .as_ref()
        .expect("a world with the webhook's server");
    let ca = hook.ca.as_ref().expect("the webhook's CA (Certs::Dir)");
    let host = w.cluster.host_ip().to_string();
    let guard = Deletes(
        w.cluster,
        vec![
            vec!["apiservice".into(), API_SERVICE.into()],
            vec![
                "service".into(),
                SERVICE.into(),
                "-n".into(),
                COMPONENT_NAMESPACE.into(),
            ],
            vec![
                "endpointslice".into(),
                SERVICE.into(),
                "-n".into(),
                COMPONENT_NAMESPACE.into(),
            ],
            vec![
                "endpoints".into(),
                SERVICE.into(),
                "-n".into(),
                COMPONENT_NAMESPACE.into(),
            ],
        ],
    );
    let port = json!([{"name": "https", "port": hook.port, "protocol": "TCP"}]);
    for object in [
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": SERVICE, "namespace": COMPONENT_NAMESPACE},
            "spec": {"ports": [{"name": "https", "port": 443, "targetPort": hook.port}]},
        }),
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": SERVICE, "namespace": COMPONENT_NAMESPACE,
                         "labels": {"kubernetes.io/service-name": SERVICE}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [host], "conditions": {"ready": true}}],
            "ports": port,
        }),
        json!({
            "apiVersion": "v1", "kind": "Endpoints",
            "metadata": {"name": SERVICE, "namespace": COMPONENT_NAMESPACE},
            "subsets": [{"addresses": [{"ip": host}], "ports": port}],
        }),
        json!({
            "apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
            "metadata": {"name": API_SERVICE},
            "spec": {
                "group": "pcap.packet.io", "version": "v1",
                "groupPriorityMinimum": 1000, "versionPriority": 15,
                "service": {"name": SERVICE, "namespace": COMPONENT_NAMESPACE, "port": 443},
                "caBundle": k8s_openapi::ByteString(ca.clone()),
            },
        }),
    ] {
        let (ok, out) = kubectl_apply(w, &object).await;
        assert!(ok, "applying {object}: {out}");
    }
    let available = await_condition(
        Api::<APIService>::all(w.client.clone()),
        API_SERVICE,
        |s: Option<&APIService>| {
            s.and_then(|s| s.status.as_ref())
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| {
                    c.iter()
                        .any(|c| c.type_ == "Available" && c.status == "True")
                })
        },
    );
    if tokio::time::timeout(Duration::from_secs(60), available)
        .await
        .is_err()
    {
        let now = w
            .cluster
            .kubectl_run(&["get", "apiservice", API_SERVICE, "-o", "yaml"]);
        panic!(
            "{API_SERVICE} not Available within 60 s: {now:?}\n{}",
            w.controller.log()
        );
    }
    guard
}

/// A kubeconfig with nothing but the API server's address, its CA and the
/// token of `account` (in the components' namespace).
async fn kubeconfig_of(w: &World, account: &str) -> PathBuf {
    w.cluster
        .user_kubeconfig(COMPONENT_NAMESPACE, account)
        .await
        .unwrap_or_else(|e| panic!("a kubeconfig of {account}: {e}"))
}

/// `kubectl pcap <args>` as the user of `kubeconfig`: success, stdout,
/// stderr.
fn pcap(kubeconfig: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(kubectl_pcap())
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .expect("running kubectl-pcap");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn icmp_capture(w: &World, duration: u32) -> PacketCaptureConfigSpec {
    PacketCaptureConfigSpec {
        target_ips: vec![w.pods[0].ip().to_string(), w.pods[1].ip().to_string()],
        filter: "icmp".into(),
        duration,
        output_format: OutputFormat::Pcapng,
        ..Default::default()
    }
}

/// `kubectl pcap stream ARGS` with `kubeconfig`, its output piped.
fn stream_with(kubeconfig: &Path, args: &[&str]) -> std::process::Child {
    Command::new(kubectl_pcap())
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("stream")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl pcap stream")
}

/// The sections of a pcapng stream read so far: one per time the stream
/// was opened.
fn sections_of(stream: &[u8]) -> usize {
    use pcap_file::pcapng::{Block, PcapNgParser};
    let Ok((mut rest, mut parser)) = PcapNgParser::new(stream) else {
        return 0;
    };
    let mut sections = 1;
    while let Ok((after, block)) = parser.next_block(rest) {
        sections += usize::from(matches!(block, Block::SectionHeader(_)));
        rest = after;
    }
    sections
}

/// Counts the packet blocks of a pcapng stream read so far, with each
/// one's timestamp and interface name.
fn packets_of(stream: &[u8]) -> Vec<(u64, String)> {
    use pcap_file::pcapng::{Block, PcapNgParser};
    let Ok((mut rest, mut parser)) = PcapNgParser::new(stream) else {
        return Vec::new();
    };
    let mut names = Vec::new();
    let mut packets = Vec::new();
    while let Ok((after, block)) = parser.next_block(rest) {
        match block {
            // Each section names its interfaces anew.
            Block::SectionHeader(_) => names.clear(),
            Block::InterfaceDescription(idb) => {
                names.push(if_name(&idb).unwrap_or_default().to_owned())
            }
            Block::EnhancedPacket(p) => packets.push((
                p.timestamp.as_nanos() as u64,
                names
                    .get(p.interface_id as usize)
                    .cloned()
                    .unwrap_or_default(),
            )),
            _ => {}
        }
        rest = after;
    }
    packets
}

/// Each node's packets in a pcapng stream read so far, in order: the
/// number the stream gives each (`epb_packetid`) and the packets it says
/// were lost just before it (`epb_dropcount`).
fn numbers_of(stream: &[u8]) -> BTreeMap<String, Vec<(u64, u64)>> {
    use pcap_file::pcapng::blocks::enhanced_packet::EnhancedPacketOption;
    use pcap_file::pcapng::blocks::opt_common::CommonOption;
    use pcap_file::pcapng::{Block, PcapNgParser};
    let mut numbers = BTreeMap::<String, Vec<(u64, u64)>>::new();
    let Ok((mut rest, mut parser)) = PcapNgParser::new(stream) else {
        return numbers;
    };
    let mut nodes = Vec::new();
    while let Ok((after, block)) = parser.next_block(rest) {
        match block {
            Block::SectionHeader(_) => nodes.clear(),
            Block::InterfaceDescription(idb) => {
                let node = if_name(&idb).and_then(|name| name.split_once('/'));
                nodes.push(node.map(|(node, _)| node.to_owned()));
            }
            Block::EnhancedPacket(p) => {
                let (mut number, mut lost) = (None, 0);
                for option in &p.options {
                    match option {
                        EnhancedPacketOption::DropCount(n) => lost = *n,
                        EnhancedPacketOption::Common(CommonOption::Unknown(u)) if u.code == 5 => {
                            number = u.value.as_ref().try_into().ok().map(u64::from_le_bytes)
                        }
                        _ => {}
                    }
                }
                let node = nodes[p.interface_id as usize].clone();
                numbers
                    .entry(node.expect("an interface named node/iface"))
                    .or_default()
                    .push((number.expect("a numbered packet"), lost));
            }
            _ => {}
        }
        rest = after;
    }
    numbers
}

/// A world of two nodes whose controller serves the aggregated API, which
/// is registered for it while the guards live.
async fn with_the_api(
    test: &str,
) -> Option<(World, tokio::sync::MutexGuard<'static, ()>, Deletes)> {
    let setup = Setup {
        nodes: 2,
        webhook: Certs::Dir,
        ..TWO_NODES
    };
    let w = World::start(test, setup).await?;
    let one = API_SERVICE_TURN.lock().await;
    let api = register_api(&w).await;
    Some((w, one, api))
}

/// What a child writes to `stdout`, each read with the time it came, from
/// a thread of its own; and that thread.
fn chunks_of(
    mut stdout: std::process::ChildStdout,
) -> (
    std::sync::mpsc::Receiver<(Vec<u8>, SystemTime)>,
    std::thread::JoinHandle<()>,
) {
    let (sender, received) = std::sync::mpsc::channel();
    let reading = std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || sender.send((buf[..n].to_vec(), SystemTime::now())).is_err() {
                break;
            }
        }
    });
    (received, reading)
}

/// A part of one node's file `downloaded` (from its agent) through the API
/// server, as `curl -C -` asks to resume a download: 206 with the bytes from
/// there on, or 416 with the file's size for a start past its end; with the
/// agent's validators (ETag, Last-Modified), which an If-Range names to go
/// on with the same file, and the whole file for an If-Range naming another;
/// 304 for a copy an If-None-Match or If-Modified-Since says is the file.
async fn parts_through_the_api_server(w: &World, capture: &str, node: &str, downloaded: &Path) {
    use http::header::{IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_RANGE, RANGE};
    let whole = std::fs::read(downloaded).unwrap();
    let prefix = "node0-";
    let file = downloaded.file_name().unwrap().to_str().unwrap();
    let file = file.strip_prefix(prefix).unwrap();
    let client = w.cluster.client().unwrap();
    let get_with = |headers: Vec<(http::header::HeaderName, String)>| {
        let mut request = http::Request::get(format!(
            "/apis/pcap.packet.io/v1/captures/{capture}/proxy/files/{node}/{file}"
        ));
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let request = request.body(Vec::new()).unwrap();
        let client = client.clone();
        async move {
            let response = client.send(request.map(Into::into)).await.unwrap();
            let (parts, body) = response.into_parts();
            let body = axum::body::to_bytes(axum::body::Body::new(body), usize::MAX)
                .await
                .unwrap();
            (parts, body)
        }
    };
    let get_if = |range: &str, if_range: Option<&str>| {
        let mut headers = vec![(RANGE, range.to_owned())];
        headers.extend(if_range.map(|v| (IF_RANGE, v.to_owned())));
        get_with(headers)
    };
    let get = |range: &str| get_if(range, None);
    let size = whole.len();
    let (head, body) = get("bytes=10-").await;
    assert_eq!(head.status, 206, "{body:?}");
    assert_eq!(
        head.headers[http::header::CONTENT_RANGE],
        format!("bytes 10-{}/{size}", size - 1).as_str()
    );
    assert_eq!(head.headers[http::header::ACCEPT_RANGES], "bytes");
    assert_eq!(body, whole[10..]);
    for validator in [http::header::ETAG, http::header::LAST_MODIFIED] {
        let value = head.headers[&validator].to_str().unwrap();
        let (again, body) = get_if("bytes=20-", Some(value)).await;
        assert_eq!(again.status, 206, "{validator}: {body:?}");
        assert_eq!(body, whole[20..], "{validator}");
    }
    let (head, body) = get(&format!("bytes={size}-")).await;
    assert_eq!(head.status, 416, "{body:?}");
    assert_eq!(
        head.headers[http::header::CONTENT_RANGE],
        format!("bytes */{size}").as_str()
    );
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("Range: "), "{body}");
    let (head, body) = get_if("bytes=10-", Some("\"an-etag\"")).await;
    assert_eq!(head.status, 200, "{body:?}");
    assert_eq!(body, whole);
    let etag = head.headers[http::header::ETAG]
        .to_str()
        .unwrap()
        .to_owned();
    let modified = head.headers[http::header::LAST_MODIFIED]
        .to_str()
        .unwrap()
        .to_owned();
    for condition in [(IF_NONE_MATCH, etag.clone()), (IF_MODIFIED_SINCE, modified)] {
        let (head, body) = get_with(vec![condition.clone()]).await;
        assert_eq!(head.status, 304, "{condition:?}: {body:?}");
        assert_eq!(head.headers[http::header::ETAG], etag.as_str());
        assert!(body.is_empty(), "{condition:?}");
    }
    let (head, body) = get_with(vec![(IF_NONE_MATCH, "\"an-etag\"".into())]).await;
    assert_eq!(head.status, 200, "{body:?}");
    assert_eq!(body, whole);
}

#[tokio::test]
async fn kubectl_pcap_fetches_and_streams_through_the_api_server() {
    let Some((mut w, _one, _api)) =
        with_the_api("kubectl_pcap_fetches_and_streams_through_the_api_server").await
    else {
        return;
    };
    let reader = kubeconfig_of(&w, READER).await;

    // Straight to the controller, not through the API server: no front
    // proxy's client certificate, so headers naming a user count for
    // nothing.
    let direct = format!(
        "https://{}:{}/apis/pcap.packet.io/v1/captures/any/proxy/files",
        w.cluster.host_ip(),
        w.webhook.as_ref().unwrap().port
    );
    let out = Command::new("curl")
        .args([
            "-sk",
            "-H",
            "X-Remote-User: system:admin",
            "-H",
            "X-Remote-Group: system:masters",
        ])
        .args(["-w", "\n%{http_code}", &direct])
        .output()
        .expect("curl");
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(
        answer.ends_with("\n401") && answer.contains("front-proxy"),
        "{answer}"
    );

    // Live: a stream opened before the traffic shows it while the capture
    // runs, each packet within a second of its capture.
    let live = w.create(icmp_capture(&w, LIVE_SECONDS)).await;
    let name = live.metadata.name.clone().unwrap();
    w.until_running_on(&name, live.metadata.generation.unwrap(), 2)
        .await;
    let mut stream = stream_with(&reader, &[&name]);
    let (received, reading) = chunks_of(stream.stdout.take().unwrap());
    // The section header comes first, as soon as the stream is open.
    let mut bytes = Vec::new();
    let (first, opened) = received
        .recv_timeout(Duration::from_secs(30))
        .expect("the stream's header within 30 s");
    bytes.extend(first);
    // Measured on this machine's clock alone: from just before the first
    // echo request is sent to the chunk that brings it, and to the chunk
    // that brings the last reply (the pings take 0.8 s).
    let sent = SystemTime::now();
    w.ping(0, 1, 5).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut arrivals = Vec::new();
    while packets_of(&bytes).len() < 10 && Instant::now() < deadline {
        if let Ok((chunk, at)) = received.recv_timeout(Duration::from_millis(500)) {
            bytes.extend(chunk);
            arrivals.push((
                packets_of(&bytes).len(),
                at.duration_since(sent).unwrap_or_default(),
            ));
        }
    }
    let seen = packets_of(&bytes);
    assert!(
        seen.len() >= 10,
        "5 pings and 5 replies streamed, got {seen:?}"
    );
    let first = arrivals
        .iter()
        .find(|(n, _)| *n > 0)
        .map(|(_, t)| *t)
        .unwrap();
    let last = arrivals.last().map(|(_, t)| *t).unwrap();
    assert!(
        first <= Duration::from_secs(1) && last <= Duration::from_millis(1800),
        "packets reached the reader too late after they were sent (count, time): {arrivals:?}; \
         the packets (time, interface) in the order they came: {seen:?}"
    );
    let nodes: Vec<String> = w.nodes.iter().map(|n| n.name().to_owned()).collect();
    for (_, interface) in &seen {
        assert!(
            nodes
                .iter()
                .any(|n| interface.starts_with(&format!("{n}/"))),
            "interface {interface:?} is not named node/iface"
        );
    }
    // The controller restarts (a crash, a rollout): the stream breaks off,
    // is opened again once the API server reaches the controller, and goes
    // on in a section of its own with what is captured from then on.
    let pinging = w.pinging(0, 1);
    let killed = SystemTime::now();
    w.controller.kill();
    w.controller.restart();
    let deadline = Instant::now() + Duration::from_secs(90);
    let reopened = loop {
        match received.recv_timeout(Duration::from_millis(500)) {
            Ok((chunk, at)) => {
                bytes.extend(chunk);
                if sections_of(&bytes) > 1 {
                    break at;
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let ended = stream.wait_with_output().expect("the stream's end");
                panic!(
                    "the stream ended at the controller's restart: {}",
                    String::from_utf8_lossy(&ended.stderr)
                );
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => assert!(
                Instant::now() < deadline,
                "the stream did not go on within 90 s of the controller's restart"
            ),
        }
    };
    eprintln!(
        "the stream went on {:?} after the controller was killed",
        reopened.duration_since(killed).unwrap_or_default()
    );
    // Packets that come from now on are the new section's.
    let before_restart = packets_of(&bytes).len();
    // The stream outlasts the API server's request timeout (20 s on the
    // local control plane, a minute by default): it goes on while the
    // capture runs, and ends cleanly once `kubectl pcap stop` has ended it.
    let stop_at = reopened + OUTLAST;
    let mut stopped = None;
    loop {
        match received.recv_timeout(Duration::from_millis(500)) {
            Ok((chunk, _)) => bytes.extend(chunk),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        match stopped {
            None if SystemTime::now() >= stop_at => {
                let (ok, out, err) = pcap(&w.cluster.kubeconfig(), &["stop", &name, "--wait"]);
                assert!(ok, "kubectl pcap stop: {out}{err}");
                stopped = Some(Instant::now());
            }
            Some(at) if at.elapsed() > Duration::from_secs(40) => {
                let _ = stream.kill();
                panic!("the stream did not end within 40 s of its capture's stop");
            }
            _ => {}
        }
    }
    drop(pinging);
    let ended = stream.wait_with_output().expect("the stream's end");
    assert!(
        stopped.is_some(),
        "the stream ended {:?} after it opened, while its capture ran: {}",
        SystemTime::now().duration_since(opened).unwrap_or_default(),
        String::from_utf8_lossy(&ended.stderr)
    );
    let stderr = String::from_utf8_lossy(&ended.stderr);
    assert!(ended.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("{name}: the stream broke off"))
            && stderr.contains(&format!("{name}: the stream goes on")),
        "{stderr}"
    );
    assert!(
        packets_of(&bytes).len() > before_restart,
        "no packet streamed after the controller's restart"
    );
    // Nothing the nodes captured while the stream was closed is missing:
    // each node's packets follow one another by number, across sections,
    // or the stream says how many are not there.
    assert!(
        stderr.contains(&format!(
            "{name}: the stream goes on after the last packet it brought from each node"
        )),
        "{stderr}"
    );
    let numbers = numbers_of(&bytes);
    assert!(!numbers.is_empty());
    for (node, numbers) in &numbers {
        for pair in numbers.windows(2) {
            let ((before, _), (next, lost)) = (pair[0], pair[1]);
            assert_eq!(
                next,
                before + 1 + lost,
                "node {node}'s packets skip from {before} to {next} (lost {lost}): {numbers:?}"
            );
        }
        assert!(
            numbers.iter().all(|&(_, lost)| lost == 0),
            "node {node} lost packets at the restart: {numbers:?}"
        );
    }
    // It says how the capture ended.
    assert!(
        stderr
            .lines()
            .last()
            .is_some_and(|l| l.starts_with(&format!("{name}: Completed"))),
        "{stderr}"
    );
    // Stopped by request, it completes with its files kept; the request
    // names the generation it stopped, so a later spec edit starts over.
    let done = w.until_phase(&name, Phase::Completed).await;
    let asked = done.annotations().get(STOP_REQUESTED).cloned();
    assert_eq!(
        asked.as_deref().and_then(stopped_generation),
        done.metadata.generation,
        "{STOP_REQUESTED}: {asked:?}"
    );
    let _ = reading.join();

    // Fetch: every node's file of a completed capture, merged, equals what
    // mergecap makes of the files downloaded from each agent.
    let capture = w.create(icmp_capture(&w, 8)).await;
    let name = capture.metadata.name.clone().unwrap();
    w.until_running_on(&name, capture.metadata.generation.unwrap(), 2)
        .await;
    w.ping(0, 1, 4).await;
    let done = w.until_phase(&name, Phase::Completed).await;
    let status = done.status.unwrap();
    let dir = w.cluster.dir().join("e2e").join(&w.id);
    let mut per_node = Vec::new();
    for node in 0..2 {
        let downloaded = w.download(node, &w.entry(&status, node).output_file).await;
        let plain = dir.join(format!("node{node}-plain.pcapng"));
        std::fs::write(&plain, capfile::bytes(&downloaded)).unwrap();
        per_node.push(plain);
        if node == 0 {
            let node = &w.entry(&status, node).node;
            parts_through_the_api_server(&w, &name, node, &downloaded).await;
        }
    }
    let expected = dir.join("mergecap.pcapng");
    let merged = Command::new("mergecap")
        .arg("-w")
        .arg(&expected)
        .args(&per_node)
        .output()
        .expect("mergecap (wireshark-common)");
    assert!(merged.status.success(), "{merged:?}");
    let fetched = dir.join("fetched.pcapng");
    let (ok, _, err) = pcap(&reader, &["fetch", &name, "-o", fetched.to_str().unwrap()]);
    assert!(ok, "kubectl pcap fetch: {err}");
    let key = |p: &capfile::Packet| (p.time_ns, p.data.clone(), p.orig_len);
    let ours: Vec<_> = capfile::read(&fetched).iter().map(key).collect();
    let theirs: Vec<_> = capfile::read(&expected).iter().map(key).collect();
    assert!(ours.len() >= 8, "4 pings and their replies: {}", ours.len());
    assert_eq!(ours, theirs, "kubectl pcap fetch differs from mergecap");
    // Tab completion through kubectl: the capture's name, with its phase,
    // from the cluster of the kubeconfig typed after `pcap`.
    let completing = dir.join("completion");
    std::fs::create_dir_all(&completing).unwrap();
    std::os::unix::fs::symlink(kubectl_pcap(), completing.join("kubectl-pcap")).unwrap();
    let launcher = completing.join("kubectl_complete-pcap");
    std::fs::write(
        &launcher,
        "#!/bin/sh\nexec kubectl-pcap __complete \"$@\"\n",
    )
    .unwrap();
    std::fs::set_permissions(
        &launcher,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let path = format!(
        "{}:{}",
        completing.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let complete = |kubeconfig: &Path, words: &[&str]| {
        let out = Command::new(w.cluster.bin_dir().join("kubectl"))
            .args(["__complete", "pcap", "--kubeconfig"])
            .arg(kubeconfig)
            .args(words)
            .env("PATH", &path)
            .env_remove("KUBECONFIG")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let completed = complete(&reader, &["fetch", &name[..name.len() - 1]]);
    assert!(
        completed.lines().any(|l| l == format!("{name}\tCompleted")),
        "{completed}"
    );
    assert_eq!(completed.lines().last(), Some(":4"), "{completed}");
    // Pods, and namespaces, for who may list them.
    let ns = w.namespace.name();
    let admin = w.cluster.kubeconfig();
    let pods = complete(&admin, &["create", "x", "--pod", &format!("{ns}/")]);
    let pod = format!("{ns}/{}\t{}", w.pods[1].name(), w.nodes[1].name());
    assert!(pods.lines().any(|l| l == pod), "{pod} in {pods}");
    let namespaces = complete(&admin, &["stream", "-n", &ns[..ns.len() - 1]]);
    assert!(namespaces.lines().any(|l| l == ns), "{namespaces}");
    // The same, as a user whose names are beyond ASCII, impersonated as
    // kubectl does: the API server sends them to the controller as UTF-8,
    // and the controller relays them to the agents percent-encoded.
    let impersonated = dir.join("fetched-as.pcapng");
    let (ok, _, err) = pcap(
        &w.cluster.kubeconfig(),
        &[
            "fetch",
            &name,
            "-o",
            impersonated.to_str().unwrap(),
            "--as",
            READER_BEYOND_ASCII,
            "--as-group",
            "système",
            "--as-group",
            "system:authenticated",
            "--as-uid",
            "ü-1",
        ],
    );
    assert!(ok, "kubectl pcap fetch --as: {err}");
    let as_them: Vec<_> = capfile::read(&impersonated).iter().map(key).collect();
    assert_eq!(as_them, ours);
    // Impersonation is the API server's to allow, and to refuse.
    let (ok, _, err) = pcap(&reader, &["fetch", &name, "-o", "-", "--as", "someone"]);
    assert!(!ok);
    assert!(err.contains("impersonate"), "{err}");
    for packet in capfile::read(&fetched) {
        assert!(
            nodes
                .iter()
                .any(|n| packet.interface.starts_with(&format!("{n}/"))),
            "interface {:?} is not named node/iface",
            packet.interface
        );
    }

    // A stream of its own: `stream --pod` makes a capture for the stream
    // alone, and Ctrl-C ends the stream and deletes that capture.
    let pod = format!("{}/{}", w.namespace.name(), w.pods[1].name());
    let label = format!("{WORLD_LABEL}={}", w.id);
    let mut own = stream_with(
        &w.cluster.kubeconfig(),
        &["--pod", &pod, "--filter", "icmp", "--labels", &label],
    );
    let (received, reading) = chunks_of(own.stdout.take().unwrap());
    let mut bytes = received
        .recv_timeout(Duration::from_secs(60))
        .expect("the stream's header within 60 s")
        .0;
    w.ping(0, 1, 3).await;
    while packets_of(&bytes).len() < 6 {
        let (chunk, _) = received
            .recv_timeout(Duration::from_secs(20))
            .expect("3 pings and their replies within 20 s");
        bytes.extend(chunk);
    }
    let interrupted = Command::new("kill")
        .args(["-INT", &own.id().to_string()])
        .status()
        .unwrap();
    assert!(interrupted.success());
    let out = own.wait_with_output().expect("kubectl pcap stream's end");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "Ctrl-C ends it cleanly: {stderr}");
    drop(received);
    let _ = reading.join();
    let created = stderr
        .lines()
        .find_map(|l| l.strip_prefix("created capture "))
        .and_then(|l| l.split(';').next())
        .unwrap_or_else(|| panic!("no capture named as created: {stderr}"))
        .to_owned();
    assert!(
        stderr.contains(&format!("deleted capture {created}")),
        "{stderr}"
    );
    let gone = await_condition(w.api(), &created, |c: Option<&_>| c.is_none());
    tokio::time::timeout(Duration::from_secs(30), gone)
        .await
        .expect("the stream's own capture gone within 30 s")
        .expect("watching the stream's own capture");
    // It wrote no file, which no one could have fetched once it was gone.
    for node in 0..w.nodes.len() {
        let files = w.files_on(node).await;
        assert!(
            !files.iter().any(|f| f.starts_with(&format!("{created}-"))),
            "node {node} keeps a file of the stream's own capture: {files:?}"
        );
    }

    // A reader that quits while nothing is captured (a filter no packet
    // matches) ends the stream too, and its capture goes.
    let mut quiet = stream_with(
        &w.cluster.kubeconfig(),
        &["--pod", &pod, "--filter", "udp port 9", "--labels", &label],
    );
    let mut stdout = quiet.stdout.take().unwrap();
    let mut header = [0u8; 4];
    stdout.read_exact(&mut header).expect("the stream's header");
    drop(stdout);
    let pid = quiet.id().to_string();
    let (done, ended) = std::sync::mpsc::channel();
    std::thread::spawn(move || done.send(quiet.wait_with_output()));
    let Ok(out) = ended.recv_timeout(Duration::from_secs(30)) else {
        let _ = Command::new("kill").args(["-KILL", &pid]).status();
        panic!("the stream went on for 30 s after its reader quit");
    };
    let out = out.expect("kubectl pcap stream's end");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    assert!(stderr.contains("deleted capture "), "{stderr}");

    // Refused: without the API group's permission the API server says so;
    // with it but without the capture's files, the controller names the
    // missing permission.
    let limited = format!("e2e-pcap-limited-{}", w.id);
    let role = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": limited},
        "rules": [
            {"apiGroups": ["networking.packet.io"], "resources": ["packetcaptureconfigs"], "verbs": ["get", "list"]},
            {"apiGroups": ["pcap.packet.io"], "resources": ["captures/proxy"], "verbs": ["get"]},
        ],
    });
    let (ok, out) = kubectl_apply(&w, &role).await;
    assert!(ok, "{out}");
    let _limited = Deletes(
        w.cluster,
        vec![
            vec!["clusterrole".into(), limited.clone()],
            vec!["clusterrolebinding".into(), limited.clone()],
            vec![
                "serviceaccount".into(),
                limited.clone(),
                "-n".into(),
                COMPONENT_NAMESPACE.into(),
            ],
        ],
    );
    for args in [
        vec![
            "create",
            "serviceaccount",
            &limited,
            "-n",
            COMPONENT_NAMESPACE,
        ],
        vec![
            "create",
            "clusterrolebinding",
            &limited,
            &format!("--clusterrole={limited}"),
            &format!("--serviceaccount={COMPONENT_NAMESPACE}:{limited}"),
        ],
    ] {
        w.cluster
            .kubectl_async(&args)
            .await
            .expect("the limited user");
    }
    let nobody = format!("e2e-pcap-nobody-{}", w.id);
    w.cluster
        .kubectl_async(&[
            "create",
            "serviceaccount",
            &nobody,
            "-n",
            COMPONENT_NAMESPACE,
        ])
        .await
        .expect("an account without bindings");
    let _nobody = Deletes(
        w.cluster,
        vec![vec![
            "serviceaccount".into(),
            nobody.clone(),
            "-n".into(),
            COMPONENT_NAMESPACE.into(),
        ]],
    );
    let out = dir.join("refused.pcapng");
    let (ok, _, err) = pcap(
        &kubeconfig_of(&w, &nobody).await,
        &["fetch", &name, "-o", out.to_str().unwrap()],
    );
    assert!(!ok && err.contains("captures/proxy"), "{err}");
    let (ok, _, err) = pcap(
        &kubeconfig_of(&w, &limited).await,
        &["fetch", &name, "-o", out.to_str().unwrap()],
    );
    assert!(
        !ok && err.contains("packetcaptureconfigs.networking.packet.io/files"),
        "{err}"
    );
    assert!(!out.exists(), "nothing is written when refused");
    // Nor left half-done beside it, after those fetches or the one above.
    let left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".part") || n.starts_with(".kubectl-pcap-"))
        .collect();
    assert!(left.is_empty(), "left in {}: {left:?}", dir.display());
}

/// The README's `kubectl pcap` walkthrough, as written (with this world's
/// pod for `shop/web-0`, and its label on the capture so that its
/// controller runs it), by `kubectl` and the plugin on the PATH, as a user
/// bound to the chart's roles, from a network namespace whose firewall lets
/// out nothing but connections to the API server.
#[tokio::test]
async fn the_readmes_walkthrough_runs_with_nothing_but_the_api_server() {
    let Some((w, _one, _api)) =
        with_the_api("the_readmes_walkthrough_runs_with_nothing_but_the_api_server").await
    else {
        return;
    };

    let user = format!("e2e-pcap-user-{}", w.id);
    let pods_namespace = w.namespace.name().to_owned();
    let mut cleanup = vec![vec![
        "serviceaccount".into(),
        user.clone(),
        "-n".into(),
        COMPONENT_NAMESPACE.into(),
    ]];
    w.cluster
        .kubectl_async(&["create", "serviceaccount", &user, "-n", COMPONENT_NAMESPACE])
        .await
        .expect("the user's account");
    let account = format!("--serviceaccount={COMPONENT_NAMESPACE}:{user}");
    for role in ["packet-capture-editor", "packet-capture-viewer"] {
        let binding = format!("{role}-{user}");
        w.cluster
            .kubectl_async(&[
                "create",
                "clusterrolebinding",
                &binding,
                &format!("--clusterrole={role}"),
                &account,
            ])
            .await
            .unwrap_or_else(|e| panic!("binding {role}: {e}"));
        cleanup.push(vec!["clusterrolebinding".into(), binding]);
    }
    w.cluster
        .kubectl_async(&[
            "create",
            "rolebinding",
            &user,
            "-n",
            &pods_namespace,
            "--clusterrole=packet-capture-capturer",
            &account,
        ])
        .await
        .expect("capturing the pods' namespace");
    let _cleanup = Deletes(w.cluster, cleanup);
    let kubeconfig = kubeconfig_of(&w, &user).await;

    // The README's block, with this world's pod and label.
    let readme = std::fs::read_to_string(
        packet_capture_test_support::cluster::workspace_root().join("README.md"),
    )
    .unwrap();
    let block = readme
        .split("<!-- walkthrough: kubectl pcap")
        .nth(1)
        .and_then(|rest| rest.split("```sh\n").nth(1))
        .and_then(|rest| rest.split("```").next())
        .expect("the README's kubectl pcap walkthrough");
    let pod = format!("{pods_namespace}/{}", w.pods[1].name());
    let label = format!("--labels {WORLD_LABEL}={}", w.id);
    let script: String = block
        .lines()
        .map(|line| {
            let line = line.replace("shop/web-0", &pod);
            if line.starts_with("kubectl pcap create ") {
                format!("{line} {label}\n")
            } else {
                format!("{line}\n")
            }
        })
        .collect();

    let client = w
        .cluster
        .api_only_netns()
        .expect("a namespace that reaches only the API server");
    // Nothing else is reachable from there: not an agent, not the
    // controller.
    for url in [
        w.agents[0].url().replace("http://", "https://"),
        format!(
            "https://{}:{}/",
            w.cluster.host_ip(),
            w.webhook.as_ref().unwrap().port
        ),
    ] {
        let out = client
            .command("curl")
            .args(["-sk", "--max-time", "3", &url])
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "{url} is reachable from the client's namespace"
        );
    }
    let plugin_dir = kubectl_pcap().parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}:{}",
        plugin_dir.display(),
        w.cluster.bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let work = w.cluster.dir().join("e2e").join(&w.id).join("walkthrough");
    std::fs::create_dir_all(&work).unwrap();
    let pinging = w.pinging(0, 1);
    // The output goes to files, and the shell traces each step (`-x`), so
    // that a walkthrough that hangs still says which step it hangs in.
    let (stdout_path, stderr_path) = (work.join("stdout"), work.join("stderr"));
    let mut bash = client.command("bash");
    bash.args(["-xeuo", "pipefail", "-c", &script])
        .env("KUBECONFIG", &kubeconfig)
        .env("PATH", path)
        .current_dir(&work)
        .stdout(std::fs::File::create(&stdout_path).unwrap())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .process_group(0);
    let mut child = tokio::process::Command::from(bash)
        .spawn()
        .expect("running the walkthrough");
    let status = tokio::time::timeout(Duration::from_secs(180), child.wait()).await;
    drop(pinging);
    let read = |path: &Path| std::fs::read_to_string(path).unwrap_or_default();
    let (stdout, stderr) = (read(&stdout_path), read(&stderr_path));
    let Ok(status) = status else {
        // The whole group: the step that hangs is a child of the shell.
        if let Some(pid) = child.id() {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .status();
        }
        panic!(
            "the walkthrough did not finish within 3 minutes:\nstdout:\n{stdout}\nstderr:\n{stderr}\n{}",
            w.controller.log()
        );
    };
    assert!(
        status.expect("running the walkthrough").success(),
        "the walkthrough failed:\n{script}\nstdout:\n{stdout}\nstderr:\n{stderr}\n{}",
        w.controller.log()
    );
    // The fetched file holds the pod's packets, on its node's interfaces,
    // named node/iface.
    let pod_node = w.pods[1].node_name().to_owned();
    let nodes = [pod_node.as_str()];
    let target = w.pods[1].ip().to_string();
    let fields: Vec<&str> = stdout
        .lines()
        .filter(|l| l.split('\t').count() == 3)
        .collect();
    assert!(
        !fields.is_empty(),
        "no packets listed from the fetched file:\n{stdout}"
    );
    for node in &nodes {
        assert!(
            fields.iter().any(|l| l.starts_with(&format!("{node}/"))),
            "no packet of node {node} in the fetched file:\n{stdout}"
        );
    }
    assert!(fields.iter().all(|l| l.contains(&target)), "{stdout}");
    // `delete` asked; the controller lets it go once the nodes stopped.
    let gone = await_condition(w.api(), "web-icmp", |c: Option<&_>| c.is_none());
    tokio::time::timeout(Duration::from_secs(30), gone)
        .await
        .expect("the walkthrough's capture deleted within 30 s")
        .expect("watching the walkthrough's capture");
    // The file was written where the user ran it.
    assert!(work.join("web-icmp.pcapng").exists());
    // Stopped on request, and completed (not started again).
    assert!(stdout.contains("stopping on every node"), "{stdout}");
    assert!(stdout.contains("Completed"), "{stdout}");
}

/// A stream opened while its capture runs on one node takes in a node that
/// starts later: there, a pod its selector matches, scheduled since.
/// Wireshark's extcap: `kubectl pcap extcap --install` writes the launcher,
/// tshark (as a user without privileges: Wireshark reads no extcap folder
/// of root's choosing) lists the interface `kubernetes`, and a capture on
/// it with a capture filter is a stream of the pod named in its options,
/// from a capture made for it and deleted when tshark stops.
#[tokio::test]
async fn tshark_captures_a_pod_through_the_kubernetes_interface() {
    let Some((w, _one, _api)) =
        with_the_api("tshark_captures_a_pod_through_the_kubernetes_interface").await
    else {
        return;
    };
    // Outside root's home, which tshark's user cannot enter.
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().to_owned();
    std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
    let extcap = dir.join("extcap");
    // tshark's user reads the binary, the launcher and the kubeconfig.
    let binary = dir.join("kubectl-pcap");
    std::fs::copy(kubectl_pcap(), &binary).unwrap();
    // With its certificates in it: their files are in root's home.
    let kubeconfig = dir.join("kubeconfig");
    let flat = w
        .cluster
        .kubectl_async(&["config", "view", "--raw", "--flatten"])
        .await
        .unwrap();
    std::fs::write(&kubeconfig, flat).unwrap();
    let installed = Command::new(&binary)
        .args(["extcap", "--install"])
        .arg(&extcap)
        .output()
        .unwrap();
    assert!(installed.status.success(), "{installed:?}");
    for path in [&dir, &extcap, &binary, &kubeconfig] {
        let mode = if path.is_dir() || *path == binary {
            0o755
        } else {
            0o644
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let tshark = |args: &[&str]| {
        let mut cmd = Command::new("tshark");
        cmd.args(args)
            .env("HOME", &dir)
            .env("WIRESHARK_EXTCAP_DIR", &extcap)
            .current_dir(&dir)
            .uid(65534)
            .gid(65534);
        cmd
    };
    let listed = tshark(&["-D"]).output().expect("tshark -D");
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.contains("kubernetes (Kubernetes pods (kubectl pcap))"),
        "{listed}"
    );

    let pod = format!("{}/{}", w.namespace.name(), w.pods[1].name());
    let out = dir.join("tshark.pcapng");
    let option = |name: &str, value: &str| format!("extcap.kubernetes.{name}:{value}");
    // Its stderr into a file: dumpcap, which it starts, holds a pipe open.
    let said = dir.join("tshark.stderr");
    let mut capturing = tshark(&[
        "-i",
        "kubernetes",
        "-o",
        &option("pods", &pod),
        "-o",
        &option("labels", &format!("{WORLD_LABEL}={}", w.id)),
        "-o",
        &option("kubeconfig", kubeconfig.to_str().unwrap()),
        "-f",
        "icmp",
        "-c",
        "6",
        "-w",
        out.to_str().unwrap(),
    ])
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(&said).unwrap())
    .spawn()
    .expect("tshark -i kubernetes");
    let said = || std::fs::read_to_string(&said).unwrap_or_default();
    // Pings until tshark has its six packets: when the stream opens is
    // tshark's to know.
    let deadline = Instant::now() + Duration::from_secs(90);
    let done = loop {
        if let Some(done) = capturing.try_wait().unwrap() {
            break done;
        }
        if Instant::now() > deadline {
            // SIGTERM, so that it ends dumpcap and the extcap too.
            let _ = Command::new("kill")
                .args(["-TERM", &capturing.id().to_string()])
                .status();
            let _ = capturing.wait();
            panic!("tshark got no 6 packets in 90 s: {}", said());
        }
        w.ping(0, 1, 1).await;
    };
    assert!(done.success(), "{}", said());
    // A stream that went well says nothing Wireshark would show as an
    // error.
    assert!(!said().contains("extcap"), "{}", said());
    let packets = capfile::read(&out);
    assert_eq!(packets.len(), 6, "{}", said());
    let target = w.pods[1].ip().to_string();
    let listed = Command::new("tshark")
        .arg("-r")
        .arg(&out)
        .args([
            "-T",
            "fields",
            "-e",
            "frame.interface_name",
            "-e",
            "ip.addr",
        ])
        .args(["-e", "icmp.type"])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    for line in listed.lines() {
        let fields: Vec<&str> = line.split('\t').collect();
        assert!(
            w.nodes
                .iter()
                .any(|n| fields[0].starts_with(&format!("{}/", n.name()))),
            "{line}"
        );
        assert!(fields[1].contains(&target), "{line}");
        assert!(matches!(fields[2], "0" | "8"), "only ICMP echo: {line}");
    }
    // The capture made for it goes with the stream.
    let made = w
        .api()
        .list(&kube::api::ListParams::default().labels(&format!("{WORLD_LABEL}={}", w.id)))
        .await
        .unwrap();
    for capture in made.items.iter().map(|c| c.name_any()) {
        if capture.starts_with("pcap-stream-") {
            let gone = await_condition(w.api(), &capture, |c: Option<&_>| c.is_none());
            tokio::time::timeout(Duration::from_secs(30), gone)
                .await
                .unwrap_or_else(|_| panic!("{capture} is left"))
                .unwrap();
        }
    }
}

#[tokio::test]
async fn a_stream_takes_in_the_nodes_that_start_after_it_opened() {
    let Some((w, _one, _api)) =
        with_the_api("a_stream_takes_in_the_nodes_that_start_after_it_opened").await
    else {
        return;
    };
    let reader = kubeconfig_of(&w, READER).await;
    let ns = w.namespace.name().to_string();
    let web = [("tier", "web")];
    let _web_a = w.nodes[0]
        .add_labelled_pod(&ns, "web-a", &web)
        .await
        .expect("pod web-a");
    let spec = PacketCaptureConfigSpec {
        pod_selector: labelled(&ns, &web),
        filter: "icmp".into(),
        duration: LIVE_SECONDS,
        output_format: OutputFormat::Pcapng,
        ..Default::default()
    };
    let live = w.create(spec).await;
    let name = live.metadata.name.clone().unwrap();
    let generation = live.metadata.generation.unwrap();
    w.until_running_on(&name, generation, 1).await;
    let mut stream = stream_with(&reader, &[&name]);
    let (received, reading) = chunks_of(stream.stdout.take().unwrap());
    let mut bytes = received
        .recv_timeout(Duration::from_secs(30))
        .expect("the stream's header within 30 s")
        .0;

    // Scaled up: a pod on the other node, which starts capturing there.
    let web_b = w.nodes[1]
        .add_labelled_pod(&ns, "web-b", &web)
        .await
        .expect("pod web-b");
    w.until_running_on(&name, generation, 2).await;
    // Pinged until its packets come: the stream has them from when it took
    // the node in, just after the status said it runs.
    let _pinging = tokio::process::Command::from(w.pods[0].command("ping"))
        .args(["-n", "-q", "-i", "0.2"])
        .arg(web_b.ip().to_string())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("ping");
    let late = format!("{}/", w.nodes[1].name());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !packets_of(&bytes).iter().any(|(_, i)| i.starts_with(&late)) {
        assert!(
            Instant::now() < deadline,
            "no packet of node {late} within 30 s: {:?}",
            packets_of(&bytes)
        );
        if let Ok((chunk, _)) = received.recv_timeout(Duration::from_millis(500)) {
            bytes.extend(chunk);
        }
    }

    // Stopped, the capture ends on both nodes, and so does the stream.
    let (ok, out, err) = pcap(&w.cluster.kubeconfig(), &["stop", &name, "--wait"]);
    assert!(ok, "kubectl pcap stop: {out}{err}");
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        match received.recv_timeout(Duration::from_millis(500)) {
            Ok(_) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if Instant::now() > deadline {
                    let _ = stream.kill();
                    panic!("the stream did not end within 40 s of its capture's stop");
                }
            }
        }
    }
    let ended = stream.wait_with_output().expect("the stream's end");
    let stderr = String::from_utf8_lossy(&ended.stderr);
    assert!(ended.status.success(), "{stderr}");
    assert!(
        stderr
            .lines()
            .last()
            .is_some_and(|l| l.starts_with(&format!("{name}: Completed"))),
        "{stderr}"
    );
    let _ = reading.join();
}
