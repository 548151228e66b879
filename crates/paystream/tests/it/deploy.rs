//! deploy/ cannot be run here (no Docker), so it is checked statically: the
//! YAML parses, every PAYSTREAM_* variable it sets is one paystream reads,
//! every image is the workspace's version, and every component it runs is
//! a real subcommand.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

fn root() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn known_env() -> BTreeSet<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_paystream"))
        .arg("env")
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Every string in the document that looks like a PAYSTREAM_* name (keys
/// of environment maps, ConfigMap/Secret data, `name:` of env entries).
fn env_names(v: &serde_yaml::Value, out: &mut BTreeSet<String>) {
    match v {
        serde_yaml::Value::Mapping(m) => {
            for (k, v) in m {
                if let Some(k) = k.as_str().filter(|k| k.starts_with("PAYSTREAM_")) {
                    out.insert(k.to_owned());
                }
                if k.as_str() == Some("name")
                    && let Some(n) = v.as_str().filter(|n| n.starts_with("PAYSTREAM_"))
                {
                    out.insert(n.to_owned());
                }
                env_names(v, out);
            }
        }
        serde_yaml::Value::Sequence(s) => s.iter().for_each(|v| env_names(v, out)),
        serde_yaml::Value::Tagged(t) => env_names(&t.value, out),
        _ => {}
    }
}

fn images(v: &serde_yaml::Value, out: &mut BTreeSet<String>) {
    match v {
        serde_yaml::Value::Mapping(m) => {
            for (k, v) in m {
                if k.as_str() == Some("image")
                    && let Some(i) = v.as_str()
                {
                    out.insert(i.to_owned());
                }
                images(v, out);
            }
        }
        serde_yaml::Value::Sequence(s) => s.iter().for_each(|v| images(v, out)),
        _ => {}
    }
}

fn docs(path: &str) -> Vec<serde_yaml::Value> {
    let text = std::fs::read_to_string(root().join(path)).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            let mut v: serde_yaml::Value =
                serde::Deserialize::deserialize(d).unwrap_or_else(|e| panic!("{path}: {e}"));
            v.apply_merge().unwrap();
            v
        })
        .collect()
}

#[test]
fn deploy_files_parse_and_use_only_settings_paystream_reads() {
    let known = known_env();
    assert!(known.contains("PAYSTREAM_BROKERS") && known.contains("PAYSTREAM_DATABASE_URL"));
    for path in ["deploy/compose.yaml", "deploy/k8s/paystream.yaml"] {
        let mut used = BTreeSet::new();
        let mut imgs = BTreeSet::new();
        for d in docs(path) {
            env_names(&d, &mut used);
            images(&d, &mut imgs);
        }
        assert!(!used.is_empty(), "{path} sets no PAYSTREAM_* variable");
        let unknown: Vec<_> = used.difference(&known).collect();
        assert!(
            unknown.is_empty(),
            "{path} sets variables paystream does not read: {unknown:?}"
        );
        let ours: Vec<_> = imgs.iter().filter(|i| i.starts_with("paystream")).collect();
        assert!(!ours.is_empty());
        for i in ours {
            assert_eq!(
                i,
                &format!("paystream:{}", env!("CARGO_PKG_VERSION")),
                "{path}"
            );
        }
    }
}

#[test]
fn compose_runs_real_subcommands() {
    let d = &docs("deploy/compose.yaml")[0];
    let services = d["services"].as_mapping().unwrap();
    let mut commands = BTreeSet::new();
    for (_, s) in services {
        if let Some(cmd) = s["command"].as_sequence() {
            let args: Vec<&str> = cmd.iter().filter_map(|a| a.as_str()).collect();
            commands.insert(args.join(" "));
        }
    }
    assert!(
        commands.contains("serve handler")
            && commands.contains("serve executor")
            && commands.contains("serve projections")
            && commands.contains("serve reconciler"),
        "{commands:?}"
    );
    // The Kubernetes containers' args too (Deployments, the topic Job, the
    // reconciler CronJob).
    fn container_args(v: &serde_yaml::Value, out: &mut BTreeSet<String>) {
        match v {
            serde_yaml::Value::Mapping(m) => {
                for (k, v) in m {
                    if k.as_str() == Some("args")
                        && let Some(a) = v.as_sequence()
                    {
                        let a: Vec<&str> = a.iter().filter_map(|a| a.as_str()).collect();
                        out.insert(a.join(" "));
                    }
                    container_args(v, out);
                }
            }
            serde_yaml::Value::Sequence(s) => s.iter().for_each(|v| container_args(v, out)),
            _ => {}
        }
    }
    let mut k8s = BTreeSet::new();
    for d in docs("deploy/k8s/paystream.yaml") {
        container_args(&d, &mut k8s);
    }
    assert!(k8s.contains("serve reconciler --once"), "{k8s:?}");
    commands.extend(k8s);
    for c in commands {
        let mut args: Vec<&str> = c.split(' ').collect();
        args.push("--help");
        let out = Command::new(env!("CARGO_BIN_EXE_paystream"))
            .args(&args)
            .output()
            .unwrap();
        assert!(out.status.success(), "`paystream {c}` is not a subcommand");
    }
}

#[test]
fn the_dashboard_uses_exactly_the_exported_metric_names() {
    let text = std::fs::read_to_string(root().join("deploy/grafana/paystream.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut used = BTreeSet::new();
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if let Some(name) = word.strip_prefix("paystream_") {
                    // Histograms are queried through their _bucket series.
                    let base = name.strip_suffix("_bucket").unwrap_or(name);
                    used.insert(format!("paystream_{base}"));
                }
            }
        }
    }
    let exported: BTreeSet<String> = streaming::metrics::NAMES
        .iter()
        .map(|n| (*n).to_owned())
        .collect();
    let unknown: Vec<_> = used.difference(&exported).collect();
    assert!(
        unknown.is_empty(),
        "dashboard queries metrics paystream does not export: {unknown:?}"
    );
    let unused: Vec<_> = exported.difference(&used).collect();
    assert!(
        unused.is_empty(),
        "exported metrics missing from the dashboard: {unused:?}"
    );
}

/// The validators scripts/lib.sh installs next to the interop Python
/// (`ensure_python`): check-jsonschema with the Compose spec's schema and
/// kubernetes-validate with Kubernetes' own schemas.
fn validator(name: &str) -> std::path::PathBuf {
    let python = std::env::var("PAYSTREAM_PYTHON").unwrap_or_else(|_| {
        panic!(
            "PAYSTREAM_PYTHON is not set: run the tests with scripts/test.sh (it installs {name})"
        )
    });
    let bin = Path::new(&python).parent().unwrap().join(name);
    assert!(
        bin.exists(),
        "{} missing: run scripts/test.sh",
        bin.display()
    );
    bin
}

fn validate(file: &Path) -> (bool, String) {
    let is_compose = file
        .file_name()
        .is_some_and(|n| n.to_string_lossy().contains("compose"));
    let out = if is_compose {
        Command::new(validator("check-jsonschema"))
            .args(["--builtin-schema", "vendor.compose-spec"])
            .arg(file)
            .output()
    } else {
        Command::new(validator("kubernetes-validate"))
            .arg("--strict")
            .arg(file)
            .output()
    }
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn deploy_files_pass_the_compose_and_kubernetes_schemas() {
    for f in ["deploy/compose.yaml", "deploy/k8s/paystream.yaml"] {
        let (ok, text) = validate(&root().join(f));
        assert!(ok, "{f} does not validate:\n{text}");
    }
    // The validators do reject what is wrong: a misspelt service key and a
    // replica count of the wrong type.
    let dir = tempfile::tempdir().unwrap();
    let compose = std::fs::read_to_string(root().join("deploy/compose.yaml")).unwrap();
    let bad = dir.path().join("compose.yaml");
    std::fs::write(&bad, compose.replacen("    image:", "    imagez:", 1)).unwrap();
    let (ok, text) = validate(&bad);
    assert!(!ok && text.contains("imagez"), "{text}");
    let k8s = std::fs::read_to_string(root().join("deploy/k8s/paystream.yaml")).unwrap();
    assert!(
        k8s.contains("  replicas: 2"),
        "the manifest changed; adjust this test"
    );
    let bad = dir.path().join("paystream.yaml");
    std::fs::write(
        &bad,
        k8s.replacen("  replicas: 2", "  replicas: \"two\"", 1),
    )
    .unwrap();
    let (ok, text) = validate(&bad);
    assert!(!ok && text.contains("replicas"), "{text}");
}
