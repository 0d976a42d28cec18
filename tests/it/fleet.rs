//! A fleet of GPU hosts behind one coordinator: node agents (real `gpu-coordinator agent` processes,
//! simulated GPUs) report their hosts, requests are placed across them or pinned to one, an agent
//! killed with SIGKILL makes its host unreachable (no new grants there, its holders keep their
//! leases), and a restarted coordinator or a standby that takes over hears the hosts again.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use gpu_coordinator::config::Config;
use gpu_coordinator_wire::{HostState, StatusDoc};
use serde_json::json;

use crate::support::{eventually, test_config, Coordinator, Probe};

/// How long a silent host stays reachable here.
const TTL_MS: u64 = 1_500;

/// A node agent as a real process, reporting simulated GPUs of `vram_mb` each.
pub struct Agent {
    child: Child,
}

impl Agent {
    pub fn start(config: &Config, host: &str, gpus: &[(&str, u64)]) -> Agent {
        let gpus = gpus
            .iter()
            .map(|(id, mb)| format!("{{id=\"{id}\",vram_mb={mb}}}"))
            .collect::<Vec<_>>()
            .join(",");
        let child = Command::new(env!("CARGO_BIN_EXE_gpu-coordinator"))
            .arg("agent")
            .env("GPU_COORDINATOR_NATS__URL", &config.nats.url)
            .env("GPU_COORDINATOR_NATS__PREFIX", &config.nats.prefix)
            .env("GPU_COORDINATOR_AGENT__HOST", host)
            .env("GPU_COORDINATOR_NVML__ENABLED", "false")
            .env("GPU_COORDINATOR_NVML__SAMPLE_MS", "200")
            .env("GPU_COORDINATOR_GPUS", format!("[{gpus}]"))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start gpu-coordinator agent");
        Agent { child }
    }

    /// SIGKILL.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn fleet_config(tag: &str) -> Config {
    let mut config = test_config(tag, &[]);
    config.nodes.agents = true;
    config.nodes.ttl_ms = TTL_MS;
    config
}

pub fn host_state(status: &StatusDoc, host: &str) -> Option<HostState> {
    status
        .hosts
        .iter()
        .find(|h| h.host == host)
        .map(|h| h.state)
}

/// Waits until the status shows every host of `hosts` in `state`.
async fn hosts_are(probe: &Probe, hosts: &[&str], state: HostState) -> StatusDoc {
    eventually(&format!("hosts {hosts:?} {state:?}"), || async {
        let status = probe.status().await;
        hosts
            .iter()
            .all(|h| host_state(&status, h) == Some(state))
            .then_some(status)
    })
    .await
}

/// The holders of GPU `gpu` in `status`, by request id.
fn holders(status: &StatusDoc, gpu: &str) -> Vec<String> {
    status
        .gpus
        .iter()
        .filter(|g| g.id == gpu)
        .flat_map(|g| g.holders.iter().map(|h| h.request_id.clone()))
        .collect()
}

#[tokio::test]
async fn three_hosts_share_one_queue_and_a_silent_host_takes_no_new_grants() {
    let config = fleet_config("fleet_three");
    let coordinator = Coordinator::start(config.clone()).await;
    let probe = Probe::new(&config.nats.url, &config.nats.prefix).await;
    let mut probe = probe;
    let _h1 = Agent::start(&config, "h1", &[("0", 24_000)]);
    let _h2 = Agent::start(&config, "h2", &[("0", 24_000)]);
    let h3 = Agent::start(&config, "h3", &[("0", 24_000)]);
    let status = hosts_are(&probe, &["h1", "h2", "h3"], HostState::Up).await;
    let ids: Vec<&str> = status.gpus.iter().map(|g| g.id.as_str()).collect();
    assert_eq!(ids, ["h1/0", "h2/0", "h3/0"]);
    assert!(status.gpus.iter().all(|g| g.reachable == Some(true)));

    // Placement over the fleet: one whole GPU on each host.
    for i in 1..=3 {
        let body = json!({"request_id": format!("bg-{i}"), "priority": 2, "lease_ms": 120_000});
        probe.pub_json("request", "bg", body).await;
    }
    let mut placed = Vec::new();
    for i in 1..=3 {
        placed.push(probe.reply(&format!("bg-{i}"), "granted").await.gpu);
    }
    placed.sort();
    assert_eq!(
        placed,
        [
            Some("h1/0".into()),
            Some("h2/0".into()),
            Some("h3/0".into())
        ]
    );

    // Pinned to h2, urgent: the holder on h2 is asked to pause, no other.
    let status = probe.status().await;
    let on_h2 = holders(&status, "h2/0")[0].clone();
    probe
        .pub_json(
            "request",
            "chat",
            json!({"request_id": "chat-1", "priority": 0, "host": "h2"}),
        )
        .await;
    let pause = probe.control(&on_h2, "pause").await;
    probe
        .pub_json(
            "ack",
            "bg",
            json!({"request_id": on_h2, "fence": pause.fence, "action": "paused"}),
        )
        .await;
    let chat = probe.reply("chat-1", "granted").await;
    assert_eq!(chat.gpu.as_deref(), Some("h2/0"));

    // h3's agent is killed: h3 becomes unreachable, its holder keeps its lease.
    let on_h3 = holders(&probe.status().await, "h3/0")[0].clone();
    h3.kill();
    let status = hosts_are(&probe, &["h3"], HostState::Unreachable).await;
    assert_eq!(
        holders(&status, "h3/0"),
        std::slice::from_ref(&on_h3),
        "its holder keeps its lease"
    );
    let gpu = status.gpus.iter().find(|g| g.id == "h3/0").unwrap();
    assert_eq!(gpu.reachable, Some(false));
    // Its holder ends; a request pinned to h3 waits, although h3/0 has nothing held.
    let fence = status.gpus.iter().find(|g| g.id == "h3/0").unwrap().holders[0].fence;
    probe
        .pub_json(
            "release",
            "bg",
            json!({"request_id": on_h3, "fence": fence}),
        )
        .await;
    probe.reply(&on_h3, "released").await;
    probe
        .pub_json(
            "request",
            "pinned",
            json!({"request_id": "p3", "priority": 1, "host": "h3", "vram_mb": 1000}),
        )
        .await;
    probe.event("queued", Some("p3")).await;
    let status = probe.status().await;
    assert!(holders(&status, "h3/0").is_empty());
    assert!(
        status.queue.iter().any(|q| q.request_id == "p3"),
        "p3 waits"
    );

    // The agent is back: h3 is used again.
    let _h3 = Agent::start(&config, "h3", &[("0", 24_000)]);
    let p3 = probe.reply("p3", "granted").await;
    assert_eq!(p3.gpu.as_deref(), Some("h3/0"));
    assert!(p3.fence > Some(pause.fence));

    // A restarted coordinator hears the hosts again and keeps the holders.
    coordinator.stop().await.expect("stops cleanly");
    let coordinator = Coordinator::start(config.clone()).await;
    let status = hosts_are(&probe, &["h1", "h2", "h3"], HostState::Up).await;
    assert_eq!(holders(&status, "h3/0"), ["p3"]);
    assert_eq!(holders(&status, "h2/0"), ["chat-1"]);
    // The paused holder of h2 waits for a whole GPU; a small request fits beside p3 on h3.
    probe
        .pub_json(
            "request",
            "late",
            json!({"request_id": "late-1", "priority": 1, "host": "h3", "vram_mb": 1000}),
        )
        .await;
    assert_eq!(
        probe.reply("late-1", "granted").await.gpu.as_deref(),
        Some("h3/0")
    );
    coordinator.stop_and_audit().await;
}

#[tokio::test]
async fn a_standby_that_takes_over_hears_the_agents_and_grants_only_on_hosts_it_heard() {
    let config = fleet_config("fleet_takeover");
    let first = Coordinator::start(config.clone()).await;
    let second = Coordinator::start(config.clone()).await;
    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;
    let h1 = Agent::start(&config, "h1", &[("0", 16_000), ("1", 16_000)]);
    hosts_are(&probe, &["h1"], HostState::Up).await;
    probe
        .pub_json(
            "request",
            "asr",
            json!({"request_id": "asr-1", "priority": 2, "vram_mb": 10000}),
        )
        .await;
    let held = probe.reply("asr-1", "granted").await;
    assert!(held.gpu.as_deref().unwrap().starts_with("h1/"));
    // The agent goes; the leader hands over; the new leader keeps the holder and grants nothing
    // on h1 before it hears it.
    h1.kill();
    first.stop().await.expect("the leader stops cleanly");
    let url = second.url("/gpu/status");
    eventually("the standby leads", || async {
        let answer = reqwest::get(&url).await.ok()?;
        (answer.status() == reqwest::StatusCode::OK).then_some(())
    })
    .await;
    let status = probe.status().await;
    assert_eq!(holders(&status, held.gpu.as_deref().unwrap()), ["asr-1"]);
    probe
        .pub_json(
            "request",
            "chat",
            json!({"request_id": "chat-1", "priority": 0, "vram_mb": 4000}),
        )
        .await;
    probe.event("queued", Some("chat-1")).await;
    let _h1 = Agent::start(&config, "h1", &[("0", 16_000), ("1", 16_000)]);
    let chat = probe.reply("chat-1", "granted").await;
    assert!(chat.gpu.as_deref().unwrap().starts_with("h1/"));
    assert!(chat.fence > held.fence);
    second.stop_and_audit().await;
}

/// Nothing of the agent's configuration is needed beyond `[nats]` and a host: a sample arrives within a
/// few of its intervals, and a configuration with nothing to report is refused naming why.
#[tokio::test]
async fn an_agent_with_nothing_to_report_says_why() {
    let config = fleet_config("fleet_empty");
    let output = Command::new(env!("CARGO_BIN_EXE_gpu-coordinator"))
        .arg("agent")
        .env("GPU_COORDINATOR_NATS__URL", &config.nats.url)
        .env("GPU_COORDINATOR_NVML__ENABLED", "false")
        .env("GPU_COORDINATOR_AGENT__HOST", "bad.host")
        .output()
        .expect("run gpu-coordinator agent");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("agent.host \"bad.host\""), "{stderr}");
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_gpu-coordinator"))
            .arg("agent")
            .env("GPU_COORDINATOR_NATS__URL", &config.nats.url)
            .env("GPU_COORDINATOR_NVML__ENABLED", "false")
            .output(),
    )
    .await
    .expect("it stops at once")
    .expect("run gpu-coordinator agent");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no GPU to report"), "{stderr}");
}

/// An engine sidecar on a GPU host of the fleet asks for its own host's GPUs (`[sidecar] host`):
/// granted on h2 although h1, first in order, is as free.
#[tokio::test]
async fn an_engine_sidecar_asks_for_its_own_hosts_gpus() {
    let vllm = crate::engine_board::FakeVllm::start().await;
    let mut config = fleet_config("fleet_engine");
    let engine = crate::engine_board::vllm_engine("chat", &vllm.url);
    let listen = engine.listen.clone();
    config.engines = vec![engine];
    config.sidecar.host = Some("h2".into());
    let coordinator = Coordinator::start(config.clone()).await;
    let probe = Probe::new(&config.nats.url, &config.nats.prefix).await;
    let _h1 = Agent::start(&config, "h1", &[("0", 24_000)]);
    let _h2 = Agent::start(&config, "h2", &[("0", 24_000)]);
    hosts_are(&probe, &["h1", "h2"], HostState::Up).await;
    crate::engine_board::complete(&listen).await;
    let status = probe.status().await;
    let on_h2: Vec<&str> = status
        .gpus
        .iter()
        .filter(|g| g.id == "h2/0")
        .flat_map(|g| g.holders.iter().map(|h| h.service_id.as_str()))
        .collect();
    assert_eq!(on_h2, ["chat"], "{:?}", status.gpus);
    assert!(holders(&status, "h1/0").is_empty());
    coordinator.stop_and_audit().await;
}
