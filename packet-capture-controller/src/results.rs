//! The ConfigMap that records a capture's results once it has ended:
//! `packet-capture-results-<name>` in the controller's namespace, owned by
//! the `PacketCaptureConfig` (so it goes when the capture goes).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{ObjectMeta, Patch, PatchParams};
use kube::{Api, Client, Resource, ResourceExt};
use packet_capture_common::crd::{PacketCaptureConfig, PacketCaptureConfigStatus};

use crate::consts::{CAPTURE_LABEL, FIELD_MANAGER, MANAGED_BY_LABEL, RESULTS_PREFIX};
use crate::error::{Error, Result};

/// The results ConfigMap's name (at most 253 characters).
pub fn config_map_name(capture: &str) -> String {
    let mut name = format!("{RESULTS_PREFIX}{capture}");
    name.truncate(253);
    while name.ends_with(['-', '.']) {
        name.pop();
    }
    name
}

fn json<T: serde::Serialize>(what: &'static str, v: &T) -> Result<String> {
    serde_json::to_string_pretty(v).map_err(|source| Error::Json { what, source })
}

fn rfc3339(t: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>) -> String {
    t.map(|t| t.0.to_string()).unwrap_or_default()
}

/// The ConfigMap for a capture that ended with `status`.
pub fn config_map(
    pcc: &PacketCaptureConfig,
    status: &PacketCaptureConfigStatus,
    namespace: &str,
) -> Result<ConfigMap> {
    let name = pcc.name_any();
    let mut data = BTreeMap::new();
    data.insert("name".into(), name.clone());
    data.insert("uid".into(), pcc.uid().unwrap_or_default());
    data.insert(
        "generation".into(),
        pcc.metadata.generation.unwrap_or_default().to_string(),
    );
    data.insert(
        "phase".into(),
        status.phase.map(|p| format!("{p:?}")).unwrap_or_default(),
    );
    data.insert("message".into(), status.message.clone().unwrap_or_default());
    data.insert("startTime".into(), rfc3339(status.start_time.as_ref()));
    data.insert(
        "completionTime".into(),
        rfc3339(status.completion_time.as_ref()),
    );
    data.insert("nodes".into(), status.nodes.unwrap_or_default().to_string());
    data.insert(
        "packets".into(),
        status.packets.unwrap_or_default().to_string(),
    );
    data.insert(
        "dropped".into(),
        status.dropped.unwrap_or_default().to_string(),
    );
    data.insert("spec.json".into(), json("spec", &pcc.spec)?);
    data.insert(
        "captureFiles.json".into(),
        json("captureFiles", &status.capture_files)?,
    );
    // One line per node, for people and shell scripts.
    let mut files = String::from("# nodeIP node status packets dropped file_size output_file\n");
    for (ip, n) in &status.capture_files {
        files.push_str(&format!(
            "{ip} {} {} {} {} {} {}\n",
            n.node, n.status, n.packets, n.dropped, n.file_size, n.output_file
        ));
    }
    data.insert("files".into(), files);

    let owner = pcc.controller_owner_ref(&()).ok_or(Error::MissingField {
        kind: "PacketCaptureConfig",
        field: "metadata.uid",
    })?;
    Ok(ConfigMap {
        metadata: ObjectMeta {
            name: Some(config_map_name(&name)),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([
                (MANAGED_BY_LABEL.to_string(), FIELD_MANAGER.to_string()),
                (CAPTURE_LABEL.to_string(), label_value(&name)),
            ])),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        data: Some(data),
        ..Default::default()
    })
}

/// A label value (at most 63 characters, alphanumeric at both ends).
fn label_value(s: &str) -> String {
    let mut v: String = s.chars().take(63).collect();
    while v.ends_with(|c: char| !c.is_ascii_alphanumeric()) {
        v.pop();
    }
    v
}

/// Writes (server-side apply) the results ConfigMap.
pub async fn publish(
    client: &Client,
    pcc: &PacketCaptureConfig,
    status: &PacketCaptureConfigStatus,
    namespace: &str,
) -> Result<()> {
    let mut cm = config_map(pcc, status, namespace)?;
    cm.meta_mut().managed_fields = None;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use packet_capture_common::crd::{CaptureState, NodeCapture, PacketCaptureConfigSpec, Phase};

    #[test]
    fn names_fit() {
        assert_eq!(config_map_name("web"), "packet-capture-results-web");
        assert_eq!(config_map_name(&"a".repeat(253)).len(), 253);
        assert_eq!(label_value(&format!("{}-x", "b".repeat(62))).len(), 62);
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
                    message: None,
                    pods: Vec::new(),
                },
            )]),
            ..Default::default()
        };
        let cm = config_map(&pcc, &status, "kube-system").unwrap();
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
    }
}
