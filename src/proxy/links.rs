//! Which cached content may be served under which repository name.
//!
//! The store keeps each object once, by digest, whatever repository it came through. A
//! digest is served under repository R only when the upstream served it under R: it is
//! *linked* to R when a manifest of R is served (the manifest, and what it references:
//! config, layers, child manifests), or when the upstream answers a HEAD of it under R.
//! A digest that is not linked to R is proven first, by that HEAD: the upstream's 404 is
//! the client's 404, so that a digest cached through another repository (a private one,
//! or one the client may not read) is never handed out under a name that does not hold
//! it. This is how Distribution's own repositories work (`_layers/<digest>/link`).
//!
//! Links are kept per repository in memory, and in the store as one record per
//! repository ([`LinkRecord`]): the digests linked directly, from which a restart derives
//! the references again through the index. A record's digests that are no longer cached
//! are dropped when it is read back, so eviction leaves no link to content the cache no
//! longer holds. Links to a shared bucket's content that this replica's index does not
//! know are proven again by a HEAD; a lost write of a record costs the same, never a
//! wrong answer.

use super::error::ProxyError;
use super::index::{Index, manifest_refs};
use super::metrics::Metrics;
use super::pull_through::single_flight::SingleFlight;
use super::store::{LinkRecord, RepoKey};
use super::upstream::{Object, Upstream};
use crate::oci::{Digest, Reference};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};

/// One repository's links.
#[derive(Default)]
struct Repo {
    /// Linked directly: served under the repository or proven by a HEAD (persisted).
    direct: HashSet<Digest>,
    /// Linked directly or referenced by a manifest linked: what may be served.
    all: HashSet<Digest>,
}

/// The links of every repository this process has served.
pub struct Links {
    index: Arc<Index>,
    repos: Mutex<HashMap<RepoKey, Arc<Mutex<Repo>>>>,
    /// Loads of a repository's record, one at a time per repository.
    loads: SingleFlight<RepoKey, Arc<Mutex<Repo>>>,
    /// Proofs by the upstream, one HEAD per repository and digest at a time.
    proofs: SingleFlight<(RepoKey, Digest), Result<(), ProxyError>>,
    /// Writes of a repository's record, in order.
    writes: tokio::sync::Mutex<()>,
    metrics: Metrics,
}

impl Links {
    /// No links loaded yet; records are read from `index`'s store when first needed.
    pub fn new(index: Arc<Index>, metrics: Metrics) -> Arc<Links> {
        Arc::new(Links {
            index,
            repos: Mutex::new(HashMap::new()),
            loads: SingleFlight::new(metrics.fetch_waiters.clone()),
            proofs: SingleFlight::new(metrics.fetch_waiters.clone()),
            writes: tokio::sync::Mutex::new(()),
            metrics,
        })
    }

    /// A repository's links, read from the store the first time.
    async fn repo(self: &Arc<Self>, key: &RepoKey) -> Arc<Mutex<Repo>> {
        if let Some(r) = self.repos.lock().expect("links lock").get(key) {
            return r.clone();
        }
        let (this, k) = (self.clone(), key.clone());
        let (repo, _) = self
            .loads
            .run(key.clone(), async move { this.load(k).await }, |_| {
                Arc::new(Mutex::new(Repo::default()))
            })
            .await;
        repo
    }

    async fn load(self: Arc<Self>, key: RepoKey) -> Arc<Mutex<Repo>> {
        if let Some(r) = self.repos.lock().expect("links lock").get(&key) {
            return r.clone();
        }
        let store = self.index.store();
        let record = match store.links(&key).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(upstream = %key.upstream, repo = %key.repository, error = %e,
                    "could not read a link record: its links are proven again");
                None
            }
        };
        let mut repo = Repo::default();
        let mut pruned = false;
        for d in record.iter().flat_map(|r| &r.digests) {
            let Ok(d) = d.parse::<Digest>() else {
                pruned = true;
                continue;
            };
            // A shared bucket may hold what this replica's index does not know.
            if !self.index.contains(&d) && !store.shared() {
                pruned = true;
                continue;
            }
            repo.direct.insert(d);
        }
        repo.all = self.index.closure(repo.direct.iter().cloned());
        let repo = Arc::new(Mutex::new(repo));
        self.repos
            .lock()
            .expect("links lock")
            .insert(key.clone(), repo.clone());
        if pruned {
            self.persist(key);
        }
        repo
    }

    /// Whether `digest` may be served under `key`'s repository without asking.
    pub async fn has(self: &Arc<Self>, key: &RepoKey, digest: &Digest) -> bool {
        let repo = self.repo(key).await;
        repo.lock().expect("repo links lock").all.contains(digest)
    }

    /// Links a manifest served under `key`'s repository, and what its `body` references.
    pub async fn link_manifest(self: &Arc<Self>, key: &RepoKey, digest: &Digest, body: &[u8]) {
        let repo = self.repo(key).await;
        if repo
            .lock()
            .expect("repo links lock")
            .direct
            .contains(digest)
        {
            return;
        }
        let refs = manifest_refs(body);
        self.link(key, &repo, digest, refs);
    }

    fn link(
        self: &Arc<Self>,
        key: &RepoKey,
        repo: &Mutex<Repo>,
        digest: &Digest,
        refs: Vec<Digest>,
    ) {
        let mut r = repo.lock().expect("repo links lock");
        let new = r.direct.insert(digest.clone());
        r.all.insert(digest.clone());
        r.all.extend(refs);
        drop(r);
        if new {
            self.persist(key.clone());
        }
    }

    /// Runs `fetch` for `digest` under `key`'s repository. `fetch(unlinked)` is the
    /// cache's answer, told whether the digest is linked there (`trusted`: another
    /// replica asks, for what it proved itself); when it would need the cache's copy of
    /// an unlinked digest ([`ProxyError::NotLinked`]), the digest is proven first and
    /// `fetch` runs again. A blob the upstream served for the repository is linked to it;
    /// a manifest is linked by the caller, with what it references
    /// ([`Links::link_manifest`]).
    pub async fn through<T, F, Fut>(
        self: &Arc<Self>,
        up: &Arc<Upstream>,
        key: &RepoKey,
        digest: &Digest,
        object: Object,
        trusted: bool,
        fetch: F,
    ) -> Result<T, ProxyError>
    where
        F: Fn(bool) -> Fut,
        Fut: Future<Output = Result<T, ProxyError>>,
    {
        let linked = trusted || self.has(key, digest).await;
        match fetch(!linked).await {
            Err(ProxyError::NotLinked) => {
                self.prove(up, key, digest, object).await?;
                fetch(false).await
            }
            Ok(v) => {
                if !linked && object == Object::Blob {
                    let repo = self.repo(key).await;
                    self.link(key, &repo, digest, Vec::new());
                }
                Ok(v)
            }
            Err(e) => Err(e),
        }
    }

    /// Succeeds when `digest` (a manifest or a blob, as `object` says) may be served
    /// under `key`'s repository: it is linked to it, or the upstream answers a HEAD of
    /// it there (it is linked then). The upstream's refusal is the answer otherwise: a
    /// 404 for what the repository does not hold.
    pub async fn prove(
        self: &Arc<Self>,
        up: &Arc<Upstream>,
        key: &RepoKey,
        digest: &Digest,
        object: Object,
    ) -> Result<(), ProxyError> {
        if self.has(key, digest).await {
            return Ok(());
        }
        let (this, up, k, d) = (self.clone(), up.clone(), key.clone(), digest.clone());
        let proof = async move {
            let asked = match object {
                Object::Manifest => up
                    .manifest_digest(
                        &k.repository,
                        &Reference::Digest(d.clone()),
                        &crate::oci::media::Accept::Any,
                    )
                    .await
                    .map(drop),
                _ => up.blob_size(&k.repository, &d).await.map(drop),
            };
            let result = if asked.is_ok() { "linked" } else { "refused" };
            this.metrics.link_proofs(result).inc();
            asked?;
            let repo = this.repo(&k).await;
            this.link(&k, &repo, &d, Vec::new());
            Ok(())
        };
        let (result, _) = self
            .proofs
            .run((key.clone(), digest.clone()), proof, |e| {
                Err(ProxyError::internal(format!("link proof failed: {e}")))
            })
            .await;
        result
    }

    /// Writes `key`'s record as it is now, in the background; writes happen in order, so
    /// the last one holds every link.
    fn persist(self: &Arc<Self>, key: RepoKey) {
        let this = self.clone();
        tokio::spawn(async move {
            let _turn = this.writes.lock().await;
            let Some(repo) = this.repos.lock().expect("links lock").get(&key).cloned() else {
                return;
            };
            let mut digests: Vec<String> = repo
                .lock()
                .expect("repo links lock")
                .direct
                .iter()
                .map(Digest::to_string)
                .collect();
            digests.sort_unstable();
            let record = LinkRecord {
                upstream: key.upstream.clone(),
                repository: key.repository.clone(),
                digests,
            };
            if let Err(e) = this.index.store().put_links(&record).await {
                tracing::warn!(upstream = %key.upstream, repo = %key.repository, error = %e,
                    "could not persist a link record: its links are proven again after a restart");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Algorithm;
    use crate::proxy::store::DiskStore;

    fn key(repo: &str) -> RepoKey {
        RepoKey {
            upstream: "registry.test".into(),
            repository: repo.into(),
        }
    }

    async fn links_over(dir: &std::path::Path) -> (Arc<Links>, Arc<Index>) {
        let (disk, _) = DiskStore::open(dir).unwrap();
        let index = Index::rebuild(Arc::new(disk), None, Metrics::new())
            .await
            .unwrap();
        (Links::new(index.clone(), Metrics::new()), index)
    }

    /// Caches a manifest, as a fetch would.
    async fn cache_manifest(index: &Arc<Index>, body: &[u8]) -> Digest {
        let m = Digest::of(Algorithm::Sha256, body);
        let room = index
            .reserve(body.len() as u64, &HashSet::new(), None)
            .await
            .unwrap();
        index
            .commit_manifest(
                &m,
                body.to_vec().into(),
                "application/vnd.oci.image.manifest.v1+json",
                room,
            )
            .await
            .unwrap();
        m
    }

    async fn settle(links: &Links) {
        // Every write queued so far has run once the writer's turn can be taken, twice.
        for _ in 0..2 {
            tokio::task::yield_now().await;
            drop(links.writes.lock().await);
        }
    }

    #[tokio::test]
    async fn a_manifest_links_its_references_to_its_repository_only() {
        let dir = tempfile::tempdir().unwrap();
        let (links, index) = links_over(dir.path()).await;
        let layer = Digest::of(Algorithm::Sha256, b"layer");
        let body = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{}"}},"layers":[{{"digest":"{layer}"}}]}}"#,
            Digest::of(Algorithm::Sha256, b"config")
        );
        let m = cache_manifest(&index, body.as_bytes()).await;
        links.link_manifest(&key("a"), &m, body.as_bytes()).await;
        assert!(links.has(&key("a"), &layer).await);
        assert!(links.has(&key("a"), &m).await);
        assert!(!links.has(&key("b"), &layer).await);
        assert!(!links.has(&key("b"), &m).await);
        settle(&links).await;

        // A restart reads the record back and finds the references through the index.
        let (again, _) = links_over(dir.path()).await;
        assert!(again.has(&key("a"), &layer).await, "links lost");
        assert!(!again.has(&key("b"), &layer).await);
    }

    #[tokio::test]
    async fn links_to_what_is_no_longer_cached_are_dropped_when_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let (links, index) = links_over(dir.path()).await;
        let body = br#"{"schemaVersion":2,"layers":[]}"#;
        let m = cache_manifest(&index, body).await;
        links.link_manifest(&key("a"), &m, body).await;
        settle(&links).await;
        index.discard(&m).await;

        let (again, _) = links_over(dir.path()).await;
        assert!(!again.has(&key("a"), &m).await, "stale link kept");
        settle(&again).await;
        let (store, _) = DiskStore::open(dir.path()).unwrap();
        use crate::proxy::store::BlobStore as _;
        let record = store.links(&key("a")).await.unwrap().unwrap();
        assert!(record.digests.is_empty(), "{:?}", record.digests);
    }
}
