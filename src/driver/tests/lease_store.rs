//! The driver against a lease store that lost data, holds a lease the coordinator does not know,
//! or refuses a grant.

use super::*;

pub(super) fn asr_request() -> (&'static str, &'static str, Value) {
    (
        "request",
        "asr",
        json!({"request_id": "asr-1", "priority": 2, "vram_mb": 8000}),
    )
}

#[tokio::test]
async fn a_lease_store_that_lost_its_data_gets_the_live_leases_back() {
    let rig = Rig::new();
    let mut driver = handled(&rig, &[asr_request()]).await;
    let held = rig.leases.live();
    assert_eq!(held.len(), 1);
    rig.leases.lose_everything();
    driver
        .check_lease_store(now_ms())
        .await
        .expect("reconciled");
    assert_eq!(rig.leases.live(), held, "the same lease, same fence");
}

/// A failover to a replica that stopped receiving writes after asr's grant: it lacks chat's lease,
/// and its fence is below tts's (granted and released since). The next grant finds the store behind:
/// the store's fence is raised to tts's and chat's lease written back before diar's is written, and
/// diar's fence is above every fence before.
#[tokio::test]
async fn a_store_that_lost_its_newest_writes_is_repaired_before_anything_new() {
    let rig = Rig::new();
    let mut driver = handled(&rig, &[asr_request()]).await;
    let replica = rig.leases.replica();
    let request = |svc: &'static str, id: &str| {
        let body = json!({"request_id": id, "priority": 1, "vram_mb": 4000});
        ("request", svc, body)
    };
    feed(&rig, &mut driver, &[request("chat", "chat-1")]).await;
    feed(&rig, &mut driver, &[request("tts", "tts-1")]).await;
    let release = ("release", "tts", json!({"request_id": "tts-1"}));
    feed(&rig, &mut driver, &[release]).await;
    let before = rig.leases.live();
    assert_eq!(before.len(), 2, "asr and chat hold: {before:?}");
    let issued = rig
        .outcome()
        .into_iter()
        .find(|(id, ..)| id == "tts-1")
        .and_then(|(.., fence)| fence)
        .expect("tts had a fence");
    rig.leases.fail_over_to(replica);
    assert_eq!(rig.leases.live().len(), 1, "the replica lacks chat's lease");
    let steps_before = rig.trace.steps().len();

    feed(&rig, &mut driver, &[request("diar", "diar-1")]).await;
    let after = rig.leases.live();
    let chat = gpu_coordinator_core::scoped("chat", "chat-1");
    let diar = gpu_coordinator_core::scoped("diar", "diar-1");
    assert!(
        after
            .iter()
            .any(|l| l.request_id.as_str() == chat && l.fence == Fence(2)),
        "chat's lease is back under its fence: {after:?}"
    );
    let diar_fence = after
        .iter()
        .find(|l| l.request_id.as_str() == diar)
        .map(|l| l.fence)
        .expect("diar holds");
    assert!(diar_fence > issued, "a fence above every fence issued");
    let fence = crate::ports::Leases::max_fence(&rig.leases).await;
    assert!(fence.expect("read") >= diar_fence);
    let lease_steps: Vec<(&str, String)> = rig.trace.steps()[steps_before..]
        .iter()
        .filter_map(|step| match step {
            Step::Lease { op, request_id } => Some((*op, request_id.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        lease_steps,
        [
            ("recover", String::new()),
            ("restore", chat.clone()),
            ("restore", diar.clone())
        ],
        "the store is repaired (chat's lease written back), then diar's lease written"
    );
}

#[tokio::test]
async fn a_lease_the_coordinator_does_not_know_is_released() {
    let rig = Rig::new();
    let mut driver = handled(&rig, &[asr_request()]).await;
    let held = rig.leases.live();
    rig.leases.plant(Lease {
        request_id: "ghost".into(),
        service_id: "old".into(),
        gpu: "0".into(),
        fence: Fence(99),
        vram_mb: 1000,
        capacity_mb: GPU_MB,
        expires_at: now_ms() + 60_000,
    });
    driver
        .check_lease_store(now_ms())
        .await
        .expect("reconciled");
    assert_eq!(
        rig.leases.live(),
        held,
        "only the coordinator's lease is left"
    );
}

#[tokio::test]
async fn a_renewed_lease_the_store_lost_is_written_back() {
    let rig = Rig::new();
    let mut driver = handled(&rig, &[asr_request()]).await;
    let before = rig.leases.live();
    rig.leases.lose_everything();
    let renew = ("renew", "asr", json!({"request_id": "asr-1"}));
    feed(&rig, &mut driver, &[renew]).await;
    let after = rig.leases.live();
    assert_eq!(after.len(), 1, "the lease is back");
    assert_eq!(after[0].fence, before[0].fence);
    assert!(after[0].expires_at >= before[0].expires_at);
}

#[tokio::test]
async fn a_lost_lease_is_written_back_though_newer_fences_exist() {
    let rig = Rig::new();
    let chat = (
        "request",
        "chat",
        json!({"request_id": "chat-1", "priority": 1, "vram_mb": 4000}),
    );
    let mut driver = handled(&rig, &[asr_request()]).await;
    feed(&rig, &mut driver, &[chat]).await;
    let before = rig.leases.live();
    assert_eq!(before.len(), 2);
    // The store loses asr's lease (fence 1) alone; chat's (fence 2) stays.
    let asr_key = gpu_coordinator_core::scoped("asr", "asr-1");
    rig.leases.lose(&asr_key);
    let renew = ("renew", "asr", json!({"request_id": "asr-1"}));
    feed(&rig, &mut driver, &[renew]).await;
    let after = rig.leases.live();
    assert!(
        after
            .iter()
            .any(|l| l.request_id.as_str() == asr_key && l.fence == Fence(1)),
        "asr's lease is back under its fence: {after:?}"
    );
    let orders: Vec<String> = rig
        .messages()
        .into_iter()
        .filter(|(subject, ..)| subject == "gpu.control.asr")
        .map(|(_, _, what, _)| what)
        .collect();
    assert!(orders.is_empty(), "asr is not revoked: {orders:?}");
}

#[tokio::test]
async fn a_grant_the_store_refuses_is_revoked() {
    let rig = Rig::new();
    let mut driver = handled(&rig, &[]).await;
    // Another holder the coordinator never granted fills the GPU under a higher fence.
    rig.leases.plant(Lease {
        request_id: "intruder".into(),
        service_id: "other".into(),
        gpu: "0".into(),
        fence: Fence(50),
        vram_mb: GPU_MB,
        capacity_mb: GPU_MB,
        expires_at: now_ms() + 60_000,
    });
    feed(&rig, &mut driver, &[asr_request()]).await;
    let orders: Vec<String> = rig
        .messages()
        .into_iter()
        .filter(|(subject, id, ..)| subject == "gpu.control.asr" && id == "asr-1")
        .map(|(_, _, what, _)| what)
        .collect();
    assert_eq!(orders, vec!["revoke".to_owned()]);
    let asr = rig
        .outcome()
        .into_iter()
        .find(|(id, ..)| id == "asr-1")
        .expect("the request is journaled");
    assert_eq!(asr.1, Phase::Ended);
    assert_eq!(asr.2.as_deref(), Some("revoked"));
}
