use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser as _;
use packet_capture_agent::capture::{Engine, EngineConfig};
use packet_capture_agent::config::Config;
use packet_capture_agent::files::CaptureDir;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    config.log_level.init(&["packet_capture_agent"]);
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
        backend: config.backend,
        ring_bytes: config.ring_buffer_mb << 20,
    })
    .await?;
    tracing::info!(backend = engine.backend(), interfaces = ?engine.interfaces(), "agent ready");
    tokio::signal::ctrl_c().await?;
    engine.shutdown().await;
    Ok(())
}
