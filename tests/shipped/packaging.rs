//! The chart's and deploy/'s static files stay in sync with the code: CRDs identical to the
//! generated one, versions, RBAC rules, alerts and dashboard (every metric they use exists
//! and every PromQL expression parses), values against their schema, templates only using
//! values that exist. Nothing is rendered by hand. The docs' metrics table
//! (docs/metrics.md), configuration example (docs/configuration.md) and file list
//! (docs/architecture.md) are checked against the code too, and the README's size.

use crate::common::{kubernetes_validate, root};
use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn yaml_docs(rel: &str) -> Vec<serde_yaml::Value> {
    let text = read(rel);
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| <serde_yaml::Value as serde::Deserialize>::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

/// Every series name the code can export.
fn code_metric_names() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    names.extend(pullthrough::proxy::metrics::Metrics::new().names());
    names.extend(pullthrough::controller::ControllerMetrics::new().names());
    names.extend(pullthrough::node_agent::AgentMetrics::new().names());
    names
}

/// Metric names a PromQL expression selects (parsed, not pattern-matched).
fn selected_metrics(expr: &str) -> BTreeSet<String> {
    // Grafana's variables are not PromQL: give them plausible values first.
    let expr = expr
        .replace("$__rate_interval", "5m")
        .replace("$__range", "6h")
        .replace("$namespace", ".*")
        .replace("$upstream", ".*");
    let ast = promql_parser::parser::parse(&expr)
        .unwrap_or_else(|e| panic!("invalid PromQL {expr:?}: {e}"));
    let mut out = BTreeSet::new();
    collect(&ast, &mut out);
    out
}

fn collect(e: &promql_parser::parser::Expr, out: &mut BTreeSet<String>) {
    use promql_parser::parser::Expr::*;
    match e {
        VectorSelector(v) => {
            if let Some(n) = &v.name {
                out.insert(n.clone());
            }
        }
        MatrixSelector(m) => {
            if let Some(n) = &m.vs.name {
                out.insert(n.clone());
            }
        }
        Aggregate(a) => {
            collect(&a.expr, out);
            if let Some(p) = &a.param {
                collect(p, out);
            }
        }
        Unary(u) => collect(&u.expr, out),
        Binary(b) => {
            collect(&b.lhs, out);
            collect(&b.rhs, out);
        }
        Paren(p) => collect(&p.expr, out),
        Subquery(s) => collect(&s.expr, out),
        Call(c) => {
            for a in &c.args.args {
                collect(a, out);
            }
        }
        _ => {}
    }
}

#[test]
fn crds_everywhere_are_the_generated_one() {
    let generated = pullthrough::api::mirror::crd_yaml();
    for copy in [
        "crds/registrymirror.yaml",
        "charts/pullthrough/crds/registrymirror.yaml",
        "deploy/01-crd.yaml",
    ] {
        assert!(
            read(copy) == generated,
            "{copy} differs from `pullthrough crd`: regenerate it with `cargo run -- crd > {copy}`"
        );
    }
}

#[test]
fn versions_agree() {
    let version = env!("CARGO_PKG_VERSION");
    let chart: serde_yaml::Value =
        serde_yaml::from_str(&read("charts/pullthrough/Chart.yaml")).unwrap();
    assert_eq!(
        chart["appVersion"].as_str(),
        Some(version),
        "Chart.yaml appVersion"
    );
    assert_eq!(chart["apiVersion"].as_str(), Some("v2"));
    let image = format!(":{version}");
    for file in ["deploy/03-controller.yaml", "deploy/04-node-agent.yaml"] {
        for doc in yaml_docs(file) {
            if doc["kind"] == "Deployment" || doc["kind"] == "DaemonSet" {
                let c = &doc["spec"]["template"]["spec"]["containers"][0];
                assert!(
                    c["image"].as_str().unwrap().ends_with(&image),
                    "{file}: image tag is not {version}"
                );
            }
        }
    }
    let controller = &yaml_docs("deploy/03-controller.yaml")[0];
    let env = controller["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_sequence()
        .unwrap();
    let proxy_image = env
        .iter()
        .find(|e| e["name"] == "PULLTHROUGH_PROXY_IMAGE")
        .unwrap();
    assert_eq!(
        proxy_image["value"],
        controller["spec"]["template"]["spec"]["containers"][0]["image"]
    );
}

#[test]
fn rbac_rules_of_chart_and_deploy_are_the_same() {
    let rules = |file: &str| -> serde_yaml::Value { serde_yaml::from_str(&read(file)).unwrap() };
    let docs = yaml_docs("deploy/02-rbac.yaml");
    let find = |kind: &str, name: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name} in deploy/02-rbac.yaml"))["rules"]
            .clone()
    };
    assert_eq!(
        find("ClusterRole", "pullthrough-controller"),
        rules("charts/pullthrough/files/controller-rules.yaml")
    );
    assert_eq!(
        find("ClusterRole", "pullthrough-node-agent"),
        rules("charts/pullthrough/files/node-agent-rules.yaml")
    );
    assert_eq!(
        find("Role", "pullthrough-leader-election"),
        rules("charts/pullthrough/files/leader-election-rules.yaml")
    );
    // Least privilege: no wildcards, and Secrets only read, but for the one the
    // controller creates (a mirror's signing key; never updated, and deleted with the
    // mirror by its owner reference).
    let text = read("charts/pullthrough/files/controller-rules.yaml")
        + &read("charts/pullthrough/files/node-agent-rules.yaml");
    assert!(!text.contains("\"*\""), "no wildcard rules");
    let controller: serde_yaml::Value = rules("charts/pullthrough/files/controller-rules.yaml");
    for rule in controller.as_sequence().unwrap() {
        if rule["resources"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|r| r == "secrets")
        {
            let verbs: Vec<&str> = rule["verbs"]
                .as_sequence()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            assert_eq!(verbs, ["get", "create", "list", "watch"]);
        }
    }
}

/// The shipped NetworkPolicy (deploy/ and the chart's) selects the proxy pods the
/// controller makes, leaves their registry API open and admits to their operations port
/// (metrics, the admin endpoint) only the controller's pods and Prometheus.
#[test]
fn the_network_policy_admits_to_the_operations_port_only_the_controller_and_prometheus() {
    use pullthrough::api::mirror::{METRICS_PORT, PROXY_PORT};
    use pullthrough::api::mirror::{RegistryMirror, RegistryMirrorSpec};
    let policy = &yaml_docs("deploy/05-network-policy.yaml")[0];
    let spec: RegistryMirrorSpec =
        serde_yaml::from_str("upstreams: [{registry: docker.io}]").unwrap();
    let proxy_pods = pullthrough::controller::builders::labels(&RegistryMirror::new("m", spec));
    let controller_pods =
        &yaml_docs("deploy/03-controller.yaml")[0]["spec"]["template"]["metadata"]["labels"];
    let subset = |selector: &serde_yaml::Value, labels: &dyn Fn(&str) -> Option<String>| {
        let m = selector["matchLabels"].as_mapping().expect("matchLabels");
        !m.is_empty()
            && m.iter()
                .all(|(k, v)| labels(k.as_str().unwrap()).as_deref() == v.as_str())
    };
    assert!(
        subset(&policy["spec"]["podSelector"], &|k| proxy_pods
            .get(k)
            .cloned()),
        "the policy does not select the proxy pods"
    );
    let rules = policy["spec"]["ingress"].as_sequence().unwrap();
    let rule_for = |port: u16| {
        rules
            .iter()
            .find(|r| r["ports"][0]["port"].as_u64() == Some(port.into()))
            .unwrap_or_else(|| panic!("no rule for port {port}"))
    };
    assert!(
        rule_for(PROXY_PORT).get("from").is_none(),
        "the registry API is open"
    );
    let from = rule_for(METRICS_PORT)["from"].as_sequence().unwrap();
    assert_eq!(from.len(), 2, "{from:?}");
    assert!(subset(&from[0]["podSelector"], &|k| {
        controller_pods[k].as_str().map(str::to_string)
    }));
    assert!(from[1]["namespaceSelector"].is_mapping(), "Prometheus");
    // The chart's template makes the same policy (its ports and selectors as text).
    let chart = read("charts/pullthrough/templates/networkpolicy.yaml");
    for part in [
        format!("port: {PROXY_PORT}"),
        format!("port: {METRICS_PORT}"),
        "app.kubernetes.io/component: proxy".to_string(),
        "app.kubernetes.io/component: controller".to_string(),
        ".Values.networkPolicy.metricsFrom".to_string(),
    ] {
        assert!(chart.contains(&part), "the chart's policy lacks {part}");
    }
}

/// deploy/rewrite/ is what the chart makes with `rewrite.enabled`: the controller of
/// deploy/03 and the webhook's settings, which name the Service, the Secret and the
/// configuration that its other files make; least privilege for those two; the
/// webhook safe to be without (failurePolicy Ignore, no side effects, a short timeout).
#[test]
fn the_rewrite_manifests_are_the_controller_with_its_webhook_and_least_privilege() {
    let plain = yaml_docs("deploy/03-controller.yaml").remove(0);
    let mut with = yaml_docs("deploy/rewrite/03-controller.yaml").remove(0);
    let container = &mut with["spec"]["template"]["spec"]["containers"][0];
    let env = container["env"].as_sequence_mut().unwrap();
    let mut webhook_env = BTreeMap::new();
    env.retain(|e| {
        let name = e["name"].as_str().unwrap();
        let ours = name.starts_with("PULLTHROUGH_WEBHOOK_");
        if ours {
            webhook_env.insert(name.to_string(), e["value"].as_str().unwrap().to_string());
        }
        !ours
    });
    let ports = container["ports"].as_sequence_mut().unwrap();
    let webhook_port = ports.pop().unwrap();
    assert_eq!(
        with, plain,
        "deploy/rewrite/03 is deploy/03 but for the webhook"
    );
    assert_eq!(webhook_port["name"], "webhook");
    assert_eq!(
        webhook_env["PULLTHROUGH_WEBHOOK_LISTEN"],
        format!(
            "0.0.0.0:{}",
            webhook_port["containerPort"].as_u64().unwrap()
        )
    );
    let docs = yaml_docs("deploy/rewrite/06-rewrite.yaml");
    let find = |kind: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind}"))
    };
    let config = find("MutatingWebhookConfiguration");
    assert_eq!(
        config["metadata"]["name"].as_str(),
        Some(webhook_env["PULLTHROUGH_WEBHOOK_CONFIGURATION"].as_str())
    );
    let hook = &config["webhooks"][0];
    assert_eq!(hook["failurePolicy"], "Ignore");
    assert_eq!(hook["sideEffects"], "None");
    assert!(hook["timeoutSeconds"].as_u64().unwrap() <= 5);
    let service = find("Service");
    let svc = &hook["clientConfig"]["service"];
    assert_eq!(svc["name"], service["metadata"]["name"]);
    assert_eq!(svc["path"], "/mutate");
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "webhook");
    let host = format!(
        "{}.{}.svc",
        svc["name"].as_str().unwrap(),
        svc["namespace"].as_str().unwrap()
    );
    assert!(
        webhook_env["PULLTHROUGH_WEBHOOK_HOSTS"]
            .split(',')
            .any(|h| h == host),
        "the certificate names the Service"
    );
    // One configuration, one Secret: named, and only read and updated.
    let cluster_rule = &find("ClusterRole")["rules"][0];
    assert_eq!(cluster_rule["resourceNames"][0], config["metadata"]["name"]);
    let role_rule = &find("Role")["rules"][0];
    assert_eq!(
        role_rule["resourceNames"][0].as_str(),
        Some(webhook_env["PULLTHROUGH_WEBHOOK_SECRET"].as_str())
    );
    for rule in [cluster_rule, role_rule] {
        assert_eq!(
            rule["verbs"],
            serde_yaml::from_str::<serde_yaml::Value>("[get, update]").unwrap()
        );
    }
    // The NetworkPolicy admits the API server to the webhook port.
    let policy = &yaml_docs("deploy/rewrite/07-network-policy.yaml")[0];
    let rule = &policy["spec"]["ingress"][0];
    assert_eq!(rule["ports"][0]["port"], webhook_port["containerPort"]);
    // The chart makes the same, from its values.
    let chart = read("charts/pullthrough/templates/rewrite.yaml")
        + &read("charts/pullthrough/templates/networkpolicy.yaml")
        + &read("charts/pullthrough/templates/controller.yaml");
    for part in [
        "failurePolicy: Ignore",
        "sideEffects: None",
        "PULLTHROUGH_WEBHOOK_LISTEN",
        "PULLTHROUGH_WEBHOOK_CONFIGURATION",
        "cert-manager.io/inject-ca-from",
        ".Values.rewrite.apiServerFrom",
        "path: /mutate",
    ] {
        assert!(chart.contains(part), "the chart lacks {part}");
    }
}

#[test]
fn alerts_use_real_metrics_and_parse() {
    let names = code_metric_names();
    let groups: serde_yaml::Value =
        serde_yaml::from_str(&read("charts/pullthrough/files/alerts.yaml")).unwrap();
    let rule = &yaml_docs("deploy/monitoring/prometheusrule.yaml")[0];
    assert_eq!(
        rule["spec"]["groups"], groups,
        "deploy/monitoring/prometheusrule.yaml matches the chart"
    );
    let mut alerts = BTreeSet::new();
    for g in groups.as_sequence().unwrap() {
        for r in g["rules"].as_sequence().unwrap() {
            let name = r["alert"].as_str().unwrap();
            alerts.insert(name.to_string());
            for key in ["expr", "for"] {
                assert!(r[key].is_string(), "{name} has no {key}");
            }
            assert!(
                r["labels"]["severity"].is_string(),
                "{name} has no severity"
            );
            assert!(
                r["annotations"]["summary"].is_string()
                    && r["annotations"]["description"].is_string()
            );
            for m in selected_metrics(r["expr"].as_str().unwrap()) {
                if m.starts_with("pullthrough_") {
                    assert!(
                        names.contains(&m),
                        "alert {name} uses {m}, which the code does not export"
                    );
                }
            }
        }
    }
    for wanted in [
        "PullthroughHitRatioCollapse",
        "PullthroughUpstreamErrors",
        "PullthroughCacheNearFull",
        "PullthroughProxyDown",
    ] {
        assert!(alerts.contains(wanted), "missing alert {wanted}");
    }
}

#[test]
fn dashboard_uses_real_metrics_and_covers_the_essentials() {
    let names = code_metric_names();
    let text = read("charts/pullthrough/files/dashboard.json");
    let cm = &yaml_docs("deploy/monitoring/dashboard.yaml")[0];
    assert_eq!(
        cm["data"]["pullthrough.json"].as_str(),
        Some(text.as_str()),
        "deploy/monitoring matches the chart"
    );
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut used = BTreeSet::new();
    let mut titles = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        titles.push(p["title"].as_str().unwrap().to_lowercase());
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            for m in selected_metrics(expr) {
                assert!(
                    names.contains(&m),
                    "panel {:?} uses {m}, which the code does not export",
                    p["title"]
                );
                used.insert(m);
            }
        }
    }
    for wanted in [
        "hit ratio (requests)",
        "hit ratio (bytes)",
        "bytes saved",
        "upstream latency",
        "cache fill",
    ] {
        assert!(
            titles.iter().any(|t| t.contains(wanted)),
            "no panel for {wanted}: {titles:?}"
        );
    }
    let vars: Vec<&str> = dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert!(vars.contains(&"upstream"), "per-upstream selection");
    for m in [
        "pullthrough_requests_total",
        "pullthrough_served_bytes_total",
        "pullthrough_upstream_request_duration_seconds_bucket",
        "pullthrough_cache_size_bytes",
    ] {
        assert!(used.contains(m), "dashboard does not show {m}");
    }
}

#[test]
fn values_match_their_schema_and_templates_use_only_existing_values() {
    let values: serde_yaml::Value =
        serde_yaml::from_str(&read("charts/pullthrough/values.yaml")).unwrap();
    // Every value path a template reads exists in values.yaml.
    let dir = root().join("charts/pullthrough/templates");
    let mut paths = BTreeSet::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
        let mut rest = text.as_str();
        while let Some(i) = rest.find(".Values.") {
            let tail = &rest[i + 8..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '.'))
                .unwrap_or(tail.len());
            paths.insert(tail[..end].trim_end_matches('.').to_string());
            rest = &tail[end..];
        }
    }
    assert!(paths.len() > 10, "{paths:?}");
    for p in &paths {
        let mut v = &values;
        for key in p.split('.') {
            v = v.get(key).unwrap_or_else(|| {
                panic!("templates read .Values.{p}, which values.yaml does not define")
            });
        }
    }
    // Every value is documented: a comment right above it or above one of its parents.
    let text = read("charts/pullthrough/values.yaml");
    let lines: Vec<&str> = text.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let is_key = |l: &str| {
        let t = l.trim_start();
        !t.is_empty() && !t.starts_with('#') && !t.starts_with('-') && t.contains(':')
    };
    let documented = |i: usize| i > 0 && lines[i - 1].trim_start().starts_with('#');
    for (i, line) in lines.iter().enumerate() {
        if !is_key(line) || line.trim_end().ends_with(':') {
            continue;
        }
        let mut ok = documented(i);
        let mut level = indent(line);
        let mut j = i;
        while !ok && j > 0 {
            j -= 1;
            if is_key(lines[j]) && indent(lines[j]) < level {
                level = indent(lines[j]);
                ok = documented(j);
            }
        }
        assert!(ok, "values.yaml line {} is not documented: {line}", i + 1);
    }
    let script = r#"
import json, sys, yaml, jsonschema
schema = json.load(open(sys.argv[1]))
jsonschema.Draft7Validator.check_schema(schema)
values = yaml.safe_load(open(sys.argv[2]))
errors = [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(values)]
bad = dict(values); bad["typo"] = 1
if not list(jsonschema.Draft7Validator(schema).iter_errors(bad)):
    errors.append("schema accepts unknown top-level keys")
print("\n".join(errors)); sys.exit(1 if errors else 0)
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(root().join("charts/pullthrough/values.schema.json"))
        .arg(root().join("charts/pullthrough/values.yaml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn deploy_manifests_pass_kubernetes_validation() {
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(root().join("deploy"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files.push(root().join("deploy/monitoring/dashboard.yaml"));
    for f in std::fs::read_dir(root().join("deploy/rewrite")).unwrap() {
        files.push(f.unwrap().path());
    }
    assert!(files.len() >= 6);
    let refs: Vec<&std::path::Path> = files.iter().map(|p| p.as_path()).collect();
    kubernetes_validate(&refs);
    // Security posture of the workloads.
    for file in ["deploy/03-controller.yaml", "deploy/04-node-agent.yaml"] {
        let w = &yaml_docs(file)[0];
        let c = &w["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(
            c["securityContext"]["readOnlyRootFilesystem"], true,
            "{file}"
        );
        assert_eq!(
            c["securityContext"]["allowPrivilegeEscalation"], false,
            "{file}"
        );
        assert!(c["resources"]["limits"]["memory"].is_string(), "{file}");
    }
    let agent = &yaml_docs("deploy/04-node-agent.yaml")[0];
    assert_eq!(
        agent["spec"]["template"]["spec"]["tolerations"][0]["operator"], "Exists",
        "every node"
    );
    let mounts = agent["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
        .as_sequence()
        .unwrap();
    assert!(
        mounts
            .iter()
            .any(|m| m["mountPath"] == "/host/containerd" && m["readOnly"] == true),
        "containerd config read-only"
    );
}

/// The rows of docs/metrics.md's table: the metrics each names, and their labels (the
/// backticked names outside parentheses in the labels column).
fn documented_metrics() -> Vec<(Vec<String>, BTreeSet<String>)> {
    let section = read("docs/metrics.md");
    let ticked = |text: &str| -> Vec<String> {
        text.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect()
    };
    section
        .lines()
        .filter(|l| l.starts_with("| `pullthrough_"))
        .map(|row| {
            let cols: Vec<&str> = row.split('|').collect();
            let mut depth = 0;
            let labels: String = cols[2]
                .chars()
                .filter(|c| {
                    match c {
                        '(' => depth += 1,
                        ')' => depth -= 1,
                        _ => return depth == 0,
                    }
                    false
                })
                .collect();
            (ticked(cols[1]), ticked(&labels).into_iter().collect())
        })
        .collect()
}

/// The label names of one exposition line (without a histogram's `le`).
fn label_names(series: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let Some((_, mut rest)) = series.split_once('{') else {
        return names;
    };
    while let Some((key, value)) = rest.split_once("=\"") {
        names.insert(key.trim_start_matches(',').to_string());
        rest = &value[value.find('"').expect("a closing quote") + 1..];
    }
    names.remove("le");
    names
}

#[tokio::test]
async fn the_metrics_table_is_what_each_role_exports_from_the_start() {
    use pullthrough::server::Ops as _;
    // Every role's metrics before anything happened: a proxy that has served nothing,
    // with an upstreamAuth upstream beside an open one.
    let mut config = crate::common::config_for(&[
        ("docker.io", "http://127.0.0.1:1"),
        ("private.example", "http://127.0.0.1:1"),
    ]);
    config.upstreams[1].access = Some(pullthrough::api::UpstreamAccess {
        mode: pullthrough::api::AccessMode::UpstreamAuth,
    });
    config.access.plain_http = true;
    let proxy = crate::common::Proxy::start_config(config).await;
    let mut text = proxy.metrics().await;
    // The per-mirror series appear with a mirror's first check.
    let controller = pullthrough::controller::ControllerMetrics::new();
    controller.set_workload_images("ns/mirror", Some(&[("cached", 1)]));
    text.push_str(&controller.render());
    text.push_str(&pullthrough::node_agent::AgentMetrics::new().metrics());
    proxy.stop().await;

    let mut documented = BTreeSet::new();
    for (names, labels) in documented_metrics() {
        for name in names {
            let series: Vec<&str> = text
                .lines()
                .filter(|l| !l.starts_with('#'))
                .filter(|l| {
                    let n = l.split(['{', ' ']).next().unwrap();
                    n == name
                        || ["_bucket", "_sum", "_count"]
                            .iter()
                            .any(|s| n.strip_suffix(s) == Some(&name))
                })
                .collect();
            assert!(!series.is_empty(), "{name} is not exported from the start");
            for s in series {
                assert_eq!(label_names(s), labels, "labels of {name} (docs): {s}");
            }
            documented.insert(name);
        }
    }
    let families: BTreeSet<String> = code_metric_names()
        .into_iter()
        .map(|n| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    n.strip_suffix(s)
                        .filter(|base| text.contains(&format!("# TYPE {base} histogram")))
                })
                .map_or(n.clone(), str::to_string)
        })
        .collect();
    assert_same_sets(
        &families,
        &documented,
        "metrics of the code",
        "docs/metrics.md",
    );
}

#[test]
fn the_architecture_lists_every_file() {
    let doc = read("docs/architecture.md");
    let tree = doc.split("\nsrc/\n").nth(1).expect("a src/ tree");
    let tree = tree.split("```").next().unwrap();
    let mut listed = BTreeSet::new();
    let mut dirs: Vec<&str> = Vec::new();
    for line in tree.lines().filter(|l| !l.trim().is_empty()) {
        let depth = (line.len() - line.trim_start().len()) / 2 - 1;
        let name = line.split_whitespace().next().unwrap();
        dirs.truncate(depth);
        match name.strip_suffix('/') {
            Some(dir) => dirs.push(dir),
            None => {
                let mut path = vec!["src"];
                path.extend(&dirs);
                path.push(name);
                listed.insert(path.join("/"));
            }
        }
    }
    fn walk(dir: &std::path::Path, out: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else {
                let rel = path.strip_prefix(root()).unwrap();
                out.insert(rel.to_string_lossy().into_owned());
            }
        }
    }
    let mut files = BTreeSet::new();
    walk(&root().join("src"), &mut files);
    assert_same_sets(&files, &listed, "src/", "docs/architecture.md's file list");
}

/// Fails with what only one side has, not both sets whole.
#[track_caller]
fn assert_same_sets(a: &BTreeSet<String>, b: &BTreeSet<String>, a_name: &str, b_name: &str) {
    let only_a: Vec<&String> = a.difference(b).collect();
    let only_b: Vec<&String> = b.difference(a).collect();
    assert!(
        only_a.is_empty() && only_b.is_empty(),
        "only in {a_name}: {only_a:?}; only in {b_name}: {only_b:?}"
    );
}

#[test]
fn the_configuration_example_is_valid_and_shows_every_field() {
    let section = read("docs/configuration.md");
    let block = section
        .split("```yaml\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a YAML example");
    let config = pullthrough::api::ProxyConfig::from_yaml(block)
        .unwrap_or_else(|e| panic!("docs/configuration.md's example does not parse: {e}"));
    config
        .validate()
        .expect("docs/configuration.md's example is valid");
    let keys = |text: &str| -> BTreeSet<String> {
        let v: serde_yaml::Value = serde_yaml::from_str(text).unwrap();
        v.as_mapping()
            .unwrap()
            .keys()
            .map(|k| k.as_str().unwrap().to_string())
            .collect()
    };
    // What the code writes back has no field the example leaves out.
    assert_same_sets(
        &keys(&config.to_yaml()),
        &keys(block),
        "the configuration",
        "docs/configuration.md's example",
    );
}

#[test]
fn the_readme_is_a_door_not_a_manual() {
    // What it is, the two commands, a first pull, install, links: depth goes to docs/.
    let readme = read("README.md");
    assert!(
        readme.len() <= 8 * 1024,
        "README.md is {} bytes",
        readme.len()
    );
    for link in readme.split("](").skip(1) {
        let target = link.split(')').next().unwrap();
        if !target.starts_with("http") {
            assert!(
                root().join(target).exists(),
                "README links {target}, not there"
            );
        }
    }
    let index = read("docs/README.md");
    for entry in std::fs::read_dir(root().join("docs")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".md") && name != "README.md" {
            assert!(
                index.contains(&format!("]({name})")),
                "docs/README.md omits {name}"
            );
        }
    }
}

#[test]
fn the_chart_s_mirror_example_is_a_mirror_that_runs() {
    let values = read("charts/pullthrough/values.yaml");
    // The commented example under `mirrors`, uncommented.
    let example: String = values
        .lines()
        .skip_while(|l| !l.starts_with("#   mirrors:"))
        .take_while(|l| l.starts_with("#  "))
        .map(|l| format!("{}\n", &l[1..]))
        .collect();
    let doc: serde_yaml::Value = serde_yaml::from_str(&example).expect("the example parses");
    let mirrors = doc["mirrors"].as_sequence().expect("a list of mirrors");
    assert!(!mirrors.is_empty(), "no example mirror");
    for m in mirrors {
        let spec: pullthrough::api::mirror::RegistryMirrorSpec =
            serde_yaml::from_value(m["spec"].clone()).expect("a RegistryMirror spec");
        let config = spec.proxy_config().expect("a spec the proxy can run");
        assert!(config.storage.s3.is_some(), "the example shares a bucket");
    }
    let template = read("charts/pullthrough/templates/mirrors.yaml");
    assert!(template.contains("range .Values.mirrors") && template.contains("toYaml .spec"));
}
