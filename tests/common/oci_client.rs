//! A small OCI client: pushes with the distribution API, pulls verifying every digest.

use super::{ACCEPT, Blob, Image, MultiArch, http, sha256};
use std::collections::BTreeSet;

/// Pushes a blob with the distribution push API (monolithic upload).
pub async fn push_blob(base: &str, repo: &str, blob: &Blob) {
    push_blob_with(&http(), base, repo, blob).await
}

/// [`push_blob`] with client `c` (which may carry an Authorization header).
pub async fn push_blob_with(c: &reqwest::Client, base: &str, repo: &str, blob: &Blob) {
    let r = c
        .post(format!("{base}/v2/{repo}/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "start upload: {:?}", r.text().await);
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    // On `base` (which may carry credentials), whether the registry answered with a path
    // or a whole URL.
    let loc = match loc.find("/v2/") {
        Some(i) => format!("{base}{}", &loc[i..]),
        None => loc,
    };
    let sep = if loc.contains('?') { '&' } else { '?' };
    let r = c
        .put(format!("{loc}{sep}digest={}", blob.digest))
        .header("content-type", "application/octet-stream")
        .body(blob.bytes.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "finish upload: {:?}", r.text().await);
}

pub async fn push_manifest(base: &str, repo: &str, reference: &str, m: &Blob) {
    push_manifest_with(&http(), base, repo, reference, m).await
}

pub async fn push_manifest_with(
    c: &reqwest::Client,
    base: &str,
    repo: &str,
    reference: &str,
    m: &Blob,
) {
    let r = c
        .put(format!("{base}/v2/{repo}/manifests/{reference}"))
        .header("content-type", &m.media_type)
        .body(m.bytes.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "push manifest: {:?}", r.text().await);
}

pub async fn push_image(base: &str, repo: &str, tag: &str, img: &Image) {
    push_image_with(&http(), base, repo, tag, img).await
}

/// [`push_image`] with client `c` (which may carry an Authorization header).
pub async fn push_image_with(c: &reqwest::Client, base: &str, repo: &str, tag: &str, img: &Image) {
    for b in img.blobs() {
        push_blob_with(c, base, repo, b).await;
    }
    push_manifest_with(c, base, repo, tag, &img.manifest).await;
}

pub async fn push_multiarch(base: &str, repo: &str, tag: &str, m: &MultiArch) {
    for img in &m.images {
        for b in img.blobs() {
            push_blob(base, repo, b).await;
        }
        push_manifest(base, repo, &img.manifest.digest, &img.manifest).await;
    }
    push_manifest(base, repo, tag, &m.index).await;
}

/// What a pull saw: every digest fetched (verified) and the top manifest's digest.
#[derive(Debug, Default)]
pub struct Pulled {
    pub top: String,
    pub digests: BTreeSet<String>,
    pub bytes: u64,
}

/// Pulls `repo:reference` (every platform) from an OCI registry, verifying every digest.
/// `ns` is sent as containerd does when set.
pub async fn pull(
    base: &str,
    repo: &str,
    reference: &str,
    ns: Option<&str>,
) -> Result<Pulled, String> {
    let c = http();
    let q = ns.map(|n| format!("?ns={n}")).unwrap_or_default();
    let mut out = Pulled::default();
    let get = |path: String| {
        let c = c.clone();
        let q = q.clone();
        async move {
            let r = c
                .get(format!("{base}/v2/{repo}/{path}{q}"))
                .header("accept", ACCEPT)
                .send()
                .await
                .map_err(|e| format!("GET {path}: {e}"))?;
            let status = r.status();
            let headers = r.headers().clone();
            let body = r
                .bytes()
                .await
                .map_err(|e| format!("GET {path} body: {e}"))?;
            if !status.is_success() {
                return Err(format!(
                    "GET {path}: {status} {}",
                    String::from_utf8_lossy(&body)
                ));
            }
            Ok::<_, String>((headers, body.to_vec()))
        }
    };
    let (headers, top) = get(format!("manifests/{reference}")).await?;
    let top_digest = sha256(&top);
    if let Some(h) = headers.get("docker-content-digest")
        && h.to_str().unwrap() != top_digest
    {
        return Err(format!("Docker-Content-Digest {h:?} != {top_digest}"));
    }
    if reference.starts_with("sha256:") && reference != top_digest {
        return Err(format!("asked for {reference}, got {top_digest}"));
    }
    out.top = top_digest.clone();
    out.digests.insert(top_digest);
    out.bytes += top.len() as u64;
    let doc: serde_json::Value = serde_json::from_slice(&top).map_err(|e| e.to_string())?;
    let mut manifests = vec![doc.clone()];
    if let Some(list) = doc["manifests"].as_array() {
        manifests.clear();
        for d in list {
            let digest = d["digest"].as_str().unwrap().to_string();
            let (_, body) = get(format!("manifests/{digest}")).await?;
            if sha256(&body) != digest {
                return Err(format!("manifest {digest} has wrong content"));
            }
            out.bytes += body.len() as u64;
            out.digests.insert(digest);
            manifests.push(serde_json::from_slice(&body).map_err(|e| e.to_string())?);
        }
    }
    for m in manifests {
        let mut descs = vec![m["config"].clone()];
        descs.extend(m["layers"].as_array().cloned().unwrap_or_default());
        for d in descs {
            let digest = d["digest"].as_str().unwrap().to_string();
            let (_, body) = get(format!("blobs/{digest}")).await?;
            if sha256(&body) != digest {
                return Err(format!("blob {digest} has wrong content"));
            }
            if d["size"].as_u64() != Some(body.len() as u64) {
                return Err(format!("blob {digest} has wrong size"));
            }
            out.bytes += body.len() as u64;
            out.digests.insert(digest);
        }
    }
    Ok(out)
}
