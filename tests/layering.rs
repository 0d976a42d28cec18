//! The layering of the crate, held by a test: which top-level module may use which (`crate::<module>`
//! in code, comments and test modules aside). The rule, lowest first:
//!
//! - `clock`, `telemetry`, `sync`: use nothing of the crate;
//! - `ports` (the traits the driver needs) and `retry` (waiting for a server): the lowest layers;
//! - `urls` (the servers' URLs parsed): on `telemetry` alone;
//! - `storage`, `render`, `metrics`, `config`: use the layers below;
//! - `adapters` implement the ports: never the driver, the app, the audit or the configuration (the
//!   app gives each its settings);
//! - `driver` drives the core through the ports: never the adapters, the app or the audit;
//! - `audit` checks a history it reads through the `Gateway` port: the app opens the backends for it;
//! - `engines`, `app` (the composition root), `demo`, `nats_auth`, `cli`: above.
//!
//! What breaks the rule for a while is listed in [`KNOWN`] (nothing today), each with where it should
//! go; the test fails on any other use against the rule, and on an entry of [`KNOWN`] that is no
//! longer true (so the list only shrinks).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The modules each module may use (besides itself).
const ALLOWED: &[(&str, &[&str])] = &[
    ("clock", &[]),
    ("sync", &[]),
    ("telemetry", &[]),
    ("ports", &[]),
    ("retry", &["ports"]),
    ("storage", &["ports", "retry", "sync"]),
    ("render", &["ports"]),
    ("metrics", &["ports", "render", "sync"]),
    ("urls", &["telemetry"]),
    ("config", &["telemetry", "engines", "urls"]),
    (
        "adapters",
        &[
            "ports",
            "retry",
            "clock",
            "telemetry",
            "storage",
            "metrics",
            "render",
            "engines",
            "sync",
            "urls",
        ],
    ),
    (
        "driver",
        &["ports", "retry", "clock", "metrics", "render", "storage"],
    ),
    ("audit", &["ports"]),
];

/// Uses against the rule that are known, `(module, what it uses)`, each to be moved.
const KNOWN: &[(&str, &str, &str)] = &[];

/// The `.rs` files under `dir`.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("the source directory is readable") {
            let path = entry.expect("an entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files
}

/// The top-level module a file of `src/` belongs to (`src/adapters/http/mod.rs`: `adapters`).
fn module_of(src: &Path, file: &Path) -> String {
    let relative = file.strip_prefix(src).expect("under src");
    let first = relative
        .components()
        .next()
        .expect("a component")
        .as_os_str()
        .to_string_lossy()
        .into_owned();
    first.trim_end_matches(".rs").to_owned()
}

/// Each `crate::<module>[::<sub>]` the code of `text` names: comments and test modules left out.
fn uses(text: &str) -> BTreeSet<(String, Option<String>)> {
    let mut found = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or_default();
        if line.trim_start().starts_with("#[cfg(test)]") {
            break;
        }
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let path: Vec<&str> = rest
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .next()
                .unwrap_or_default()
                .split("::")
                .collect();
            if let Some(module) = path.first().filter(|m| !m.is_empty()) {
                let sub = path.get(1).filter(|s| !s.is_empty()).map(|s| s.to_string());
                found.insert((module.to_string(), sub));
            }
        }
    }
    found
}

#[test]
fn each_module_uses_only_the_layers_it_may() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut broken = Vec::new();
    let mut known_seen = BTreeSet::new();
    for file in sources(&src) {
        let module = module_of(&src, &file);
        let Some((_, allowed)) = ALLOWED.iter().find(|(m, _)| *m == module) else {
            continue;
        };
        // A test module of its own file (`tests.rs`, or a `tests/` folder) may use the test doubles.
        let in_tests = file
            .strip_prefix(&src)
            .is_ok_and(|p| p.components().any(|c| c.as_os_str() == "tests"));
        if in_tests || file.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("a readable source file");
        for (used, sub) in uses(&text) {
            if used == module || allowed.contains(&used.as_str()) {
                continue;
            }
            let known = KNOWN.iter().find(|(m, what, _)| {
                *m == module
                    && (*what == used
                        || sub
                            .as_deref()
                            .is_some_and(|s| *what == format!("{used}::{s}")))
            });
            match known {
                Some((m, what, _)) => {
                    known_seen.insert((*m, *what));
                }
                None => broken.push(format!(
                    "{} uses crate::{used}{}: `{module}` may use only {allowed:?}",
                    file.strip_prefix(&src).unwrap_or(&file).display(),
                    sub.map(|s| format!("::{s}")).unwrap_or_default()
                )),
            }
        }
    }
    assert!(
        broken.is_empty(),
        "uses against the layering:\n{}",
        broken.join("\n")
    );
    let gone: Vec<String> = KNOWN
        .iter()
        .filter(|(m, what, _)| !known_seen.contains(&(*m, *what)))
        .map(|(m, what, why)| format!("{m} -> {what} ({why})"))
        .collect();
    assert!(
        gone.is_empty(),
        "no longer true, remove from KNOWN: {}",
        gone.join("; ")
    );
}

#[test]
fn uses_are_read_from_code_only() {
    let text = "use crate::ports::Bus; // crate::app\n/// [`x`](crate::driver::X)\n\
                fn f() { crate::retry::backoff(); }\n#[cfg(test)]\nmod tests { use crate::app; }\n";
    let found = uses(text);
    let names: Vec<&str> = found.iter().map(|(m, _)| m.as_str()).collect();
    assert_eq!(names, ["ports", "retry"]);
}
