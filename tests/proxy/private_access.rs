//! Private images stay private through the cache (docs/proxy.md, "Private repositories"):
//! the upstream is a real Distribution registry with htpasswd auth, beside an open one
//! for public repositories; the proxy holds its own credentials for the private one and
//! serves its repositories only to clients whose own credentials it accepts.

use crate::common::*;
use pullthrough::api::{AccessMode, Credentials, ProxyConfig, UpstreamAccess};
use std::time::{Duration, Instant};

const PRIVATE: &str = "private.test";
const PUBLIC: &str = "public.test";
struct World {
    private: Registry,
    public: Registry,
    app: Image,
    other: Image,
    open: Image,
}

async fn world() -> World {
    let private = Registry::start_private(&format!("{CACHE}{ALICE}{BOB}")).await;
    let public = Registry::start().await;
    let (app, other, open) = (
        Image::generate(71, &[50_000, 20_000], "amd64"),
        Image::generate(72, &[30_000], "amd64"),
        Image::generate(73, &[40_000], "amd64"),
    );
    push_image(&as_alice(&private), "team/app", "1", &app).await;
    push_image(&as_alice(&private), "team/other", "1", &other).await;
    push_image(&public.url, "lib/open", "1", &open).await;
    World {
        private,
        public,
        app,
        other,
        open,
    }
}

/// The proxy's own credentials on the private upstream (access defaults to
/// upstreamAuth with them), upstreamAuth on the public one, challenges over plain HTTP.
fn config(w: &World) -> ProxyConfig {
    let mut c = config_for(&[(PRIVATE, &w.private.url), (PUBLIC, &w.public.url)]);
    c.upstreams[0].credentials = Some(cache_credentials());
    c.upstreams[1].access = Some(UpstreamAccess {
        mode: AccessMode::UpstreamAuth,
    });
    c.access.plain_http = true;
    c
}

/// GET `/v2/<path>?ns=<ns>` with a Bearer token.
async fn get(p: &Proxy, ns: &str, path: &str, token: Option<&str>) -> reqwest::Response {
    let mut r = http()
        .get(format!("{}/v2/{path}?ns={ns}", p.url))
        .header("accept", "application/vnd.oci.image.manifest.v1+json");
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    r.send().await.unwrap()
}

/// A token from the proxy for pulling `repo` of `ns` (GET, Basic when `user` is given).
async fn token(p: &Proxy, ns: &str, repo: &str, user: Option<(&str, &str)>) -> reqwest::Response {
    token_with(&http(), p, ns, repo, user).await
}

/// [`token`], asked by client `c`.
async fn token_with(
    c: &reqwest::Client,
    p: &Proxy,
    ns: &str,
    repo: &str,
    user: Option<(&str, &str)>,
) -> reqwest::Response {
    let mut r = c.get(format!(
        "{}/auth/token?service=pullthrough:{ns}&scope=repository:{repo}:pull",
        p.url
    ));
    if let Some((u, pw)) = user {
        r = r.basic_auth(u, Some(pw));
    }
    r.send().await.unwrap()
}

/// GET `/auth/token?<query>`.
async fn get_token_raw(p: &Proxy, query: &str) -> reqwest::Response {
    http()
        .get(format!("{}/auth/token?{query}", p.url))
        .send()
        .await
        .unwrap()
}

async fn token_of(p: &Proxy, ns: &str, repo: &str, user: Option<(&str, &str)>) -> String {
    let r = token(p, ns, repo, user).await;
    assert_eq!(r.status(), 200, "token request");
    let v: serde_json::Value = r.json().await.unwrap();
    v["token"].as_str().unwrap().to_string()
}

/// Pulls `repo:1` of the private upstream with `token`: every object, checked.
async fn pull_with(p: &Proxy, repo: &str, img: &Image, token: &str) {
    let r = get(p, PRIVATE, &format!("{repo}/manifests/1"), Some(token)).await;
    assert_eq!(r.status(), 200, "manifest of {repo}");
    assert_eq!(sha256(&r.bytes().await.unwrap()), img.manifest.digest);
    for b in img.blobs() {
        let r = get(
            p,
            PRIVATE,
            &format!("{repo}/blobs/{}", b.digest),
            Some(token),
        )
        .await;
        assert_eq!(r.status(), 200, "blob of {repo}");
        assert_eq!(sha256(&r.bytes().await.unwrap()), b.digest);
    }
}

/// An `application/x-www-form-urlencoded` body, as containerd sends one.
fn form_body(pairs: &[(&str, &str)]) -> String {
    let escape = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b' ' => "+".to_string(),
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", escape(k), escape(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// POSTs `pairs` to `url` as a form, as containerd asks a token endpoint.
async fn post_form(url: &str, pairs: &[(&str, &str)]) -> reqwest::Response {
    http()
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form_body(pairs))
        .send()
        .await
        .unwrap()
}

fn challenge(r: &reqwest::Response) -> String {
    r.headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_repository_is_served_only_to_credentials_the_upstream_accepts() {
    let w = world().await;
    let p = Proxy::start_config(config(&w)).await;

    // Anonymous: challenged, for this repository of this upstream, at this proxy.
    let r = get(&p, PRIVATE, "team/app/manifests/1", None).await;
    assert_eq!(r.status(), 401);
    assert_eq!(
        challenge(&r),
        format!(
            "Bearer realm=\"http://{}/auth/token\",service=\"pullthrough:{PRIVATE}\",scope=\"repository:team/app:pull\"",
            p.host
        )
    );
    // An anonymous token, and one for wrong credentials, pull nothing.
    for user in [None, Some(("alice", "wrong")), Some(("mallory", "wonder"))] {
        let t = token_of(&p, PRIVATE, "team/app", user).await;
        let r = get(&p, PRIVATE, "team/app/manifests/1", Some(&t)).await;
        assert_eq!(r.status(), 401, "{user:?}");
        assert!(challenge(&r).ends_with(",error=\"insufficient_scope\""));
    }

    // The right credentials: everything, through GET with Basic and through POST.
    let alice = token_of(&p, PRIVATE, "team/app", Some(("alice", "wonder"))).await;
    pull_with(&p, "team/app", &w.app, &alice).await;
    let form = post_form(
        &format!("{}/auth/token", p.url),
        &[
            ("grant_type", "password"),
            ("username", "bob"),
            ("password", "builder"),
            ("service", &format!("pullthrough:{PRIVATE}")),
            (
                "scope",
                "repository:team/app:pull repository:team/other:pull",
            ),
            ("client_id", "containerd-client"),
        ],
    )
    .await;
    assert_eq!(form.status(), 200);
    let v: serde_json::Value = form.json().await.unwrap();
    let bob = v["access_token"].as_str().unwrap().to_string();
    pull_with(&p, "team/app", &w.app, &bob).await;
    pull_with(&p, "team/other", &w.other, &bob).await;
    // The second pull came from the cache.
    for b in w.app.blobs() {
        w.private.assert_gets(&format!("/blobs/{}", b.digest), 1);
    }

    // A public repository: no challenge at all.
    let pulled = pull(&p.url, "lib/open", "1", Some(PUBLIC)).await.unwrap();
    assert_eq!(pulled.top, w.open.manifest.digest);
    let m = p.metrics().await;
    let at = |u: &str| {
        metric_value(
            &m,
            "pullthrough_access_challenges_total",
            &[("upstream", u)],
        )
    };
    assert_eq!(at(PUBLIC), 0.0);
    assert!(at(PRIVATE) >= 4.0);

    // A cached private layer, anonymously under a public repository: unknown there.
    let layer = &w.app.layers[0].digest;
    let r = get(&p, PUBLIC, &format!("lib/open/blobs/{layer}"), None).await;
    assert_eq!(r.status(), 404);
    // Under another private repository the client may pull, which does not hold it.
    let r = get(
        &p,
        PRIVATE,
        &format!("team/other/blobs/{layer}"),
        Some(&bob),
    )
    .await;
    assert_eq!(r.status(), 404);
    // A token for one repository is no token for another.
    let r = get(&p, PRIVATE, "team/other/manifests/1", Some(&alice)).await;
    assert_eq!(r.status(), 401);

    // Neither credentials nor tokens are in the metrics.
    for secret in ["wonder", "builder", "stash", &alice, &bob] {
        assert!(!m.contains(secret), "a secret in the metrics");
    }
    assert_eq!(
        metric_value(
            &m,
            "pullthrough_access_decisions_total",
            &[("upstream", PUBLIC), ("result", "public")]
        ),
        1.0
    );
}

/// The token server's rules: anonymous may pull `lib/`, alice may do anything, the
/// cache may pull, bob nothing.
fn token_policy(user: Option<&str>, repository: &str, action: &str) -> bool {
    match user {
        None => repository.starts_with("lib/") && action == "pull",
        Some("alice") => true,
        Some("cache") => action == "pull",
        Some(_) => false,
    }
}

/// A client that pushes to `repo` of a registry `issuer` signs tokens for, as alice.
fn pusher(issuer: &token_server::TokenServer, repo: &str) -> reqwest::Client {
    let mut auth = reqwest::header::HeaderMap::new();
    let bearer = format!("Bearer {}", issuer.mint("alice", repo, &["push", "pull"]));
    auth.insert("authorization", bearer.parse().unwrap());
    reqwest::Client::builder()
        .default_headers(auth)
        .build()
        .unwrap()
}

/// A client that names the upstream in the path (`mirror/private.test/team/app`) is
/// challenged for the path it pulls, and the token it gets for that scope is a token for
/// the upstream's repository: skopeo, a real client, pulls with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_repository_through_a_path_prefix_is_challenged_for_that_path() {
    let w = world().await;
    let p = Proxy::start_config(config(&w)).await;
    let path = format!("{PRIVATE}/team/app");
    let r = http()
        .get(format!("{}/v2/{path}/manifests/1", p.url))
        .header("accept", OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        challenge(&r),
        format!(
            "Bearer realm=\"http://{}/auth/token\",service=\"pullthrough:{PRIVATE}\",scope=\"repository:{path}:pull\"",
            p.host
        )
    );
    let src = format!("docker://{}/{path}:1", p.host);
    let out = tempfile::tempdir().unwrap();
    let dest = format!("dir:{}", out.path().display());
    let copy = |creds: Option<&str>| {
        let mut args = vec![
            "copy",
            "--src-tls-verify=false",
            src.as_str(),
            dest.as_str(),
        ];
        if let Some(c) = creds {
            args.splice(2..2, ["--src-creds", c]);
        }
        try_skopeo(&args)
    };
    for creds in [None, Some("alice:wrong")] {
        let refused = copy(creds).unwrap_err();
        assert!(
            refused.contains("401") || refused.contains("nauthorized"),
            "{refused}"
        );
    }
    copy(Some("alice:wonder")).unwrap();
    let copied = dir_blobs(out.path());
    for b in w.app.blobs() {
        assert!(copied.contains(&b.digest), "skopeo is missing {}", b.digest);
    }
    // skopeo pulls a public repository of an upstreamAuth upstream without credentials:
    // `/v2/`'s challenge got it an anonymous token, which public repositories need not.
    let public = format!("docker://{}/{PUBLIC}/lib/open:1", p.host);
    let anonymous = tempfile::tempdir().unwrap();
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &public,
        &format!("dir:{}", anonymous.path().display()),
    ]);
    assert!(dir_blobs(anonymous.path()).contains(&w.open.layers[0].digest));
    // So is an open upstream's, its token granting nothing: open upstreams ask for none.
    let mut mixed = config(&w);
    mixed.upstreams.push(pullthrough::api::UpstreamConfig {
        url: Some(w.public.url.clone()),
        ..pullthrough::api::UpstreamConfig::new("open.test")
    });
    let m = Proxy::start_config(mixed).await;
    let open = tempfile::tempdir().unwrap();
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{}/open.test/lib/open:1", m.host),
        &format!("dir:{}", open.path().display()),
    ]);
    assert!(dir_blobs(open.path()).contains(&w.open.layers[0].digest));
    m.stop().await;
    // `/v2/` challenges for this proxy as a whole, and lets a client with credentials on.
    let base = format!("{}/v2/", p.url);
    let r = http().get(&base).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        challenge(&r),
        format!(
            "Bearer realm=\"http://{}/auth/token\",service=\"pullthrough\"",
            p.host
        )
    );
    let r = http().get(&base).bearer_auth("x").send().await.unwrap();
    assert_eq!(r.status(), 200);
    // A service that names no mirrored registry is a bad request.
    let r = get_token_raw(&p, "service=pullthrough:quay.io&scope=repository:x/y:pull").await;
    assert_eq!(r.status(), 400);

    // The prefixed scope's token is the repository's, through `?ns=` too; a prefix that
    // names another upstream is part of the name, and covers nothing here.
    let t = token_of(&p, PRIVATE, &path, Some(("alice", "wonder"))).await;
    pull_with(&p, "team/app", &w.app, &t).await;
    let elsewhere = format!("{PUBLIC}/team/app");
    let t = token_of(&p, PRIVATE, &elsewhere, Some(("alice", "wonder"))).await;
    let r = get(&p, PRIVATE, "team/app/manifests/1", Some(&t)).await;
    assert_eq!(r.status(), 401);
}

/// An identity token of `user` from `issuer`, as `docker login` gets one (an offline
/// password grant).
async fn identity_token(issuer: &token_server::TokenServer, user: &str, password: &str) -> String {
    let r = post_form(
        &format!("{}/token", issuer.url),
        &[
            ("grant_type", "password"),
            ("username", user),
            ("password", password),
            ("access_type", "offline"),
            ("client_id", "docker"),
            ("service", token_server::SERVICE),
        ],
    )
    .await;
    assert_eq!(r.status(), 200, "login of {user}");
    let v: serde_json::Value = r.json().await.unwrap();
    v["refresh_token"].as_str().unwrap().to_string()
}

/// A token from the proxy for `repo` of the private upstream, given an identity token
/// the containerd way (`grant_type=refresh_token`).
async fn token_for_identity(p: &Proxy, repo: &str, identity: &str) -> String {
    let r = post_form(
        &format!("{}/auth/token", p.url),
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", identity),
            ("service", &format!("pullthrough:{PRIVATE}")),
            ("scope", &format!("repository:{repo}:pull")),
            ("client_id", "containerd-client"),
        ],
    )
    .await;
    assert_eq!(r.status(), 200, "refresh_token grant");
    let v: serde_json::Value = r.json().await.unwrap();
    v["token"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_token_is_checked_with_the_upstreams_token_server() {
    let issuer = token_server::TokenServer::start(
        &[("cache", "stash"), ("alice", "wonder"), ("bob", "builder")],
        token_policy,
    )
    .await;
    let reg = Registry::start_token(&issuer).await;
    let (app, open) = (
        Image::generate(74, &[30_000, 10_000], "amd64"),
        Image::generate(75, &[20_000], "amd64"),
    );
    for (repo, img) in [("team/app", &app), ("lib/open", &open)] {
        push_image_with(&pusher(&issuer, repo), &reg.url, repo, "1", img).await;
    }
    let mut c = config_for(&[(PRIVATE, &reg.url)]);
    c.upstreams[0].credentials = Some(cache_credentials());
    c.access.plain_http = true;
    let p = Proxy::start_config(c).await;

    // Anonymous: challenged.
    let r = get(&p, PRIVATE, "team/app/manifests/1", None).await;
    assert_eq!(r.status(), 401);
    // alice's identity token: the proxy passes it to the upstream's token server as a
    // refresh_token grant, and the registry accepts what it got for it.
    let alice = identity_token(&issuer, "alice", "wonder").await;
    let t = token_for_identity(&p, "team/app", &alice).await;
    pull_with(&p, "team/app", &app, &t).await;
    assert_eq!(issuer.grants("POST refresh_token alice"), 1);
    // Her password through GET with Basic works as well.
    let t = token_of(&p, PRIVATE, "team/app", Some(("alice", "wonder"))).await;
    assert_eq!(
        get(&p, PRIVATE, "team/app/manifests/1", Some(&t))
            .await
            .status(),
        200
    );
    // bob's identity token is real but entitles him to nothing; a made-up one is
    // refused by the token server.
    let bob = identity_token(&issuer, "bob", "builder").await;
    for identity in [bob.as_str(), "refresh-made-up"] {
        let t = token_for_identity(&p, "team/app", identity).await;
        let r = get(&p, PRIVATE, "team/app/manifests/1", Some(&t)).await;
        assert_eq!(r.status(), 401, "{identity}");
        assert!(challenge(&r).ends_with(",error=\"insufficient_scope\""));
    }
    assert_eq!(issuer.grants("POST refresh_token unknown refused"), 1);
    // A repository anonymous may pull is public: no challenge.
    let pulled = pull(&p.url, "lib/open", "1", Some(PRIVATE)).await.unwrap();
    assert_eq!(pulled.top, open.manifest.digest);
    // The proxy filled the cache with its own credentials, never with the clients'.
    assert!(issuer.grants("GET cache") >= 1);
}

/// A manifest may name any digest: only the upstream's own answer under a repository
/// links a digest there. A public repository's manifest that lists a cached private
/// layer as a foreign layer (Distribution takes it with `validation.manifests.urls`)
/// gets an anonymous client nothing of that layer; a layer two public repositories
/// really share is served under the second after one HEAD there, not fetched again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_manifest_that_names_a_private_layer_links_nothing() {
    let issuer =
        token_server::TokenServer::start(&[("cache", "stash"), ("alice", "wonder")], token_policy)
            .await;
    let foreign_urls = "validation:\n  manifests:\n    urls:\n      allow:\n        - ^https?://\n";
    let reg = Registry::start_token_with(&issuer, foreign_urls).await;
    let private = Image::generate(76, &[60_000], "amd64");
    push_image_with(
        &pusher(&issuer, "team/app"),
        &reg.url,
        "team/app",
        "1",
        &private,
    )
    .await;
    let secret = &private.layers[0];
    // lib/x: a config of its own, and the private layer named as a foreign layer.
    let config = Blob::new(
        "application/vnd.docker.container.image.v1+json",
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#
            .to_vec(),
    );
    let poison = Blob::new(
        "application/vnd.docker.distribution.manifest.v2+json",
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": config.descriptor(),
            "layers": [{
                "mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                "digest": secret.digest,
                "size": secret.bytes.len(),
                "urls": ["https://layers.example/private"]
            }]
        }))
        .unwrap(),
    );
    let x = pusher(&issuer, "lib/x");
    push_blob_with(&x, &reg.url, "lib/x", &config).await;
    push_manifest_with(&x, &reg.url, "lib/x", "1", &poison).await;
    // Two public images that really share a layer.
    let shared = Image::generate(77, &[40_000], "amd64");
    let mut twin = Image::with_layers(78, vec![shared.layers[0].bytes.clone()], "amd64");
    twin.layers[0] = shared.layers[0].clone();
    for (repo, img) in [("lib/y", &shared), ("lib/z", &twin)] {
        push_image_with(&pusher(&issuer, repo), &reg.url, repo, "1", img).await;
    }

    let mut c = config_for(&[(PRIVATE, &reg.url)]);
    c.upstreams[0].credentials = Some(cache_credentials());
    c.access.plain_http = true;
    let p = Proxy::start_config(c).await;
    // An entitled client caches the private image.
    let t = token_of(&p, PRIVATE, "team/app", Some(("alice", "wonder"))).await;
    pull_with(&p, "team/app", &private, &t).await;

    // Anonymous: lib/x is public, its manifest is served...
    let r = http()
        .get(format!("{}/v2/lib/x/manifests/1?ns={PRIVATE}", p.url))
        .header("accept", ACCEPT)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(sha256(&r.bytes().await.unwrap()), poison.digest);
    // ...but not the private layer it names, by GET or HEAD.
    let path = format!("lib/x/blobs/{}", secret.digest);
    let r = get(&p, PRIVATE, &path, None).await;
    assert_eq!(error_code(r).await, (404, "BLOB_UNKNOWN".to_string()));
    let r = http()
        .head(format!("{}/v2/{path}?ns={PRIVATE}", p.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let refused = p
        .metric("pullthrough_link_proofs_total", &[("result", "refused")])
        .await;
    assert!(refused >= 1.0, "the layer was not proven under lib/x");

    // A layer two repositories hold is proven under the second by a HEAD there.
    for (repo, img) in [("lib/y", &shared), ("lib/z", &twin)] {
        let pulled = pull(&p.url, repo, "1", Some(PRIVATE)).await.unwrap();
        assert_eq!(pulled.top, img.manifest.digest);
    }
    p.settled().await;
    reg.assert_gets(&format!("/blobs/{}", shared.layers[0].digest), 1);
    let linked = p
        .metric("pullthrough_link_proofs_total", &[("result", "linked")])
        .await;
    assert!(linked >= 1.0, "the shared layer was not proven under lib/z");
}

/// With failover URLs, credentials go to the origin (the last URL) only: a regional
/// mirror before it that asks for Basic credentials gets neither the proxy's nor, during
/// a check at /auth/token, the client's; its 401 moves on to the origin, which decides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_go_to_the_origin_only() {
    use crate::common::fault::FaultUpstream;
    use std::sync::atomic::Ordering;
    let w = world().await;
    let mirror = FaultUpstream::start().await;
    mirror.state.basic_challenge.store(true, Ordering::SeqCst);
    let mut c = config(&w);
    c.upstreams[0].url = None;
    c.upstreams[0].urls = vec![mirror.url.clone(), w.private.url.clone()];
    let p = Proxy::start_config(c).await;

    // A client's check, then its pull: the origin decides and serves.
    let alice = token_of(&p, PRIVATE, "team/app", Some(("alice", "wonder"))).await;
    pull_with(&p, "team/app", &w.app, &alice).await;
    let mallory = token_of(&p, PRIVATE, "team/app", Some(("alice", "guess"))).await;
    let r = get(&p, PRIVATE, "team/app/manifests/1", Some(&mallory)).await;
    assert_eq!(r.status(), 401, "the mirror's refusal decided");
    // The mirror was asked (the proxy's own fetches go there first) and was never sent
    // a credential: no Basic, no token.
    assert!(
        mirror.count("/v2/team/app/") >= 1,
        "the mirror was not asked"
    );
    let sent = mirror.state.auth_log.lock().unwrap().clone();
    assert!(
        sent.iter().all(String::is_empty),
        "credentials sent to the mirror: {sent:?}"
    );
}

/// An upstream that answers 404 for a private repository to whoever may not see it (as
/// GitHub, GitLab and Harbor hide them): the repository is still private, and a client
/// whose credentials get a 404 where the proxy's find the image is refused; a public
/// repository without a `latest` tag is public.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repository_hidden_behind_a_404_stays_private() {
    use crate::common::fault::{FaultUpstream, Hiding};
    let up = FaultUpstream::start().await;
    let (app, quiet, open) = (
        Image::generate(79, &[20_000], "amd64"),
        Image::generate(80, &[20_000], "amd64"),
        Image::generate(81, &[20_000], "amd64"),
    );
    up.add_image("team/app", "1", &app);
    up.add_image("team/app", "latest", &app);
    up.add_image("team/quiet", "1", &quiet);
    up.add_image("lib/open", "1", &open);
    let users = [("cache", "stash"), ("alice", "wonder"), ("bob", "builder")];
    let seen_by = |names: &[&str]| names.iter().map(|n| n.to_string()).collect();
    *up.state.hiding.lock().unwrap() = Some(Hiding {
        users: users
            .iter()
            .map(|(u, p)| (u.to_string(), p.to_string()))
            .collect(),
        hidden: vec![
            ("team/app".into(), seen_by(&["cache", "alice"])),
            ("team/quiet".into(), seen_by(&["cache", "alice"])),
        ],
    });
    let mut c = config_for(&[(PRIVATE, &up.url)]);
    c.upstreams[0].credentials = Some(cache_credentials());
    c.access.plain_http = true;
    let p = Proxy::start_config(c).await;

    // Anonymous: the hidden repositories are private (one with a latest tag, one
    // without), their manifests and blobs challenged.
    for (repo, img) in [("team/app", &app), ("team/quiet", &quiet)] {
        let r = get(&p, PRIVATE, &format!("{repo}/manifests/1"), None).await;
        assert_eq!(r.status(), 401, "{repo}");
        let r = get(
            &p,
            PRIVATE,
            &format!("{repo}/blobs/{}", img.layers[0].digest),
            None,
        )
        .await;
        assert_eq!(r.status(), 401, "{repo}");
    }
    // bob's credentials are good, but the upstream hides both from him.
    for repo in ["team/app", "team/quiet"] {
        let bob = token_of(&p, PRIVATE, repo, Some(("bob", "builder"))).await;
        let r = get(&p, PRIVATE, &format!("{repo}/manifests/1"), Some(&bob)).await;
        assert_eq!(r.status(), 401, "bob pulled {repo}");
    }
    // alice sees them.
    for (repo, img) in [("team/app", &app), ("team/quiet", &quiet)] {
        let alice = token_of(&p, PRIVATE, repo, Some(("alice", "wonder"))).await;
        pull_with(&p, repo, img, &alice).await;
    }
    // A public repository without a latest tag is public: no challenge.
    let pulled = pull(&p.url, "lib/open", "1", Some(PRIVATE)).await.unwrap();
    assert_eq!(pulled.top, open.manifest.digest);
    let decided = |result: &'static str| {
        let p = &p;
        async move {
            p.metric(
                "pullthrough_access_decisions_total",
                &[("upstream", PRIVATE), ("result", result)],
            )
            .await
        }
    };
    assert_eq!(
        (decided("private").await, decided("public").await),
        (2.0, 1.0)
    );
    assert_eq!(
        (decided("denied").await, decided("allowed").await),
        (2.0, 2.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_clients_with_the_same_credentials_cost_one_check() {
    let w = world().await;
    let p = Proxy::start_config(config(&w)).await;
    let tokens = futures::future::join_all(
        (0..16).map(|_| token_of(&p, PRIVATE, "team/app", Some(("bob", "builder")))),
    )
    .await;
    for t in &tokens {
        let r = get(&p, PRIVATE, "team/app/manifests/1", Some(t)).await;
        assert_eq!(r.status(), 200);
    }
    let allowed = p
        .metric(
            "pullthrough_access_decisions_total",
            &[("upstream", PRIVATE), ("result", "allowed")],
        )
        .await;
    assert_eq!(allowed, 1.0, "upstream checks");
    // The upstream's own log: one check. bob's HEAD of latest (404: no latest tag), the
    // proxy's own (404 too: not a repository hidden from bob), bob's tags/list (200).
    // (Each after the 401 that asks for the credentials.)
    let log = w.private.access_log();
    let lines = |part: &str, status: &str| {
        log.lines()
            .filter(|l| l.contains(part) && l.contains(&format!("\" {status} ")))
            .count()
    };
    assert_eq!(
        (
            lines("\"HEAD /v2/team/app/manifests/latest", "404"),
            lines("\"GET /v2/team/app/tags/list?n=1", "200")
        ),
        (2, 1),
        "checks in the upstream's log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_client_loses_access_once_the_decision_expires() {
    let w = world().await;
    let ttl = Duration::from_secs(2);
    let mut c = config(&w);
    c.access.allowed_ttl = ttl;
    let p = Proxy::start_config(c).await;
    let before = Instant::now();
    let r = token(&p, PRIVATE, "team/app", Some(("alice", "wonder"))).await;
    let v: serde_json::Value = r.json().await.unwrap();
    assert!(v["expires_in"].as_u64().unwrap() <= ttl.as_secs());
    let t = v["token"].as_str().unwrap().to_string();
    assert_eq!(
        get(&p, PRIVATE, "team/app/manifests/1", Some(&t))
            .await
            .status(),
        200
    );

    w.private.set_users(&format!("{CACHE}{BOB}"));
    // Until the decision expires the cache keeps it; then the upstream's no is heard.
    let deadline = Instant::now() + Duration::from_secs(60);
    // What the endpoint decided, read from the token it issued: a request made with a
    // token can also fail because the token expired (on the last whole second before its
    // decision does).
    let grants_pull = |t: &str| {
        use base64::Engine as _;
        let body = t.split('.').nth(1).unwrap();
        let claims: serde_json::Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(body)
                .unwrap(),
        )
        .unwrap();
        claims["access"][0]["actions"] == serde_json::json!(["pull"])
    };
    assert!(grants_pull(&t));
    let revoked = loop {
        let t = token_of(&p, PRIVATE, "team/app", Some(("alice", "wonder"))).await;
        if !grants_pull(&t) {
            let r = get(&p, PRIVATE, "team/app/manifests/1", Some(&t)).await;
            assert_eq!(r.status(), 401);
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(revoked, "alice still pulls after her removal upstream");
    assert!(before.elapsed() >= ttl, "revoked before allowedTTL");
    assert_eq!(
        p.metric(
            "pullthrough_access_decisions_total",
            &[("upstream", PRIVATE), ("result", "denied")]
        )
        .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_that_share_the_key_accept_each_others_tokens() {
    let w = world().await;
    let keys = tempfile::tempdir().unwrap();
    let shared = keys.path().join("shared");
    std::fs::write(&shared, "a key every replica mounts, 32 bytes or more\n").unwrap();
    let with_key = |file: &std::path::Path| {
        let mut c = config(&w);
        c.access.signing_key_file = Some(file.to_path_buf());
        c
    };
    let a = Proxy::start_config(with_key(&shared)).await;
    let b = Proxy::start_config(with_key(&shared)).await;
    let other = Proxy::start_config(with_key(&keys.path().join("own"))).await;
    let t = token_of(&a, PRIVATE, "team/app", Some(("alice", "wonder"))).await;
    pull_with(&b, "team/app", &w.app, &t).await;
    let checks_at_b = b
        .metric(
            "pullthrough_access_decisions_total",
            &[("result", "allowed")],
        )
        .await;
    assert_eq!(checks_at_b, 0.0, "b asked the upstream");
    let r = get(&other, PRIVATE, "team/app/manifests/1", Some(&t)).await;
    assert_eq!(r.status(), 401, "a replica with another key took the token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_failures_of_one_user_are_refused_without_asking() {
    let w = world().await;
    let mut c = config(&w);
    c.access.max_failed_checks = 3.try_into().unwrap();
    let p = Proxy::start_config(c).await;
    for i in 0..3 {
        let pw = format!("guess{i}");
        let t = token_of(&p, PRIVATE, "team/app", Some(("alice", &pw))).await;
        assert_eq!(
            get(&p, PRIVATE, "team/app/manifests/1", Some(&t))
                .await
                .status(),
            401
        );
    }
    let r = token(&p, PRIVATE, "team/app", Some(("alice", "guess3"))).await;
    assert_eq!(r.status(), 429);
    let body = r.text().await.unwrap();
    assert!(body.contains("TOOMANYREQUESTS"), "{body}");
    let denied = p
        .metric(
            "pullthrough_access_decisions_total",
            &[("upstream", PRIVATE), ("result", "denied")],
        )
        .await;
    assert_eq!(denied, 3.0, "upstream checks");
    // Another user is not held back.
    let bob = token_of(&p, PRIVATE, "team/app", Some(("bob", "builder"))).await;
    assert_eq!(
        get(&p, PRIVATE, "team/app/manifests/1", Some(&bob))
            .await
            .status(),
        200
    );
}

/// What one client can make the token endpoint ask the upstream is bounded, and nobody
/// can lock the real user out: scopes per request are capped, failures are counted per
/// user name and address and per address, and credentials the upstream accepted are
/// exempt from lock-outs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_endpoint_neither_amplifies_nor_locks_out_the_real_user() {
    let w = world().await;
    let mut c = config(&w);
    c.access.max_failed_checks = 3.try_into().unwrap();
    c.access.max_failed_checks_per_client = 5.try_into().unwrap();
    let p = Proxy::start_config(c).await;
    let denied = || {
        let p = &p;
        async move {
            p.metric(
                "pullthrough_access_decisions_total",
                &[("upstream", PRIVATE), ("result", "denied")],
            )
            .await
        }
    };

    // One request naming 400 repositories is refused before anything is asked.
    let scopes: Vec<String> = (0..400)
        .map(|i| format!("repository:team/r{i}:pull"))
        .collect();
    let service = format!("pullthrough:{PRIVATE}");
    let form = [
        ("grant_type", "password"),
        ("username", "alice"),
        ("password", "wonder"),
        ("service", service.as_str()),
        ("scope", &scopes.join(" ")),
    ];
    let before = p.upstream_requests().await;
    let r = post_form(&format!("{}/auth/token", p.url), &form).await;
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("at most 16"));
    assert_eq!(
        p.upstream_requests().await,
        before,
        "the upstream was asked"
    );

    // Guesses at alice's password from another address lock out that address only.
    let guesser = http_from("127.0.0.2");
    for i in 0..3 {
        let pw = format!("guess{i}");
        let r = token_with(&guesser, &p, PRIVATE, "team/app", Some(("alice", &pw))).await;
        assert_eq!(r.status(), 200, "a token that grants nothing");
    }
    let r = token_with(&guesser, &p, PRIVATE, "team/app", Some(("alice", "guess3"))).await;
    assert_eq!(r.status(), 429);
    let alice = token_of(&p, PRIVATE, "team/app", Some(("alice", "wonder"))).await;
    pull_with(&p, "team/app", &w.app, &alice).await;

    // From her own address too: once the upstream accepted her password, guesses there
    // lock out further guesses, not her.
    for i in 0..3 {
        let pw = format!("nope{i}");
        let t = token_of(&p, PRIVATE, "team/app", Some(("alice", &pw))).await;
        let r = get(&p, PRIVATE, "team/app/manifests/1", Some(&t)).await;
        assert_eq!(r.status(), 401);
    }
    let r = token(&p, PRIVATE, "team/app", Some(("alice", "nope3"))).await;
    assert_eq!(r.status(), 429);
    let other = token_of(&p, PRIVATE, "team/other", Some(("alice", "wonder"))).await;
    pull_with(&p, "team/other", &w.other, &other).await;

    // Many user names from one address: the address's failures are capped.
    let sprayer = http_from("127.0.0.3");
    let checks = denied().await;
    for i in 0..5 {
        let user = format!("user{i}");
        let r = token_with(&sprayer, &p, PRIVATE, "team/app", Some((&user, "x"))).await;
        assert_eq!(r.status(), 200);
    }
    let r = token_with(&sprayer, &p, PRIVATE, "team/app", Some(("user5", "x"))).await;
    assert_eq!(r.status(), 429);
    assert_eq!(
        denied().await - checks,
        5.0,
        "upstream checks for the sprayer"
    );
}

#[test]
fn challenges_over_plain_http_need_the_opt_in() {
    let mut c = ProxyConfig::default();
    c.upstreams[0].credentials = Some(Credentials {
        username: "u".into(),
        password: "p".into(),
    });
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("access.plainHttp"), "{e}");
    c.upstreams[0].access = Some(UpstreamAccess {
        mode: AccessMode::Open,
    });
    assert!(c.validate().is_ok());
}

/// The `pullthrough proxy` binary, logging everything it logs at `debug`, is shown
/// credentials and tokens every way a client sends them: none of them is in its output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_and_tokens_never_reach_the_logs() {
    use std::process::{Command, Stdio};
    let w = world().await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(&w);
    let port = free_port();
    c.listen = ([127, 0, 0, 1], port).into();
    c.metrics_listen = ([127, 0, 0, 1], free_port()).into();
    c.cache_dir = dir.path().join("cache");
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, c.to_yaml()).unwrap();
    let log = dir.path().join("log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_pullthrough"))
        .args(["proxy", "--config", path.to_str().unwrap()])
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::from(
            std::fs::File::create(dir.path().join("err")).unwrap(),
        ))
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    assert!(
        serving(&url, Duration::from_secs(60)).await,
        "the proxy did not start"
    );
    let p = &url;
    let t = |user: &str, pw: &str| {
        let (user, pw) = (user.to_string(), pw.to_string());
        async move {
            let r = http()
                .get(format!(
                    "{p}/auth/token?service=pullthrough:{PRIVATE}&scope=repository:team/app:pull"
                ))
                .basic_auth(user, Some(pw))
                .send()
                .await
                .unwrap();
            let v: serde_json::Value = r.json().await.unwrap();
            v["token"].as_str().unwrap().to_string()
        }
    };
    let good = t("alice", "wonder").await;
    let bad = t("alice", "sesame").await;
    let form = http()
        .post(format!("{p}/auth/token"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form_body(&[
            ("grant_type", "password"),
            ("username", "bob"),
            ("password", "builder"),
            ("service", &format!("pullthrough:{PRIVATE}")),
            ("scope", "repository:team/app:pull"),
        ]))
        .send()
        .await
        .unwrap();
    assert_eq!(form.status(), 200);
    for token in [&good, &bad] {
        let r = http()
            .get(format!("{p}/v2/team/app/manifests/1?ns={PRIVATE}"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert!(r.status() == 200 || r.status() == 401);
    }
    let _ = child.kill();
    let _ = child.wait();
    let out = std::fs::read_to_string(&log).unwrap()
        + &std::fs::read_to_string(dir.path().join("err")).unwrap();
    assert!(out.contains("/auth/token"), "the requests were not logged");
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    for secret in [
        "wonder".to_string(),
        "sesame".to_string(),
        "builder".to_string(),
        "stash".to_string(),
        b64("alice:wonder"),
        b64("cache:stash"),
        good.clone(),
        bad.clone(),
    ] {
        assert!(!out.contains(&secret), "a secret in the proxy's output");
    }
}

/// Over TLS (a cert-manager-shaped Secret's files): the realm is https, credentials and
/// tokens travel encrypted, and no plain-HTTP opt-in is needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_challenges_point_at_an_https_realm() {
    let w = world().await;
    let certs = tempfile::tempdir().unwrap();
    test_certificate(certs.path());
    let mut c = config(&w);
    c.access.plain_http = false;
    c.tls = Some(pullthrough::api::TlsConfig {
        cert_file: certs.path().join("tls.crt"),
        key_file: certs.path().join("tls.key"),
    });
    let p = Proxy::start_config(c).await;
    assert!(p.url.starts_with("https://"));
    let client = https(&certs.path().join("ca.crt"));
    let r = client
        .get(format!("{}/v2/team/app/manifests/1?ns={PRIVATE}", p.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let realm = format!("Bearer realm=\"https://{}/auth/token\"", p.host);
    assert!(challenge(&r).starts_with(&realm), "{}", challenge(&r));
    let v: serde_json::Value = client
        .get(format!(
            "{}/auth/token?service=pullthrough:{PRIVATE}&scope=repository:team/app:pull",
            p.url
        ))
        .basic_auth("alice", Some("wonder"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let t = v["token"].as_str().unwrap();
    for b in w.app.blobs() {
        let r = client
            .get(format!(
                "{}/v2/team/app/blobs/{}?ns={PRIVATE}",
                p.url, b.digest
            ))
            .bearer_auth(t)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(sha256(&r.bytes().await.unwrap()), b.digest);
    }
    // Plain HTTP to the TLS port gets no registry answer.
    let plain = http().get(format!("http://{}/v2/", p.host)).send().await;
    assert!(plain.map_or(true, |r| !r.status().is_success()));
}
