//! The one translation between the transports and the engine: REST bodies
//! and gRPC messages become an [`Unchecked`] request, validated once into
//! the engine's [`StartRequest`]; engine statuses become JSON or protobuf.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use packet_capture_common::abi::MAX_SNAPLEN;
use packet_capture_common::crd::{
    CaptureState, DEFAULT_DURATION, DEFAULT_MAX_PACKETS, MAX_NODE_TARGETS, OutputFormat,
    TargetDirection,
};
use packet_capture_common::validate::{FieldError, ValidationErrors, Validator};
use packet_capture_proto::v1 as pb;
use serde::{Deserialize, Serialize};

use crate::capture::{CaptureSpec, CaptureStatus, StartRequest, TargetPod};
use crate::files::FileEntry;

/// Longest capture id or name: they end up in file names, and the CRD
/// allows names this long.
pub const MAX_ID_LEN: usize = packet_capture_common::crd::MAX_NAME_LEN;

/// A start request as a caller sent it: the body of `POST /api/v1/captures`
/// with the CRD's field names and defaults, or a `StartCaptureRequest`.
/// Numbers are wide so that a negative or huge value gets a message naming
/// its field rather than a parse error.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Unchecked {
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, rename = "targetIPs")]
    pub target_ips: Vec<String>,
    #[serde(default)]
    pub target_ports: Vec<i64>,
    #[serde(default = "default_duration")]
    pub duration: i64,
    #[serde(default = "default_max_packets")]
    pub max_packets: i64,
    #[serde(default)]
    pub output_format: OutputFormat,
    #[serde(default)]
    pub filter: String,
    #[serde(default)]
    pub snaplen: Option<i64>,
    #[serde(default)]
    pub direction: TargetDirection,
    #[serde(default)]
    pub keep_copies: bool,
    #[serde(default)]
    pub only_targets: bool,
    #[serde(default)]
    pub pods: Vec<UncheckedPod>,
}

/// A target pod as a caller sent it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UncheckedPod {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub ips: Vec<String>,
}

impl From<pb::TargetPod> for UncheckedPod {
    fn from(p: pb::TargetPod) -> Self {
        Self {
            namespace: p.namespace,
            name: p.name,
            ips: p.ips,
        }
    }
}

impl From<&TargetPod> for pb::TargetPod {
    fn from(p: &TargetPod) -> Self {
        let (namespace, name) = p.name.split_once('/').unwrap_or(("", &p.name));
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            ips: p.ips.iter().map(ToString::to_string).collect(),
        }
    }
}

/// Checks target pods: names of at most 253 characters, addresses that
/// parse.
fn target_pods(v: &mut Validator, pods: &[UncheckedPod]) -> Vec<TargetPod> {
    if pods.len() > MAX_TARGET_PODS {
        v.error(
            "pods",
            format!(
                "{} entries, at most {MAX_TARGET_PODS} are allowed",
                pods.len()
            ),
        );
    }
    let mut out = Vec::new();
    for (i, p) in pods.iter().enumerate() {
        for (field, value) in [("namespace", &p.namespace), ("name", &p.name)] {
            if value.is_empty() || value.len() > 253 {
                v.error(
                    format_args!("pods[{i}].{field}"),
                    "must have 1 to 253 characters",
                );
            }
        }
        let mut ips = Vec::new();
        for (j, ip) in p.ips.iter().enumerate() {
            match ip.parse() {
                Ok(ip) => ips.push(ip),
                Err(_) => v.error(
                    format_args!("pods[{i}].ips[{j}]"),
                    format!("{ip:?} is not an IP address"),
                ),
            }
        }
        out.push(TargetPod {
            name: format!("{}/{}", p.namespace, p.name),
            ips,
        });
    }
    out
}

/// Most target pods one request may name.
const MAX_TARGET_PODS: usize = 4096;

fn default_duration() -> i64 {
    DEFAULT_DURATION.into()
}

fn default_max_packets() -> i64 {
    DEFAULT_MAX_PACKETS.into()
}

/// Checks a capture id or name: it becomes part of file names, so only
/// lowercase letters, digits, '.', '-' and '_', not starting with '.'.
fn safe_name(v: &mut Validator, field: &str, value: &str) {
    let problem = if value.is_empty() {
        Some("must not be empty".to_owned())
    } else if value.len() > MAX_ID_LEN {
        Some(format!("longer than {MAX_ID_LEN} characters"))
    } else if value.starts_with('.') {
        Some(format!("{value:?} must not start with '.'"))
    } else if !value
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_'))
    {
        Some(format!(
            "{value:?} may only contain lowercase letters, digits, '.', '-' and '_'"
        ))
    } else {
        None
    };
    if let Some(p) = problem {
        v.error(field, p);
    }
}

/// A count the CRD holds in 32 bits: at least 1, at most `u32::MAX`.
fn count(v: &mut Validator, field: &str, value: i64) -> u32 {
    v.at_least_one(field, value);
    match u32::try_from(value) {
        Ok(n) => n,
        Err(_) if value > 0 => {
            v.error(field, format!("must be at most {}, got {value}", u32::MAX));
            0
        }
        Err(_) => 0,
    }
}

impl Unchecked {
    /// Every check the API makes before the engine sees the request (the
    /// engine then compiles the filter).
    pub fn validate(self) -> Result<StartRequest, ValidationErrors> {
        let mut v = Validator::new("");
        safe_name(&mut v, "id", &self.id);
        let name = match self.name {
            Some(n) if !n.is_empty() => {
                safe_name(&mut v, "name", &n);
                n
            }
            _ => self.id.clone(),
        };
        let targets = v.target_ips(&self.target_ips, MAX_NODE_TARGETS);
        let pods = target_pods(&mut v, &self.pods);
        v.target_ports(&self.target_ports);
        let duration = count(&mut v, "duration", self.duration);
        let max_packets = count(&mut v, "maxPackets", self.max_packets);
        v.filter(&self.filter);
        v.snaplen(self.snaplen);
        if self.direction != TargetDirection::Both && targets.is_empty() && !self.only_targets {
            v.error(
                "direction",
                format!(
                    "{} is relative to targetIPs, and there are none",
                    self.direction.as_str()
                ),
            );
        }
        v.finish()?;
        Ok(StartRequest {
            id: self.id,
            name,
            spec: CaptureSpec {
                targets,
                only_targets: self.only_targets,
                pods,
                ports: self
                    .target_ports
                    .iter()
                    .filter_map(|&p| u16::try_from(p).ok())
                    .collect(),
                duration: Duration::from_secs(duration.into()),
                max_packets: max_packets.into(),
                format: self.output_format,
                filter: self.filter,
                snaplen: self
                    .snaplen
                    .and_then(|s| u32::try_from(s).ok())
                    .unwrap_or(MAX_SNAPLEN),
                direction: self.direction,
                keep_copies: self.keep_copies,
            },
        })
    }
}

impl TryFrom<pb::StartCaptureRequest> for Unchecked {
    type Error = ValidationErrors;

    fn try_from(req: pb::StartCaptureRequest) -> Result<Self, Self::Error> {
        let Some(spec) = req.spec else {
            return Err(ValidationErrors(vec![FieldError {
                field: "spec".into(),
                message: "is required".into(),
            }]));
        };
        let unknown = |field: &str, e: packet_capture_proto::UnknownValue| {
            ValidationErrors(vec![FieldError {
                field: field.into(),
                message: e.to_string(),
            }])
        };
        let output_format = spec.format().map_err(|e| unknown("outputFormat", e))?;
        let direction = spec
            .target_direction()
            .map_err(|e| unknown("direction", e))?;
        Ok(Self {
            id: req.id,
            name: Some(req.name),
            target_ips: spec.target_ips,
            target_ports: spec.target_ports.into_iter().map(i64::from).collect(),
            duration: spec.duration_seconds.into(),
            max_packets: spec.max_packets.into(),
            output_format,
            filter: spec.filter,
            snaplen: (spec.snaplen != 0).then_some(spec.snaplen.into()),
            direction,
            keep_copies: spec.keep_copies,
            only_targets: spec.only_targets,
            pods: spec.pods.into_iter().map(Into::into).collect(),
        })
    }
}

/// The body of `PUT /api/v1/captures/{id}/targets`, or the targets of a
/// `SetTargetsRequest`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UncheckedTargets {
    #[serde(rename = "targetIPs")]
    pub target_ips: Vec<String>,
    #[serde(default)]
    pub pods: Vec<UncheckedPod>,
}

impl UncheckedTargets {
    pub fn validate(&self) -> Result<(Vec<IpNet>, Vec<TargetPod>), ValidationErrors> {
        let mut v = Validator::new("");
        let targets = v.target_ips(&self.target_ips, MAX_NODE_TARGETS);
        let pods = target_pods(&mut v, &self.pods);
        v.finish()?;
        Ok((targets, pods))
    }
}

/// A target as a user writes it: a bare address for a host, else a CIDR.
fn target_string(net: &IpNet) -> String {
    if net.prefix_len() == net.max_prefix_len() {
        net.addr().to_string()
    } else {
        net.to_string()
    }
}

fn rfc3339(t: SystemTime) -> String {
    let ns = t
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
        .min(u128::from(u64::MAX)) as u64;
    let mut s = String::with_capacity(32);
    // Writing to a String cannot fail.
    let _ = crate::writer::write_rfc3339(&mut s, ns);
    s
}

/// A capture's spec in the request's vocabulary.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SpecJson {
    #[serde(rename = "targetIPs")]
    pub target_ips: Vec<String>,
    pub target_ports: Vec<u16>,
    pub duration: u64,
    pub max_packets: u64,
    pub output_format: OutputFormat,
    pub filter: String,
    pub snaplen: u32,
    pub direction: TargetDirection,
    pub keep_copies: bool,
    pub only_targets: bool,
    pub pods: Vec<UncheckedPod>,
}

/// A capture as the REST API returns it.
#[derive(Debug, Clone, Serialize)]
pub struct CaptureJson {
    pub id: String,
    pub name: String,
    pub status: CaptureState,
    pub packets: u64,
    pub dropped: u64,
    pub filtered: u64,
    pub filter_path: String,
    pub output_file: String,
    pub file_size: u64,
    pub message: String,
    pub start_time: String,
    pub end_time: Option<String>,
    pub node: String,
    pub spec: SpecJson,
}

impl From<&CaptureSpec> for SpecJson {
    fn from(s: &CaptureSpec) -> Self {
        Self {
            target_ips: s.targets.iter().map(target_string).collect(),
            target_ports: s.ports.clone(),
            duration: s.duration.as_secs(),
            max_packets: s.max_packets,
            output_format: s.format,
            filter: s.filter.clone(),
            snaplen: s.snaplen,
            direction: s.direction,
            keep_copies: s.keep_copies,
            only_targets: s.only_targets,
            pods: s
                .pods
                .iter()
                .map(|p| UncheckedPod::from(pb::TargetPod::from(p)))
                .collect(),
        }
    }
}

impl From<CaptureStatus> for CaptureJson {
    fn from(s: CaptureStatus) -> Self {
        Self {
            spec: SpecJson::from(&s.spec),
            id: s.id,
            name: s.name,
            status: s.state,
            packets: s.packets,
            dropped: s.dropped,
            filtered: s.filtered,
            filter_path: s.filter_path,
            output_file: s.output_file,
            file_size: s.file_size,
            message: s.message,
            start_time: rfc3339(s.start_time),
            end_time: s.end_time.map(rfc3339),
            node: s.node_name,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct FileJson {
    pub name: String,
    pub size: u64,
    pub modified: String,
}

impl From<FileEntry> for FileJson {
    fn from(f: FileEntry) -> Self {
        Self {
            name: f.name,
            size: f.size,
            modified: rfc3339(f.modified),
        }
    }
}

impl From<&CaptureSpec> for pb::CaptureSpec {
    fn from(s: &CaptureSpec) -> Self {
        let saturate = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
        Self {
            target_ips: s.targets.iter().map(target_string).collect(),
            target_ports: s.ports.iter().map(|&p| p.into()).collect(),
            duration_seconds: saturate(s.duration.as_secs()),
            max_packets: saturate(s.max_packets),
            output_format: pb::OutputFormat::from(s.format).into(),
            filter: s.filter.clone(),
            snaplen: s.snaplen,
            direction: pb::Direction::from(s.direction).into(),
            keep_copies: s.keep_copies,
            only_targets: s.only_targets,
            pods: s.pods.iter().map(Into::into).collect(),
        }
    }
}

impl From<CaptureStatus> for pb::Capture {
    fn from(s: CaptureStatus) -> Self {
        Self {
            spec: Some(pb::CaptureSpec::from(&s.spec)),
            id: s.id,
            name: s.name,
            state: pb::CaptureState::from(s.state).into(),
            packets: s.packets,
            dropped: s.dropped,
            filtered: s.filtered,
            filter_path: s.filter_path,
            output_file: s.output_file,
            file_size: s.file_size,
            message: s.message,
            start_time: Some(s.start_time.into()),
            end_time: s.end_time.map(Into::into),
            node_name: s.node_name,
        }
    }
}

impl From<crate::capture::Batch> for pb::PacketBatch {
    fn from(batch: crate::capture::Batch) -> Self {
        use crate::writer::Direction;
        Self {
            packets: batch
                .packets
                .iter()
                .map(|p| pb::StreamedPacket {
                    unix_nanos: p.meta.unix_ns,
                    interface: p.interface.to_string(),
                    direction: match p.meta.direction {
                        Direction::In => pb::PacketDirection::In,
                        Direction::Out => pb::PacketDirection::Out,
                    } as i32,
                    original_length: p.meta.orig_len,
                    data: p.data.to_vec(),
                    number: p.number,
                })
                .collect(),
            lost: batch.lost,
        }
    }
}

impl From<FileEntry> for pb::FileInfo {
    fn from(f: FileEntry) -> Self {
        Self {
            name: f.name,
            size: f.size,
            modified: Some(f.modified.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(json: &str) -> Unchecked {
        serde_json::from_str(json).unwrap()
    }

    fn problems(json: &str) -> String {
        body(json).validate().unwrap_err().to_string()
    }

    #[test]
    fn defaults_are_the_crds() {
        let req = body(r#"{"id":"c1"}"#).validate().unwrap();
        assert_eq!(req.name, "c1");
        assert_eq!(req.spec.duration, Duration::from_secs(60));
        assert_eq!(req.spec.max_packets, 1000);
        assert_eq!(req.spec.format, OutputFormat::Pcap);
        assert_eq!(req.spec.filter, "");
        assert_eq!(req.spec.snaplen, MAX_SNAPLEN);
        assert!(req.spec.targets.is_empty() && req.spec.ports.is_empty());
    }

    #[test]
    fn every_problem_names_its_field() {
        assert_eq!(
            problems(
                r#"{"id":"a/x","name":"Big","targetIPs":["10.0.0.1","10.0.0.300"],"targetPorts":[80,0],"duration":-1,"maxPackets":5000000000,"snaplen":0}"#
            ),
            "id: \"a/x\" may only contain lowercase letters, digits, '.', '-' and '_'; \
             name: \"Big\" may only contain lowercase letters, digits, '.', '-' and '_'; \
             targetIPs[1]: \"10.0.0.300\" is not an IP address or CIDR (such as 10.0.0.1, 10.0.0.0/24 or fd00::/64); \
             targetPorts[1]: 0 is not a port number (1-65535); \
             duration: must be at least 1, got -1; \
             maxPackets: must be at most 4294967295, got 5000000000; \
             snaplen: 0 is out of range (1-262144)"
        );
        assert_eq!(problems(r#"{"id":""}"#), "id: must not be empty");
        assert_eq!(
            problems(r#"{"id":".hidden"}"#),
            "id: \".hidden\" must not start with '.'"
        );
        assert!(problems(&format!(r#"{{"id":"{}"}}"#, "a".repeat(201))).starts_with("id: longer"));
    }

    #[test]
    fn grpc_and_rest_meet_in_the_same_request() {
        let rest = body(
            r#"{"id":"c1","targetIPs":["10.0.0.1"],"targetPorts":[53],"duration":5,"maxPackets":10,"outputFormat":"pcapng","filter":"udp","direction":"egress","keepCopies":true,"onlyTargets":true,"pods":[{"namespace":"shop","name":"web-0","ips":["10.0.0.1"]}]}"#,
        );
        let grpc = Unchecked::try_from(pb::StartCaptureRequest {
            id: "c1".into(),
            name: String::new(),
            spec: Some(pb::CaptureSpec {
                target_ips: vec!["10.0.0.1".into()],
                target_ports: vec![53],
                duration_seconds: 5,
                max_packets: 10,
                output_format: pb::OutputFormat::Pcapng.into(),
                filter: "udp".into(),
                snaplen: 0,
                direction: pb::Direction::Egress.into(),
                keep_copies: true,
                only_targets: true,
                pods: vec![pb::TargetPod {
                    namespace: "shop".into(),
                    name: "web-0".into(),
                    ips: vec!["10.0.0.1".into()],
                }],
            }),
        })
        .unwrap();
        let (rest, grpc) = (rest.validate().unwrap(), grpc.validate().unwrap());
        assert_eq!(
            (&rest.id, &rest.name, &rest.spec),
            (&grpc.id, &grpc.name, &grpc.spec)
        );
        assert_eq!(rest.spec.direction, TargetDirection::Egress);
        assert!(rest.spec.keep_copies);
        let back = pb::CaptureSpec::from(&rest.spec);
        assert_eq!(back.target_ips, ["10.0.0.1"]);
        assert_eq!(back.direction, pb::Direction::Egress as i32);
    }

    #[test]
    fn a_direction_needs_targets() {
        assert_eq!(
            problems(r#"{"id":"c1","direction":"ingress"}"#),
            "direction: ingress is relative to targetIPs, and there are none"
        );
        assert!(body(r#"{"id":"c1","direction":"both"}"#).validate().is_ok());
    }

    #[test]
    fn grpc_without_spec_or_with_an_unknown_format_is_refused() {
        let err = Unchecked::try_from(pb::StartCaptureRequest {
            id: "c1".into(),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "spec: is required");
        let err = Unchecked::try_from(pb::StartCaptureRequest {
            id: "c1".into(),
            name: String::new(),
            spec: Some(pb::CaptureSpec {
                output_format: 42,
                ..Default::default()
            }),
        })
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "outputFormat: 42 is not a known output format"
        );
        let err = Unchecked::try_from(pb::StartCaptureRequest {
            id: "c1".into(),
            name: String::new(),
            spec: Some(pb::CaptureSpec {
                direction: 7,
                ..Default::default()
            }),
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "direction: 7 is not a known direction");
    }
}
