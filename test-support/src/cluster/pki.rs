//! Certificates, the service-account signing key and kubeconfigs, made with
//! the openssl command-line tool.

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{Error, Result};

const OPENSSL_CONFIG: &str = "\
[req]
distinguished_name = dn
prompt = no
[dn]
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign,digitalSignature
subjectKeyIdentifier = hash
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = clientAuth
";

const DAYS: &str = "3650";

/// The files in `<state>/pki`.
#[derive(Clone, Debug)]
pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// A CA, the apiserver's serving certificate for `server_ips` (and the
    /// in-cluster names), client certificates for the admin and the
    /// controller-manager, and an RSA key pair for service-account tokens.
    pub fn generate(dir: &Path, server_ips: &[IpAddr]) -> Result<Self> {
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let pki = Self {
            dir: dir.to_path_buf(),
        };
        let config = pki.path("openssl.cnf");
        fs::write(&config, OPENSSL_CONFIG).map_err(|e| Error::io(&config, e))?;
        pki.cert("ca", "ca", "/CN=packet-capture-local-ca", None)?;
        let mut san: Vec<String> = server_ips.iter().map(|ip| format!("IP:{ip}")).collect();
        san.extend(
            [
                "IP:127.0.0.1",
                "IP:10.96.0.1",
                "DNS:localhost",
                "DNS:kubernetes",
                "DNS:kubernetes.default",
                "DNS:kubernetes.default.svc",
                "DNS:kubernetes.default.svc.cluster.local",
            ]
            .map(String::from),
        );
        pki.cert(
            "apiserver",
            "server",
            "/CN=kube-apiserver",
            Some(&san.join(",")),
        )?;
        pki.cert("admin", "client", "/O=system:masters/CN=admin", None)?;
        pki.cert(
            "controller-manager",
            "client",
            "/CN=system:kube-controller-manager",
            None,
        )?;
        pki.cert("scheduler", "client", "/CN=system:kube-scheduler", None)?;
        // The front proxy: the apiserver calls aggregated APIs as this
        // client of a CA of its own (as kubeadm sets it up), naming the user
        // in headers that only a client of that CA is believed.
        let front = Self::new_ca(
            &dir.join("front-proxy"),
            "/CN=packet-capture-local-front-proxy-ca",
        )?;
        front.issue(
            dir,
            "front-proxy-client",
            "client",
            "/CN=front-proxy-client",
            None,
        )?;
        pki.cert(
            "apiserver-kubelet-client",
            "client",
            "/O=system:masters/CN=kube-apiserver-kubelet-client",
            None,
        )?;
        openssl(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            &pki.str("sa.key"),
        ])?;
        openssl(&[
            "pkey",
            "-in",
            &pki.str("sa.key"),
            "-pubout",
            "-out",
            &pki.str("sa.pub"),
        ])?;
        Ok(pki)
    }

    /// A CA of its own in `dir` (`ca.crt`, `ca.key`), apart from the
    /// cluster's: the agents' CA, as cert-manager would keep it.
    pub fn new_ca(dir: &Path, subject: &str) -> Result<Self> {
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let pki = Self {
            dir: dir.to_path_buf(),
        };
        let config = pki.path("openssl.cnf");
        fs::write(&config, OPENSSL_CONFIG).map_err(|e| Error::io(&config, e))?;
        pki.cert("ca", "ca", subject, None)?;
        Ok(pki)
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    pub fn str(&self, file: &str) -> String {
        self.path(file).display().to_string()
    }

    /// The files generated earlier in `dir`.
    pub fn open(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }

    /// `tls.key` and `tls.crt` in `dir`: a serving certificate for `ips`
    /// and the DNS names `dns`, signed by the CA.
    pub fn serving(&self, dir: &Path, ips: &[IpAddr], dns: &[&str]) -> Result<()> {
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut san: Vec<String> = ips.iter().map(|ip| format!("IP:{ip}")).collect();
        san.extend(dns.iter().map(|name| format!("DNS:{name}")));
        let (key, crt) = (dir.join("tls.key"), dir.join("tls.crt"));
        self.cert_at(
            (&key.display().to_string(), &crt.display().to_string()),
            "server",
            "/CN=packet-capture-local-serving",
            Some(&san.join(",")),
        )
    }

    /// `<name>.key` and `<name>.crt` with the extensions of `section`,
    /// signed by the CA (or self-signed for the CA itself).
    fn cert(&self, name: &str, section: &str, subject: &str, san: Option<&str>) -> Result<()> {
        let key = self.str(&format!("{name}.key"));
        let crt = self.str(&format!("{name}.crt"));
        self.cert_at((&key, &crt), section, subject, san)
    }

    /// A key and certificate at the paths `(key, crt)`, signed by the CA
    /// unless they are the CA's own.
    fn cert_at(
        &self,
        (key, crt): (&str, &str),
        section: &str,
        subject: &str,
        san: Option<&str>,
    ) -> Result<()> {
        let config = self.str("openssl.cnf");
        let (ca_crt, ca_key) = (self.str("ca.crt"), self.str("ca.key"));
        let mut args = vec![
            "req",
            "-x509",
            "-new",
            "-config",
            &config,
            "-extensions",
            section,
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            key,
            "-out",
            crt,
            "-days",
            DAYS,
            "-subj",
            subject,
        ];
        if crt != ca_crt {
            args.extend(["-CA", &ca_crt, "-CAkey", &ca_key]);
        }
        let san = san.map(|s| format!("subjectAltName={s}"));
        if let Some(san) = &san {
            args.extend(["-addext", san]);
        }
        openssl(&args)
    }

    /// `<dir>/<name>.key` and `<dir>/<name>.crt`, signed by the CA, with
    /// the extensions of `section` (`server` or `client`).
    pub fn issue(
        &self,
        dir: &Path,
        name: &str,
        section: &str,
        subject: &str,
        san: Option<&str>,
    ) -> Result<()> {
        let key = dir.join(format!("{name}.key")).display().to_string();
        let crt = dir.join(format!("{name}.crt")).display().to_string();
        self.cert_at((&key, &crt), section, subject, san)
    }

    /// A kubeconfig that authenticates with the CA's client certificate
    /// `<name>` of this directory.
    pub fn cert_kubeconfig(&self, server: &str, user: &str, cert: &str) -> String {
        self.cert_kubeconfig_at(server, user, &self.path(cert))
    }

    /// A kubeconfig that authenticates with `<cert>.crt` and `<cert>.key`.
    pub fn cert_kubeconfig_at(&self, server: &str, user: &str, cert: &Path) -> String {
        let auth = format!(
            "client-certificate: {}.crt\n    client-key: {}.key",
            cert.display(),
            cert.display()
        );
        self.kubeconfig(server, user, &auth)
    }

    /// A kubeconfig that authenticates with a bearer token.
    pub fn token_kubeconfig(&self, server: &str, user: &str, token: &str) -> String {
        self.kubeconfig(server, user, &format!("token: {token}"))
    }

    fn kubeconfig(&self, server: &str, user: &str, auth: &str) -> String {
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: packet-capture
  cluster:
    server: {server}
    certificate-authority: {ca}
users:
- name: {user}
  user:
    {auth}
contexts:
- name: {user}@packet-capture
  context:
    cluster: packet-capture
    user: {user}
current-context: {user}@packet-capture
",
            ca = self.str("ca.crt")
        )
    }
}

fn openssl(args: &[&str]) -> Result<()> {
    super::checked_output(Command::new("openssl").args(args)).map(drop)
}
