//! The Rust types are the source of truth: `pullthrough crd` must equal crds/, and every
//! example in deploy/examples must parse into the types without losing a field.

use crate::common::examples;
use pullthrough::api::mirror::{RegistryMirror, RegistryMirrorSpec};
use std::process::Command;

use crate::common::root;

#[test]
fn crds_dir_matches_generated_crd() {
    let out = Command::new(env!("CARGO_BIN_EXE_pullthrough"))
        .arg("crd")
        .output()
        .unwrap();
    assert!(out.status.success());
    let generated = String::from_utf8(out.stdout).unwrap();
    assert_eq!(generated, pullthrough::api::mirror::crd_yaml());
    let checked_in = std::fs::read_to_string(root().join("crds/registrymirror.yaml")).unwrap();
    assert!(
        checked_in == generated,
        "crds/registrymirror.yaml is out of date: run `cargo run -- crd > crds/registrymirror.yaml`"
    );
}

#[test]
fn every_example_parses_into_the_types_and_is_valid() {
    let examples = examples();
    assert!(
        examples.len() >= 3,
        "deploy/examples has the documented examples"
    );
    for (path, value) in examples {
        let mirror: RegistryMirror =
            serde_yaml::from_value(value.clone()).unwrap_or_else(|e| panic!("{path}: {e}"));
        // Nothing in the file was ignored: the spec round-trips to the same document.
        let spec_back = serde_json::to_value(&mirror.spec).unwrap();
        let spec_in: serde_json::Value = serde_json::to_value(&value["spec"]).unwrap();
        let spec_again: RegistryMirrorSpec = serde_json::from_value(spec_in.clone()).unwrap();
        assert_eq!(spec_again, mirror.spec, "{path}");
        for (key, v) in spec_in.as_object().unwrap() {
            assert!(
                spec_back.get(key).is_some(),
                "{path}: spec.{key} = {v} is not part of the type"
            );
        }
        assert!(
            known_fields(&spec_in, &spec_back),
            "{path}: some field is not part of the type:\n{spec_in}\nvs\n{spec_back}"
        );
        RegistryMirrorSpec::validate_cel(&spec_back, None)
            .unwrap_or_else(|e| panic!("{path}: {e:?}"));
        mirror
            .spec
            .proxy_config()
            .unwrap_or_else(|e| panic!("{path}: {e}"));
    }
}

/// Every key present in `input` (recursively) is present in `parsed`.
fn known_fields(input: &serde_json::Value, parsed: &serde_json::Value) -> bool {
    match (input, parsed) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => a
            .iter()
            .all(|(k, v)| b.get(k).is_some_and(|pv| known_fields(v, pv))),
        (serde_json::Value::Array(a), serde_json::Value::Array(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| known_fields(x, y))
        }
        _ => true,
    }
}

#[test]
fn a_misspelt_field_is_caught() {
    let bad = serde_json::json!({"upstreams": [{"registry": "docker.io", "credentialSecretRef": {"name": "x"}}]});
    let spec: RegistryMirrorSpec = serde_json::from_value(bad.clone()).unwrap();
    assert!(!known_fields(&bad, &serde_json::to_value(&spec).unwrap()));
}
