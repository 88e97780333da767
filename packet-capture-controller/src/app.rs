//! The process: health and metrics, the webhook, and the controller (behind
//! leader election when it is on).

use std::net::{Ipv6Addr, SocketAddr};
use std::sync::Arc;

use packet_capture_common::logging::{LogControl, follow_config_map};

use crate::config::Settings;
use crate::error::Result;
use crate::{aggregated, certs, consts, controller, leader, metrics, webhook};

/// Runs everything: health and metrics, the webhook (on every replica), and
/// the controller (on the leader only when leader election is on). A
/// missing webhook certificate ends nothing: the webhook waits for it.
pub async fn run(settings: Settings, log: LogControl) -> Result<()> {
    let client = kube::Client::try_default().await?;
    // LOG_LEVEL edited in the ConfigMap applies without a restart.
    tokio::spawn({
        let (client, namespace, name) = (
            client.clone(),
            settings.namespace.clone(),
            settings.config_map.clone(),
        );
        async move { follow_config_map(client, &namespace, &name, log, |_| {}).await }
    });
    controller::check_crd(&client).await?;
    let metrics = Arc::new(metrics::Metrics::new());
    let status = Arc::new(metrics::Status::default());
    let any = |port| SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
    let health = metrics::serve(
        any(settings.metrics_port),
        metrics::Health {
            metrics: metrics.clone(),
            status: status.clone(),
        },
    );
    let webhook = async {
        if settings.disable_webhook {
            let line = "disabled (--disable-webhook): PacketCaptureConfigs are checked by the CRD's schema only";
            tracing::info!("webhook {line}");
            status.set("webhook", line);
            return std::future::pending().await;
        }
        let slot = Arc::new(webhook::ServingCert::default());
        let admission =
            webhook::Admission::new(client.clone(), settings.limits(), settings.identity())
                .with_max_per_requester(settings.max_captures_per_requester);
        // The aggregated API on the same server: its requests come from the
        // API server's front proxy, whose client certificates it checks.
        let (cas, cas_now) = tokio::sync::watch::channel(None);
        let (headers, headers_now) = tokio::sync::watch::channel(Default::default());
        let relay = aggregated::Relay {
            client: client.clone(),
            agents: aggregated::agents(&settings, client.clone(), metrics.clone()).await?,
            headers: headers_now,
        };
        let router = webhook::router(admission).merge(aggregated::router(relay));
        // Bound at once, so that a port in use is reported at start; TLS
        // handshakes fail until `certs` provides a certificate.
        let server =
            webhook::WebhookServer::bind(any(settings.webhook_port), slot.clone(), router, cas_now)
                .await?;
        tokio::select! {
            r = server.run() => r,
            never = certs::provide(&settings, client.clone(), slot, status.clone(), metrics.clone()) => match never {},
            never = aggregated::follow_front_proxy(client.clone(), cas, headers) => match never {},
        }
    };
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
