//! `fetch`: every node's files of a capture, downloaded through the
//! aggregated API and merged into one pcapng.
//!
//! The files are downloaded into a temporary directory next to the output
//! (the same disk, not a memory-backed /tmp) and merged from there, a
//! packet per node at a time; the directory is removed afterwards, on
//! error and on Ctrl-C too. The merge writes `.FILE.<random>.part` beside
//! it, a file made anew (never one, or a link, someone left there), and
//! renames it to `FILE` when it is whole, so a file named `FILE` is always
//! complete, and two fetches to one `FILE` do not write into each other.
//! A `FILE` that is a link gets the same where it leads (the link stays);
//! one that exists and is not a regular file (a FIFO Wireshark reads,
//! `/dev/null`) is written straight into, as stdout (`-o -`) is, with the
//! downloads in $TMPDIR. A reader of stdout or a FIFO that quits ends the
//! command quietly.
//! A request that nothing answers, or that is answered 5xx (an API server
//! or a controller that restarts), is sent again after a pause
//! ([`persisting`]). A file its node compresses between the listing and
//! the download is downloaded as its compressed copy. A download that
//! breaks off goes on from the byte where it broke off (a `Range` request,
//! whose answer must be that part of the same file: an `If-Range` names
//! the ETag it began with), after a pause that doubles each time,
//! up to [`api::Backoff::TRIES`] times; one compressed meanwhile starts
//! again as the copy.
//!
//! A capture that has not ended is refused: an agent writes a running
//! capture's file under a hidden name and lists it only once the capture
//! has ended there, so there is nothing whole to fetch before (`kubectl
//! pcap stop NAME --wait` ends it now). When no node returns a file, the
//! command fails and writes nothing.
//!
//! A node the controller could not ask is named on stderr with the reason,
//! and so is a node whose entry in the capture's status counts packets but
//! that returned no file of it; the command then exits with 1 after writing
//! the other nodes' packets, so a script does not take the file for the
//! whole capture.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kubectl_pcap::api::{self, Backoff, FileList, explain_access, explain_crd};
use kubectl_pcap::merge::{self, NodeInput, NodeSummary};
use kubectl_pcap::show;
use packet_capture_common::crd::{OutputFormat, PacketCaptureConfigStatus, Phase, names_no_file};
use packet_capture_common::validate::{COMPRESSED_EXTENSIONS, strip_compression};
use tokio::io::AsyncWriteExt as _;

use crate::cluster::{Cluster, Signals, persisting};

/// Files downloaded at the same time.
const PARALLEL_DOWNLOADS: usize = 4;

#[derive(Args, Debug)]
pub struct FetchArgs {
    /// The capture's name
    pub name: String,

    /// The merged pcapng to write; - for stdout (the nodes' files are
    /// downloaded to $TMPDIR first, else beside the output); a FIFO or
    /// device is written into
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: PathBuf,
}

/// Where the merged pcapng goes.
#[derive(Clone)]
enum Destination {
    /// Made whole as `part` beside `output`, then renamed over it.
    File { part: PathBuf, output: PathBuf },
    /// Written straight into: stdout (`None`), or an existing file that is
    /// not a regular one (a FIFO a reader waits on, `/dev/null`), which a
    /// rename would replace.
    Straight(Option<PathBuf>),
}

impl Destination {
    fn name(&self) -> String {
        match self {
            Self::File { output, .. } | Self::Straight(Some(output)) => {
                output.display().to_string()
            }
            Self::Straight(None) => "stdout".into(),
        }
    }
}

pub async fn fetch(cluster: &Cluster, args: FetchArgs) -> Result<ExitCode> {
    let mut signals = Signals::new()?;
    let output = output_of(&args.output)?;
    let dir = match &output {
        Some(file) => file.parent().map(Path::to_path_buf).unwrap_or_default(),
        None => std::env::temp_dir(),
    };
    let dir = if dir.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        dir
    };
    let downloads = tempfile::Builder::new()
        .prefix(".kubectl-pcap-")
        .tempdir_in(&dir)
        .with_context(|| format!("making a download directory in {}", dir.display()))?;
    let destination = match output {
        Some(output) => {
            let file_name = output.file_name().expect("a file's path");
            let mut prefix = std::ffi::OsString::from(".");
            prefix.push(file_name);
            prefix.push(".");
            let made = tempfile::Builder::new()
                .prefix(&prefix)
                .suffix(".part")
                .permissions(std::fs::Permissions::from_mode(0o666))
                .tempfile_in(&dir)
                .with_context(|| format!("making a file in {}", dir.display()))?;
            // Removed below on failure, renamed over the output on success.
            let part = made.into_temp_path().keep()?;
            Destination::File { part, output }
        }
        None if args.output.as_os_str() == "-" => Destination::Straight(None),
        None => Destination::Straight(Some(args.output.clone())),
    };

    let outcome = tokio::select! {
        r = run(cluster, &args, downloads.path(), &destination) => Ok(r),
        stop = signals.recv() => Err(stop),
    };
    if let Destination::File { part, .. } = &destination
        && !matches!(outcome, Ok(Ok(_)))
    {
        let _ = std::fs::remove_file(part);
    }
    let _ = downloads.close();
    match outcome {
        Ok(r) => r,
        Err(stop) => {
            match &destination {
                Destination::File { .. } => eprintln!("interrupted: nothing was written"),
                Destination::Straight(_) => eprintln!(
                    "interrupted: what {} got, if anything, is not the whole capture",
                    destination.name()
                ),
            }
            // The merge may still be running on a blocking thread, which
            // the runtime would wait for.
            std::process::exit(stop.status().into());
        }
    }
}

/// The regular file `-o` names, following links (a link stays, and its
/// target gets the file); `None` for stdout (`-`) and for an existing file
/// that is not a regular one, which is written straight into.
fn output_of(output: &Path) -> Result<Option<PathBuf>> {
    if output.as_os_str() == "-" {
        return Ok(None);
    }
    let given = output.display();
    if output.file_name().is_none() {
        bail!("-o {given}: not a file name");
    }
    match std::fs::symlink_metadata(output) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Some(output.into())),
        Err(e) => bail!("-o {given}: {e}"),
        Ok(_) => {}
    }
    let real = std::fs::canonicalize(output).with_context(|| {
        format!("-o {given}: a link to nowhere (the merged file is written where it leads)")
    })?;
    let kind = std::fs::metadata(&real)
        .with_context(|| format!("-o {given}"))?
        .file_type();
    if kind.is_dir() {
        bail!("-o {given}: a directory; give the file to write");
    }
    Ok(kind.is_file().then_some(real))
}

async fn run(
    cluster: &Cluster,
    args: &FetchArgs,
    downloads: &Path,
    destination: &Destination,
) -> Result<ExitCode> {
    let name = &args.name;
    // The object only tells early what a text or stdout capture is, and
    // whether it still runs; reading files needs other permissions, which
    // the aggregated API checks, so a refusal here is not the answer.
    let captures = cluster.captures();
    let pcc = match persisting(name, &mut Backoff::default(), || captures.get(name)).await {
        Ok(pcc) => Some(pcc),
        Err(kube::Error::Api(s)) if s.code == 403 => None,
        Err(e) => bail!(explain_crd(&e, &["get"])),
    };
    if let Some(pcc) = &pcc {
        refuse_unmergeable(name, pcc.spec.output_format)?;
        refuse_unended(name, pcc.current_phase())?;
    }

    let list = persisting("listing the files", &mut Backoff::default(), || {
        api::list_files(&cluster.client, name)
    })
    .await
    .map_err(|e| anyhow!(explain_access(&e, name)))?;
    // Without the object, the files' names tell a text capture.
    let text = |f: &str| strip_compression(f).unwrap_or(f).ends_with(".txt");
    if list
        .nodes
        .iter()
        .flat_map(|n| &n.files)
        .any(|f| text(&f.name))
    {
        refuse_unmergeable(name, OutputFormat::Text)?;
    }
    let mut jobs = Vec::new();
    for (i, node) in list.nodes.iter().enumerate() {
        let node_dir = downloads.join(i.to_string());
        std::fs::create_dir(&node_dir)?;
        let mut names = std::collections::BTreeSet::new();
        for file in &node.files {
            if !packet_capture_common::validate::plain_file_name(&file.name) {
                bail!(
                    "node {} lists a file named {:?}, which cannot be a capture file",
                    node.node,
                    file.name
                );
            }
            if !names.insert(&file.name) {
                bail!("node {} lists the file {:?} twice", node.node, file.name);
            }
            jobs.push((&node.node, &file.name, node_dir.clone()));
        }
    }
    let failed: Vec<_> = list.nodes.iter().filter(|n| n.error.is_some()).collect();
    let unlisted = pcc
        .as_ref()
        .and_then(|p| p.status.as_ref())
        .map(|s| unlisted_nodes(s, &list))
        .unwrap_or_default();
    if jobs.is_empty() {
        for n in &failed {
            eprintln!("{}: {}", n.node, n.error.as_deref().unwrap_or_default());
        }
        for n in &unlisted {
            eprintln!("{}", n.not_fetched());
        }
        if !failed.is_empty() {
            bail!("no node's files could be listed");
        }
        // Without the object (no `get` on it), whether it has ended is
        // not known here.
        let hint = match pcc {
            Some(_) => String::new(),
            None => format!(
                ": if it has not ended, `kubectl pcap stop {name} --wait` first (a node lists \
                 a capture's file once the capture has ended there)"
            ),
        };
        bail!("no node returned a file of capture {name}{hint}");
    }

    // A node with a file that did not download is left out, as one whose
    // listing failed: the others are still merged.
    let with_files: std::collections::BTreeSet<&String> = jobs.iter().map(|j| j.0).collect();
    let downloaded: Vec<(&String, &String, Result<String>)> = futures::stream::iter(jobs)
        .map(|(node, file, dir)| async move {
            (node, file, download(cluster, name, node, file, &dir).await)
        })
        .buffer_unordered(PARALLEL_DOWNLOADS)
        .collect()
        .await;
    let mut undownloaded = std::collections::BTreeMap::new();
    // Each listed file's name as downloaded (see `download`).
    let mut stored = std::collections::BTreeMap::new();
    for (node, file, result) in downloaded {
        match result {
            Ok(as_stored) => {
                stored.insert((node, file), as_stored);
            }
            Err(e) => {
                undownloaded.entry(node).or_insert(format!("{e:#}"));
            }
        }
    }
    if undownloaded.len() == with_files.len() {
        for (node, error) in &undownloaded {
            eprintln!("{node}: {error}");
        }
        bail!("no node's files could be downloaded");
    }

    let inputs: Vec<NodeInput> = list
        .nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| n.error.is_none() && !undownloaded.contains_key(&n.node))
        .map(|(i, n)| {
            // A node's files in the order they were written: by when each
            // was last written (rotation closes one before the next), then
            // by name.
            let mut files: Vec<_> = n
                .files
                .iter()
                .map(|f| {
                    let modified = f
                        .modified
                        .as_deref()
                        .and_then(|m| m.parse::<Timestamp>().ok());
                    (modified, &f.name)
                })
                .collect();
            files.sort();
            NodeInput {
                node: n.node.clone(),
                files: files
                    .into_iter()
                    .map(|(_, f)| downloads.join(i.to_string()).join(&stored[&(&n.node, f)]))
                    .collect(),
            }
        })
        .collect();
    let nodes: Vec<&str> = inputs.iter().map(|n| n.node.as_str()).collect();
    let comment = format!(
        "capture {name}, merged by kubectl-pcap from nodes {}",
        nodes.join(", ")
    );
    let written_to = destination.name();
    let into = destination.clone();
    let merged = tokio::task::spawn_blocking(move || write_merged(inputs, &comment, &into)).await?;
    let summaries = match merged {
        Ok(summaries) => summaries,
        // `fetch -o - | tshark -c 10 -r -`: the reader had what it wanted.
        Err(e) if matches!(destination, Destination::Straight(_)) && reader_quit(&e) => {
            return Ok(ExitCode::SUCCESS);
        }
        Err(e) => return Err(e),
    };

    let rows: Vec<Vec<String>> = list
        .nodes
        .iter()
        .map(|n| {
            let s = summaries.iter().find(|s| s.node == n.node);
            vec![
                n.node.clone(),
                n.address.clone(),
                s.map_or("-".into(), |s| s.files.to_string()),
                s.map_or("-".into(), |s| s.packets.to_string()),
            ]
        })
        .collect();
    eprint!(
        "{}",
        show::table(&["NODE", "ADDRESS", "FILES", "PACKETS"], &rows)
    );
    for n in &failed {
        eprintln!(
            "{}: not fetched: {}",
            n.node,
            n.error.as_deref().unwrap_or_default()
        );
    }
    for (node, error) in &undownloaded {
        eprintln!("{node}: not fetched: {error}");
    }
    for n in &unlisted {
        eprintln!("{}", n.not_fetched());
    }
    let packets: u64 = summaries.iter().map(|s| s.packets).sum();
    eprintln!(
        "{packets} packets from {} nodes written to {written_to}",
        summaries.len()
    );
    let missing = failed.len() + undownloaded.len() + unlisted.len();
    Ok(if missing == 0 {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "{missing} of {} nodes could not be fetched: the file lacks their packets",
            list.nodes.len() + unlisted.len()
        );
        ExitCode::FAILURE
    })
}

/// Refuses a capture that has not ended (`phase`, none before the
/// controller has written one): its nodes list no file of it yet.
fn refuse_unended(name: &str, phase: Option<Phase>) -> Result<()> {
    if phase.is_some_and(Phase::is_final) {
        return Ok(());
    }
    let phase = phase.map_or("not started".into(), show::phase_name);
    bail!(
        "capture {name} has not ended ({phase}): a node lists a capture's file only once the \
         capture has ended there. Run `kubectl pcap stop {name} --wait` first, or wait until \
         `kubectl pcap get {name}` shows Completed or Failed"
    )
}

/// A node whose entry in the capture's status counts packets written to a
/// file, but that the listing did not return.
#[derive(Debug, PartialEq, Eq)]
struct Unlisted {
    node: String,
    packets: u64,
}

impl Unlisted {
    fn not_fetched(&self) -> String {
        format!(
            "{}: not fetched: the capture's status counts {} packets there, but the node \
             returned no file of it",
            self.node, self.packets
        )
    }
}

/// The nodes of `status.captureFiles` with packets in a file that are not
/// in `list` at all (a node in it with an error is reported as such). An
/// entry is keyed by the node's address and names the node, as a listed
/// node has both.
fn unlisted_nodes(status: &PacketCaptureConfigStatus, list: &FileList) -> Vec<Unlisted> {
    status
        .capture_files
        .iter()
        .filter(|(_, e)| e.packets > 0 && !names_no_file(&e.output_file))
        .filter(|(address, e)| {
            !list.nodes.iter().any(|n| {
                (!e.node.is_empty() && n.node == e.node)
                    || (!address.is_empty() && n.address == **address)
            })
        })
        .map(|(address, e)| Unlisted {
            node: if e.node.is_empty() {
                address.clone()
            } else {
                e.node.clone()
            },
            packets: e.packets,
        })
        .collect()
}

/// Refuses the formats whose files hold no packets to merge.
fn refuse_unmergeable(name: &str, format: OutputFormat) -> Result<()> {
    match format {
        OutputFormat::Pcap | OutputFormat::Pcapng => Ok(()),
        OutputFormat::Text => bail!(
            "capture {name} writes text lines (outputFormat: text), not packets: there is \
             nothing to merge into a pcapng"
        ),
        OutputFormat::Stream => bail!(
            "capture {name} writes no files (outputFormat: stream): its packets went only to \
             its live streams (kubectl pcap stream {name} while it runs)"
        ),
        OutputFormat::Stdout => bail!(
            "capture {name} writes no files (outputFormat: stdout): its packets are in the \
             agents' logs (kubectl logs -n packet-capture -l app=packet-capture-agent | grep PACKET:)"
        ),
    }
}

/// Opens one file of a node as the node stores it, and returns the name
/// it is stored under: a plain file the node compressed since it listed it
/// (it compresses every finished file but its newest, so another capture's
/// file finishing is enough) is opened as its compressed copy.
async fn open_as_stored(
    cluster: &Cluster,
    capture: &str,
    node: &str,
    file: &str,
) -> Result<(String, api::StoredFile)> {
    let copies = COMPRESSED_EXTENSIONS
        .iter()
        .filter(|_| strip_compression(file).is_none())
        .map(|ext| format!("{file}.{ext}"));
    let open = |name: String| async move {
        let what = format!("{node}: {name}");
        persisting(&what, &mut Backoff::default(), || {
            api::open_file(&cluster.client, capture, node, &name)
        })
        .await
        .map(|body| (name, body))
    };
    let gone = |r: &Result<_, kube::Error>| matches!(r, Err(kube::Error::Api(s)) if s.code == 404);
    let mut opened = open(file.to_owned()).await;
    for copy in copies {
        if !gone(&opened) {
            break;
        }
        let tried = open(copy).await;
        // When no copy is there either, the listed name's answer is told.
        if !gone(&tried) {
            opened = tried;
        }
    }
    opened.map_err(|e| anyhow!(explain_access(&e, capture)))
}

/// Downloads one file as the node stores it ([`open_as_stored`]) into
/// `dir`, and returns the name it is stored under there. A download that
/// breaks off is asked for again from where it broke off, after a pause
/// that doubles each time, as is an answer to that which says the API
/// server is unavailable, up to [`api::Backoff::TRIES`] times in all; one
/// its node has compressed meanwhile starts again as the copy.
async fn download(
    cluster: &Cluster,
    capture: &str,
    node: &str,
    file: &str,
    dir: &Path,
) -> Result<String> {
    let (mut name, api::StoredFile { mut body, mut etag }) =
        open_as_stored(cluster, capture, node, file).await?;
    let create = |name: &str| {
        let path = dir.join(name);
        async move {
            tokio::fs::File::create(&path)
                .await
                .with_context(|| format!("creating {}", path.display()))
        }
    };
    let mut out = create(&name).await?;
    let downloading = |name: &str| format!("downloading {name} from node {node}");
    let mut backoff = api::Backoff::default();
    loop {
        let mut broke = match api::copy_chunks(body, &mut out, None).await {
            Ok(_) => return Ok(name),
            Err(e @ api::CopyError::Write(_)) => return Err(e).with_context(|| downloading(&name)),
            Err(api::CopyError::Read(e)) => e.to_string(),
        };
        // Every byte read was handed to the file before the next read; once
        // flushed, the file's length is where to go on from.
        out.flush().await.with_context(|| downloading(&name))?;
        let from = out
            .metadata()
            .await
            .with_context(|| downloading(&name))?
            .len();
        body = loop {
            let Some(pause) = backoff.next_pause() else {
                bail!(
                    "{}: broke off at byte {from} ({broke}), and could not go on in {} tries",
                    downloading(&name),
                    api::Backoff::TRIES
                );
            };
            eprintln!(
                "{node}: the download of {name} broke off at byte {from} ({broke}): going on from \
                 there in {pause:?}"
            );
            tokio::time::sleep(pause).await;
            let resumed =
                api::open_file_from(&cluster.client, capture, node, &name, from, etag.as_deref());
            match resumed.await {
                Ok(Some(rest)) => break rest,
                Ok(None) => return Ok(name),
                Err(api::ResumeError::Unavailable(why)) => broke = why,
                Err(api::ResumeError::Gone(_)) if strip_compression(&name).is_none() => {
                    let (copy, whole) = open_as_stored(cluster, capture, node, &name)
                        .await
                        .with_context(|| downloading(&name))?;
                    etag = whole.etag;
                    eprintln!(
                        "{node}: {name} was compressed meanwhile: downloading {copy} from the start"
                    );
                    tokio::fs::remove_file(dir.join(&name))
                        .await
                        .with_context(|| downloading(&name))?;
                    out = create(&copy).await?;
                    name = copy;
                    break whole.body;
                }
                Err(e) => return Err(e).with_context(|| downloading(&name)),
            }
        };
    }
}

/// Merges into `destination`: a file's part, renamed over it once whole,
/// or straight into stdout or the file.
fn write_merged(
    inputs: Vec<NodeInput>,
    comment: &str,
    destination: &Destination,
) -> Result<Vec<NodeSummary>> {
    let (part, output) = match destination {
        Destination::File { part, output } => (part, output),
        Destination::Straight(path) => {
            let out: Box<dyn Write> = match path {
                None => Box::new(std::io::stdout().lock()),
                Some(path) => Box::new(
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(path)
                        .with_context(|| format!("opening {}", path.display()))?,
                ),
            };
            let (mut out, summaries) = merge::merge(inputs, comment, std::io::BufWriter::new(out))?;
            out.flush()
                .with_context(|| format!("writing to {}", destination.name()))?;
            return Ok(summaries);
        }
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(part)
        .with_context(|| format!("opening {}", part.display()))?;
    let (out, summaries) = merge::merge(inputs, comment, std::io::BufWriter::new(file))?;
    let file = out
        .into_inner()
        .map_err(|e| e.into_error())
        .with_context(|| format!("writing {}", part.display()))?;
    file.sync_all()
        .with_context(|| format!("writing {}", part.display()))?;
    std::fs::rename(part, output)
        .with_context(|| format!("renaming {} to {}", part.display(), output.display()))?;
    Ok(summaries)
}

/// Whether writing failed because the reader of a pipe went away.
fn reader_quit(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stand_in::{Answer, answering, api_server};
    use http::StatusCode;
    use kubectl_pcap::api::NodeFiles;
    use pcap_file::pcap::{PcapPacket, PcapWriter};
    use pcap_file::pcapng::{Block, PcapNgReader};
    use std::time::Duration;

    const CAPTURE: &str = "/apis/networking.packet.io/v1/packetcaptureconfigs/web";
    const FILES: &str = "/apis/pcap.packet.io/v1/captures/web/proxy/files";
    const OK: StatusCode = StatusCode::OK;
    /// Node a's file, and the listing that names it.
    const PLAIN: &str =
        "/apis/pcap.packet.io/v1/captures/web/proxy/files/a/web-20250101-120000.pcap";
    /// Node a's file's ETag.
    const ETAG: &str = "\"v1\"";
    const LISTED: &[u8] = br#"{"capture":"web","nodes":[{"node":"a","address":"10.0.0.1","files":[
        {"name":"web-20250101-120000.pcap","size":100,"modified":"2025-01-01T12:01:00Z"}]}]}"#;

    #[test]
    fn a_capture_is_fetched_only_once_it_has_ended() {
        for phase in [None, Some(Phase::Starting), Some(Phase::Running)] {
            let err = refuse_unended("web", phase).unwrap_err().to_string();
            assert!(err.contains("`kubectl pcap stop web --wait`"), "{err}");
            assert!(err.starts_with("capture web has not ended"), "{err}");
        }
        for phase in [Phase::Completed, Phase::Failed] {
            assert!(refuse_unended("web", Some(phase)).is_ok(), "{phase:?}");
        }
    }

    /// A node's entry in `status.captureFiles`, as the controller writes it.
    fn entry(node: &str, packets: u64, output_file: &str) -> serde_json::Value {
        serde_json::json!({"status": "completed", "node": node, "packets": packets,
            "file_size": 100, "output_file": output_file})
    }

    fn listed(node: &str, address: &str, files: &[&str], error: Option<&str>) -> NodeFiles {
        NodeFiles {
            node: node.into(),
            address: address.into(),
            files: files
                .iter()
                .map(|f| api::FileEntry {
                    name: f.to_string(),
                    size: 100,
                    modified: None,
                })
                .collect(),
            error: error.map(Into::into),
        }
    }

    #[test]
    fn nodes_with_packets_that_returned_no_file_are_named() {
        let file = "/var/lib/packet-captures/web-20250101-120000.pcap";
        let entries: serde_json::Map<String, serde_json::Value> = [
            ("10.0.0.1", entry("a", 5, file)),
            // Its file is gone (rotated away, or the node replaced).
            ("10.0.0.2", entry("b", 3, file)),
            // Nothing to fetch there.
            ("10.0.0.3", entry("c", 0, file)),
            // Listed with an error, reported as such.
            ("10.0.0.4", entry("d", 7, file)),
            // An entry without the node's name, found by its address.
            ("10.0.0.5", entry("", 2, file)),
            ("10.0.0.6", entry("", 4, file)),
            // A stdout capture's: no file anywhere.
            (
                "10.0.0.7",
                entry("g", 9, packet_capture_common::crd::STDOUT_OUTPUT_FILE),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let status: PacketCaptureConfigStatus =
            serde_json::from_value(serde_json::json!({"captureFiles": entries})).unwrap();
        let list = FileList {
            capture: "web".into(),
            nodes: vec![
                listed("a", "10.0.0.1", &["web-20250101-120000.pcap"], None),
                listed("d", "10.0.0.4", &[], Some("agent unreachable")),
                listed("e", "10.0.0.5", &["web-20250101-120000.pcap"], None),
            ],
        };
        assert_eq!(
            unlisted_nodes(&status, &list),
            [
                Unlisted {
                    node: "b".into(),
                    packets: 3
                },
                Unlisted {
                    node: "10.0.0.6".into(),
                    packets: 4
                },
            ]
        );
    }

    /// A capture named web in `phase`, its status naming the nodes
    /// `(name, address, packets)`.
    fn capture(phase: &str, nodes: &[(&str, &str, u64)]) -> Vec<u8> {
        let files: serde_json::Map<String, serde_json::Value> = nodes
            .iter()
            .map(|(node, address, packets)| {
                let file = "/var/lib/packet-captures/web-20250101-120000.pcap";
                (address.to_string(), entry(node, *packets, file))
            })
            .collect();
        serde_json::to_vec(&serde_json::json!({
            "apiVersion": "networking.packet.io/v1",
            "kind": "PacketCaptureConfig",
            "metadata": {"name": "web"},
            "spec": {"targetIPs": ["10.0.0.9"], "outputFormat": "pcap"},
            "status": {"phase": phase, "captureFiles": files},
        }))
        .unwrap()
    }

    /// A pcap file of one packet.
    fn pcap_file() -> Vec<u8> {
        let mut w = PcapWriter::new(Vec::new()).unwrap();
        let data = [0u8; 60];
        w.write_packet(&PcapPacket::new(Duration::from_secs(100), 60, &data).unwrap())
            .unwrap();
        w.into_inner()
    }

    fn args(output: &Path) -> FetchArgs {
        FetchArgs {
            name: "web".into(),
            output: output.to_path_buf(),
        }
    }

    fn packets_in(path: &Path) -> usize {
        let mut reader = PcapNgReader::new(std::fs::File::open(path).unwrap()).unwrap();
        let mut packets = 0;
        while let Some(block) = reader.next_block() {
            if matches!(block.unwrap().0, Block::EnhancedPacket(_)) {
                packets += 1;
            }
        }
        packets
    }

    #[tokio::test]
    async fn a_running_capture_is_refused_before_anything_is_listed() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("web.pcapng");
        let (cluster, asked) = api_server(vec![(CAPTURE, OK, capture("Running", &[]))]);
        let err = fetch(&cluster, args(&out)).await.unwrap_err().to_string();
        assert!(err.contains("`kubectl pcap stop web --wait`"), "{err}");
        drop(cluster);
        assert_eq!(asked.await.unwrap(), [CAPTURE]);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

        // A spec changed since the status was written: the Completed is
        // the earlier capture's.
        let mut changed: serde_json::Value =
            serde_json::from_slice(&capture("Completed", &[("a", "10.0.0.1", 5)])).unwrap();
        changed["metadata"]["generation"] = 2.into();
        changed["status"]["observedGeneration"] = 1.into();
        let (cluster, _) = api_server(vec![(CAPTURE, OK, changed.to_string().into_bytes())]);
        let err = fetch(&cluster, args(&out)).await.unwrap_err().to_string();
        assert!(err.contains("has not ended (not started)"), "{err}");
    }

    #[tokio::test]
    async fn no_file_from_any_node_fails_and_writes_nothing() {
        let none = br#"{"capture":"web","nodes":[]}"#.to_vec();
        let forbidden = br#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"Forbidden","code":403,
            "message":"packetcaptureconfigs.networking.packet.io \"web\" is forbidden"}"#;
        for (answer, message) in [
            (
                (OK, capture("Completed", &[("a", "10.0.0.1", 5)])),
                "no node returned a file of capture web",
            ),
            // A user who may read the files but not the object: whether
            // the capture has ended is not known, so the message says what
            // to do if it has not.
            (
                (StatusCode::FORBIDDEN, forbidden.to_vec()),
                "no node returned a file of capture web: if it has not ended, \
                 `kubectl pcap stop web --wait` first",
            ),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let out = dir.path().join("web.pcapng");
            let (cluster, _) = api_server(vec![
                (CAPTURE, answer.0, answer.1),
                (FILES, OK, none.clone()),
            ]);
            let err = fetch(&cluster, args(&out)).await.unwrap_err().to_string();
            assert!(err.starts_with(message), "{err}");
            assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        }
    }

    #[tokio::test]
    async fn a_node_with_packets_but_no_file_fails_the_fetch_of_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("web.pcapng");
        let (cluster, _) = api_server(vec![
            (
                CAPTURE,
                OK,
                capture("Completed", &[("a", "10.0.0.1", 1), ("b", "10.0.0.2", 3)]),
            ),
            (
                FILES,
                OK,
                br#"{"capture":"web","nodes":[{"node":"a","address":"10.0.0.1","files":[
                    {"name":"web-20250101-120000.pcap","size":100,"modified":"2025-01-01T12:01:00Z"}]}]}"#
                    .to_vec(),
            ),
            (
                "/apis/pcap.packet.io/v1/captures/web/proxy/files/a/web-20250101-120000.pcap",
                OK,
                pcap_file(),
            ),
        ]);
        let code = fetch(&cluster, args(&out)).await.unwrap();
        assert_eq!(code, ExitCode::FAILURE);
        // Node a's packet is written all the same.
        assert_eq!(packets_in(&out), 1);
    }

    #[tokio::test]
    async fn a_file_compressed_since_it_was_listed_is_fetched_as_its_copy() {
        const GZ: &str =
            "/apis/pcap.packet.io/v1/captures/web/proxy/files/a/web-20250101-120000.pcap.gz";
        const ZST: &str =
            "/apis/pcap.packet.io/v1/captures/web/proxy/files/a/web-20250101-120000.pcap.zst";
        let gone = br#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound",
            "code":404,"message":"name: no file web-20250101-120000.pcap"}"#;
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gzip.write_all(&pcap_file()).unwrap();
        let gzip = gzip.finish().unwrap();
        let not_found = StatusCode::NOT_FOUND;

        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("web.pcapng");
        let (cluster, asked) = api_server(vec![
            (CAPTURE, OK, capture("Completed", &[("a", "10.0.0.1", 1)])),
            (FILES, OK, LISTED.to_vec()),
            (PLAIN, not_found, gone.to_vec()),
            (GZ, OK, gzip),
        ]);
        let code = fetch(&cluster, args(&out)).await.unwrap();
        assert_eq!(code, ExitCode::SUCCESS);
        assert_eq!(packets_in(&out), 1);
        drop(cluster);
        assert_eq!(asked.await.unwrap(), [CAPTURE, FILES, PLAIN, GZ]);

        // Gone under every name (removed past the node's file limit): the
        // node is named with the answer for the name it listed.
        let (cluster, asked) = api_server(vec![
            (CAPTURE, OK, capture("Completed", &[("a", "10.0.0.1", 1)])),
            (FILES, OK, LISTED.to_vec()),
            (PLAIN, not_found, gone.to_vec()),
            (GZ, not_found, Vec::new()),
            (ZST, not_found, Vec::new()),
        ]);
        let err = fetch(&cluster, args(&out)).await.unwrap_err().to_string();
        assert_eq!(err, "no node's files could be downloaded");
        drop(cluster);
        assert_eq!(asked.await.unwrap(), [CAPTURE, FILES, PLAIN, GZ, ZST]);
    }

    /// An API server that cannot answer for a moment (503: the controller
    /// restarts) is asked again, for the listing and for each file.
    #[tokio::test]
    async fn an_api_server_unavailable_for_a_moment_is_asked_again() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("web.pcapng");
        let unavailable = StatusCode::SERVICE_UNAVAILABLE;
        let (cluster, asked) = api_server(vec![
            (CAPTURE, OK, capture("Completed", &[("a", "10.0.0.1", 1)])),
            (FILES, unavailable, b"service unavailable".to_vec()),
            (FILES, OK, LISTED.to_vec()),
            (PLAIN, unavailable, b"service unavailable".to_vec()),
            (PLAIN, OK, pcap_file()),
        ]);
        let code = fetch(&cluster, args(&out)).await.unwrap();
        assert_eq!(code, ExitCode::SUCCESS);
        assert_eq!(packets_in(&out), 1);
        drop(cluster);
        assert_eq!(asked.await.unwrap(), [CAPTURE, FILES, FILES, PLAIN, PLAIN]);
    }

    /// A download that breaks off goes on from the byte where it broke off
    /// (a Range, with an If-Range naming the ETag it began with), as often
    /// as it breaks or finds the API server unavailable, and the merged file
    /// is whole; a file compressed meanwhile is downloaded as its copy, and
    /// one that broke off after its last byte is whole; the whole file
    /// again in answer to the Range is not taken for the rest, nor is
    /// another file put under its name.
    #[tokio::test]
    async fn a_download_that_breaks_off_goes_on_from_there() {
        let file = pcap_file();
        let size = file.len();
        let first = |breaks_after| {
            vec![
                Answer::from((CAPTURE, OK, capture("Completed", &[("a", "10.0.0.1", 1)]))),
                Answer::from((FILES, OK, LISTED.to_vec())),
                Answer {
                    breaks_after: Some(breaks_after),
                    headers: vec![(http::header::ETAG, ETAG.into())],
                    ..Answer::from((PLAIN, OK, file.clone()))
                },
            ]
        };
        let part = |range, from: usize, breaks_after| Answer {
            range: Some(range),
            if_range: Some(ETAG),
            headers: vec![(
                http::header::CONTENT_RANGE,
                format!("bytes {from}-{}/{size}", size - 1),
            )],
            breaks_after,
            ..Answer::from((PLAIN, StatusCode::PARTIAL_CONTENT, file[from..].to_vec()))
        };
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("web.pcapng");

        let fetched = |answers| async {
            let (cluster, asked) = answering(answers);
            let code = fetch(&cluster, args(&out)).await.unwrap();
            assert_eq!(code, ExitCode::SUCCESS);
            assert_eq!(packets_in(&out), 1);
            drop(cluster);
            asked.await.unwrap()
        };

        let mut answers = first(30);
        answers.push(part("bytes=30-", 30, Some(20)));
        answers.push(part("bytes=50-", 50, None));
        let asked = fetched(answers).await;
        assert_eq!(asked, [CAPTURE, FILES, PLAIN, PLAIN, PLAIN]);

        // Unavailable, then there.
        let mut answers = first(30);
        answers.push(Answer {
            range: Some("bytes=30-"),
            if_range: Some(ETAG),
            ..Answer::from((PLAIN, StatusCode::SERVICE_UNAVAILABLE, Vec::new()))
        });
        answers.push(part("bytes=30-", 30, None));
        let asked = fetched(answers).await;
        assert_eq!(asked, [CAPTURE, FILES, PLAIN, PLAIN, PLAIN]);

        // Compressed meanwhile: its copy, from the start.
        let gz = format!("{PLAIN}.gz");
        let gz: &'static str = gz.leak();
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gzip.write_all(&file).unwrap();
        let not_found = || Answer::from((PLAIN, StatusCode::NOT_FOUND, Vec::new()));
        let mut answers = first(30);
        answers.push(not_found());
        answers.push(Answer {
            range: Some("bytes=30-"),
            if_range: Some(ETAG),
            ..not_found()
        });
        answers.push(Answer::from((gz, OK, gzip.finish().unwrap())));
        let asked = fetched(answers).await;
        assert_eq!(asked, [CAPTURE, FILES, PLAIN, PLAIN, PLAIN, gz]);

        // Broken off after the last byte: nothing more to ask for.
        let mut answers = first(size);
        answers.push(Answer {
            range: Some(format!("bytes={size}-").leak()),
            if_range: Some(ETAG),
            headers: vec![(http::header::CONTENT_RANGE, format!("bytes */{size}"))],
            ..Answer::from((PLAIN, StatusCode::RANGE_NOT_SATISFIABLE, Vec::new()))
        });
        let asked = fetched(answers).await;
        assert_eq!(asked, [CAPTURE, FILES, PLAIN, PLAIN]);

        // Another file under its name (the whole of it, another ETag), or
        // the whole file again from an agent that gives no ETag (of an
        // earlier version): neither is taken for the rest.
        let name = "web-20250101-120000.pcap";
        let mut replaced = first(30).split_off(2);
        replaced.push(Answer {
            range: Some("bytes=30-"),
            if_range: Some(ETAG),
            headers: vec![(http::header::ETAG, "\"v2\"".into())],
            ..Answer::from((PLAIN, OK, file.clone()))
        });
        let without_etag = vec![
            Answer {
                breaks_after: Some(30),
                ..Answer::from((PLAIN, OK, file.clone()))
            },
            Answer {
                range: Some("bytes=30-"),
                ..Answer::from((PLAIN, OK, file.clone()))
            },
        ];
        for (answers, problem) in [
            (
                replaced,
                format!(
                    "another file of that name is there now (ETag \"v2\", not {ETAG}): the \
                     bytes downloaded are of the one before"
                ),
            ),
            (
                without_etag,
                "asked for its bytes from 30 on, the API server answered 200 OK (Content-Range \
                 \"\"), not that part"
                    .to_owned(),
            ),
        ] {
            let (cluster, _) = answering(answers);
            let err = download(&cluster, "web", "a", name, dir.path())
                .await
                .unwrap_err();
            assert_eq!(
                format!("{err:#}"),
                format!("downloading {name} from node a: {problem}")
            );
        }
    }

    /// `-o` through a link writes where the link leads and leaves the link;
    /// `-o` a FIFO writes into it (its reader gets the pcapng) and leaves
    /// the FIFO; a link to nowhere and a directory are refused, naming -o.
    #[tokio::test]
    async fn links_and_fifos_are_written_through_not_replaced() {
        let answers = || {
            vec![
                (CAPTURE, OK, capture("Completed", &[("a", "10.0.0.1", 1)])),
                (FILES, OK, LISTED.to_vec()),
                (PLAIN, OK, pcap_file()),
            ]
        };
        let dir = tempfile::tempdir().unwrap();

        let target = dir.path().join("real.pcapng");
        std::fs::write(&target, b"an older fetch").unwrap();
        let link = dir.path().join("latest.pcapng");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let (cluster, _) = api_server(answers());
        assert_eq!(
            fetch(&cluster, args(&link)).await.unwrap(),
            ExitCode::SUCCESS
        );
        assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
        assert_eq!(packets_in(&target), 1);

        let fifo = dir.path().join("wireshark.fifo");
        let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid C string; mkfifo touches nothing else.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        let reader = std::thread::spawn({
            let fifo = fifo.clone();
            move || std::fs::read(fifo).unwrap()
        });
        let (cluster, _) = api_server(answers());
        assert_eq!(
            fetch(&cluster, args(&fifo)).await.unwrap(),
            ExitCode::SUCCESS
        );
        let read = reader.join().unwrap();
        let mut got = PcapNgReader::new(read.as_slice()).unwrap();
        let mut packets = 0;
        while let Some(block) = got.next_block() {
            packets += usize::from(matches!(block.unwrap().0, Block::EnhancedPacket(_)));
        }
        assert_eq!(packets, 1);
        use std::os::unix::fs::FileTypeExt as _;
        assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());

        let nowhere = dir.path().join("dangling.pcapng");
        std::os::unix::fs::symlink(dir.path().join("gone/x.pcapng"), &nowhere).unwrap();
        let (cluster, _) = api_server(answers());
        let err = fetch(&cluster, args(&nowhere))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(&format!("-o {}: a link to nowhere", nowhere.display())),
            "{err}"
        );
        let (cluster, _) = api_server(answers());
        let err = fetch(&cluster, args(dir.path()))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.ends_with(": a directory; give the file to write"),
            "{err}"
        );
        // Nothing left behind: the files made above, and no part or
        // download directory.
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "dangling.pcapng",
                "latest.pcapng",
                "real.pcapng",
                "wireshark.fifo"
            ]
        );
    }

    /// A pipe whose reader has gone fails the merge with what tells a
    /// reader that quit.
    #[test]
    fn a_reader_that_quit_is_told_from_other_failures() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.pcap");
        std::fs::write(&file, pcap_file()).unwrap();
        let input = || {
            vec![NodeInput {
                node: "a".into(),
                files: vec![file.clone()],
            }]
        };
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let err = anyhow::Error::from(merge::merge(input(), "", writer).unwrap_err());
        assert!(reader_quit(&err), "{err:#}");
        std::fs::write(&file, b"not a capture").unwrap();
        let err = anyhow::Error::from(merge::merge(input(), "", Vec::new()).unwrap_err());
        assert!(!reader_quit(&err), "{err:#}");
    }
}
