//! Live packets of a running capture: the REST pcapng stream that tshark
//! reads as it comes, gRPC `StreamPackets`, and a reader too slow for the
//! traffic, which loses packets from its stream (counted) while the file
//! gets every one.

use packet_capture_common::crd::STREAM_OUTPUT_FILE;
use packet_capture_proto::v1 as pb;
use packet_capture_test_support::netns::run;
use packet_capture_test_support::{AgentProcess, privileged};
use serde_json::json;

use crate::common::{Node, RIGHT_IP, Rest, eventually, grpc, json_of, tshark};

/// The packet blocks in a pcapng stream so far.
fn packets_in(stream: &[u8]) -> usize {
    numbers_in(stream).len()
}

/// The number (`epb_packetid`) of each packet block in a pcapng stream so
/// far.
fn numbers_in(stream: &[u8]) -> Vec<Option<u64>> {
    use pcap_file::pcapng::blocks::enhanced_packet::EnhancedPacketOption;
    use pcap_file::pcapng::blocks::opt_common::CommonOption;
    use pcap_file::pcapng::{Block, PcapNgParser};
    let Ok((mut rest, mut parser)) = PcapNgParser::new(stream) else {
        return Vec::new();
    };
    let mut numbers = Vec::new();
    while let Ok((after, block)) = parser.next_block(rest) {
        if let Block::EnhancedPacket(p) = block {
            numbers.push(p.options.iter().find_map(|o| match o {
                EnhancedPacketOption::Common(CommonOption::Unknown(u)) if u.code == 5 => {
                    u.value.as_ref().try_into().ok().map(u64::from_le_bytes)
                }
                _ => None,
            }));
        }
        rest = after;
    }
    numbers
}

/// An agent without authentication on a new node, running an ICMP capture
/// of the right side for a minute: `id` with `spec`'s fields besides.
async fn icmp_capture(id: &str, spec: serde_json::Value) -> (Node, AgentProcess, Rest) {
    icmp_capture_by(&["--insecure-no-auth"], id, spec).await
}

/// [`icmp_capture`] by an agent started with `args`.
async fn icmp_capture_by(
    args: &[&str],
    id: &str,
    spec: serde_json::Value,
) -> (Node, AgentProcess, Rest) {
    let node = Node::new();
    let agent = node.agent(args, &[]);
    let rest = Rest::new(&agent);
    let mut body = json!({"id": id, "targetIPs": [RIGHT_IP], "duration": 60, "filter": "icmp"});
    body.as_object_mut()
        .unwrap()
        .extend(spec.as_object().unwrap().clone());
    let started = rest.post("/api/v1/captures", &body).await;
    assert_eq!(started.status(), 201);
    (node, agent, rest)
}

#[tokio::test]
async fn running_captures_stream_their_packets_live() {
    if !privileged("running_captures_stream_their_packets_live") {
        return;
    }
    let (node, agent, rest) = icmp_capture("live-1", json!({"outputFormat": "pcap"})).await;

    // REST: pcapng as packets come, whatever format the file has.
    let response = rest.get("/api/v1/captures/live-1/packets").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/x-pcapng");
    let mut body = response;
    // gRPC: the same packets, as messages.
    let mut c = grpc(&agent).await;
    let mut batches = c
        .stream_packets(pb::StreamPacketsRequest {
            id: "live-1".into(),
            after: None,
        })
        .await
        .unwrap()
        .into_inner();
    node.ping(3);
    let mut bytes = Vec::new();
    while packets_in(&bytes) < 6 {
        bytes.extend(body.chunk().await.unwrap().expect("more of the stream"));
    }
    let mut streamed = Vec::new();
    while streamed.len() < 6 {
        let batch = batches.message().await.unwrap().expect("a batch");
        assert_eq!(batch.lost, 0);
        streamed.extend(batch.packets);
    }
    assert!(
        streamed
            .iter()
            .all(|p| p.interface == node.veth.a && !p.data.is_empty())
    );
    assert_eq!(
        streamed
            .iter()
            .filter(|p| p.direction() == pb::PacketDirection::Out)
            .count(),
        3
    );
    // Numbered from the capture's first packet, in both.
    let numbered: Vec<u64> = streamed.iter().map(|p| p.number).collect();
    assert_eq!(numbered, [1, 2, 3, 4, 5, 6]);
    assert_eq!(numbers_in(&bytes), [1, 2, 3, 4, 5, 6].map(Some));
    // A reader whose stream broke off comes back after the last packet it
    // got: the packets after it first, kept for it, then on live.
    let mut again = c
        .stream_packets(pb::StreamPacketsRequest {
            id: "live-1".into(),
            after: Some(2),
        })
        .await
        .unwrap()
        .into_inner();
    let batch = again.message().await.unwrap().expect("the kept packets");
    assert_eq!(batch.lost, 0);
    let kept: Vec<u64> = batch.packets.iter().map(|p| p.number).collect();
    assert_eq!(kept, [3, 4, 5, 6]);
    let mut back = rest.get("/api/v1/captures/live-1/packets?after=4").await;
    assert_eq!(back.status(), 200);
    let mut resumed = Vec::new();
    while packets_in(&resumed) < 2 {
        resumed.extend(back.chunk().await.unwrap().expect("more of the stream"));
    }
    assert_eq!(numbers_in(&resumed), [Some(5), Some(6)]);
    let refused = rest.get("/api/v1/captures/live-1/packets?after=x").await;
    assert_eq!(refused.status(), 400);
    drop((again, back));
    // What was streamed so far is a pcapng file tshark reads.
    let file = node.dir.path().join("streamed.pcapng");
    std::fs::write(&file, &bytes).unwrap();
    let read = tshark(&file, &["frame.interface_name", "icmp.type"]);
    assert_eq!(read.len(), 6, "{read:?}");
    assert!(read[0].starts_with(&node.veth.a), "{read:?}");

    // Stopping the capture ends both streams.
    rest.delete("/api/v1/captures/live-1").await;
    while body.chunk().await.unwrap().is_some() {}
    while batches.message().await.unwrap().is_some() {}
    // An ended capture has no live packets: its file has them.
    let ended = rest.get("/api/v1/captures/live-1/packets").await;
    assert_eq!(ended.status(), 409);
    let err = json_of(ended).await;
    assert!(
        err["error"].as_str().unwrap().contains("has ended"),
        "{err}"
    );
    assert_eq!(
        rest.get("/api/v1/captures/nope/packets").await.status(),
        404
    );
}

/// `outputFormat: stream`: the packets go to the live readers and nowhere
/// else. Nothing is in the capture directory or its listing once the
/// capture has ended, its status says there is no file, and `packets`
/// counts what it kept.
#[tokio::test]
async fn a_stream_capture_writes_nothing_on_the_node() {
    if !privileged("a_stream_capture_writes_nothing_on_the_node") {
        return;
    }
    let (node, _agent, rest) = icmp_capture("live-only", json!({"outputFormat": "stream"})).await;
    let mut body = rest.get("/api/v1/captures/live-only/packets").await;
    assert_eq!(body.status(), 200);
    node.ping(3);
    let mut bytes = Vec::new();
    while packets_in(&bytes) < 6 {
        bytes.extend(body.chunk().await.unwrap().expect("more of the stream"));
    }
    rest.delete("/api/v1/captures/live-only").await;
    while let Some(more) = body.chunk().await.unwrap() {
        bytes.extend(more);
    }
    assert_eq!(packets_in(&bytes), 6);
    let done = rest.ended("live-only").await;
    assert_eq!(done["packets"], 6, "{done}");
    assert_eq!(done["output_file"], STREAM_OUTPUT_FILE, "{done}");
    assert_eq!(done["file_size"], 0, "{done}");
    assert_eq!(rest.json("/api/v1/files").await["files"], json!([]));
    let left: Vec<_> = std::fs::read_dir(node.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// Each live reader may hold a batch of its own in its connection: a
/// capture takes a bounded number of them, over REST and gRPC together,
/// and the one refused is told when to come back.
#[tokio::test]
async fn a_capture_takes_a_bounded_number_of_live_readers() {
    if !privileged("a_capture_takes_a_bounded_number_of_live_readers") {
        return;
    }
    const READERS: usize = 8;
    let (_node, agent, rest) = icmp_capture("readers-1", json!({})).await;
    let path = "/api/v1/captures/readers-1/packets";
    let mut readers = Vec::new();
    for _ in 0..READERS {
        let reader = rest.get(path).await;
        assert_eq!(reader.status(), 200);
        readers.push(reader);
    }
    let refused = rest.get(path).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "5");
    let err = json_of(refused).await;
    assert!(
        err["error"]
            .as_str()
            .unwrap()
            .contains("has 8 live readers already"),
        "{err}"
    );
    let mut c = grpc(&agent).await;
    let status = c
        .stream_packets(pb::StreamPacketsRequest {
            id: "readers-1".into(),
            after: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status}");

    // A reader that goes makes room for another.
    drop(readers.pop());
    eventually(
        "room for a reader",
        std::time::Duration::from_secs(10),
        async || {
            let again = rest.get(path).await;
            (again.status() == 200).then_some(again)
        },
    )
    .await;
}

#[tokio::test]
async fn a_slow_reader_loses_packets_from_its_stream_not_from_the_file() {
    if !privileged("a_slow_reader_loses_packets_from_its_stream_not_from_the_file") {
        return;
    }
    const FRAMES: u64 = 24_000;
    // A file that holds the whole flood (36 MB) besides.
    let (node, agent, rest) = icmp_capture_by(
        &["--insecure-no-auth", "--max-capture-file-size-mb", "64"],
        "slow-1",
        json!({"maxPackets": 100000}),
    )
    .await;
    let mut c = grpc(&agent).await;
    let mut batches = c
        .stream_packets(pb::StreamPacketsRequest {
            id: "slow-1".into(),
            after: None,
        })
        .await
        .unwrap()
        .into_inner();
    // A reader that reads nothing while 24,000 full-size frames (36 MB,
    // past the tap's 16 MiB and what the connection buffers) pass, at a
    // pace the test agent's 1 MiB ring keeps up with: 2000 pings of 8000
    // bytes, each way in 6 fragments.
    run(node
        .left
        .command("ping")
        .args(["-q", "-i", "0.004", "-s", "8000", "-c", "2000", RIGHT_IP]));
    let status = eventually(
        "the flood in the file",
        std::time::Duration::from_secs(30),
        async || {
            let status = json_of(rest.get("/api/v1/captures/slow-1").await).await;
            (status["packets"].as_u64() == Some(FRAMES)).then_some(status)
        },
    )
    .await;
    assert_eq!(status["dropped"], 0, "{status}");
    rest.delete("/api/v1/captures/slow-1").await;
    // Now read: fewer packets than were captured, and the rest counted,
    // each loss just before the packet it preceded (or at the end).
    let (mut received, mut lost, mut last) = (0u64, 0u64, 0u64);
    while let Some(batch) = batches.message().await.unwrap() {
        let numbers: Vec<u64> = batch.packets.iter().map(|p| p.number).collect();
        let next = numbers.first().copied().unwrap_or(FRAMES + 1);
        assert_eq!(
            batch.lost,
            next - last - 1,
            "after packet {last}: {numbers:?}"
        );
        assert!(
            numbers.windows(2).all(|w| w[1] == w[0] + 1),
            "a gap inside a batch: {numbers:?}"
        );
        last = numbers.last().copied().unwrap_or(last);
        received += numbers.len() as u64;
        lost += batch.lost;
    }
    assert!(lost > 0, "the reader lost nothing: {received} received");
    assert_eq!(received + lost, FRAMES, "received {received}, lost {lost}");
    let metrics = rest.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains(&format!(
            "packet_capture_agent_stream_lost_packets_total {lost}"
        )),
        "{metrics}"
    );
}
