//! Property tests of the parsers every request goes through before anything is looked
//! up: routes, digests and references, `Range` and `WWW-Authenticate`. Arbitrary input
//! never panics and never yields something outside what the grammar allows; valid input
//! parses back to what it was made of.

use proptest::prelude::*;
use pullthrough::oci::{Digest, Reference, validate_repository};
use pullthrough::proxy::http::{Route, parse_route};
use pullthrough::proxy::pull_through::ByteRange;
use pullthrough::proxy::upstream::{Challenge, parse_challenge};

/// A repository name by the distribution grammar.
fn repository() -> impl Strategy<Value = String> {
    let component = "[a-z0-9]{1,8}(([._]|__|-{1,3})[a-z0-9]{1,8}){0,2}";
    prop::collection::vec(component, 1..4).prop_map(|c| c.join("/"))
}

fn tag() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_][a-zA-Z0-9._-]{0,40}"
}

fn digest() -> impl Strategy<Value = String> {
    "[0-9a-f]{64}".prop_map(|hex| format!("sha256:{hex}"))
}

proptest! {
    // The same inputs every run (a failure is a bug to fix, never luck), and no
    // regression files written into the checkout.
    #![proptest_config(ProptestConfig {
        cases: 512,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x5eed_0fc0_ffee),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_path_is_refused_or_is_a_valid_route(path in "/v2/[ -~]{0,80}") {
        match parse_route(&path) {
            Ok(Route::Base) | Err(_) => {}
            Ok(Route::Manifest(name, _) | Route::Blob(name, _) | Route::Tags(name)
                | Route::Referrers(name, _)) => {
                prop_assert!(validate_repository(&name).is_ok(), "{name}");
                prop_assert!(!name.split('/').any(|c| c == ".." || c == "."), "{name}");
            }
        }
    }

    #[test]
    fn escaped_segments_never_change_the_shape(
        name in repository(),
        junk in prop::collection::vec(prop_oneof!["%2f", "%2F", "%2e", "%", ".", "a", "0"], 1..8),
    ) {
        // Whatever one segment decodes to, it cannot add a path component.
        let junk = junk.concat();
        let path = format!("/v2/{name}/{junk}/manifests/latest");
        if let Ok(Route::Manifest(parsed, _)) = parse_route(&path) {
            prop_assert_eq!(parsed.split('/').count(), name.split('/').count() + 1);
        }
    }

    #[test]
    fn valid_routes_parse_back(name in repository(), t in tag(), d in digest()) {
        prop_assert_eq!(
            parse_route(&format!("/v2/{name}/manifests/{t}")).unwrap(),
            Route::Manifest(name.clone(), Reference::Tag(t.clone()))
        );
        let digest: Digest = d.parse().unwrap();
        prop_assert_eq!(
            parse_route(&format!("/v2/{name}/blobs/{d}")).unwrap(),
            Route::Blob(name.clone(), digest.clone())
        );
        prop_assert_eq!(
            parse_route(&format!("/v2/{name}/manifests/{}", d.replace(':', "%3A"))).unwrap(),
            Route::Manifest(name.clone(), Reference::Digest(digest))
        );
        prop_assert_eq!(
            parse_route(&format!("/v2/{name}/tags/list")).unwrap(),
            Route::Tags(name)
        );
    }

    #[test]
    fn digests_parse_back_and_junk_is_refused(d in digest(), junk in "[ -~]{0,80}") {
        let parsed: Digest = d.parse().unwrap();
        prop_assert_eq!(parsed.to_string(), d);
        if let Ok(j) = junk.parse::<Digest>() {
            prop_assert_eq!(j.to_string(), junk, "a digest is exactly its text");
        }
    }

    #[test]
    fn references_are_tags_or_digests(s in "[ -~]{0,140}") {
        match Reference::parse(&s) {
            Ok(Reference::Tag(t)) => {
                prop_assert!(t.len() <= 128 && !t.contains(['/', ':', '%']), "{t}");
            }
            Ok(Reference::Digest(d)) => prop_assert_eq!(d.to_string(), s),
            Err(_) => {}
        }
    }

    #[test]
    fn ranges_resolve_inside_the_blob(header in "[ -~]{0,40}", start in 0u64..5000, end in 0u64..5000, len in 0u64..4000) {
        for h in [header, format!("bytes={start}-{end}"), format!("bytes={start}-"), format!("bytes=-{end}")] {
            if let Some(Ok(r)) = ByteRange::parse(&h)
                && let Some((a, b)) = r.resolve(len)
            {
                prop_assert!(a <= b && b < len, "{h}: {a}-{b} of {len}");
            }
        }
        if start <= end && start < len {
            let r = ByteRange::parse(&format!("bytes={start}-{end}")).unwrap().unwrap();
            prop_assert_eq!(r.resolve(len), Some((start, end.min(len - 1))));
        }
    }

    #[test]
    fn challenges_parse_back(
        realm in "https://[a-z]{1,10}\\.example/[a-z]{0,8}",
        service in "[a-z.]{1,20}",
        repo in repository(),
        junk in "[ -~]{0,100}",
    ) {
        let _ = parse_challenge(&junk);
        // Docker Hub's shape, scopes with commas and colons included.
        let scope = format!("repository:{repo}:pull,push");
        let header = format!(r#"Bearer realm="{realm}",service="{service}",scope="{scope}""#);
        prop_assert_eq!(
            parse_challenge(&header),
            Some(Challenge::Bearer { realm, service: Some(service), scope: Some(scope) })
        );
    }
}
