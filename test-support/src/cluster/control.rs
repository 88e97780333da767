//! The control plane's processes: etcd, kube-apiserver and
//! kube-controller-manager, with the flags that make them a small cluster.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use super::build::Binaries;
use super::pki::Pki;
use super::process::Spawn;
use super::{Error, Lifetime, Result};

/// The issuer of service-account tokens (and so their default audience).
pub const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// The controllers a kubelet-less cluster needs: namespaces are emptied when
/// deleted, owned objects are collected, every namespace gets its `default`
/// service account and the root CA ConfigMap, pods bound to a node that is
/// gone are removed, and aggregated ClusterRoles are filled in. No workload
/// controllers: nothing would run the pods they create. No node lifecycle:
/// simulated nodes send no heartbeats.
const CONTROLLERS: &str = "namespace-controller,garbage-collector-controller,\
serviceaccount-controller,serviceaccount-token-controller,\
root-ca-certificate-publisher-controller,pod-garbage-collector-controller,\
clusterrole-aggregation-controller";
/// Added when real nodes run pods: the chart's Deployment, DaemonSet and
/// uninstall Job, and the endpoints behind its Services (the apiserver
/// reaches the webhook through them).
const WORKLOAD_CONTROLLERS: &str = "deployment-controller,replicaset-controller,\
daemonset-controller,job-controller,endpoints-controller,endpointslice-controller";

/// A port nobody listens on now.
pub fn free_port(ip: IpAddr) -> Result<u16> {
    let listener = TcpListener::bind(SocketAddr::new(ip, 0))
        .map_err(|e| Error::Process(format!("no free port on {ip}: {e}")))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| Error::Process(format!("no free port on {ip}: {e}")))
}

pub struct Starter {
    pub binaries: Binaries,
    pub dir: PathBuf,
    pub lifetime: Lifetime,
}

impl Starter {
    fn start(&self, name: &str, cmd: Command) -> Result<Child> {
        let logs = self.dir.join("logs");
        std::fs::create_dir_all(&logs).map_err(|e| Error::io(&logs, e))?;
        Spawn {
            cmd,
            lifetime: self.lifetime,
            netns: None,
            log: &logs.join(format!("{name}.log")),
            pipe_stderr: false,
        }
        .start()
    }

    fn command(&self, binary: &str) -> Command {
        Command::new(self.binaries.path(binary))
    }

    /// etcd on loopback; returns its client URL.
    pub fn etcd(&self) -> Result<(Child, String)> {
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let client = format!("http://127.0.0.1:{}", free_port(lo)?);
        let peer = format!("http://127.0.0.1:{}", free_port(lo)?);
        let data = self.dir.join("etcd");
        let mut cmd = self.command("etcd");
        cmd.args(["--name", "default", "--data-dir"])
            .arg(&data)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("default={peer}")])
            // A throwaway cluster: losing the last writes on a crash is fine.
            .args(["--unsafe-no-fsync", "--log-level", "warn"]);
        Ok((self.start("etcd", cmd)?, client))
    }

    /// kube-apiserver on `ip:port` with RBAC, client certificates and
    /// service-account tokens.
    pub fn apiserver(&self, pki: &Pki, etcd: &str, ip: IpAddr, port: u16) -> Result<Child> {
        let mut cmd = self.command("kube-apiserver");
        let file = |flag: &str, name: &str| format!("--{flag}={}", pki.str(name));
        cmd.arg(format!("--etcd-servers={etcd}"))
            .arg(format!("--bind-address={ip}"))
            .arg(format!("--advertise-address={ip}"))
            .arg(format!("--secure-port={port}"))
            .arg(file("tls-cert-file", "apiserver.crt"))
            .arg(file("tls-private-key-file", "apiserver.key"))
            .arg(file("client-ca-file", "ca.crt"))
            .arg(file("service-account-key-file", "sa.pub"))
            .arg(file("service-account-signing-key-file", "sa.key"))
            .arg(format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"))
            // Logs and exec of real nodes' pods: the apiserver calls their
            // kubelets as a client of the cluster's CA.
            .arg(file(
                "kubelet-client-certificate",
                "apiserver-kubelet-client.crt",
            ))
            .arg(file("kubelet-client-key", "apiserver-kubelet-client.key"))
            // Aggregated APIs: the front proxy's client certificate, and
            // the headers that say who the user is.
            .arg(file("requestheader-client-ca-file", "front-proxy/ca.crt"))
            .arg(file("proxy-client-cert-file", "front-proxy-client.crt"))
            .arg(file("proxy-client-key-file", "front-proxy-client.key"))
            .args([
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-uid-headers=X-Remote-Uid",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            ])
            .args([
                // Webhooks and aggregated APIs by their Service's endpoints:
                // the apiserver runs on the host, where no kube-proxy is.
                "--enable-aggregator-routing=true",
                // Kubelets by address: node names are not in any DNS here.
                "--kubelet-preferred-address-types=InternalIP",
                "--authorization-mode=Node,RBAC",
            ])
            .arg(format!(
                "--service-cluster-ip-range={}",
                super::network::SERVICE_CIDR_V4
            ))
            .args(["--allow-privileged=true", "--profiling=false", "--v=1"])
            // Shorter than the default minute, so that a test shows a
            // stream through an aggregated API outlasting it quickly.
            .arg("--request-timeout=20s");
        self.start("kube-apiserver", cmd)
    }

    pub fn controller_manager(
        &self,
        pki: &Pki,
        kubeconfig: &Path,
        workloads: bool,
    ) -> Result<Child> {
        let controllers = if workloads {
            format!("{CONTROLLERS},{WORKLOAD_CONTROLLERS}")
        } else {
            CONTROLLERS.to_string()
        };
        let mut cmd = self.command("kube-controller-manager");
        cmd.arg("--kubeconfig")
            .arg(kubeconfig)
            .arg(format!(
                "--service-account-private-key-file={}",
                pki.str("sa.key")
            ))
            .arg(format!("--root-ca-file={}", pki.str("ca.crt")))
            .arg(format!("--controllers={controllers}"))
            .args([
                "--secure-port=0",
                "--leader-elect=false",
                // Each controller acts as its own service account with the
                // bootstrap roles (system:controller:*), as kubeadm sets it up.
                "--use-service-account-credentials=true",
                "--concurrent-gc-syncs=5",
                "--v=1",
            ]);
        self.start("kube-controller-manager", cmd)
    }

    /// kube-scheduler, for the pods of real nodes; no leader election, no
    /// serving port.
    pub fn scheduler(&self, kubeconfig: &Path) -> Result<Child> {
        let mut cmd = self.command("kube-scheduler");
        for flag in [
            "kubeconfig",
            "authentication-kubeconfig",
            "authorization-kubeconfig",
        ] {
            cmd.arg(format!("--{flag}={}", kubeconfig.display()));
        }
        cmd.args(["--leader-elect=false", "--secure-port=0", "--v=1"]);
        self.start("kube-scheduler", cmd)
    }
}
