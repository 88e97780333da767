use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser as _;
use packet_capture_agent::api::{self, Api, Authorizer};
use packet_capture_agent::capture::{Engine, EngineConfig};
use packet_capture_agent::config::{Command, Config, Serving};
use packet_capture_agent::files::CaptureDir;
use packet_capture_agent::tls;
use packet_capture_common::logging::{LogControl, follow_config_map};
use packet_capture_common::tls::ServingCert;
use tokio::signal::unix::{SignalKind, signal};

/// Time the captures get to finish their files on SIGTERM, and then the
/// connections still open; together under the 10 s a pod is given.
const ENGINE_STOP: Duration = Duration::from_secs(7);
const DRAIN: Duration = Duration::from_secs(2);

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let serving = config.serving().map_err(anyhow::Error::msg)?;
    if let Some(Command::Health { timeout }) = config.command {
        let tls = serving != Serving::Plaintext;
        return health(config.local_address(), tls, Duration::from_secs(timeout));
    }
    let (log, _flushed) =
        packet_capture_common::logging::init(config.log_level).map_err(anyhow::Error::msg)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(run(config, serving, log));
    // Blocking work still running (a download's read) must not hold up exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

async fn run(config: Config, serving: Serving, log: LogControl) -> anyhow::Result<()> {
    // Signals are caught from the start, so that an early SIGTERM still
    // means a clean stop.
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let authorizer = if config.insecure_no_auth {
        tracing::warn!(
            "INSECURE: --insecure-no-auth is set: anyone who can reach the agent's port can start captures and download capture files; use it only for local work without a cluster"
        );
        None
    } else {
        Some(
            Authorizer::infer(config.token_audience.clone())
                .await
                .context(
                    "the API checks callers with the cluster's TokenReview and SubjectAccessReview, \
                     and no Kubernetes access was found (KUBECONFIG or in-cluster); \
                     --insecure-no-auth runs without authentication",
                )?,
        )
    };
    let address = config.listen_address();
    let source = match serving {
        Serving::Plaintext => None,
        Serving::Files { cert, key } => Some(tls::Source::Files { cert, key }),
        Serving::Cluster { addresses } => {
            let client = match &authorizer {
                Some(a) => a.client(),
                None => kube::Client::try_default().await.context(
                    "the agent asks the cluster for its serving certificate, and no Kubernetes \
                     access was found (KUBECONFIG or in-cluster); give TLS_CERT_FILE and TLS_KEY_FILE",
                )?,
            };
            Some(tls::Source::Cluster {
                client,
                node: config.node_name(),
                addresses,
            })
        }
    };
    let cert = Arc::new(ServingCert::default());
    let (acceptor, certificate_failed) = match source {
        None => {
            tracing::warn!(
                "INSECURE: --insecure-plaintext is set: the API is served without TLS on {address}"
            );
            (None, None)
        }
        Some(source) => {
            let config = tls::server_config(cert.clone()).context("the TLS configuration")?;
            let (first_tx, first_rx) = tokio::sync::oneshot::channel();
            let task = tokio::spawn(tls::keep_current(source, cert.clone(), first_tx));
            // The port opens only once there is a certificate: until then a
            // client's connection is refused, and it tries again later.
            tracing::info!("waiting for the serving certificate before serving the API");
            tokio::select! {
                first = first_rx => if first.is_err() {
                    return Err(certificate_failure(task).await);
                },
                _ = sigterm.recv() => return Ok(()),
                _ = sigint.recv() => return Ok(()),
            }
            (
                Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))),
                Some(task),
            )
        }
    };
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("AGENT_PORT {}: listening on {address}", config.port))?;
    let files = CaptureDir::new(
        &config.capture_dir,
        config.max_capture_files as usize,
        config.compression,
    )
    .with_context(|| format!("CAPTURE_DIR {}", config.capture_dir.display()))?;
    let engine = Engine::start(EngineConfig {
        node_name: config.node_name(),
        files: Arc::new(files),
        max_file_bytes: config.max_file_bytes(),
        limits: config.limits(),
        max_running: config.max_concurrent_captures.into(),
        backend: config.backend,
        ring_bytes: config.ring_buffer_mb << 20,
        tc_attach: config.tc_attach,
        kernel_filters: !config.filters_in_user_space,
        own_api: Some(address),
    })
    .await?;
    // LOG_LEVEL edited in the ConfigMap applies without a restart, to the
    // agent's lines and to the eBPF programs' diagnostics alike.
    if let (Some(namespace), Some(authorizer)) = (config.namespace.clone(), &authorizer) {
        let (client, name, engine) = (
            authorizer.client(),
            config.config_map.clone(),
            engine.clone(),
        );
        tokio::spawn(async move {
            follow_config_map(client, &namespace, &name, log, |_| {
                engine.log_level_changed()
            })
            .await
        });
    }
    let router = api::router(Api::new(engine.clone(), authorizer));
    tracing::info!(
        backend = engine.backend(),
        interfaces = ?engine.interfaces(),
        node = engine.node_name(),
        "listening on {}",
        listener.local_addr()?
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(api::serve(listener, router, acceptor, async {
        let _ = stop_rx.await;
    }));
    // Certificate files that are unusable at start end the agent, as any
    // bad setting does.
    let certificate = async {
        match certificate_failed {
            Some(task) => certificate_failure(task).await,
            None => std::future::pending().await,
        }
    };
    let mut failure = None;
    let signal = tokio::select! {
        _ = sigterm.recv() => "SIGTERM",
        _ = sigint.recv() => "SIGINT",
        e = certificate => {
            failure = Some(e);
            "a failure"
        }
    };
    tracing::info!(
        signal,
        "shutting down: stopping captures, then closing the API"
    );
    // The API answers while the captures end, so that a controller's
    // watch opened meanwhile (one just started, say) learns how they
    // ended; new captures are refused.
    engine.shutdown(ENGINE_STOP).await;
    let _ = stop_tx.send(());
    match tokio::time::timeout(DRAIN, server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "serving the API"),
        Ok(Err(e)) => tracing::warn!(error = %e, "the API server task"),
        Err(_) => tracing::info!("closing the connections still open"),
    }
    tracing::info!("stopped");
    failure.map_or(Ok(()), Err)
}

/// Why the task keeping the serving certificate ended: it returns only for
/// certificate files unusable at start.
async fn certificate_failure(
    task: tokio::task::JoinHandle<Result<std::convert::Infallible, tls::TlsError>>,
) -> anyhow::Error {
    match task.await {
        Ok(Err(e)) => anyhow::anyhow!("TLS_CERT_FILE, TLS_KEY_FILE: {e}"),
        Err(e) => anyhow::anyhow!("the serving certificate task: {e}"),
    }
}

/// `GET /health` of the agent at `address` with an HTTP/1.1 request (the
/// image has no curl), over TLS when the agent serves TLS; prints the
/// answer and fails unless it is 200. The agent's certificate is not
/// verified: this asks the agent of this host whether it answers, and
/// sends nothing secret.
fn health(address: SocketAddr, tls: bool, timeout: Duration) -> anyhow::Result<()> {
    let mut tcp = std::net::TcpStream::connect_timeout(&address, timeout)
        .with_context(|| format!("connecting to the agent at {address}"))?;
    tcp.set_read_timeout(Some(timeout))?;
    tcp.set_write_timeout(Some(timeout))?;
    let mut session;
    let stream: &mut dyn ReadWrite = if tls {
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate))
        .with_no_client_auth();
        let name = rustls::pki_types::ServerName::from(address.ip());
        let connection = rustls::ClientConnection::new(Arc::new(config), name)?;
        session = rustls::StreamOwned::new(connection, tcp);
        &mut session
    } else {
        &mut tcp
    };
    write!(
        stream,
        "GET /health HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = Vec::new();
    // A server may close a TLS connection without close_notify after the
    // answer; what was read is the answer.
    if let Err(e) = stream.read_to_end(&mut answer)
        && answer.is_empty()
    {
        return Err(e).with_context(|| format!("reading the answer of {address}"));
    }
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head.lines().next().unwrap_or_default();
    println!("{}", body.trim());
    anyhow::ensure!(
        status.split_whitespace().nth(1) == Some("200"),
        "the agent at {address} answered {status:?}"
    );
    Ok(())
}

trait ReadWrite: std::io::Read + std::io::Write {}
impl<T: std::io::Read + std::io::Write> ReadWrite for T {}

/// The handshake's signatures are still checked, with ring's algorithms.
fn algorithms() -> rustls::crypto::WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

/// Accepts any certificate: for [`health`] only.
#[derive(Debug)]
struct AnyCertificate;

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        algorithms().supported_schemes()
    }
}
