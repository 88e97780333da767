//! The webhook's serving certificate, kept in the [`ServingCert`] the
//! webhook presents, from the source `--webhook-certs` names:
//!
//! - `dir`: `tls.crt` and `tls.key` in `--webhook-cert-dir`, checked every
//!   [`DIR_PERIOD`].
//! - `cert-manager`, `secret`: the Secret `--webhook-cert-secret`, read and
//!   watched through the API (a change is served at once, where a mounted
//!   Secret lags by a minute or more, and a missing Secret does not keep the
//!   pod from starting).
//! - `self-managed`: the controller's own [`Issuer`] keeps a CA in
//!   `--ca-secret` and the certificate in `--webhook-cert-secret`, renewing
//!   both in time; the certificate is served from its Secret as with
//!   `secret`, and the `caBundle` of the Validating- and
//!   MutatingWebhookConfiguration `--webhook-configuration` is filled in and
//!   kept filled in.
//!
//! None of them ends the process. While there is no certificate the webhook
//! refuses TLS handshakes (so the API server's call fails, and the webhook's
//! `failurePolicy` decides), the log says what it waits for, `/readyz` shows
//! it, and everything else runs. A certificate that cannot be used is
//! reported and the last good one is kept.

use std::convert::Infallible;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
use kube::api::{Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Api, Client, Resource};
use packet_capture_common::aggregated::API_SERVICE;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::backoff::Backoff;
use crate::config::{CertSource, Settings};
use crate::error::Result;
use crate::issuer::{self, Issuer};
use crate::metrics::{Metrics, Status};
use crate::pki::{self, Lifetimes, Name};
use crate::webhook::{ServingCert, certified_key};

/// How often `--webhook-cert-dir` is checked for new files.
pub const DIR_PERIOD: Duration = Duration::from_secs(5);

/// The longest the self-managed issuer goes without checking its CA, its
/// certificate and the caBundle (changes to them wake it up at once, and
/// renewals are scheduled; this catches what neither sees, such as a clock
/// that jumped).
pub const RECHECK: Duration = Duration::from_secs(3600);

/// Retries of the self-managed issuer after an API error: 1 s doubling to
/// a minute.
const RETRY: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60), u32::MAX);

/// The part of `/readyz` this module reports.
const PART: &str = "webhook";

/// Keeps the webhook's certificate from its source, for as long as the
/// process runs: it never returns.
pub async fn provide(
    settings: &Settings,
    client: Client,
    slot: Arc<ServingCert>,
    status: Arc<Status>,
    metrics: Arc<Metrics>,
) -> Infallible {
    let reporter = Reporter {
        slot,
        status,
        metrics,
        current: Mutex::new(None),
    };
    let ns = &settings.namespace;
    let secret = &settings.webhook_cert_secret;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    match settings.webhook_certs {
        CertSource::Dir => follow_dir(&settings.webhook_cert_dir, &reporter).await,
        CertSource::CertManager => {
            let who = format!(
                "cert-manager writes it; see `kubectl get certificate -n {ns}` and cert-manager's logs"
            );
            follow_secret(secrets, ns, secret, &who, &reporter).await;
        }
        CertSource::Secret => {
            let who = "create it with tls.crt and tls.key, signed by the CA of webhook.caBundle";
            follow_secret(secrets, ns, secret, who, &reporter).await;
        }
        CertSource::SelfManaged => {
            let who = "the controller issues it";
            tokio::join!(
                follow_secret(secrets, ns, secret, who, &reporter),
                keep_issued(settings, client, &reporter),
            );
        }
    }
    // The followers loop for ever (a watch retries by itself); should one
    // end all the same, the last certificate stays in use.
    tracing::error!("the webhook's certificate is no longer followed");
    std::future::pending().await
}

/// Presents what a source offers, and says so.
struct Reporter {
    slot: Arc<ServingCert>,
    status: Arc<Status>,
    metrics: Arc<Metrics>,
    /// The `tls.crt` and `tls.key` presented now, so that the same pair
    /// offered again (a relisted watch) is not reported again.
    current: Mutex<Option<(Vec<u8>, Vec<u8>)>>,
}

impl Reporter {
    /// Presents the pair from the next handshake on, unless it cannot be
    /// used (then the last good one stays).
    fn offer(&self, from: &str, crt: &[u8], key: &[u8]) {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if current
            .as_ref()
            .is_some_and(|(c, k)| c.as_slice() == crt && k.as_slice() == key)
        {
            return;
        }
        match certified_key(crt, key) {
            Ok(certified) => {
                self.slot.set(certified);
                *current = Some((crt.to_vec(), key.to_vec()));
                let info = pki::inspect(&String::from_utf8_lossy(crt));
                let line = match &info {
                    Ok(info) => format!(
                        "serving, with the certificate from {from} ({}, for {}, valid until {})",
                        info.subject,
                        info.names
                            .iter()
                            .map(Name::to_string)
                            .collect::<Vec<_>>()
                            .join(", "),
                        pki::rfc3339(info.not_after)
                    ),
                    Err(e) => format!("serving, with the certificate from {from} ({e})"),
                };
                self.metrics
                    .webhook_certificate(info.ok().map(|i| i.not_after));
                tracing::info!("webhook {line}");
                self.status.set(PART, line);
            }
            Err(e) => {
                drop(current);
                self.problem(from, &format!("it cannot be used: {e}"));
            }
        }
    }

    /// Something is wrong with the source: while nothing is presented the
    /// webhook waits; else the last good certificate stays.
    fn problem(&self, from: &str, message: &str) {
        if self.slot.is_set() {
            let line = format!("serving the last good certificate; {from}: {message}");
            if self.status.get(PART).as_deref() != Some(line.as_str()) {
                tracing::warn!("webhook {line}");
                self.status.set(PART, line);
            }
        } else {
            self.waiting(&format!("{from}: {message}"));
        }
    }

    /// Nothing to present yet: logged once per reason.
    fn waiting(&self, why: &str) {
        let line =
            format!("not serving yet (TLS handshakes are refused; everything else runs): {why}");
        if self.status.get(PART).as_deref() != Some(line.as_str()) {
            tracing::warn!("webhook {line}");
            self.status.set(PART, line);
        }
    }
}

type Stamp = (Option<SystemTime>, Option<SystemTime>);

fn stamp(dir: &Path) -> Stamp {
    let modified = |f: &str| {
        std::fs::metadata(dir.join(f))
            .and_then(|m| m.modified())
            .ok()
    };
    (modified("tls.crt"), modified("tls.key"))
}

/// `tls.crt` and `tls.key` of a directory, re-read when either changes.
async fn follow_dir(dir: &Path, reporter: &Reporter) {
    let from = format!("directory {}", dir.display());
    let mut last = None;
    let mut tick = tokio::time::interval(DIR_PERIOD);
    loop {
        tick.tick().await;
        let now = stamp(dir);
        if last == Some(now) {
            continue;
        }
        last = Some(now);
        let read = |f: &str| std::fs::read(dir.join(f)).map_err(|e| format!("{f}: {e}"));
        match read("tls.crt").and_then(|crt| Ok((crt, read("tls.key")?))) {
            Ok((crt, key)) => reporter.offer(&from, &crt, &key),
            Err(e) => reporter.problem(&from, &e),
        }
    }
}

/// A watch of the one object named `name` (RBAC can then limit `list` and
/// `watch` to that name, which it does only for requests that select by
/// `metadata.name`).
fn watch_named<K>(api: Api<K>, name: &str) -> BoxStream<'static, watcher::Result<Event<K>>>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    watcher(api, config).default_backoff().boxed()
}

/// A wake-up for each event of a watch (errors are logged; the watch
/// retries by itself).
fn wakes<K: Send + 'static>(
    events: BoxStream<'static, watcher::Result<Event<K>>>,
    what: String,
) -> BoxStream<'static, ()> {
    events
        .filter_map(move |event| {
            if let Err(e) = &event {
                tracing::warn!("watching {what}: {e}");
            }
            futures::future::ready(event.is_ok().then_some(()))
        })
        .boxed()
}

/// The Secret's pair, presented whenever it changes.
async fn follow_secret(
    api: Api<Secret>,
    namespace: &str,
    name: &str,
    who: &str,
    reporter: &Reporter,
) {
    let from = format!("Secret {namespace}/{name}");
    let missing = format!("there is no {from} ({who})");
    // Said in /readyz only: it is normally over in a moment.
    reporter
        .status
        .set(PART, format!("not serving yet: reading {from}"));
    let mut seen = false;
    let mut events = watch_named(api, name);
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Init) => seen = false,
            Ok(Event::InitApply(secret) | Event::Apply(secret)) => {
                seen = true;
                match issuer::keyed_cert(&secret) {
                    Some(pair) => reporter.offer(&from, pair.cert.as_bytes(), pair.key.as_bytes()),
                    None => reporter.problem(&from, "it lacks tls.crt or tls.key"),
                }
            }
            Ok(Event::InitDone) if !seen => reporter.problem(&from, &missing),
            Ok(Event::InitDone) => {}
            Ok(Event::Delete(_)) => reporter.problem(&from, &missing),
            // The watch retries by itself, with backoff.
            Err(e) => reporter.problem(&from, &format!("watching it failed: {e}")),
        }
    }
}

/// The self-managed issuer: CA, certificate and caBundle checked at start,
/// whenever one of them changes (another replica renewed, someone deleted a
/// Secret or reset the caBundle), when the next renewal is due, and at least
/// every [`RECHECK`].
async fn keep_issued(settings: &Settings, client: Client, reporter: &Reporter) {
    let ns = &settings.namespace;
    let issuer = Issuer::new(
        client.clone(),
        ns,
        &settings.ca_secret,
        Lifetimes::default(),
    );
    let mut names = pki::service_names(&settings.webhook_service, ns);
    names.extend(settings.webhook_extra_names.iter().cloned());
    let validating: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    let mutating: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let api_service: Api<APIService> = Api::all(client.clone());
    let secrets: Api<Secret> = Api::namespaced(client, ns);
    let configuration = &settings.webhook_configuration;
    let mut changes = futures::stream::select_all([
        wakes(
            watch_named(secrets.clone(), &settings.ca_secret),
            format!("Secret {ns}/{}", settings.ca_secret),
        ),
        wakes(
            watch_named(secrets, &settings.webhook_cert_secret),
            format!("Secret {ns}/{}", settings.webhook_cert_secret),
        ),
        wakes(
            watch_named(validating.clone(), configuration),
            format!("ValidatingWebhookConfiguration {configuration}"),
        ),
        wakes(
            watch_named(mutating.clone(), configuration),
            format!("MutatingWebhookConfiguration {configuration}"),
        ),
        wakes(
            watch_named(api_service.clone(), API_SERVICE),
            format!("APIService {API_SERVICE}"),
        ),
    ]);
    let target = Target {
        issuer: &issuer,
        validating: &validating,
        mutating: &mutating,
        api_service: &api_service,
        settings,
        names: &names,
    };
    let mut failures = 0;
    loop {
        let wait = match target.check(reporter).await {
            Ok(due) => {
                failures = 0;
                due.duration_since(SystemTime::now())
                    .unwrap_or_default()
                    .min(RECHECK)
            }
            Err(e) => {
                let delay = RETRY.delay(failures);
                failures = failures.saturating_add(1);
                tracing::warn!("webhook certificate: {e}; again in {delay:?}");
                if !reporter.slot.is_set() {
                    reporter.waiting(&format!("the controller could not issue it yet: {e}"));
                }
                delay
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            Some(()) = changes.next() => {
                // One check covers every change that came at once (a
                // watch's first listing of each object, a Secret and the
                // bundle written together).
                while let Some(Some(())) = changes.next().now_or_never() {}
            }
        }
    }
}

/// What the self-managed issuer keeps.
struct Target<'a> {
    issuer: &'a Issuer,
    validating: &'a Api<ValidatingWebhookConfiguration>,
    mutating: &'a Api<MutatingWebhookConfiguration>,
    api_service: &'a Api<APIService>,
    settings: &'a Settings,
    names: &'a [Name],
}

impl Target<'_> {
    /// The CA, the caBundle, then the certificate (so the API server trusts
    /// a new CA before anything it signed is served); when next due.
    async fn check(&self, reporter: &Reporter) -> Result<SystemTime> {
        let s = self.settings;
        let now = SystemTime::now();
        let (authority, ca) = self.issuer.authority(now).await?;
        if let Some(why) = &ca.written {
            tracing::info!("Secret {}/{}: {why}", s.namespace, s.ca_secret);
        }
        let name = &s.webhook_configuration;
        let validating = fill_ca_bundle(self.validating, name, &authority.bundle).await?;
        let mutating = fill_ca_bundle(self.mutating, name, &authority.bundle).await?;
        let api_service = fill_api_service_ca_bundle(self.api_service, &authority.bundle).await?;
        reporter.status.set(
            "caBundle",
            format!("{validating}; {mutating}; {api_service}"),
        );
        let leaf = self
            .issuer
            .certificate(&authority, &s.webhook_cert_secret, self.names, now)
            .await?;
        if let Some(why) = &leaf.written {
            tracing::info!("Secret {}/{}: {why}", s.namespace, s.webhook_cert_secret);
        }
        Ok(ca.due.min(leaf.due))
    }
}

/// Sets the caBundle of the aggregated API's APIService to `bundle` where
/// it differs (the API server calls the same server as the webhooks).
async fn fill_api_service_ca_bundle(api: &Api<APIService>, bundle: &str) -> Result<String> {
    let Some(service) = api.get_opt(API_SERVICE).await? else {
        return Ok(format!(
            "no APIService {API_SERVICE}: the aggregated API is not served"
        ));
    };
    let current = service
        .spec
        .as_ref()
        .and_then(|s| s.ca_bundle.as_ref())
        .map(|b| b.0.as_slice());
    if current != Some(bundle.as_bytes()) {
        let patch = json!({"spec": {"caBundle": ByteString(bundle.as_bytes().to_vec())}});
        api.patch(API_SERVICE, &PatchParams::default(), &Patch::Merge(patch))
            .await?;
        tracing::info!("APIService {API_SERVICE}: caBundle filled in");
    }
    Ok(format!(
        "APIService {API_SERVICE} trusts the controller's CA"
    ))
}

/// A webhook configuration whose caBundles the controller fills in.
trait WebhookConfiguration:
    Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug
{
    /// Each webhook's name and client configuration.
    fn client_configs(&self) -> Vec<(&str, &WebhookClientConfig)>;
}

impl WebhookConfiguration for ValidatingWebhookConfiguration {
    fn client_configs(&self) -> Vec<(&str, &WebhookClientConfig)> {
        let hooks = self.webhooks.iter().flatten();
        hooks.map(|w| (w.name.as_str(), &w.client_config)).collect()
    }
}

impl WebhookConfiguration for MutatingWebhookConfiguration {
    fn client_configs(&self) -> Vec<(&str, &WebhookClientConfig)> {
        let hooks = self.webhooks.iter().flatten();
        hooks.map(|w| (w.name.as_str(), &w.client_config)).collect()
    }
}

/// Sets the caBundle of every webhook of the configuration `name` to
/// `bundle` where it differs; what the configuration looks like now.
async fn fill_ca_bundle<K: WebhookConfiguration>(
    api: &Api<K>,
    name: &str,
    bundle: &str,
) -> Result<String> {
    let kind = K::kind(&());
    let Some(configuration) = api.get_opt(name).await? else {
        return Ok(format!(
            "no {kind} {name}: the API server does not call the webhook"
        ));
    };
    let stale: Vec<&str> = configuration
        .client_configs()
        .into_iter()
        .filter(|(_, c)| c.ca_bundle.as_ref().map(|b| b.0.as_slice()) != Some(bundle.as_bytes()))
        .map(|(w, _)| w)
        .collect();
    if !stale.is_empty() {
        let ca_bundle = ByteString(bundle.as_bytes().to_vec());
        // The webhooks list merges by name, so only their caBundles change.
        let patch = json!({
            "webhooks": stale
                .iter()
                .map(|w| json!({"name": w, "clientConfig": {"caBundle": ca_bundle}}))
                .collect::<Vec<_>>()
        });
        api.patch(name, &PatchParams::default(), &Patch::Strategic(patch))
            .await?;
        tracing::info!("{kind} {name}: caBundle filled in for {}", stale.join(", "));
    }
    Ok(format!("{kind} {name} trusts the controller's CA"))
}
