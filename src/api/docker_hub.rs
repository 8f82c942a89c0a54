//! Docker Hub's rules, in one place: it answers to three names, its API lives at another
//! host, and single-name images are under `library/`. Every role and module that compares
//! registry names or resolves image references goes through here.

/// Docker Hub's registry name in image references.
pub const REGISTRY: &str = "docker.io";
/// Docker Hub's registry API endpoint.
pub const API_URL: &str = "https://registry-1.docker.io";

/// Whether `registry` is one of the names Docker Hub appears under in `?ns=` and image
/// references (`docker.io`, `index.docker.io`, `registry-1.docker.io`), in any case.
pub fn is_alias(registry: &str) -> bool {
    matches!(
        registry.to_ascii_lowercase().as_str(),
        "docker.io" | "index.docker.io" | "registry-1.docker.io"
    )
}

/// A registry name normalised for comparisons: lowercase, Docker Hub's names folded into
/// `docker.io`.
pub fn registry_key(registry: &str) -> String {
    if is_alias(registry) {
        REGISTRY.to_string()
    } else {
        registry.to_ascii_lowercase()
    }
}

/// A repository as Docker Hub knows it: single names live under `library/`.
pub fn repository(name: &str) -> String {
    if name.contains('/') {
        name.to_string()
    } else {
        format!("library/{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fold_and_single_names_go_under_library() {
        for name in ["docker.io", "Index.Docker.io", "REGISTRY-1.docker.io"] {
            assert!(is_alias(name), "{name}");
            assert_eq!(registry_key(name), "docker.io");
        }
        assert!(!is_alias("ghcr.io"));
        assert_eq!(registry_key("GHCR.io"), "ghcr.io");
        assert_eq!(repository("alpine"), "library/alpine");
        assert_eq!(repository("bitnami/redis"), "bitnami/redis");
    }
}
