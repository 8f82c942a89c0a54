//! Which cached content may be served under which repository name, and the cache as
//! every client sees it: through these rules.
//!
//! The store keeps each object once, by digest, whatever repository it came through. A
//! digest is served under repository R only when the upstream served it under R, or
//! proved it there: it is *linked* to R when the upstream answers for it under R (a
//! manifest by tag or digest, a blob, a HEAD of either). A manifest's references (its
//! config, layers, child manifests) are never linked because the manifest names them: a
//! manifest may name any digest (a foreign or non-distributable layer with `urls`, a
//! registry that does not check what a pushed manifest references, a compromised
//! upstream), and a digest cached through another repository (a private one) would
//! otherwise be served under a name the upstream never served it under. A digest that is
//! not linked to R is proven first, by a HEAD of it under R (counted in
//! `pullthrough_link_proofs_total`): the upstream's 404 is the client's 404. This is how
//! Distribution's own repositories work (`_layers/<digest>/link`).
//!
//! Links are kept per repository in memory, and in the store as one record per
//! repository ([`LinkRecord`]): every digest linked. A record's digests that are no
//! longer cached are dropped when it is read back, so eviction leaves no link to content
//! the cache no longer holds. Links to a shared bucket's content that this replica's
//! index does not know are kept (the bucket may hold them); a lost write of a record
//! costs a HEAD, never a wrong answer.

use super::error::ProxyError;
use super::index::Removal;
use super::metrics::{CacheResult, Metrics};
use super::pull_through::single_flight::SingleFlight;
use super::pull_through::{BlobAnswer, BlobAsk, Manifest, PullThrough};
use super::store::{LinkRecord, RepoKey, StoreError};
use super::upstream::{Object, Patience, Upstream};
use crate::oci::media::Accept;
use crate::oci::{Digest, Reference};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};

/// One repository's links: every digest the upstream served or proved under it.
type Repo = Arc<Mutex<HashSet<Digest>>>;

/// The links of every repository this process has served, and the cache they guard.
pub struct Links {
    cache: Arc<PullThrough>,
    repos: Mutex<HashMap<RepoKey, Repo>>,
    /// Loads of a repository's record, one at a time per repository.
    loads: SingleFlight<RepoKey, Repo>,
    /// Proofs by the upstream, one HEAD per repository and digest at a time.
    proofs: SingleFlight<(RepoKey, Digest), Result<(), ProxyError>>,
    /// Writes of a repository's record, in order.
    writes: tokio::sync::Mutex<()>,
    metrics: Metrics,
}

/// The key of `repository` of `up`.
pub fn repo_key(up: &Upstream, repository: &str) -> RepoKey {
    RepoKey {
        upstream: up.name().to_string(),
        repository: repository.to_string(),
    }
}

impl Links {
    /// No links loaded yet; records are read from the cache's store when first needed.
    pub fn new(cache: Arc<PullThrough>, metrics: Metrics) -> Arc<Links> {
        Arc::new(Links {
            cache,
            repos: Mutex::new(HashMap::new()),
            loads: SingleFlight::new(metrics.fetch_waiters.clone()),
            proofs: SingleFlight::new(metrics.fetch_waiters.clone()),
            writes: tokio::sync::Mutex::new(()),
            metrics,
        })
    }

    /// The cache underneath.
    pub fn cache(&self) -> &Arc<PullThrough> {
        &self.cache
    }

    /// A manifest of `repository` by tag or digest, for a client that takes `accept`:
    /// from the cache only when its digest is linked there (or proven), and linked there
    /// once served. A tag is the upstream's own answer for the repository, so the digest
    /// it resolves to is linked.
    pub async fn manifest(
        self: &Arc<Self>,
        up: &Arc<Upstream>,
        repository: &str,
        reference: &Reference,
        accept: &Accept,
    ) -> Result<(Manifest, CacheResult), ProxyError> {
        let key = repo_key(up, repository);
        match reference {
            Reference::Digest(d) => {
                let fetch = |unlinked| {
                    self.cache
                        .manifest(up, repository, reference, accept, unlinked)
                };
                self.through(up, &key, d, Object::Manifest, false, fetch)
                    .await
            }
            Reference::Tag(_) => {
                let answer = self
                    .cache
                    .manifest(up, repository, reference, accept, false)
                    .await?;
                self.link(&key, &answer.0.digest).await;
                Ok(answer)
            }
        }
    }

    /// A blob of `repository` (a body or a HEAD, as `ask` says): from the cache or a
    /// running download only when it is linked there (or proven), and linked there once
    /// the upstream served it for the repository. `trusted`: another replica asks for
    /// what it proved itself (see [`crate::proxy::peers`]).
    pub async fn blob(
        self: &Arc<Self>,
        up: &Arc<Upstream>,
        repository: &str,
        digest: &Digest,
        ask: BlobAsk<'_>,
        trusted: bool,
    ) -> Result<BlobAnswer, ProxyError> {
        let key = repo_key(up, repository);
        let fetch = |unlinked| {
            self.cache
                .blob(up, repository, digest, BlobAsk { unlinked, ..ask })
        };
        self.through(up, &key, digest, Object::Blob, trusted, fetch)
            .await
    }

    /// A repository's links, read from the store the first time.
    async fn repo(self: &Arc<Self>, key: &RepoKey) -> Repo {
        if let Some(r) = self.repos.lock().expect("links lock").get(key) {
            return r.clone();
        }
        let (this, k) = (self.clone(), key.clone());
        let (repo, _) = self
            .loads
            .run(key.clone(), async move { this.load(k).await }, |_| {
                Arc::new(Mutex::new(HashSet::new()))
            })
            .await;
        repo
    }

    async fn load(self: Arc<Self>, key: RepoKey) -> Repo {
        if let Some(r) = self.repos.lock().expect("links lock").get(&key) {
            return r.clone();
        }
        let (index, store) = (self.cache.index(), self.cache.store());
        let record = match store.links(&key).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(upstream = %key.upstream, repo = %key.repository, error = %e,
                    "could not read a link record: its links are proven again");
                None
            }
        };
        let mut linked = HashSet::new();
        let mut pruned = false;
        for d in record.iter().flat_map(|r| &r.digests) {
            match d.parse::<Digest>() {
                // A shared bucket may hold what this replica's index does not know.
                Ok(d) if index.contains(&d) || store.shared() => {
                    linked.insert(d);
                }
                _ => pruned = true,
            }
        }
        let repo = Arc::new(Mutex::new(linked));
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
        repo.lock().expect("repo links lock").contains(digest)
    }

    /// Drops a repository from the cache: its tags, its images (those pulled by digest
    /// too: the manifests linked to it) with the blobs only they use, and its links, so
    /// that whatever is still cached of it is proven again under its name. The tags
    /// forgotten, and what went.
    pub async fn drop_repository(
        self: &Arc<Self>,
        up: &Upstream,
        repository: &str,
    ) -> Result<(Vec<String>, Removal), StoreError> {
        let key = repo_key(up, repository);
        let repo = self.repo(&key).await;
        let linked: Vec<Digest> = repo
            .lock()
            .expect("repo links lock")
            .iter()
            .cloned()
            .collect();
        let (index, store) = (self.cache.index(), self.cache.store());
        let mut by_digest = Vec::new();
        for d in linked {
            let manifest = match index.is_manifest(&d) {
                Some(m) => m,
                None => store.shared() && store.manifest(&d).await?.is_some(),
            };
            if manifest {
                by_digest.push(d);
            }
        }
        let dropped = self
            .cache
            .drop_repository(up, repository, by_digest)
            .await?;
        repo.lock().expect("repo links lock").clear();
        self.persist(key);
        Ok(dropped)
    }

    /// Links `digest` to `key`'s repository: the upstream served or proved it there.
    pub async fn link(self: &Arc<Self>, key: &RepoKey, digest: &Digest) {
        let repo = self.repo(key).await;
        let new = repo.lock().expect("repo links lock").insert(digest.clone());
        if new {
            self.persist(key.clone());
        }
    }

    /// Runs `fetch` for `digest` under `key`'s repository. `fetch(unlinked)` is the
    /// cache's answer, told whether the digest is linked there (`trusted`: another
    /// replica asks, for what it proved itself); when it would need the cache's copy of
    /// an unlinked digest ([`ProxyError::NotLinked`]), the digest is proven first and
    /// `fetch` runs again. What the upstream served for the repository is linked to it.
    async fn through<T, F, Fut>(
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
                if !linked {
                    self.link(key, digest).await;
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
                Object::Manifest => {
                    let reference = Reference::Digest(d.clone());
                    up.manifest_digest(&k.repository, &reference, &Accept::Any, Patience::Queue)
                        .await
                        .map(drop)
                }
                _ => up.blob_size(&k.repository, &d).await.map(drop),
            };
            let result = if asked.is_ok() { "linked" } else { "refused" };
            this.metrics.link_proofs(result).inc();
            asked?;
            this.link(&k, &d).await;
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
                .iter()
                .map(Digest::to_string)
                .collect();
            digests.sort_unstable();
            let record = LinkRecord {
                upstream: key.upstream.clone(),
                repository: key.repository.clone(),
                digests,
            };
            if let Err(e) = this.cache.store().put_links(&record).await {
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
    use crate::proxy::index::Index;
    use crate::proxy::pull_through::{CachePolicy, Pins};
    use crate::proxy::store::DiskStore;
    use std::time::Duration;

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
        let policy = CachePolicy {
            tag_ttl: Duration::from_secs(300),
            stale_if_error: Duration::from_secs(3600),
            tags_list_ttl: Duration::from_secs(30),
            max_manifest_bytes: 1 << 20,
        };
        let cache = PullThrough::new(index.clone(), Metrics::new(), policy, Pins::default(), None);
        (Links::new(Arc::new(cache), Metrics::new()), index)
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
    async fn a_link_is_the_digest_s_own_and_its_repository_s_only() {
        let dir = tempfile::tempdir().unwrap();
        let (links, index) = links_over(dir.path()).await;
        let layer = Digest::of(Algorithm::Sha256, b"layer");
        let body = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{}"}},"layers":[{{"digest":"{layer}"}}]}}"#,
            Digest::of(Algorithm::Sha256, b"config")
        );
        let m = cache_manifest(&index, body.as_bytes()).await;
        links.link(&key("a"), &m).await;
        assert!(links.has(&key("a"), &m).await);
        // What the manifest names is not linked by it: only the upstream links it.
        assert!(!links.has(&key("a"), &layer).await);
        assert!(!links.has(&key("b"), &m).await);
        settle(&links).await;

        // A restart reads the record back.
        let (again, _) = links_over(dir.path()).await;
        assert!(again.has(&key("a"), &m).await, "links lost");
        assert!(!again.has(&key("a"), &layer).await);
        assert!(!again.has(&key("b"), &m).await);
    }

    #[tokio::test]
    async fn links_to_what_is_no_longer_cached_are_dropped_when_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let (links, index) = links_over(dir.path()).await;
        let body = br#"{"schemaVersion":2,"layers":[]}"#;
        let m = cache_manifest(&index, body).await;
        links.link(&key("a"), &m).await;
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
