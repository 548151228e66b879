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
    let exported: BTreeSet<String> = runtime::metrics::NAMES
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

/// Values that were once defaults or are placeholders; none may appear in
/// deploy/ (compared ignoring case).
const WELL_KNOWN: &[&str] = &["sk_test_default", "whsec_default", "change-me", "changeme"];

/// Environment settings that hold secrets.
fn is_secret_setting(name: &str) -> bool {
    let n = name.to_ascii_uppercase();
    ["PASSWORD", "SECRET", "API_KEY", "TOKEN"]
        .iter()
        .any(|w| n.contains(w))
}

/// Where a compose file or a Kubernetes manifest writes a secret itself:
/// a secret setting whose value is not a required variable
/// (`${VAR:?message}`), a database URL with a literal password, a
/// Kubernetes Secret with data, an env entry of a secret setting with a
/// literal `value`, and any well-known default anywhere.
fn literal_secrets(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let lower = text.to_ascii_lowercase();
    for w in WELL_KNOWN {
        if lower.contains(w) {
            found.insert(format!("well-known value {w:?}"));
        }
    }
    let required = |v: &str| v.starts_with("${") && v.contains(":?") && v.ends_with('}');
    fn walk(v: &serde_yaml::Value, out: &mut Vec<(String, serde_yaml::Value)>) {
        match v {
            serde_yaml::Value::Mapping(m) => {
                for (k, v) in m {
                    if let Some(k) = k.as_str() {
                        out.push((k.to_owned(), v.clone()));
                    }
                    walk(v, out);
                }
            }
            serde_yaml::Value::Sequence(s) => s.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    for d in serde_yaml::Deserializer::from_str(text) {
        let mut doc: serde_yaml::Value = serde::Deserialize::deserialize(d).unwrap();
        doc.apply_merge().unwrap();
        if doc["kind"].as_str() == Some("Secret")
            && (!doc["data"].is_null() || !doc["stringData"].is_null())
        {
            found.insert(format!("a Secret with data: {:?}", doc["metadata"]["name"]));
        }
        let mut pairs = Vec::new();
        walk(&doc, &mut pairs);
        for (k, v) in &pairs {
            let Some(value) = v.as_str() else { continue };
            if is_secret_setting(k) && !required(value) {
                found.insert(format!("{k} is written as a literal"));
            }
            if let Some(rest) = value
                .strip_prefix("postgres://")
                .or_else(|| value.strip_prefix("postgresql://"))
                && let Some((auth, _)) = rest.split_once('@')
                && let Some((_, password)) = auth.split_once(':')
                && !required(password)
            {
                found.insert(format!("{k} has a literal password"));
            }
        }
        // Kubernetes env entries: {name: SECRET_SETTING, value: "..."}.
        fn env_entries(v: &serde_yaml::Value, found: &mut BTreeSet<String>) {
            match v {
                serde_yaml::Value::Mapping(m) => {
                    if let (Some(name), Some(_)) =
                        (m.get("name").and_then(|n| n.as_str()), m.get("value"))
                        && is_secret_setting(name)
                    {
                        found.insert(format!("env {name} has a literal value"));
                    }
                    m.values().for_each(|v| env_entries(v, found));
                }
                serde_yaml::Value::Sequence(s) => s.iter().for_each(|v| env_entries(v, found)),
                _ => {}
            }
        }
        env_entries(&doc, &mut found);
    }
    found
}

#[test]
fn no_secret_is_written_in_deploy() {
    // Every file, not only the manifests: no well-known default anywhere.
    fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                files(&p, out);
            } else {
                out.push(p);
            }
        }
    }
    let mut all = Vec::new();
    files(&root().join("deploy"), &mut all);
    assert!(all.len() > 5, "{all:?}");
    for f in &all {
        // The operator's own .env (ignored by git), and the guide, which
        // names the values that are refused.
        if f.file_name().is_some_and(|n| n == ".env") || f.extension().is_some_and(|e| e == "md") {
            continue;
        }
        let text = std::fs::read_to_string(f).unwrap();
        let lower = text.to_ascii_lowercase();
        for w in WELL_KNOWN {
            assert!(!lower.contains(w), "{} contains {w:?}", f.display());
        }
    }
    for path in ["deploy/compose.yaml", "deploy/k8s/paystream.yaml"] {
        let text = std::fs::read_to_string(root().join(path)).unwrap();
        let found = literal_secrets(&text);
        assert!(found.is_empty(), "{path}: {found:?}");
    }
    // The secret settings come from somewhere: required variables in
    // compose, secretKeyRefs in Kubernetes.
    let compose = std::fs::read_to_string(root().join("deploy/compose.yaml")).unwrap();
    for v in [
        "PAYSTREAM_PSP_API_KEY",
        "PAYSTREAM_PSP_WEBHOOK_SECRET",
        "POSTGRES_PASSWORD",
    ] {
        assert!(compose.contains(&format!("${{{v}:?")), "{v}");
    }
    let k8s = std::fs::read_to_string(root().join("deploy/k8s/paystream.yaml")).unwrap();
    assert_eq!(k8s.matches("secretKeyRef").count(), 3, "{k8s}");

    // The check does catch literals: the old defaults put back, a password
    // in the database URL, a Secret with data, a literal env value.
    let bad = compose.replacen(
        "${PAYSTREAM_PSP_API_KEY:?set PAYSTREAM_PSP_API_KEY (see deploy/README.md, Secrets)}",
        "0123456789abcdef0123456789abcdef",
        1,
    );
    let set = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<BTreeSet<_>>();
    assert_eq!(
        literal_secrets(&bad),
        set(&["PAYSTREAM_PSP_API_KEY is written as a literal"])
    );
    let bad = compose.replacen(
        "paystream:${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD (see deploy/README.md, Secrets)}@",
        "paystream:hunter2@",
        1,
    );
    assert_eq!(
        literal_secrets(&bad),
        set(&["PAYSTREAM_DATABASE_URL has a literal password"])
    );
    let bad = format!(
        "{k8s}---\napiVersion: v1\nkind: Secret\nmetadata: {{name: x}}\nstringData: {{a: b}}\n"
    );
    assert_eq!(
        literal_secrets(&bad),
        set(&["a Secret with data: String(\"x\")"])
    );
    let bad = k8s.replacen(
        "              valueFrom:\n                secretKeyRef: {name: paystream-psp, key: api-key}",
        "              value: \"whsec_default\"",
        1,
    );
    assert_eq!(
        literal_secrets(&bad),
        set(&[
            "well-known value \"whsec_default\"",
            "env PAYSTREAM_PSP_API_KEY has a literal value"
        ])
    );
}

/// `serve executor`, `serve reconciler` and `serve psp-sim` refuse to start
/// without a PSP key and webhook secret, or with a short or well-known one,
/// and say how to make one (before touching a database or a broker).
#[test]
fn components_refuse_missing_or_weak_secrets() {
    let good = "4f1c2a9be07d35e8a6b1c9d0e2f3a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5";
    let run = |args: &[&str], key: Option<&str>, secret: Option<&str>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_paystream"));
        c.args(args)
            .env_remove("PAYSTREAM_PSP_API_KEY")
            .env_remove("PAYSTREAM_PSP_WEBHOOK_SECRET")
            // Nothing listens here: reaching it would hang or fail otherwise.
            .env("PAYSTREAM_BROKERS", "127.0.0.1:1")
            .env(
                "PAYSTREAM_DATABASE_URL",
                "postgres://nobody@127.0.0.1:1/none",
            );
        if let Some(k) = key {
            c.env("PAYSTREAM_PSP_API_KEY", k);
        }
        if let Some(s) = secret {
            c.env("PAYSTREAM_PSP_WEBHOOK_SECRET", s);
        }
        let out = c.output().unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let sim_db = format!("sqlite://{}", dir.path().join("psp.db").display());
    let components: [&[&str]; 3] = [
        &["serve", "executor", "--listen", "127.0.0.1:0"],
        &["serve", "reconciler", "--once"],
        &[
            "serve",
            "psp-sim",
            "--listen",
            "127.0.0.1:0",
            "--db",
            &sim_db,
        ],
    ];
    for args in components {
        let needs_secret = args[1] != "reconciler";
        for (key, secret, expect) in [
            (None, Some(good), "PAYSTREAM_PSP_API_KEY is required"),
            (Some(""), Some(good), "PAYSTREAM_PSP_API_KEY"),
            (Some("sk_test_default"), Some(good), "well-known"),
            (Some("k3y-0123456789"), Some(good), "at least 32"),
        ] {
            let (ok, text) = run(args, key, secret);
            assert!(!ok, "{args:?} started with key {key:?}");
            assert!(text.contains(expect), "{args:?} {key:?}: {text}");
            assert!(text.contains("openssl rand -hex 32"), "{args:?}: {text}");
            if let Some(k) = key.filter(|k| !k.is_empty()) {
                assert!(!text.contains(k), "{args:?} printed the key: {text}");
            }
        }
        if needs_secret {
            for (secret, expect) in [
                (None, "PAYSTREAM_PSP_WEBHOOK_SECRET is required"),
                (Some("whsec_default"), "well-known"),
                (Some("change-me"), "well-known"),
            ] {
                let (ok, text) = run(args, Some(good), secret);
                assert!(!ok, "{args:?} started with secret {secret:?}");
                assert!(text.contains(expect), "{args:?} {secret:?}: {text}");
            }
        }
    }
}
