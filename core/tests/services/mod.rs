//! The rules of `[services.<id>]` (docs/scheduling.md, "Per-service limits"), one test per rule, through the
//! simulated driver: priority caps and clamping, defaults, the VRAM cap over a service's live leases,
//! services that are not preemptible, a per-service grace, and unknown services.

use gpu_coordinator_core::{Phase, SchedConfig, ServicePolicies, ServicePolicy, Snapshot};
use gpu_coordinator_wire::{ControlAction, EventKind, Outcome, RejectCode};

use crate::harness::{gpus, req, Sim, T0};

mod guarantees;

use ControlAction::Pause;
use EventKind::{Queued, Requested};

pub const ACK_MS: u64 = 5_000;

/// A configuration with these `[services.<id>]` sections (and `others` for the rest).
pub fn config_with(named: &[(&str, ServicePolicy)], others: Option<ServicePolicy>) -> SchedConfig {
    SchedConfig {
        ack_deadline_ms: ACK_MS,
        services: ServicePolicies {
            named: named
                .iter()
                .map(|(id, p)| (id.to_string(), p.clone()))
                .collect(),
            others,
        },
        ..SchedConfig::default()
    }
}

/// A simulation of one service's section, the others as today, with the liveness check on.
pub fn sim_of(named: &[(&str, ServicePolicy)], specs: &[(&str, u64)]) -> Sim {
    sim_config(config_with(named, Some(ServicePolicy::default())), specs)
}

pub fn sim_config(config: SchedConfig, specs: &[(&str, u64)]) -> Sim {
    let mut s = Sim::new(config, gpus(specs));
    s.liveness = true;
    s
}

pub fn policy() -> ServicePolicy {
    ServicePolicy::default()
}

// ----- priorities -------------------------------------------------------------------------------------

#[test]
fn a_priority_more_urgent_than_max_priority_is_rejected_naming_the_limit() {
    let batch = ServicePolicy {
        max_priority: Some(2),
        ..policy()
    };
    let mut s = sim_of(&[("batch", batch)], &[("g0", 1_000)]);
    for (id, priority) in [("b0", 0), ("b1", 1)] {
        let a = s.request("batch", req(id, priority).vram(100));
        let reply = a.reply(id);
        assert_eq!(reply.outcome, Outcome::Rejected);
        assert_eq!(reply.code, Some(RejectCode::PriorityNotAllowed));
        let error = reply.error.as_deref().unwrap_or_default();
        assert!(
            error.contains("`services.batch.max_priority` is 2"),
            "{error}"
        );
        assert!(
            error.contains(&format!("field `priority`: {priority}")),
            "{error}"
        );
        assert_eq!(a.events(id), vec![Requested, EventKind::Rejected]);
        assert_eq!(s.phase(id), Phase::Ended);
    }
    // At the limit and below it, as today.
    for (id, priority) in [("b2", 2), ("b3", 3)] {
        let a = s.request("batch", req(id, priority).vram(100));
        assert_eq!(a.reply(id).outcome, Outcome::Granted);
        assert_eq!(s.record(id).priority, priority);
    }
    // Another service is not limited.
    let a = s.request("chat", req("c0", 0).vram(100));
    assert_eq!(a.reply("c0").outcome, Outcome::Granted);
}

#[test]
fn clamp_priority_takes_the_request_at_max_priority() {
    let batch = ServicePolicy {
        max_priority: Some(2),
        clamp_priority: true,
        ..policy()
    };
    let mut s = sim_of(&[("batch", batch)], &[("g0", 1_000)]);
    s.request("asr", req("asr", 2).vram(800));
    // Asked at 0, taken at 2: it does not pause a holder of priority 2.
    let a = s.request("batch", req("b0", 0).vram(800));
    assert_eq!(a.events("b0"), vec![Requested, Queued]);
    assert!(a.all_controls().is_empty());
    assert_eq!(s.record("b0").priority, 2);
    let detail = a.event("b0", Requested).detail.clone().unwrap_or_default();
    assert!(
        detail.contains("priority 0 taken as 2")
            && detail.contains("`services.batch.clamp_priority` is true"),
        "{detail}"
    );
    // It pauses a less urgent holder as a priority-2 request would.
    let mut s = sim_of(
        &[(
            "batch",
            ServicePolicy {
                max_priority: Some(2),
                clamp_priority: true,
                ..policy()
            },
        )],
        &[("g0", 1_000)],
    );
    s.request("idx", req("idx", 3).vram(800));
    let a = s.request("batch", req("b0", 0).vram(800));
    assert_eq!(a.control_actions("idx"), vec![Pause]);
}

#[test]
fn services_default_applies_to_a_service_without_a_section() {
    let others = ServicePolicy {
        max_priority: Some(1),
        ..policy()
    };
    let chat = ServicePolicy {
        max_priority: Some(0),
        ..policy()
    };
    let mut s = sim_config(
        config_with(&[("chat", chat)], Some(others)),
        &[("g0", 1_000)],
    );
    let a = s.request("chat", req("c0", 0).vram(100));
    assert_eq!(a.reply("c0").outcome, Outcome::Granted);
    let a = s.request("anyone", req("x0", 0).vram(100));
    let error = a.reply("x0").error.clone().unwrap_or_default();
    assert!(
        error.contains("`services.default.max_priority` is 1"),
        "{error}"
    );
}

#[test]
fn unknown_services_are_refused_when_not_allowed() {
    let mut s = sim_config(config_with(&[("chat", policy())], None), &[("g0", 1_000)]);
    let a = s.request("intruder", req("i0", 0).vram(100));
    let reply = a.reply("i0");
    assert_eq!(reply.outcome, Outcome::Rejected);
    assert_eq!(reply.code, Some(RejectCode::UnknownService));
    let error = reply.error.as_deref().unwrap_or_default();
    assert!(
        error.contains("no [services.intruder] section")
            && error.contains("`services.allow_unknown` is false"),
        "{error}"
    );
    // Nothing was queued: no `requested` event, only the rejection.
    assert_eq!(a.events("i0"), vec![EventKind::Rejected]);
    let a = s.request("chat", req("c0", 0).vram(100));
    assert_eq!(a.reply("c0").outcome, Outcome::Granted);
}

// ----- defaults ---------------------------------------------------------------------------------------

#[test]
fn defaults_fill_what_a_request_leaves_out() {
    let asr = ServicePolicy {
        default_vram_mb: Some(300),
        default_lease_ms: Some(7_000),
        ..policy()
    };
    let mut s = sim_of(&[("asr", asr)], &[("g0", 1_000)]);
    // Neither VRAM nor lease given: the service's defaults, not the whole GPU and lease.default_ms.
    let a = s.request("asr", req("a0", 2));
    let reply = a.reply("a0");
    assert_eq!(
        (reply.outcome, reply.vram_mb, reply.lease_ms),
        (Outcome::Granted, Some(300), Some(7_000))
    );
    // What a request gives wins.
    let a = s.request("asr", req("a1", 2).vram(200).lease(9_000));
    let reply = a.reply("a1");
    assert_eq!((reply.vram_mb, reply.lease_ms), (Some(200), Some(9_000)));
    // A service without defaults still gets the whole GPU and lease.default_ms.
    s.release("asr", "a0", None);
    s.release("asr", "a1", None);
    let a = s.request("other", req("o0", 2));
    let reply = a.reply("o0");
    assert_eq!((reply.vram_mb, reply.lease_ms), (Some(1_000), Some(30_000)));
}

#[test]
fn a_default_lease_is_capped_by_lease_max_ms_and_a_default_vram_by_the_gpus() {
    let asr = ServicePolicy {
        default_vram_mb: Some(5_000),
        default_lease_ms: Some(10_000_000),
        ..policy()
    };
    let mut config = config_with(&[("asr", asr)], Some(policy()));
    config.lease_max_ms = 60_000;
    let mut s = sim_config(config, &[("g0", 1_000)]);
    let a = s.request("asr", req("a0", 2));
    let error = a.reply("a0").error.clone().unwrap_or_default();
    assert!(
        error.contains("`services.asr.default_vram_mb`: 5000 MB is more than any GPU"),
        "{error}"
    );
    let a = s.request("asr", req("a1", 2).vram(100));
    assert_eq!(a.reply("a1").lease_ms, Some(60_000));
}

// ----- the VRAM cap -----------------------------------------------------------------------------------

fn capped(cap: u64) -> ServicePolicy {
    ServicePolicy {
        max_vram_mb: Some(cap),
        ..policy()
    }
}

#[test]
fn max_vram_mb_caps_what_a_services_live_leases_hold() {
    let mut s = sim_of(&[("batch", capped(500))], &[("g0", 1_000), ("g1", 1_000)]);
    for id in ["b0", "b1"] {
        let a = s.request("batch", req(id, 2).vram(200));
        assert_eq!(a.reply(id).outcome, Outcome::Granted);
    }
    // 400 held, 200 more would be 600 > 500: it waits, though both GPUs have room.
    let a = s.request("batch", req("b2", 2).vram(200));
    assert_eq!(a.events("b2"), vec![Requested, Queued]);
    // One that fits under the cap passes... only once the first waiting one fits (next test); here
    // a release makes room for b2.
    let a = s.release("batch", "b0", None);
    assert_eq!(a.granted(), vec!["b2"]);
    // Another service is not held back by batch's cap.
    let a = s.request("chat", req("c0", 0).vram(900));
    assert_eq!(a.reply("c0").outcome, Outcome::Granted);
}

#[test]
fn a_request_that_could_never_fit_under_the_cap_is_rejected() {
    let mut s = sim_of(&[("batch", capped(500))], &[("g0", 1_000), ("g1", 800)]);
    let a = s.request("batch", req("big", 2).vram(600));
    assert_eq!(a.reply("big").code, Some(RejectCode::OverServiceLimit));
    let error = a.reply("big").error.clone().unwrap_or_default();
    assert!(
        error.contains("600 MB is more than service `batch` may hold at once")
            && error.contains("`services.batch.max_vram_mb` is 500 MB"),
        "{error}"
    );
    // A whole GPU counts the GPU's capacity: the smallest here has 800 MB.
    let a = s.request("batch", req("whole", 2));
    let error = a.reply("whole").error.clone().unwrap_or_default();
    assert!(
        error.contains("a whole GPU (the smallest it may use has 800 MB)"),
        "{error}"
    );
    // With a GPU small enough, a whole-GPU request is taken, and counts its GPU's capacity.
    let mut s = sim_of(&[("batch", capped(500))], &[("g0", 1_000), ("small", 400)]);
    let a = s.request("batch", req("whole", 2));
    assert_eq!(a.reply("whole").gpu.as_deref(), Some("small"));
    let a = s.request("batch", req("more", 2).vram(200));
    assert_eq!(a.events("more"), vec![Requested, Queued]);
}

#[test]
fn a_pausing_holder_counts_against_the_cap_until_its_ack() {
    let mut s = sim_of(&[("batch", capped(500))], &[("g0", 1_000)]);
    s.request("batch", req("b0", 2).vram(400));
    s.request("chat", req("c0", 0).vram(800));
    assert_eq!(s.phase("b0"), Phase::Pausing);
    // b0 still holds 400 of batch's 500 while it pauses.
    let a = s.request("batch", req("b1", 1).vram(200));
    assert_eq!(a.events("b1"), vec![Requested, Queued]);
    // Paused, b0 holds nothing: b1 fits under the cap (the GPU has 200 free beside c0).
    let a = s.ack_paused("batch", "b0");
    assert_eq!(a.granted(), vec!["c0", "b1"]);
}

#[test]
fn the_first_waiting_request_of_a_capped_service_holds_the_cap() {
    let mut s = sim_of(&[("batch", capped(1_000))], &[("g0", 2_000)]);
    s.request("batch", req("b0", 2).vram(600));
    // 600 held: big (600) does not fit under the cap; small (300) would, but waits behind big, as a
    // small request waits behind a blocked head.
    let a = s.request("batch", req("big", 2).vram(600));
    assert_eq!(a.events("big"), vec![Requested, Queued]);
    let a = s.request("batch", req("small", 2).vram(300));
    assert_eq!(a.events("small"), vec![Requested, Queued]);
    // A request waiting for its cap reserves no GPU: another service passes it.
    let a = s.request("other", req("o0", 3).vram(1_000));
    assert_eq!(a.reply("o0").outcome, Outcome::Granted);
    // b0 ends: big fits under the cap, then small beside it (900 MB).
    let a = s.release("batch", "b0", None);
    assert_eq!(a.granted(), vec!["big", "small"]);
}

#[test]
fn a_later_request_leaves_under_the_cap_the_room_the_first_one_needs() {
    let mut s = sim_of(&[("batch", capped(100))], &[("g0", 100), ("g1", 100)]);
    s.request("other", req("x1", 0).vram(10).gpu("g1"));
    // batch's first request waits for room on g1 (pinned); it fits under the cap.
    let a = s.request("batch", req("first", 2).vram(95).gpu("g1"));
    assert_eq!(a.events("first"), vec![Requested, Queued]);
    // A later one would fit g0, but would leave no room under the cap for the first: it waits.
    let a = s.request("batch", req("later", 2).vram(60));
    assert_eq!(a.events("later"), vec![Requested, Queued]);
    // Another service takes g0 meanwhile.
    let a = s.request("other", req("x2", 3).vram(50));
    assert_eq!(a.reply("x2").outcome, Outcome::Granted);
    assert_eq!(a.reply("x2").gpu.as_deref(), Some("g0"));
    let a = s.release("other", "x1", None);
    assert_eq!(a.granted(), vec!["first"]);
    assert_eq!(s.phase("later"), Phase::Queued);
}

#[test]
fn a_more_urgent_request_of_a_service_at_its_cap_waits_for_the_services_own_leases() {
    let mut s = sim_of(&[("batch", capped(500))], &[("g0", 1_000)]);
    s.request("batch", req("low", 3).vram(500));
    // More urgent, but batch holds its 500: it pauses nobody, its own holder included.
    let a = s.request("batch", req("high", 0).vram(300));
    assert_eq!(a.events("high"), vec![Requested, Queued]);
    assert!(a.all_controls().is_empty());
    let a = s.release("batch", "low", None);
    assert_eq!(a.granted(), vec!["high"]);
}

#[test]
fn restore_ends_a_request_that_a_lower_cap_can_never_take() {
    let mut s = sim_of(&[], &[("g0", 1_000)]);
    s.request("batch", req("hold", 2).vram(900));
    s.request("batch", req("wait", 2).vram(600));
    let snapshot: Snapshot = s.snapshot(true);
    let (s, a) = Sim::restored(
        config_with(&[("batch", capped(500))], Some(policy())),
        gpus(&[("g0", 1_000)]),
        snapshot,
        s.now + 10,
    );
    // The holder keeps its lease (it was granted under the old configuration); the waiting request
    // could never be granted under the new cap, and ends now.
    assert_eq!(s.phase("hold"), Phase::Active);
    assert_eq!(s.phase("wait"), Phase::Ended);
    assert_eq!(a.reply("wait").code, Some(RejectCode::OverServiceLimit));
    let error = a.reply("wait").error.clone().unwrap_or_default();
    assert!(
        error.contains("`services.batch.max_vram_mb` is 500 MB"),
        "{error}"
    );
}

// ----- preemptible, grace -----------------------------------------------------------------------------

#[test]
fn a_service_that_is_not_preemptible_is_never_paused() {
    let pinned = ServicePolicy {
        preemptible: false,
        ..policy()
    };
    let mut s = sim_of(&[("llm", pinned)], &[("g0", 1_000)]);
    // Its request says it may be paused; its service says no.
    let a = s.request("llm", req("m0", 3).vram(600).preemptible(true));
    assert_eq!(a.reply("m0").outcome, Outcome::Granted);
    assert!(!s.record("m0").preemptible);
    s.request("asr", req("a0", 2).vram(400));
    let a = s.request("chat", req("c0", 0).vram(600));
    // The priority-3 holder is the least urgent, but only asr may be paused: not enough room.
    assert!(a.controls("m0").is_empty());
    assert!(a.controls("a0").is_empty());
    assert_eq!(a.events("c0"), vec![Requested, Queued]);
    let a = s.advance(3 * ACK_MS);
    assert!(a.controls("m0").is_empty());
    let holder = s.status().gpus[0]
        .holders
        .iter()
        .find(|h| h.request_id == "m0")
        .map(|h| h.preemptible);
    assert_eq!(holder, Some(false));
}

#[test]
fn a_services_min_hold_ms_keeps_its_holders_from_a_pause_that_long() {
    let asr = ServicePolicy {
        min_hold_ms: Some(1_000),
        ..policy()
    };
    let mut s = sim_of(&[("asr", asr)], &[("g0", 1_000)]);
    s.request("asr", req("a0", 2).vram(500));
    s.request("diar", req("d0", 2).vram(500));
    s.advance(100);
    // diar, without a grace of its own (preemption.min_hold_ms is 0), is paused at once.
    let a = s.request("chat", req("c0", 0).vram(500));
    assert_eq!(a.control_actions("d0"), vec![Pause]);
    s.ack_paused("diar", "d0");
    // asr is not, before it held 1000 ms.
    let a = s.request("chat", req("c1", 0).vram(500));
    assert!(a.controls("a0").is_empty());
    assert_eq!(s.sched.poll_timeout(), Some(T0 + 1_000));
    let a = s.advance(T0 + 1_000 - s.now);
    assert_eq!(a.control_actions("a0"), vec![Pause]);
}

#[test]
fn a_service_grace_overrides_preemption_min_hold_ms_both_ways() {
    let chat = ServicePolicy {
        min_hold_ms: Some(0),
        ..policy()
    };
    let mut config = config_with(&[("asr", chat)], Some(policy()));
    config.min_hold_ms = 1_000;
    let mut s = sim_config(config, &[("g0", 1_000)]);
    s.request("asr", req("a0", 2).vram(500));
    s.request("diar", req("d0", 2).vram(500));
    s.advance(10);
    // asr's grace is 0 although preemption.min_hold_ms is 1000: it is the one paused now.
    let a = s.request("chat", req("c0", 0).vram(500));
    assert_eq!(a.control_actions("a0"), vec![Pause]);
    assert!(a.controls("d0").is_empty());
}
