//! The commands on `PacketCaptureConfig` objects: `create`, `ls`, `get`,
//! `stop` and `delete`.

use std::process::ExitCode;

use anyhow::{Result, anyhow, bail};
use clap::{Args, ValueEnum};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use kubectl_pcap::api::explain_crd;
use kubectl_pcap::show;
use kubectl_pcap::spec::TargetArgs;
use packet_capture_common::crd::{GROUP, PacketCaptureConfig, Phase, STOP_REQUESTED, stop_value};
use serde::Serialize;

use crate::cluster::{Cluster, lasting};

/// How kubectl names an object of this kind in its messages.
fn object(name: &str) -> String {
    format!("packetcaptureconfig.{GROUP}/{name}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ObjectFormat {
    Yaml,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ListFormat {
    Wide,
    Yaml,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DryRun {
    /// Create it.
    None,
    /// Print it; send nothing.
    Client,
    /// Have the API server (and the webhook) check it; store nothing.
    Server,
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// The capture's name
    pub name: String,

    #[command(flatten)]
    pub target: TargetArgs,

    /// Labels of the PacketCaptureConfig itself, key=value[,key=value...]
    /// (a controller started with --capture-selector runs only the
    /// captures its selector matches)
    #[arg(long, value_name = "LABELS", value_parser = kubectl_pcap::spec::parse_pairs)]
    pub labels: Option<std::collections::BTreeMap<String, String>>,

    /// client: print the object without sending it; server: have the API
    /// server and the webhook check it without storing it
    #[arg(long, value_enum, value_name = "MODE", num_args = 0..=1, require_equals = true, default_missing_value = "client")]
    pub dry_run: Option<DryRun>,

    /// Print the object (as created, or as it would be)
    #[arg(short = 'o', long, value_enum, value_name = "FORMAT")]
    pub output: Option<ObjectFormat>,

    /// Wait until the capture has ended and print each node's part; exit
    /// non-zero if it failed
    #[arg(long, conflicts_with = "dry_run")]
    pub wait: bool,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// wide (more columns), yaml or json
    #[arg(short = 'o', long, value_enum, value_name = "FORMAT")]
    pub output: Option<ListFormat>,

    /// After the list, print each change as it happens
    #[arg(short = 'w', long)]
    pub watch: bool,
}

#[derive(Args, Debug)]
pub struct GetArgs {
    /// The capture's name
    pub name: String,

    /// yaml or json instead of the summary
    #[arg(short = 'o', long, value_enum, value_name = "FORMAT")]
    pub output: Option<ObjectFormat>,

    /// After the capture, print it again each time it changes
    #[arg(short = 'w', long)]
    pub watch: bool,
}

#[derive(Args, Debug)]
pub struct StopArgs {
    /// The capture's name
    pub name: String,

    /// Wait until every node has stopped, then show the capture
    #[arg(long)]
    pub wait: bool,
}

#[derive(Args, Debug)]
pub struct DeleteArgs {
    /// The capture's name
    pub name: String,

    /// Wait until the capture is gone
    #[arg(long)]
    pub wait: bool,
}

/// An object as kubectl prints it: without `managedFields`.
fn print_object<T: Serialize>(value: &T, format: ObjectFormat) -> Result<()> {
    let mut value = serde_json::to_value(value)?;
    if let Some(meta) = value.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        meta.remove("managedFields");
    }
    match format {
        ObjectFormat::Json => outln!("{}", serde_json::to_string_pretty(&value)?),
        ObjectFormat::Yaml => out!("{}", serde_yaml::to_string(&value)?),
    }
    Ok(())
}

pub async fn create(cluster: &Cluster, args: CreateArgs) -> Result<ExitCode> {
    let spec = args.target.to_spec(&cluster.namespace, None)?;
    let mut pcc = PacketCaptureConfig::new(&args.name, spec);
    pcc.metadata.labels = args.labels;
    let dry_run = args.dry_run.unwrap_or(DryRun::None);
    let created = match dry_run {
        DryRun::Client => pcc,
        DryRun::None | DryRun::Server => {
            let params = PostParams {
                dry_run: dry_run == DryRun::Server,
                ..Default::default()
            };
            cluster
                .captures()
                .create(&params, &pcc)
                .await
                .map_err(|e| anyhow!(explain_crd(&e, &["create"])))?
        }
    };
    match args.output {
        Some(format) => print_object(&created, format)?,
        None => outln!(
            "{} created{}",
            object(&args.name),
            match dry_run {
                DryRun::None => "",
                DryRun::Client => " (dry run)",
                DryRun::Server => " (server dry run)",
            }
        ),
    }
    if !args.wait {
        return Ok(ExitCode::SUCCESS);
    }
    let ended = wait_ended(&cluster.captures(), &args.name).await?;
    out!("{}", show::details(&ended, Timestamp::now()));
    Ok(exit_status(&ended))
}

/// Success unless the capture failed.
fn exit_status(pcc: &PacketCaptureConfig) -> ExitCode {
    match pcc.current_phase() {
        Some(Phase::Failed) => ExitCode::FAILURE,
        _ => ExitCode::SUCCESS,
    }
}

/// Follows the capture until its phase is Completed or Failed, telling
/// stderr of each new phase on the way.
pub async fn wait_ended(api: &Api<PacketCaptureConfig>, name: &str) -> Result<PacketCaptureConfig> {
    wait_for(api, name, Phase::is_final, true).await
}

/// How long a wait lets the controller take a capture up before it asks
/// whether one runs for it.
const UNTAKEN_AFTER: std::time::Duration = std::time::Duration::from_secs(15);

/// Follows the capture until `done` holds for its phase; `tell_untaken`:
/// saying so when no controller has taken it up after [`UNTAKEN_AFTER`].
pub async fn wait_for(
    api: &Api<PacketCaptureConfig>,
    name: &str,
    done: impl Fn(Phase) -> bool,
    tell_untaken: bool,
) -> Result<PacketCaptureConfig> {
    let mut changes = std::pin::pin!(lasting(watcher::watch_object(api.clone(), name)));
    let mut last = None;
    // A controller that has not taken the capture up for this long may
    // not be running, or not be the one for it: the wait says so.
    let mut untaken = std::pin::pin!(tokio::time::sleep(UNTAKEN_AFTER));
    let mut told = !tell_untaken;
    loop {
        let pcc = tokio::select! {
            pcc = changes.try_next() => pcc?,
            () = &mut untaken, if !told && last.is_none() => {
                told = true;
                eprintln!(
                    "{name}: no controller has taken it up after {}s: is the controller \
                     running, and does its --capture-selector match the capture's labels?",
                    UNTAKEN_AFTER.as_secs()
                );
                continue;
            }
        };
        let Some(pcc) = pcc else {
            bail!("the watch of capture {name} ended");
        };
        let Some(pcc) = pcc else {
            bail!("capture {name} was deleted (or does not exist)");
        };
        // What the status says of an earlier spec is not this capture's.
        let phase = pcc.current_phase();
        if phase.is_some() && phase != last {
            last = phase;
            let message = pcc.status.as_ref().and_then(|s| s.message.as_deref());
            eprintln!(
                "{name}: {}{}",
                show::phase(&pcc),
                message.map(|m| format!(": {m}")).unwrap_or_default()
            );
        }
        if phase.is_some_and(&done) {
            return Ok(pcc);
        }
    }
}

pub async fn list(cluster: &Cluster, args: ListArgs) -> Result<ExitCode> {
    let api = cluster.captures();
    if !args.watch {
        let mut items = api
            .list(&ListParams::default())
            .await
            .map_err(|e| anyhow!(explain_crd(&e, &["list"])))?
            .items;
        items.sort_by_key(|p| p.name_any());
        print_list(&items, args.output);
        return Ok(ExitCode::SUCCESS);
    }
    // The watch lists first (Init .. InitDone), then reports each change;
    // after a relist it reports every object again, as kubectl does.
    let mut events = std::pin::pin!(lasting(watcher(api, watcher::Config::default())));
    let mut initial = Some(Vec::new());
    let mut widths = Vec::new();
    while let Some(event) = events.next().await {
        let (pcc, deleted) = match event? {
            watcher::Event::Init => continue,
            watcher::Event::InitApply(p) => match &mut initial {
                Some(items) => {
                    items.push(p);
                    continue;
                }
                None => (p, false),
            },
            watcher::Event::InitDone => {
                if let Some(mut items) = initial.take() {
                    items.sort_by_key(|p| p.name_any());
                    widths = print_list(&items, args.output);
                }
                continue;
            }
            watcher::Event::Apply(p) => (p, false),
            watcher::Event::Delete(p) => (p, true),
        };
        print_change(&pcc, args.output, deleted, &widths);
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints the list; returns the widths of its table's columns, for the
/// rows of changes printed under it.
fn print_list(items: &[PacketCaptureConfig], format: Option<ListFormat>) -> Vec<usize> {
    let now = Timestamp::now();
    match format {
        None | Some(ListFormat::Wide) => {
            let wide = format.is_some();
            let header = show::list_header(wide);
            let rows: Vec<Vec<String>> =
                items.iter().map(|p| show::list_row(p, now, wide)).collect();
            if items.is_empty() {
                eprintln!("No captures found.");
            } else {
                out!("{}", show::table(&header, &rows));
            }
            show::widths(&header, &rows)
        }
        Some(ListFormat::Yaml | ListFormat::Json) => {
            let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items});
            if let Err(e) = print_object(&list, object_format(format)) {
                eprintln!("error: {e}");
            }
            Vec::new()
        }
    }
}

/// One change during `ls -w`: a row (marked when the capture is gone), or
/// the object.
fn print_change(
    pcc: &PacketCaptureConfig,
    format: Option<ListFormat>,
    deleted: bool,
    widths: &[usize],
) {
    match format {
        None | Some(ListFormat::Wide) => {
            let mut row = show::list_row(pcc, Timestamp::now(), format.is_some());
            if deleted {
                row[1] = "Deleted".into();
            }
            outln!("{}", show::line(widths, &row));
        }
        Some(ListFormat::Yaml | ListFormat::Json) => {
            if format == Some(ListFormat::Yaml) {
                outln!("---");
            }
            if let Err(e) = print_object(pcc, object_format(format)) {
                eprintln!("error: {e}");
            }
        }
    }
}

fn object_format(format: Option<ListFormat>) -> ObjectFormat {
    match format {
        Some(ListFormat::Json) => ObjectFormat::Json,
        _ => ObjectFormat::Yaml,
    }
}

pub async fn get(cluster: &Cluster, args: GetArgs) -> Result<ExitCode> {
    let api = cluster.captures();
    let show = |pcc: &PacketCaptureConfig| -> Result<()> {
        match args.output {
            Some(format) => print_object(pcc, format),
            None => {
                out!("{}", show::details(pcc, Timestamp::now()));
                Ok(())
            }
        }
    };
    if !args.watch {
        let pcc = api
            .get(&args.name)
            .await
            .map_err(|e| anyhow!(explain_crd(&e, &["get"])))?;
        show(&pcc)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut changes = std::pin::pin!(lasting(watcher::watch_object(api, &args.name)));
    let mut first = true;
    while let Some(pcc) = changes.try_next().await? {
        let Some(pcc) = pcc else {
            if first {
                bail!("capture {} not found", args.name);
            }
            outln!("{} deleted", object(&args.name));
            return Ok(ExitCode::SUCCESS);
        };
        if !first && args.output != Some(ObjectFormat::Json) {
            outln!("{}", if args.output.is_some() { "---" } else { "" });
        }
        first = false;
        show(&pcc)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Ends a running capture now on every node by annotating it
/// (`STOP_REQUESTED`, naming the generation read here), which the
/// controller acts on: unlike a change of the spec, it does not start the
/// capture again, and the capture, its status and its files stay.
pub async fn stop(cluster: &Cluster, args: StopArgs) -> Result<ExitCode> {
    let api = cluster.captures();
    let name = &args.name;
    let pcc = api
        .get(name)
        .await
        .map_err(|e| anyhow!(explain_crd(&e, &["get"])))?;
    if let Some(phase) = pcc.current_phase().filter(|p| p.is_final()) {
        outln!(
            "capture {name} has already ended ({}); nothing to stop",
            show::phase_name(phase)
        );
        return Ok(exit_status(&pcc));
    }
    let patch = serde_json::json!({
        "metadata": {"annotations": {
            STOP_REQUESTED: stop_value(pcc.metadata.generation.unwrap_or_default(), Timestamp::now()),
        }},
    });
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| anyhow!(explain_crd(&e, &["patch"])))?;
    outln!("capture {name} stopping on every node; it and its files are kept");
    if !args.wait {
        return Ok(ExitCode::SUCCESS);
    }
    let ended = wait_ended(&api, name).await?;
    out!("{}", show::details(&ended, Timestamp::now()));
    Ok(exit_status(&ended))
}

pub async fn delete(cluster: &Cluster, args: DeleteArgs) -> Result<ExitCode> {
    let api = cluster.captures();
    let deleted = api
        .delete(&args.name, &DeleteParams::default())
        .await
        .map_err(|e| anyhow!(explain_crd(&e, &["delete"])))?;
    outln!("{} deleted", object(&args.name));
    // A Status means it is gone already; an object, that it is going
    // (finalizers first).
    if let (true, Some(uid)) = (args.wait, deleted.left().and_then(|p| p.uid())) {
        let mut changes = std::pin::pin!(lasting(watcher::watch_object(api, &args.name)));
        while let Some(pcc) = changes.try_next().await? {
            // Gone, or another object under the name since.
            if pcc.is_none_or(|p| p.uid().as_deref() != Some(&uid)) {
                break;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dry_run_prints_the_object_the_flags_make() {
        let target = TargetArgs {
            ips: vec!["10.0.0.1".into()],
            ..Default::default()
        };
        let pcc = PacketCaptureConfig::new("web", target.to_spec("default", None).unwrap());
        let value = serde_json::to_value(&pcc).unwrap();
        assert_eq!(value["apiVersion"], "networking.packet.io/v1");
        assert_eq!(value["kind"], "PacketCaptureConfig");
        assert_eq!(value["metadata"]["name"], "web");
        assert_eq!(value["spec"]["targetIPs"][0], "10.0.0.1");
    }
}
