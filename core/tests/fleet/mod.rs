//! The fleet (`nodes.agents`): GPUs reported host by host by node agents, hosts that fall silent and
//! come back, requests pinned to a host, and a restart that has heard no host yet.

use gpu_coordinator_core::{Phase, SchedConfig};
use gpu_coordinator_wire::{ControlAction, EventKind, Outcome, RejectCode};

use super::harness::{req, Sim};

const TTL: u64 = 5_000;

fn fleet() -> Sim {
    let config = SchedConfig {
        ack_deadline_ms: 5_000,
        host_ttl_ms: Some(TTL),
        ..SchedConfig::default()
    };
    Sim::new(config, Vec::new())
}

#[test]
fn a_request_waits_for_a_host_and_is_granted_when_one_joins() {
    let mut s = fleet();
    let a = s.request("chat", req("c1", 0).vram(8_000));
    a.no_reply("c1");
    assert_eq!(
        a.event("c1", EventKind::Queued).detail.as_deref(),
        Some("waiting for a host with a GPU it may use to be heard"),
        "no host yet: it waits"
    );
    let a = s.host_sample("h1", &[("0", 24_000, 0)]);
    let reply = a.reply("c1");
    assert_eq!(reply.outcome, Outcome::Granted);
    assert_eq!(reply.gpu.as_deref(), Some("h1/0"));
}

#[test]
fn requests_are_placed_across_hosts_and_priorities_hold_across_them() {
    let mut s = fleet();
    s.host_sample("h1", &[("0", 24_000, 0)]);
    s.host_sample("h2", &[("0", 24_000, 0)]);
    let a = s.request("stt", req("s1", 2));
    let b = s.request("stt", req("s2", 2));
    let mut placed = vec![
        a.reply("s1").gpu.clone().unwrap().to_string(),
        b.reply("s2").gpu.clone().unwrap().to_string(),
    ];
    placed.sort();
    assert_eq!(placed, ["h1/0", "h2/0"], "one whole GPU on each host");
    // Both hosts full: an urgent request pauses one of the less urgent holders, on either host.
    let c = s.request("chat", req("c1", 0));
    assert_eq!(c.all_controls().len(), 1, "one holder asked to pause");
    let (_, control) = c.all_controls()[0];
    let paused = control.request_id.to_string();
    let acts = s.ack_paused("stt", &paused);
    assert_eq!(acts.reply("c1").outcome, Outcome::Granted);
}

#[test]
fn a_request_pinned_to_a_host_waits_for_that_host() {
    let mut s = fleet();
    s.host_sample("h1", &[("0", 24_000, 0)]);
    s.host_sample("h2", &[("0", 24_000, 0), ("1", 24_000, 0)]);
    s.request("hold", req("x", 0).host("h2").preemptible(false));
    s.request("hold", req("y", 0).host("h2").preemptible(false));
    let a = s.request("svc", req("p1", 1).host("h2"));
    a.no_reply("p1");
    assert_eq!(s.phase("p1"), Phase::Queued, "h1 is free but not asked for");
    let a = s.release("hold", "y", None);
    let reply = a.reply("p1");
    assert_eq!(reply.outcome, Outcome::Granted);
    assert!(reply.gpu.as_deref().unwrap().starts_with("h2/"));
    // A GPU named by its host and id.
    let a = s.request("svc", req("p2", 1).gpu("h1/0"));
    assert_eq!(a.reply("p2").gpu.as_deref(), Some("h1/0"));
}

#[test]
fn a_silent_host_takes_no_new_grants_and_its_holders_keep_their_leases() {
    let mut s = fleet();
    s.host_sample("h1", &[("0", 24_000, 0)]);
    s.host_sample("h2", &[("0", 24_000, 0)]);
    s.request("a", req("on1", 1).gpu("h1/0").vram(4_000).lease(60_000));
    // h2 stays heard; h1 falls silent.
    for _ in 0..3 {
        s.advance(2_000);
        s.host_sample("h2", &[("0", 24_000, 0)]);
    }
    let status = s.sched.status(s.now);
    let h1 = status.hosts.iter().find(|h| h.host == "h1").unwrap();
    assert!(!h1.up, "silent past the TTL");
    assert!(h1.last_sample_age_ms >= TTL);
    let gpu = status
        .gpus
        .iter()
        .find(|g| g.id.as_str() == "h1/0")
        .unwrap();
    assert_eq!(gpu.reachable, Some(false));
    assert_eq!(gpu.holders.len(), 1, "its holder keeps its lease");
    assert_eq!(s.phase("on1"), Phase::Active);
    // A renewal of the holder on the silent host is taken.
    let a = s.renew("a", "on1", None, Some(60_000));
    assert!(a.events("on1").contains(&EventKind::Renewed));
    // No new grant there, pinned or not: the unpinned one goes to h2, the pinned one waits.
    let a = s.request("b", req("any", 1).vram(4_000));
    assert_eq!(a.reply("any").gpu.as_deref(), Some("h2/0"));
    let a = s.request("b", req("pin", 1).host("h1").vram(4_000));
    a.no_reply("pin");
    assert_eq!(s.phase("pin"), Phase::Queued);
    // Heard again: used again.
    let a = s.host_sample("h1", &[("0", 24_000, 4_000)]);
    assert_eq!(a.reply("pin").gpu.as_deref(), Some("h1/0"));
}

#[test]
fn a_sample_older_than_the_ttl_does_not_bring_a_host_up() {
    let mut s = fleet();
    s.advance(10_000);
    let old = s.now - TTL - 1;
    s.request("a", req("r", 1));
    let a = s.host_sample_at("h1", old, &[("0", 24_000, 0)]);
    a.no_reply("r");
    assert_eq!(s.phase("r"), Phase::Queued);
}

#[test]
fn a_restarted_leader_keeps_holders_of_unheard_hosts_and_grants_there_only_once_heard() {
    let mut s = fleet();
    s.host_sample("h1", &[("0", 24_000, 0)]);
    s.request("a", req("held", 1).vram(10_000).lease(60_000));
    assert_eq!(s.phase("held"), Phase::Active);
    let acts = s.restart(1_000, true);
    assert!(
        acts.control_actions("held").is_empty(),
        "not revoked although its host is not heard yet: {:?}",
        acts.control_actions("held")
    );
    assert_eq!(s.phase("held"), Phase::Active);
    let a = s.request("b", req("new", 1).vram(4_000));
    a.no_reply("new");
    assert_eq!(s.phase("new"), Phase::Queued, "h1 not heard yet");
    let a = s.host_sample("h1", &[("0", 24_000, 10_000)]);
    assert_eq!(a.reply("new").gpu.as_deref(), Some("h1/0"));
    assert!(!a.control_actions("held").contains(&ControlAction::Revoke));
}

#[test]
fn a_gpu_its_agent_stops_listing_takes_no_new_grants() {
    let mut s = fleet();
    s.host_sample("h1", &[("0", 24_000, 0), ("1", 24_000, 0)]);
    s.request("a", req("x", 1).gpu("h1/0"));
    s.host_sample("h1", &[("0", 24_000, 24_000)]);
    let a = s.request("b", req("y", 1));
    a.no_reply("y");
    assert_eq!(s.phase("y"), Phase::Queued, "h1/1 is gone");
}

#[test]
fn one_box_refuses_a_host() {
    let mut s = Sim::new(
        SchedConfig::default(),
        super::harness::gpus(&[("0", 24_000)]),
    );
    let a = s.request("a", req("r", 1).host("h1"));
    let reply = a.reply("r");
    assert_eq!(reply.outcome, Outcome::Rejected);
    assert_eq!(reply.code, Some(RejectCode::UnknownGpu));
    assert!(reply
        .error
        .as_deref()
        .unwrap()
        .contains("nodes.agents is false"));
}

/// A sample that changes nothing asks for nothing: no write, no message (samples come from every
/// host every second, and the driver writes the journal for any action).
#[test]
fn a_sample_that_changes_nothing_asks_for_nothing() {
    let mut s = fleet();
    s.host_sample("h1", &[("0", 24_000, 0)]);
    s.request("a", req("held", 1).vram(10_000).lease(60_000));
    s.request("b", req("waits", 1).vram(20_000));
    for _ in 0..3 {
        s.advance(500);
        let a = s.host_sample("h1", &[("0", 24_000, 10_000)]);
        assert!(a.is_empty(), "{a:?}");
    }
}
