//! Command-line flags (each with an environment variable), the values read
//! from the `packet-capture-config` ConfigMap, and the retry and time limits.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{Api, Client};
use packet_capture_common::logging::LogLevel;
use packet_capture_common::validate::CaptureLimits;

use crate::backoff::Backoff;
use crate::error::{Error, Result};
use crate::pki::Name;

pub const DEFAULT_AGENT_PORT: u16 = 8080;

/// Where the webhook's serving certificate comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CertSource {
    /// tls.crt and tls.key in --webhook-cert-dir (e.g. a mounted Secret).
    Dir,
    /// The Secret --webhook-cert-secret, written by cert-manager.
    CertManager,
    /// The Secret --webhook-cert-secret, written by you.
    Secret,
    /// The controller's own CA (Secret --ca-secret) issues the certificate
    /// into --webhook-cert-secret, renews both, and fills in the caBundle of
    /// --webhook-configuration.
    SelfManaged,
}

fn parse_name(s: &str) -> Result<Name, String> {
    s.parse()
}

/// Retry and time limits.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// StartCapture (and GetCapture) calls.
    pub start: Backoff,
    /// StopCapture and ListCaptures calls (also on delete).
    pub stop: Backoff,
    /// Reconnecting a broken WatchCapture stream.
    pub watch: Backoff,
    /// How long after `startTime + duration` a node that has not ended fails.
    pub grace: Duration,
    /// How long a new node capture waits for its node's agent to be ready
    /// (a DaemonSet pod still pulling its image or starting up).
    pub agent_wait: Duration,
    /// Requeue after a failed reconcile.
    pub error_requeue: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            start: Backoff::new(Duration::from_millis(500), Duration::from_secs(8), 5),
            stop: Backoff::new(Duration::from_millis(500), Duration::from_secs(4), 3),
            watch: Backoff::new(Duration::from_secs(1), Duration::from_secs(10), 5),
            grace: Duration::from_secs(60),
            agent_wait: Duration::from_secs(Settings::DEFAULT_AGENT_WAIT_SECONDS.into()),
            error_requeue: Duration::from_secs(10),
        }
    }
}

/// The controller's settings.
#[derive(Parser, Debug, Clone)]
#[command(name = "packet-capture-controller", version, about)]
pub struct Settings {
    /// Namespace of the agent pods, the results ConfigMaps, the ConfigMap
    /// with the settings and the leader-election Lease: the controller's own
    /// (the Deployment sets POD_NAMESPACE from the downward API); the default
    /// is the chart's and the manifests'.
    #[arg(long, env = "POD_NAMESPACE", default_value = "packet-capture")]
    pub namespace: String,

    /// ConfigMap (in --namespace) with AGENT_PORT; flags and environment win.
    #[arg(long, env = "CONFIG_MAP", default_value = "packet-capture-config")]
    pub config_map: String,

    /// Port of the agents' API [default: the ConfigMap's AGENT_PORT, else 8080].
    #[arg(long, env = "AGENT_PORT")]
    pub agent_port: Option<u16>,

    /// Labels of the agent DaemonSet's pods (`key=value[,key=value]`).
    #[arg(long, env = "AGENT_SELECTOR", default_value = "app=packet-capture-agent", value_parser = parse_selector)]
    pub agent_selector: LabelSelector,

    /// Only PacketCaptureConfigs with these labels (`key=value[,key=value]`)
    /// [default: all]; for more than one controller in a cluster, each with
    /// its own captures and (--agent-selector) agents.
    #[arg(long, env = "CAPTURE_SELECTOR", value_parser = parse_selector)]
    pub capture_selector: Option<LabelSelector>,

    /// Bearer token for the agents (a projected service-account token with
    /// the audience packet-capture-agent); re-read when it changes. Without
    /// the file the agents are called without a token.
    #[arg(
        long,
        env = "AGENT_TOKEN_FILE",
        default_value = "/var/run/secrets/packet-capture/token"
    )]
    pub agent_token_file: PathBuf,

    /// The longest capture the webhook admits, in seconds (the agents
    /// check their own copy of the same ConfigMap key).
    #[arg(long, env = "MAX_CAPTURE_DURATION", default_value_t = CaptureLimits::DEFAULT_MAX_DURATION,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_capture_duration: u32,

    /// The largest maxPackets the webhook admits.
    #[arg(long, env = "MAX_CAPTURE_PACKETS", default_value_t = CaptureLimits::DEFAULT_MAX_PACKETS,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_capture_packets: u32,

    /// Captures one requester (the user who created a capture or last
    /// changed its spec) may have that have not ended; the webhook refuses
    /// one more. 0: no limit.
    #[arg(long, env = "MAX_CAPTURES_PER_REQUESTER", default_value_t = 10)]
    pub max_captures_per_requester: u32,

    /// Timeout of one call to an agent, in seconds.
    #[arg(long, env = "AGENT_TIMEOUT_SECONDS", default_value_t = 10)]
    pub agent_timeout_seconds: u64,

    /// How long, in seconds, a node capture waits for its node's agent pod
    /// to be Ready (an image still pulling, a DaemonSet rollout) before the
    /// node fails.
    #[arg(long, env = "AGENT_WAIT_SECONDS", default_value_t = Self::DEFAULT_AGENT_WAIT_SECONDS,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub agent_wait_seconds: u32,

    /// Agent calls in flight at most, over all agents; waiting calls that
    /// stop or read captures go before those that start them.
    #[arg(long, env = "AGENT_CONCURRENCY", default_value_t = 64,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub agent_concurrency: u16,

    /// The CA of the agents' serving certificates, which the controller
    /// signs (CertificateSigningRequests for networking.packet.io/agent-serving)
    /// and verifies when it calls them: self-managed (its own CA, in
    /// --ca-secret, created and renewed by it) or secret (a CA that
    /// cert-manager or you keep in --agent-ca-secret, and the controller's
    /// own while that Secret is missing).
    #[arg(long, env = "AGENT_CA", value_enum, default_value_t = AgentCa::SelfManaged)]
    pub agent_ca: AgentCa,
    /// With --agent-ca=secret: the Secret (in --namespace) with the CA's
    /// tls.crt, tls.key and ca.crt.
    #[arg(
        long,
        env = "AGENT_CA_SECRET",
        default_value = "packet-capture-agent-ca"
    )]
    pub agent_ca_secret: String,
    /// The ConfigMap (in --namespace) where the controller publishes the
    /// agents' CA bundle (ca.crt, no key) for clients such as grpcurl.
    #[arg(
        long,
        env = "AGENT_CA_CONFIG_MAP",
        default_value = "packet-capture-agent-ca"
    )]
    pub agent_ca_config_map: String,
    /// The agents' service account (in --namespace): only its pods get
    /// serving certificates, each for its own node.
    #[arg(
        long,
        env = "AGENT_SERVICE_ACCOUNT",
        default_value = "packet-capture-agent"
    )]
    pub agent_service_account: String,
    /// Call the agents over plain HTTP, without TLS and without signing
    /// their certificates: for agents listening on loopback only.
    #[arg(long)]
    pub insecure_agent_plaintext: bool,
    /// Port of the validating webhook (HTTPS).
    #[arg(long, env = "WEBHOOK_PORT", default_value_t = 8443)]
    pub webhook_port: u16,

    /// Where the webhook's serving certificate comes from (see
    /// docs/controller.md); until there is one the webhook refuses TLS
    /// handshakes and everything else runs.
    #[arg(long, env = "WEBHOOK_CERTS", value_enum, default_value_t = CertSource::Dir)]
    pub webhook_certs: CertSource,

    /// With --webhook-certs=dir: the directory with tls.crt and tls.key,
    /// checked every few seconds.
    #[arg(long, env = "WEBHOOK_CERT_DIR", default_value = "/etc/webhook/certs")]
    pub webhook_cert_dir: PathBuf,

    /// The Secret (in --namespace) with the webhook's tls.crt and tls.key:
    /// read and watched through the API, written by cert-manager, by you,
    /// or (self-managed) by the controller.
    #[arg(
        long,
        env = "WEBHOOK_CERT_SECRET",
        default_value = "packet-capture-webhook-tls"
    )]
    pub webhook_cert_secret: String,

    /// With --webhook-certs=self-managed: the Secret (in --namespace) that
    /// keeps the controller's CA.
    #[arg(long, env = "CA_SECRET", default_value = "packet-capture-ca")]
    pub ca_secret: String,

    /// With --webhook-certs=self-managed: the webhook's Service (in
    /// --namespace), whose DNS names the certificate is for.
    #[arg(
        long,
        env = "WEBHOOK_SERVICE",
        default_value = "packet-capture-webhook"
    )]
    pub webhook_service: String,

    /// With --webhook-certs=self-managed: more names (DNS names or IP
    /// addresses, comma-separated) for the certificate, for a webhook
    /// registered by URL rather than by Service.
    #[arg(long, env = "WEBHOOK_EXTRA_NAMES", value_delimiter = ',', value_parser = parse_name)]
    pub webhook_extra_names: Vec<Name>,

    /// With --webhook-certs=self-managed: the ValidatingWebhookConfiguration
    /// whose caBundle the controller fills in and keeps filled in.
    #[arg(
        long,
        env = "WEBHOOK_CONFIGURATION",
        default_value = "packet-capture-webhook"
    )]
    pub webhook_configuration: String,

    /// Do not serve the webhook at all (when it is not registered with the
    /// API server); the CRD's schema alone then checks PacketCaptureConfigs.
    #[arg(long, env = "DISABLE_WEBHOOK")]
    pub disable_webhook: bool,

    /// Port of /metrics, /healthz and /readyz (HTTP).
    #[arg(long, env = "METRICS_PORT", default_value_t = 8081)]
    pub metrics_port: u16,

    /// Act only while holding the Lease packet-capture-controller in --namespace.
    #[arg(long, env = "LEADER_ELECTION")]
    pub leader_election: bool,

    /// How long a Lease holder that stops renewing keeps it, in seconds.
    #[arg(long, env = "LEASE_DURATION_SECONDS", default_value_t = 15)]
    pub lease_duration_seconds: u64,

    /// This replica's name in the Lease [default: the host name].
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,

    /// DEBUG, INFO, WARNING or ERROR; third-party crates log at WARN unless DEBUG.
    #[arg(long, env = "LOG_LEVEL", default_value = "INFO")]
    pub log_level: LogLevel,

    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Where the agents' CA comes from.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentCa {
    SelfManaged,
    Secret,
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum Command {
    /// Deletes every PacketCaptureConfig (those of --capture-selector),
    /// waits while the running controller stops them on the agents, and
    /// removes the finalizer of any still there at the deadline: the chart's
    /// pre-delete hook, so that uninstalling leaves no capture stuck.
    DeleteCaptures {
        /// How long to wait for the controller, in seconds.
        #[arg(long, default_value_t = 60)]
        timeout_seconds: u64,
    },
    /// Captures this pod's own traffic end to end (the webhook, the
    /// controller, its node's agent, the status, and with --fetch the file
    /// through the aggregated API), then deletes the capture: the chart's
    /// `helm test`. Needs POD_NAME, POD_NAMESPACE and NODE_NAME.
    CheckInstall {
        /// The capture's name; one of that name is deleted first.
        #[arg(long, default_value = "packet-capture-test")]
        capture: String,
        /// The node this pod runs on.
        #[arg(long, env = "NODE_NAME")]
        node: String,
        /// Packets to capture (the capture's maxPackets).
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
        packets: u32,
        /// How long each step may take, in seconds.
        #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(2..))]
        timeout_seconds: u64,
        /// Also read the file through the aggregated API pcap.packet.io.
        #[arg(long)]
        fetch: bool,
    },
}

impl Settings {
    pub const DEFAULT_AGENT_WAIT_SECONDS: u32 = 120;

    pub fn agent_timeout(&self) -> Duration {
        Duration::from_secs(self.agent_timeout_seconds.max(1))
    }

    pub fn agent_wait(&self) -> Duration {
        Duration::from_secs(self.agent_wait_seconds.into())
    }

    pub fn lease_duration(&self) -> Duration {
        Duration::from_secs(self.lease_duration_seconds.max(2))
    }

    pub fn limits(&self) -> CaptureLimits {
        CaptureLimits {
            max_duration: self.max_capture_duration,
            max_packets: self.max_capture_packets,
        }
    }

    pub fn identity(&self) -> String {
        self.identity.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "controller".into());
            format!("{host}-{}", std::process::id())
        })
    }

    /// The agents' port: the flag or environment, else the ConfigMap's
    /// `AGENT_PORT`, else 8080.
    pub async fn agent_port(&self, client: &Client) -> Result<u16> {
        if let Some(port) = self.agent_port {
            return Ok(port);
        }
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), &self.namespace);
        let data = api
            .get_opt(&self.config_map)
            .await?
            .and_then(|cm| cm.data)
            .unwrap_or_default();
        port_from(&data, &format!("{}/{}", self.namespace, self.config_map))
    }
}

/// `AGENT_PORT` from a ConfigMap's data; 8080 when absent.
pub fn port_from(data: &BTreeMap<String, String>, config_map: &str) -> Result<u16> {
    match data.get("AGENT_PORT") {
        None => Ok(DEFAULT_AGENT_PORT),
        Some(v) => v
            .trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| Error::Config {
                config_map: config_map.to_string(),
                key: "AGENT_PORT",
                message: format!("{v:?} is not a port number (1-65535)"),
            }),
    }
}

/// An equality-based label selector, `key=value[,key=value]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelSelector(pub BTreeMap<String, String>);

impl LabelSelector {
    pub fn matches(&self, labels: Option<&BTreeMap<String, String>>) -> bool {
        self.0
            .iter()
            .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
    }
}

impl std::fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(k, v)| format!("{k}={v}")).collect();
        f.write_str(&parts.join(","))
    }
}

pub fn parse_selector(s: &str) -> Result<LabelSelector, String> {
    let mut labels = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                labels.insert(k.trim().to_string(), v.trim().to_string());
            }
            _ => {
                return Err(format!(
                    "{part:?} is not key=value (only equality selectors are supported)"
                ));
            }
        }
    }
    if labels.is_empty() {
        return Err("the agent selector must name at least one label".into());
    }
    Ok(LabelSelector(labels))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_have_the_documented_defaults() {
        let s = Settings::try_parse_from(["packet-capture-controller"]).unwrap();
        assert_eq!(s.namespace, "packet-capture");
        assert_eq!(s.agent_wait(), Timing::default().agent_wait);
        assert_eq!(s.agent_wait(), Duration::from_secs(120));
        assert_eq!(s.config_map, "packet-capture-config");
        assert_eq!(s.agent_selector.to_string(), "app=packet-capture-agent");
        assert_eq!(s.capture_selector, None);
        assert_eq!(s.webhook_port, 8443);
        assert_eq!(s.webhook_certs, CertSource::Dir);
        assert_eq!(s.webhook_cert_secret, "packet-capture-webhook-tls");
        assert_eq!(s.ca_secret, "packet-capture-ca");
        assert_eq!(s.webhook_service, "packet-capture-webhook");
        assert_eq!(s.webhook_configuration, "packet-capture-webhook");
        assert!(s.webhook_extra_names.is_empty());
        assert_eq!(s.metrics_port, 8081);
        assert!(!s.leader_election);
        assert_eq!(s.log_level, LogLevel::Info);
    }

    #[test]
    fn the_certificate_source_and_extra_names_parse() {
        let s = Settings::try_parse_from([
            "packet-capture-controller",
            "--webhook-certs=self-managed",
            "--webhook-extra-names=10.100.0.1,webhook.example.com",
        ])
        .unwrap();
        assert_eq!(s.webhook_certs, CertSource::SelfManaged);
        assert_eq!(
            s.webhook_extra_names,
            [
                Name::Ip("10.100.0.1".parse().unwrap()),
                Name::Dns("webhook.example.com".into())
            ]
        );
        for mode in ["dir", "cert-manager", "secret"] {
            Settings::try_parse_from(["packet-capture-controller", "--webhook-certs", mode])
                .unwrap();
        }
        let err = Settings::try_parse_from([
            "packet-capture-controller",
            "--webhook-extra-names=bad name",
        ])
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("neither an IP address nor a DNS name"),
            "{err}"
        );
    }

    #[test]
    fn the_wait_for_an_agent_is_set_in_seconds_and_never_zero() {
        let s = Settings::try_parse_from(["packet-capture-controller", "--agent-wait-seconds=600"])
            .unwrap();
        assert_eq!(s.agent_wait(), Duration::from_secs(600));
        for bad in ["0", "-1", "2m"] {
            let err = Settings::try_parse_from([
                "packet-capture-controller",
                &format!("--agent-wait-seconds={bad}"),
            ])
            .unwrap_err()
            .to_string();
            assert!(err.contains("--agent-wait-seconds"), "{bad}: {err}");
        }
    }

    #[test]
    fn agent_port_comes_from_the_config_map_with_a_clear_error() {
        let mut data = BTreeMap::new();
        assert_eq!(port_from(&data, "ns/cm").unwrap(), 8080);
        data.insert("AGENT_PORT".to_string(), "9090".to_string());
        assert_eq!(port_from(&data, "ns/cm").unwrap(), 9090);
        data.insert("AGENT_PORT".to_string(), "http".to_string());
        let err = port_from(&data, "packet-capture/packet-capture-config")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "ConfigMap packet-capture/packet-capture-config: AGENT_PORT: \"http\" is not a port number (1-65535)"
        );
    }

    #[test]
    fn selectors_parse_and_match() {
        let sel = parse_selector("app=packet-capture-agent, tier=node").unwrap();
        let mut labels = BTreeMap::new();
        labels.insert("app".to_string(), "packet-capture-agent".to_string());
        assert!(!sel.matches(Some(&labels)));
        labels.insert("tier".to_string(), "node".to_string());
        assert!(sel.matches(Some(&labels)));
        assert!(!sel.matches(None));
        assert!(parse_selector("app in (a,b)").is_err());
        assert!(parse_selector("").is_err());
    }
}
