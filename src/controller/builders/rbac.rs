//! The evictor's RBAC: a mirror whose replicas share a bucket with a size limit elects
//! one of them on a Lease; its pods get a service account that may hold that Lease and
//! nothing else.

use super::{child_name, meta};
use crate::api::mirror::RegistryMirror;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use kube::ResourceExt;

/// Name of the Lease the replicas of an evicting mirror elect on, and of the Role and
/// RoleBinding that let them hold it.
pub fn evictor_name(mirror: &RegistryMirror) -> String {
    evictor_rbac_names(&child_name(mirror)).0
}

/// Name of the service account of an evicting mirror's pods.
pub fn proxy_service_account_name(mirror: &RegistryMirror) -> String {
    evictor_rbac_names(&child_name(mirror)).1
}

/// [`evictor_name`] and [`proxy_service_account_name`], from the name of the other
/// children.
pub fn evictor_rbac_names(child: &str) -> (String, String) {
    (format!("{child}-evictor"), format!("{child}-proxy"))
}

/// The service account of an evicting mirror's pods.
pub fn proxy_service_account(mirror: &RegistryMirror) -> ServiceAccount {
    let mut metadata = meta(mirror);
    metadata.name = Some(proxy_service_account_name(mirror));
    ServiceAccount {
        metadata,
        automount_service_account_token: Some(false),
        ..ServiceAccount::default()
    }
}

/// What the pods of an evicting mirror may do: hold their one Lease, nothing else.
pub fn evictor_role(mirror: &RegistryMirror) -> Role {
    let mut metadata = meta(mirror);
    metadata.name = Some(evictor_name(mirror));
    let leases = |verbs: &[&str], names: Option<Vec<String>>| PolicyRule {
        api_groups: Some(vec!["coordination.k8s.io".into()]),
        resources: Some(vec!["leases".into()]),
        resource_names: names,
        verbs: verbs.iter().map(|v| v.to_string()).collect(),
        ..PolicyRule::default()
    };
    Role {
        metadata,
        rules: Some(vec![
            // A create names no object yet: it cannot be narrowed to one name.
            leases(&["create"], None),
            leases(&["get", "update"], Some(vec![evictor_name(mirror)])),
        ]),
    }
}

/// Binds [`evictor_role`] to [`proxy_service_account`].
pub fn evictor_role_binding(mirror: &RegistryMirror) -> RoleBinding {
    let mut metadata = meta(mirror);
    metadata.name = Some(evictor_name(mirror));
    RoleBinding {
        metadata,
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: evictor_name(mirror),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: proxy_service_account_name(mirror),
            namespace: mirror.namespace(),
            ..Subject::default()
        }]),
    }
}
