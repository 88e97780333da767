//! Validation of capture specs, with one message per offending field.
//!
//! The CRD schema (OpenAPI + CEL) and the webhook reject the same specs the
//! functions here reject; the agent applies them to every request it gets.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::abi::MAX_SNAPLEN;
use crate::crd::{
    LabelOperator, LabelSelector, MAX_FILTER_LEN, MAX_PODS, MAX_TARGET_IPS, MAX_TARGET_PORTS,
    PacketCaptureConfigSpec,
};

/// One problem with one field, e.g. `spec.targetPorts[2]: 0 is not a port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The field's path in the spec, as a user writes it (`spec.targetIPs[0]`).
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Every problem found in a spec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Collects field errors under a path prefix (`spec` for the CRD, empty for
/// the agent's request body).
#[derive(Debug, Default)]
pub struct Validator {
    prefix: &'static str,
    errors: Vec<FieldError>,
}

impl Validator {
    pub fn new(prefix: &'static str) -> Self {
        Self {
            prefix,
            errors: Vec::new(),
        }
    }

    pub fn error(&mut self, field: impl fmt::Display, message: impl Into<String>) {
        let field = if self.prefix.is_empty() {
            field.to_string()
        } else {
            format!("{}.{field}", self.prefix)
        };
        self.errors.push(FieldError {
            field,
            message: message.into(),
        });
    }

    /// Checks `targetIPs`, at most `max` of them, and returns the parsed
    /// networks.
    pub fn target_ips(&mut self, ips: &[String], max: usize) -> Vec<IpNet> {
        if ips.len() > max {
            self.error(
                "targetIPs",
                format!("{} entries, at most {max} are allowed", ips.len()),
            );
        }
        let mut nets = Vec::with_capacity(ips.len());
        for (i, ip) in ips.iter().enumerate() {
            match parse_target(ip) {
                Ok(net) => nets.push(net),
                Err(msg) => self.error(format_args!("targetIPs[{i}]"), msg),
            }
        }
        nets
    }

    pub fn target_ports(&mut self, ports: &[i64]) {
        if ports.len() > MAX_TARGET_PORTS {
            self.error(
                "targetPorts",
                format!(
                    "{} entries, at most {MAX_TARGET_PORTS} are allowed",
                    ports.len()
                ),
            );
        }
        for (i, &port) in ports.iter().enumerate() {
            if !(1..=65535).contains(&port) {
                self.error(
                    format_args!("targetPorts[{i}]"),
                    format!("{port} is not a port number (1-65535)"),
                );
            }
        }
    }

    pub fn at_least_one(&mut self, field: &str, value: i64) {
        if value < 1 {
            self.error(field, format!("must be at least 1, got {value}"));
        }
    }

    pub fn filter(&mut self, filter: &str) {
        if filter.len() > MAX_FILTER_LEN {
            self.error(
                "filter",
                format!(
                    "{} bytes long, at most {MAX_FILTER_LEN} are allowed",
                    filter.len()
                ),
            );
        }
        if filter.contains('\0') {
            self.error("filter", "must not contain a NUL character");
        }
    }

    pub fn snaplen(&mut self, snaplen: Option<i64>) {
        if let Some(s) = snaplen
            && !(1..=i64::from(MAX_SNAPLEN)).contains(&s)
        {
            self.error("snaplen", format!("{s} is out of range (1-{MAX_SNAPLEN})"));
        }
    }

    pub fn finish(self) -> Result<(), ValidationErrors> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(ValidationErrors(self.errors))
        }
    }
}

/// Ceilings the cluster's administrator sets for every capture, as the
/// ConfigMap keys `MAX_CAPTURE_DURATION` (seconds) and `MAX_CAPTURE_PACKETS`.
/// The webhook checks them at admission, and each agent again when a capture
/// starts, which is what holds when the webhook is off or the agent is
/// called directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaptureLimits {
    pub max_duration: u32,
    pub max_packets: u32,
}

impl CaptureLimits {
    pub const DEFAULT_MAX_DURATION: u32 = 86_400;
    pub const DEFAULT_MAX_PACKETS: u32 = 10_000_000;

    /// The problems of a capture's `duration` (seconds) and `maxPackets`,
    /// each naming the field (under `prefix`) and the key that sets the
    /// ceiling.
    pub fn check(
        &self,
        prefix: &'static str,
        duration: u64,
        max_packets: u64,
    ) -> Result<(), ValidationErrors> {
        let mut v = Validator::new(prefix);
        for (field, value, ceiling, key) in [
            (
                "duration",
                duration,
                self.max_duration,
                "MAX_CAPTURE_DURATION",
            ),
            (
                "maxPackets",
                max_packets,
                self.max_packets,
                "MAX_CAPTURE_PACKETS",
            ),
        ] {
            if value > u64::from(ceiling) {
                v.error(
                    field,
                    format!("{value} is over this cluster's limit of {ceiling} ({key})"),
                );
            }
        }
        v.finish()
    }
}

impl Default for CaptureLimits {
    fn default() -> Self {
        Self {
            max_duration: Self::DEFAULT_MAX_DURATION,
            max_packets: Self::DEFAULT_MAX_PACKETS,
        }
    }
}

/// Whether `name` is a plain file name as the agents write them: one path
/// component (letters, digits, `.`, `-`, `_`), not hidden (temporary
/// files are). Anything else could name a path outside a directory: the
/// agents serve only such names, and `kubectl pcap` writes only such names.
pub fn plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
}

/// The extensions of capture files: their format's, then maybe their
/// compression's (gzip, zstd).
pub const PLAIN_EXTENSIONS: [&str; 3] = ["pcap", "pcapng", "txt"];
pub const COMPRESSED_EXTENSIONS: [&str; 2] = ["gz", "zst"];

/// `file_name` without its compression's extension, if it has one.
pub fn strip_compression(file_name: &str) -> Option<&str> {
    let (base, ext) = file_name.rsplit_once('.')?;
    COMPRESSED_EXTENSIONS.contains(&ext).then_some(base)
}

/// The capture a file of an agent's capture directory belongs to: the
/// `<name>` of `<name>-<YYYYmmdd-HHMMSS>[-<n>].<ext>[.<compression>]`, as
/// the agents name them, read from the right (a name may hold `-` and
/// `.`). `None` for any other name. Access to a file is access to its
/// capture's files.
pub fn capture_of(file_name: &str) -> Option<&str> {
    fn digits(s: &str, n: usize) -> bool {
        s.len() == n && s.bytes().all(|b| b.is_ascii_digit())
    }
    fn stamped(s: &str) -> Option<&str> {
        let (s, time) = s.rsplit_once('-')?;
        let (name, date) = s.rsplit_once('-')?;
        (digits(date, 8) && digits(time, 6) && !name.is_empty()).then_some(name)
    }
    let rest = strip_compression(file_name).unwrap_or(file_name);
    let (base, ext) = rest.rsplit_once('.')?;
    if !PLAIN_EXTENSIONS.contains(&ext) {
        return None;
    }
    // `-<n>` only follows a whole stamp: try the stamp at the end first.
    stamped(base).or_else(|| {
        let (stamp, n) = base.rsplit_once('-')?;
        (!n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            .then(|| stamped(stamp))
            .flatten()
    })
}

/// Parses one `targetIPs` entry: an address (a host route) or a CIDR whose
/// host bits are zero, as tcpdump's `net` demands. Like the CRD's CEL rule
/// (Kubernetes' `isIP`/`isCIDR`), it refuses IPv4-mapped IPv6 addresses and
/// prefix lengths written with leading zeros.
pub fn parse_target(s: &str) -> Result<IpNet, String> {
    let not_an_ip = || {
        format!("{s:?} is not an IP address or CIDR (such as 10.0.0.1, 10.0.0.0/24 or fd00::/64)")
    };
    let net = match s.parse::<IpAddr>() {
        Ok(ip) => IpNet::from(ip),
        Err(_) => match s.parse::<IpNet>() {
            Ok(net)
                if s.rsplit_once('/')
                    .is_some_and(|(_, len)| len == net.prefix_len().to_string()) =>
            {
                net
            }
            _ => return Err(not_an_ip()),
        },
    };
    if let IpNet::V6(v6) = net
        && v6.addr().to_ipv4_mapped().is_some()
    {
        return Err(format!(
            "{s:?} is an IPv4-mapped IPv6 address; give the IPv4 address or network instead"
        ));
    }
    if net.trunc() != net {
        return Err(format!(
            "{s:?} has host bits set; the network is {}",
            net.trunc()
        ));
    }
    Ok(net)
}

/// Checks a Kubernetes object name (RFC 1123 subdomain, `max` bytes).
fn dns_name_problem(name: &str, max: usize, dots: bool) -> Option<String> {
    if name.is_empty() {
        return Some("must not be empty".into());
    }
    if name.len() > max {
        return Some(format!("{name:?} is longer than {max} characters"));
    }
    let ok_char =
        |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || (dots && c == '.');
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    let first = name.chars().next().is_some_and(alnum);
    let last = name.chars().last().is_some_and(alnum);
    if !(first && last && name.chars().all(ok_char)) {
        return Some(format!(
            "{name:?} is not a valid name (lowercase letters, digits{} and '-', starting and ending with a letter or digit)",
            if dots { ", '.'" } else { "" }
        ));
    }
    None
}

/// Checks a label value: at most 63 characters, alphanumerics with '-',
/// '_' and '.' inside; empty is allowed.
fn label_value_problem(value: &str) -> Option<String> {
    let inner = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    let ends = value.starts_with(|c: char| c.is_ascii_alphanumeric())
        && value.ends_with(|c: char| c.is_ascii_alphanumeric());
    if value.is_empty() || (value.len() <= 63 && ends && value.chars().all(inner)) {
        return None;
    }
    Some(format!(
        "{value:?} is not a label value (at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit)"
    ))
}

/// Checks a label key: an optional DNS-subdomain prefix and '/', then a
/// name as a label value, not empty.
fn label_key_problem(key: &str) -> Option<String> {
    let (prefix, name) = key
        .rsplit_once('/')
        .map_or((None, key), |(p, n)| (Some(p), n));
    if let Some(p) = prefix.and_then(|p| dns_name_problem(p, 253, true)) {
        return Some(format!("the prefix of {key:?}: {p}"));
    }
    if name.is_empty() {
        return Some(format!("{key:?} has no name"));
    }
    label_value_problem(name).map(|_| {
        format!("{key:?} is not a label key (an optional DNS prefix and '/', then at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit)")
    })
}

impl Validator {
    /// Checks a label selector's `matchLabels` and `matchExpressions`
    /// under `field`.
    pub fn selector(&mut self, field: &str, selector: &LabelSelector) {
        for (key, value) in &selector.match_labels {
            if let Some(p) = label_key_problem(key) {
                self.error(format_args!("{field}.matchLabels"), p);
            }
            if let Some(p) = label_value_problem(value) {
                self.error(format_args!("{field}.matchLabels[{key}]"), p);
            }
        }
        for (i, r) in selector.match_expressions.iter().enumerate() {
            let at = format!("{field}.matchExpressions[{i}]");
            if let Some(p) = label_key_problem(&r.key) {
                self.error(format_args!("{at}.key"), p);
            }
            let needs_values = matches!(r.operator, LabelOperator::In | LabelOperator::NotIn);
            if needs_values && r.values.is_empty() {
                self.error(
                    format_args!("{at}.values"),
                    format!("{} needs at least one value", r.operator.as_str()),
                );
            }
            if !needs_values && !r.values.is_empty() {
                self.error(
                    format_args!("{at}.values"),
                    format!("{} takes no values", r.operator.as_str()),
                );
            }
            for (j, value) in r.values.iter().enumerate() {
                if let Some(p) = label_value_problem(value) {
                    self.error(format_args!("{at}.values[{j}]"), p);
                }
            }
        }
    }
}

impl PacketCaptureConfigSpec {
    /// Checks everything the schema checks, with a message per field.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut v = Validator::new("spec");
        let pods = self.pod_selector.as_ref().map_or(&[][..], |s| &s.pods[..]);
        let by_labels = self.pod_selector.as_ref().is_some_and(|s| s.by_labels());
        if self.target_ips.is_empty() && pods.is_empty() && !by_labels {
            v.error(
                "targetIPs",
                "at least one of targetIPs, podSelector.pods or a podSelector label or namespace selector must be given",
            );
        }
        if let Some(s) = &self.pod_selector {
            v.selector("podSelector", &s.labels);
            if let Some(ns) = &s.namespace_selector {
                v.selector("podSelector.namespaceSelector", ns);
            }
        }
        if let Some(nodes) = &self.node_selector {
            v.selector("nodeSelector", nodes);
        }
        v.target_ips(&self.target_ips, MAX_TARGET_IPS);
        if pods.len() > MAX_PODS {
            v.error(
                "podSelector.pods",
                format!("{} entries, at most {MAX_PODS} are allowed", pods.len()),
            );
        }
        for (i, pod) in pods.iter().enumerate() {
            if let Some(p) = dns_name_problem(&pod.pod_name, 253, true) {
                v.error(format_args!("podSelector.pods[{i}].podName"), p);
            }
            if let Some(p) = dns_name_problem(&pod.namespace, 63, false) {
                v.error(format_args!("podSelector.pods[{i}].namespace"), p);
            }
        }
        let ports: Vec<i64> = self.target_ports.iter().map(|&p| i64::from(p)).collect();
        v.target_ports(&ports);
        v.at_least_one("duration", self.duration.into());
        v.at_least_one("maxPackets", self.max_packets.into());
        v.filter(&self.filter);
        v.snaplen(self.snaplen.map(i64::from));
        v.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{LabelRequirement, OutputFormat, PacketCaptureConfig, PodRef, PodSelector};

    #[test]
    fn limits_name_the_field_and_the_key() {
        let limits = CaptureLimits {
            max_duration: 60,
            max_packets: 100,
        };
        assert_eq!(limits.check("spec", 60, 100), Ok(()));
        assert_eq!(
            limits.check("spec", 61, 101).unwrap_err().to_string(),
            "spec.duration: 61 is over this cluster's limit of 60 (MAX_CAPTURE_DURATION); \
             spec.maxPackets: 101 is over this cluster's limit of 100 (MAX_CAPTURE_PACKETS)"
        );
        assert_eq!(
            limits.check("", 1, 1_000).unwrap_err().to_string(),
            "maxPackets: 1000 is over this cluster's limit of 100 (MAX_CAPTURE_PACKETS)"
        );
    }

    fn spec_with_ips(ips: &[&str]) -> PacketCaptureConfigSpec {
        PacketCaptureConfigSpec {
            target_ips: ips.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn messages(spec: &PacketCaptureConfigSpec) -> Vec<String> {
        match spec.validate() {
            Ok(()) => vec![],
            Err(e) => e.0.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn accepts_addresses_and_cidrs_of_both_families() {
        let spec = spec_with_ips(&[
            "10.0.0.1",
            "10.0.0.0/24",
            "fd00::1",
            "fd00::/64",
            "0.0.0.0/0",
            "FD00:0::/64",
            "10.0.0.1/32",
        ]);
        assert_eq!(messages(&spec), Vec::<String>::new());
    }

    #[test]
    fn rejects_what_kubernetes_cel_rejects() {
        for bad in [
            "::ffff:10.0.0.1",
            "::ffff:0:0/96",
            "10.0.0.0/08",
            "fe80::1%eth0",
        ] {
            assert!(parse_target(bad).is_err(), "{bad}");
        }
        assert!(
            parse_target("::ffff:10.0.0.1")
                .unwrap_err()
                .contains("IPv4-mapped")
        );
    }

    #[test]
    fn rejects_bad_ips_naming_the_entry() {
        let spec = spec_with_ips(&["10.0.0.1", "10.0.0.300", "10.0.0.1/24", "fd00::/129", ""]);
        let m = messages(&spec);
        assert_eq!(m.len(), 4, "{m:?}");
        assert!(
            m[0].starts_with("spec.targetIPs[1]: \"10.0.0.300\" is not an IP"),
            "{m:?}"
        );
        assert!(
            m[1].contains("spec.targetIPs[2]") && m[1].contains("10.0.0.0/24"),
            "{m:?}"
        );
        assert!(m[2].starts_with("spec.targetIPs[3]"), "{m:?}");
        assert!(m[3].starts_with("spec.targetIPs[4]"), "{m:?}");
    }

    #[test]
    fn needs_targets() {
        let m = messages(&PacketCaptureConfigSpec::default());
        assert_eq!(
            m,
            [
                "spec.targetIPs: at least one of targetIPs, podSelector.pods or a podSelector label or namespace selector must be given"
            ]
        );
        let empty_selector = PacketCaptureConfigSpec {
            pod_selector: Some(PodSelector::default()),
            ..Default::default()
        };
        assert_eq!(messages(&empty_selector).len(), 1);
    }

    #[test]
    fn pods_alone_are_enough_and_their_names_are_checked() {
        let mut spec = PacketCaptureConfigSpec {
            pod_selector: Some(PodSelector {
                pods: vec![PodRef {
                    pod_name: "web-0".into(),
                    namespace: "default".into(),
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(spec.validate().is_ok());
        spec.pod_selector.as_mut().unwrap().pods.push(PodRef {
            pod_name: "Bad_Name".into(),
            namespace: "".into(),
        });
        let m = messages(&spec);
        assert_eq!(m.len(), 2, "{m:?}");
        assert!(m[0].starts_with("spec.podSelector.pods[1].podName: \"Bad_Name\""));
        assert_eq!(
            m[1],
            "spec.podSelector.pods[1].namespace: must not be empty"
        );
    }

    #[test]
    fn label_selectors_alone_are_enough_and_are_checked() {
        let requirement = |key: &str, operator, values: &[&str]| LabelRequirement {
            key: key.into(),
            operator,
            values: values.iter().map(|v| v.to_string()).collect(),
        };
        let mut spec = PacketCaptureConfigSpec {
            pod_selector: Some(PodSelector {
                labels: LabelSelector {
                    match_labels: [("app.kubernetes.io/name".into(), "web".into())].into(),
                    match_expressions: vec![requirement("tier", LabelOperator::In, &["a", "b"])],
                },
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(spec.validate().is_ok());
        let only_namespaces = PacketCaptureConfigSpec {
            pod_selector: Some(PodSelector {
                namespace_selector: Some(LabelSelector::default()),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(only_namespaces.validate().is_ok());

        let selector = &mut spec.pod_selector.as_mut().unwrap().labels;
        selector.match_labels.insert("bad key!".into(), "-x".into());
        selector.match_expressions = vec![
            requirement("tier", LabelOperator::In, &[]),
            requirement("tier", LabelOperator::Exists, &["a"]),
        ];
        spec.node_selector = Some(LabelSelector {
            match_expressions: vec![requirement("zone", LabelOperator::NotIn, &["a b"])],
            ..Default::default()
        });
        let m = messages(&spec);
        assert_eq!(
            m,
            [
                "spec.podSelector.matchLabels: \"bad key!\" is not a label key (an optional DNS prefix and '/', then at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit)",
                "spec.podSelector.matchLabels[bad key!]: \"-x\" is not a label value (at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit)",
                "spec.podSelector.matchExpressions[0].values: In needs at least one value",
                "spec.podSelector.matchExpressions[1].values: Exists takes no values",
                "spec.nodeSelector.matchExpressions[0].values[0]: \"a b\" is not a label value (at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit)",
            ]
        );
    }

    #[test]
    fn ports_durations_and_limits() {
        let spec = PacketCaptureConfigSpec {
            target_ports: vec![80, 0, 65535],
            duration: 0,
            max_packets: 0,
            snaplen: Some(MAX_SNAPLEN + 1),
            ..spec_with_ips(&["10.0.0.1"])
        };
        assert_eq!(
            messages(&spec),
            [
                "spec.targetPorts[1]: 0 is not a port number (1-65535)",
                "spec.duration: must be at least 1, got 0",
                "spec.maxPackets: must be at least 1, got 0",
                "spec.snaplen: 262145 is out of range (1-262144)",
            ]
        );
    }

    #[test]
    fn defaults_match_the_documented_ones() {
        let pcc: PacketCaptureConfig = serde_yaml::from_str(
            "apiVersion: networking.packet.io/v1\nkind: PacketCaptureConfig\nmetadata: {name: x}\nspec: {targetIPs: [10.0.0.1]}\n",
        )
        .unwrap();
        assert_eq!(pcc.spec.duration, 60);
        assert_eq!(pcc.spec.max_packets, 1000);
        assert_eq!(pcc.spec.output_format, OutputFormat::Pcap);
        assert_eq!(pcc.spec.filter, "");
        assert_eq!(pcc.spec.target_ports, Vec::<u16>::new());
        assert_eq!(pcc.spec.snaplen_or_default(), MAX_SNAPLEN);
    }

    #[test]
    fn unknown_output_format_is_rejected_by_name() {
        let err = serde_yaml::from_str::<PacketCaptureConfigSpec>(
            "targetIPs: [10.0.0.1]\noutputFormat: json\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("json"), "{err}");
        assert_eq!("pcapng".parse::<OutputFormat>(), Ok(OutputFormat::Pcapng));
        assert!("PCAP".parse::<OutputFormat>().is_err());
    }
}
