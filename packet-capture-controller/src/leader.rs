//! Leader election with a `coordination.k8s.io/v1` Lease, so that of several
//! replicas exactly one reconciles.
//!
//! A replica takes the Lease when it is free, or when its record has not
//! changed for `leaseDurationSeconds` as measured by the replica's own clock
//! (so clock skew between replicas does not matter). The holder renews every
//! third of the duration and gives up (the process exits, and the Deployment
//! restarts it as a standby) when it could not renew for two thirds of it,
//! before anyone else may take over.

use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client, ResourceExt};
use tokio::time::Instant;

use crate::error::{Error, Result, is_conflict};

pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    /// The Lease record last seen and when this replica first saw it.
    observed: Mutex<Option<(String, Instant)>>,
}

impl LeaderElector {
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            duration,
            observed: Mutex::new(None),
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    fn renew_period(&self) -> Duration {
        self.duration / 3
    }

    fn renew_deadline(&self) -> Duration {
        self.duration * 2 / 3
    }

    /// Whether another holder's record has stood still for its duration.
    fn expired(&self, record: &str, duration: Duration) -> bool {
        let mut observed = self.observed.lock().unwrap_or_else(|e| e.into_inner());
        match observed.as_ref() {
            Some((seen, since)) if seen == record => since.elapsed() >= duration,
            _ => {
                *observed = Some((record.to_string(), Instant::now()));
                false
            }
        }
    }

    fn spec(&self, acquire: MicroTime, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs().max(1) as i32),
            acquire_time: Some(acquire),
            renew_time: Some(MicroTime(Timestamp::now())),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// One attempt to take or renew the Lease; true when this replica holds
    /// it afterwards.
    pub async fn try_acquire_or_renew(&self) -> Result<bool> {
        let now = MicroTime(Timestamp::now());
        let Some(lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(self.spec(now, 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(e) if is_conflict(&e) => Ok(false),
                Err(e) => Err(e.into()),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let mine = holder.as_deref() == Some(self.identity.as_str());
        let record = lease.resource_version().unwrap_or_default();
        let held_for = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(15).max(1) as u64);
        if holder.is_some() && !mine && !self.expired(&record, held_for) {
            return Ok(false);
        }
        let new_spec = if mine {
            LeaseSpec {
                renew_time: Some(now),
                lease_duration_seconds: Some(self.duration.as_secs().max(1) as i32),
                ..spec
            }
        } else {
            self.spec(
                now,
                spec.lease_transitions.unwrap_or(0) + i32::from(holder.is_some()),
            )
        };
        let mut updated = lease;
        updated.spec = Some(new_spec);
        // The resourceVersion makes this a compare-and-swap.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &updated)
            .await
        {
            Ok(l) => {
                *self.observed.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some((l.resource_version().unwrap_or_default(), Instant::now()));
                Ok(true)
            }
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Waits until this replica holds the Lease.
    pub async fn acquire(&self) {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    tracing::info!(identity = %self.identity, lease = %self.name, "became the leader");
                    return;
                }
                Ok(false) => tracing::debug!("standing by: another replica holds the lease"),
                Err(e) => tracing::warn!("leader election: {e}"),
            }
            tokio::time::sleep(self.renew_period()).await;
        }
    }

    /// Renews the Lease; returns when leadership is lost.
    pub async fn hold(&self) -> Error {
        let mut renewed = Instant::now();
        loop {
            tokio::time::sleep(self.renew_period()).await;
            // A renewal the API server never answers must not keep this
            // replica acting past the deadline, once a standby may take
            // the Lease.
            let left = self.renew_deadline().saturating_sub(renewed.elapsed());
            let Ok(renewal) = tokio::time::timeout(left, self.try_acquire_or_renew()).await else {
                return Error::LeadershipLost(format!(
                    "could not renew the lease within {:?}",
                    self.renew_deadline()
                ));
            };
            match renewal {
                Ok(true) => renewed = Instant::now(),
                Ok(false) => {
                    return Error::LeadershipLost("another replica holds the lease".into());
                }
                Err(e) if renewed.elapsed() >= self.renew_deadline() => {
                    return Error::LeadershipLost(format!("could not renew the lease: {e}"));
                }
                Err(e) => tracing::warn!("renewing the lease: {e}"),
            }
        }
    }

    /// Gives the Lease up (on shutdown), so a standby takes over at once.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        if let Err(e) = self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            tracing::warn!("releasing the lease: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_renewal_that_hangs_gives_the_lease_up_by_the_deadline() {
        // An API server that takes the request and never answers.
        let (service, _handle) = tower_test::mock::pair::<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >();
        let duration = Duration::from_secs(15);
        let elector = LeaderElector::new(
            Client::new(service, "default"),
            "packet-capture",
            "packet-capture-controller",
            "me",
            duration,
        );
        let start = Instant::now();
        let lost = tokio::time::timeout(duration * 4, elector.hold())
            .await
            .expect("hold() still waits for the renewal");
        assert!(matches!(lost, Error::LeadershipLost(_)), "{lost}");
        // Given up before a standby may take the Lease (its duration).
        assert!(start.elapsed() < duration, "{:?}", start.elapsed());
    }
}
