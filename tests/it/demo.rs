//! `gpu-coordinator demo`, run as a user runs it: embedded with no server reachable (the README's first
//! command on a fresh machine), and `--distributed` against the servers on loopback.

use std::process::{Command, Output};

/// A number after `label` on a line of the summary.
fn figure(out: &str, label: &str) -> u64 {
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with(label))
        .unwrap_or_else(|| panic!("no `{label}` line in:\n{out}"));
    line[line.find(label).expect("found") + label.len()..]
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no figure on `{line}`"))
}

/// Whether `unshare -n` can give a process a network of its own (root, or user namespaces).
fn can_unshare() -> bool {
    Command::new("unshare")
        .args(["-n", "true"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// With no server anywhere: in a network namespace of its own with only loopback up (where the
/// machine allows it), and with every server's address a closed port besides.
#[test]
fn the_demo_needs_no_server() {
    let bin = env!("CARGO_BIN_EXE_gpu-coordinator");
    let demo = format!("{bin} demo --duration 5 --speed 10");
    let mut command = if can_unshare() {
        let mut c = Command::new("unshare");
        c.args([
            "-n",
            "sh",
            "-c",
            &format!("ip link set lo up 2>/dev/null; exec {demo}"),
        ]);
        c
    } else {
        eprintln!("unshare -n is not allowed here: the servers' ports are closed instead");
        let mut c = Command::new(bin);
        c.args(["demo", "--duration", "5", "--speed", "10"]);
        c
    };
    let closed = gpu_coordinator_test_support::free_port();
    let output = command
        .env(
            "GPU_COORDINATOR_NATS__URL",
            format!("nats://127.0.0.1:{closed}"),
        )
        .env(
            "GPU_COORDINATOR_REDIS__URL",
            format!("redis://127.0.0.1:{closed}"),
        )
        .env(
            "GPU_COORDINATOR_DATABASE__URL",
            format!("postgres://postgres@127.0.0.1:{closed}/none"),
        )
        .env("RUST_LOG", "warn")
        .output()
        .expect("run gpu-coordinator demo");
    let out = check_story(&output);
    assert!(out.contains("embedded, no server needed"), "{out}");
}

#[test]
fn the_distributed_demo_plays_a_preemption_and_summarises_it() {
    use crate::support::{NATS_URL, PG_SERVER, REDIS_URL};
    // On the suite's servers (the demo names a database and subjects of its own on them).
    let output = Command::new(env!("CARGO_BIN_EXE_gpu-coordinator"))
        .args(["demo", "--distributed", "--duration", "5", "--speed", "10"])
        .env("GPU_COORDINATOR_NATS__URL", NATS_URL.as_str())
        .env("GPU_COORDINATOR_REDIS__URL", REDIS_URL.as_str())
        .env(
            "GPU_COORDINATOR_DATABASE__URL",
            format!("{}/gpu_coordinator", *PG_SERVER),
        )
        .env("RUST_LOG", "warn")
        .output()
        .expect("run gpu-coordinator demo");
    let out = check_story(&output);
    assert!(out.contains("distributed (NATS"), "{out}");
}

/// Checks the timeline and the summary of a demo run; returns what it printed.
fn check_story(output: &Output) -> String {
    let out = String::from_utf8_lossy(&output.stdout);
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the demo failed:\n{out}\n{err}");
    // The timeline shows the story: chat asks, the ASR worker is paused, ACKs, chat gets the GPU.
    let chat_asks = out.find("chat-1       asks for the GPU").expect(&out);
    let pause = out.find("asr-1        PAUSE ordered").expect(&out);
    let ack = out.find("asr-1        ACK paused").expect(&out);
    let grant = out.find("chat-1       GRANTED").expect(&out);
    assert!(chat_asks < pause && pause < ack && ack < grant, "{out}");
    assert!(figure(&out, "preemptions:") >= 1, "{out}");
    assert!(figure(&out, "chat messages:") >= 1, "{out}");
    assert!(figure(&out, "chunks transcribed:") >= 1, "{out}");
    assert_eq!(figure(&out, "revocations:"), 0, "{out}");
    assert_eq!(figure(&out, "rejections:"), 0, "{out}");
    assert!(out.contains("time to GPU p50"), "{out}");
    assert!(out.contains("result: ok, no protocol error"), "{out}");
    assert!(
        out.contains("audit:                every rule held"),
        "{out}"
    );
    out.into_owned()
}

/// `gpu-coordinator gpus` needs no server: here, without NVML, it shows the configured GPUs.
#[test]
fn the_gpus_command_shows_what_the_coordinator_would_manage() {
    let output = Command::new(env!("CARGO_BIN_EXE_gpu-coordinator"))
        .args(["gpus", "--json"])
        .env(
            "GPU_COORDINATOR_GPUS",
            r#"[{id="a",vram_mb=1000},{id="b",vram_mb=2000}]"#,
        )
        .env("GPU_COORDINATOR_NVML__ENABLED", "false")
        .output()
        .expect("run gpu-coordinator gpus");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let view: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let gpus = view["status"]["gpus"].as_array().expect("gpus");
    let ids: Vec<(&str, u64)> = gpus
        .iter()
        .map(|g| (g["id"].as_str().unwrap(), g["total_mb"].as_u64().unwrap()))
        .collect();
    assert_eq!(ids, [("a", 1000), ("b", 2000)]);
    assert_eq!(view["status"]["vram_source"], "config");
}
