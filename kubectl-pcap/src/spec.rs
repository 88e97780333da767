//! The capture a command line asks for: the target flags of `create` and
//! `stream`, turned into a `PacketCaptureConfigSpec`.
//!
//! Each flag is parsed on its own first, so a mistake is reported against the
//! flag the user typed; then the spec is checked with the same validation the
//! CRD and the webhook apply, and each field it names is mapped back to its
//! flag.

use std::collections::BTreeMap;
use std::fmt;

use clap::Args;
use packet_capture_common::crd::{
    LabelSelector, OutputFormat, PacketCaptureConfigSpec, PodRef, PodSelector, TargetDirection,
};

/// The namespace label every namespace carries (Kubernetes sets it), through
/// which a pod label selector is confined to one namespace.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// What to capture and how: the flags shared by `create` and `stream`.
#[derive(Args, Debug, Clone, Default)]
pub struct TargetArgs {
    /// A pod to capture, as NAMESPACE/NAME, or NAME in the namespace of -n
    /// or the context (repeatable)
    #[arg(long = "pod", value_name = "NS/NAME")]
    pub pods: Vec<String>,

    /// Pods to capture by their labels, key=value[,key=value...]; in the
    /// namespace of -n or the context unless --all-namespaces or
    /// --namespace-selector is given
    #[arg(short = 'l', long, value_name = "KEY=VALUE,...")]
    pub selector: Option<String>,

    /// With --selector: the pods in every namespace
    #[arg(
        short = 'A',
        long,
        requires = "selector",
        conflicts_with = "namespace_selector"
    )]
    pub all_namespaces: bool,

    /// The pods (those of --selector, or all) in the namespaces whose
    /// labels match, key=value[,key=value...]
    #[arg(long, value_name = "KEY=VALUE,...")]
    pub namespace_selector: Option<String>,

    /// An IP address or CIDR to capture, as source or destination
    /// (repeatable)
    #[arg(long = "ip", value_name = "IP_OR_CIDR")]
    pub ips: Vec<String>,

    /// A TCP, UDP or SCTP port to capture, as source or destination
    /// (repeatable; none: every port)
    #[arg(long = "port", value_name = "N")]
    pub ports: Vec<u16>,

    /// A tcpdump filter expression, ANDed with the targets
    #[arg(
        long,
        value_name = "EXPR",
        default_value = "",
        hide_default_value = true
    )]
    pub filter: String,

    /// How long to capture: 30s, 5m, 1h, 1h30m, or plain seconds
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub duration: Option<u32>,

    /// Stop after this many packets on a node
    #[arg(long, value_name = "N")]
    pub max_packets: Option<u32>,

    /// What the nodes write: pcap, pcapng (the default), text, stdout (the
    /// agents' logs) or stream (nothing: live streams only, as `stream`
    /// makes its own captures)
    #[arg(long, value_name = "FORMAT", value_parser = one_of(&OutputFormat::ALL, OutputFormat::as_str))]
    pub format: Option<OutputFormat>,

    /// Bytes kept of each packet (1-262144)
    #[arg(long, value_name = "BYTES")]
    pub snaplen: Option<u32>,

    /// Which packets of the targets: both, ingress (received) or egress
    /// (sent)
    #[arg(
        long,
        value_name = "DIRECTION",
        default_value = "both",
        value_parser = one_of(&TargetDirection::ALL, TargetDirection::as_str)
    )]
    pub direction: TargetDirection,

    /// Record a packet at every interface of a node it crosses, not once
    #[arg(long)]
    pub keep_copies: bool,
}

/// A flag whose value cannot make a capture, e.g.
/// `--pod: "a/b/c" is not NAMESPACE/NAME or NAME`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct FlagError {
    /// The flag as the user spells it (`--pod`).
    pub flag: &'static str,
    pub message: String,
}

impl fmt::Display for FlagError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.flag, self.message)
    }
}

/// Every problem found in the flags, one per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct FlagErrors(pub Vec<FlagError>);

impl fmt::Display for FlagErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl TargetArgs {
    /// The spec these flags ask for. `namespace` completes `--pod NAME` and
    /// confines `--selector`; `default_duration` applies when `--duration`
    /// is not given (`None`: the CRD's default).
    pub fn to_spec(
        &self,
        namespace: &str,
        default_duration: Option<u32>,
    ) -> Result<PacketCaptureConfigSpec, FlagErrors> {
        let mut errors = Vec::new();
        let mut flag_error = |flag, message| errors.push(FlagError { flag, message });

        let mut pods = Vec::new();
        for pod in &self.pods {
            match parse_pod(pod, namespace) {
                Ok(p) => pods.push(p),
                Err(m) => flag_error("--pod", m),
            }
        }
        let labels = match self.selector.as_deref().map(parse_labels).transpose() {
            Ok(l) => l,
            Err(m) => {
                flag_error("--selector", m);
                None
            }
        };
        let namespaces = match self
            .namespace_selector
            .as_deref()
            .map(parse_labels)
            .transpose()
        {
            Ok(n) => n,
            Err(m) => {
                flag_error("--namespace-selector", m);
                None
            }
        };
        for ip in &self.ips {
            if let Err(m) = packet_capture_common::validate::parse_target(ip) {
                flag_error("--ip", m);
            }
        }
        if self.pods.is_empty()
            && self.selector.is_none()
            && self.namespace_selector.is_none()
            && self.ips.is_empty()
        {
            flag_error(
                "--pod",
                "nothing to capture: give --pod, --selector, --namespace-selector or --ip".into(),
            );
        }
        if !errors.is_empty() {
            return Err(FlagErrors(errors));
        }

        // A label selector alone would select in every namespace; like
        // kubectl's -l, it means the current namespace unless -A says
        // otherwise.
        let namespace_selector = match (&namespaces, &labels, self.all_namespaces) {
            (Some(n), _, _) => Some(n.clone()),
            (None, Some(_), false) => Some(LabelSelector {
                match_labels: [(NAMESPACE_NAME_LABEL.to_string(), namespace.to_string())].into(),
                match_expressions: Vec::new(),
            }),
            _ => None,
        };
        let pod_selector =
            (!pods.is_empty() || labels.is_some() || namespaces.is_some()).then(|| PodSelector {
                pods,
                labels: labels.unwrap_or_default(),
                namespace_selector,
            });
        let defaults = PacketCaptureConfigSpec::default();
        let spec = PacketCaptureConfigSpec {
            target_ips: self.ips.clone(),
            pod_selector,
            node_selector: None,
            target_ports: self.ports.clone(),
            duration: self
                .duration
                .or(default_duration)
                .unwrap_or(defaults.duration),
            max_packets: self.max_packets.unwrap_or(defaults.max_packets),
            output_format: self.format.unwrap_or(OutputFormat::Pcapng),
            filter: self.filter.clone(),
            snaplen: self.snaplen,
            direction: self.direction,
            keep_copies: self.keep_copies,
        };
        spec.validate().map_err(|e| {
            let ns_flag = if self.namespace_selector.is_some() {
                "--namespace-selector"
            } else {
                "--namespace"
            };
            FlagErrors(
                e.0.into_iter()
                    .map(|fe| FlagError {
                        flag: flag_of(&fe.field, ns_flag),
                        message: fe.to_string(),
                    })
                    .collect(),
            )
        })?;
        Ok(spec)
    }
}

/// The flag that sets a spec field (as validation names it,
/// `spec.targetPorts[0]`).
fn flag_of(field: &str, namespace_flag: &'static str) -> &'static str {
    let field = field.strip_prefix("spec.").unwrap_or(field);
    if field.starts_with("podSelector.namespaceSelector") {
        return namespace_flag;
    }
    [
        ("targetIPs", "--ip"),
        ("targetPorts", "--port"),
        ("podSelector.pods", "--pod"),
        ("podSelector.match", "--selector"),
        ("duration", "--duration"),
        ("maxPackets", "--max-packets"),
        ("filter", "--filter"),
        ("snaplen", "--snaplen"),
    ]
    .into_iter()
    .find(|(prefix, _)| field.starts_with(prefix))
    .map_or("--pod", |(_, flag)| flag)
}

/// `NAMESPACE/NAME`, or `NAME` in `namespace`.
fn parse_pod(s: &str, namespace: &str) -> Result<PodRef, String> {
    let (ns, name) = match s.split_once('/') {
        Some((ns, name)) => (ns, name),
        None => (namespace, s),
    };
    if ns.is_empty() || name.is_empty() || name.contains('/') {
        return Err(format!("{s:?} is not NAMESPACE/NAME or NAME"));
    }
    Ok(PodRef {
        pod_name: name.to_string(),
        namespace: ns.to_string(),
    })
}

/// `key=value[,key=value...]` as `matchLabels`; the keys and values are
/// checked later, with the spec.
fn parse_labels(s: &str) -> Result<LabelSelector, String> {
    Ok(LabelSelector {
        match_labels: parse_pairs(s)?,
        match_expressions: Vec::new(),
    })
}

/// `key=value[,key=value...]` as a map; a key given twice with different
/// values is refused.
pub fn parse_pairs(s: &str) -> Result<BTreeMap<String, String>, String> {
    let mut match_labels = BTreeMap::new();
    for pair in s.split(',') {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(format!(
                "{pair:?} is not key=value (give key=value pairs separated by commas)"
            ));
        };
        let (key, value) = (key.trim(), value.trim());
        if key.is_empty() {
            return Err(format!("{pair:?} has no key"));
        }
        if match_labels
            .insert(key.to_string(), value.to_string())
            .is_some_and(|old| old != value)
        {
            return Err(format!("{key:?} is given two different values"));
        }
    }
    Ok(match_labels)
}

/// Seconds from `30s`, `5m`, `1h`, `1h30m` or a plain number of seconds; at
/// least one second, as `spec.duration` holds whole seconds.
pub fn parse_duration(s: &str) -> Result<u32, String> {
    let bad = || format!("{s:?} is not a duration (such as 30s, 5m, 1h, 1h30m, or seconds)");
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return match s.parse::<u32>() {
            Ok(0) => Err("must be at least 1 second".into()),
            Ok(n) => Ok(n),
            Err(_) => Err(format!("{s} seconds is too long")),
        };
    }
    let mut total: u64 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (number, after) = rest.split_at(digits);
        let unit_len = after.bytes().take_while(|b| !b.is_ascii_digit()).count();
        let (unit, after) = after.split_at(unit_len);
        let n: u64 = number.parse().map_err(|_| bad())?;
        let scale = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            _ => return Err(bad()),
        };
        total = n
            .checked_mul(scale)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
        rest = after;
    }
    match u32::try_from(total) {
        Ok(0) if !s.is_empty() => Err("must be at least 1 second".into()),
        Ok(0) => Err(bad()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{s} is too long")),
    }
}

/// A flag's parser that takes one of `values` by its `name`: --help lists
/// them, and completion offers them.
fn one_of<T: Copy + Send + Sync + 'static>(
    values: &'static [T],
    name: fn(T) -> &'static str,
) -> impl clap::builder::TypedValueParser<Value = T> {
    use clap::builder::TypedValueParser as _;
    clap::builder::PossibleValuesParser::new(values.iter().map(|v| name(*v))).map(move |s| {
        *values
            .iter()
            .find(|v| name(**v) == s)
            .expect("one of the possible values")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Flags {
        #[command(flatten)]
        target: TargetArgs,
    }

    fn spec(args: &[&str]) -> Result<PacketCaptureConfigSpec, String> {
        let flags = Flags::try_parse_from(std::iter::once("create").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        flags
            .target
            .to_spec("shop", None)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn durations_are_whole_seconds() {
        for (s, want) in [
            ("30s", Ok(30)),
            ("5m", Ok(300)),
            ("1h", Ok(3600)),
            ("1h30m", Ok(5400)),
            ("2m5s", Ok(125)),
            ("90", Ok(90)),
        ] {
            assert_eq!(parse_duration(s), want, "{s}");
        }
        for s in [
            "",
            "0",
            "0s",
            "5x",
            "m",
            "1.5m",
            "10ms",
            "-5",
            "99999999999",
            "5000000h",
        ] {
            assert!(parse_duration(s).is_err(), "{s} was accepted");
        }
        assert_eq!(
            parse_duration("0s").unwrap_err(),
            "must be at least 1 second"
        );
    }

    #[test]
    fn pods_take_the_namespace_of_the_context_when_not_given() {
        let s = spec(&["--pod", "web-1", "--pod", "kube-system/dns-0"]).unwrap();
        let pods = s.pod_selector.unwrap().pods;
        assert_eq!(
            pods,
            [
                PodRef {
                    pod_name: "web-1".into(),
                    namespace: "shop".into()
                },
                PodRef {
                    pod_name: "dns-0".into(),
                    namespace: "kube-system".into()
                },
            ]
        );
    }

    #[test]
    fn every_flag_reaches_its_field() {
        let s = spec(&[
            "--ip",
            "10.0.0.1",
            "--ip",
            "fd00::/64",
            "--port",
            "80",
            "--port",
            "443",
            "--filter",
            "tcp",
            "--duration",
            "2m",
            "--max-packets",
            "50",
            "--format",
            "pcap",
            "--snaplen",
            "128",
            "--direction",
            "ingress",
            "--keep-copies",
        ])
        .unwrap();
        assert_eq!(
            s,
            PacketCaptureConfigSpec {
                target_ips: vec!["10.0.0.1".into(), "fd00::/64".into()],
                pod_selector: None,
                node_selector: None,
                target_ports: vec![80, 443],
                duration: 120,
                max_packets: 50,
                output_format: OutputFormat::Pcap,
                filter: "tcp".into(),
                snaplen: Some(128),
                direction: TargetDirection::Ingress,
                keep_copies: true,
            }
        );
    }

    #[test]
    fn defaults_are_pcapng_and_the_crd_defaults() {
        let s = spec(&["--ip", "10.0.0.1"]).unwrap();
        assert_eq!(s.output_format, OutputFormat::Pcapng);
        assert_eq!(s.duration, 60);
        assert_eq!(s.max_packets, 1000);
        assert_eq!(s.direction, TargetDirection::Both);
        let flags = Flags::try_parse_from(["stream", "--ip", "10.0.0.1"]).unwrap();
        assert_eq!(
            flags.target.to_spec("default", Some(300)).unwrap().duration,
            300
        );
    }

    #[test]
    fn a_selector_stays_in_the_namespace_unless_told_otherwise() {
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let s = spec(&["--selector", "app=web,tier=front"]).unwrap();
        let ps = s.pod_selector.unwrap();
        assert_eq!(
            ps.labels.match_labels,
            labels(&[("app", "web"), ("tier", "front")])
        );
        assert_eq!(
            ps.namespace_selector.unwrap().match_labels,
            labels(&[(NAMESPACE_NAME_LABEL, "shop")])
        );

        let ps = spec(&["-l", "app=web", "-A"])
            .unwrap()
            .pod_selector
            .unwrap();
        assert_eq!(ps.namespace_selector, None);
        assert!(ps.by_labels());

        let ps = spec(&["-l", "app=web", "--namespace-selector", "team=a"])
            .unwrap()
            .pod_selector
            .unwrap();
        assert_eq!(
            ps.namespace_selector.unwrap().match_labels,
            labels(&[("team", "a")])
        );

        let ps = spec(&["--namespace-selector", "team=a"])
            .unwrap()
            .pod_selector
            .unwrap();
        assert!(ps.labels.match_labels.is_empty());
        assert!(ps.by_labels());
    }

    /// Each mistake is reported against the flag it was made in.
    #[test]
    fn bad_input_names_the_flag() {
        for (args, flag, words) in [
            (&["--pod", "a/b/c"][..], "--pod", "NAMESPACE/NAME"),
            (&["--pod", "/web"], "--pod", "NAMESPACE/NAME"),
            (&["--pod", "Web_1"], "--pod", "podName"),
            (&["--selector", "app"], "--selector", "key=value"),
            (&["--selector", "app=web,=x"], "--selector", "no key"),
            (&["--selector", "app=-bad-"], "--selector", "label value"),
            (
                &["--selector", "app=web", "--namespace-selector", "x"],
                "--namespace-selector",
                "key=value",
            ),
            (&["--ip", "10.0.0.1/8"], "--ip", "host bits"),
            (&["--ip", "example.com"], "--ip", "not an IP"),
            (&["--ip", "10.0.0.1", "--port", "0"], "--port", "not a port"),
            (&["--ip", "10.0.0.1", "--port", "70000"], "--port", ""),
            (
                &["--ip", "10.0.0.1", "--duration", "5x"],
                "--duration",
                "not a duration",
            ),
            (
                &["--ip", "10.0.0.1", "--duration", "0"],
                "--duration",
                "at least",
            ),
            (
                &["--ip", "10.0.0.1", "--max-packets", "0"],
                "--max-packets",
                "at least 1",
            ),
            (
                &["--ip", "10.0.0.1", "--snaplen", "0"],
                "--snaplen",
                "range",
            ),
            (
                &["--ip", "10.0.0.1", "--format", "json"],
                "--format",
                "possible values: pcap, pcapng, text, stdout, stream",
            ),
            (
                &["--ip", "10.0.0.1", "--direction", "in"],
                "--direction",
                "possible values: both, ingress, egress",
            ),
            (&["-A", "--ip", "10.0.0.1"], "--selector", ""),
            (&[], "--pod", "nothing to capture"),
        ] {
            let err = spec(args).expect_err(&format!("{args:?} was accepted"));
            assert!(
                err.contains(flag) && err.contains(words),
                "{args:?}: {err:?} does not name {flag} or say {words:?}"
            );
        }
    }
}
