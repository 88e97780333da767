//! The ConfigMaps that record a capture's results once it has ended:
//! `packet-capture-results-<name>` in the controller's namespace, owned by
//! the `PacketCaptureConfig` (so they go when the capture goes), with every
//! node's entry; entries that do not fit in [`SHARD_BYTES`] go on in
//! `packet-capture-results--2-<name>`, `--3-<name>`, ... (see
//! [`shard_name`]).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{ObjectMeta, Patch, PatchParams};
use kube::{Api, Client, Resource, ResourceExt};
use packet_capture_common::crd::{NodeCapture, PacketCaptureConfig, PacketCaptureConfigStatus};

use crate::consts::{CAPTURE_LABEL, FIELD_MANAGER, MANAGED_BY_LABEL, RESULTS_PREFIX};
use crate::error::{Error, Result};

/// The most a results ConfigMap's data holds (keys and values): the API
/// server refuses a ConfigMap over 1 MiB, and an entry's size varies too
/// much (up to 16 pod names, the agent's message) to count nodes instead.
pub const SHARD_BYTES: usize = 900 * 1024;

/// The first line of `files`.
const FILES_HEADER: &str = "# nodeIP node status packets dropped file_size output_file\n";

/// A node's line in `files`.
fn file_line(ip: &str, n: &NodeCapture) -> String {
    format!(
        "{ip} {} {} {} {} {} {}\n",
        n.node, n.status, n.packets, n.dropped, n.file_size, n.output_file
    )
}

/// The keys every ConfigMap has besides the first one's, with room for
/// their values but the entries.
fn shard_overhead() -> usize {
    "captureFiles.json".len()
        + "{}".len()
        + "files".len()
        + FILES_HEADER.len()
        + "shard".len()
        + "99999 of 99999".len()
        + "generation".len()
        + i64::MIN.to_string().len()
}

/// The entries in shards whose data stays under [`SHARD_BYTES`], the first
/// with room for `first` bytes (the capture's own keys). Each entry costs
/// what it adds: its JSON (as a map of one, a little more than inside the
/// whole) and its line.
fn shards(
    nodes: &BTreeMap<String, NodeCapture>,
    first: usize,
) -> Result<Vec<Vec<(&String, &NodeCapture)>>> {
    let mut out = vec![Vec::new()];
    let mut used = first + shard_overhead();
    for (ip, n) in nodes {
        let size = json("captureFiles", &BTreeMap::from([(ip, n)]))?.len() + file_line(ip, n).len();
        let current = out.last_mut().expect("there is always a shard");
        if used + size > SHARD_BYTES && !current.is_empty() {
            out.push(Vec::new());
            used = shard_overhead();
        }
        out.last_mut()
            .expect("there is always a shard")
            .push((ip, n));
        used += size;
    }
    Ok(out)
}

/// The longest name of an object (a DNS subdomain).
const MAX_NAME: usize = 253;

/// The results ConfigMap's name.
pub fn config_map_name(capture: &str) -> String {
    shard_name(capture, 1)
}

/// The name of the `shard`th results ConfigMap (1: the first), one no other
/// capture's results can have, at most [`MAX_NAME`] characters.
///
/// The first is `packet-capture-results-<capture>`. The others are
/// `packet-capture-results--<shard>-<capture>`: a capture's name starts
/// with a letter or digit, so no first ConfigMap's name has a `-` after the
/// prefix, and the shard's number ends at the next `-`. A capture whose
/// name is too long for that (a name may have 253 characters) has in its
/// place the name cut and 16 hex digits of the name's SHA-256 after it,
/// [`MAX_NAME`] characters in all, the first ConfigMap too (`--1-`): an
/// uncut name is always shorter, so neither is taken for the other. The
/// digits keep the name valid however the cut ends (`-` or `.`).
fn shard_name(capture: &str, shard: usize) -> String {
    use sha2::{Digest as _, Sha256};

    let whole = format!("{RESULTS_PREFIX}{capture}");
    if shard == 1 && whole.len() <= MAX_NAME {
        return whole;
    }
    let head = format!("{RESULTS_PREFIX}-{shard}-");
    let room = MAX_NAME - head.len();
    if capture.len() < room {
        return head + capture;
    }
    let digest = Sha256::digest(capture.as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    // Names are ASCII: any byte is a character boundary.
    format!("{head}{}{hex}", &capture[..room - hex.len()])
}

fn json<T: serde::Serialize>(what: &'static str, v: &T) -> Result<String> {
    serde_json::to_string_pretty(v).map_err(|source| Error::Json { what, source })
}

fn rfc3339(t: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>) -> String {
    t.map(|t| t.0.to_string()).unwrap_or_default()
}

/// The ConfigMaps for a capture that ended with `status`, whose nodes'
/// entries are `nodes` (all of them: the status may list fewer).
pub fn config_maps(
    pcc: &PacketCaptureConfig,
    status: &PacketCaptureConfigStatus,
    nodes: &BTreeMap<String, NodeCapture>,
    namespace: &str,
) -> Result<Vec<ConfigMap>> {
    let name = pcc.name_any();
    let owner = pcc.controller_owner_ref(&()).ok_or(Error::MissingField {
        kind: "PacketCaptureConfig",
        field: "metadata.uid",
    })?;
    let generation = pcc.metadata.generation.unwrap_or_default().to_string();
    // The capture's own keys, in the first ConfigMap only.
    let mut head = BTreeMap::new();
    head.insert("name".to_string(), name.clone());
    head.insert("uid".into(), pcc.uid().unwrap_or_default());
    head.insert(
        "phase".into(),
        status.phase.map(|p| format!("{p:?}")).unwrap_or_default(),
    );
    head.insert("message".into(), status.message.clone().unwrap_or_default());
    head.insert("startTime".into(), rfc3339(status.start_time.as_ref()));
    head.insert(
        "completionTime".into(),
        rfc3339(status.completion_time.as_ref()),
    );
    head.insert("nodes".into(), status.nodes.unwrap_or_default().to_string());
    head.insert(
        "packets".into(),
        status.packets.unwrap_or_default().to_string(),
    );
    head.insert(
        "dropped".into(),
        status.dropped.unwrap_or_default().to_string(),
    );
    head.insert("spec.json".into(), json("spec", &pcc.spec)?);
    let head_size = head.iter().map(|(k, v)| k.len() + v.len()).sum();
    let shards = shards(nodes, head_size)?;
    let mut out = Vec::new();
    for (i, shard) in shards.iter().enumerate() {
        let mut data = if i == 0 {
            std::mem::take(&mut head)
        } else {
            BTreeMap::new()
        };
        data.insert("shard".into(), format!("{} of {}", i + 1, shards.len()));
        // In every shard: a later generation cut into fewer shards leaves
        // the earlier one's last shards (no rights to delete them), which
        // this tells apart.
        data.insert("generation".into(), generation.clone());
        let part: BTreeMap<&String, &NodeCapture> = shard.iter().copied().collect();
        data.insert("captureFiles.json".into(), json("captureFiles", &part)?);
        // One line per node, for people and shell scripts.
        let mut files = String::from(FILES_HEADER);
        for (ip, n) in shard {
            files.push_str(&file_line(ip, n));
        }
        data.insert("files".into(), files);
        out.push(ConfigMap {
            metadata: ObjectMeta {
                name: Some(shard_name(&name, i + 1)),
                namespace: Some(namespace.into()),
                labels: Some(BTreeMap::from([
                    (MANAGED_BY_LABEL.to_string(), FIELD_MANAGER.to_string()),
                    (CAPTURE_LABEL.to_string(), label_value(&name)),
                ])),
                owner_references: Some(vec![owner.clone()]),
                ..Default::default()
            },
            data: Some(data),
            ..Default::default()
        });
    }
    Ok(out)
}

/// A label value (at most 63 characters, alphanumeric at both ends).
fn label_value(s: &str) -> String {
    let mut v: String = s.chars().take(63).collect();
    while v.ends_with(|c: char| !c.is_ascii_alphanumeric()) {
        v.pop();
    }
    v
}

/// Writes (server-side apply) the results ConfigMaps.
pub async fn publish(
    client: &Client,
    pcc: &PacketCaptureConfig,
    status: &PacketCaptureConfigStatus,
    nodes: &BTreeMap<String, NodeCapture>,
    namespace: &str,
) -> Result<()> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    for mut cm in config_maps(pcc, status, nodes, namespace)? {
        cm.meta_mut().managed_fields = None;
        let name = cm.name_any();
        let body = serde_json::json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": cm.metadata,
            "data": cm.data,
        });
        api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(body),
        )
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use packet_capture_common::crd::{CaptureState, PacketCaptureConfigSpec, Phase};

    /// A DNS subdomain, as the API server checks an object's name.
    fn valid_name(name: &str) -> bool {
        let label = |l: &str| {
            l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && l.starts_with(|c: char| c.is_ascii_alphanumeric())
                && l.ends_with(|c: char| c.is_ascii_alphanumeric())
        };
        name.len() <= MAX_NAME && name.split('.').all(label)
    }

    #[test]
    fn names_fit() {
        assert_eq!(config_map_name("web"), "packet-capture-results-web");
        assert_eq!(shard_name("web", 2), "packet-capture-results--2-web");
        assert_eq!(config_map_name(&"a".repeat(253)).len(), 253);
        assert_eq!(label_value(&format!("{}-x", "b".repeat(62))).len(), 62);
    }

    /// No two captures' results share a ConfigMap: not a capture named
    /// like another's shard, not two long names alike but for their ends;
    /// and every name is one the API server takes.
    #[test]
    fn no_two_captures_results_share_a_name() {
        let mut captures = vec![
            "web".to_string(),
            "web-2".into(),
            "web--2".into(),
            "2-web".into(),
            "1-web".into(),
        ];
        captures.extend((220..=253).map(|n| "z".repeat(n)));
        // Long names alike but for their ends, cut at a `-`, a `.` or
        // between letters.
        for shift in 0..5 {
            for end in ["x", "y", "x-1", "x.1"] {
                captures.push(format!("{}{}{end}", "x".repeat(shift), "a.b-c".repeat(49)));
            }
        }
        let mut seen = std::collections::HashMap::new();
        for capture in &captures {
            assert!(valid_name(capture), "{capture}");
            for shard in 1..=12 {
                let name = shard_name(capture, shard);
                assert!(valid_name(&name), "{capture} {shard}: {name}");
                if let Some(other) = seen.insert(name.clone(), (capture, shard)) {
                    panic!("{name}: {capture} {shard} and {other:?}");
                }
            }
        }
    }

    #[test]
    fn results_carry_the_spec_files_counts_and_owner() {
        let mut pcc = PacketCaptureConfig::new(
            "web",
            PacketCaptureConfigSpec {
                target_ips: vec!["10.0.0.1".into()],
                ..Default::default()
            },
        );
        pcc.metadata.uid = Some("u-1".into());
        pcc.metadata.generation = Some(2);
        let status = PacketCaptureConfigStatus {
            phase: Some(Phase::Completed),
            packets: Some(7),
            capture_files: BTreeMap::from([(
                "192.168.0.1".to_string(),
                NodeCapture {
                    status: CaptureState::Completed,
                    output_file: "/var/lib/packet-captures/web-1.pcap".into(),
                    file_size: 512,
                    node: "n1".into(),
                    packets: 7,
                    dropped: 0,
                    filtered: 0,
                    filter_path: None,
                    message: None,
                    pods: Vec::new(),
                },
            )]),
            ..Default::default()
        };
        let cms = config_maps(&pcc, &status, &status.capture_files, "kube-system").unwrap();
        assert_eq!(cms.len(), 1);
        let cm = cms.into_iter().next().unwrap();
        assert_eq!(
            cm.metadata.name.as_deref(),
            Some("packet-capture-results-web")
        );
        assert_eq!(cm.metadata.namespace.as_deref(), Some("kube-system"));
        let owner = &cm.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("PacketCaptureConfig", "u-1")
        );
        let data = cm.data.unwrap();
        assert_eq!(data["phase"], "Completed");
        assert_eq!(data["packets"], "7");
        assert_eq!(data["generation"], "2");
        assert!(data["spec.json"].contains("\"10.0.0.1\""));
        assert!(data["captureFiles.json"].contains("web-1.pcap"));
        assert!(
            data["files"]
                .contains("192.168.0.1 n1 completed 7 0 512 /var/lib/packet-captures/web-1.pcap")
        );
        assert_eq!(data["shard"], "1 of 1");
    }

    #[test]
    fn thousands_of_nodes_are_sharded_and_each_part_fits() {
        let mut pcc = PacketCaptureConfig::new("wide", PacketCaptureConfigSpec::default());
        pcc.metadata.uid = Some("u-2".into());
        let nodes: BTreeMap<String, NodeCapture> = (0..2500)
            .map(|i| {
                let entry = NodeCapture {
                    status: CaptureState::Completed,
                    output_file: format!(
                        "/var/lib/packet-captures/wide-20261201-120000-{i}.pcap.gz"
                    ),
                    file_size: 1 << 30,
                    node: format!("node-with-a-long-name-{i:05}.eu-west-1.compute.internal"),
                    packets: 10_000_000,
                    dropped: 0,
                    filtered: 1_000_000,
                    filter_path: Some("kernel".into()),
                    message: Some("duration of 60s elapsed".into()),
                    pods: vec!["a-namespace/a-pod-name-0123456789".into(); 3],
                };
                (
                    format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256),
                    entry,
                )
            })
            .collect();
        let status = PacketCaptureConfigStatus {
            nodes: Some(2500),
            ..Default::default()
        };
        let cms = config_maps(&pcc, &status, &nodes, "ns").unwrap();
        let names: Vec<_> = cms
            .iter()
            .map(|c| c.metadata.name.clone().unwrap())
            .collect();
        assert!(names.len() > 1, "{names:?}");
        let suffixed = (2..=names.len()).map(|i| format!("packet-capture-results--{i}-wide"));
        let want: Vec<String> = std::iter::once("packet-capture-results-wide".to_string())
            .chain(suffixed)
            .collect();
        assert_eq!(names, want);
        let mut listed = 0;
        for cm in &cms {
            let data = cm.data.as_ref().unwrap();
            let size: usize = data.iter().map(|(k, v)| k.len() + v.len()).sum();
            assert!(size < 900 * 1024, "{:?}: {size} bytes", cm.metadata.name);
            listed += data["files"].lines().count() - 1;
        }
        assert_eq!(listed, 2500, "every node, once");
        let last = cms.last().unwrap().data.as_ref().unwrap();
        assert_eq!(last["shard"], format!("{0} of {0}", cms.len()));
    }

    #[test]
    fn shards_are_cut_by_size_so_entries_with_many_pods_fit() {
        let mut pcc = PacketCaptureConfig::new("pods", PacketCaptureConfigSpec::default());
        pcc.metadata.uid = Some("u-3".into());
        pcc.metadata.generation = Some(7);
        // 1,000 nodes, each with 16 pods of 40-character names and a
        // message: about 1.4 MB in all, more than one ConfigMap may hold.
        let nodes: BTreeMap<String, NodeCapture> = (0..1000)
            .map(|i| {
                let entry = NodeCapture {
                    status: CaptureState::Failed,
                    output_file: format!("/var/lib/packet-captures/pods-20261201-120000-{i}.pcap"),
                    file_size: 1 << 20,
                    node: format!("node-{i:05}.eu-west-1.compute.internal"),
                    packets: 10_000,
                    dropped: 0,
                    filtered: 0,
                    filter_path: None,
                    message: Some(format!(
                        "lost contact with the agent on node node-{i:05} (https://10.0.{}.{}:8080): connection refused",
                        i / 256,
                        i % 256
                    )),
                    pods: (0..16)
                        .map(|j| format!("namespace-{i:04}/a-pod-with-a-name-{j:02}-0000"))
                        .collect(),
                };
                assert_eq!(entry.pods[0].len(), 40);
                (format!("10.0.{}.{}", i / 256, i % 256), entry)
            })
            .collect();
        let status = PacketCaptureConfigStatus {
            nodes: Some(1000),
            ..Default::default()
        };
        let cms = config_maps(&pcc, &status, &nodes, "ns").unwrap();
        assert!(cms.len() > 1, "one ConfigMap cannot hold them");
        let mut seen = BTreeMap::new();
        for (i, cm) in cms.iter().enumerate() {
            let data = cm.data.as_ref().unwrap();
            let size: usize = data.iter().map(|(k, v)| k.len() + v.len()).sum();
            assert!(size < 900 * 1024, "{:?}: {size} bytes", cm.metadata.name);
            assert_eq!(data["shard"], format!("{} of {}", i + 1, cms.len()));
            assert_eq!(data["generation"], "7", "every shard says its generation");
            let part: BTreeMap<String, NodeCapture> =
                serde_json::from_str(&data["captureFiles.json"]).unwrap();
            assert_eq!(part.len(), data["files"].lines().count() - 1);
            seen.extend(part);
        }
        assert_eq!(seen, nodes, "every node, once");
        assert!(cms[0].data.as_ref().unwrap().contains_key("spec.json"));
    }
}
