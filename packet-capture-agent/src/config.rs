//! The agent's settings: command-line flags, each with the environment
//! variable (ConfigMap key) of the same meaning. A malformed value stops the
//! agent at start with a message that names the key.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;

use clap::Parser;

use crate::capture::BackendChoice;
use crate::ebpf::TcAttach;
use crate::files::Compression;
use packet_capture_common::abi::MAX_SLOTS;
use packet_capture_common::logging::LogLevel;
use packet_capture_common::validate::CaptureLimits;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "packet-capture-agent",
    version,
    about = "Captures packets on this node for packet-capture"
)]
pub struct Config {
    /// Port of the API (gRPC and REST on one listener).
    #[arg(
        long = "port",
        env = "AGENT_PORT",
        value_name = "AGENT_PORT",
        default_value_t = 8080
    )]
    pub port: u16,

    /// Address to listen on: by default the node's (NODE_IP), else
    /// 127.0.0.1. Never every address unless asked (0.0.0.0 or ::).
    #[arg(long, env = "AGENT_BIND_ADDRESS", value_name = "AGENT_BIND_ADDRESS")]
    pub bind_address: Option<IpAddr>,

    /// This node's address (the downward API sets it from status.hostIP):
    /// where the agent listens, and what its serving certificate names.
    #[arg(long, env = "NODE_IP", value_name = "NODE_IP")]
    pub node_ip: Option<IpAddr>,

    /// The API's serving certificate (PEM, then any chain), read again
    /// when it changes; with TLS_KEY_FILE. Unset: the agent asks the
    /// cluster for one (a CertificateSigningRequest the controller signs).
    #[arg(
        long,
        env = "TLS_CERT_FILE",
        value_name = "TLS_CERT_FILE",
        requires = "tls_key_file"
    )]
    pub tls_cert_file: Option<PathBuf>,

    /// The private key of TLS_CERT_FILE (PEM).
    #[arg(
        long,
        env = "TLS_KEY_FILE",
        value_name = "TLS_KEY_FILE",
        requires = "tls_cert_file"
    )]
    pub tls_key_file: Option<PathBuf>,

    /// Serve the API without TLS. Refused unless the agent listens on a
    /// loopback address: tokens and capture files must not cross a network
    /// in clear.
    #[arg(long, conflicts_with = "tls_cert_file")]
    pub insecure_plaintext: bool,

    /// Where capture files are written.
    #[arg(
        long,
        env = "CAPTURE_DIR",
        value_name = "CAPTURE_DIR",
        default_value = "/var/lib/packet-captures"
    )]
    pub capture_dir: PathBuf,

    /// This node's name (the downward API sets it); the host name if unset.
    #[arg(long, env = "NODE_NAME", value_name = "NODE_NAME")]
    pub node_name: Option<String>,

    /// Capture files kept on this node; the oldest go first.
    #[arg(long, env = "MAX_CAPTURE_FILES", value_name = "MAX_CAPTURE_FILES", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_capture_files: u64,

    /// A capture stops before its file grows past this many MiB.
    #[arg(long, env = "MAX_CAPTURE_FILE_SIZE_MB", value_name = "MAX_CAPTURE_FILE_SIZE_MB", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    pub max_capture_file_size_mb: u64,

    /// The longest capture this agent runs, in seconds.
    #[arg(long, env = "MAX_CAPTURE_DURATION", value_name = "MAX_CAPTURE_DURATION",
          default_value_t = CaptureLimits::DEFAULT_MAX_DURATION,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_capture_duration: u32,

    /// The largest maxPackets this agent accepts.
    #[arg(long, env = "MAX_CAPTURE_PACKETS", value_name = "MAX_CAPTURE_PACKETS",
          default_value_t = CaptureLimits::DEFAULT_MAX_PACKETS,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_capture_packets: u32,

    /// Captures this agent runs at once; a start beyond it is refused.
    #[arg(long, env = "MAX_CONCURRENT_CAPTURES", value_name = "MAX_CONCURRENT_CAPTURES",
          default_value_t = 16,
          value_parser = clap::value_parser!(u16).range(1..=MAX_SLOTS as i64))]
    pub max_concurrent_captures: u16,

    /// DEBUG, INFO, WARNING or ERROR.
    #[arg(
        long,
        env = "LOG_LEVEL",
        value_name = "LOG_LEVEL",
        default_value = "INFO"
    )]
    pub log_level: LogLevel,

    /// Namespace of the ConfigMap whose LOG_LEVEL the agent applies while it
    /// runs (the DaemonSet sets it); unset, LOG_LEVEL is read at start only.
    #[arg(long, env = "POD_NAMESPACE", value_name = "POD_NAMESPACE")]
    pub namespace: Option<String>,

    /// That ConfigMap, in --namespace.
    #[arg(
        long,
        env = "CONFIG_MAP",
        value_name = "CONFIG_MAP",
        default_value = "packet-capture-config"
    )]
    pub config_map: String,

    /// How completed files are compressed: gzip or zstd.
    #[arg(
        long,
        env = "COMPRESSION",
        value_name = "COMPRESSION",
        default_value = "gzip"
    )]
    pub compression: Compression,

    /// Capture backend: auto (eBPF, libpcap if eBPF cannot load), ebpf, pcap.
    #[arg(long, env = "CAPTURE_BACKEND", value_name = "CAPTURE_BACKEND", value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,

    /// How the eBPF programs attach to interfaces: auto (TCX where the kernel
    /// has it, from 6.6), tcx, or netlink (a clsact qdisc and tc filters,
    /// as before TCX). For testing and troubleshooting; auto is right.
    #[arg(long, env = "TC_ATTACH", value_name = "TC_ATTACH", value_enum,
          default_value_t = TcAttach::Auto, hide = true)]
    pub tc_attach: TcAttach,

    /// Run every capture's filter in user space, on what the kernel
    /// selected by targets and ports, as before filters ran in the kernel.
    /// For measuring what the kernel path saves; off is right.
    #[arg(long, env = "FILTERS_IN_USER_SPACE", hide = true)]
    pub filters_in_user_space: bool,

    /// Ring buffer between the kernel and the agent, in MiB (a power of two).
    #[arg(long, env = "RING_BUFFER_MB", value_name = "RING_BUFFER_MB", default_value_t = 8,
          value_parser = parse_ring_mb)]
    pub ring_buffer_mb: u32,

    /// Serve the API without authentication (for local use without a
    /// cluster). Refused unless the agent listens on a loopback address:
    /// anyone who reaches it could capture and read any traffic.
    #[arg(long)]
    pub insecure_no_auth: bool,

    /// Audience a caller's token must have (TokenReview).
    #[arg(
        long,
        env = "TOKEN_AUDIENCE",
        value_name = "TOKEN_AUDIENCE",
        default_value = "packet-capture-agent"
    )]
    pub token_audience: String,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Asks the agent running with these settings for its health
    /// (`GET /health` on AGENT_PORT) and exits 0 when it answers 200: the
    /// probe and the troubleshooting check inside the container, which has
    /// no curl, reading the port from the same ConfigMap as the agent.
    Health {
        /// How long to wait for the answer, in seconds.
        #[arg(long, default_value_t = 5)]
        timeout: u64,
    },
}

/// How the API is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Serving {
    /// Plain HTTP, on a loopback address only.
    Plaintext,
    /// TLS with a certificate from files.
    Files { cert: PathBuf, key: PathBuf },
    /// TLS with a certificate the cluster signs for these addresses.
    Cluster { addresses: Vec<IpAddr> },
}

#[derive(Debug, thiserror::Error)]
pub enum RingSizeError {
    #[error(transparent)]
    NotANumber(#[from] std::num::ParseIntError),
    #[error("{0} is not a power of two between 1 and 1024")]
    OutOfRange(u32),
}

fn parse_ring_mb(s: &str) -> Result<u32, RingSizeError> {
    let mb: u32 = s.parse()?;
    if !mb.is_power_of_two() || mb > 1024 {
        return Err(RingSizeError::OutOfRange(mb));
    }
    Ok(mb)
}

impl Config {
    pub fn node_name(&self) -> String {
        self.node_name.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "unknown".into())
        })
    }

    pub fn max_file_bytes(&self) -> u64 {
        self.max_capture_file_size_mb * 1024 * 1024
    }

    pub fn limits(&self) -> CaptureLimits {
        CaptureLimits {
            max_duration: self.max_capture_duration,
            max_packets: self.max_capture_packets,
        }
    }

    /// Where the API listens: AGENT_BIND_ADDRESS, else the node's
    /// address, else loopback.
    pub fn listen_address(&self) -> SocketAddr {
        let ip = self
            .bind_address
            .or(self.node_ip)
            .unwrap_or(Ipv4Addr::LOCALHOST.into());
        SocketAddr::new(ip, self.port)
    }

    /// Where a client on this host reaches the API: the listen address, or
    /// loopback when the agent listens on every address.
    pub fn local_address(&self) -> SocketAddr {
        let ip = match self.listen_address().ip() {
            IpAddr::V4(a) if a.is_unspecified() => Ipv4Addr::LOCALHOST.into(),
            IpAddr::V6(a) if a.is_unspecified() => Ipv6Addr::LOCALHOST.into(),
            ip => ip,
        };
        SocketAddr::new(ip, self.port)
    }

    /// How the API is served, or what is wrong with the settings for it.
    pub fn serving(&self) -> Result<Serving, String> {
        let listen = self.listen_address().ip();
        if self.insecure_no_auth && !listen.is_loopback() {
            return Err(format!(
                "AGENT_BIND_ADDRESS: --insecure-no-auth serves the API without authentication, \
                 which is refused unless the agent listens on a loopback address, not {listen}"
            ));
        }
        if self.insecure_plaintext {
            if !listen.is_loopback() {
                return Err(format!(
                    "AGENT_BIND_ADDRESS: --insecure-plaintext serves the API without TLS, which is \
                     refused unless the agent listens on a loopback address, not {listen}"
                ));
            }
            return Ok(Serving::Plaintext);
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert_file, &self.tls_key_file) {
            return Ok(Serving::Files {
                cert: cert.clone(),
                key: key.clone(),
            });
        }
        let node_ip = self.node_ip.ok_or_else(|| {
            "NODE_IP: the agent asks the cluster for a certificate naming its node's address; \
             set NODE_IP (the DaemonSet sets it from status.hostIP), or give \
             TLS_CERT_FILE and TLS_KEY_FILE"
                .to_owned()
        })?;
        let mut addresses = vec![node_ip];
        if !listen.is_unspecified() && !listen.is_loopback() && listen != node_ip {
            addresses.push(listen);
        }
        Ok(Serving::Cluster { addresses })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        Config::try_parse_from(std::iter::once("agent").chain(args.iter().copied()))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.port, 8080);
        assert_eq!(c.capture_dir, PathBuf::from("/var/lib/packet-captures"));
        assert_eq!(c.max_capture_files, 5);
        assert_eq!(c.max_file_bytes(), 10 * 1024 * 1024);
        assert_eq!(c.log_level, LogLevel::Info);
        assert_eq!(c.compression, Compression::Gzip);
        assert_eq!(c.tc_attach, TcAttach::Auto);
        assert!(!c.insecure_no_auth);
        assert_eq!(c.listen_address().to_string(), "127.0.0.1:8080");
    }

    #[test]
    fn the_api_is_served_over_tls_on_the_nodes_address() {
        let c = parse(&["--node-ip", "10.0.0.7"]).unwrap();
        assert_eq!(c.listen_address().to_string(), "10.0.0.7:8080");
        let node: IpAddr = "10.0.0.7".parse().unwrap();
        assert_eq!(
            c.serving(),
            Ok(Serving::Cluster {
                addresses: vec![node]
            })
        );
        let c = parse(&["--node-ip", "10.0.0.7", "--bind-address", "10.0.0.8"]).unwrap();
        assert_eq!(
            c.serving(),
            Ok(Serving::Cluster {
                addresses: vec![node, "10.0.0.8".parse().unwrap()]
            })
        );
        let c = parse(&["--tls-cert-file", "c.pem", "--tls-key-file", "k.pem"]).unwrap();
        assert_eq!(
            c.serving(),
            Ok(Serving::Files {
                cert: "c.pem".into(),
                key: "k.pem".into()
            })
        );
        for args in [
            &["--insecure-plaintext"][..],
            &["--insecure-plaintext", "--bind-address", "::1"],
        ] {
            assert_eq!(
                parse(args).unwrap().serving(),
                Ok(Serving::Plaintext),
                "{args:?}"
            );
        }
        for (args, key) in [
            (
                &["--insecure-plaintext", "--node-ip", "10.0.0.7"][..],
                "AGENT_BIND_ADDRESS",
            ),
            (
                &["--insecure-plaintext", "--bind-address", "0.0.0.0"],
                "AGENT_BIND_ADDRESS",
            ),
            (&[], "NODE_IP"),
        ] {
            let err = parse(args).unwrap().serving().unwrap_err();
            assert!(err.starts_with(key), "{args:?}: {err}");
        }
        // No authentication only where no one else can reach the API.
        let cert = ["--tls-cert-file", "c.pem", "--tls-key-file", "k.pem"];
        for (listen, accepted) in [
            (&["--bind-address", "127.0.0.1"][..], true),
            (&["--bind-address", "::1"], true),
            (&[], true),
            (&["--node-ip", "10.0.0.7"], false),
            (&["--bind-address", "0.0.0.0"], false),
            (&["--bind-address", "::"], false),
        ] {
            let args = [&["--insecure-no-auth"][..], listen, &cert].concat();
            let serving = parse(&args).unwrap().serving();
            match serving {
                Ok(_) => assert!(accepted, "{args:?} was accepted"),
                Err(e) => {
                    assert!(!accepted, "{args:?}: {e}");
                    assert!(
                        e.starts_with("AGENT_BIND_ADDRESS: --insecure-no-auth"),
                        "{args:?}: {e}"
                    );
                }
            }
        }
        assert!(
            parse(&["--tls-cert-file", "c.pem"]).is_err(),
            "the key is required"
        );
    }

    #[test]
    fn health_asks_the_address_the_agent_listens_on() {
        let c = parse(&["--port", "9000", "health"]).unwrap();
        assert!(matches!(c.command, Some(Command::Health { timeout: 5 })));
        assert_eq!(c.local_address().to_string(), "127.0.0.1:9000");
        let c = parse(&["--bind-address", "10.0.0.7", "health"]).unwrap();
        assert_eq!(c.local_address().to_string(), "10.0.0.7:8080");
        let c = parse(&["--bind-address", "0.0.0.0", "health"]).unwrap();
        assert_eq!(c.local_address().to_string(), "127.0.0.1:8080");
    }

    #[test]
    fn bad_values_name_the_key() {
        for (args, key) in [
            (&["--port", "http"][..], "AGENT_PORT"),
            (&["--max-capture-files", "0"][..], "MAX_CAPTURE_FILES"),
            (
                &["--max-capture-file-size-mb=-3"][..],
                "MAX_CAPTURE_FILE_SIZE_MB",
            ),
            (&["--log-level", "LOUD"][..], "LOG_LEVEL"),
            (&["--compression", "rar"][..], "COMPRESSION"),
            (&["--ring-buffer-mb", "3"][..], "RING_BUFFER_MB"),
            (&["--tc-attach", "xdp"][..], "TC_ATTACH"),
        ] {
            let err = parse(args).unwrap_err();
            assert!(err.contains(key), "{args:?}: {err}");
        }
    }
}
