//! The webhook's serving certificate. Made by the controller: a CA and a certificate it
//! signs, in one Secret of the controller's namespace (`ca.crt`, `ca.key`, `tls.crt`,
//! `tls.key`), the certificate renewed a month before it ends (it lasts 90 days) or when
//! the names it must carry change, and the CA (10 years) kept as the
//! MutatingWebhookConfiguration's `caBundle`. Or made by cert-manager (`tls.crt`,
//! `tls.key`, its CA injector keeping `caBundle`): then the controller only reads it.
//!
//! Every replica runs [`keep`]: they serve the same Secret, and whichever sees it missing
//! or due first writes it (with the resourceVersion it read, so two never both do).

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::{Span, Timestamp, tz::TimeZone};
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::sign::CertifiedKey;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// How long a serving certificate lasts, and how long before its end it is renewed.
const SERVING_DAYS: i64 = 90;
const RENEW_DAYS_BEFORE: i64 = 30;
/// How long the CA lasts.
const CA_DAYS: i64 = 3650;
/// The CA's common name (the CA is rebuilt from it and its key to sign a renewal).
const CA_NAME: &str = "pullthrough webhook CA";
/// Annotation of the Secret: when its serving certificate ends (RFC 3339).
const NOT_AFTER: &str = "pullthrough.dev/serving-not-after";
/// Annotation of the Secret: the names its serving certificate carries.
const HOSTS: &str = "pullthrough.dev/serving-hosts";
/// How often the Secret is looked at.
pub const RECHECK: Duration = Duration::from_secs(60);

/// Who makes the certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Issuance {
    /// The controller (a CA of its own in the Secret).
    #[value(name = "self")]
    SelfSigned,
    /// cert-manager: the controller only reads the Secret.
    CertManager,
}

/// Where the certificate lives and what it names.
#[derive(Clone, Debug)]
pub struct CertOptions {
    /// The Secret's namespace (the controller's).
    pub namespace: String,
    /// The Secret's name.
    pub secret: String,
    /// The names the certificate carries (the Service's DNS names; an IP for a `url`).
    pub hosts: Vec<String>,
    /// Who makes it.
    pub issuance: Issuance,
    /// The MutatingWebhookConfiguration whose `caBundle` is kept (self-made only).
    pub configuration: Option<String>,
}

/// Why a certificate cannot be made or read.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// rcgen refused.
    #[error("making the webhook's certificate: {0}")]
    Make(#[from] rcgen::Error),
    /// No usable certificate and key, or no configuration to give the CA to.
    #[error("the webhook's certificate: {0}")]
    Unusable(String),
    /// An API call.
    #[error("{action}: {source}")]
    Kube {
        /// What was being done.
        action: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
}

/// The certificate being served: swapped when the Secret changes.
#[derive(Debug, Default)]
pub struct Serving {
    current: RwLock<Option<Arc<CertifiedKey>>>,
}

impl Serving {
    fn set(&self, key: CertifiedKey) {
        *self.current.write().expect("certificate lock") = Some(Arc::new(key));
    }
}

impl rustls::server::ResolvesServerCert for Serving {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().expect("certificate lock").clone()
    }
}

/// A CA's parameters: the same every time, so that a CA is rebuilt from its key alone.
fn ca_params(not_before: Timestamp) -> Result<CertificateParams, rcgen::Error> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.distinguished_name.push(DnType::CommonName, CA_NAME);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = date(not_before);
    p.not_after = date(not_before + days(CA_DAYS));
    Ok(p)
}

/// `n` days of 24 hours (a timestamp has no calendar days).
fn days(n: i64) -> Span {
    Span::new().hours(n * 24)
}

fn date(t: Timestamp) -> time::OffsetDateTime {
    let d = t.to_zoned(TimeZone::UTC).date();
    rcgen::date_time_ymd(i32::from(d.year()), d.month() as u8, d.day() as u8)
}

/// The PEM texts of a Secret the controller makes.
#[derive(Clone, Debug, PartialEq)]
pub struct Made {
    /// The CA certificate (the `caBundle`).
    pub ca_crt: String,
    /// The CA key.
    pub ca_key: String,
    /// The serving certificate.
    pub tls_crt: String,
    /// Its key.
    pub tls_key: String,
    /// When the serving certificate ends.
    pub not_after: Timestamp,
}

/// A new CA (`ca` None) or the one given (certificate and key PEM), and a serving
/// certificate it signs for `hosts`, valid from `now`.
pub fn make(ca: Option<(&str, &str)>, hosts: &[String], now: Timestamp) -> Result<Made, CertError> {
    let (ca_crt, ca_key) = match ca {
        Some((crt, key)) => (crt.to_string(), KeyPair::from_pem(key)?),
        None => {
            let key = KeyPair::generate()?;
            let crt = ca_params(now)?.self_signed(&key)?.pem();
            (crt, key)
        }
    };
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = Issuer::new(ca_params(now)?, ca_key);
    let mut p = CertificateParams::new(hosts.to_vec())?;
    p.distinguished_name.push(
        DnType::CommonName,
        hosts.first().cloned().unwrap_or_default(),
    );
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // A day of slack for clocks behind ours.
    p.not_before = date(now - days(1));
    let not_after = now + days(SERVING_DAYS);
    p.not_after = date(not_after);
    let key = KeyPair::generate()?;
    let crt = p.signed_by(&key, &issuer)?.pem();
    Ok(Made {
        ca_crt,
        ca_key: ca_key_pem,
        tls_crt: crt,
        tls_key: key.serialize_pem(),
        not_after,
    })
}

fn text(secret: &Secret, key: &str) -> Option<String> {
    let bytes = secret.data.as_ref()?.get(key)?;
    String::from_utf8(bytes.0.clone()).ok()
}

/// Whether a self-made Secret's serving certificate must be made again at `now`: it
/// ends within a month, or names other hosts than `hosts`, or is not there.
pub fn due(secret: &Secret, hosts: &[String], now: Timestamp) -> bool {
    let a = secret.annotations();
    let ends = a.get(NOT_AFTER).and_then(|t| t.parse::<Timestamp>().ok());
    let renew_at = ends.map(|e| e - days(RENEW_DAYS_BEFORE));
    renew_at.is_none_or(|r| now >= r)
        || a.get(HOSTS).map(String::as_str) != Some(&hosts.join(","))
        || text(secret, "tls.crt").is_none()
        || text(secret, "tls.key").is_none()
}

/// The Secret holding `made`.
fn secret(options: &CertOptions, made: &Made, base: Option<&Secret>) -> Secret {
    let data = BTreeMap::from([
        (
            "ca.crt".to_string(),
            ByteString(made.ca_crt.clone().into_bytes()),
        ),
        (
            "ca.key".to_string(),
            ByteString(made.ca_key.clone().into_bytes()),
        ),
        (
            "tls.crt".to_string(),
            ByteString(made.tls_crt.clone().into_bytes()),
        ),
        (
            "tls.key".to_string(),
            ByteString(made.tls_key.clone().into_bytes()),
        ),
    ]);
    Secret {
        metadata: ObjectMeta {
            name: Some(options.secret.clone()),
            namespace: Some(options.namespace.clone()),
            resource_version: base.and_then(|b| b.resource_version()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/name".to_string(),
                "pullthrough".to_string(),
            )])),
            annotations: Some(BTreeMap::from([
                (NOT_AFTER.to_string(), made.not_after.to_string()),
                (HOSTS.to_string(), options.hosts.join(",")),
            ])),
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(data),
        ..Secret::default()
    }
}

/// The certificate and key of a Secret, as rustls serves them.
pub fn certified_key(secret: &Secret) -> Result<CertifiedKey, CertError> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let unusable = |why: &str| CertError::Unusable(why.to_string());
    let crt = text(secret, "tls.crt").ok_or_else(|| unusable("no tls.crt"))?;
    let key = text(secret, "tls.key").ok_or_else(|| unusable("no tls.key"))?;
    let chain = CertificateDer::pem_slice_iter(crt.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Unusable(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes())
        .map_err(|e| CertError::Unusable(e.to_string()))?;
    let provider = rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(chain, key, &provider).map_err(|e| CertError::Unusable(e.to_string()))
}

fn kube_err(action: impl Into<String>) -> impl FnOnce(kube::Error) -> CertError {
    let action = action.into();
    move |source| CertError::Kube { action, source }
}

/// One look at the Secret: made or renewed if it is self-made and due, served, and its
/// CA set as the configuration's `caBundle`.
pub async fn sync(
    client: &Client,
    options: &CertOptions,
    serving: &Serving,
) -> Result<(), CertError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &options.namespace);
    let name = &options.secret;
    let mut found = api
        .get_opt(name)
        .await
        .map_err(kube_err(format!("reading Secret {name}")))?;
    if options.issuance == Issuance::SelfSigned {
        let now = Timestamp::now();
        if found.as_ref().is_none_or(|s| due(s, &options.hosts, now)) {
            let ca = found
                .as_ref()
                .and_then(|s| Some((text(s, "ca.crt")?, text(s, "ca.key")?)));
            let made = make(
                ca.as_ref().map(|(c, k)| (c.as_str(), k.as_str())),
                &options.hosts,
                now,
            )?;
            let wanted = secret(options, &made, found.as_ref());
            let written = match &found {
                None => api.create(&PostParams::default(), &wanted).await,
                Some(_) => api.replace(name, &PostParams::default(), &wanted).await,
            };
            found = Some(match written {
                Ok(s) => {
                    tracing::info!(secret = %name, not_after = %made.not_after, "made the webhook's serving certificate");
                    s
                }
                // Another replica wrote it first: theirs stands.
                Err(kube::Error::Api(e)) if e.code == 409 => api
                    .get(name)
                    .await
                    .map_err(kube_err(format!("reading Secret {name}")))?,
                Err(e) => return Err(kube_err(format!("writing Secret {name}"))(e)),
            });
        }
    }
    let Some(found) = found else {
        return Err(CertError::Unusable(format!(
            "Secret {}/{name} does not exist yet (cert-manager makes it)",
            options.namespace
        )));
    };
    serving.set(certified_key(&found)?);
    if options.issuance == Issuance::SelfSigned
        && let (Some(configuration), Some(ca)) = (&options.configuration, text(&found, "ca.crt"))
    {
        set_ca_bundle(client, configuration, &ca).await?;
    }
    Ok(())
}

/// Sets `ca` as the `caBundle` of every webhook of the configuration that lacks it; a
/// missing configuration is an error, so that it is looked for again soon.
async fn set_ca_bundle(client: &Client, name: &str, ca: &str) -> Result<(), CertError> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let Some(mut config) = api.get_opt(name).await.map_err(kube_err(format!(
        "reading MutatingWebhookConfiguration {name}"
    )))?
    else {
        return Err(CertError::Unusable(format!(
            "MutatingWebhookConfiguration {name} does not exist: the API server does not \
             call the webhook"
        )));
    };
    let bundle = ByteString(ca.as_bytes().to_vec());
    let mut changed = false;
    for w in config.webhooks.iter_mut().flatten() {
        if w.client_config.ca_bundle.as_ref() != Some(&bundle) {
            w.client_config.ca_bundle = Some(bundle.clone());
            changed = true;
        }
    }
    if !changed {
        return Ok(());
    }
    match api.replace(name, &PostParams::default(), &config).await {
        Ok(_) => {
            tracing::info!(configuration = %name, "set the webhook's caBundle");
            Ok(())
        }
        // Changed under us: looked at again on the next round.
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(kube_err(format!(
            "writing MutatingWebhookConfiguration {name}"
        ))(e)),
    }
}

/// Keeps the certificate served and current until `stop`: a look every [`RECHECK`],
/// and sooner after a failure.
pub async fn keep(
    client: Client,
    options: CertOptions,
    serving: Arc<Serving>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let wait = match sync(&client, &options, &serving).await {
            Ok(()) => RECHECK,
            Err(e) => {
                tracing::warn!(error = %e, "the webhook's certificate");
                Duration::from_secs(5)
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> CertOptions {
        CertOptions {
            namespace: "pullthrough-system".into(),
            secret: "pullthrough-webhook".into(),
            hosts: vec![
                "pullthrough-webhook.pullthrough-system.svc".into(),
                "127.0.0.1".into(),
            ],
            issuance: Issuance::SelfSigned,
            configuration: None,
        }
    }

    #[test]
    fn a_renewal_keeps_the_ca_and_is_due_a_month_before_its_end() {
        let o = options();
        let now: Timestamp = "2026-12-06T00:00:00Z".parse().unwrap();
        let first = make(None, &o.hosts, now).unwrap();
        let s = secret(&o, &first, None);
        certified_key(&s).unwrap();
        assert!(!due(&s, &o.hosts, now));
        assert!(!due(&s, &o.hosts, now + days(59)));
        assert!(due(&s, &o.hosts, now + days(60)));
        // Other names: due at once.
        assert!(due(&s, &o.hosts[..1], now));
        // Renewed with the same CA: the caBundle stands, and the new certificate
        // verifies against it.
        let later = now + days(60);
        let second = make(Some((&first.ca_crt, &first.ca_key)), &o.hosts, later).unwrap();
        assert_eq!(second.ca_crt, first.ca_crt);
        assert_ne!(second.tls_crt, first.tls_crt);
        assert!(verifies(&first.ca_crt, &second.tls_crt, "127.0.0.1"));
        assert!(verifies(
            &first.ca_crt,
            &second.tls_crt,
            "pullthrough-webhook.pullthrough-system.svc"
        ));
        assert!(!verifies(&first.ca_crt, &second.tls_crt, "elsewhere.svc"));
        // Another CA's certificate does not.
        let other = make(None, &o.hosts, now).unwrap();
        assert!(!verifies(&first.ca_crt, &other.tls_crt, "127.0.0.1"));
    }

    /// Whether `crt` verifies for `name` against `ca`, as the API server would check it.
    fn verifies(ca: &str, crt: &str, name: &str) -> bool {
        use rustls::client::danger::ServerCertVerifier as _;
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca.as_bytes()).unwrap())
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap();
        let leaf = CertificateDer::from_pem_slice(crt.as_bytes()).unwrap();
        let name = ServerName::try_from(name.to_string()).unwrap();
        let now = UnixTime::since_unix_epoch(Duration::from_secs(
            "2027-03-01T00:00:00Z"
                .parse::<Timestamp>()
                .unwrap()
                .as_second() as u64,
        ));
        verifier
            .verify_server_cert(&leaf, &[], &name, &[], now)
            .is_ok()
    }
}
