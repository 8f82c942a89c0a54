//! An in-process token server (the distribution token spec and its OAuth2 form) for a
//! real Distribution registry started with `auth: token` ([`super::Registry::start_token`]):
//! it signs ES256 JWTs with a key whose self-signed certificate the registry trusts, and
//! issues refresh tokens ("identity tokens", what `docker login` keeps) on request. It
//! records every grant it answers.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The `iss` of every token, and the registry's `issuer`.
pub const ISSUER: &str = "pullthrough-test-issuer";
/// The registry's `service`.
pub const SERVICE: &str = "token-registry.test";

/// Who may do what: `(user (None: anonymous), repository, action) -> allowed`.
pub type Policy = fn(Option<&str>, &str, &str) -> bool;

struct State {
    key: ring::signature::EcdsaKeyPair,
    /// The signing certificate, DER in standard base64 (the JWT's `x5c`).
    cert: String,
    users: HashMap<String, String>,
    policy: Policy,
    /// Refresh token -> user.
    refresh: Mutex<HashMap<String, String>>,
    /// Every answered request: "GET anonymous", "GET alice", "POST password alice",
    /// "POST refresh_token alice", or "... refused".
    grants: Mutex<Vec<String>>,
}

pub struct TokenServer {
    pub url: String,
    dir: tempfile::TempDir,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The DER bytes of the first PEM block of `path`.
fn pem_der(path: &std::path::Path) -> Vec<u8> {
    use base64::Engine as _;
    let text = std::fs::read_to_string(path).unwrap();
    let body: String = text
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap()
}

fn b64url(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl TokenServer {
    /// Serves tokens for `users` (name, password) as `policy` allows.
    pub async fn start(users: &[(&str, &str)], policy: Policy) -> TokenServer {
        use base64::Engine as _;
        let dir = tempfile::tempdir().unwrap();
        // ca.key and ca.crt: a P-256 key and its self-signed certificate.
        super::test_certificate(dir.path());
        let rng = ring::rand::SystemRandom::new();
        let key = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &pem_der(&dir.path().join("ca.key")),
            &rng,
        )
        .expect("openssl's P-256 key as PKCS#8");
        let cert =
            base64::engine::general_purpose::STANDARD.encode(pem_der(&dir.path().join("ca.crt")));
        let state = Arc::new(State {
            key,
            cert,
            users: users
                .iter()
                .map(|(u, p)| (u.to_string(), p.to_string()))
                .collect(),
            policy,
            refresh: Mutex::default(),
            grants: Mutex::default(),
        });
        let st = state.clone();
        let (addr, task) = super::serve_http1(move |_, req| {
            let st = st.clone();
            async move { handle(&st, req).await }
        })
        .await;
        TokenServer {
            url: format!("http://{addr}"),
            dir,
            state,
            task,
        }
    }

    /// The `auth:` section of a registry config that takes this server's tokens.
    pub fn registry_config(&self) -> String {
        format!(
            "auth:\n  token:\n    realm: {}/token\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
            self.url,
            self.dir.path().join("ca.crt").display()
        )
    }

    /// A token for `actions` on `repository` as `user`, whatever the policy says (to set
    /// the registry up with).
    pub fn mint(&self, user: &str, repository: &str, actions: &[&str]) -> String {
        sign(
            &self.state,
            Some(user),
            &[(
                repository.to_string(),
                actions.iter().map(|a| a.to_string()).collect(),
            )],
        )
    }

    /// The grants answered so far that contain `part`.
    pub fn grants(&self, part: &str) -> usize {
        let grants = self.state.grants.lock().unwrap();
        grants.iter().filter(|g| g.contains(part)).count()
    }

    /// Forgets every refresh token of `user`, as a token server does when one logs out.
    pub fn revoke(&self, user: &str) {
        self.state.refresh.lock().unwrap().retain(|_, u| u != user);
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An ES256 JWT for `user` with `access` (repository, actions), as Distribution reads one.
fn sign(state: &State, user: Option<&str>, access: &[(String, Vec<String>)]) -> String {
    let now = unix_now();
    let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [state.cert]});
    let access: Vec<_> = access
        .iter()
        .map(|(name, actions)| serde_json::json!({"type": "repository", "name": name, "actions": actions}))
        .collect();
    let claims = serde_json::json!({
        "iss": ISSUER,
        "sub": user.unwrap_or(""),
        "aud": SERVICE,
        "exp": now + 300,
        "nbf": now - 10,
        "iat": now,
        "jti": format!("{now}-{}", access.len()),
        "access": access,
    });
    let input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let sig = state
        .key
        .sign(&ring::rand::SystemRandom::new(), input.as_bytes())
        .unwrap();
    format!("{input}.{}", b64url(sig.as_ref()))
}

/// `k=v&k=v` pairs, `+` and `%XX` decoded.
fn form(text: &str) -> Vec<(String, String)> {
    let decode = |s: &str| {
        let s = s.replace('+', " ");
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%'
                && i + 2 < b.len()
                && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
            {
                out.push(v);
                i += 3;
                continue;
            }
            out.push(b[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    text.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn answer(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

async fn handle(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let basic = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|v| {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD
                .decode(v.trim())
                .ok()
        })
        .and_then(|raw| {
            let text = String::from_utf8(raw).ok()?;
            let (u, p) = text.split_once(':')?;
            Some((u.to_string(), p.to_string()))
        });
    let mut params = form(req.uri().query().unwrap_or(""));
    if method == Method::POST {
        let body = req.into_body().collect().await.unwrap().to_bytes();
        params.extend(form(&String::from_utf8_lossy(&body)));
    }
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let check = |u: &str, p: &str| state.users.get(u).is_some_and(|want| want == p);
    // (what is logged, the user, whether to hand out a refresh token)
    let (what, user, offline): (String, Result<Option<String>, ()>, bool) =
        if method == Method::POST {
            match get("grant_type").as_deref() {
                Some("password") => {
                    let (u, p) = (
                        get("username").unwrap_or_default(),
                        get("password").unwrap_or_default(),
                    );
                    let ok = check(&u, &p);
                    (
                        format!("POST password {u}"),
                        if ok { Ok(Some(u)) } else { Err(()) },
                        get("access_type").as_deref() == Some("offline"),
                    )
                }
                Some("refresh_token") => {
                    let t = get("refresh_token").unwrap_or_default();
                    let u = state.refresh.lock().unwrap().get(&t).cloned();
                    let name = u.clone().unwrap_or_else(|| "unknown".into());
                    (
                        format!("POST refresh_token {name}"),
                        u.map(Some).ok_or(()),
                        false,
                    )
                }
                other => (format!("POST {other:?}"), Err(()), false),
            }
        } else {
            match basic {
                Some((u, p)) => {
                    let ok = check(&u, &p);
                    (
                        format!("GET {u}"),
                        if ok { Ok(Some(u)) } else { Err(()) },
                        get("offline_token").as_deref() == Some("true"),
                    )
                }
                None => ("GET anonymous".into(), Ok(None), false),
            }
        };
    let Ok(user) = user else {
        state.grants.lock().unwrap().push(format!("{what} refused"));
        return answer(
            StatusCode::UNAUTHORIZED,
            r#"{"details":"bad credentials"}"#.into(),
        );
    };
    state.grants.lock().unwrap().push(what);
    let mut access = Vec::new();
    for scope in params
        .iter()
        .filter(|(k, _)| k == "scope")
        .flat_map(|(_, v)| v.split(' ').map(str::to_string).collect::<Vec<_>>())
    {
        let mut parts = scope.splitn(3, ':');
        let (Some("repository"), Some(name), Some(actions)) =
            (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let allowed: Vec<String> = actions
            .split(',')
            .filter(|a| (state.policy)(user.as_deref(), name, a))
            .map(str::to_string)
            .collect();
        access.push((name.to_string(), allowed));
    }
    let token = sign(state, user.as_deref(), &access);
    let mut body = serde_json::json!({"token": token, "access_token": token, "expires_in": 300});
    if offline && let Some(u) = &user {
        let refresh = format!("refresh-{u}-{}", state.refresh.lock().unwrap().len() + 1);
        state
            .refresh
            .lock()
            .unwrap()
            .insert(refresh.clone(), u.clone());
        body["refresh_token"] = refresh.into();
    }
    answer(StatusCode::OK, body.to_string())
}
