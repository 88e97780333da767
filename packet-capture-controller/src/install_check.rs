//! `packet-capture-controller check-install`: what the chart's `helm test`
//! runs, from a pod of the release.
//!
//! First every node the agents' DaemonSet is for must run a ready agent of
//! its current template (an agent is ready once it serves its API, its
//! programs loaded). Then the pod captures its own traffic, the requests it sends the API server
//! meanwhile. That passes through every part a user's capture needs: the
//! webhook admits the capture (the pod's account may capture the pods of
//! its namespace), the controller finds the pod's node and starts the
//! capture there, that node's agent captures in the kernel and writes the
//! file, and the status reports the packets. With the aggregated API, the
//! file is then read through the API server, as `kubectl pcap fetch` reads
//! it, and its records counted. The capture is deleted at the end however
//! the check went, and one of that name left by an earlier run first (a
//! capture of that name the check did not make is left alone, and the
//! check fails saying so).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use futures::AsyncReadExt as _;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, PostParams, Preconditions};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, Client, ResourceExt as _};
use packet_capture_common::aggregated::{API_SERVICE, file_path};
use packet_capture_common::crd::{
    CaptureState, NodeCapture, OutputFormat, PacketCaptureConfig, PacketCaptureConfigSpec,
    PacketCaptureConfigStatus, Phase, PodRef, PodSelector,
};

use crate::backoff::Backoff;
use crate::uninstall::gone_within;

/// What to check, and where the checking pod is.
#[derive(Debug, Clone)]
pub struct Check {
    /// The capture's name (captures are cluster-scoped).
    pub capture: String,
    /// Labels the capture carries (the controller's `--capture-selector`).
    pub labels: BTreeMap<String, String>,
    /// The checking pod, whose traffic is captured, and its node.
    pub namespace: String,
    pub pod: String,
    pub node: String,
    /// The capture's `maxPackets`: it completes once it has them.
    pub packets: u32,
    /// How long each step may take.
    pub wait: Duration,
    /// Whether to read the file through the aggregated API.
    pub fetch: bool,
}

/// The agents' DaemonSet, in the check's namespace.
const AGENTS: &str = "packet-capture-agent";

/// What the check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// The nodes with a ready agent.
    pub agents: i32,
    pub captured: Captured,
}

/// What the capture got on the pod's node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Captured {
    pub packets: u64,
    pub file: String,
    /// The records of the file read through the aggregated API, when it
    /// was read and is a plain pcap.
    pub fetched: Option<u64>,
}

/// Runs the check; the error says which part failed, with what the status
/// showed.
pub async fn check_install(client: Client, check: &Check) -> anyhow::Result<Checked> {
    let agents = agents_ready(&client, check).await?;
    tracing::info!(nodes = agents, "every node's agent is ready");
    let api: Api<PacketCaptureConfig> = Api::all(client.clone());
    delete(&api, &check.capture, check.wait).await?;
    let captured = capture(&client, &api, check).await;
    let deleted = delete(&api, &check.capture, check.wait).await;
    let captured = captured?;
    deleted?;
    Ok(Checked { agents, captured })
}

/// The number of nodes with an agent, once each runs a ready one of the
/// DaemonSet's current template.
async fn agents_ready(client: &Client, check: &Check) -> anyhow::Result<i32> {
    let api: Api<DaemonSet> = Api::namespaced(client.clone(), &check.namespace);
    let ready = |ds: Option<&DaemonSet>| ds.is_some_and(|ds| not_ready(ds).is_none());
    match tokio::time::timeout(check.wait, await_condition(api.clone(), AGENTS, ready)).await {
        Ok(Ok(ds)) => Ok(ds
            .and_then(|ds| ds.status)
            .map_or(0, |s| s.desired_number_scheduled)),
        Ok(Err(e)) => Err(anyhow!(e).context(format!("watching daemonset/{AGENTS}"))),
        Err(_) => {
            let why = match api.get_opt(AGENTS).await? {
                Some(ds) => not_ready(&ds).unwrap_or_else(|| "ready only now".into()),
                None => format!("there is no daemonset/{AGENTS}"),
            };
            bail!(
                "the agents were not ready within {:?}: {why} \
                 (kubectl rollout status -n {ns} daemonset/{AGENTS}; \
                 kubectl get pods -n {ns} -l app={AGENTS} -o wide)",
                check.wait,
                ns = check.namespace
            )
        }
    }
}

/// What keeps the agents' DaemonSet from being ready everywhere, if
/// anything: a template its controller has not taken up, no node to run
/// on, or nodes without a ready agent of the current template.
fn not_ready(ds: &DaemonSet) -> Option<String> {
    let status = ds.status.clone().unwrap_or_default();
    if status.observed_generation < ds.metadata.generation {
        return Some("its controller has not taken up its latest template yet".into());
    }
    let desired = status.desired_number_scheduled;
    if desired == 0 {
        return Some("no node is to run an agent (agent.nodeSelector, agent.tolerations)".into());
    }
    let ready = status.number_ready;
    let updated = status.updated_number_scheduled.unwrap_or_default();
    let available = status.number_available.unwrap_or_default();
    (ready < desired || updated < desired || available < desired).then(|| {
        format!(
            "of {desired} nodes, {ready} have a ready agent, {updated} one of the current template"
        )
    })
}

/// The capture of the checking pod, until it has ended, then its file.
async fn capture(
    client: &Client,
    api: &Api<PacketCaptureConfig>,
    check: &Check,
) -> anyhow::Result<Captured> {
    // A capture of a pod that is not Running yet fails at once, and the
    // kubelet reports this one's start a moment after it has started.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &check.namespace);
    tokio::time::timeout(
        check.wait,
        await_condition(pods, &check.pod, conditions::is_pod_running()),
    )
    .await
    .map_err(|_| anyhow!("this pod was not Running within {:?}", check.wait))?
    .context("watching this pod")?;
    let mut pcc = PacketCaptureConfig::new(
        &check.capture,
        PacketCaptureConfigSpec {
            pod_selector: Some(PodSelector {
                pods: vec![PodRef {
                    pod_name: check.pod.clone(),
                    namespace: check.namespace.clone(),
                }],
                ..Default::default()
            }),
            max_packets: check.packets,
            duration: duration_secs(check.wait),
            output_format: OutputFormat::Pcap,
            filter: "tcp".into(),
            ..Default::default()
        },
    );
    let mut labels = check.labels.clone();
    labels.insert(MADE_BY.0.into(), MADE_BY.1.into());
    pcc.metadata.labels = Some(labels);
    api.create(&PostParams::default(), &pcc)
        .await
        .map_err(|e| match e {
            kube::Error::Api(status) => anyhow!(
                "the API server refused the capture {}: {}",
                check.capture,
                status.message
            ),
            e => anyhow!(e).context(format!("creating the capture {}", check.capture)),
        })?;
    tracing::info!(
        capture = %check.capture,
        pod = %format!("{}/{}", check.namespace, check.pod),
        node = %check.node,
        "the capture of this pod is admitted"
    );

    // The traffic to capture: this pod's requests to the API server, for as
    // long as the capture runs.
    let traffic = tokio::spawn({
        let client = client.clone();
        async move {
            let mut every = tokio::time::interval(Duration::from_millis(200));
            loop {
                every.tick().await;
                let _ = client.apiserver_version().await;
            }
        }
    });
    let ended = |pcc: Option<&PacketCaptureConfig>| {
        pcc.and_then(PacketCaptureConfig::current_phase)
            .is_some_and(Phase::is_final)
    };
    let waited = tokio::time::timeout(
        check.wait,
        await_condition(api.clone(), &check.capture, ended),
    )
    .await;
    traffic.abort();
    let status = match waited {
        Ok(Ok(Some(pcc))) => pcc.status.unwrap_or_default(),
        Ok(Ok(None)) => bail!("the capture {} was deleted meanwhile", check.capture),
        Ok(Err(e)) => return Err(anyhow!(e).context("watching the capture")),
        Err(_) => {
            let now = api.get_opt(&check.capture).await?;
            let status = now.and_then(|p| p.status).unwrap_or_default();
            bail!(
                "the capture did not end within {:?}: {} (kubectl logs -n {} deployment/packet-capture-controller)",
                check.wait,
                describe(&status),
                check.namespace
            );
        }
    };
    let entry = node_entry(&status, &check.node)?;
    tracing::info!(
        node = %entry.node,
        packets = entry.packets,
        file = %entry.output_file,
        filter = entry.filter_path.as_deref().unwrap_or_default(),
        "captured"
    );
    let fetched = if check.fetch {
        fetch(client, &check.capture, entry, check.wait).await?
    } else {
        None
    };
    Ok(Captured {
        packets: entry.packets,
        file: entry.output_file.clone(),
        fetched,
    })
}

/// The pod's node's entry of a capture that ended, if it completed with
/// packets.
fn node_entry<'a>(
    status: &'a PacketCaptureConfigStatus,
    node: &str,
) -> anyhow::Result<&'a NodeCapture> {
    if status.phase != Some(Phase::Completed) {
        bail!("the capture did not complete: {}", describe(status));
    }
    let entry = status
        .capture_files
        .values()
        .find(|e| e.node == node)
        .ok_or_else(|| {
            anyhow!(
                "the status has no entry for node {node}: {}",
                describe(status)
            )
        })?;
    if entry.status != CaptureState::Completed || entry.packets == 0 {
        bail!("node {node} captured nothing: {}", describe(status));
    }
    Ok(entry)
}

/// The node's file through the aggregated API, as `kubectl pcap fetch`
/// reads it; the records it holds, if it is still a plain pcap. The
/// capture's files are not listed: an agent lists files only to a reader
/// who may list every capture.
async fn fetch(
    client: &Client,
    capture: &str,
    entry: &NodeCapture,
    wait: Duration,
) -> anyhow::Result<Option<u64>> {
    let written = Path::new(&entry.output_file)
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow!("the status names no file: {:?}", entry.output_file))?;
    // A node compresses a file once another capture has ended there.
    for name in [
        written.to_owned(),
        format!("{written}.gz"),
        format!("{written}.zst"),
    ] {
        let path = file_path(capture, &entry.node, &name);
        let bytes = match get_bytes(client, &path, wait).await {
            Err(e) if is_not_found(&e) => continue,
            other => other?,
        };
        if name != written {
            tracing::info!(file = %name, bytes = bytes.len(), "read through the API server (compressed since)");
            return Ok(None);
        }
        let records = pcap_records(&bytes).with_context(|| format!("GET {path}"))?;
        if records != entry.packets {
            bail!(
                "GET {path}: the file holds {records} packets, the status says {}",
                entry.packets
            );
        }
        tracing::info!(file = %name, bytes = bytes.len(), records, "read through the API server");
        return Ok(Some(records));
    }
    bail!(
        "node {}'s agent has no file {written}, nor a compressed copy of it",
        entry.node
    )
}

fn is_not_found(e: &anyhow::Error) -> bool {
    matches!(e.downcast_ref(), Some(kube::Error::Api(s)) if s.code == 404)
}

/// The body of a GET through the API server, which answers 503 until it
/// trusts the controller's certificate (the controller fills in the
/// APIService's caBundle once it runs).
async fn get_bytes(client: &Client, path: &str, wait: Duration) -> anyhow::Result<Vec<u8>> {
    let get = || async {
        let request = http::Request::get(path)
            .header(http::header::ACCEPT, "application/octet-stream")
            .body(Vec::new())
            .map_err(kube::Error::HttpError)?;
        let mut body = client.request_stream(request).await?;
        let mut bytes = Vec::new();
        body.read_to_end(&mut bytes)
            .await
            .map_err(kube::Error::ReadEvents)?;
        Ok::<_, kube::Error>(bytes)
    };
    let unavailable = |e: &kube::Error| matches!(e, kube::Error::Api(s) if s.code == 503);
    let backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(5), u32::MAX);
    tokio::time::timeout(wait, backoff.retry(get, unavailable, |_, _, _| std::future::ready(())))
        .await
        .map_err(|_| {
            anyhow!("GET {path}: the aggregated API was not available within {wait:?} (kubectl get apiservice {API_SERVICE})")
        })?
        .with_context(|| format!("GET {path}"))
}

/// The records of a pcap file, which must be whole.
fn pcap_records(bytes: &[u8]) -> anyhow::Result<u64> {
    let mut reader = pcap_file::pcap::PcapReader::new(bytes).context("not a pcap file")?;
    let mut records = 0;
    while let Some(packet) = reader.next_packet() {
        packet.with_context(|| format!("record {} is not whole", records + 1))?;
        records += 1;
    }
    Ok(records)
}

/// The label the check's captures carry: a capture of that name without it
/// is someone else's, and never deleted.
const MADE_BY: (&str, &str) = (
    "app.kubernetes.io/managed-by",
    "packet-capture-check-install",
);

fn made_by_the_check(pcc: &PacketCaptureConfig) -> bool {
    pcc.labels().get(MADE_BY.0).map(String::as_str) == Some(MADE_BY.1)
}

/// Deletes the check's capture, if there is one, and waits until it is gone
/// (the controller has stopped it on the agents).
async fn delete(api: &Api<PacketCaptureConfig>, name: &str, wait: Duration) -> anyhow::Result<()> {
    let Some(pcc) = api.get_opt(name).await? else {
        return Ok(());
    };
    if !made_by_the_check(&pcc) {
        bail!(
            "a capture named {name} is there that this check did not make (it has no label {}={}): \
             it is left alone; delete or rename it, or name the check's capture otherwise (--capture)",
            MADE_BY.0,
            MADE_BY.1
        );
    }
    // That one, not another made under its name meanwhile.
    let only_that_one = DeleteParams {
        preconditions: Some(Preconditions {
            uid: pcc.uid(),
            resource_version: None,
        }),
        ..Default::default()
    };
    match api.delete(name, &only_that_one).await {
        Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
        other => other.map(drop)?,
    }
    if !gone_within(api, name, &pcc.uid().unwrap_or_default(), wait).await {
        bail!(
            "the capture {name} is still there {wait:?} after its deletion: the controller did not finish it"
        );
    }
    Ok(())
}

/// The capture's duration, in seconds: half the wait for its end, which
/// leaves the controller time to report it however few packets came.
fn duration_secs(wait: Duration) -> u32 {
    u32::try_from(wait.as_secs() / 2).unwrap_or(u32::MAX).max(1)
}

/// The status in a line: the phase, its message, and each node's part.
fn describe(status: &PacketCaptureConfigStatus) -> String {
    let phase = status
        .phase
        .map_or_else(|| "no phase yet".to_string(), |p| format!("{p:?}"));
    let mut line = match &status.message {
        Some(message) => format!("{phase}: {message}"),
        None => phase,
    };
    for entry in status.capture_files.values() {
        line.push_str(&format!(
            "; node {} {}, {} packets",
            entry.node,
            entry.status.as_str(),
            entry.packets
        ));
        if let Some(message) = &entry.message {
            line.push_str(&format!(" ({message})"));
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(node: &str, status: CaptureState, packets: u64) -> NodeCapture {
        NodeCapture {
            status,
            output_file: format!("/var/lib/packet-capture/t-{node}.pcap"),
            file_size: 24,
            node: node.into(),
            packets,
            dropped: 0,
            filtered: 0,
            filter_path: None,
            message: None,
            pods: Vec::new(),
        }
    }

    fn status(phase: Phase, entries: Vec<NodeCapture>) -> PacketCaptureConfigStatus {
        PacketCaptureConfigStatus {
            phase: Some(phase),
            capture_files: entries
                .into_iter()
                .enumerate()
                .map(|(i, e)| (format!("10.0.0.{i}"), e))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn only_a_completed_capture_with_packets_on_the_node_passes() {
        let done = status(
            Phase::Completed,
            vec![entry("a", CaptureState::Completed, 10)],
        );
        assert_eq!(node_entry(&done, "a").unwrap().packets, 10);
        let other = node_entry(&done, "b").unwrap_err().to_string();
        assert!(other.contains("no entry for node b"), "{other}");
        let mut failed = status(Phase::Failed, vec![entry("a", CaptureState::Failed, 0)]);
        failed.message = Some("1 of 1 nodes failed".into());
        failed.capture_files.get_mut("10.0.0.0").unwrap().message =
            Some("the agent did not answer".into());
        let failed = node_entry(&failed, "a").unwrap_err().to_string();
        assert_eq!(
            failed,
            "the capture did not complete: Failed: 1 of 1 nodes failed; \
             node a failed, 0 packets (the agent did not answer)"
        );
        let empty = status(
            Phase::Completed,
            vec![entry("a", CaptureState::Completed, 0)],
        );
        let empty = node_entry(&empty, "a").unwrap_err().to_string();
        assert!(empty.starts_with("node a captured nothing"), "{empty}");
    }

    #[test]
    fn the_agents_are_ready_once_every_node_runs_a_ready_current_one() {
        use k8s_openapi::api::apps::v1::DaemonSetStatus;
        let daemonset = |generation, observed, desired, ready, updated| DaemonSet {
            metadata: kube::api::ObjectMeta {
                generation: Some(generation),
                ..Default::default()
            },
            status: Some(DaemonSetStatus {
                observed_generation: Some(observed),
                desired_number_scheduled: desired,
                number_ready: ready,
                number_available: Some(ready),
                updated_number_scheduled: Some(updated),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(not_ready(&daemonset(2, 2, 3, 3, 3)), None);
        assert_eq!(
            not_ready(&daemonset(2, 2, 3, 2, 3)).unwrap(),
            "of 3 nodes, 2 have a ready agent, 3 one of the current template"
        );
        // A rollout: ready everywhere, but one node still runs the old one.
        assert!(not_ready(&daemonset(2, 2, 3, 3, 2)).is_some());
        let stale = not_ready(&daemonset(3, 2, 3, 3, 3)).unwrap();
        assert!(stale.contains("not taken up"), "{stale}");
        let none = not_ready(&daemonset(1, 1, 0, 0, 0)).unwrap();
        assert!(none.contains("no node"), "{none}");
        assert!(not_ready(&DaemonSet::default()).is_some());
    }

    #[test]
    fn a_pcap_is_counted_and_a_cut_one_refused() {
        use pcap_file::pcap::{PcapHeader, PcapPacket, PcapWriter};
        let mut writer = PcapWriter::with_header(Vec::new(), PcapHeader::default()).unwrap();
        for i in 0..3u8 {
            let data = [i; 60];
            writer
                .write_packet(&PcapPacket::new(Duration::from_secs(i.into()), 60, &data).unwrap())
                .unwrap();
        }
        let file = writer.into_inner();
        assert_eq!(pcap_records(&file).unwrap(), 3);
        let cut = pcap_records(&file[..file.len() - 1]).unwrap_err();
        assert!(
            format!("{cut:#}").contains("record 3 is not whole"),
            "{cut:#}"
        );
        let text = pcap_records(b"not a capture file at all").unwrap_err();
        assert!(
            format!("{text:#}").starts_with("not a pcap file"),
            "{text:#}"
        );
    }

    #[test]
    fn a_404_is_told_apart_through_the_context() {
        let api = |code| {
            let status = kube::core::Status::failure("no", "NotFound").with_code(code);
            anyhow::Error::from(kube::Error::Api(status.boxed())).context("GET /x")
        };
        assert!(is_not_found(&api(404)));
        assert!(!is_not_found(&api(403)));
        assert!(!is_not_found(&anyhow!("GET /x: not available")));
    }

    #[test]
    fn only_the_checks_own_capture_is_its_to_delete() {
        let mut pcc = PacketCaptureConfig::new("packet-capture-test", Default::default());
        assert!(!made_by_the_check(&pcc));
        pcc.metadata.labels = Some(BTreeMap::from([(MADE_BY.0.into(), "Helm".into())]));
        assert!(!made_by_the_check(&pcc));
        pcc.metadata.labels = Some(BTreeMap::from([(MADE_BY.0.into(), MADE_BY.1.into())]));
        assert!(made_by_the_check(&pcc));
    }

    #[test]
    fn the_capture_ends_within_the_wait() {
        assert_eq!(duration_secs(Duration::from_secs(120)), 60);
        assert_eq!(duration_secs(Duration::from_millis(10)), 1);
        assert_eq!(duration_secs(Duration::from_secs(u64::MAX)), u32::MAX);
    }
}
