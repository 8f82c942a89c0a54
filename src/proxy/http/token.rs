//! `/auth/token`: the distribution token spec's `GET` (credentials in Basic) and its
//! OAuth2 `POST` (`grant_type=password`, or `refresh_token` with an identity token of the
//! upstream's token server), parsed into a [`TokenAsk`]; the request layer decides (see
//! [`crate::proxy::access`]) and the token is rendered as the spec says.

use super::Body;
use super::route::form_pairs;
use crate::api::Credentials;
use crate::proxy::access::Issued;
use crate::proxy::error::ProxyError;
use crate::proxy::registry::{Registry, Served, TokenAsk};
use crate::proxy::upstream::Secret;
use crate::server::full;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header;
use hyper::{Method, Request, Response, StatusCode};
use std::net::IpAddr;
use std::time::Duration;

/// Largest token request body read (a POSTed form).
const MAX_TOKEN_FORM: usize = 64 << 10;

/// Answers one token request from `client`.
pub(super) async fn serve(
    registry: &Registry,
    req: Request<Incoming>,
    client: IpAddr,
) -> (Result<Response<Body>, ProxyError>, Served) {
    let ask = match parse(req).await {
        Ok(ask) => ask,
        Err(e) => return (Err(e), Served::default()),
    };
    let (issued, served) = registry.token(ask, client).await;
    (issued.map(render), served)
}

/// What a token request asks: its secret (Basic, or the POSTed grant), its service and
/// scopes.
async fn parse(req: Request<Incoming>) -> Result<TokenAsk, ProxyError> {
    let mut secret = basic_credentials(
        req.headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok()),
    )
    .map(Secret::Password);
    let mut params: Vec<(String, String)> = Vec::new();
    form_pairs(req.uri().query().unwrap_or(""), &mut params)?;
    let method = req.method().clone();
    if method == Method::POST {
        let body = http_body_util::Limited::new(req.into_body(), MAX_TOKEN_FORM);
        let body = tokio::time::timeout(Duration::from_secs(30), body.collect())
            .await
            .map_err(|_| ProxyError::TokenRequest("the form did not arrive in time".into()))?
            .map_err(|_| ProxyError::TokenRequest("the form is too large or broke off".into()))?
            .to_bytes();
        let text = std::str::from_utf8(&body)
            .map_err(|_| ProxyError::TokenRequest("the form is not UTF-8".into()))?;
        form_pairs(text, &mut params)?;
        secret = Some(grant(&params)?);
    } else if method != Method::GET {
        return Err(ProxyError::Unsupported(
            "the token endpoint takes GET or POST",
        ));
    }
    let service = params
        .iter()
        .find(|(k, _)| k == "service")
        .map(|(_, v)| v.clone());
    let scopes = params
        .iter()
        .filter(|(k, _)| k == "scope")
        .flat_map(|(_, v)| v.split(' '))
        .map(str::to_string)
        .collect();
    Ok(TokenAsk {
        service,
        scopes,
        secret,
    })
}

/// The secret of a POSTed form's grant.
fn grant(params: &[(String, String)]) -> Result<Secret, ProxyError> {
    let get = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    match get("grant_type").as_deref() {
        Some("password") => Ok(Secret::Password(Credentials {
            username: get("username").unwrap_or_default(),
            password: get("password").unwrap_or_default(),
        })),
        Some("refresh_token") => get("refresh_token")
            .filter(|t| !t.is_empty())
            .map(Secret::IdentityToken)
            .ok_or_else(|| {
                ProxyError::TokenRequest("a refresh_token grant needs a refresh_token".into())
            }),
        _ => Err(ProxyError::TokenRequest(
            "grant_type must be password or refresh_token (or use GET with Basic)".into(),
        )),
    }
}

/// Username and password of an `Authorization: Basic` header.
fn basic_credentials(header: Option<&str>) -> Option<Credentials> {
    use base64::Engine as _;
    let encoded = header?.strip_prefix("Basic ")?.trim();
    let raw = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    let (user, pass) = std::str::from_utf8(&raw).ok()?.split_once(':')?;
    Some(Credentials {
        username: user.to_string(),
        password: pass.to_string(),
    })
}

/// A token as the distribution token spec answers one (and OAuth2's `access_token`).
fn render(issued: Issued) -> Response<Body> {
    let body = serde_json::json!({
        "token": issued.token,
        "access_token": issued.token,
        "expires_in": issued.expires_in,
    })
    .to_string();
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, body.len())
        .header(header::CACHE_CONTROL, "no-store")
        .body(full(body))
        .expect("valid response")
}
