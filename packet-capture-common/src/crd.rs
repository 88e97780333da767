//! The `PacketCaptureConfig` custom resource (`networking.packet.io/v1`,
//! cluster-scoped). `cargo xtask crdgen` writes its YAML from these types.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::abi::MAX_SNAPLEN;

pub const GROUP: &str = "networking.packet.io";
pub const VERSION: &str = "v1";
pub const KIND: &str = "PacketCaptureConfig";
pub const PLURAL: &str = "packetcaptureconfigs";
/// `<plural>.<group>`, as RBAC and the CRD object name spell it.
pub const RESOURCE: &str = "packetcaptureconfigs.networking.packet.io";
/// The subresource that RBAC rules name to allow reading a capture's files
/// from the agents (`packetcaptureconfigs/files`, verb `get`, by the
/// capture's name). The API server serves no such path; only the agents ask
/// for it.
pub const FILES_SUBRESOURCE: &str = "files";
/// The verb on `packetcaptureconfigs/files` that lets a caller of the
/// agents (the controller's aggregated API) read for the users it names in
/// the `ON_BEHALF_OF_*` headers: the agents then check those users'
/// permissions, not the caller's.
pub const RELAY_VERB: &str = "relay";
/// Who a relayed agent call is for: the user's name, each of its groups
/// (one header each), its uid, and each value of its `extra` (one header
/// each, [`on_behalf_extra`]).
pub const ON_BEHALF_OF_USER: &str = "packet-capture-on-behalf-of-user";
pub const ON_BEHALF_OF_GROUP: &str = "packet-capture-on-behalf-of-group";
pub const ON_BEHALF_OF_UID: &str = "packet-capture-on-behalf-of-uid";
pub const ON_BEHALF_OF_EXTRA: &str = "packet-capture-on-behalf-of-extra";
/// Present, as [`PERCENT_ENCODED`], when the user, group and uid headers of
/// a relayed call are percent-encoded UTF-8 ([`percent_encode`]), as the
/// `extra` ones always are. The controller encodes them only for a user one
/// of whose names a header cannot carry as it is ([`is_plain_header_value`]),
/// so that agents that do not know this header still read every other
/// user; such an agent reads the encoded name (`j%C3%B6rg`), which no one
/// holds, and refuses, rather than reading someone else.
pub const ON_BEHALF_OF_ENCODING: &str = "packet-capture-on-behalf-of-encoding";
/// The one value of [`ON_BEHALF_OF_ENCODING`].
pub const PERCENT_ENCODED: &str = "percent";

/// What is percent-encoded in the `ON_BEHALF_OF_*` headers: all but
/// RFC 3986's unreserved characters, so `=` only parts key from value and
/// any text (`/` in keys, UTF-8 in values) is a header value, also in gRPC
/// metadata.
const ON_BEHALF_ENCODED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// `text` as an `ON_BEHALF_OF_*` header value that carries any text.
pub fn percent_encode(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, ON_BEHALF_ENCODED).to_string()
}

/// The text [`percent_encode`] made `encoded` from; `None` when it is not
/// percent-encoded UTF-8.
pub fn percent_decode(encoded: &str) -> Option<String> {
    percent_encoding::percent_decode_str(encoded)
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
}

/// Whether `text` is a header value as it is, read back the same by every
/// HTTP parser and gRPC's ASCII metadata: visible ASCII and spaces between,
/// none at either end (parsers trim them).
pub fn is_plain_header_value(text: &str) -> bool {
    text.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
        && !text.starts_with(' ')
        && !text.ends_with(' ')
}

/// The [`ON_BEHALF_OF_EXTRA`] header of one value of an `extra` key:
/// `KEY=VALUE`, both percent-encoded.
pub fn on_behalf_extra(key: &str, value: &str) -> String {
    format!("{}={}", percent_encode(key), percent_encode(value))
}

/// The key and value an [`ON_BEHALF_OF_EXTRA`] header holds; `None` when
/// it is not `KEY=VALUE` of percent-encoded UTF-8 with a key.
pub fn parse_on_behalf_extra(header: &str) -> Option<(String, String)> {
    let (key, value) = header.split_once('=')?;
    Some((
        percent_decode(key).filter(|k| !k.is_empty())?,
        percent_decode(value)?,
    ))
}
/// The response header of a capture's live stream (the aggregated API's
/// `packets`) that names the capture it streams (its id on the agents, of
/// one generation), for a reader whose stream broke off to go on where it
/// was (`?resume=ID&after=NODE:NUMBER`).
pub const STREAM_CAPTURE_ID: &str = "packet-capture-id";
/// The signer of the agents' serving certificates: the agents ask for
/// theirs with CertificateSigningRequests for it, the controller signs.
pub const AGENT_SIGNER: &str = "networking.packet.io/agent-serving";

/// The annotation that ends a running capture now (`kubectl pcap stop`):
/// the controller stops it on every node and it completes, keeping its
/// status and files. Unlike a change of the spec, it does not start the
/// capture again. Its value names the generation it stops and when it was
/// asked ([`stop_value`]); a value that names none (set by hand) stops the
/// generation the controller has taken up.
pub const STOP_REQUESTED: &str = "networking.packet.io/stop-requested";

/// The [`STOP_REQUESTED`] value that stops `generation`, asked at `asked`:
/// `generation 2, 2026-12-05T23:40:00Z`.
pub fn stop_value(generation: i64, asked: impl std::fmt::Display) -> String {
    format!("generation {generation}, {asked}")
}

/// The generation a [`STOP_REQUESTED`] value names ([`stop_value`]), if it
/// names one.
pub fn stopped_generation(value: &str) -> Option<i64> {
    let (generation, _) = value.strip_prefix("generation ")?.split_once(',')?;
    generation.parse().ok()
}

/// The message of a node capture that ended because a caller allowed to
/// (the controller, for [`STOP_REQUESTED`] or a deletion) asked its agent
/// to stop it, as opposed to the agent ending it on its own.
pub const STOPPED_BY_REQUEST: &str = "stopped by request";

/// The annotation naming who asked for a capture: the user who created it
/// or last changed its spec, set by the controller's mutating webhook. The
/// per-requester limit counts captures by it.
pub const REQUESTED_BY: &str = "networking.packet.io/requested-by";

/// The annotation saying where the requester was found allowed to capture
/// pods when a spec with `targetIPs` was admitted: `*` (every namespace) or
/// namespaces, comma-separated. Set by the controller's mutating webhook,
/// like [`REQUESTED_BY`]. Without `*`, each `targetIPs` entry was a pod's
/// address in one of them, and is captured only while it still is.
pub const AUTHORIZED_IN: &str = "networking.packet.io/authorized-in";

/// What `output_file` says for stdout captures, which write no file.
pub const STDOUT_OUTPUT_FILE: &str = "Packet capture logs are in stdout format";

/// What `output_file` says for stream captures, which write no file.
pub const STREAM_OUTPUT_FILE: &str =
    "No file: the packets went to live streams only (outputFormat: stream)";

/// Whether a node's `output_file` names no file: empty, or the note of a
/// format that writes none.
pub fn names_no_file(output_file: &str) -> bool {
    output_file.is_empty()
        || OutputFormat::ALL
            .iter()
            .any(|f| f.no_file() == Some(output_file))
}

/// Limits that keep the CEL rules cheap and a spec readable.
pub const MAX_TARGET_IPS: usize = 256;
/// Most targets one capture has on one node, as the agents take them: the
/// spec's `targetIPs` (up to 256) and the addresses of the pods selected
/// there (a node runs a few hundred pods at most, each with one address per
/// family).
pub const MAX_NODE_TARGETS: usize = 1024;
pub const MAX_TARGET_PORTS: usize = 256;
pub const MAX_PODS: usize = 256;
pub const MAX_FILTER_LEN: usize = 4096;
/// Longest capture name (the CRD's rule on `metadata.name`): the agents'
/// file names add a time stamp, a counter, the format's and compression's
/// extensions and a temporary suffix, and must stay within 255 bytes.
pub const MAX_NAME_LEN: usize = 200;

pub const DEFAULT_DURATION: u32 = 60;
pub const DEFAULT_MAX_PACKETS: u32 = 1000;

/// What to capture, for how long, and how to write it.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "networking.packet.io",
    version = "v1",
    kind = "PacketCaptureConfig",
    plural = "packetcaptureconfigs",
    singular = "packetcaptureconfig",
    shortname = "pcc",
    doc = "Captures packets on the cluster's nodes, selected by IP, CIDR, pod, port and a tcpdump filter",
    status = "PacketCaptureConfigStatus",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Nodes", type_ = "integer", json_path = ".status.nodes"),
    printcolumn(name = "Packets", type_ = "integer", json_path = ".status.packets"),
    printcolumn(name = "Dropped", type_ = "integer", json_path = ".status.dropped", priority = 1),
    printcolumn(name = "Format", type_ = "string", json_path = ".spec.outputFormat", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new(
        "(has(self.spec.targetIPs) && size(self.spec.targetIPs) > 0) || (has(self.spec.podSelector) && ((has(self.spec.podSelector.pods) && size(self.spec.podSelector.pods) > 0) || (has(self.spec.podSelector.matchLabels) && size(self.spec.podSelector.matchLabels) > 0) || (has(self.spec.podSelector.matchExpressions) && size(self.spec.podSelector.matchExpressions) > 0) || has(self.spec.podSelector.namespaceSelector)))"
    ).message("spec: at least one of targetIPs, podSelector.pods or a podSelector label or namespace selector must be given").field_path(".spec"),
    // MAX_NAME_LEN, which a test holds it to.
    validation = Rule::new("size(self.metadata.name) <= 200").message("metadata.name: must be at most 200 characters, as the agents' file names add a time stamp and extensions to it")
)]
#[serde(rename_all = "camelCase")]
pub struct PacketCaptureConfigSpec {
    /// IP addresses or CIDRs (IPv4 or IPv6) whose packets to capture, as
    /// source or destination.
    #[serde(default, rename = "targetIPs", skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(max = 64)))]
    #[x_kube(validation = Rule::new("self.all(t, isIP(t) || (isCIDR(t) && cidr(t).masked() == cidr(t)))").message("each entry must be an IP address or a CIDR without host bits, such as 10.0.0.1, 10.0.0.0/24 or fd00::/64"))]
    pub target_ips: Vec<String>,

    /// Pods whose traffic to capture, by name and by labels; resolved to
    /// their IPs and nodes, and followed while the capture runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<PodSelector>,

    /// Limits the nodes the capture runs on to those whose labels match;
    /// absent: every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,

    /// TCP, UDP or SCTP ports to capture, as source or destination; empty
    /// means every port (and packets without one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(range(min = 1, max = 65535)))]
    pub target_ports: Vec<u16>,

    /// How long to capture, in seconds.
    #[serde(default = "default_duration")]
    #[schemars(range(min = 1, max = u32::MAX))]
    pub duration: u32,

    /// Stop after this many packets on a node.
    #[serde(default = "default_max_packets")]
    #[schemars(range(min = 1, max = u32::MAX))]
    pub max_packets: u32,

    /// pcap, pcapng, text, stdout (one `PACKET:` line per packet in the
    /// agent's log, no file), or stream (no file: the packets go only to
    /// live streams, `kubectl pcap stream`).
    #[serde(default)]
    pub output_format: OutputFormat,

    /// Additional tcpdump filter expression, ANDed with the targets.
    #[serde(default)]
    #[schemars(length(max = 4096))]
    #[x_kube(validation = Rule::new("!self.contains('\\u0000')").message("must not contain a NUL character"))]
    pub filter: String,

    /// Bytes of each packet to keep (default 262144, as tcpdump's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 262144))]
    pub snaplen: Option<u32>,

    /// Which packets of the targets: both (the default), ingress (those a
    /// target receives: a target address is the destination) or egress
    /// (those a target sends: a target address is the source).
    #[serde(default)]
    pub direction: TargetDirection,

    /// Record a packet at every interface of the node it crosses (a pod's
    /// veth, a bridge, eth0), as `tcpdump -i any` does. false (the
    /// default): once per node, where it is seen first.
    #[serde(default)]
    pub keep_copies: bool,
}

fn default_duration() -> u32 {
    DEFAULT_DURATION
}

fn default_max_packets() -> u32 {
    DEFAULT_MAX_PACKETS
}

impl Default for PacketCaptureConfigSpec {
    fn default() -> Self {
        Self {
            target_ips: Vec::new(),
            pod_selector: None,
            node_selector: None,
            target_ports: Vec::new(),
            duration: DEFAULT_DURATION,
            max_packets: DEFAULT_MAX_PACKETS,
            output_format: OutputFormat::default(),
            filter: String::new(),
            snaplen: None,
            direction: TargetDirection::default(),
            keep_copies: false,
        }
    }
}

impl PacketCaptureConfigSpec {
    /// The snaplen this spec asks for, or the default.
    pub fn snaplen_or_default(&self) -> u32 {
        self.snaplen.unwrap_or(MAX_SNAPLEN)
    }
}

/// The pods to capture: those listed in `pods`, and those that the label
/// selector (`matchLabels`, `matchExpressions`) and `namespaceSelector`
/// select. Selection by labels is on when any of the three is given; then a
/// pod is selected when its labels match and its namespace's labels match
/// `namespaceSelector` (absent: every namespace).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodSelector {
    /// Pods by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub pods: Vec<PodRef>,
    /// The pods' own labels (`matchLabels`, `matchExpressions`).
    #[serde(flatten)]
    pub labels: LabelSelector,
    /// Pods in the namespaces whose labels match. The label
    /// `kubernetes.io/metadata.name` selects namespaces by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
}

impl PodSelector {
    /// Whether pods are also selected by labels (not only by name).
    pub fn by_labels(&self) -> bool {
        !self.labels.match_labels.is_empty()
            || !self.labels.match_expressions.is_empty()
            || self.namespace_selector.is_some()
    }
}

/// A Kubernetes label selector: every `matchLabels` entry and every
/// `matchExpressions` requirement must hold; an empty one matches all.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    /// Labels that must have these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(length(max = 64))]
    pub match_labels: BTreeMap<String, String>,
    /// Requirements that must all hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub match_expressions: Vec<LabelRequirement>,
}

impl LabelSelector {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }
}

/// One requirement on a label: `In` and `NotIn` a list of values (at least
/// one), `Exists` and `DoesNotExist` without values.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[x_kube(validation = Rule::new("(self.operator == 'In' || self.operator == 'NotIn') ? (has(self.values) && size(self.values) > 0) : (!has(self.values) || size(self.values) == 0)").message("In and NotIn need values; Exists and DoesNotExist take none"))]
pub struct LabelRequirement {
    /// The label's key, e.g. `app.kubernetes.io/name`.
    #[schemars(length(min = 1, max = 317))]
    pub key: String,
    /// In, NotIn, Exists or DoesNotExist.
    pub operator: LabelOperator,
    /// The values for In and NotIn.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(max = 63)))]
    pub values: Vec<String>,
}

impl LabelRequirement {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            LabelOperator::In => value.is_some_and(|v| self.values.contains(v)),
            LabelOperator::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            LabelOperator::Exists => value.is_some(),
            LabelOperator::DoesNotExist => value.is_none(),
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum LabelOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl LabelOperator {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::In => "In",
            Self::NotIn => "NotIn",
            Self::Exists => "Exists",
            Self::DoesNotExist => "DoesNotExist",
        }
    }
}

#[derive(
    Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, KubeSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct PodRef {
    /// The pod's name: lowercase letters, digits, '-' and '.', starting and
    /// ending with a letter or digit.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub pod_name: String,
    /// The pod's namespace: lowercase letters, digits and '-', starting and
    /// ending with a letter or digit.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub namespace: String,
}

/// Which packets of the targets a capture keeps, relative to the targets.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TargetDirection {
    /// Sent and received.
    #[default]
    Both,
    /// Received: a target address is the destination.
    Ingress,
    /// Sent: a target address is the source.
    Egress,
}

impl TargetDirection {
    pub const ALL: [TargetDirection; 3] = [Self::Both, Self::Ingress, Self::Egress];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Both => "both",
            Self::Ingress => "ingress",
            Self::Egress => "egress",
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    #[default]
    Pcap,
    Pcapng,
    Text,
    Stdout,
    /// No file and no lines: the packets go only to live readers of the
    /// capture (`kubectl pcap stream`), as `kubectl pcap stream` with
    /// target flags makes its captures, which it deletes afterwards.
    Stream,
}

impl OutputFormat {
    pub const ALL: [OutputFormat; 5] = [
        Self::Pcap,
        Self::Pcapng,
        Self::Text,
        Self::Stdout,
        Self::Stream,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pcap => "pcap",
            Self::Pcapng => "pcapng",
            Self::Text => "text",
            Self::Stdout => "stdout",
            Self::Stream => "stream",
        }
    }

    /// Extension of the files this format writes; `None` for the formats
    /// that write none.
    pub fn extension(self) -> Option<&'static str> {
        match self {
            Self::Pcap => Some("pcap"),
            Self::Pcapng => Some("pcapng"),
            Self::Text => Some("txt"),
            Self::Stdout | Self::Stream => None,
        }
    }

    /// What a node's `output_file` says for a format that writes no file.
    pub fn no_file(self) -> Option<&'static str> {
        match self {
            Self::Stdout => Some(STDOUT_OUTPUT_FILE),
            Self::Stream => Some(STREAM_OUTPUT_FILE),
            Self::Pcap | Self::Pcapng | Self::Text => None,
        }
    }
}

impl std::fmt::Display for OutputFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for OutputFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Self::ALL.map(Self::as_str).into();
                format!("{s:?} is not an output format ({})", names.join(", "))
            })
    }
}

/// A node capture's life, as the agent reports it and as
/// `status.captureFiles[*].status` spells it: starting, then running, then
/// completed (its duration, packet or size limit), failed, or stopped (asked
/// to stop, or the agent shut down).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CaptureState {
    Starting,
    Running,
    Completed,
    Failed,
    Stopped,
}

impl CaptureState {
    pub const ALL: [CaptureState; 5] = [
        Self::Starting,
        Self::Running,
        Self::Completed,
        Self::Failed,
        Self::Stopped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Stopped => "stopped",
        }
    }

    /// Whether the capture has ended (nothing changes after this).
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Stopped)
    }
}

impl std::fmt::Display for CaptureState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for CaptureState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "{s:?} is not a capture state (starting, running, completed, failed or stopped)"
                )
            })
    }
}

/// Where a capture is in its life: Starting, Running, then Completed or Failed.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    Starting,
    Running,
    Completed,
    Failed,
}

impl Phase {
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Failed)
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PacketCaptureConfigStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// What is happening, or what went wrong, in a sentence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// When the first node started capturing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the last node finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// Number of nodes the capture runs on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<u32>,
    /// Packets written on all nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packets: Option<u64>,
    /// Packets matched but not written on all nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped: Option<u64>,
    /// One entry per node, keyed by the node's IP. On more than 100 nodes,
    /// only the nodes that need attention (failed, or not ended past the
    /// duration); the results ConfigMaps list every node.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub capture_files: BTreeMap<String, NodeCapture>,
    /// How many nodes are in each state (starting, running, completed,
    /// failed, stopped).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_states: BTreeMap<String, u32>,
    /// Nodes that captureFiles leaves out (more than 100 nodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture_files_omitted: Option<u32>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A node's part of a capture: its state, file and counters.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
pub struct NodeCapture {
    pub status: CaptureState,
    /// Path of the capture file on the node.
    pub output_file: String,
    /// Size of the capture file in bytes.
    pub file_size: u64,
    /// The node's name.
    #[serde(default)]
    pub node: String,
    #[serde(default)]
    pub packets: u64,
    #[serde(default)]
    pub dropped: u64,
    /// Packets that matched the targets and ports but not `filter`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub filtered: u64,
    /// Where `filter` runs on this node: `kernel` (what it rejects never
    /// leaves the kernel), or `user space (why)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter_path: Option<String>,
    /// Why the capture on this node ended, or what went wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The target pods selected on this node now (`namespace/name`),
    /// while the capture runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pods: Vec<String>,
}

impl PacketCaptureConfig {
    /// The phase of the capture of the spec as it is now: the status's once
    /// the controller has taken this generation up (`observedGeneration`),
    /// `None` before (after a spec change, the status still describes the
    /// capture that change ended).
    pub fn current_phase(&self) -> Option<Phase> {
        let status = self.status.as_ref()?;
        let current = status.observed_generation == self.metadata.generation;
        current.then_some(status.phase).flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Any key and value go through the header and come back as they were;
    /// what is not one is refused.
    #[test]
    fn an_extra_value_goes_through_its_header() {
        for (key, value) in [
            ("authentication.kubernetes.io/credential-id", "JTI=7f"),
            ("scopes", "a b, c%d"),
            ("k=e=y", ""),
            ("é", "ünïcode ✓"),
        ] {
            let header = on_behalf_extra(key, value);
            assert!(http::HeaderValue::from_str(&header).is_ok(), "{header}");
            assert_eq!(header.matches('=').count(), 1, "{header}");
            assert_eq!(
                parse_on_behalf_extra(&header),
                Some((key.to_owned(), value.to_owned()))
            );
        }
        for bad in ["no-equals", "=value", "%ff=x", "k=%c3"] {
            assert_eq!(parse_on_behalf_extra(bad), None, "{bad}");
        }
    }

    /// A name a header carries as it is goes as it is; any other goes
    /// percent-encoded, and comes back as it was.
    #[test]
    fn a_name_goes_through_a_header_plain_or_encoded() {
        for plain in ["alice", "system:serviceaccount:ns:a", "a b", "100%"] {
            assert!(is_plain_header_value(plain), "{plain}");
        }
        for other in ["jörg", "Zoë Ünicode", " lead", "trail ", "tab\tx", "a\nb"] {
            assert!(!is_plain_header_value(other), "{other}");
            let header = percent_encode(other);
            assert!(is_plain_header_value(&header), "{header}");
            assert_eq!(percent_decode(&header).as_deref(), Some(other));
        }
        assert_eq!(percent_encode("jörg:x"), "j%C3%B6rg%3Ax");
        assert_eq!(percent_decode("%c3"), None);
    }

    #[test]
    fn the_resource_type_is_in_no_category() {
        // Cluster-scoped: in `all`, `kubectl get all -n NS` would fail for
        // whoever may not list captures, and `kubectl delete all --all -n
        // NS` would delete every capture in the cluster.
        use kube::CustomResourceExt;
        let names = PacketCaptureConfig::crd().spec.names;
        assert_eq!(names.categories, None);
        assert_eq!(names.short_names, Some(vec!["pcc".to_string()]));
    }

    #[test]
    fn a_stop_value_names_its_generation() {
        let value = stop_value(12, "2026-12-05T23:40:00Z");
        assert_eq!(value, "generation 12, 2026-12-05T23:40:00Z");
        assert_eq!(stopped_generation(&value), Some(12));
        for by_hand in [
            "2026-12-05T23:40:00Z",
            "true",
            "generation 2",
            "generation x, now",
            "",
        ] {
            assert_eq!(stopped_generation(by_hand), None, "{by_hand:?}");
        }
    }

    #[test]
    fn the_current_phase_is_of_the_current_generation() {
        let mut pcc = PacketCaptureConfig::new(
            "cap",
            PacketCaptureConfigSpec {
                target_ips: vec!["10.0.0.1".into()],
                ..serde_json::from_value(serde_json::json!({})).unwrap()
            },
        );
        assert_eq!(pcc.current_phase(), None);
        pcc.metadata.generation = Some(1);
        pcc.status = Some(PacketCaptureConfigStatus {
            phase: Some(Phase::Completed),
            observed_generation: Some(1),
            ..Default::default()
        });
        assert_eq!(pcc.current_phase(), Some(Phase::Completed));
        // The spec changed; the controller has not taken it up yet.
        pcc.metadata.generation = Some(2);
        assert_eq!(pcc.current_phase(), None);
    }

    #[test]
    fn label_selectors_match_as_kubernetes_does() {
        let labels: BTreeMap<String, String> = [
            ("app".into(), "web".into()),
            ("tier".into(), "front".into()),
        ]
        .into();
        let requirement = |key: &str, operator, values: &[&str]| LabelRequirement {
            key: key.into(),
            operator,
            values: values.iter().map(|v| v.to_string()).collect(),
        };
        let selector =
            |labels: &[(&str, &str)], expressions: Vec<LabelRequirement>| LabelSelector {
                match_labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                match_expressions: expressions,
            };
        use LabelOperator::*;
        let cases = [
            (selector(&[], vec![]), true),
            (selector(&[("app", "web")], vec![]), true),
            (selector(&[("app", "db")], vec![]), false),
            (selector(&[("app", "web"), ("zone", "a")], vec![]), false),
            (
                selector(&[], vec![requirement("tier", In, &["front", "back"])]),
                true,
            ),
            (
                selector(&[], vec![requirement("tier", In, &["back"])]),
                false,
            ),
            (selector(&[], vec![requirement("zone", In, &["a"])]), false),
            (
                selector(&[], vec![requirement("tier", NotIn, &["back"])]),
                true,
            ),
            (
                selector(&[], vec![requirement("tier", NotIn, &["front"])]),
                false,
            ),
            (
                selector(&[], vec![requirement("zone", NotIn, &["a"])]),
                true,
            ),
            (selector(&[], vec![requirement("app", Exists, &[])]), true),
            (selector(&[], vec![requirement("zone", Exists, &[])]), false),
            (
                selector(&[], vec![requirement("zone", DoesNotExist, &[])]),
                true,
            ),
            (
                selector(&[], vec![requirement("app", DoesNotExist, &[])]),
                false,
            ),
            (
                selector(
                    &[("app", "web")],
                    vec![requirement("app", DoesNotExist, &[])],
                ),
                false,
            ),
        ];
        for (i, (s, want)) in cases.iter().enumerate() {
            assert_eq!(s.matches(&labels), *want, "case {i}: {s:?}");
        }
    }
}
