//! `fetch`: every node's files of a capture, downloaded through the
//! aggregated API and merged into one pcapng.
//!
//! The files are downloaded into a temporary directory next to the output
//! (the same disk, not a memory-backed /tmp) and merged from there, a
//! packet per node at a time; the directory is removed afterwards, on
//! error and on Ctrl-C too. The merge writes `FILE.part` and renames it to
//! `FILE` when it is whole, so a file named `FILE` is always complete.
//!
//! A node the controller could not ask is named on stderr with the reason,
//! and the command exits with 1 after writing the other nodes' packets, so
//! a script does not take the file for the whole capture.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::jiff::Timestamp;
use kubectl_pcap::api::{self, explain_access, explain_crd};
use kubectl_pcap::merge::{self, NodeInput, NodeSummary};
use kubectl_pcap::show;
use packet_capture_common::crd::{OutputFormat, Phase};

use crate::cluster::{Cluster, Signals};

/// Files downloaded at the same time.
const PARALLEL_DOWNLOADS: usize = 4;

#[derive(Args, Debug)]
pub struct FetchArgs {
    /// The capture's name
    pub name: String,

    /// The merged pcapng to write; - for stdout
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: PathBuf,
}

pub async fn fetch(cluster: &Cluster, args: FetchArgs) -> Result<ExitCode> {
    let mut signals = Signals::new()?;
    let to_stdout = args.output.as_os_str() == "-";
    let dir = match args.output.parent() {
        Some(p) if !to_stdout && !p.as_os_str().is_empty() => p.to_path_buf(),
        _ if to_stdout => std::env::temp_dir(),
        _ => PathBuf::from("."),
    };
    let downloads = tempfile::Builder::new()
        .prefix(".kubectl-pcap-")
        .tempdir_in(&dir)
        .with_context(|| format!("making a download directory in {}", dir.display()))?;
    let part = (!to_stdout).then(|| {
        let mut p = args.output.clone().into_os_string();
        p.push(".part");
        PathBuf::from(p)
    });

    let outcome = tokio::select! {
        r = run(cluster, &args, downloads.path(), part.as_deref()) => Ok(r),
        stop = signals.recv() => Err(stop),
    };
    if let Some(part) = &part
        && !matches!(outcome, Ok(Ok(_)))
    {
        let _ = std::fs::remove_file(part);
    }
    let _ = downloads.close();
    match outcome {
        Ok(r) => r,
        Err(stop) => {
            eprintln!("interrupted: nothing was written");
            // The merge may still be running on a blocking thread, which
            // the runtime would wait for.
            std::process::exit(stop.status().into());
        }
    }
}

async fn run(
    cluster: &Cluster,
    args: &FetchArgs,
    downloads: &Path,
    part: Option<&Path>,
) -> Result<ExitCode> {
    let name = &args.name;
    // The object only tells early what a text or stdout capture is, and
    // whether it still runs; reading files needs other permissions, which
    // the aggregated API checks, so a refusal here is not the answer.
    let pcc = match cluster.captures().get(name).await {
        Ok(pcc) => Some(pcc),
        Err(kube::Error::Api(s)) if s.code == 403 => None,
        Err(e) => bail!(explain_crd(&e, &["get"])),
    };
    if let Some(pcc) = &pcc {
        refuse_unmergeable(name, pcc.spec.output_format)?;
        if !pcc
            .status
            .as_ref()
            .and_then(|s| s.phase)
            .is_some_and(Phase::is_final)
        {
            eprintln!("capture {name} has not ended: fetching what it has captured so far");
        }
    }

    let list = api::list_files(&cluster.client, name)
        .await
        .map_err(|e| anyhow!(explain_access(&e, name)))?;
    // Without the object, the files' names tell a text capture.
    let text = |f: &str| {
        let plain = f.strip_suffix(".gz").or_else(|| f.strip_suffix(".zst"));
        plain.unwrap_or(f).ends_with(".txt")
    };
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
        for file in &node.files {
            if !packet_capture_common::validate::plain_file_name(&file.name) {
                bail!(
                    "node {} lists a file named {:?}, which cannot be a capture file",
                    node.node,
                    file.name
                );
            }
            jobs.push((&node.node, &file.name, node_dir.join(&file.name)));
        }
    }
    let failed: Vec<_> = list.nodes.iter().filter(|n| n.error.is_some()).collect();
    if jobs.is_empty() && !failed.is_empty() {
        for n in &failed {
            eprintln!("{}: {}", n.node, n.error.as_deref().unwrap_or_default());
        }
        bail!("no node's files could be listed");
    }

    futures::stream::iter(jobs)
        .map(|(node, file, path)| download(cluster, name, node, file, path))
        .buffer_unordered(PARALLEL_DOWNLOADS)
        .try_collect::<Vec<()>>()
        .await?;

    let inputs: Vec<NodeInput> = list
        .nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| n.error.is_none())
        .map(|(i, n)| {
            // A node's files in the order they were written: by when each
            // was last written (rotation closes one before the next), then
            // by name.
            let mut files: Vec<_> = n
                .files
                .iter()
                .map(|f| (f.modified.parse::<Timestamp>().ok(), &f.name))
                .collect();
            files.sort();
            NodeInput {
                node: n.node.clone(),
                files: files
                    .into_iter()
                    .map(|(_, f)| downloads.join(i.to_string()).join(f))
                    .collect(),
            }
        })
        .collect();
    let nodes: Vec<&str> = inputs.iter().map(|n| n.node.as_str()).collect();
    let comment = format!(
        "capture {name}, merged by kubectl-pcap from nodes {}",
        nodes.join(", ")
    );
    let output = args.output.clone();
    let written_to = match part {
        Some(_) => args.output.display().to_string(),
        None => "stdout".into(),
    };
    let part = part.map(Path::to_path_buf);
    let summaries =
        tokio::task::spawn_blocking(move || write_merged(inputs, &comment, part, &output))
            .await??;

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
    let packets: u64 = summaries.iter().map(|s| s.packets).sum();
    eprintln!(
        "{packets} packets from {} nodes written to {written_to}",
        summaries.len()
    );
    Ok(if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "{} of {} nodes could not be fetched: the file lacks their packets",
            failed.len(),
            list.nodes.len()
        );
        ExitCode::FAILURE
    })
}

/// Refuses the formats whose files hold no packets to merge.
fn refuse_unmergeable(name: &str, format: OutputFormat) -> Result<()> {
    match format {
        OutputFormat::Pcap | OutputFormat::Pcapng => Ok(()),
        OutputFormat::Text => bail!(
            "capture {name} writes text lines (outputFormat: text), not packets: there is \
             nothing to merge into a pcapng"
        ),
        OutputFormat::Stdout => bail!(
            "capture {name} writes no files (outputFormat: stdout): its packets are in the \
             agents' logs (kubectl logs -n packet-capture -l app=packet-capture-agent | grep PACKET:)"
        ),
    }
}

/// Downloads one file as the node stores it.
async fn download(
    cluster: &Cluster,
    capture: &str,
    node: &str,
    file: &str,
    path: PathBuf,
) -> Result<()> {
    let body = api::open_file(&cluster.client, capture, node, file)
        .await
        .map_err(|e| anyhow!(explain_access(&e, capture)))?;
    let mut out = tokio::fs::File::create(&path)
        .await
        .with_context(|| format!("creating {}", path.display()))?;
    api::copy_chunks(body, &mut out, false)
        .await
        .with_context(|| format!("downloading {file} from node {node}"))?;
    Ok(())
}

/// Merges into `part` and renames it to `output` once whole, or into
/// stdout when there is no `part`.
fn write_merged(
    inputs: Vec<NodeInput>,
    comment: &str,
    part: Option<PathBuf>,
    output: &Path,
) -> Result<Vec<NodeSummary>> {
    let Some(part) = part else {
        let stdout = std::io::stdout().lock();
        let (mut out, summaries) = merge::merge(inputs, comment, std::io::BufWriter::new(stdout))?;
        out.flush().context("writing to stdout")?;
        return Ok(summaries);
    };
    let file =
        std::fs::File::create(&part).with_context(|| format!("creating {}", part.display()))?;
    let (out, summaries) = merge::merge(inputs, comment, std::io::BufWriter::new(file))?;
    let file = out
        .into_inner()
        .map_err(|e| e.into_error())
        .with_context(|| format!("writing {}", part.display()))?;
    file.sync_all()
        .with_context(|| format!("writing {}", part.display()))?;
    std::fs::rename(&part, output)
        .with_context(|| format!("renaming {} to {}", part.display(), output.display()))?;
    Ok(summaries)
}
