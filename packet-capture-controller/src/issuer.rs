//! The controller's own issuer: a CA kept in a Secret, and certificates it
//! signs kept in Secrets (`kubernetes.io/tls`: `tls.crt`, `tls.key`, and
//! `ca.crt`, the bundle of CAs to trust). What to do is decided by `pki`;
//! this module reads and writes the Secrets.
//!
//! Several replicas run it at once, with no leader: a missing Secret is
//! created, and when that conflicts another replica has just created it, so
//! the decision is taken again on what that replica wrote; a changed Secret
//! is replaced with the resourceVersion it was read at, and a conflict there
//! means the same. So every replica ends up with the Secret one of them wrote.

use std::collections::BTreeMap;
use std::time::SystemTime;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

use crate::consts::{FIELD_MANAGER, MANAGED_BY_LABEL};
use crate::error::{Error, Result, is_conflict};
use crate::pki::{self, Authority, Due, KeyedCert, Lifetimes, Name};

/// Attempts at one write before giving up for now (each conflict means
/// another replica wrote in between, which cannot go on for long).
const ATTEMPTS: usize = 5;

pub const CERT_KEY: &str = "tls.crt";
pub const PRIVATE_KEY: &str = "tls.key";
pub const BUNDLE_KEY: &str = "ca.crt";

/// What a call found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// When the CA or certificate is next due for replacement.
    pub due: SystemTime,
    /// Why it was (re)written now, if it was.
    pub written: Option<String>,
}

pub struct Issuer {
    secrets: Api<Secret>,
    namespace: String,
    ca_secret: String,
    lifetimes: Lifetimes,
}

fn text(secret: &Secret, key: &str) -> Option<String> {
    let bytes = secret.data.as_ref()?.get(key)?;
    String::from_utf8(bytes.0.clone()).ok()
}

/// The pair a Secret holds, if it has both halves.
pub fn keyed_cert(secret: &Secret) -> Option<KeyedCert> {
    Some(KeyedCert {
        cert: text(secret, CERT_KEY)?,
        key: text(secret, PRIVATE_KEY)?,
    })
}

/// The CA and its bundle in a Secret (`tls.crt`, `tls.key`, `ca.crt`; the
/// bundle is the CA alone when `ca.crt` is missing).
pub fn authority_of(secret: &Secret) -> Option<Authority> {
    let ca = keyed_cert(secret)?;
    let bundle = text(secret, BUNDLE_KEY).unwrap_or_else(|| ca.cert.clone());
    Some(Authority { ca, bundle })
}

fn data(pair: &KeyedCert, bundle: &str) -> BTreeMap<String, ByteString> {
    [
        (CERT_KEY, pair.cert.as_str()),
        (PRIVATE_KEY, pair.key.as_str()),
        (BUNDLE_KEY, bundle),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
    .collect()
}

impl Issuer {
    pub fn new(client: Client, namespace: &str, ca_secret: &str, lifetimes: Lifetimes) -> Self {
        Self {
            secrets: Api::namespaced(client, namespace),
            namespace: namespace.into(),
            ca_secret: ca_secret.into(),
            lifetimes,
        }
    }

    /// An error about Secret `name`.
    fn error<'a>(&'a self, name: &'a str) -> impl Fn(String) -> Error + 'a {
        move |message| Error::Certificate {
            what: format!("Secret {}/{name}", self.namespace),
            message,
        }
    }

    /// Writes `data` into Secret `name`: creates it when `existing` is None,
    /// else replaces its keys (other keys and its type are kept: the type
    /// of a Secret cannot change). False on a conflict.
    async fn write(
        &self,
        name: &str,
        existing: Option<Secret>,
        data: BTreeMap<String, ByteString>,
    ) -> Result<bool> {
        let result = match existing {
            None => {
                let secret = Secret {
                    metadata: ObjectMeta {
                        name: Some(name.into()),
                        labels: Some(
                            [(MANAGED_BY_LABEL.to_string(), FIELD_MANAGER.to_string())].into(),
                        ),
                        ..Default::default()
                    },
                    type_: Some("kubernetes.io/tls".into()),
                    data: Some(data),
                    ..Default::default()
                };
                self.secrets.create(&PostParams::default(), &secret).await
            }
            Some(mut secret) => {
                // The resourceVersion it was read at makes this a
                // compare-and-swap.
                secret.data.get_or_insert_default().extend(data);
                self.secrets
                    .replace(name, &PostParams::default(), &secret)
                    .await
            }
        };
        match result {
            Ok(_) => Ok(true),
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// The CA: created when there is none (or it is unusable), replaced
    /// `ca_renew_before` its end with the old one kept in the bundle until
    /// it expires, and expired CAs dropped from the bundle.
    pub async fn authority(&self, now: SystemTime) -> Result<(Authority, Outcome)> {
        for _ in 0..ATTEMPTS {
            let secret = self.secrets.get_opt(&self.ca_secret).await?;
            let stored = secret.as_ref().and_then(authority_of);
            let due = pki::ca_due(stored.as_ref(), now, &self.lifetimes);
            let (next, why) = match (stored, due) {
                (Some(stored), Due::At(due)) => match pki::pruned(&stored, now) {
                    None => return Ok((stored, Outcome { due, written: None })),
                    Some(bundle) => (
                        Authority {
                            ca: stored.ca,
                            bundle,
                        },
                        "an expired CA left the bundle".to_string(),
                    ),
                },
                (stored, due) => {
                    let next =
                        pki::next_authority(stored.as_ref(), FIELD_MANAGER, now, &self.lifetimes)
                            .map_err(self.error(&self.ca_secret))?;
                    (
                        next,
                        format!("a new CA, because the old one: {}", reason(due)),
                    )
                }
            };
            if self
                .write(&self.ca_secret, secret, data(&next.ca, &next.bundle))
                .await?
            {
                let due = match pki::ca_due(Some(&next), now, &self.lifetimes) {
                    Due::At(due) => due,
                    Due::Now(why) => {
                        return Err(self.error(&self.ca_secret)(format!(
                            "the CA just made is unusable: {why}"
                        )));
                    }
                };
                let written = Some(why);
                return Ok((next, Outcome { due, written }));
            }
        }
        Err(self.contended(&self.ca_secret))
    }

    /// The certificate in Secret `name` for exactly `names`, signed by a CA
    /// of `authority`'s bundle: issued by its CA when missing, unusable, for
    /// other names, signed by a CA no longer trusted, or due for renewal.
    pub async fn certificate(
        &self,
        authority: &Authority,
        name: &str,
        names: &[Name],
        now: SystemTime,
    ) -> Result<Outcome> {
        for _ in 0..ATTEMPTS {
            let secret = self.secrets.get_opt(name).await?;
            let stored = secret.as_ref().and_then(keyed_cert);
            let renew_before = self.lifetimes.leaf_renew_before;
            let due = pki::leaf_due(stored.as_ref(), &authority.bundle, names, now, renew_before);
            let why = match (stored, due) {
                (Some(pair), Due::At(due)) => {
                    let bundle_stored = secret.as_ref().and_then(|s| text(s, BUNDLE_KEY));
                    if bundle_stored.as_deref() == Some(authority.bundle.as_str()) {
                        return Ok(Outcome { due, written: None });
                    }
                    // Only the bundle beside it changed (a new CA): keep the
                    // certificate, update what it says to trust.
                    if self
                        .write(name, secret, data(&pair, &authority.bundle))
                        .await?
                    {
                        let written = Some("the CA bundle changed".to_string());
                        return Ok(Outcome { due, written });
                    }
                    continue;
                }
                (_, due) => reason(due),
            };
            let issued = pki::issue(&authority.ca, names, now, self.lifetimes.leaf)
                .map_err(self.error(name))?;
            if self
                .write(name, secret, data(&issued, &authority.bundle))
                .await?
            {
                let due = pki::inspect(&issued.cert)
                    .map(|i| i.renew_at(renew_before))
                    .map_err(self.error(name))?;
                let written = Some(format!("a new certificate, because the old one: {why}"));
                return Ok(Outcome { due, written });
            }
        }
        Err(self.contended(name))
    }

    fn contended(&self, name: &str) -> Error {
        self.error(name)(format!(
            "{ATTEMPTS} writes in a row conflicted with other writers"
        ))
    }
}

/// Why something is replaced now (`Due::At` comes only with a stored value,
/// so without one it is missing).
fn reason(due: Due) -> String {
    match due {
        Due::Now(why) => why,
        Due::At(_) => "there is none".into(),
    }
}
