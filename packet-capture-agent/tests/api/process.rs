//! The agent as a process: bad configuration stops it at start with a
//! message naming the key; SIGTERM finishes the files, detaches and exits
//! 0 within 10 s.

use std::time::{Duration, Instant};

use packet_capture_test_support::agent::run_to_exit;
use packet_capture_test_support::privileged;
use serde_json::json;

use crate::common::{AGENT, LEFT_IP, Node, Rest, grpc, tshark};
use packet_capture_proto::v1 as pb;

#[test]
fn bad_configuration_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    let capture_dir = dir.path().to_str().unwrap();
    let not_a_dir = file.to_str().unwrap();
    let base = ["--insecure-no-auth", "--port", "0", "--insecure-plaintext"];
    for (env, key) in [
        (("AGENT_PORT", "http"), "AGENT_PORT"),
        (("AGENT_PORT", "70000"), "AGENT_PORT"),
        (("MAX_CAPTURE_FILES", "0"), "MAX_CAPTURE_FILES"),
        (("MAX_CAPTURE_FILES", "many"), "MAX_CAPTURE_FILES"),
        (
            ("MAX_CAPTURE_FILE_SIZE_MB", "-1"),
            "MAX_CAPTURE_FILE_SIZE_MB",
        ),
        (("LOG_LEVEL", "LOUD"), "LOG_LEVEL"),
        (("COMPRESSION", "rar"), "COMPRESSION"),
        (("CAPTURE_BACKEND", "dpdk"), "CAPTURE_BACKEND"),
        (("CAPTURE_DIR", not_a_dir), "CAPTURE_DIR"),
    ] {
        // AGENT_PORT is tested through the environment, so without --port.
        let without_port = [base[0], base[3]];
        let args: &[&str] = if key == "AGENT_PORT" {
            &without_port
        } else {
            &base
        };
        let mut envs = vec![env];
        if key != "CAPTURE_DIR" {
            envs.push(("CAPTURE_DIR", capture_dir));
        }
        let (status, stderr) = run_to_exit(AGENT, args, &envs);
        assert!(!status.success(), "{env:?} was accepted");
        assert!(stderr.contains(key), "{env:?}: {stderr}");
        assert!(!stderr.contains("listening on"), "{env:?}: {stderr}");
    }
    // Flags are checked the same way.
    let (status, stderr) = run_to_exit(AGENT, &["--max-capture-files", "0"], &[]);
    assert_eq!(status.code(), Some(2));
    assert!(stderr.contains("MAX_CAPTURE_FILES"), "{stderr}");
    // How the API is served: TLS unless plain HTTP is asked for, and then
    // on loopback only; a certificate from the cluster needs the node's
    // address; certificate files must be usable.
    for (args, key) in [
        // Without authentication, only where no one else can reach it.
        (
            &["--bind-address", "0.0.0.0"][..],
            "AGENT_BIND_ADDRESS: --insecure-no-auth",
        ),
        (
            &["--insecure-plaintext", "--bind-address", "10.1.2.3"],
            "AGENT_BIND_ADDRESS",
        ),
        (
            &["--insecure-plaintext", "--node-ip", "10.1.2.3"],
            "AGENT_BIND_ADDRESS",
        ),
        (&[], "NODE_IP"),
        (
            &["--tls-cert-file", not_a_dir, "--tls-key-file", not_a_dir],
            "TLS_CERT_FILE",
        ),
    ] {
        let mut all = vec![
            "--insecure-no-auth",
            "--port",
            "0",
            "--capture-dir",
            capture_dir,
        ];
        all.extend_from_slice(args);
        let (status, stderr) = run_to_exit(AGENT, &all, &[]);
        assert!(!status.success(), "{args:?} was accepted");
        assert!(stderr.contains(key), "{args:?}: {stderr}");
    }
    // Without --insecure-no-auth the agent needs Kubernetes access.
    let (status, stderr) = run_to_exit(
        AGENT,
        &[
            "--port",
            "0",
            "--capture-dir",
            capture_dir,
            "--insecure-plaintext",
        ],
        &[("KUBECONFIG", dir.path().join("missing").to_str().unwrap())],
    );
    assert!(!status.success());
    assert!(stderr.contains("--insecure-no-auth"), "{stderr}");
    assert!(stderr.contains("KUBECONFIG"), "{stderr}");
}

#[tokio::test]
async fn sigterm_finishes_files_and_exits_within_10s() {
    if !privileged("sigterm_finishes_files_and_exits_within_10s") {
        return;
    }
    let node = Node::new();
    let mut agent = node.agent(&["--insecure-no-auth"], &[]);
    let c = Rest::new(&agent);
    let health = c.json("/health").await;
    for (id, format) in [("term-1", "pcap"), ("term-2", "pcapng")] {
        let r = c
            .post(
                "/api/v1/captures",
                &json!({"id": id, "duration": 600, "outputFormat": format, "filter": "icmp"}),
            )
            .await;
        assert_eq!(r.status(), 201);
    }
    // SIGTERM right after the traffic: what the kernel selected is still
    // written, and the files are whole.
    node.ping(3);

    let started = Instant::now();
    let status = agent.signal_and_wait(libc::SIGTERM);
    let took = started.elapsed();
    assert_eq!(status.code(), Some(0), "{}", agent.log());
    assert!(took < Duration::from_secs(10), "took {took:?}");

    // Each capture's file is whole (tshark reads every packet) and under its
    // final name; nothing half-written is left.
    let all: Vec<String> = std::fs::read_dir(node.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    // (A compressed copy being made at exit may be left hidden; the next
    // start removes it. Capture files are never left half-written.)
    let (hidden, names): (Vec<&String>, Vec<&String>) =
        all.iter().partition(|n| n.starts_with('.'));
    assert_eq!(names.len(), 2, "{all:?}");
    assert!(
        hidden
            .iter()
            .all(|n| n.ends_with(".gz.partial") || n.ends_with(".zst.partial")),
        "{all:?}"
    );
    for name in &names {
        let path = node.dir.path().join(name);
        let packets = if name.ends_with(".gz") {
            let plain = tempfile::NamedTempFile::new().unwrap();
            let out = std::process::Command::new("gzip")
                .args(["-dc"])
                .arg(&path)
                .output()
                .unwrap();
            std::fs::write(plain.path(), out.stdout).unwrap();
            tshark(plain.path(), &["icmp.type"])
        } else {
            tshark(&path, &["icmp.type"])
        };
        assert_eq!(packets.len(), 6, "{name}: {packets:?}");
    }
    assert!(agent.log().contains("SIGTERM"));
    if health["backend"] == "ebpf" {
        let attached = crate::common::tc::tc_programs(&node.veth.a);
        assert!(attached.is_empty(), "left attached: {attached:?}");
    }
}

/// An idle agent leaves every packet alone: the programs go on the
/// interfaces when the first capture starts, before it selects anything
/// (its first packet is in its file), and come off when the last one ends.
#[tokio::test]
async fn the_programs_are_attached_only_while_captures_run() {
    if !privileged("the_programs_are_attached_only_while_captures_run") {
        return;
    }
    let node = Node::new();
    let agent = node.agent(&["--insecure-no-auth"], &[]);
    let c = Rest::new(&agent);
    let attached = || crate::common::tc::tc_programs(&node.veth.a);
    let health = c.json("/health").await;
    assert_eq!(health["backend"], "ebpf", "{}", agent.log());
    let interfaces = health["interfaces"].as_array().unwrap();
    assert!(interfaces.contains(&json!(node.veth.a)), "{health}");
    assert_eq!(attached(), Vec::<String>::new(), "idle");

    let start = async |id: &str| {
        let body = json!({"id": id, "duration": 600, "filter": "icmp"});
        assert_eq!(c.post("/api/v1/captures", &body).await.status(), 201);
    };
    let stop = async |id: &str| {
        let r = c.delete(&format!("/api/v1/captures/{id}")).await;
        assert!(r.status().is_success(), "{}", r.status());
        c.ended(id).await
    };
    for (round, overlapping) in [("first", "first-overlap"), ("second", "second-overlap")] {
        start(round).await;
        assert_eq!(attached(), ["tc_ingress", "tc_egress"], "{round} running");
        // At once: the first echo request is captured.
        node.ping(3);
        start(overlapping).await;
        let done = stop(round).await;
        assert_eq!(done["packets"], 6, "{round}: {done}");
        assert_eq!(attached(), ["tc_ingress", "tc_egress"], "another runs");
        stop(overlapping).await;
        assert_eq!(attached(), Vec::<String>::new(), "after {round}");
    }
}

#[test]
fn sigint_stops_the_agent_cleanly() {
    if !privileged("sigint_stops_the_agent_cleanly") {
        return;
    }
    let node = Node::new();
    let mut agent = node.agent(&["--insecure-no-auth"], &[]);
    let status = agent.signal_and_wait(libc::SIGINT);
    assert_eq!(status.code(), Some(0), "{}", agent.log());
    assert!(agent.log().contains("SIGINT"), "{}", agent.log());
}

#[test]
fn health_subcommand_asks_the_running_agent() {
    if !privileged("health_subcommand_asks_the_running_agent") {
        return;
    }
    let node = Node::new();
    let agent = node.agent(&["--insecure-no-auth"], &[]);
    let port = agent.port().to_string();
    // As the probe runs it: the port from AGENT_PORT, as the agent reads it.
    let out = std::process::Command::new(AGENT)
        .args(["--insecure-plaintext", "health"])
        .env("AGENT_PORT", &port)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let health: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(health["node"], "test-node", "{health}");
    drop(agent);
    // Nothing listens there any more: a failure that says where it asked.
    let (status, stderr) = run_to_exit(
        AGENT,
        &["--port", &port, "--insecure-plaintext", "health"],
        &[],
    );
    assert!(!status.success());
    assert!(stderr.contains(&format!("127.0.0.1:{port}")), "{stderr}");
}

/// A connection that does not finish saying what it wants (nothing at
/// all, the start of the HTTP/2 preface, part of an HTTP/1.1 request head)
/// is closed once the header timeout has passed, and the agent serves
/// others meanwhile.
#[tokio::test]
async fn a_connection_that_never_finishes_its_request_is_cut_off() {
    use packet_capture_agent::api::HEADER_READ_TIMEOUT;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    if !privileged("a_connection_that_never_finishes_its_request_is_cut_off") {
        return;
    }
    let node = Node::new();
    let agent = node.agent(&["--insecure-no-auth"], &[]);
    let rest = Rest::new(&agent);
    rest.json("/health").await;
    let mut slow = Vec::new();
    for (what, sent) in [
        ("silent", &b""[..]),
        ("half an HTTP/2 preface", b"PRI * HTTP/2.0\r\n"),
        (
            "part of a request head",
            b"GET /health HTTP/1.1\r\nHost: agent\r\n",
        ),
    ] {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", agent.port()))
            .await
            .unwrap();
        stream.write_all(sent).await.unwrap();
        slow.push((what, stream));
    }
    let opened = Instant::now();
    assert_eq!(rest.get("/health").await.status(), 200);
    for (what, mut stream) in slow {
        let mut answer = Vec::new();
        let closed = tokio::time::timeout(
            HEADER_READ_TIMEOUT + Duration::from_secs(5),
            stream.read_to_end(&mut answer),
        )
        .await;
        assert!(
            closed.is_ok(),
            "{what}: still open after {:?}",
            opened.elapsed()
        );
        assert!(
            opened.elapsed() >= HEADER_READ_TIMEOUT - Duration::from_secs(1),
            "{what}: closed after {:?}, before the timeout",
            opened.elapsed()
        );
    }
}

/// One address holds at most its share of the connections, and all
/// addresses but the node's own at most `MAX_CONNECTIONS`: the next one is
/// closed at once. The node's own address (the kubelet's probes) has slots
/// of its own, so clients elsewhere cannot get the agent restarted.
#[tokio::test]
async fn connections_are_bounded_per_address_and_in_all_but_the_nodes_own_have_slots() {
    use packet_capture_agent::api::{MAX_CONNECTIONS, MAX_CONNECTIONS_PER_ADDRESS};
    use std::net::Ipv4Addr;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    if !privileged("connections_are_bounded_per_address_and_in_all_but_the_nodes_own_have_slots") {
        return;
    }
    let node = Node::new();
    // Listening on 127.0.0.1, the node's own address here; clients from
    // other loopback addresses come from elsewhere.
    let agent = node.agent(&["--insecure-no-auth"], &[]);
    let port = agent.port();
    let connect_from = |last: u8| async move {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket
            .bind((Ipv4Addr::new(127, 0, 0, last), 0).into())
            .unwrap();
        socket.connect(([127, 0, 0, 1], port).into()).await.unwrap()
    };
    // What the probe does: /health from the node's own address.
    let health = || async {
        let mut tcp = connect_from(1).await;
        tcp.write_all(b"GET /health HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer)).await;
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200")
    };
    let refused = |mut tcp: tokio::net::TcpStream| async move {
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(3), tcp.read_to_end(&mut answer))
            .await
            .is_ok()
    };
    assert!(health().await, "the agent answers");

    // One address holds its share, and no more.
    let addresses = MAX_CONNECTIONS / MAX_CONNECTIONS_PER_ADDRESS;
    let mut held = Vec::new();
    for _ in 0..MAX_CONNECTIONS_PER_ADDRESS {
        held.push(connect_from(2).await);
    }
    assert!(
        refused(connect_from(2).await).await,
        "connection {} of one address was served",
        MAX_CONNECTIONS_PER_ADDRESS + 1
    );
    // Every slot for elsewhere taken: one more address is refused, and the
    // probe still gets its answer.
    for last in 3..2 + addresses as u8 {
        for _ in 0..MAX_CONNECTIONS_PER_ADDRESS {
            held.push(connect_from(last).await);
        }
    }
    assert_eq!(held.len(), MAX_CONNECTIONS);
    assert!(
        refused(connect_from(2 + addresses as u8).await).await,
        "connection {} from elsewhere was served",
        MAX_CONNECTIONS + 1
    );
    assert!(health().await, "the probe found no slot");
    drop(held);
    let rest = Rest::new(&agent);
    assert_eq!(rest.get("/health").await.status(), 200);
}

/// An HTTP/2 connection with no request in flight is closed after the idle
/// timeout, though its client answers every keep-alive ping; and so is one
/// whose client never reads an open route's answer (a window of zero),
/// which only an authorized caller's answer would keep open.
#[tokio::test]
async fn an_idle_connection_is_closed() {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use packet_capture_agent::api::{CLOSE_GRACE, IDLE_TIMEOUT};

    if !privileged("an_idle_connection_is_closed") {
        return;
    }
    let node = Node::new();
    let agent = node.agent(&["--insecure-no-auth"], &[]);
    // An HTTP/2 connection whose client offers `window` bytes of each
    // answer at first: its sender, its task, and the head of the answer
    // to GET `path`.
    let get = |path: &str, window: u32| {
        let (port, uri) = (agent.port(), format!("http://agent{path}"));
        async move {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap();
            let (mut send, connection) =
                hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                    .initial_stream_window_size(window)
                    .handshake::<_, String>(TokioIo::new(tcp))
                    .await
                    .unwrap();
            let connection = tokio::spawn(connection);
            let request = http::Request::get(uri).body(String::new()).unwrap();
            let answer = send.send_request(request).await.unwrap();
            assert_eq!(answer.status(), 200);
            (send, connection, answer)
        }
    };
    let (_send, connection, answer) = get("/health", 65_535).await;
    drop(answer);
    let answered = Instant::now();
    // A client that takes /health's head and never opens its window.
    let (_stuck_send, stuck, unread) = get("/health", 0).await;

    let closed = tokio::time::timeout(IDLE_TIMEOUT + Duration::from_secs(15), connection).await;
    // Closed as HTTP/2 closes in good order (GOAWAY), not cut.
    assert!(
        matches!(closed, Ok(Ok(Ok(())))),
        "{closed:?} after {:?}",
        answered.elapsed()
    );
    assert!(
        answered.elapsed() >= IDLE_TIMEOUT - Duration::from_secs(1),
        "closed after {:?}, before the idle timeout",
        answered.elapsed()
    );
    let cut = tokio::time::timeout(CLOSE_GRACE + Duration::from_secs(15), stuck).await;
    assert!(
        cut.is_ok(),
        "a connection whose answer is never read is open {:?} after it",
        answered.elapsed()
    );
    drop(unread);
}

/// A standard output nobody reads stalls no capture: the `stdout`
/// capture's lines wait up to a bound and the packets of the lines past it
/// are dropped and counted; the node's other capture keeps every packet it
/// gets, both stop when asked, and what was counted as logged is logged
/// once the output is read.
#[tokio::test]
async fn a_standard_output_nobody_reads_stalls_no_capture() {
    if !privileged("a_standard_output_nobody_reads_stalls_no_capture") {
        return;
    }
    let node = Node::new();
    let (unread, stdout) = std::io::pipe().unwrap();
    let mut agent = node.agent_with_stdout(&["--insecure-no-auth"], &[], stdout.into());
    let c = Rest::new(&agent);
    for (id, format) in [("lines", "stdout"), ("file", "pcap")] {
        let body = json!({"id": id, "duration": 600, "maxPackets": 10_000_000,
                          "outputFormat": format, "filter": "udp"});
        assert_eq!(c.post("/api/v1/captures", &body).await.status(), 201);
    }

    // Datagrams until the agent says its output is not being read (its
    // pipe's 64 KiB and the agent's queue are full), then some more.
    let jammed = std::sync::atomic::AtomicBool::new(false);
    let sent = std::thread::scope(|s| {
        let flood = s.spawn(|| {
            node.right.enter();
            let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            let mut sent = 0u64;
            let mut after = 0;
            while after < 1000 {
                if socket.send_to(b"not read", (LEFT_IP, 9)).is_ok() {
                    sent += 1;
                    after += u32::from(jammed.load(std::sync::atomic::Ordering::Relaxed));
                }
            }
            sent
        });
        let said = agent.wait_for_log(
            "the standard output is not being read",
            Duration::from_secs(60),
        );
        jammed.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(said.is_some(), "never full: {}", agent.log());
        flood.join().unwrap()
    });

    let file = stop_accounting_for(&c, "file", sent).await;
    let lines = stop_accounting_for(&c, "lines", sent).await;
    assert!(
        lines["dropped"].as_u64().unwrap() > file["dropped"].as_u64().unwrap(),
        "{lines} {file}"
    );

    // Read now, the output holds one line per packet counted as logged.
    let logged = lines["packets"].as_u64().unwrap();
    let (line, lines_read) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead as _;
        for l in std::io::BufReader::new(unread).lines() {
            if l.unwrap().contains("PACKET: ") {
                let _ = line.send(());
            }
        }
    });
    for n in 0..logged {
        lines_read
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("{n} of {logged} lines came out"));
    }
    assert_eq!(agent.signal_and_wait(libc::SIGTERM).code(), Some(0));
    reader.join().unwrap();
    assert_eq!(lines_read.try_iter().count(), 0, "more lines than packets");
}

/// Stops capture `id` and returns its last status, in which every one of
/// the `sent` datagrams is kept or counted lost.
async fn stop_accounting_for(c: &Rest, id: &str, sent: u64) -> serde_json::Value {
    let r = c.delete(&format!("/api/v1/captures/{id}")).await;
    assert!(r.status().is_success(), "{}", r.status());
    let done = c.ended(id).await;
    let (packets, dropped) = (
        done["packets"].as_u64().unwrap(),
        done["dropped"].as_u64().unwrap(),
    );
    assert_eq!(
        packets + dropped,
        sent,
        "every datagram is kept or counted lost: {done}"
    );
    done
}

/// A runtime that stops reading the agent's standard error (its log)
/// stalls none of the agent's threads: at DEBUG, where every gRPC call logs
/// its HTTP/2 frames, calls are still answered, a capture still counts
/// every packet and stops when asked, and SIGTERM still ends the agent.
/// The lines past what may wait are dropped, and once the log is read it
/// says how many.
#[tokio::test]
async fn a_log_nobody_reads_stalls_no_capture() {
    if !privileged("a_log_nobody_reads_stalls_no_capture") {
        return;
    }
    let node = Node::new();
    let mut agent = node.agent(&["--insecure-no-auth"], &[("LOG_LEVEL", "DEBUG")]);
    let c = Rest::new(&agent);
    let mut g = grpc(&agent).await;
    let held = agent.hold_log();
    let body = json!({"id": "held", "duration": 600, "maxPackets": 10_000_000,
                      "outputFormat": "pcap", "filter": "udp"});
    assert_eq!(c.post("/api/v1/captures", &body).await.status(), 201);

    // About 900 bytes of log each: several times what the pipe and the
    // agent's queue hold together.
    const CALLS: usize = 4000;
    for n in 0..CALLS {
        let call = g.list_captures(pb::ListCapturesRequest::default());
        tokio::time::timeout(Duration::from_secs(30), call)
            .await
            .unwrap_or_else(|_| panic!("call {n} of {CALLS} was not answered"))
            .unwrap();
    }
    // Then traffic, with the log full.
    let sent = std::thread::scope(|s| {
        s.spawn(|| {
            node.right.enter();
            let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            (0..2000)
                .filter(|_| socket.send_to(b"log held", (LEFT_IP, 9)).is_ok())
                .count() as u64
        })
        .join()
        .unwrap()
    });
    let done = stop_accounting_for(&c, "held", sent).await;
    assert!(done["packets"].as_u64().unwrap() > 0, "{done}");

    drop(held);
    let said = agent.wait_for_log("log lines were dropped here", Duration::from_secs(60));
    assert!(said.is_some(), "the log was never full: {}", agent.log());
    assert_eq!(agent.signal_and_wait(libc::SIGTERM).code(), Some(0));
}
