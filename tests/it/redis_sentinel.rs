//! Redis behind Sentinel (`redis.sentinels`, `redis.master`): a failover to a replica that missed the
//! last lease writes. The replica is cut off its master (its user there disabled), leases are granted and
//! released on the master alone, the master is killed (SIGKILL) and the Sentinels promote the replica.
//! The coordinator follows the Sentinels to the new master, finds it behind, raises its fence to the
//! highest fence ever issued and writes the lost lease back; a new grant gets a higher fence, and the
//! history keeps every rule. Private servers only.

use gpu_coordinator::adapters::redis::RedisLeases;
use gpu_coordinator::audit::Since;
use gpu_coordinator_test_support::RedisSentinels;
use serde_json::json;

use crate::support::{eventually, test_config, Coordinator, Probe, RedisServer};

const GPU_MB: u64 = 10_000;

/// What one server holds of the lease of `request_id` (of service `svc`): its fence.
fn lease_fence(server: &RedisServer, prefix: &str, svc: &str, request_id: &str) -> Option<u64> {
    let key = format!(
        "{prefix}:lease:{}",
        gpu_coordinator_core::scoped(svc, request_id)
    );
    redis::cmd("HGET")
        .arg(key)
        .arg("fence")
        .query::<Option<u64>>(&mut server.connect())
        .expect("HGET")
}

/// The highest fence one server stores (`<prefix>:fence`).
fn stored_fence(server: &RedisServer, prefix: &str) -> u64 {
    redis::cmd("GET")
        .arg(format!("{prefix}:fence"))
        .query::<Option<u64>>(&mut server.connect())
        .expect("GET")
        .unwrap_or(0)
}

async fn grant(probe: &mut Probe, svc: &str, request_id: &str) -> u64 {
    probe
        .pub_json(
            "request",
            svc,
            json!({"request_id": request_id, "priority": 1, "vram_mb": 2000}),
        )
        .await;
    let reply = probe.reply(request_id, "granted").await;
    reply.fence.expect("a grant has a fence")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failover_to_a_replica_that_missed_lease_writes_gets_them_back_before_new_grants() {
    let mut cluster = RedisSentinels::start();
    let mut config = test_config("sentinel", &[("0", GPU_MB)]);
    config.redis.sentinels = cluster.addrs();
    config.redis.master = cluster.name.clone();
    config.lease.default_ms = 300_000;
    let prefix = config.redis.key_prefix.clone();
    let coordinator = Coordinator::start(config.clone()).await;
    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;

    // asr's lease reaches the replica.
    let asr = grant(&mut probe, "asr", "asr-1").await;
    eventually("the replica holds asr's lease", || async {
        (lease_fence(&cluster.replica, &prefix, "asr", "asr-1") == Some(asr)).then_some(())
    })
    .await;

    // The replica is cut off: chat's grant, and tts's grant and release, reach the master alone.
    cluster.cut_replication();
    let chat = grant(&mut probe, "chat", "chat-1").await;
    let tts = grant(&mut probe, "tts", "tts-1").await;
    probe
        .pub_json(
            "release",
            "tts",
            json!({"request_id": "tts-1", "fence": tts}),
        )
        .await;
    probe.event("released", Some("tts-1")).await;
    assert!(asr < chat && chat < tts, "{asr} {chat} {tts}");
    assert_eq!(
        lease_fence(&cluster.master, &prefix, "chat", "chat-1"),
        Some(chat)
    );
    assert_eq!(stored_fence(&cluster.master, &prefix), tts);
    // The replica really missed them.
    assert_eq!(
        lease_fence(&cluster.replica, &prefix, "chat", "chat-1"),
        None,
        "the replica missed chat's lease"
    );
    assert_eq!(
        stored_fence(&cluster.replica, &prefix),
        asr,
        "the replica's fence is asr's, below chat's and tts's"
    );

    cluster.kill_master();
    eventually("the Sentinels promote the replica", || async {
        (cluster.master_port() == Some(cluster.replica.port)).then_some(())
    })
    .await;
    // Without a new request: the coordinator finds the new master behind, writes chat's lease back
    // and raises the fence to tts's, the highest it ever issued.
    eventually(
        "chat's lease written back and the fence raised to tts's",
        || async {
            let back = lease_fence(&cluster.replica, &prefix, "chat", "chat-1") == Some(chat);
            (back && stored_fence(&cluster.replica, &prefix) >= tts).then_some(())
        },
    )
    .await;
    assert_eq!(
        lease_fence(&cluster.replica, &prefix, "asr", "asr-1"),
        Some(asr)
    );

    let diar = grant(&mut probe, "diar", "diar-1").await;
    assert!(
        diar > tts,
        "a new grant's fence {diar} is above every fence before ({tts})"
    );
    let store = RedisLeases::connect(&cluster.replica.url(), &prefix)
        .await
        .expect("connect to the new master");
    let mut held: Vec<(String, u64)> = store
        .leases()
        .await
        .expect("read the leases")
        .into_iter()
        .map(|l| (l.request_id.to_string(), l.fence.0))
        .collect();
    held.sort_by_key(|(_, fence)| *fence);
    let scoped = gpu_coordinator_core::scoped;
    assert_eq!(
        held,
        [
            (scoped("asr", "asr-1"), asr),
            (scoped("chat", "chat-1"), chat),
            (scoped("diar", "diar-1"), diar)
        ],
        "one lease per holder, nothing more"
    );

    coordinator.stop().await.expect("stops");
    let summary = gpu_coordinator::app::audit::run(&config, Since::Start)
        .await
        .expect("the history can be read")
        .unwrap_or_else(|v| panic!("the history breaks a rule:\n{v}"));
    assert_eq!(summary.grants, 4, "{summary}");
}
