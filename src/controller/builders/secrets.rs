//! The Secrets the controller makes for a mirror (the admin token of its proxies, the key
//! they share), and every Secret a mirror's children read.

use super::{child_name, meta};
use crate::api::mirror::{ADMIN_TOKEN, RegistryMirror, SIGNING_KEY};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use std::collections::BTreeMap;

/// The Secret that holds the admin token of a mirror's proxies, with which the
/// controller asks them to prefetch (`cache.prefetchFromWorkloads`).
pub fn admin_secret_name(mirror: &RegistryMirror) -> String {
    format!("{}-admin", child_name(mirror))
}

/// A new admin token Secret for the mirror's proxies (`token`, random): created once,
/// deleted with the mirror.
pub fn admin_secret(mirror: &RegistryMirror, token: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(admin_secret_name(mirror)),
            ..meta(mirror)
        },
        type_: Some("Opaque".into()),
        string_data: Some(BTreeMap::from([(
            ADMIN_TOKEN.to_string(),
            token.to_string(),
        )])),
        ..Secret::default()
    }
}

/// The Secret that holds the key a mirror's proxies sign access tokens with.
pub fn access_secret_name(mirror: &RegistryMirror) -> String {
    format!("{}-access", child_name(mirror))
}

/// A new signing key Secret for the mirror's proxies (`key`, random): created once,
/// never updated, deleted with the mirror.
pub fn access_secret(mirror: &RegistryMirror, key: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(access_secret_name(mirror)),
            ..meta(mirror)
        },
        type_: Some("Opaque".into()),
        string_data: Some(BTreeMap::from([(SIGNING_KEY.to_string(), key.to_string())])),
        ..Secret::default()
    }
}

/// Every Secret a mirror's children read: those its spec names and those the controller
/// makes for it. A change to any of them is a change to the mirror.
pub fn secret_names(mirror: &RegistryMirror) -> Vec<String> {
    let mut names: Vec<String> = mirror.spec.secret_names().map(str::to_string).collect();
    names.push(admin_secret_name(mirror));
    names.push(access_secret_name(mirror));
    names
}
