use clap::Parser;
use packet_capture_controller::config::{Command, Settings};
use packet_capture_controller::install_check::{Check, check_install};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::parse();
    let (log, _flushed) =
        packet_capture_common::logging::init(settings.log_level).map_err(anyhow::Error::msg)?;
    match settings.command.clone() {
        Some(Command::DeleteCaptures { timeout_seconds }) => {
            let client = kube::Client::try_default().await?;
            let selector = settings
                .capture_selector
                .map(|s| s.to_string())
                .unwrap_or_default();
            let wait = std::time::Duration::from_secs(timeout_seconds);
            let deleted =
                packet_capture_controller::uninstall::delete_captures(client, &selector, wait)
                    .await?;
            tracing::info!(deleted, "no capture is left");
        }
        Some(Command::CheckInstall {
            capture,
            node,
            packets,
            timeout_seconds,
            fetch,
        }) => {
            let pod = settings.identity.ok_or_else(|| {
                anyhow::anyhow!("POD_NAME is not set: the check captures its own pod")
            })?;
            let check = Check {
                capture,
                labels: settings.capture_selector.map(|s| s.0).unwrap_or_default(),
                namespace: settings.namespace,
                pod,
                node,
                packets,
                wait: std::time::Duration::from_secs(timeout_seconds),
                fetch,
            };
            let checked = check_install(kube::Client::try_default().await?, &check).await?;
            tracing::info!(
                agents = checked.agents,
                packets = checked.captured.packets,
                file = %checked.captured.file,
                fetched = ?checked.captured.fetched,
                "the installation captures: check passed"
            );
        }
        None => packet_capture_controller::run(settings, log).await?,
    }
    Ok(())
}
