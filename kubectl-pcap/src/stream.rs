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
//! exits 1.

use std::io;
use std::process::ExitCode;

use anyhow::{Result, anyhow, bail};
use clap::Args;
use kube::api::{DeleteParams, PostParams};
use kubectl_pcap::api::{self, CopyError, explain_access, explain_crd};
use kubectl_pcap::spec::TargetArgs;
use packet_capture_common::crd::{OutputFormat, PacketCaptureConfig, Phase};

use crate::capture::wait_for;
use crate::cluster::{Cluster, Signals, Stop};

/// How long a capture made for a stream runs unless `--duration` says.
const DEFAULT_DURATION: u32 = 300;

/// How long the command waits on the API server once the stream has
/// ended: for the capture's final phase, and to delete one it made (then
/// it gives up and says how to delete it).
const SETTLE_WITHIN: std::time::Duration = std::time::Duration::from_secs(15);

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

    let outcome = tokio::select! {
        r = follow(cluster, &name, created) => Ok(r),
        stop = signals.recv() => Err(stop),
    };
    // How the capture ended, when that ended the stream (the wait tells
    // its phase; the status may trail the stream's end a moment).
    let ended = match &outcome {
        Ok(Ok(Followed::Ended)) => {
            let wait = wait_for(&api, &name, Phase::is_final, false);
            tokio::select! {
                pcc = tokio::time::timeout(SETTLE_WITHIN, wait) => match pcc {
                    Ok(pcc) => pcc.ok(),
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
/// stdout until the capture has ended on every node or stdout is closed
/// (the reader downstream quit, which ends the stream as Ctrl-C does).
async fn follow(cluster: &Cluster, name: &str, created: bool) -> Result<Followed> {
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
    let body = api::open_packets(&cluster.client, name)
        .await
        .map_err(|e| anyhow!(explain_access(&e, name)))?;
    let mut stdout = tokio::io::stdout();
    let copied = tokio::select! {
        copied = api::copy_chunks(body, &mut stdout, true) => copied,
        // Gone while no packet came to write: a write would say so only
        // with the next packet, which a quiet capture may never have.
        () = reader_gone() => return Ok(Followed::ReaderQuit),
    };
    match copied {
        Ok(_) => Ok(Followed::Ended),
        Err(CopyError::Write(e)) if e.kind() == io::ErrorKind::BrokenPipe => {
            Ok(Followed::ReaderQuit)
        }
        Err(e) => Err(anyhow!("streaming capture {name}: {e}")),
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
