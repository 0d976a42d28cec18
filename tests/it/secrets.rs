//! No secret of the configuration reaches the logs, even at `RUST_LOG=debug`: the real binary serves with
//! passwords in its NATS, Redis and Postgres URLs and an HTTP token, `status` asks it over NATS, and
//! neither's output holds any of them.

use std::process::{Command, Stdio};

use crate::support::{test_config, wait_ready};

const NATS_PASSWORD: &str = "nats-pw-5e7c1d";
const REDIS_PASSWORD: &str = "redis-pw-9a2b4f";
const PG_PASSWORD: &str = "pg-pw-3c8e0a";
const PG_QUERY_PASSWORD: &str = "pg-query-pw-6d1f72";
const HTTP_TOKEN: &str = "http-token-b4e9a0";

#[tokio::test]
async fn debug_logs_hold_no_secret() {
    let mut config = test_config("secrets", &[("0", 24_576)]);
    let port = gpu_coordinator_test_support::free_port();
    config.http.listen = format!("127.0.0.1:{port}");
    // The shared servers want no password: NATS and Postgres (trust) take the connection anyway, and the
    // leases stay in the process, as Redis would refuse one.
    let db = config.database.url.replace(
        "postgres://postgres@",
        &format!("postgres://postgres:{PG_PASSWORD}@"),
    );
    let dir = tempfile::tempdir().expect("a temporary directory");
    let file = dir.path().join("coordinator.toml");
    std::fs::write(
        &file,
        format!(
            "[nats]\nurl = \"{nats}\"\nprefix = \"{prefix}\"\n\
             [redis]\nurl = \"{redis}\"\n\
             [database]\nurl = \"{db}?password={PG_QUERY_PASSWORD}\"\n\
             [http]\nlisten = \"{listen}\"\n[http.tokens]\n{HTTP_TOKEN} = \"chat\"\n\
             [backends]\nleases = \"memory\"\n\
             [[gpus]]\nid = \"0\"\nvram_mb = 24576\n",
            prefix = config.nats.prefix,
            listen = config.http.listen,
            nats = config
                .nats
                .url
                .replacen("nats://", &format!("nats://svc:{NATS_PASSWORD}@"), 1),
            redis =
                config
                    .redis
                    .url
                    .replacen("redis://", &format!("redis://:{REDIS_PASSWORD}@"), 1),
        ),
    )
    .expect("the configuration file is written");

    let log = dir.path().join("serve.log");
    let mut serve = Command::new(env!("CARGO_BIN_EXE_gpu-coordinator"))
        .args(["--config", file.to_str().expect("a UTF-8 path"), "serve"])
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("the log file is created"))
        .spawn()
        .expect("start gpu-coordinator serve");
    wait_ready(&config).await;
    let status = Command::new(env!("CARGO_BIN_EXE_gpu-coordinator"))
        .args(["--config", file.to_str().expect("a UTF-8 path"), "status"])
        .env("RUST_LOG", "debug")
        .output()
        .expect("run gpu-coordinator status");
    let _ = serve.kill();
    let _ = serve.wait();

    let serve_log = std::fs::read_to_string(&log).expect("the log is readable");
    let status_log = format!(
        "{}{}",
        String::from_utf8_lossy(&status.stdout),
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(status.status.success(), "{status_log}");
    for (what, text) in [("serve", &serve_log), ("status", &status_log)] {
        assert!(
            text.contains("configuration loaded"),
            "{what} logged its configuration at debug:\n{text}"
        );
        for secret in [
            NATS_PASSWORD,
            REDIS_PASSWORD,
            PG_PASSWORD,
            PG_QUERY_PASSWORD,
            HTTP_TOKEN,
        ] {
            let leaks: Vec<&str> = text.lines().filter(|l| l.contains(secret)).collect();
            assert!(
                leaks.is_empty(),
                "{what} logged {secret}:\n{}",
                leaks.join("\n")
            );
        }
    }
    // What is not secret stays readable.
    assert!(serve_log.contains("chat"), "{serve_log}");
}
