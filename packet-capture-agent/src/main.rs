use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser as _;
use packet_capture_agent::api::{self, Api, Authorizer};
use packet_capture_agent::capture::{Engine, EngineConfig};
use packet_capture_agent::config::{Command, Config};
use packet_capture_agent::files::CaptureDir;
use packet_capture_common::logging::{LogControl, follow_config_map};
use tokio::signal::unix::{SignalKind, signal};

/// Time the captures get to finish their files on SIGTERM, and then the
/// connections still open; together under the 10 s a pod is given.
const ENGINE_STOP: Duration = Duration::from_secs(7);
const DRAIN: Duration = Duration::from_secs(2);

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    if let Some(Command::Health { timeout }) = config.command {
        return health(config.local_address(), Duration::from_secs(timeout));
    }
    let log = packet_capture_common::logging::init(config.log_level).map_err(anyhow::Error::msg)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(run(config, log));
    // Blocking work still running (a download's read) must not hold up exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

async fn run(config: Config, log: LogControl) -> anyhow::Result<()> {
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
    let address = SocketAddr::new(config.bind_address, config.port);
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
    let server = tokio::spawn(api::serve(listener, router, async {
        let _ = stop_rx.await;
    }));
    let signal = tokio::select! {
        _ = sigterm.recv() => "SIGTERM",
        _ = sigint.recv() => "SIGINT",
    };
    tracing::info!(
        signal,
        "shutting down: no new connections, stopping captures"
    );
    let _ = stop_tx.send(());
    if tokio::time::timeout(ENGINE_STOP, engine.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("captures did not finish in time");
    }
    match tokio::time::timeout(DRAIN, server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "serving the API"),
        Ok(Err(e)) => tracing::warn!(error = %e, "the API server task"),
        Err(_) => tracing::info!("closing the connections still open"),
    }
    tracing::info!("stopped");
    Ok(())
}

/// `GET /health` of the agent at `address` with a plain HTTP/1.1 request
/// (the image has no curl); prints the answer and fails unless it is 200.
fn health(address: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect_timeout(&address, timeout)
        .with_context(|| format!("connecting to the agent at {address}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET /health HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .with_context(|| format!("reading the answer of {address}"))?;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head.lines().next().unwrap_or_default();
    println!("{}", body.trim());
    anyhow::ensure!(
        status.split_whitespace().nth(1) == Some("200"),
        "the agent at {address} answered {status:?}"
    );
    Ok(())
}
