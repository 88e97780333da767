use clap::Parser;
use packet_capture_controller::config::{Command, Settings};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::parse();
    let (log, _flushed) =
        packet_capture_common::logging::init(settings.log_level).map_err(anyhow::Error::msg)?;
    if let Some(Command::DeleteCaptures { timeout_seconds }) = settings.command {
        let client = kube::Client::try_default().await?;
        let selector = settings
            .capture_selector
            .map(|s| s.to_string())
            .unwrap_or_default();
        let wait = std::time::Duration::from_secs(timeout_seconds);
        let deleted =
            packet_capture_controller::uninstall::delete_captures(client, &selector, wait).await?;
        tracing::info!(deleted, "no capture is left");
        return Ok(());
    }
    packet_capture_controller::run(settings, log).await?;
    Ok(())
}
