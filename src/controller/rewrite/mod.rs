//! The image-rewriting admission webhook (docs/rewrite.md), served by every controller
//! replica (not only the leader): the API server calls `POST /mutate` over HTTPS for
//! each pod created and each ephemeral container added, and gets back a JSON patch made
//! by [`decide`] from the reflectors' view of the mirrors and namespaces. The serving
//! certificate is kept by [`certs`]; the pods the webhook never saw (it was down, and
//! `failurePolicy: Ignore` let them in) are found by [`audit`] on the leader.

pub mod audit;
pub mod certs;
pub mod decide;
#[cfg(test)]
mod tests;

use super::metrics::ControllerMetrics;
use crate::api::mirror::RegistryMirror;
use crate::server::{Body, ConnLimits, full};
use decide::{Namespace as NsView, Operation, Outcome};
use futures::StreamExt;
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::task::TaskTracker;

/// The largest AdmissionReview read (a pod is well under 1 MiB in etcd).
const MAX_REVIEW: usize = 3 * 1024 * 1024;

/// The webhook's connections: the API server holds a few, and sends at once.
const LIMITS: ConnLimits = ConnLimits {
    max_connections: 256,
    header_timeout: Duration::from_secs(10),
    idle_timeout: Duration::from_secs(90),
};

/// Options of the webhook.
#[derive(Clone, Debug)]
pub struct WebhookOptions {
    /// Where it listens (HTTPS).
    pub listen: SocketAddr,
    /// Its certificate.
    pub certs: certs::CertOptions,
}

/// What answers the API server: the reflectors' views and the metrics.
#[derive(Clone)]
pub struct Webhook {
    /// The mirrors and namespaces.
    pub views: Views,
    /// Where answers are counted.
    pub metrics: ControllerMetrics,
}

/// An AdmissionReview as the API server sends it (admission.k8s.io/v1): what is read.
#[derive(Deserialize)]
struct Review {
    request: Option<ReviewRequest>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReviewRequest {
    uid: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    sub_resource: Option<String>,
    #[serde(default)]
    object: Option<Pod>,
    #[serde(default)]
    dry_run: Option<bool>,
}

/// Why a review gets no answer: the API server then applies the failure policy.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// Not an AdmissionReview with a request.
    #[error("not an admission.k8s.io/v1 AdmissionReview with a request: {0}")]
    Invalid(String),
}

impl Webhook {
    /// The AdmissionReview answering `body`: always allowed; patched when images are
    /// rewritten or the pod is marked as left alone.
    pub fn review(&self, body: &[u8]) -> Result<serde_json::Value, ReviewError> {
        let review: Review =
            serde_json::from_slice(body).map_err(|e| ReviewError::Invalid(e.to_string()))?;
        let request = review
            .request
            .ok_or_else(|| ReviewError::Invalid("no request".into()))?;
        let mut response = serde_json::json!({"uid": request.uid, "allowed": true});
        let op = match request.sub_resource.as_deref() {
            None | Some("") => Operation::Create,
            Some("ephemeralcontainers") => Operation::EphemeralContainers,
            Some(_) => return Ok(envelope(response)),
        };
        let (Some(pod), Some(ns)) = (request.object, request.namespace) else {
            return Ok(envelope(response));
        };
        let labels = self.views.namespace_labels(&ns);
        let view = NsView {
            name: &ns,
            labels: &labels,
        };
        let decision = decide::decide(&pod, &view, op, &self.views.mirrors.state());
        if request.dry_run != Some(true) {
            for outcome in decision.outcomes.values() {
                self.metrics.count_pod(match outcome {
                    Outcome::Rewritten(_) => "rewritten",
                    Outcome::Left(r) => r.as_str(),
                });
            }
        }
        if !decision.patch.is_empty() {
            use base64::Engine as _;
            let patch = serde_json::to_vec(&decision.patch).expect("JSON values serialize");
            response["patchType"] = "JSONPatch".into();
            response["patch"] = base64::engine::general_purpose::STANDARD
                .encode(patch)
                .into();
            tracing::debug!(pod = %pod.name_any(), namespace = %ns, outcomes = ?decision.outcomes, "rewrote a pod's images");
        }
        Ok(envelope(response))
    }

    /// One HTTP request: `POST /mutate` with a review; anything else is refused.
    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        if req.method() != Method::POST || req.uri().path() != "/mutate" {
            return plain(StatusCode::NOT_FOUND, "the webhook answers POST /mutate\n");
        }
        let body = http_body_util::Limited::new(req.into_body(), MAX_REVIEW);
        let bytes = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return plain(StatusCode::BAD_REQUEST, &format!("{e}\n")),
        };
        let answer = match self.review(&bytes) {
            Ok(v) => Response::builder()
                .header("content-type", "application/json")
                .body(full(serde_json::to_vec(&v).expect("JSON values serialize")))
                .expect("valid response"),
            Err(e) => plain(StatusCode::BAD_REQUEST, &format!("{e}\n")),
        };
        self.metrics
            .observe_webhook(started.elapsed().as_secs_f64());
        answer
    }
}

fn envelope(response: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": response,
    })
}

fn plain(status: StatusCode, text: &str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .body(full(text.to_string()))
        .expect("valid response")
}

/// Why the webhook cannot serve.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The port is taken.
    #[error("cannot listen on {addr} (the webhook): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// TLS could not be set up.
    #[error("the webhook's TLS: {0}")]
    Tls(#[from] rustls::Error),
}

/// The reflectors' views the webhook and the audit read: every mirror the controller
/// reconciles and every namespace, filled from the start on every replica.
#[derive(Clone)]
pub struct Views {
    /// The mirrors.
    pub mirrors: Store<RegistryMirror>,
    /// The namespaces.
    pub namespaces: Store<Namespace>,
    tasks: Arc<Vec<tokio::task::AbortHandle>>,
}

impl Views {
    /// Starts the reflectors of `mirrors` and of every namespace.
    pub fn start(client: &Client, mirrors: Api<RegistryMirror>) -> Views {
        let (mirrors, a) = reflect(mirrors);
        let (namespaces, b) = reflect(Api::<Namespace>::all(client.clone()));
        Views {
            mirrors,
            namespaces,
            tasks: Arc::new(vec![a, b]),
        }
    }

    /// Views over stores filled elsewhere (tests).
    pub fn over(mirrors: Store<RegistryMirror>, namespaces: Store<Namespace>) -> Views {
        Views {
            mirrors,
            namespaces,
            tasks: Arc::new(Vec::new()),
        }
    }

    /// Stops the reflectors.
    pub fn stop(&self) {
        for t in self.tasks.iter() {
            t.abort();
        }
    }

    /// Waits until both stores have had their first list.
    async fn filled(&self) {
        let _ = self.mirrors.wait_until_ready().await;
        let _ = self.namespaces.wait_until_ready().await;
    }

    /// `ns` as the selectors see it: its labels, or (not seen yet) the one the API
    /// server gives every namespace.
    fn namespace_labels(&self, ns: &str) -> BTreeMap<String, String> {
        self.namespaces
            .get(&reflector::ObjectRef::new(ns))
            .and_then(|n| n.metadata.labels.clone())
            .unwrap_or_else(|| {
                BTreeMap::from([("kubernetes.io/metadata.name".to_string(), ns.to_string())])
            })
    }
}

/// Fills a store of `K` from `api` until aborted.
fn reflect<K>(api: Api<K>) -> (Store<K>, tokio::task::AbortHandle)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher::watcher(api, watcher::Config::default()))
        .default_backoff()
        .for_each(|_| futures::future::ready(()));
    (store, tokio::spawn(stream).abort_handle())
}

/// Serves the webhook until `stop` says so: the certificate kept, HTTPS on
/// `options.listen` once the views are filled (a connection waits until then).
pub async fn serve(
    client: Client,
    views: Views,
    options: WebhookOptions,
    metrics: ControllerMetrics,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, ServeError> {
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: options.listen,
            source,
        })?;
    let serving = Arc::new(certs::Serving::default());
    let tls = Arc::new(crate::proxy::tls::Accepting::new(serving.clone())?);
    let keeping = tokio::spawn(certs::keep(
        client,
        options.certs.clone(),
        serving,
        stop.clone(),
    ));
    let webhook = Arc::new(Webhook { views, metrics });
    Ok(tokio::spawn(async move {
        let mut stopping = stop.clone();
        tokio::select! {
            _ = webhook.views.filled() => {}
            _ = stopping.changed() => {
                keeping.abort();
                return;
            }
        }
        tracing::info!(listen = %options.listen, "image-rewriting webhook serving");
        let tracker = TaskTracker::new();
        crate::server::accept_loop(
            listener,
            stop,
            tracker.clone(),
            LIMITS,
            tls,
            move |req, _peer| {
                let webhook = webhook.clone();
                async move { Ok::<_, Infallible>(webhook.handle(req).await) }
            },
            None,
        )
        .await;
        tracker.close();
        tracker.wait().await;
        keeping.abort();
    }))
}
