//! The layers: the file and the environment over the defaults, and the errors that name a key and
//! where it came from.

use super::*;

#[test]
fn file_overrides_defaults() {
    let config = load_str(
        r#"
        [nats]
        url = "nats://nats:4222"
        [lease]
        default_ms = 5000
        [http.tokens]
        secret-1 = "chat"
        [[gpus]]
        id = "0"
        vram_mb = 24576
        [[gpus]]
        id = "1"
        vram_mb = 12288
        "#,
        "file",
    )
    .expect("valid");
    assert_eq!(config.nats.url, "nats://nats:4222");
    assert_eq!(
        config.nats.prefix, "gpu",
        "keys not in the file keep their default"
    );
    assert_eq!(config.lease.default_ms, 5000);
    assert_eq!(config.lease.max_ms, 3_600_000);
    assert_eq!(
        config.http.tokens.get("secret-1").map(String::as_str),
        Some("chat")
    );
    assert_eq!(
        config.gpus,
        vec![
            GpuConfig {
                id: "0".into(),
                vram_mb: 24576
            },
            GpuConfig {
                id: "1".into(),
                vram_mb: 12288
            },
        ]
    );
}

#[test]
fn env_overrides_file_with_nesting() {
    let p = prefix("env");
    std::env::set_var(format!("{p}NATS__URL"), "nats://elsewhere:4222");
    std::env::set_var(format!("{p}LEASE__DEFAULT_MS"), "45000");
    std::env::set_var(format!("{p}PREEMPTION__ACK_DEADLINE_MS"), "2500");
    std::env::set_var(format!("{p}HTTP__LISTEN"), "0.0.0.0:9090");
    let file = toml_file(
        "[nats]\nurl = \"nats://file:4222\"\nprefix = \"edge\"\n[lease]\ndefault_ms = 1000\n",
    );
    let config = Config::load_with_env(Some(file.path()), &p).expect("valid");
    assert_eq!(config.nats.url, "nats://elsewhere:4222");
    assert_eq!(config.nats.prefix, "edge");
    assert_eq!(config.lease.default_ms, 45_000);
    assert_eq!(config.preemption.ack_deadline_ms, 2500);
    assert_eq!(config.http.listen, "0.0.0.0:9090");
}

#[test]
fn env_unknown_key_names_the_variable() {
    let p = prefix("envbad");
    std::env::set_var(format!("{p}LEASE__DEFAULT"), "1");
    let err = Config::load_with_env(None, &p).expect_err("unknown key");
    let msg = err.to_string();
    assert!(msg.contains("`lease.default`: unknown key"), "{msg}");
    assert!(
        msg.contains(&format!(
            "environment variable {p}LEASE__DEFAULT: `lease.default`: unknown key"
        )),
        "{msg}"
    );
}

#[test]
fn missing_file_is_an_error() {
    let err = Config::load_with_env(Some(Path::new("/nonexistent/gpu.toml")), &prefix("missing"))
        .expect_err("missing file");
    assert!(matches!(err, ConfigError::File { .. }));
    assert!(err.to_string().contains("/nonexistent/gpu.toml"), "{err}");
}

#[test]
fn unknown_key_names_key_and_file() {
    let file = toml_file("[lease]\ndefault_ms = 1000\nmax = 5\n");
    let err =
        Config::load_with_env(Some(file.path()), &prefix("unknown")).expect_err("unknown key");
    let msg = err.to_string();
    assert!(matches!(err, ConfigError::Parse(_)));
    let file = file.path().display();
    assert!(
        msg.contains(&format!("{file}: `lease.max`: unknown key")),
        "{msg}"
    );
    assert!(msg.contains("default_ms, max_ms"), "{msg}");
}

#[test]
fn wrong_type_names_key_and_file() {
    let file = toml_file("[lease]\ndefault_ms = \"soon\"\n");
    let err =
        Config::load_with_env(Some(file.path()), &prefix("wrongtype")).expect_err("wrong type");
    let msg = err.to_string();
    let file = file.path().display();
    assert!(
        msg.contains(&format!("{file}: `lease.default_ms`: invalid type")),
        "{msg}"
    );
}

#[test]
fn bad_toml_names_the_file() {
    let msg = parse_error("[lease\n", "badtoml");
    assert!(msg.contains(".toml"), "{msg}");
}

#[test]
fn gpu_missing_field_names_it() {
    let msg = parse_error("[[gpus]]\nid = \"0\"\n", "gpumissing");
    assert!(msg.contains("`gpus[0].vram_mb`: missing key"), "{msg}");
}
