use clap::Parser;
use packet_capture_controller::config::Settings;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::parse();
    packet_capture_common::logging::init(settings.log_level).map_err(anyhow::Error::msg)?;
    packet_capture_controller::run(settings).await?;
    Ok(())
}
