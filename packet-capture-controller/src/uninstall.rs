//! `packet-capture-controller delete-captures`: what the chart runs before
//! Helm removes it (a pre-delete hook), so that no PacketCaptureConfig is
//! left with a finalizer that nobody will ever remove.
//!
//! It deletes the captures and waits while the controller, still running,
//! stops them on the agents and removes its finalizer. A capture still
//! there at the deadline (no controller answers) gets the finalizer
//! removed here: its agents end it at its duration, and the resource does
//! not outlive the chart.

use std::time::Duration;

use futures::future::join_all;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, Client, ResourceExt};
use packet_capture_common::crd::PacketCaptureConfig;

use crate::consts::FINALIZER;
use crate::error::Result;

/// Deletes every capture the selector (`key=value,...`, empty for all)
/// names, waits up to `wait` for the controller to finish them, and frees
/// what is left. Returns how many were deleted.
pub async fn delete_captures(client: Client, selector: &str, wait: Duration) -> Result<usize> {
    let api: Api<PacketCaptureConfig> = Api::all(client);
    let captures = api.list(&ListParams::default().labels(selector)).await?;
    let count = captures.items.len();
    for pcc in &captures.items {
        match api.delete(&pcc.name_any(), &DeleteParams::default()).await {
            Ok(_) => tracing::info!(name = %pcc.name_any(), "deleting the capture"),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    let gone = join_all(captures.items.iter().map(|pcc| {
        let name = pcc.name_any();
        let uid = pcc.uid().unwrap_or_default();
        let api = &api;
        async move {
            let gone = gone_within(api, &name, &uid, wait).await;
            (name, gone)
        }
    }))
    .await;
    for (name, _) in gone.into_iter().filter(|(_, gone)| !gone) {
        tracing::warn!(
            %name,
            "the controller did not finish the capture within {wait:?}: removing its finalizer \
             (its agents end it at its duration)"
        );
        remove_finalizer(&api, &name).await?;
    }
    Ok(count)
}

/// Whether the capture `name` of `uid` is gone, or goes within `wait`.
pub async fn gone_within(
    api: &Api<PacketCaptureConfig>,
    name: &str,
    uid: &str,
    wait: Duration,
) -> bool {
    let deleted = conditions::is_deleted(uid);
    let waited = tokio::time::timeout(wait, await_condition(api.clone(), name, deleted)).await;
    matches!(waited, Ok(Ok(_)))
}

async fn remove_finalizer(api: &Api<PacketCaptureConfig>, name: &str) -> Result<()> {
    let Some(pcc) = api.get_opt(name).await? else {
        return Ok(());
    };
    let finalizers: Vec<String> = pcc
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    let patch = serde_json::json!({"metadata": {
        "finalizers": finalizers,
        "resourceVersion": pcc.resource_version(),
    }});
    match api
        .patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
    {
        // Gone meanwhile, or changed: the controller got there after all.
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
        other => other.map(drop).map_err(Into::into),
    }
}
