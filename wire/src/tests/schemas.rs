//! The checked-in JSON Schemas under `schemas/` are what the types generate.

use std::path::PathBuf;

fn schema_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../schemas")
}

#[test]
fn checked_in_schemas_are_up_to_date() {
    let dir = schema_dir();
    let update = std::env::var_os("UPDATE_SCHEMAS").is_some_and(|v| v == "1");
    let generated = crate::schemas();
    let mut stale = Vec::new();
    if update {
        std::fs::create_dir_all(&dir).expect("the schemas directory can be created");
    }
    for (name, text) in &generated {
        let path = dir.join(format!("{name}.schema.json"));
        if update {
            std::fs::write(&path, text)
                .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        } else if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            stale.push(format!("schemas/{name}.schema.json"));
        }
    }
    // A schema file that no type generates any more is stale too.
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            let Some(name) = file.strip_suffix(".schema.json") else {
                continue;
            };
            if !generated.iter().any(|(n, _)| *n == name) {
                if update {
                    std::fs::remove_file(entry.path())
                        .unwrap_or_else(|e| panic!("cannot remove schemas/{file}: {e}"));
                } else {
                    stale.push(format!("schemas/{file} (no message generates it)"));
                }
            }
        }
    }
    assert!(
        stale.is_empty(),
        "out of date: {}; run `UPDATE_SCHEMAS=1 cargo test -p gpu-coordinator-wire` to refresh",
        stale.join(", ")
    );
}

#[test]
fn every_message_has_a_schema() {
    let names: Vec<&str> = crate::schemas().iter().map(|(n, _)| *n).collect();
    assert_eq!(
        names,
        [
            "request",
            "release",
            "renew",
            "ack",
            "cancel",
            "reply",
            "control",
            "event",
            "status",
            "reader",
            "reader-answer",
            "node"
        ]
    );
    for (name, text) in crate::schemas() {
        assert!(
            text.ends_with("}\n"),
            "{name}: pretty JSON with a trailing newline"
        );
        let value: serde_json::Value = serde_json::from_str(&text).expect("a schema is JSON");
        assert_eq!(value["type"], "object", "{name}");
    }
}
