//! Everything the project generates or ships for Kubernetes is checked against the
//! Kubernetes schemas with kubernetes-validate (PyPI), and the example RegistryMirrors
//! against the CRD's own OpenAPI schema.

use crate::common::{examples, kubernetes_validate, root};
use pullthrough::api::mirror::RegistryMirror;
use pullthrough::controller::builders::{self, ChildSettings};
use std::path::Path;
use std::process::Command;

#[test]
fn generated_children_pass_kubernetes_validation() {
    let dir = tempfile::tempdir().unwrap();
    let settings = ChildSettings {
        proxy_image: "example.org/pullthrough:0.1.0".into(),
        image_pull_policy: Some("IfNotPresent".into()),
    };
    let mut files = Vec::new();
    for (i, (path, value)) in examples().into_iter().enumerate() {
        let mut m: RegistryMirror = serde_yaml::from_value(value).unwrap();
        m.metadata.uid = Some(format!("00000000-0000-0000-0000-00000000000{i}"));
        let config = m.spec.proxy_config().unwrap().to_yaml();
        let hash = builders::config_hash(&config, &[]);
        let docs = [
            serde_yaml::to_string(&builders::config_map(&m, &config)).unwrap(),
            serde_yaml::to_string(&builders::deployment(&m, &settings, &hash)).unwrap(),
            serde_yaml::to_string(&builders::stateful_set(&m, &settings, &hash)).unwrap(),
            serde_yaml::to_string(&builders::service(&m)).unwrap(),
            serde_yaml::to_string(&builders::pdb(&m)).unwrap(),
        ];
        // Builders produce typed objects without apiVersion/kind; add them as SSA does.
        let kinds = [
            ("v1", "ConfigMap"),
            ("apps/v1", "Deployment"),
            ("apps/v1", "StatefulSet"),
            ("v1", "Service"),
            ("policy/v1", "PodDisruptionBudget"),
        ];
        for ((api, kind), doc) in kinds.iter().zip(docs) {
            let file = dir.path().join(format!("{i}-{kind}.yaml"));
            std::fs::write(&file, format!("apiVersion: {api}\nkind: {kind}\n{doc}")).unwrap();
            files.push(file);
        }
        eprintln!("validated the children of {path}");
    }
    files.push(root().join("crds/registrymirror.yaml"));
    let refs: Vec<&Path> = files.iter().map(|p| p.as_path()).collect();
    kubernetes_validate(&refs);
}

#[test]
fn examples_match_the_crd_schema() {
    let script = r#"
import json, sys, yaml, jsonschema
crd = yaml.safe_load(open(sys.argv[1]))
schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
bad = 0
for path in sys.argv[2:]:
    for doc in yaml.safe_load_all(open(path)):
        if doc and doc.get("kind") == "RegistryMirror":
            for err in jsonschema.Draft7Validator(schema).iter_errors(doc):
                print(f"{path}: {err.message} at {list(err.path)}"); bad += 1
# The schema must also reject what it should.
wrong = {"apiVersion": "pullthrough.dev/v1alpha1", "kind": "RegistryMirror", "metadata": {"name": "x"},
         "spec": {"upstreams": [{"registry": "not a host/"}], "cache": {"tagTTL": "5 minutes"}, "replicas": -1}}
errors = list(jsonschema.Draft7Validator(schema).iter_errors(wrong))
if len(errors) < 3:
    print("schema accepted an invalid mirror:", [e.message for e in errors]); bad += 1
sys.exit(1 if bad else 0)
"#;
    let examples_dir = root().join("deploy/examples");
    let mut cmd = Command::new("python3");
    cmd.arg("-c")
        .arg(script)
        .arg(root().join("crds/registrymirror.yaml"));
    for e in std::fs::read_dir(examples_dir).unwrap() {
        cmd.arg(e.unwrap().path());
    }
    let out = cmd.output().expect("python3 runs");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
