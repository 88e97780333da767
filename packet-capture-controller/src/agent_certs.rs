//! The agents' serving certificates: the controller signs the
//! CertificateSigningRequests for [`AGENT_SIGNER`] with the agents' CA, and
//! trusts that CA when it calls the agents.
//!
//! A request is signed only when it comes from the agents' service account
//! with a token bound to one of its pods (the API server records the pod
//! in the request's `extra`), and asks for exactly that pod's node: its
//! name, and addresses the Node lists. Anything else is refused with the
//! reason, so that no pod or user can get a certificate for another node's
//! agent. The CA is the controller's own (self-managed, in the Secret it
//! also issues the webhook's certificate from) or one that cert-manager or
//! you keep in a Secret; its bundle is published, without the key, in a
//! ConfigMap for clients (`grpcurl -cacert`).

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestCondition, CertificateSigningRequestStatus,
};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client, ResourceExt as _};
use packet_capture_common::crd::AGENT_SIGNER;

use crate::agents::TrustedCas;
use crate::backoff::Backoff;
use crate::issuer::{self, BUNDLE_KEY, Issuer};
use crate::pki::{self, Authority, Lifetimes, Name};

/// The longest certificate signed for an agent (a request may ask for less).
pub const MAX_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
/// How often the CA is read again (a renewed or rotated CA).
pub const CA_RECHECK: Duration = Duration::from_secs(600);
/// Field manager of the CA ConfigMap and of the requests' status.
const FIELD_MANAGER: &str = "packet-capture-controller";
/// The `extra` keys the API server sets for a token bound to a pod.
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// Where the agents' CA is kept.
#[derive(Debug, Clone)]
pub enum CaSource {
    /// The controller's own CA in this Secret, created and renewed by it.
    SelfManaged { secret: String },
    /// A CA that cert-manager or you keep in `kept` (tls.crt, tls.key,
    /// ca.crt; read only); while there is none, the controller's own in
    /// `own` (cert-manager may not have issued it yet, or not be there).
    Kept { kept: String, own: String },
}

/// How the controller signs and trusts the agents' certificates.
#[derive(Debug, Clone)]
pub struct Settings {
    pub namespace: String,
    /// The agents' service account, in `namespace`.
    pub service_account: String,
    pub ca: CaSource,
    /// The ConfigMap (in `namespace`) that publishes the CA bundle.
    pub bundle_config_map: String,
}

/// Why a request is refused, or the names to sign it for.
pub fn judge(
    csr: &CertificateSigningRequest,
    agents: &str,
    pod: Option<&Pod>,
    node: Option<&Node>,
    request: &pki::Request,
) -> Result<Vec<Name>, String> {
    let spec = &csr.spec;
    let user = spec.username.as_deref().unwrap_or_default();
    if user != agents {
        return Err(format!(
            "requested by {user:?}, not by the agents' service account {agents:?}"
        ));
    }
    let extra = |key: &str| {
        spec.extra
            .as_ref()
            .and_then(|e| e.get(key))
            .and_then(|v| v.first())
            .cloned()
    };
    let (Some(pod_name), Some(pod_uid)) = (extra(POD_NAME), extra(POD_UID)) else {
        return Err("not requested with a token bound to an agent pod".into());
    };
    let pod = pod.ok_or_else(|| format!("the requesting pod {pod_name} does not exist"))?;
    if pod.uid().as_deref() != Some(pod_uid.as_str()) {
        return Err(format!(
            "the requesting pod {pod_name} (uid {pod_uid}) has been replaced"
        ));
    }
    let node_name = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .ok_or_else(|| format!("the requesting pod {pod_name} is on no node"))?;
    let node = node.ok_or_else(|| format!("node {node_name} does not exist"))?;
    let addresses: Vec<std::net::IpAddr> = node
        .status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
        .filter_map(|a| a.address.parse().ok())
        .collect();
    let usages = spec.usages.clone().unwrap_or_default();
    if !usages.iter().any(|u| u == "server auth")
        || usages.iter().any(|u| {
            !matches!(
                u.as_str(),
                "server auth" | "digital signature" | "key encipherment"
            )
        })
    {
        return Err(format!(
            "usages {usages:?}: a serving certificate is for \"server auth\" (with \"digital signature\", \"key encipherment\")"
        ));
    }
    let mut has_address = false;
    for name in &request.names {
        match name {
            Name::Dns(dns) if *dns == node_name => {}
            Name::Ip(ip) if addresses.contains(ip) => has_address = true,
            other => {
                return Err(format!(
                    "{other} is not node {node_name}'s name or one of its addresses {addresses:?}"
                ));
            }
        }
    }
    if !has_address {
        return Err(format!(
            "it names none of node {node_name}'s addresses {addresses:?}"
        ));
    }
    Ok(request.names.clone())
}

/// Whether the request has a condition of one of `types`.
fn has_condition(csr: &CertificateSigningRequest, types: &[&str]) -> bool {
    csr.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| types.contains(&c.type_.as_str())))
}

/// Whether a request still waits for its certificate: neither signed, nor
/// denied, nor failed. An approved one still waits when its approver
/// stopped between approving and signing (a controller replaced), or when
/// a person approved it; it is signed only if it passes the checks.
fn unsigned(csr: &CertificateSigningRequest) -> bool {
    let signed = csr
        .status
        .as_ref()
        .and_then(|s| s.certificate.as_ref())
        .is_some_and(|c| !c.0.is_empty());
    !signed && !has_condition(csr, &["Denied", "Failed"])
}

fn condition(type_: &str, reason: &str, message: String) -> CertificateSigningRequestCondition {
    let now = Time(Timestamp::now());
    CertificateSigningRequestCondition {
        type_: type_.into(),
        status: "True".into(),
        reason: Some(reason.into()),
        message: Some(message),
        last_update_time: Some(now.clone()),
        last_transition_time: Some(now),
    }
}

/// The agents' CA: the kept one if it is there, else the controller's own
/// (created or renewed now).
async fn authority(client: &Client, settings: &Settings) -> crate::Result<Authority> {
    let own = match &settings.ca {
        CaSource::SelfManaged { secret } => secret,
        CaSource::Kept { kept, own } => {
            let api: Api<Secret> = Api::namespaced(client.clone(), &settings.namespace);
            if let Some(stored) = api.get_opt(kept).await? {
                return issuer::authority_of(&stored).ok_or_else(|| crate::Error::Certificate {
                    what: format!("the agents' CA in Secret {}/{kept}", settings.namespace),
                    message: "no tls.crt and tls.key".into(),
                });
            }
            own
        }
    };
    let issuer = Issuer::new(
        client.clone(),
        &settings.namespace,
        own,
        Lifetimes::default(),
    );
    Ok(issuer.authority(SystemTime::now()).await?.0)
}

/// The CAs to trust for the agents, published (no key) in the ConfigMap
/// for clients: `authority`'s, and those published before that have not
/// expired (an agent renews its certificate days after the CA changed).
async fn publish(
    client: &Client,
    settings: &Settings,
    authority: &Authority,
) -> crate::Result<String> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &settings.namespace);
    let earlier = api
        .get_opt(&settings.bundle_config_map)
        .await?
        .and_then(|cm| cm.data?.remove(BUNDLE_KEY))
        .unwrap_or_default();
    let bundle = pki::trusted(authority, &earlier, SystemTime::now());
    if bundle == earlier {
        return Ok(bundle);
    }
    let value = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": settings.bundle_config_map},
        "data": BTreeMap::from([(BUNDLE_KEY, &bundle)]),
    });
    api.patch(
        &settings.bundle_config_map,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&value),
    )
    .await?;
    Ok(bundle)
}

/// Decides one unsigned request: approved (unless it is) and signed, or
/// refused with the reason (denied, or failed if it was approved).
async fn decide(
    client: &Client,
    settings: &Settings,
    authority: &Authority,
    csr: &CertificateSigningRequest,
) -> crate::Result<()> {
    let name = csr.name_any();
    let agents = format!(
        "system:serviceaccount:{}:{}",
        settings.namespace, settings.service_account
    );
    let pod_name = csr
        .spec
        .extra
        .as_ref()
        .and_then(|e| e.get(POD_NAME))
        .and_then(|v| v.first().cloned());
    let pod = match pod_name {
        Some(p) if csr.spec.username.as_deref() == Some(agents.as_str()) => {
            Api::<Pod>::namespaced(client.clone(), &settings.namespace)
                .get_opt(&p)
                .await?
        }
        _ => None,
    };
    let node_name = pod
        .as_ref()
        .and_then(|p| p.spec.as_ref()?.node_name.clone());
    let node = match &node_name {
        Some(n) => Api::<Node>::all(client.clone()).get_opt(n).await?,
        None => None,
    };
    let request = String::from_utf8(csr.spec.request.0.clone())
        .map_err(|e| e.to_string())
        .and_then(|pem| pki::read_request(&pem));
    let verdict = request.and_then(|request| {
        let names = judge(csr, &agents, pod.as_ref(), node.as_ref(), &request)?;
        let asked = csr
            .spec
            .expiration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(MAX_LIFETIME, Duration::from_secs);
        pki::sign_request(
            &authority.ca,
            &request,
            &names,
            SystemTime::now(),
            asked.min(MAX_LIFETIME),
        )
    });
    let api: Api<CertificateSigningRequest> = Api::all(client.clone());
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let approved = has_condition(csr, &["Approved"]);
    match verdict {
        Ok(cert) => {
            let node = node_name.unwrap_or_default();
            if !approved {
                let approval = CertificateSigningRequestStatus {
                    conditions: Some(vec![condition(
                        "Approved",
                        "AgentOfNode",
                        format!(
                            "the agent pod of node {node} asked for its node's name and addresses"
                        ),
                    )]),
                    certificate: None,
                };
                api.patch_approval(&name, &params, &Patch::Apply(status_patch(&approval)))
                    .await?;
            }
            let signed = CertificateSigningRequestStatus {
                conditions: None,
                certificate: Some(ByteString(cert.into_bytes())),
            };
            api.patch_status(&name, &params, &Patch::Apply(status_patch(&signed)))
                .await?;
            tracing::info!(
                request = name,
                node,
                "signed an agent's serving certificate"
            );
        }
        Err(why) => {
            // Approved elsewhere, it is no longer ours to deny: as its
            // signer, the controller fails it instead.
            let refused = |type_| CertificateSigningRequestStatus {
                conditions: Some(vec![condition(type_, "NotTheAgentOfTheNode", why.clone())]),
                certificate: None,
            };
            if approved {
                let failed = status_patch(&refused("Failed"));
                api.patch_status(&name, &params, &Patch::Apply(failed))
                    .await?;
            } else {
                let denied = status_patch(&refused("Denied"));
                api.patch_approval(&name, &params, &Patch::Apply(denied))
                    .await?;
            }
            tracing::warn!(
                request = name,
                "refused a certificate request for the agents' signer: {why}"
            );
        }
    }
    Ok(())
}

/// Retries of a decision that failed on an API error, 1 s doubling to
/// 16 s, under a minute in all; a request left unsigned is taken up again
/// by the next look at the pending ones ([`PENDING_RECHECK`]).
const RETRY: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(16), 6);

/// Decides `csr`, and after an API error decides it again as it is then,
/// until it is signed or refused, is gone, or the retries are used up.
pub async fn settle(
    client: &Client,
    settings: &Settings,
    authority: &Authority,
    csr: CertificateSigningRequest,
) {
    let api: Api<CertificateSigningRequest> = Api::all(client.clone());
    let name = csr.name_any();
    // One already approved is read again first: the event may be older
    // than this controller's own signature.
    let mut first = Some(csr).filter(|csr| !has_condition(csr, &["Approved"]));
    let settled = RETRY
        .retry(
            || {
                let (api, name, known) = (&api, &name, first.take());
                async move {
                    let csr = match known {
                        Some(csr) => csr,
                        None => match api.get_opt(name).await? {
                            Some(csr) if unsigned(&csr) => csr,
                            _ => return Ok(()),
                        },
                    };
                    decide(client, settings, authority, &csr).await
                }
            },
            // Deleted while it was being decided.
            |e| !matches!(e, crate::Error::Kube(kube::Error::Api(s)) if s.code == 404),
            |_, delay, e| {
                tracing::warn!(
                    request = name,
                    "deciding a certificate request: {e}; again in {delay:?}"
                );
                async {}
            },
        )
        .await;
    if let Err(e) = settled {
        tracing::warn!(
            request = name,
            "deciding a certificate request: {e}; tried again with the pending ones"
        );
    }
}

fn status_patch(status: &CertificateSigningRequestStatus) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "certificates.k8s.io/v1",
        "kind": "CertificateSigningRequest",
        "status": status,
    })
}

/// Requests decided at once: every agent of a large cluster asks when it
/// starts (a DaemonSet rollout), and each decision is a few API calls.
const DECIDING_AT_ONCE: usize = 16;

/// Queues `csr` to be decided unless it is already queued or being
/// decided: a copy from before that decision would be decided again.
fn enqueue(
    waiting: &mut VecDeque<CertificateSigningRequest>,
    in_flight: &HashSet<String>,
    csr: CertificateSigningRequest,
) {
    let name = csr.name_any();
    if !in_flight.contains(&name) && !waiting.iter().any(|w| w.name_any() == name) {
        waiting.push_back(csr);
    }
}

/// How often the pending requests are listed, besides the watch: one whose
/// decision gave up on API errors, or that a stalled watch did not bring,
/// must not leave its agent without a certificate until it asks again.
const PENDING_RECHECK: Duration = Duration::from_secs(15);

/// Keeps the CA current (trusted in `trust`, published for clients) and
/// decides every request for [`AGENT_SIGNER`] as it comes, up to
/// [`DECIDING_AT_ONCE`] at a time. Runs on the leader; errors are logged
/// and retried.
pub async fn run(client: Client, settings: Settings, trust: Arc<TrustedCas>) -> Infallible {
    let requests: Api<CertificateSigningRequest> = Api::all(client.clone());
    let signer = format!("spec.signerName={AGENT_SIGNER}");
    let config = watcher::Config::default().fields(&signer);
    let mut stream = std::pin::pin!(
        watcher(requests.clone(), config)
            .default_backoff()
            .applied_objects()
    );
    let mut recheck = tokio::time::interval(PENDING_RECHECK);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Requests to decide as room comes: from the watch, and those a list
    // found pending.
    let mut waiting = VecDeque::new();
    let mut current: Option<(Arc<Authority>, SystemTime)> = None;
    let mut deciding = futures::stream::FuturesUnordered::new();
    let mut in_flight = HashSet::new();
    loop {
        let fresh = current
            .as_ref()
            .is_some_and(|(_, at)| at.elapsed().unwrap_or_default() < CA_RECHECK);
        if !fresh {
            match authority(&client, &settings).await {
                Ok(a) => {
                    let bundle = match publish(&client, &settings, &a).await {
                        Ok(bundle) => bundle,
                        Err(e) => {
                            tracing::warn!("publishing the agents' CA bundle: {e}");
                            a.bundle.clone()
                        }
                    };
                    if trust.get().as_ref() != Some(&bundle) {
                        tracing::info!(
                            config_map = settings.bundle_config_map,
                            "calls to the agents verify their certificates with the agents' CA"
                        );
                    }
                    trust.set(bundle);
                    current = Some((Arc::new(a), SystemTime::now()));
                }
                Err(e) => {
                    tracing::warn!("the agents' CA: {e}");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    continue;
                }
            }
        }
        let Some((authority, _)) = &current else {
            continue;
        };
        while deciding.len() < DECIDING_AT_ONCE
            && let Some(csr) = waiting.pop_front()
        {
            // A request's own approval brings it again, still unsigned,
            // while it is being decided.
            if unsigned(&csr) && in_flight.insert(csr.name_any()) {
                let (client, settings, authority) =
                    (client.clone(), settings.clone(), authority.clone());
                deciding.push(async move {
                    let name = csr.name_any();
                    settle(&client, &settings, &authority, csr).await;
                    name
                });
            }
        }
        tokio::select! {
            next = stream.next(), if deciding.len() < DECIDING_AT_ONCE => match next {
                Some(Ok(csr)) => enqueue(&mut waiting, &in_flight, csr),
                Some(Err(e)) => tracing::warn!("watching certificate requests: {e}"),
                None => tokio::time::sleep(Duration::from_secs(1)).await,
            },
            Some(name) = deciding.next() => {
                in_flight.remove(&name);
            }
            _ = recheck.tick(), if waiting.is_empty() => {
                match requests.list(&ListParams::default().fields(&signer)).await {
                    Ok(list) => {
                        for csr in list.items.into_iter().filter(unsigned) {
                            enqueue(&mut waiting, &in_flight, csr);
                        }
                    }
                    Err(e) => tracing::warn!("listing the pending certificate requests: {e}"),
                }
            }
            () = tokio::time::sleep(CA_RECHECK) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_objects::{agent_pod, node};
    use k8s_openapi::api::certificates::v1::CertificateSigningRequestSpec;
    use rcgen::{CertificateParams, KeyPair, SanType};

    const AGENTS: &str = "system:serviceaccount:packet-capture:packet-capture-agent";

    /// A request as the agent of `node` makes it, for `names` (DNS names
    /// and addresses), by `user` with `pod` in its token.
    fn request(
        user: &str,
        pod: Option<(&str, &str)>,
        names: &[&str],
        usages: &[&str],
    ) -> (CertificateSigningRequest, pki::Request) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        for n in names {
            params.subject_alt_names.push(match n.parse() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(n.to_string().try_into().unwrap()),
            });
        }
        let pem = params.serialize_request(&key).unwrap().pem().unwrap();
        let extra = pod.map(|(name, uid)| {
            BTreeMap::from([
                (POD_NAME.to_string(), vec![name.to_string()]),
                (POD_UID.to_string(), vec![uid.to_string()]),
            ])
        });
        let csr = CertificateSigningRequest {
            spec: CertificateSigningRequestSpec {
                request: ByteString(pem.clone().into_bytes()),
                signer_name: AGENT_SIGNER.into(),
                username: Some(user.into()),
                extra,
                usages: Some(usages.iter().map(|u| u.to_string()).collect()),
                ..Default::default()
            },
            ..Default::default()
        };
        (csr, pki::read_request(&pem).unwrap())
    }

    #[test]
    fn only_an_agent_pod_gets_a_certificate_for_its_own_node() {
        let pod = agent_pod("node-1", "10.0.0.1");
        let pod_name = pod.name_any();
        let uid = pod.uid().unwrap();
        let mine = node("node-1", "10.0.0.1");
        let serving = ["digital signature", "server auth"];
        let own = Some((pod_name.as_str(), uid.as_str()));
        for (what, user, from, names, usages, want) in [
            (
                "its node's name and address",
                AGENTS,
                own,
                &["node-1", "10.0.0.1"][..],
                &serving[..],
                Ok(()),
            ),
            (
                "its node's address alone",
                AGENTS,
                own,
                &["10.0.0.1"],
                &serving,
                Ok(()),
            ),
            (
                "another service account",
                "system:serviceaccount:default:mallory",
                own,
                &["node-1", "10.0.0.1"],
                &serving,
                Err(
                    "requested by \"system:serviceaccount:default:mallory\", not by the agents' service account \"system:serviceaccount:packet-capture:packet-capture-agent\"",
                ),
            ),
            (
                "a token not bound to a pod",
                AGENTS,
                None,
                &["node-1", "10.0.0.1"],
                &serving,
                Err("not requested with a token bound to an agent pod"),
            ),
            (
                "a pod that was replaced",
                AGENTS,
                Some((pod_name.as_str(), "old-uid")),
                &["node-1", "10.0.0.1"],
                &serving,
                Err("the requesting pod agent-node-1 (uid old-uid) has been replaced"),
            ),
            (
                "another node's name",
                AGENTS,
                own,
                &["node-2", "10.0.0.1"],
                &serving,
                Err("node-2 is not node node-1's name or one of its addresses [10.0.0.1]"),
            ),
            (
                "another node's address",
                AGENTS,
                own,
                &["node-1", "10.0.0.2"],
                &serving,
                Err("10.0.0.2 is not node node-1's name or one of its addresses [10.0.0.1]"),
            ),
            (
                "no address",
                AGENTS,
                own,
                &["node-1"],
                &serving,
                Err("it names none of node node-1's addresses [10.0.0.1]"),
            ),
            (
                "a client certificate",
                AGENTS,
                own,
                &["node-1", "10.0.0.1"],
                &["digital signature", "client auth"],
                Err(
                    "usages [\"digital signature\", \"client auth\"]: a serving certificate is for \"server auth\" (with \"digital signature\", \"key encipherment\")",
                ),
            ),
        ] {
            let (csr, req) = request(user, from, names, usages);
            let got = judge(&csr, AGENTS, Some(&pod), Some(&mine), &req).map(|_| ());
            assert_eq!(got, want.map_err(str::to_string), "{what}");
        }
        let (csr, req) = request(AGENTS, own, &["node-1", "10.0.0.1"], &serving);
        assert_eq!(
            judge(&csr, AGENTS, None, None, &req),
            Err("the requesting pod agent-node-1 does not exist".into())
        );
    }

    #[test]
    fn the_signed_certificate_is_for_the_checked_names_and_the_requests_key() {
        let now = SystemTime::now();
        let authority =
            pki::next_authority(None, "packet-capture-ca", now, &Lifetimes::default()).unwrap();
        let (_, req) = request(AGENTS, None, &["node-1", "10.0.0.1"], &[]);
        let names = vec![Name::Ip("10.0.0.1".parse().unwrap())];
        let cert = pki::sign_request(&authority.ca, &req, &names, now, MAX_LIFETIME).unwrap();
        let info = pki::inspect(&cert).unwrap();
        assert_eq!(info.names, names, "only what was checked");
        assert!(!info.is_ca);
        let life = info.not_after.duration_since(now).unwrap();
        assert!(life <= MAX_LIFETIME && life > MAX_LIFETIME - Duration::from_secs(60));
        assert!(
            pki::read_request(
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
            )
            .is_err()
        );
    }
}
