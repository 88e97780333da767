//! `stream`: the live pcapng of a capture on stdout, each chunk flushed as
//! it arrives, so `kubectl pcap stream web | tshark -r -` shows packets as
//! they are captured.
//!
//! With target flags instead of a name, it creates a capture for the
//! stream and deletes it when the stream ends, on Ctrl-C, SIGTERM or SIGHUP,
//! and when stdout is closed (the reader downstream quit); a capture it did
//! not create is never deleted. The capture it makes writes no files
//! (`outputFormat: stream`): deleted with the stream, they could not be
//! fetched. When the capture's end ends the stream, its phase and message
//! go to stderr; one that failed, or whose end the status does not tell,
//! exits 1. A stream that breaks off is opened again and goes on in a new
//! pcapng section after the last whole block (see [`follow`]).

use std::io;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use clap::Args;
use kube::api::{DeleteParams, PostParams};
use kubectl_pcap::api::{self, CopyError, explain_access, explain_crd};
use kubectl_pcap::spec::TargetArgs;
use packet_capture_common::crd::{OutputFormat, PacketCaptureConfig, Phase};
use tokio::io::AsyncWrite;

use crate::capture::wait_for;
use crate::cluster::{Cluster, Signals, Stop, persisting};

/// How long a capture made for a stream runs unless `--duration` says.
const DEFAULT_DURATION: u32 = 300;

/// How long the command waits on the API server once the stream has
/// ended: for the capture's final phase, and to delete one it made (then
/// it gives up and says how to delete it).
const SETTLE_WITHIN: Duration = Duration::from_secs(15);

#[derive(Args, Debug)]
pub struct StreamArgs {
    /// An existing capture to stream; without it, the target flags create
    /// one (pcap-stream-<random>, 5m unless --duration) for the stream
    #[arg(conflicts_with_all = [
        "pods", "selector", "all_namespaces", "namespace_selector", "ips", "ports",
        "filter", "duration", "max_packets", "format", "snaplen", "direction", "keep_copies",
        "labels",
    ])]
    pub name: Option<String>,

    #[command(flatten)]
    pub target: TargetArgs,

    /// Labels of the capture it creates, key=value[,key=value...] (a
    /// controller started with --capture-selector runs only those its
    /// selector matches)
    #[arg(long, value_name = "LABELS", value_parser = kubectl_pcap::spec::parse_pairs)]
    pub labels: Option<std::collections::BTreeMap<String, String>>,
}

pub async fn stream(cluster: &Cluster, args: StreamArgs) -> Result<ExitCode> {
    let mut signals = Signals::new()?;
    let api = cluster.captures();
    let (name, created) = match args.name {
        Some(name) => (name, false),
        None => {
            // Nothing to write on the nodes: the capture is deleted with
            // the stream, and its files with it could not be fetched.
            if let Some(format) = args.target.format.filter(|f| *f != OutputFormat::Stream) {
                bail!(
                    "--format {format}: the capture a stream makes writes no files \
                     (outputFormat: stream); to keep files, `kubectl pcap create` the capture \
                     and stream it by name"
                );
            }
            let mut spec = args
                .target
                .to_spec(&cluster.namespace, Some(DEFAULT_DURATION))?;
            spec.output_format = OutputFormat::Stream;
            let name = format!("pcap-stream-{}", suffix());
            let mut pcc = PacketCaptureConfig::new(&name, spec);
            pcc.metadata.labels = args.labels;
            api.create(&PostParams::default(), &pcc)
                .await
                .map_err(|e| anyhow!(explain_crd(&e, &["create"])))?;
            eprintln!("created capture {name}; it is deleted when the stream ends");
            (name, true)
        }
    };

    let mut stdout = tokio::io::stdout();
    let outcome = tokio::select! {
        r = follow(cluster, &name, created, &mut stdout) => Ok(r),
        stop = signals.recv() => Err(stop),
    };
    // How the capture ended, when that ended the stream (the wait tells
    // its phase; the status may trail the stream's end a moment).
    let ended = match &outcome {
        Ok(Ok(Followed::Ended)) => {
            let wait = wait_for(&api, &name, Phase::is_final, false);
            tokio::select! {
                pcc = tokio::time::timeout(SETTLE_WITHIN, wait) => match pcc {
                    Ok(pcc) => pcc.map_err(|e| eprintln!("{name}: {e:#}")).ok(),
                    Err(_) => {
                        eprintln!(
                            "{name}: its status did not say how it ended within {}s",
                            SETTLE_WITHIN.as_secs()
                        );
                        None
                    }
                },
                _ = signals.recv() => None,
            }
        }
        _ => None,
    };

    if created {
        let not_deleted = |why: String| {
            format!(
                "{why}\ncapture {name} was not deleted: delete it with `kubectl delete pcc {name}`"
            )
        };
        let params = DeleteParams::default();
        let deleting = tokio::time::timeout(SETTLE_WITHIN, api.delete(&name, &params));
        tokio::select! {
            deleted = deleting => match deleted {
                Ok(Ok(_)) => eprintln!("deleted capture {name}"),
                // Someone else deleted it already.
                Ok(Err(kube::Error::Api(s))) if s.code == 404 => {}
                Ok(Err(e)) => bail!(not_deleted(explain_crd(&e, &["delete"]))),
                Err(_) => bail!(not_deleted(format!(
                    "the API server did not answer the delete within {}s",
                    SETTLE_WITHIN.as_secs()
                ))),
            },
            // Ctrl-C again: the user would rather go now. (Not a repeated
            // SIGHUP or SIGTERM: a session that closes sends more than one.)
            () = signals.interrupted() => {
                eprintln!("{}", not_deleted("interrupted".into()));
                exit_now(Stop::Interrupt.status());
            }
        }
    }
    match outcome {
        Ok(Ok(Followed::Ended)) => {
            Ok(match ended.as_ref().and_then(|p| p.current_phase()) {
                Some(Phase::Completed) => ExitCode::SUCCESS,
                // Failed, or not known to have ended: the stream may lack
                // packets the capture meant to give.
                _ => ExitCode::FAILURE,
            })
        }
        Ok(Ok(Followed::ReaderQuit)) => Ok(ExitCode::SUCCESS),
        Ok(Err(e)) => Err(e),
        Err(Stop::Interrupt) => exit_now(0),
        Err(stop) => exit_now(stop.status()),
    }
}

/// Exits at once. A write to stdout may still wait, on the runtime's
/// blocking pool, for a reader that stopped reading, and the runtime would
/// wait for it at the end of `main`.
fn exit_now(status: u8) -> ! {
    std::process::exit(status.into())
}

/// Why a stream stopped without an error.
enum Followed {
    /// The capture ended on every node.
    Ended,
    /// Stdout was closed: the reader downstream quit.
    ReaderQuit,
}

/// Waits until the capture has started (one just created, by this command
/// or right before it, is still starting), then copies its stream to
/// `out` until the capture has ended on every node or `out` is closed
/// (the reader downstream quit, which ends the stream as Ctrl-C does).
///
/// A stream that ends is opened again, after a pause that doubles each
/// time ([`api::Backoff`]): the end was the capture's when the API server
/// then says it runs nowhere (409); else it was the connection's (an API
/// server or controller that restarts), and the new stream's section goes
/// on from the last whole block. It asks for the packets after the last
/// one each node's blocks brought, of the capture (generation) the stream
/// named: the nodes keep the latest for a while, and count in the next
/// packet's drop count what they no longer kept. A stream of another
/// generation starts from then on, as stderr says.
async fn follow<W: AsyncWrite + Unpin>(
    cluster: &Cluster,
    name: &str,
    created: bool,
    out: &mut W,
) -> Result<Followed> {
    match wait_for(&cluster.captures(), name, |p| p != Phase::Starting, true).await {
        Ok(pcc) => {
            if pcc.current_phase() == Some(Phase::Failed) {
                let message = pcc.status.and_then(|s| s.message).unwrap_or_default();
                return Err(anyhow!("capture {name} failed: {message}"));
            }
        }
        Err(e) if created => return Err(e),
        // A reader who may not watch the capture: the stream itself says
        // whether it runs.
        Err(_) => {}
    }
    let mut backoff = api::Backoff::default();
    let mut live = persisting(name, &mut backoff, || {
        api::open_packets(&cluster.client, name, None)
    })
    .await
    .map_err(|e| anyhow!(explain_access(&e, name)))?;
    let mut blocks = api::WholeBlocks::default();
    // Gone while no packet came to write: a write would say so only with
    // the next packet, which a quiet capture may never have.
    let mut reader_gone = std::pin::pin!(reader_gone());
    let followed = loop {
        let opened = Instant::now();
        let copied = tokio::select! {
            copied = api::copy_chunks(live.body, out, Some(&mut blocks)) => copied,
            () = &mut reader_gone => break Followed::ReaderQuit,
        };
        let broke = match copied {
            Ok(_) => None,
            Err(CopyError::Write(e)) if e.kind() == io::ErrorKind::BrokenPipe => {
                break Followed::ReaderQuit;
            }
            Err(CopyError::Read(e)) if e.kind() != io::ErrorKind::InvalidData => {
                Some(e.to_string())
            }
            Err(e) => bail!("streaming capture {name}: {e}"),
        };
        blocks.break_off();
        if opened.elapsed() >= STEADY {
            backoff = api::Backoff::default();
        }
        let resume = live.capture_id.as_deref().map(|id| (id, &blocks));
        let again = match reopen(cluster, name, broke, resume, &mut backoff).await? {
            Some(again) => again,
            None => break Followed::Ended,
        };
        match (&live.capture_id, &again.capture_id) {
            (Some(before), Some(now)) if before == now => eprintln!(
                "{name}: the stream goes on after the last packet it brought from each node; \
                 what a node no longer kept is counted in its next packet's drop count \
                 (frame.drop_count)"
            ),
            _ => {
                blocks.forget_numbers();
                eprintln!(
                    "{name}: the stream goes on; packets captured while it was closed are not in it"
                );
            }
        }
        live = again;
    };
    // Said per packet in the stream, where a reader downstream may not
    // look: the total, once.
    if blocks.lost() > 0 {
        eprintln!(
            "{name}: {} packets the nodes captured are not in the stream: it fell behind \
             them, or they were no longer kept when it came back (each packet after a gap \
             counts it in frame.drop_count)",
            blocks.lost()
        );
    }
    Ok(followed)
}

/// A stream that lasted this long broke off on its own: the next one gets
/// every try again.
const STEADY: Duration = Duration::from_secs(60);

/// Opens the stream of `name` again after it ended, or broke off (`broke`
/// says why), after the next pause of `backoff` ([`persisting`] then
/// rides out an API server that is unavailable); `None` once the capture
/// runs on no node (409), or is gone (404): the stream's end was the
/// capture's.
async fn reopen(
    cluster: &Cluster,
    name: &str,
    broke: Option<String>,
    resume: Option<(&str, &api::WholeBlocks)>,
    backoff: &mut api::Backoff,
) -> Result<Option<api::LiveStream>> {
    let Some(pause) = backoff.next_pause() else {
        bail!(
            "streaming capture {name}: {}; it could not be opened again in {} tries",
            broke.unwrap_or_else(|| "it ended".into()),
            api::Backoff::TRIES
        );
    };
    if let Some(why) = &broke {
        eprintln!("{name}: the stream broke off ({why}): opening it again in {pause:?}");
    }
    tokio::time::sleep(pause).await;
    match persisting(name, backoff, || {
        api::open_packets(&cluster.client, name, resume)
    })
    .await
    {
        Ok(live) => Ok(Some(live)),
        // It runs nowhere, or is gone.
        Err(kube::Error::Api(s)) if matches!(s.code, 404 | 409) => Ok(None),
        Err(e) => bail!(explain_access(&e, name)),
    }
}

/// Resolves once stdout is a pipe or socket whose reader has gone (poll
/// reports an error or hang-up on it); never for a file or a terminal,
/// which poll reports neither of.
async fn reader_gone() {
    let (gone, seen) = tokio::sync::oneshot::channel();
    // A thread of its own, not the runtime's blocking pool: it may wait as
    // long as the process lives, and the runtime waits for its pool's
    // threads at exit.
    std::thread::spawn(move || {
        let mut stdout = libc::pollfd {
            fd: libc::STDOUT_FILENO,
            events: 0,
            revents: 0,
        };
        loop {
            // SAFETY: one pollfd, valid for the call.
            if unsafe { libc::poll(&mut stdout, 1, -1) } < 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // The writes tell instead.
                return;
            }
            if stdout.revents & (libc::POLLERR | libc::POLLHUP) != 0 {
                let _ = gone.send(());
            }
            // Else POLLNVAL: not a descriptor poll can watch.
            return;
        }
    });
    if seen.await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Five random lowercase letters and digits: a name that does not clash
/// with another stream's.
fn suffix() -> String {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    (0..5)
        .map(|_| CHARS[fastrand::usize(..CHARS.len())] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stand_in::{Answer, Recorder, answering, chunks, section};
    use futures::TryStreamExt as _;
    use http::StatusCode;
    use kubectl_pcap::api::{WholeBlocks, copy_chunks};

    #[tokio::test]
    async fn a_live_stream_is_written_in_whole_blocks_flushed_at_every_chunk() {
        let (section, ends) = section(3);
        // Cut inside the header, inside the interface, at the end of the
        // first packet, and inside the third.
        let cuts = [5, ends[1] - 4, ends[2], ends[3] + 9, section.len()];
        let parts: Vec<&'static [u8]> = cuts
            .iter()
            .scan(0, |from, &to| {
                let part = section[*from..to].to_vec().leak() as &'static [u8];
                *from = to;
                Some(part)
            })
            .collect();
        let mut out = Recorder::default();
        let mut blocks = WholeBlocks::default();
        let n = copy_chunks(chunks(&parts), &mut out, Some(&mut blocks))
            .await
            .unwrap();
        assert_eq!(n, section.len() as u64);
        assert_eq!(out.data, section);
        // Each flush falls where a block ends: none in the header, the
        // header alone, the interface and a packet, the second packet, and
        // the rest.
        assert_eq!(
            out.flushed_at,
            [0, ends[0], ends[2], ends[3], section.len(), section.len()]
        );

        let mut out = Recorder::default();
        copy_chunks(chunks(&[b"abc", b"de"]), &mut out, None)
            .await
            .unwrap();
        assert_eq!(out.data, b"abcde");
        assert_eq!(out.flushed_at, [5]);
    }

    /// A live stream that breaks off, or ends, inside a block leaves that
    /// block out, and another section can follow what was written; bytes
    /// that are not pcapng are refused as such.
    #[tokio::test]
    async fn a_live_stream_that_breaks_off_leaves_no_part_of_a_block() {
        let (section, ends) = section(2);
        let cut: &'static [u8] = section[..ends[2] + 7].to_vec().leak();
        let broken =
            futures::stream::iter([Ok(cut.to_vec()), Err(io::Error::other("connection reset"))])
                .into_async_read();
        let mut out = Recorder::default();
        let mut blocks = WholeBlocks::default();
        assert!(matches!(
            copy_chunks(broken, &mut out, Some(&mut blocks)).await,
            Err(CopyError::Read(e)) if e.kind() == io::ErrorKind::Other
        ));
        assert_eq!(out.data, section[..ends[2]]);
        assert_eq!(blocks.break_off(), 7);
        // The next stream's section follows.
        copy_chunks(
            chunks(&[section.clone().leak()]),
            &mut out,
            Some(&mut blocks),
        )
        .await
        .unwrap();
        let mut reader = pcap_file::pcapng::PcapNgReader::new(&out.data[..]).unwrap();
        let mut packets = 0;
        while let Some(block) = reader.next_block() {
            if matches!(
                block.unwrap().0,
                pcap_file::pcapng::Block::EnhancedPacket(_)
            ) {
                packets += 1;
            }
        }
        assert_eq!(packets, 1 + 2);

        // Ended inside a block: broken off too.
        let mut out = Recorder::default();
        let mut blocks = WholeBlocks::default();
        match copy_chunks(chunks(&[cut]), &mut out, Some(&mut blocks)).await {
            Err(CopyError::Read(e)) => assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof),
            other => panic!("{other:?}"),
        }
        assert_eq!(out.data, section[..ends[2]]);

        let mut blocks = WholeBlocks::default();
        let html = chunks(&[b"<html><body>502 Bad Gateway</body></html>"]);
        match copy_chunks(html, &mut Recorder::default(), Some(&mut blocks)).await {
            Err(CopyError::Read(e)) => {
                assert_eq!(e.kind(), io::ErrorKind::InvalidData);
                assert!(e.to_string().starts_with("not a pcapng stream"), "{e}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_closed_output_is_a_write_error_and_a_broken_body_a_read_error() {
        let mut out = Recorder {
            broken: true,
            ..Default::default()
        };
        match copy_chunks(chunks(&[b"abc"]), &mut out, None).await {
            Err(CopyError::Write(e)) => assert_eq!(e.kind(), io::ErrorKind::BrokenPipe),
            other => panic!("{other:?}"),
        }
        let broken = futures::stream::iter([
            Ok(b"abc".to_vec()),
            Err(io::Error::other("connection reset")),
        ])
        .into_async_read();
        let mut out = Recorder::default();
        assert!(matches!(
            copy_chunks(broken, &mut out, None).await,
            Err(CopyError::Read(_))
        ));
        assert_eq!(out.data, b"abc");
    }

    const WATCH: &str = "/apis/networking.packet.io/v1/packetcaptureconfigs";
    const PACKETS: &str = "/apis/pcap.packet.io/v1/captures/web/proxy/packets";

    fn status(code: u16, reason: &str) -> Vec<u8> {
        serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": reason, "reason": reason, "code": code})
        .to_string()
        .into_bytes()
    }

    /// A stream that breaks off inside a block is opened again (after an
    /// API server that is unavailable for a moment) and goes on from its
    /// last whole block with the new stream's section, asking for the
    /// packets after the last one it brought from each node of the capture
    /// it streamed; once that ends, the capture runs nowhere (409), and the
    /// stream has ended with it.
    #[tokio::test]
    async fn a_stream_that_breaks_off_goes_on_from_its_last_whole_block() {
        let (first, ends) = section(3);
        let (second, _) = section(1);
        let of = |id: &str, answer: Answer| Answer {
            headers: vec![(
                http::HeaderName::from_static(packet_capture_common::crd::STREAM_CAPTURE_ID),
                id.into(),
            )],
            ..answer
        };
        let (cluster, asked) = answering(vec![
            // A reader who may not watch the capture: the stream says.
            Answer::from((WATCH, StatusCode::FORBIDDEN, status(403, "Forbidden"))),
            of(
                "u1-g1",
                Answer {
                    breaks_after: Some(ends[3] + 9),
                    ..Answer::from((PACKETS, StatusCode::OK, first.clone()))
                },
            ),
            Answer::from((
                PACKETS,
                StatusCode::SERVICE_UNAVAILABLE,
                status(503, "ServiceUnavailable"),
            )),
            of(
                "u1-g1",
                Answer::from((PACKETS, StatusCode::OK, second.clone())),
            ),
            Answer::from((PACKETS, StatusCode::CONFLICT, status(409, "Conflict"))),
        ]);
        let mut out = Vec::new();
        let followed = follow(&cluster, "web", false, &mut out).await.unwrap();
        assert!(matches!(followed, Followed::Ended));
        assert_eq!(out, [&first[..ends[3]], &second[..]].concat());
        drop(cluster);
        // Packets 1 and 2 of node n1 were whole when it broke off.
        let resumed = format!("{PACKETS}?resume=u1-g1&after=n1:2");
        assert_eq!(
            asked.await.unwrap(),
            [
                WATCH,
                PACKETS,
                &resumed,
                &resumed,
                &format!("{PACKETS}?resume=u1-g1&after=n1:1")
            ]
        );

        // Not pcapng: no other try.
        let (cluster, asked) = answering(vec![
            Answer::from((WATCH, StatusCode::FORBIDDEN, status(403, "Forbidden"))),
            Answer::from((PACKETS, StatusCode::OK, b"<html>".repeat(3))),
        ]);
        let err = follow(&cluster, "web", false, &mut Vec::new())
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("not a pcapng stream"), "{err}");
        drop(cluster);
        assert_eq!(asked.await.unwrap(), [WATCH, PACKETS]);
    }
}
