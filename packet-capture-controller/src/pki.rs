//! X.509 for the controller's own issuer: a CA, the certificates it issues,
//! and when either must be replaced. Nothing here calls the API and the time
//! is always a parameter, so every decision can be tested at any date; the
//! `issuer` module keeps the results in Secrets.
//!
//! Keys are ECDSA P-256. A CA is replaced `ca_renew_before` its end and the
//! bundle of trusted CAs keeps the CAs it replaced until they expire, so a
//! certificate an old CA signed stays trusted until its own renewal; a new
//! certificate is never valid past the end of the CA that signs it.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

const DAY: Duration = Duration::from_secs(24 * 3600);

/// Certificates are dated this long before they are issued, so that a peer
/// whose clock is a little behind accepts them at once.
pub const BACKDATE: Duration = Duration::from_secs(3600);

/// How long certificates live and how long before their end they are
/// replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetimes {
    pub ca: Duration,
    pub ca_renew_before: Duration,
    pub leaf: Duration,
    pub leaf_renew_before: Duration,
}

impl Default for Lifetimes {
    /// A CA of 5 years replaced with 1 year left (the overlap in which the
    /// old one stays in the bundle); certificates of 1 year renewed 30 days
    /// before their end.
    fn default() -> Self {
        Self {
            ca: 5 * 365 * DAY,
            ca_renew_before: 365 * DAY,
            leaf: 365 * DAY,
            leaf_renew_before: 30 * DAY,
        }
    }
}

/// A name a certificate is for (a subject alternative name).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Name {
    Dns(String),
    Ip(IpAddr),
}

impl FromStr for Name {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Ok(ip) = s.parse() {
            return Ok(Self::Ip(ip));
        }
        let valid = !s.is_empty()
            && s.len() <= 253
            && s.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '*')
            });
        if valid {
            Ok(Self::Dns(s.to_ascii_lowercase()))
        } else {
            Err(format!("{s:?} is neither an IP address nor a DNS name"))
        }
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Dns(name) => f.write_str(name),
            Self::Ip(ip) => ip.fmt(f),
        }
    }
}

/// The DNS names under which the API server reaches a Service: it checks
/// the certificate against `<service>.<namespace>.svc`.
pub fn service_names(service: &str, namespace: &str) -> Vec<Name> {
    vec![
        Name::Dns(format!("{service}.{namespace}.svc")),
        Name::Dns(format!("{service}.{namespace}.svc.cluster.local")),
    ]
}

/// A certificate and its private key, both PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyedCert {
    pub cert: String,
    pub key: String,
}

impl fmt::Debug for KeyedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("KeyedCert")
            .field("cert", &self.cert)
            .finish_non_exhaustive()
    }
}

/// A CA and the bundle of CAs to trust: itself first, then the CAs it
/// replaced that have not expired yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authority {
    pub ca: KeyedCert,
    pub bundle: String,
}

/// What a certificate says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    pub subject: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The subject alternative names, sorted.
    pub names: Vec<Name>,
    pub is_ca: bool,
}

impl Info {
    /// When it is due for replacement: `renew_before` its end, but no
    /// earlier than two thirds into its life (so a certificate shorter than
    /// three times `renew_before` is not renewed as soon as it is issued).
    pub fn renew_at(&self, renew_before: Duration) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_after
            .checked_sub(renew_before.min(life / 3))
            .unwrap_or(UNIX_EPOCH)
    }
}

/// When a stored certificate (or CA) must be replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Due {
    /// It is good until then.
    At(SystemTime),
    /// Now, for this reason.
    Now(String),
}

fn offset(t: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(t)
}

fn system_time(seconds: i64) -> SystemTime {
    match u64::try_from(seconds) {
        Ok(s) => UNIX_EPOCH + Duration::from_secs(s),
        Err(_) => UNIX_EPOCH,
    }
}

/// An RFC 3339 time, for messages.
pub fn rfc3339(t: SystemTime) -> String {
    let format = time::format_description::well_known::Rfc3339;
    offset(t)
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| t.format(&format).ok())
        .unwrap_or_else(|| format!("{t:?}"))
}

/// The certificates of a PEM text, in order (other blocks are skipped).
fn ders(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in it".into());
    }
    Ok(certs)
}

fn parse<'a>(der: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, String> {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, cert)| cert)
        .map_err(|e| format!("not an X.509 certificate: {e}"))
}

fn info_of(cert: &X509Certificate<'_>) -> Result<Info, String> {
    let mut names = Vec::new();
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("subject alternative names: {e}"))?;
    for name in san.iter().flat_map(|s| s.value.general_names.iter()) {
        match name {
            GeneralName::DNSName(dns) => names.push(Name::Dns(dns.to_ascii_lowercase())),
            GeneralName::IPAddress(bytes) => match bytes.len() {
                4 => names.push(Name::Ip(IpAddr::from(
                    <[u8; 4]>::try_from(*bytes).unwrap_or_default(),
                ))),
                16 => names.push(Name::Ip(IpAddr::from(
                    <[u8; 16]>::try_from(*bytes).unwrap_or_default(),
                ))),
                n => return Err(format!("an IP address of {n} bytes")),
            },
            _ => {}
        }
    }
    names.sort();
    let validity = cert.validity();
    Ok(Info {
        subject: cert.subject().to_string(),
        not_before: system_time(validity.not_before.timestamp()),
        not_after: system_time(validity.not_after.timestamp()),
        names,
        is_ca: cert.is_ca(),
    })
}

/// What the first certificate of `pem` says.
pub fn inspect(pem: &str) -> Result<Info, String> {
    let ders = ders(pem)?;
    info_of(&parse(&ders[0])?)
}

/// Whether `key` (PEM) is the private key of the first certificate of `cert`.
fn key_matches(cert: &str, key: &str) -> Result<(), String> {
    let key = KeyPair::from_pem(key).map_err(|e| format!("its key is unreadable: {e}"))?;
    let ders = ders(cert)?;
    let cert = parse(&ders[0])?;
    if cert.public_key().raw == key.subject_public_key_info().as_slice() {
        Ok(())
    } else {
        Err("its key is not the certificate's".into())
    }
}

fn params(now: SystemTime, not_after: SystemTime) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.not_before = offset(now.checked_sub(BACKDATE).unwrap_or(now));
    p.not_after = offset(not_after);
    p
}

/// A new self-signed CA, valid from `now` for `lifetime`, named
/// `<common_name>@<unix time>` (as Kubernetes names its self-signed CAs) so
/// that successive CAs are told apart.
pub fn new_ca(common_name: &str, now: SystemTime, lifetime: Duration) -> Result<KeyedCert, String> {
    let mut p = params(now, now + lifetime);
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("{common_name}@{since}"));
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().map_err(|e| format!("generating a key: {e}"))?;
    let cert = p
        .self_signed(&key)
        .map_err(|e| format!("signing the CA: {e}"))?;
    Ok(KeyedCert {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// The CA as rcgen signs with it, and when it ends.
fn signer(ca: &KeyedCert) -> Result<(Issuer<'static, KeyPair>, SystemTime), String> {
    let ca_info = inspect(&ca.cert).map_err(|e| format!("the CA: {e}"))?;
    let ca_key = KeyPair::from_pem(&ca.key).map_err(|e| format!("the CA's key: {e}"))?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert, ca_key)
        .map_err(|e| format!("the CA's certificate: {e}"))?;
    Ok((issuer, ca_info.not_after))
}

/// What a serving certificate for `names` says, valid from `now` for
/// `lifetime` but never past `ca_end`.
fn leaf_params(
    names: &[Name],
    now: SystemTime,
    lifetime: Duration,
    ca_end: SystemTime,
) -> Result<CertificateParams, String> {
    let Some(first) = names.first() else {
        return Err("a certificate needs at least one name".into());
    };
    let mut p = CertificateParams::new(names.iter().map(Name::to_string).collect::<Vec<_>>())
        .map_err(|e| format!("names {names:?}: {e}"))?;
    let validity = params(now, (now + lifetime).min(ca_end));
    p.not_before = validity.not_before;
    p.not_after = validity.not_after;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, first.to_string());
    p.distinguished_name = dn;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.use_authority_key_identifier_extension = true;
    Ok(p)
}

/// A serving certificate for `names` signed by `ca`, valid from `now` for
/// `lifetime` but never past the CA's end.
pub fn issue(
    ca: &KeyedCert,
    names: &[Name],
    now: SystemTime,
    lifetime: Duration,
) -> Result<KeyedCert, String> {
    let (issuer, ca_end) = signer(ca)?;
    let p = leaf_params(names, now, lifetime, ca_end)?;
    let key = KeyPair::generate().map_err(|e| format!("generating a key: {e}"))?;
    let cert = p
        .signed_by(&key, &issuer)
        .map_err(|e| format!("signing the certificate: {e}"))?;
    Ok(KeyedCert {
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// A PKCS#10 request whose signature holds: the names it asks for (DNS
/// names and IP addresses, sorted; other kinds are an error) and the key.
pub struct Request {
    pub names: Vec<Name>,
    request: CertificateSigningRequestParams,
}

/// Reads a PEM certificate request and checks its signature.
pub fn read_request(pem: &str) -> Result<Request, String> {
    let request = CertificateSigningRequestParams::from_pem(pem)
        .map_err(|e| format!("not a valid certificate request: {e}"))?;
    let mut names = Vec::new();
    for san in &request.params.subject_alt_names {
        names.push(match san {
            SanType::DnsName(dns) => Name::Dns(dns.as_str().to_ascii_lowercase()),
            SanType::IpAddress(ip) => Name::Ip(*ip),
            other => return Err(format!("it asks for a name of another kind: {other:?}")),
        });
    }
    names.sort();
    Ok(Request { names, request })
}

/// A serving certificate for `request`'s key and exactly `names` (what was
/// checked, not what the request says besides), signed by `ca`, valid from
/// `now` for `lifetime` but never past the CA's end; PEM.
pub fn sign_request(
    ca: &KeyedCert,
    request: &Request,
    names: &[Name],
    now: SystemTime,
    lifetime: Duration,
) -> Result<String, String> {
    let (issuer, ca_end) = signer(ca)?;
    let signed = CertificateSigningRequestParams {
        params: leaf_params(names, now, lifetime, ca_end)?,
        public_key: request.request.public_key.clone(),
    };
    let cert = signed
        .signed_by(&issuer)
        .map_err(|e| format!("signing the certificate: {e}"))?;
    Ok(cert.pem())
}

/// When a stored CA must be replaced: now when it is missing, unreadable,
/// not a CA, not matching its key, or within `ca_renew_before` of its end.
pub fn ca_due(stored: Option<&Authority>, now: SystemTime, lifetimes: &Lifetimes) -> Due {
    let Some(stored) = stored else {
        return Due::Now("there is none".into());
    };
    let info = match inspect(&stored.ca.cert) {
        Ok(info) => info,
        Err(e) => return Due::Now(format!("its certificate is unreadable: {e}")),
    };
    if !info.is_ca {
        return Due::Now("its certificate is not a CA".into());
    }
    if let Err(e) = key_matches(&stored.ca.cert, &stored.ca.key) {
        return Due::Now(e);
    }
    let at = info.renew_at(lifetimes.ca_renew_before);
    if at <= now {
        Due::Now(format!("it expires at {}", rfc3339(info.not_after)))
    } else {
        Due::At(at)
    }
}

/// The certificate blocks of a PEM text, as text.
fn pem_blocks(pem: &str) -> Vec<String> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let mut out = Vec::new();
    let mut rest = pem;
    while let Some(start) = rest.find(BEGIN) {
        let Some(len) = rest[start..].find(END) else {
            break;
        };
        let end = start + len + END.len();
        out.push(format!("{}\n", &rest[start..end]));
        rest = &rest[end..];
    }
    out
}

/// The CAs of a bundle that are still valid at `now`, in order; unreadable
/// ones are dropped.
fn unexpired(bundle: &str, now: SystemTime) -> Vec<String> {
    pem_blocks(bundle)
        .into_iter()
        .filter(|block| inspect(block).is_ok_and(|i| i.is_ca && i.not_after > now))
        .collect()
}

/// A new CA, replacing `old` if there was one: the new bundle is the new CA
/// followed by the CAs of the old bundle that have not expired.
pub fn next_authority(
    old: Option<&Authority>,
    common_name: &str,
    now: SystemTime,
    lifetimes: &Lifetimes,
) -> Result<Authority, String> {
    let ca = new_ca(common_name, now, lifetimes.ca)?;
    let mut bundle = ca.cert.clone();
    for block in old.map(|o| unexpired(&o.bundle, now)).unwrap_or_default() {
        if !bundle.contains(block.trim()) {
            bundle.push_str(&block);
        }
    }
    Ok(Authority { ca, bundle })
}

/// The bundle without its expired or unreadable CAs, or None when there is
/// nothing to drop. The current CA always stays first (it is replaced long
/// before it expires).
pub fn pruned(authority: &Authority, now: SystemTime) -> Option<String> {
    let blocks = pem_blocks(&authority.bundle);
    let kept: Vec<String> = unexpired(&authority.bundle, now);
    let current = pem_blocks(&authority.ca.cert);
    let starts_with_current = kept.first().map(|b| b.trim()) == current.first().map(|b| b.trim());
    if kept.len() == blocks.len() && starts_with_current {
        return None;
    }
    let mut bundle: String = current.concat();
    for block in kept {
        if !bundle.contains(block.trim()) {
            bundle.push_str(&block);
        }
    }
    Some(bundle)
}

/// The CAs to trust: `authority`'s CA first, then every other CA of its
/// bundle and of `earlier` (a bundle trusted before) that has not expired,
/// each once. Certificates a replaced CA signed stay trusted until they
/// are renewed or the CA expires.
pub fn trusted(authority: &Authority, earlier: &str, now: SystemTime) -> String {
    let mut bundle: String = pem_blocks(&authority.ca.cert).concat();
    for source in [authority.bundle.as_str(), earlier] {
        for block in unexpired(source, now) {
            if !bundle.contains(block.trim()) {
                bundle.push_str(&block);
            }
        }
    }
    bundle
}

/// Whether a CA of `bundle` valid at `now` signed `cert`.
fn signed_by_bundle(cert: &X509Certificate<'_>, bundle: &str, now: SystemTime) -> bool {
    let Ok(cas) = ders(bundle) else {
        return false;
    };
    cas.iter().any(|der| {
        parse(der).is_ok_and(|ca| {
            ca.is_ca()
                && ca.subject().as_raw() == cert.issuer().as_raw()
                && system_time(ca.validity().not_after.timestamp()) > now
                && cert.verify_signature(Some(ca.public_key())).is_ok()
        })
    })
}

/// When a stored certificate must be replaced: now when it is missing,
/// unreadable, not matching its key, not exactly for `names`, not signed by
/// a CA of `bundle`, or within `renew_before` of its end (two thirds of its
/// life for a short one).
pub fn leaf_due(
    stored: Option<&KeyedCert>,
    bundle: &str,
    names: &[Name],
    now: SystemTime,
    renew_before: Duration,
) -> Due {
    let Some(stored) = stored else {
        return Due::Now("there is none".into());
    };
    let ders = match ders(&stored.cert) {
        Ok(d) => d,
        Err(e) => return Due::Now(format!("its certificate is unreadable: {e}")),
    };
    let cert = match parse(&ders[0]) {
        Ok(c) => c,
        Err(e) => return Due::Now(format!("its certificate is unreadable: {e}")),
    };
    let info = match info_of(&cert) {
        Ok(i) => i,
        Err(e) => return Due::Now(format!("its certificate is unreadable: {e}")),
    };
    if let Err(e) = key_matches(&stored.cert, &stored.key) {
        return Due::Now(e);
    }
    let mut wanted = names.to_vec();
    wanted.sort();
    wanted.dedup();
    if info.names != wanted {
        let list = |n: &[Name]| n.iter().map(Name::to_string).collect::<Vec<_>>().join(", ");
        return Due::Now(format!(
            "it is for [{}], not [{}]",
            list(&info.names),
            list(&wanted)
        ));
    }
    if !signed_by_bundle(&cert, bundle, now) {
        return Due::Now(format!(
            "no CA of the bundle signed it (issuer {})",
            cert.issuer()
        ));
    }
    let at = info.renew_at(renew_before);
    if at <= now {
        Due::Now(format!("it expires at {}", rfc3339(info.not_after)))
    } else {
        Due::At(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> SystemTime {
        // 2030-01-01, any fixed date will do.
        UNIX_EPOCH + Duration::from_secs(1_893_456_000)
    }

    fn names() -> Vec<Name> {
        service_names("packet-capture-webhook", "kube-system")
    }

    fn authority_at(now: SystemTime) -> Authority {
        next_authority(None, "packet-capture-ca", now, &Lifetimes::default()).unwrap()
    }

    #[test]
    fn the_webhook_certificate_is_for_the_service_names_the_api_server_uses() {
        let lt = Lifetimes::default();
        let authority = authority_at(t0());
        let leaf = issue(&authority.ca, &names(), t0(), lt.leaf).unwrap();
        let info = inspect(&leaf.cert).unwrap();
        assert_eq!(
            info.names,
            [
                Name::Dns("packet-capture-webhook.kube-system.svc".into()),
                Name::Dns("packet-capture-webhook.kube-system.svc.cluster.local".into()),
            ]
        );
        assert!(!info.is_ca);
        assert_eq!(info.subject, "CN=packet-capture-webhook.kube-system.svc");
        assert_eq!(info.not_before, t0() - BACKDATE);
        assert_eq!(info.not_after, t0() + lt.leaf);
        // Freshly issued: due 30 days before its end.
        assert_eq!(
            leaf_due(
                Some(&leaf),
                &authority.bundle,
                &names(),
                t0(),
                lt.leaf_renew_before
            ),
            Due::At(t0() + lt.leaf - lt.leaf_renew_before)
        );
        // rustls takes the pair as it is stored.
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(leaf.key.as_bytes()).unwrap();
        rustls::crypto::ring::sign::any_supported_type(&key).unwrap();
    }

    #[test]
    fn ip_addresses_and_dns_names_are_told_apart() {
        let parsed: Vec<Name> = ["10.1.2.3", "fd00::1", "Webhook.Example.com"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(
            parsed,
            [
                Name::Ip("10.1.2.3".parse().unwrap()),
                Name::Ip("fd00::1".parse().unwrap()),
                Name::Dns("webhook.example.com".into()),
            ]
        );
        assert!("not a name!".parse::<Name>().is_err());
        assert!("".parse::<Name>().is_err());
        let authority = authority_at(t0());
        let leaf = issue(&authority.ca, &parsed, t0(), DAY).unwrap();
        let mut want = parsed.clone();
        want.sort();
        assert_eq!(inspect(&leaf.cert).unwrap().names, want);
    }

    #[test]
    fn a_certificate_close_to_its_end_is_renewed() {
        let lt = Lifetimes::default();
        let authority = authority_at(t0());
        let leaf = issue(&authority.ca, &names(), t0(), lt.leaf).unwrap();
        let due = |now| {
            leaf_due(
                Some(&leaf),
                &authority.bundle,
                &names(),
                now,
                lt.leaf_renew_before,
            )
        };
        let renew_at = t0() + lt.leaf - lt.leaf_renew_before;
        assert_eq!(due(renew_at - DAY), Due::At(renew_at));
        assert!(
            matches!(due(renew_at), Due::Now(ref why) if why == "it expires at 2031-01-01T00:00:00Z"),
            "{:?}",
            due(renew_at)
        );
        assert!(matches!(due(t0() + 2 * lt.leaf), Due::Now(_)));
    }

    #[test]
    fn a_short_certificate_is_renewed_at_two_thirds_of_its_life() {
        let authority = authority_at(t0());
        let leaf = issue(&authority.ca, &names(), t0(), 3 * DAY).unwrap();
        let info = inspect(&leaf.cert).unwrap();
        let life = info.not_after.duration_since(info.not_before).unwrap();
        let at = info.not_after - life / 3;
        assert_eq!(
            leaf_due(Some(&leaf), &authority.bundle, &names(), t0(), 30 * DAY),
            Due::At(at)
        );
    }

    #[test]
    fn wrong_names_foreign_signers_broken_pairs_and_nothing_are_replaced() {
        let lt = Lifetimes::default();
        let authority = authority_at(t0());
        let other = authority_at(t0());
        let due = |leaf: Option<&KeyedCert>| {
            leaf_due(
                leaf,
                &authority.bundle,
                &names(),
                t0(),
                lt.leaf_renew_before,
            )
        };
        let reason = |d: Due| match d {
            Due::Now(why) => why,
            Due::At(at) => panic!("kept until {at:?}"),
        };
        assert_eq!(reason(due(None)), "there is none");

        let one_name = issue(&authority.ca, &names()[..1], t0(), lt.leaf).unwrap();
        assert_eq!(
            reason(due(Some(&one_name))),
            "it is for [packet-capture-webhook.kube-system.svc], not \
             [packet-capture-webhook.kube-system.svc, packet-capture-webhook.kube-system.svc.cluster.local]"
        );

        let foreign = issue(&other.ca, &names(), t0(), lt.leaf).unwrap();
        assert!(
            reason(due(Some(&foreign))).starts_with("no CA of the bundle signed it"),
            "{foreign:?}"
        );

        let good = issue(&authority.ca, &names(), t0(), lt.leaf).unwrap();
        let swapped = KeyedCert {
            cert: good.cert.clone(),
            key: foreign.key.clone(),
        };
        assert_eq!(
            reason(due(Some(&swapped))),
            "its key is not the certificate's"
        );
        let garbage = KeyedCert {
            cert: "not a certificate".into(),
            key: good.key.clone(),
        };
        assert!(reason(due(Some(&garbage))).starts_with("its certificate is unreadable"));
    }

    #[test]
    fn the_ca_is_replaced_a_year_before_its_end_and_kept_in_the_bundle() {
        let lt = Lifetimes::default();
        let first = authority_at(t0());
        assert!(inspect(&first.ca.cert).unwrap().is_ca);
        assert_eq!(pem_blocks(&first.bundle).len(), 1);
        let rotate_at = t0() + lt.ca - lt.ca_renew_before;
        assert_eq!(ca_due(Some(&first), t0(), &lt), Due::At(rotate_at));
        assert!(matches!(ca_due(Some(&first), rotate_at, &lt), Due::Now(_)));
        assert_eq!(ca_due(None, t0(), &lt), Due::Now("there is none".into()));

        // A certificate issued by the first CA just before the rotation.
        let leaf_time = rotate_at - DAY;
        let leaf = issue(&first.ca, &names(), leaf_time, lt.leaf).unwrap();

        let second = next_authority(Some(&first), "packet-capture-ca", rotate_at, &lt).unwrap();
        assert_ne!(second.ca, first.ca);
        let blocks = pem_blocks(&second.bundle);
        assert_eq!(blocks.len(), 2, "{}", second.bundle);
        assert_eq!(blocks[0].trim(), second.ca.cert.trim(), "the new CA first");
        assert_eq!(blocks[1].trim(), first.ca.cert.trim(), "then the old one");

        // The old CA's certificate stays trusted: it is not re-issued
        // because the CA changed, only when it is itself due.
        let due = leaf_due(
            Some(&leaf),
            &second.bundle,
            &names(),
            rotate_at,
            lt.leaf_renew_before,
        );
        assert_eq!(due, Due::At(leaf_time + lt.leaf - lt.leaf_renew_before));
        // Its renewal then comes from the new CA, which the bundle has
        // carried for eleven months.
        let renewed = issue(&second.ca, &names(), leaf_time + 336 * DAY, lt.leaf).unwrap();
        assert!(matches!(
            leaf_due(
                Some(&renewed),
                &second.bundle,
                &names(),
                leaf_time + 336 * DAY,
                lt.leaf_renew_before
            ),
            Due::At(_)
        ));

        // Once the old CA has expired it leaves the bundle.
        let after = t0() + lt.ca + DAY;
        assert_eq!(pruned(&second, rotate_at), None);
        let kept = pruned(&second, after).unwrap();
        assert_eq!(kept.trim(), second.ca.cert.trim());
        let third = next_authority(Some(&second), "packet-capture-ca", after, &lt).unwrap();
        assert_eq!(
            pem_blocks(&third.bundle).len(),
            2,
            "the expired CA is dropped"
        );
    }

    #[test]
    fn a_certificate_never_outlives_its_ca() {
        let lt = Lifetimes::default();
        let authority = authority_at(t0());
        let late = t0() + lt.ca - 10 * DAY;
        let leaf = issue(&authority.ca, &names(), late, lt.leaf).unwrap();
        assert_eq!(
            inspect(&leaf.cert).unwrap().not_after,
            inspect(&authority.ca.cert).unwrap().not_after
        );
    }

    #[test]
    fn a_broken_ca_is_replaced() {
        let lt = Lifetimes::default();
        let good = authority_at(t0());
        let other = authority_at(t0());
        let mismatched = Authority {
            ca: KeyedCert {
                cert: good.ca.cert.clone(),
                key: other.ca.key.clone(),
            },
            bundle: good.bundle.clone(),
        };
        assert_eq!(
            ca_due(Some(&mismatched), t0(), &lt),
            Due::Now("its key is not the certificate's".into())
        );
        let leaf_as_ca = issue(&good.ca, &names(), t0(), lt.leaf).unwrap();
        let not_ca = Authority {
            ca: leaf_as_ca.clone(),
            bundle: leaf_as_ca.cert.clone(),
        };
        assert_eq!(
            ca_due(Some(&not_ca), t0(), &lt),
            Due::Now("its certificate is not a CA".into())
        );
    }
}
