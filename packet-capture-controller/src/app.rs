//! The process: health and metrics, the webhook, and the controller (behind
//! leader election when it is on).

use std::net::{Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::config::Settings;
use crate::error::Result;
use crate::{consts, controller, leader, metrics, webhook};

/// Runs everything: health and metrics, the webhook (on every replica), and
/// the controller (on the leader only when leader election is on).
pub async fn run(settings: Settings) -> Result<()> {
    let client = kube::Client::try_default().await?;
    controller::check_crd(&client).await?;
    let metrics = Arc::new(metrics::Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));
    let any = |port| SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
    let health = metrics::serve(
        any(settings.metrics_port),
        metrics::Health {
            metrics: metrics.clone(),
            ready: ready.clone(),
        },
    );
    let webhook = async {
        if settings.disable_webhook {
            tracing::info!("webhook disabled");
            return std::future::pending().await;
        }
        let server = webhook::WebhookServer::bind(
            any(settings.webhook_port),
            &settings.webhook_cert_dir,
            client.clone(),
        )
        .await?;
        ready.store(true, Ordering::Relaxed);
        server.run().await
    };
    if settings.disable_webhook {
        ready.store(true, Ordering::Relaxed);
    }
    let work = async {
        if !settings.leader_election {
            return controller::run(&settings, client.clone(), metrics.clone()).await;
        }
        let elector = leader::LeaderElector::new(
            client.clone(),
            &settings.namespace,
            consts::CONTROLLER_NAME,
            &settings.identity(),
            settings.lease_duration(),
        );
        elector.acquire().await;
        tokio::select! {
            r = controller::run(&settings, client.clone(), metrics.clone()) => {
                elector.release().await;
                r
            }
            lost = elector.hold() => Err(lost),
        }
    };
    tokio::select! {
        r = work => r,
        r = health => r,
        r = webhook => r,
    }
}
