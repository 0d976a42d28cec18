//! The rules of the wire contract (`docs/protocol.md`), one test per rule, driven through the
//! simulated driver of [`harness`]: inputs in, expected actions out, every invariant checked after every
//! step. The property tests live in [`props`], in this same crate to keep to one link step.

mod fleet;
mod harness;
mod props;
mod services;

use gpu_coordinator_core::{End, Fence, Input, Lease, LeaseOp, Phase, SchedConfig, Snapshot};
use gpu_coordinator_wire::{
    AckAction, AckMsg, ControlAction, Encoding, EventKind, HolderState, Inbound, Outcome,
    ReleaseMsg, RenewMsg,
};

use harness::{gpus, req, Sim, T0};

use ControlAction::{Pause, Restart, Resume, Revoke};
use EventKind::{
    Cancelled, Expired, Granted, Paused, Preempting, Queued, Released, Renewed, Requested, Resumed,
    Revoked, TimedOut,
};

const ACK_MS: u64 = 5_000;

fn config() -> SchedConfig {
    SchedConfig {
        ack_deadline_ms: ACK_MS,
        ..SchedConfig::default()
    }
}

/// A simulation with the default configuration (ACK deadline 5 s) and the liveness check on.
fn sim(specs: &[(&str, u64)]) -> Sim {
    sim_with(config(), specs)
}

fn sim_with(config: SchedConfig, specs: &[(&str, u64)]) -> Sim {
    let liveness = config.aging_ms == 0;
    let mut s = Sim::new(config, gpus(specs));
    s.liveness = liveness;
    s
}

// ----- granting ---------------------------------------------------------------------------------------

#[test]
fn grant_on_a_free_gpu() {
    // (vram_mb, lease_ms) asked -> (vram_mb, lease_ms) granted
    let cases = [
        (Some(8_000), Some(20_000), 8_000, 20_000),
        (None, None, 24_000, 30_000),
        (Some(24_000), Some(10_000_000), 24_000, 3_600_000),
    ];
    for (vram, lease, want_vram, want_lease) in cases {
        let mut s = sim(&[("g0", 24_000)]);
        let mut r = req("c1", 0);
        r.0.vram_mb = vram;
        r.0.lease_ms = lease;
        let a = s.request("chat", r);
        let reply = a.reply("c1");
        assert_eq!(reply.outcome, Outcome::Granted);
        assert_eq!(reply.gpu.as_deref(), Some("g0"));
        assert_eq!(reply.fence, Some(1));
        assert_eq!(reply.lease_ms, Some(want_lease));
        assert_eq!(reply.expires_at, Some(T0 + want_lease));
        assert_eq!(reply.vram_mb, Some(want_vram));
        assert_eq!(reply.waited_ms, Some(0));
        assert_eq!(reply.error, None);
        assert_eq!(
            a.lease_ops(),
            vec![&LeaseOp::Acquire(Lease {
                request_id: "c1".into(),
                service_id: "chat".into(),
                gpu: "g0".into(),
                fence: Fence(1),
                vram_mb: want_vram,
                capacity_mb: 24_000,
                expires_at: T0 + want_lease,
            })]
        );
        assert_eq!(a.events("c1"), vec![Requested, Granted]);
        let granted = a.event("c1", Granted);
        assert_eq!(
            (granted.gpu.as_deref(), granted.fence, granted.priority),
            (Some("g0"), Some(1), Some(0))
        );
        assert_eq!(granted.service_id, "chat");
        let rec = a.persisted("c1").expect("the grant is persisted");
        assert_eq!(rec.phase, Phase::Active);
        assert_eq!(rec.gpu.as_deref(), Some("g0"));
        assert_eq!(rec.fence, Some(Fence(1)));
        assert_eq!(rec.held_mb, Some(want_vram));
        assert_eq!(rec.granted_at, Some(T0));
        assert_eq!(rec.expires_at, Some(T0 + want_lease));
        assert_eq!(a.persisted_fences(), vec![Fence(1)]);
        assert!(a.all_controls().is_empty());
    }
}

#[test]
fn grant_order_is_priority_then_arrival() {
    // arrivals (id, priority) behind a holder -> grant order
    type Case<'a> = (&'a [(&'a str, u8)], &'a [&'a str]);
    let cases: &[Case] = &[
        (
            &[("a", 2), ("b", 1), ("c", 1), ("d", 0)],
            &["d", "b", "c", "a"],
        ),
        (&[("a", 1), ("b", 1), ("c", 1)], &["a", "b", "c"]),
        (
            &[("x", 3), ("y", 0), ("z", 3), ("w", 0)],
            &["y", "w", "x", "z"],
        ),
        (&[("p", 255), ("q", 254)], &["q", "p"]),
    ];
    for &(arrivals, order) in cases {
        let mut s = sim(&[("g0", 1_000)]);
        s.request("hold", req("h", 0).preemptible(false));
        for &(id, priority) in arrivals {
            s.advance(10);
            let a = s.request("q", req(id, priority));
            assert_eq!(a.events(id), vec![Requested, Queued]);
            assert!(a.all_controls().is_empty(), "nothing can be paused: {a:#?}");
        }
        assert_eq!(s.queue(), order);
        let mut holder = ("hold", "h");
        for &next in order {
            let a = s.release(holder.0, holder.1, None);
            assert_eq!(a.granted(), vec![next.to_string()]);
            holder = ("q", next);
        }
    }
}

#[test]
fn holders_share_a_gpu_while_their_vram_fits() {
    let mut s = sim(&[("g0", 1_000)]);
    assert_eq!(
        s.request("s1", req("a", 1).vram(400)).reply("a").fence,
        Some(1)
    );
    assert_eq!(
        s.request("s2", req("b", 1).vram(400)).reply("b").fence,
        Some(2)
    );
    let a = s.request("s3", req("c", 1).vram(400));
    a.no_reply("c");
    assert_eq!(a.events("c"), vec![Requested, Queued]);
    let g0 = &s.status().gpus[0];
    assert_eq!((g0.used_mb, g0.free_mb), (800, 200));
    assert_eq!(s.holders("g0"), vec!["a", "b"]);

    s.advance(250);
    let a = s.release("s1", "a", Some(1));
    assert_eq!(a.reply("a").outcome, Outcome::Released);
    let reply = a.reply("c");
    assert_eq!(
        (reply.outcome, reply.fence, reply.waited_ms),
        (Outcome::Granted, Some(3), Some(250))
    );
    assert_eq!(s.holders("g0"), vec!["b", "c"]);
}

#[test]
fn best_fit_across_gpus() {
    // requests in sequence on g0 (1000 MB) and g1 (500 MB): vram -> GPU (None: queued)
    let cases: &[(Option<u64>, Option<&str>)] = &[
        (Some(400), Some("g1")), // leaves 100 on g1, 600 on g0
        (Some(600), Some("g0")), // does not fit g1 any more
        (Some(100), Some("g1")), // leaves 0 on g1
        (Some(400), Some("g0")), // fills g0
        (Some(1), None),
        (None, None),
    ];
    let mut s = sim(&[("g1", 500), ("g0", 1_000)]);
    for (i, &(vram, want)) in cases.iter().enumerate() {
        let id = format!("r{i}");
        let mut r = req(&id, 1);
        r.0.vram_mb = vram;
        let a = s.request("svc", r);
        match want {
            Some(gpu) => assert_eq!(a.reply(&id).gpu.as_deref(), Some(gpu), "{id}"),
            None => assert_eq!(a.events(&id), vec![Requested, Queued], "{id}"),
        }
    }
    // A tie goes to the first GPU by id.
    let mut s = sim(&[("g1", 500), ("g0", 500)]);
    assert_eq!(
        s.request("svc", req("t", 1).vram(200))
            .reply("t")
            .gpu
            .as_deref(),
        Some("g0")
    );
}

#[test]
fn a_pinned_request_uses_only_its_gpu() {
    let mut s = sim(&[("g0", 1_000), ("g1", 500)]);
    // g1 would fit better; the pin wins.
    assert_eq!(
        s.request("a", req("a", 1).vram(400).gpu("g0"))
            .reply("a")
            .gpu
            .as_deref(),
        Some("g0")
    );
    assert_eq!(
        s.request("b", req("b", 1).vram(500).gpu("g1"))
            .reply("b")
            .gpu
            .as_deref(),
        Some("g1")
    );
    // g0 has 600 MB free, but c is pinned to the full g1.
    let a = s.request("c", req("c", 1).vram(100).gpu("g1"));
    assert_eq!(a.events("c"), vec![Requested, Queued]);
    assert_eq!(a.event("c", Queued).gpu.as_deref(), Some("g1"));
    let a = s.release("b", "b", None);
    assert_eq!(a.reply("c").gpu.as_deref(), Some("g1"));
}

#[test]
fn impossible_requests_are_rejected() {
    // (request, words the error must contain)
    let cases: Vec<(harness::Req, &[&str])> = vec![
        (req("r", 1).gpu("g9"), &["`gpu`", "g9", "g0, g1"]),
        (req("r", 1).vram(2_000), &["vram_mb", "2000", "1000"]),
        (req("r", 1).vram(800).gpu("g1"), &["vram_mb", "800", "500"]),
    ];
    for (r, words) in cases {
        let mut s = sim(&[("g0", 1_000), ("g1", 500)]);
        let a = s.request("svc", r.clone());
        let reply = a.reply("r");
        assert_eq!(reply.outcome, Outcome::Rejected);
        let error = reply.error.clone().expect("a rejection says why");
        for word in words {
            assert!(error.contains(word), "{error:?} lacks {word:?}");
        }
        assert_eq!(a.events("r"), vec![Requested, EventKind::Rejected]);
        assert_eq!(
            a.event("r", EventKind::Rejected).detail.as_ref(),
            Some(&error)
        );
        assert!(a.lease_ops().is_empty());
        let rec = a.persisted("r").expect("the end is persisted");
        assert_eq!((rec.phase, rec.end), (Phase::Ended, Some(End::Rejected)));
        assert!(s.queue().is_empty());
        // Asked again: the same answer, not queued.
        let a = s.request("svc", r);
        assert_eq!(a.reply("r").outcome, Outcome::Rejected);
        assert_eq!(a.reply("r").error.as_ref(), Some(&error));
        assert!(a.events("r").is_empty());
    }
}

/// Every rejection carries a stable code beside its sentence, in the reply and in the `rejected`
/// event alike; a repeated request is answered with the code it was first rejected with.
#[test]
fn every_rejection_says_why_with_a_code() {
    use gpu_coordinator_wire::RejectCode as Code;
    let mut s = sim_with(
        SchedConfig {
            max_per_service: 2,
            ..config()
        },
        &[("g0", 1_000)],
    );
    let mut seen = Vec::new();
    let mut check = |a: harness::Acts, id: &str, code: Code| {
        let reply = a.reply(id);
        assert_eq!(
            (reply.outcome, reply.code),
            (Outcome::Rejected, Some(code)),
            "{id}: {reply:?}"
        );
        assert!(reply.error.is_some(), "{id}: a sentence too");
        assert_eq!(a.event(id, EventKind::Rejected).code, Some(code), "{id}");
        seen.push(code);
    };
    check(
        s.request("a", req("pin", 1).gpu("g9")),
        "pin",
        Code::UnknownGpu,
    );
    check(
        s.request("a", req("big", 1).vram(2_000)),
        "big",
        Code::TooLarge,
    );
    // Asked again, and after a restart: the first answer, code included.
    let again = s.request("a", req("big", 1).vram(2_000));
    assert_eq!(again.reply("big").code, Some(Code::TooLarge));
    s.restart(10, true);
    let again = s.request("a", req("big", 1).vram(2_000));
    assert_eq!(again.reply("big").code, Some(Code::TooLarge));
    s.request("a", req("hold", 1).vram(600));
    s.request("a", req("wait", 1).vram(600));
    check(s.request("b", req("hold", 1)), "hold", Code::RequestIdTaken);
    check(
        s.request("a", req("more", 1).vram(10)),
        "more",
        Code::TooManyRequests,
    );
    let fence = s.fence("hold");
    check(
        s.renew("a", "hold", Some(fence + 7), None),
        "hold",
        Code::StaleFence,
    );
    check(s.renew("a", "wait", None, None), "wait", Code::NotHolding);
    check(
        s.renew("a", "nobody", None, None),
        "nobody",
        Code::UnknownRequest,
    );
    check(s.cancel("a", "hold"), "hold", Code::HoldsGpu);
    check(
        s.ack("a", "hold", Some(fence), AckAction::Paused),
        "hold",
        Code::UnexpectedAck,
    );
    check(
        s.invalid(Some("a"), Some("bad"), "field `priority` is required"),
        "bad",
        Code::InvalidInput,
    );
    // A pause not acknowledged in time: its renewal is refused.
    s.request("c", req("urgent", 0).vram(1_000));
    s.advance(ACK_MS + 1);
    check(
        s.renew("a", "hold", Some(fence), None),
        "hold",
        Code::PauseDeadlinePassed,
    );
    s.release("a", "wait", None);
    check(s.renew("a", "wait", None, None), "wait", Code::AlreadyEnded);
    for code in [
        Code::UnknownGpu,
        Code::TooLarge,
        Code::RequestIdTaken,
        Code::TooManyRequests,
        Code::StaleFence,
        Code::NotHolding,
        Code::UnknownRequest,
        Code::HoldsGpu,
        Code::UnexpectedAck,
        Code::InvalidInput,
        Code::PauseDeadlinePassed,
        Code::AlreadyEnded,
    ] {
        assert!(seen.contains(&code), "{code:?} was tried");
    }
}

/// A queued request whose pinned GPU is gone after a restart can never be granted: it is rejected as
/// `unplaceable`, and its record keeps the code.
#[test]
fn a_request_pinned_to_a_gpu_that_left_is_rejected_as_unplaceable() {
    let mut s = sim(&[("g0", 1_000), ("g1", 1_000)]);
    s.request("a", req("hold", 1).vram(1_000).gpu("g1"));
    s.request("a", req("wait", 1).vram(500).gpu("g1"));
    let snapshot = s.snapshot(true);
    let (r, a) = Sim::restored(config(), gpus(&[("g0", 1_000)]), snapshot, s.now + 10);
    let reply = a.reply("wait");
    assert_eq!(
        (reply.outcome, reply.code),
        (
            Outcome::Rejected,
            Some(gpu_coordinator_wire::RejectCode::Unplaceable)
        ),
        "{reply:?}"
    );
    assert_eq!(
        a.event("wait", EventKind::Rejected).code,
        Some(gpu_coordinator_wire::RejectCode::Unplaceable)
    );
    assert_eq!(
        r.record("wait").code,
        Some(gpu_coordinator_wire::RejectCode::Unplaceable)
    );
}

#[test]
fn a_service_may_have_only_so_many_live_requests() {
    let mut s = sim_with(
        SchedConfig {
            max_per_service: 2,
            ..config()
        },
        &[("g0", 1_000)],
    );
    s.request("asr", req("a1", 1).vram(1_000));
    s.request("asr", req("a2", 1).vram(1_000));
    let a = s.request("asr", req("a3", 1).vram(1_000));
    let reply = a.reply("a3");
    assert_eq!(reply.outcome, Outcome::Rejected);
    let error = reply.error.as_deref().unwrap_or_default();
    assert!(
        error.contains("queue.max_per_service") && error.contains('2'),
        "{error}"
    );
    // Other services are not limited by asr's count.
    let a = s.request("chat", req("c1", 1).vram(1_000));
    a.no_reply("c1");
    // One ends: asr may ask again.
    s.cancel("asr", "a2");
    let a = s.request("asr", req("a4", 1).vram(1_000));
    a.no_reply("a4");
}

#[test]
fn the_status_lists_a_page_of_the_queue_with_its_total_and_counts() {
    let mut s = sim(&[("g0", 1_000), ("g1", 1_000)]);
    s.request("hold", req("h0", 0).vram(1_000).gpu("g0"));
    s.request("hold", req("h1", 0).vram(1_000).gpu("g1"));
    for i in 0..30 {
        let r = req(&format!("q{i}"), (i % 3) as u8).vram(500);
        let r = if i < 10 { r.gpu("g1") } else { r };
        s.request("wait", r);
    }
    let full = s.status();
    assert_eq!((full.queue.len(), full.queue_total), (30, 30));
    let page = s.sched.status_page(
        s.now,
        gpu_coordinator_core::QueuePage {
            offset: 5,
            limit: 10,
        },
    );
    assert_eq!(page.queue_total, 30);
    assert_eq!(page.queue_offset, 5);
    assert_eq!(page.queue, full.queue[5..15].to_vec());
    let counted: Vec<(u8, Option<&str>, u64)> = page
        .queue_counts
        .iter()
        .map(|c| (c.priority, c.gpu.as_deref(), c.queued))
        .collect();
    // 10 pinned to g1 (i < 10) and 20 for any GPU, over priorities i % 3.
    assert_eq!(
        counted,
        vec![
            (0, None, 6),
            (0, Some("g1"), 4),
            (1, None, 7),
            (1, Some("g1"), 3),
            (2, None, 7),
            (2, Some("g1"), 3),
        ]
    );
    let empty = s.sched.status_page(
        s.now,
        gpu_coordinator_core::QueuePage {
            offset: 0,
            limit: 0,
        },
    );
    assert!(empty.queue.is_empty());
    assert_eq!(empty.queue_counts, page.queue_counts);
}

#[test]
fn a_whole_gpu_request_waits_for_an_empty_gpu() {
    let mut s = sim(&[("g0", 1_000)]);
    s.request("s1", req("a", 1).vram(100));
    let a = s.request("s2", req("w", 1));
    assert_eq!(a.events("w"), vec![Requested, Queued]);
    // The blocked head keeps its GPU: a small later request does not pass it.
    let a = s.request("s3", req("b", 2).vram(100));
    assert_eq!(a.events("b"), vec![Requested, Queued]);
    let a = s.release("s1", "a", None);
    let reply = a.reply("w");
    assert_eq!(
        (reply.outcome, reply.vram_mb),
        (Outcome::Granted, Some(1_000))
    );
    assert_eq!(s.queue(), vec!["b"]);
}

// ----- preemption -------------------------------------------------------------------------------------

#[test]
fn preemption_pauses_the_least_urgent_most_recent_holders_only_as_needed() {
    // Holders on g0 (1000 MB), granted in this order: p1 (prio 1, 300), p3a (prio 3, 300),
    // p3b (prio 3, 300); 100 MB free. (urgent vram, urgent priority) -> holders paused, in order.
    let cases: &[(Option<u64>, u8, &[&str])] = &[
        (Some(100), 0, &[]),
        (Some(350), 0, &["p3b"]),
        (Some(650), 0, &["p3b", "p3a"]),
        (Some(1_000), 0, &["p3b", "p3a", "p1"]),
        (None, 0, &["p3b", "p3a", "p1"]),
        (Some(350), 2, &["p3b"]),
        // Pausing both priority-3 holders would not make room: nobody is paused for nothing.
        (Some(800), 2, &[]),
    ];
    for &(vram, priority, want) in cases {
        let mut s = sim(&[("g0", 1_000)]);
        for (id, p) in [("p1", 1), ("p3a", 3), ("p3b", 3)] {
            s.request(id, req(id, p).vram(300));
            s.advance(10);
        }
        let mut r = req("u", priority);
        r.0.vram_mb = vram;
        let a = s.request("urgent", r);
        let paused: Vec<&str> = a
            .all_controls()
            .iter()
            .map(|(service, c)| {
                assert_eq!(c.action, Pause);
                assert_eq!(*service, c.request_id);
                assert_eq!(c.deadline_ms, Some(ACK_MS));
                assert_eq!(c.fence, s.fence(&c.request_id));
                assert!(c.reason.to_string().contains("`u`"), "{}", c.reason);
                c.request_id.as_str()
            })
            .collect();
        assert_eq!(paused, want, "vram {vram:?} priority {priority}");
        for id in want {
            assert_eq!(a.events(id), vec![Preempting]);
            assert_eq!(s.phase(id), Phase::Pausing);
        }
        let fits_now = want.is_empty() && vram == Some(100);
        if fits_now {
            assert_eq!(a.reply("u").outcome, Outcome::Granted);
        } else {
            a.no_reply("u");
            assert_eq!(a.events("u"), vec![Requested, Queued]);
        }
    }
}

#[test]
fn equal_or_lower_priority_never_preempts() {
    for (holder, asker) in [(1, 1), (1, 2), (0, 0), (0, 255)] {
        let mut s = sim(&[("g0", 1_000)]);
        s.request("h", req("h", holder));
        let a = s.request("q", req("q", asker));
        assert_eq!(a.events("q"), vec![Requested, Queued]);
        assert!(a.all_controls().is_empty(), "holder {holder} asker {asker}");
        assert_eq!(s.phase("h"), Phase::Active);
    }
}

#[test]
fn a_non_preemptible_holder_is_never_paused() {
    let mut s = sim(&[("g0", 1_000)]);
    s.request("n3", req("n3", 3).vram(500).preemptible(false));
    s.request("p2", req("p2", 2).vram(500));
    // The priority-2 holder is paused, although the priority-3 one is less urgent.
    let a = s.request("u", req("u", 0).vram(500));
    assert_eq!(a.control_actions("p2"), vec![Pause]);
    assert!(a.controls("n3").is_empty());
    // Nothing but n3's own release makes room for the whole GPU.
    let a = s.request("w", req("w", 0));
    assert!(a.all_controls().is_empty());
    s.ack_paused("p2", "p2");
    let a = s.advance(2 * ACK_MS);
    assert!(a.controls("n3").is_empty());
    assert_eq!(s.phase("n3"), Phase::Active);
}

#[test]
fn a_pausing_holder_counts_until_its_ack() {
    let mut s = sim(&[("g0", 1_000)]);
    s.request("asr", req("asr", 2));
    let a = s.request("chat", req("chat", 0).vram(600));
    assert_eq!(a.control_actions("asr"), vec![Pause]);
    let a = s.advance(ACK_MS - 1);
    assert!(a.is_empty(), "no grant before the ACK: {a:#?}");
    let g0 = &s.status().gpus[0];
    assert_eq!((g0.free_mb, g0.holders[0].state), (0, HolderState::Pausing));
    // A small request that would fit once asr pauses does not get its VRAM either.
    let a = s.request("voice", req("voice", 1).vram(100));
    assert_eq!(a.events("voice"), vec![Requested, Queued]);
    // The pausing holder still holds a lease it may renew.
    assert_eq!(
        s.renew("asr", "asr", Some(1), None).reply("asr").outcome,
        Outcome::Renewed
    );
}

#[test]
fn the_ack_pauses_the_holder_and_grants_the_urgent_request() {
    let mut s = sim(&[("g0", 1_000)]);
    s.request("asr", req("asr", 2));
    s.request("chat", req("chat", 0));
    s.advance(100);
    let a = s.ack("asr", "asr", Some(1), AckAction::Paused);
    assert_eq!(a.events("asr"), vec![Paused]);
    a.no_reply("asr");
    assert_eq!(
        a.lease_ops(),
        vec![
            &LeaseOp::Release {
                request_id: "asr".into(),
                gpu: "g0".into(),
                fence: Fence(1)
            },
            &LeaseOp::Acquire(Lease {
                request_id: "chat".into(),
                service_id: "chat".into(),
                gpu: "g0".into(),
                fence: Fence(2),
                vram_mb: 1_000,
                capacity_mb: 1_000,
                expires_at: T0 + 100 + 30_000,
            }),
        ]
    );
    let reply = a.reply("chat");
    assert_eq!(
        (reply.outcome, reply.fence, reply.waited_ms),
        (Outcome::Granted, Some(2), Some(100))
    );
    assert_eq!(s.phase("asr"), Phase::Paused);
    let status = s.status();
    assert_eq!(status.paused.len(), 1);
    assert_eq!(status.paused[0].request_id, "asr");
    assert!(status.queue[0].paused);
    // A repeated ACK (a redelivery) changes nothing.
    let a = s.ack("asr", "asr", Some(1), AckAction::Paused);
    assert!(a.is_empty(), "{a:#?}");
}

#[test]
fn the_urgent_release_resumes_the_paused_holder_with_a_new_fence_and_lease() {
    let mut s = sim(&[("g0", 1_000)]);
    s.request("asr", req("asr", 2).lease(20_000));
    s.request("chat", req("chat", 0));
    s.ack_paused("asr", "asr");
    s.advance(1_000);
    let a = s.release("chat", "chat", Some(2));
    assert_eq!(a.reply("chat").outcome, Outcome::Released);
    let resume = a.control("asr", Resume);
    assert_eq!(resume.fence, 3);
    assert_eq!(resume.lease_ms, Some(20_000));
    assert_eq!(resume.expires_at, Some(T0 + 1_000 + 20_000));
    assert_eq!(resume.gpu.as_deref(), Some("g0"));
    assert_eq!(a.events("asr"), vec![Resumed]);
    a.no_reply("asr");
    assert!(a.lease_ops_for("asr").iter().any(
        |op| matches!(op, LeaseOp::Acquire(l) if l.fence == Fence(3) && l.expires_at == T0 + 21_000)
    ));
    assert_eq!(s.phase("asr"), Phase::Active);
    // The service confirms; the old fence is stale now.
    assert!(s.ack("asr", "asr", Some(3), AckAction::Resumed).is_empty());
    let a = s.renew("asr", "asr", Some(1), None);
    assert_eq!(a.reply("asr").outcome, Outcome::Rejected);
}

#[test]
fn a_renewal_stored_while_no_coordinator_acted_keeps_the_lease_after_a_restart() {
    let mut s = sim(&[("g0", 1_000)]);
    s.request("asr", req("asr", 2).lease(2_000));
    s.advance(1_500);
    // The coordinator dies; the holder renews in time, twice (stored at T0 + 1.5 s and T0 + 3 s); a
    // new one starts at T0 + 4.5 s, past the expiry the old one knew, and finds the renewals waiting
    // in the input stream.
    let renew = || {
        let msg = RenewMsg {
            request_id: "asr".into(),
            fence: Some(1),
            lease_ms: None,
        };
        Sim::from("asr", Inbound::Renew(msg))
    };
    let waiting = vec![(renew(), s.now), (renew(), s.now + 1_500)];
    let a = s.restart_with_inputs(3_000, waiting);
    let outcomes: Vec<Outcome> = a.replies_for("asr").iter().map(|r| r.outcome).collect();
    assert_eq!(outcomes, vec![Outcome::Renewed, Outcome::Renewed]);
    assert!(!a.events("asr").contains(&Revoked), "{:?}", a.events("asr"));
    assert_eq!(s.phase("asr"), Phase::Active);
}

/// After a restart the lease store no longer holds a lease that ran out there while no coordinator
/// acted. The first renewal stored meanwhile is handled, and the store answers its write "not held";
/// the driver hands that answer in at the time now: it fires no timer, so the later renewals, stored
/// in time but not yet read, still keep the lease. (Driven without the harness's store model, which
/// holds every lease the core holds.)
#[test]
fn a_lease_store_answer_fires_no_timer_before_the_renewals_stored_in_time() {
    use gpu_coordinator_core::{Action, Scheduler};
    let mut s = sim(&[("g0", 1_000)]);
    s.request("asr", req("asr", 2).lease(1_000));
    let fence = Fence(s.fence("asr"));
    let renew = || {
        let msg = RenewMsg {
            request_id: "asr".into(),
            fence: Some(fence.0),
            lease_ms: None,
        };
        Sim::from("asr", Inbound::Renew(msg))
    };
    let stopped_at = s.now;
    // Stopped for 2.5 s while the holder renewed every 300 ms; the store lost the lease meanwhile.
    let snapshot = s.snapshot(false);
    let now = stopped_at + 2_500;
    let mut sched = Scheduler::new(s.config.clone(), s.specs.clone());
    sched.restore(snapshot, now);
    // The outcomes of the replies, and whether a revoke was ordered.
    let drain = |sched: &mut Scheduler| {
        let (mut outcomes, mut revoked) = (Vec::new(), false);
        while let Some(action) = sched.poll_action() {
            match action {
                Action::Reply { reply, .. } => outcomes.push(reply.outcome),
                Action::Control { control, .. } => revoked |= control.action == Revoke,
                _ => {}
            }
        }
        (outcomes, revoked)
    };
    sched.handle_inputs(vec![(renew(), stopped_at + 300)]);
    // The store's answer to that renewal's write, handed in at the time now.
    sched.handle_input(
        Input::LeaseNotHeld {
            request_id: "asr".into(),
            fence,
        },
        now,
    );
    let (mut outcomes, revoked) = drain(&mut sched);
    assert!(!revoked, "revoked by the store's answer");
    sched.handle_inputs((2..=8).map(|i| (renew(), stopped_at + 300 * i)));
    sched.handle_timeout(now);
    let (later, revoked) = drain(&mut sched);
    assert!(!revoked, "revoked though every renewal was stored in time");
    outcomes.extend(later);
    assert_eq!(outcomes, vec![Outcome::Renewed; 8]);
    assert_eq!(sched.record("asr").map(|r| r.phase), Some(Phase::Active));
}

#[test]
fn a_late_copy_of_an_ack_without_a_fence_does_not_answer_a_newer_pause() {
    let mut s = sim(&[("g0", 1_000)]);
    s.request("asr", req("asr", 2).lease(20_000));
    s.request("chat", req("chat", 0));
    s.advance(100);
    let first_ack_at = s.now;
    s.ack("asr", "asr", None, AckAction::Paused);
    s.advance(1_000);
    s.release("chat", "chat", Some(2));
    assert_eq!(s.phase("asr"), Phase::Active);
    s.advance(1_000);
    s.request("voice", req("voice", 0));
    assert_eq!(s.phase("asr"), Phase::Pausing);
    // A copy of the first ACK, stored before this pause was ordered (a retry, a duplicate), comes now:
    // the holder has not answered this pause, and still runs.
    let ack = |fence| {
        Inbound::Ack(AckMsg {
            request_id: "asr".into(),
            fence,
            action: AckAction::Paused,
        })
    };
    let a = s.batch(vec![(Sim::from("asr", ack(None)), first_ack_at)]);
    let rejected = a.reply("asr");
    assert_eq!(rejected.outcome, Outcome::Rejected);
    assert!(
        rejected
            .error
            .as_deref()
            .unwrap_or("")
            .contains("late copy"),
        "{rejected:?}"
    );
    assert_eq!(s.phase("asr"), Phase::Pausing);
    assert!(a.granted().is_empty(), "nothing is granted on a late ACK");
    // Its own ACK, stored after the order, pauses it.
    let now = s.now;
    let a = s.batch(vec![(Sim::from("asr", ack(None)), now)]);
    assert_eq!(s.phase("asr"), Phase::Paused);
    assert_eq!(a.granted(), vec!["voice".to_string()]);
}

#[test]
fn a_release_and_an_urgent_request_in_one_batch_do_not_resume_a_holder_to_pause_it() {
    let mut s = sim(&[("g0", 1_000)]);
    s.request("asr", req("asr", 2).lease(20_000));
    s.request("chat", req("chat", 0));
    s.ack_paused("asr", "asr");
    s.advance(1_000);
    let now = s.now;
    let release = Inbound::Release(ReleaseMsg {
        request_id: Some("chat".into()),
        fence: Some(2),
    });
    let mut voice = req("voice", 0).0;
    voice.service_id = Some("voice".into());
    let a = s.batch(vec![
        (Sim::from("chat", release), now),
        (Sim::from("voice", Inbound::Request(voice)), now),
    ]);
    assert_eq!(a.granted(), vec!["voice".to_string()]);
    assert!(a.controls("asr").is_empty(), "no resume, no pause: {a:?}");
    assert!(a.events("asr").is_empty(), "{:?}", a.events("asr"));
    assert_eq!(s.phase("asr"), Phase::Paused);
}

#[test]
fn a_paused_request_goes_back_ahead_of_later_arrivals_of_its_priority() {
    let mut s = sim(&[("g0", 1_000)]);
    s.request("asr", req("asr1", 2));
    s.request("chat", req("chat", 0));
    s.ack_paused("asr", "asr1");
    s.advance(10);
    s.request("asr", req("asr2", 2));
    s.request("voice", req("voice", 1));
    assert_eq!(s.queue(), vec!["voice", "asr1", "asr2"]);
    let a = s.release("chat", "chat", None);
    assert_eq!(a.granted(), vec!["voice"]);
    let a = s.release("voice", "voice", None);
    assert_eq!(a.control_actions("asr1"), vec![Resume]);
    assert!(a.events("asr2").is_empty());
}

#[test]
fn no_ack_by_the_deadline_revokes_when_the_lease_runs_out_then_grants() {
    let mut s = sim(&[("g0", 1_000)]);
    s.request("asr", req("asr", 2));
    s.request("chat", req("chat", 0));
    let expiry = s.record("asr").expires_at.expect("a lease");
    assert!(expiry > T0 + ACK_MS, "the lease outlasts the deadline");
    // Past the deadline the holder may not have heard the pause (cut off from NATS): it uses the GPU
    // until its lease runs out, as far as it knows. The lease is no longer renewed.
    let a = s.advance(ACK_MS);
    assert!(a.control_actions("asr").is_empty(), "{a:?}");
    assert!(a.granted().is_empty());
    let a = s.renew("asr", "asr", Some(1), None);
    let refused = a.reply("asr");
    assert_eq!(refused.outcome, Outcome::Rejected);
    assert!(
        refused
            .error
            .as_deref()
            .unwrap_or("")
            .contains("did not ACK"),
        "{refused:?}"
    );
    let a = s.advance_to(expiry);
    assert_eq!(a.control_actions("asr"), vec![Revoke]);
    assert!(a.control("asr", Revoke).reason.to_string().contains("ACK"));
    assert_eq!(a.events("asr"), vec![Revoked]);
    assert_eq!(a.reply("chat").outcome, Outcome::Granted);
    // The revoke (and its lease release) comes before the grant.
    let pos = |pred: &dyn Fn(&gpu_coordinator_core::Action) -> bool| {
        a.0.iter().position(pred).expect("present")
    };
    let revoke = pos(
        &|x| matches!(x, gpu_coordinator_core::Action::Control { control, .. } if control.action == Revoke),
    );
    let release = pos(
        &|x| matches!(x, gpu_coordinator_core::Action::Lease(LeaseOp::Release { request_id, .. }) if request_id == "asr"),
    );
    let grant = pos(&|x| matches!(x, gpu_coordinator_core::Action::Lease(LeaseOp::Acquire(_))));
    assert!(revoke < grant && release < grant, "{a:#?}");
    let rec = s.record("asr");
    assert_eq!((rec.phase, rec.end), (Phase::Ended, Some(End::Revoked)));
    // A late ACK is refused, readably.
    let a = s.ack("asr", "asr", Some(1), AckAction::Paused);
    let error = a.reply("asr").error.clone().expect("why");
    assert!(
        error.contains("already ended") && error.contains("revoked"),
        "{error}"
    );
}

#[test]
fn an_expired_lease_is_revoked_then_restarted() {
    let mut s = sim(&[("g0", 1_000)]);
    s.request("asr", req("asr", 2).lease(10_000));
    s.request("other", req("q", 2));
    assert!(s.advance(9_999).is_empty());
    let a = s.advance(1);
    assert_eq!(a.control_actions("asr"), vec![Revoke, Restart]);
    assert_eq!(a.events("asr"), vec![Expired, Revoked]);
    assert!(a
        .control("asr", Revoke)
        .reason
        .to_string()
        .contains("expired"));
    assert_eq!(
        a.lease_ops_for("asr"),
        vec![&LeaseOp::Release {
            request_id: "asr".into(),
            gpu: "g0".into(),
            fence: Fence(1)
        }]
    );
    assert_eq!(a.reply("q").outcome, Outcome::Granted);
    assert_eq!(s.record("asr").end, Some(End::Revoked));
}

#[test]
fn a_pausing_holder_keeps_its_lease_until_the_pause_deadline() {
    // The lease (3 s) would run out before the ACK deadline (5 s): a holder told to pause stops
    // renewing, so the pause extends its lease to the deadline, in the lease store too.
    let mut s = sim(&[("g0", 1_000)]);
    s.request("asr", req("asr", 2).lease(3_000));
    let a = s.request("chat", req("chat", 0));
    assert_eq!(a.control_actions("asr"), vec![Pause]);
    assert_eq!(
        a.lease_ops_for("asr"),
        vec![&LeaseOp::Renew {
            request_id: "asr".into(),
            gpu: "g0".into(),
            fence: Fence(1),
            expires_at: T0 + ACK_MS,
        }]
    );
    let a = s.advance(3_000);
    assert!(a.control_actions("asr").is_empty(), "not revoked at 3 s");
    // The ACK at 4 s pauses it, as it would have within a longer lease.
    s.advance(1_000);
    let a = s.ack_paused("asr", "asr");
    assert_eq!(a.events("asr"), vec![Paused]);
    assert_eq!(a.reply("chat").outcome, Outcome::Granted);

    // Without an ACK the deadline revokes it, for the missing ACK and not as an expiry.
    let mut s = sim(&[("g0", 1_000)]);
    s.request("asr", req("asr", 2).lease(3_000));
    s.request("chat", req("chat", 0));
    let a = s.advance(ACK_MS);
    assert_eq!(a.control_actions("asr"), vec![Revoke]);
    assert_eq!(a.events("asr"), vec![Revoked]);
    assert_eq!(a.reply("chat").outcome, Outcome::Granted);
}

#[test]
fn a_renewal_extends_the_lease() {
    let mut config = config();
    config.lease_max_ms = 50_000;
    let mut s = sim_with(config, &[("g0", 1_000)]);
    s.request("asr", req("asr", 2).lease(10_000));
    s.advance(6_000);
    let a = s.renew("asr", "asr", Some(1), None);
    let reply = a.reply("asr");
    assert_eq!(reply.outcome, Outcome::Renewed);
    assert_eq!((reply.fence, reply.lease_ms), (Some(1), Some(10_000)));
    assert_eq!(reply.expires_at, Some(T0 + 16_000));
    assert_eq!(a.events("asr"), vec![Renewed]);
    assert_eq!(
        a.lease_ops(),
        vec![&LeaseOp::Renew {
            request_id: "asr".into(),
            gpu: "g0".into(),
            fence: Fence(1),
            expires_at: T0 + 16_000
        }]
    );
    // The old expiry passes quietly.
    assert!(s.advance(4_000).is_empty());
    assert_eq!(s.phase("asr"), Phase::Active);
    // A longer renewal is capped by lease.max_ms.
    let a = s.renew("asr", "asr", None, Some(1_000_000));
    assert_eq!(a.reply("asr").lease_ms, Some(50_000));
    assert_eq!(s.record("asr").expires_at, Some(T0 + 10_000 + 50_000));
    assert!(s.advance(49_999).is_empty());
    assert_eq!(s.advance(1).control_actions("asr"), vec![Revoke, Restart]);
    // Only a held lease can be renewed.
    s.request("q", req("q", 1));
    s.request("w", req("w", 1));
    let a = s.renew("w", "w", None, None);
    assert_eq!(a.reply("w").outcome, Outcome::Rejected);
    assert!(a
        .reply("w")
        .error
        .as_ref()
        .is_some_and(|e| e.contains("queued")));
}

#[test]
fn a_request_times_out_waiting() {
    for (timeout, want) in [(Some(2_000), 2_000), (None, 60_000)] {
        let mut s = sim(&[("g0", 1_000)]);
        s.request("h", req("h", 0).lease(3_600_000));
        let mut r = req("q", 1);
        r.0.timeout_ms = timeout;
        s.request("q", r);
        assert!(s.advance(want - 1).events("q").is_empty());
        let a = s.advance(1);
        let reply = a.reply("q");
        assert_eq!(
            (reply.outcome, reply.waited_ms),
            (Outcome::TimedOut, Some(want))
        );
        assert!(reply
            .error
            .as_ref()
            .is_some_and(|e| e.contains(&format!("{want} ms"))));
        assert_eq!(a.events("q"), vec![TimedOut]);
        assert_eq!(a.persisted("q").and_then(|r| r.end), Some(End::TimedOut));
        assert!(s.queue().is_empty());
    }
}

#[test]
fn cancel_withdraws_queued_and_paused_requests_only() {
    let mut s = sim(&[("g0", 1_000)]);
    s.request("asr", req("asr", 2));
    s.request("chat", req("chat", 0));
    s.request("voice", req("voice", 1));
    // A holder (even a pausing one) is released, not cancelled.
    let a = s.cancel("asr", "asr");
    let error = a.reply("asr").error.clone().expect("why");
    assert!(error.contains("release"), "{error}");
    assert_eq!(
        a.event("asr", EventKind::Rejected).detail.as_ref(),
        Some(&error)
    );
    assert_eq!(s.phase("asr"), Phase::Pausing);
    s.ack_paused("asr", "asr");
    let a = s.cancel("chat", "chat");
    assert_eq!(a.reply("chat").outcome, Outcome::Rejected);
    // Queued.
    let a = s.cancel("voice", "voice");
    assert_eq!(a.reply("voice").outcome, Outcome::Cancelled);
    assert_eq!(a.events("voice"), vec![Cancelled]);
    // Paused: its lease went with the ACK; nothing more to release.
    let a = s.cancel("asr", "asr");
    assert_eq!(a.reply("asr").outcome, Outcome::Cancelled);
    assert_eq!(a.events("asr"), vec![Cancelled]);
    assert!(a.lease_ops().is_empty());
    assert!(s.queue().is_empty());
    // Once more: it has ended.
    let a = s.cancel("asr", "asr");
    assert!(a
        .reply("asr")
        .error
        .as_ref()
        .is_some_and(|e| e.contains("already ended (cancelled)")));
}

#[test]
fn a_repeated_request_id_is_answered_with_its_current_state() {
    let mut s = sim(&[("g0", 1_000)]);
    s.request("asr", req("asr", 2));
    s.request("chat", req("chat", 0));
    s.request("voice", req("voice", 1));
    s.advance(700);
    // (service, id, the state it is in) -> outcome of the repeat
    let cases = [
        ("chat", "chat", Outcome::Queued),
        ("voice", "voice", Outcome::Queued),
        ("asr", "asr", Outcome::Granted),
    ];
    for (service, id, outcome) in cases {
        // Repeated in the other encoding: answered in the request's own.
        let a = s.request_enc(service, Encoding::MsgPack, req(id, 9).vram(1));
        assert_eq!(a.reply(id).outcome, outcome, "{id}");
        assert!(a.events(id).is_empty());
        assert!(a.0.iter().all(|x| !matches!(
            x,
            gpu_coordinator_core::Action::Reply {
                encoding: Encoding::MsgPack,
                ..
            }
        )));
    }
    let a = s.request("chat", req("chat", 0));
    assert_eq!(a.reply("chat").waited_ms, Some(700));
    let a = s.request("asr", req("asr", 2));
    let reply = a.reply("asr");
    assert_eq!(
        (reply.fence, reply.gpu.as_deref(), reply.vram_mb),
        (Some(1), Some("g0"), Some(1_000))
    );
    s.ack_paused("asr", "asr");
    assert_eq!(
        s.request("asr", req("asr", 2)).reply("asr").outcome,
        Outcome::Paused
    );
    s.release("chat", "chat", None);
    let a = s.request("chat", req("chat", 0));
    assert_eq!(a.reply("chat").outcome, Outcome::Released);
    assert!(a.events("chat").is_empty() && a.lease_ops().is_empty());
    assert_eq!(s.queue(), vec!["asr"]);
    // Another service cannot take the id.
    let a = s.request("thief", req("voice", 0));
    let reply = a.reply("voice");
    assert_eq!(reply.outcome, Outcome::Rejected);
    assert!(reply
        .error
        .as_ref()
        .is_some_and(|e| e.contains("already used by service `voice`")));
    assert_eq!(a.replies()[0].0, "thief");
    assert_eq!(s.record("voice").service_id, "voice");
    assert_eq!(s.phase("voice"), Phase::Active);
}

#[test]
fn stale_fences_and_unknown_requests_are_rejected() {
    let mut s = sim(&[("g0", 1_000)]);
    s.request("asr", req("asr", 2));
    s.request("other", req("other", 3));
    let error_of = |a: &harness::Acts, id: &str| {
        let reply = a.reply(id);
        assert_eq!(reply.outcome, Outcome::Rejected);
        let event = a.event(id, EventKind::Rejected);
        assert_eq!(event.detail, reply.error);
        reply.error.clone().expect("why")
    };
    let a = s.release("asr", "asr", Some(7));
    assert!(error_of(&a, "asr").contains("stale fence 7: the current fence of request `asr` is 1"));
    // The rejection names the current fence, for a holder whose release crossed a resume.
    assert_eq!(a.reply("asr").fence, Some(1));
    assert_eq!(s.phase("asr"), Phase::Active);
    let a = s.renew("asr", "asr", Some(0), None);
    assert!(error_of(&a, "asr").contains("stale fence 0"));
    let a = s.ack("asr", "asr", Some(2), AckAction::Paused);
    assert!(error_of(&a, "asr").contains("stale fence 2"));
    let a = s.release("asr", "nope", None);
    assert!(error_of(&a, "nope").contains("unknown request_id `nope` for service `asr`"));
    assert_eq!(a.reply("nope").fence, None);
    // Another service's request is unknown to this one.
    let a = s.release("asr", "other", None);
    assert!(error_of(&a, "other").contains("unknown request_id `other` for service `asr`"));
    // A queued request has no fence yet.
    let a = s.release("other", "other", Some(1));
    assert!(error_of(&a, "other").contains("is none"));
    assert_eq!(a.reply("other").fence, None);
    // An ACK nobody asked for.
    let a = s.ack("asr", "asr", Some(1), AckAction::Paused);
    assert!(error_of(&a, "asr").contains("not expected"));
    assert_eq!(s.phase("asr"), Phase::Active);
    assert_eq!(s.phase("other"), Phase::Queued);
}

#[test]
fn a_release_without_request_id_releases_everything_of_the_service() {
    let mut s = sim(&[("g0", 1_000)]);
    s.request("s", req("h1", 1).vram(300));
    s.request("s", req("p1", 3).vram(400));
    s.request("t", req("u", 0).vram(700));
    s.ack_paused("s", "p1");
    assert_eq!(s.phase("u"), Phase::Active);
    s.request("s", req("q1", 2).vram(500));
    s.request("t", req("v", 2).vram(300));
    assert_eq!(s.queue(), vec!["q1", "v", "p1"]);
    let a = s.release_all("s");
    for id in ["h1", "p1", "q1"] {
        assert_eq!(a.reply(id).outcome, Outcome::Released, "{id}");
        assert_eq!(a.events(id), vec![Released]);
        assert_eq!(s.phase(id), Phase::Ended);
    }
    assert_eq!(a.lease_ops_for("h1").len(), 1);
    assert!(a.lease_ops_for("p1").is_empty());
    assert_eq!(a.granted(), vec!["v"]);
    assert_eq!(s.phase("u"), Phase::Active);
    // Nothing left: nothing to say.
    assert!(s.release_all("s").is_empty());
}

#[test]
fn invalid_input_is_rejected() {
    let mut s = sim(&[("g0", 1_000)]);
    let a = s.invalid(
        Some("asr"),
        Some("r1"),
        "field `priority`: expected an integer 0-255, got \"high\"",
    );
    let replies = a.replies();
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].0, "asr");
    assert_eq!(replies[0].1.outcome, Outcome::Rejected);
    assert_eq!(replies[0].1.request_id, "r1");
    assert!(replies[0]
        .1
        .error
        .as_ref()
        .is_some_and(|e| e.contains("priority")));
    let event = a.event("r1", EventKind::Rejected);
    assert_eq!(event.service_id, "asr");
    assert!(event
        .detail
        .as_ref()
        .is_some_and(|e| e.contains("priority")));
    assert!(s.queue().is_empty() && s.sched.live_count() == 0);
    // A subject without a valid service: an event, and no reply (there is nobody to send it to).
    let a = s.invalid(None, None, "subject `gpu.request.` names no service");
    assert!(a.replies().is_empty(), "{a:#?}");
    let events = a.all_events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].kind, EventKind::Rejected);
}

#[test]
fn every_end_is_persisted_even_when_not_retained() {
    for retain_ended in [0, 1, 2] {
        let config = SchedConfig {
            retain_ended,
            ..config()
        };
        let mut s = sim_with(config, &[("g0", 1_000)]);
        s.request("s", req("a", 1).vram(100));
        s.request("s", req("b", 1).vram(100));
        s.request("s", req("c", 1).vram(100));
        // Three ends in one input: each is persisted as ended.
        let a = s.release_all("s");
        for id in ["a", "b", "c"] {
            let rec = a
                .persisted(id)
                .unwrap_or_else(|| panic!("{id}'s end is not persisted (retain {retain_ended})"));
            assert_eq!((rec.phase, rec.end), (Phase::Ended, Some(End::Released)));
        }
        let a = s.request("s", req("r", 1).vram(5_000));
        assert_eq!(a.persisted("r").map(|r| r.end), Some(Some(End::Rejected)));
    }
}

#[test]
fn external_vram_counts_against_a_gpu() {
    let mut s = sim(&[("g0", 1_000)]);
    s.outside("g0", 300);
    let a = s.request("a", req("a", 1).vram(800));
    assert_eq!(a.events("a"), vec![Requested, Queued]);
    let a = s.outside("g0", 100);
    assert_eq!(a.reply("a").vram_mb, Some(800));
    s.release("a", "a", None);
    // A whole-GPU grant holds what is left.
    assert_eq!(s.request("w", req("w", 1)).reply("w").vram_mb, Some(900));
}

// ----- configuration ----------------------------------------------------------------------------------

#[test]
fn aging_lets_an_old_request_pass_a_newer_more_urgent_one() {
    // (aging_ms, how long the priority-2 request waited, priority of the newcomer) -> grant order
    let cases: &[(u64, u64, u8, &[&str])] = &[
        (0, 1_500, 1, &["new", "old"]),
        (1_000, 999, 1, &["new", "old"]),
        (1_000, 1_500, 1, &["old", "new"]),
        (1_000, 1_500, 0, &["new", "old"]),
        (1_000, 2_000, 0, &["old", "new"]),
        (1_000, 60_000, 0, &["old", "new"]),
    ];
    for &(aging_ms, waited, newcomer, order) in cases {
        let config = SchedConfig {
            aging_ms,
            default_timeout_ms: 3_600_000,
            ..config()
        };
        let mut s = sim_with(config, &[("g0", 1_000)]);
        s.request("h", req("h", 0).preemptible(false).lease(3_600_000));
        s.request("old", req("old", 2));
        s.advance(waited);
        s.request("new", req("new", newcomer));
        assert_eq!(
            s.queue(),
            order,
            "aging {aging_ms} waited {waited} newcomer {newcomer}"
        );
        let a = s.release("h", "h", None);
        assert_eq!(a.granted(), vec![order[0].to_string()]);
    }
}

#[test]
fn min_hold_delays_a_preemption() {
    for min_hold_ms in [0, 1_000] {
        let config = SchedConfig {
            min_hold_ms,
            ..config()
        };
        let mut s = sim_with(config, &[("g0", 1_000)]);
        s.request("asr", req("asr", 2));
        s.advance(100);
        let a = s.request("chat", req("chat", 0));
        if min_hold_ms == 0 {
            assert_eq!(a.control_actions("asr"), vec![Pause]);
            continue;
        }
        assert!(a.all_controls().is_empty());
        assert_eq!(s.sched.poll_timeout(), Some(T0 + min_hold_ms));
        assert!(s.advance(min_hold_ms - 101).is_empty());
        let a = s.advance(1);
        assert_eq!(s.now, T0 + min_hold_ms);
        assert_eq!(a.control_actions("asr"), vec![Pause]);
    }
}

// ----- restore ----------------------------------------------------------------------------------------

#[test]
fn restore_seeds_fences_above_the_highest_issued() {
    // (snapshot max_fence, a stale store lease's fence, an ended record's fence) -> next fence
    let cases = [
        (41, None, None, 42),
        (41, Some(57), None, 58),
        (41, Some(57), Some(60), 61),
        (0, None, Some(5), 6),
    ];
    for (max_fence, lease_fence, record_fence, want) in cases {
        let mut first = sim(&[("g0", 1_000)]);
        first.request("old", req("old", 1));
        first.release("old", "old", None);
        let mut old = first.record("old").clone();
        old.fence = record_fence.map(Fence);
        let snapshot = Snapshot {
            max_arrival: old.arrival,
            requests: vec![old],
            max_fence: Fence(max_fence),
            leases: lease_fence
                .map(|f| Lease {
                    request_id: "gone".into(),
                    service_id: "x".into(),
                    gpu: "g0".into(),
                    fence: Fence(f),
                    vram_mb: 10,
                    capacity_mb: 1_000,
                    expires_at: T0 + 10,
                })
                .into_iter()
                .collect(),
        };
        let (mut s, a) = Sim::restored(config(), gpus(&[("g0", 1_000)]), snapshot, T0 + 5);
        if lease_fence.is_some() {
            assert_eq!(
                a.lease_ops(),
                vec![&LeaseOp::Release {
                    request_id: "gone".into(),
                    gpu: "g0".into(),
                    fence: Fence(lease_fence.unwrap_or_default())
                }]
            );
        }
        assert_eq!(
            s.request("new", req("new", 1)).reply("new").fence,
            Some(want)
        );
        // The ended request is still known.
        assert_eq!(
            s.request("old", req("old", 1)).reply("old").outcome,
            Outcome::Released
        );
    }
}

/// g0 (1000 MB): h holds 500 (non-preemptible); asr was paused for chat, which holds 500; q1
/// (priority 1) and q2 (priority 2) wait.
fn busy() -> Sim {
    let mut s = sim(&[("g0", 1_000)]);
    s.request("h", req("h", 0).vram(500).preemptible(false));
    s.request("asr", req("asr", 2).vram(500));
    s.request("chat", req("chat", 1).vram(500));
    s.ack_paused("asr", "asr");
    s.request("q", req("q2", 2).vram(500));
    s.request("q", req("q1", 1).vram(500));
    assert_eq!(s.queue(), vec!["q1", "asr", "q2"]);
    s
}

#[test]
fn restore_keeps_queued_and_paused_requests_in_order() {
    let mut s = busy();
    let before = s.status();
    let a = s.restart(1_000, true);
    assert!(a.lease_ops().is_empty(), "the store has the leases: {a:#?}");
    assert!(a.replies().is_empty() && a.all_controls().is_empty());
    assert_eq!(s.queue(), vec!["q1", "asr", "q2"]);
    assert_eq!(s.status().gpus[0].holders, before.gpus[0].holders);
    assert_eq!(s.phase("asr"), Phase::Paused);
    let a = s.release("chat", "chat", None);
    assert_eq!(a.granted(), vec!["q1"]);
    let a = s.release("q", "q1", None);
    assert_eq!(a.control("asr", Resume).fence, 5);
    s.finish();
}

#[test]
fn restore_revokes_a_lost_lease_that_expired_and_writes_back_a_valid_one() {
    let mut s = busy();
    s.renew("chat", "chat", None, Some(10_000));
    // The store lost everything; chat's lease ran out meanwhile, h's did not.
    let a = s.restart(20_000, false);
    assert_eq!(a.events("chat"), vec![Expired, Revoked]);
    assert_eq!(a.control_actions("chat"), vec![Revoke, Restart]);
    assert_eq!(s.record("chat").end, Some(End::Revoked));
    assert!(
        a.lease_ops_for("chat")
            .iter()
            .all(|op| !matches!(op, LeaseOp::Restore(_))),
        "an expired lease is not written back: {a:#?}"
    );
    let restored: Vec<&LeaseOp> = a.lease_ops_for("h");
    assert_eq!(
        restored,
        vec![&LeaseOp::Restore(Lease {
            request_id: "h".into(),
            service_id: "h".into(),
            gpu: "g0".into(),
            fence: Fence(1),
            vram_mb: 500,
            capacity_mb: 1_000,
            expires_at: T0 + 30_000,
        })]
    );
    assert!(a.controls("h").is_empty());
    // chat's VRAM goes to the head of the queue.
    assert_eq!(a.granted(), vec!["q1"]);
    assert_eq!(a.reply("q1").fence, Some(4));
    s.finish();
}

#[test]
fn restore_releases_stale_store_leases_and_trusts_the_store_expiry() {
    let s = busy();
    let mut snapshot = s.snapshot(true);
    // The coordinator stopped after persisting asr's pause, before deleting its lease; a lease of
    // a request nobody knows; chat's lease was renewed in the store.
    let asr = s.record("asr");
    snapshot.leases.push(Lease {
        request_id: "asr".into(),
        service_id: "asr".into(),
        gpu: "g0".into(),
        fence: asr.fence.expect("asr was granted"),
        vram_mb: 500,
        capacity_mb: 1_000,
        expires_at: T0 + 30_000,
    });
    snapshot.leases.push(Lease {
        request_id: "ghost".into(),
        service_id: "ghost".into(),
        gpu: "g0".into(),
        fence: Fence(2),
        vram_mb: 1,
        capacity_mb: 1_000,
        expires_at: T0 + 30_000,
    });
    for l in &mut snapshot.leases {
        if l.request_id == "chat" {
            l.expires_at = T0 + 90_000;
        }
    }
    let (mut r, a) = Sim::restored(config(), gpus(&[("g0", 1_000)]), snapshot, T0 + 100);
    let mut ops = a.lease_ops();
    ops.sort_by(|a, b| harness::lease_op_id(a).cmp(harness::lease_op_id(b)));
    assert_eq!(
        ops,
        vec![
            &LeaseOp::Release {
                request_id: "asr".into(),
                gpu: "g0".into(),
                fence: Fence(2)
            },
            &LeaseOp::Release {
                request_id: "ghost".into(),
                gpu: "g0".into(),
                fence: Fence(2)
            },
        ]
    );
    assert_eq!(r.record("chat").expires_at, Some(T0 + 90_000));
    assert_eq!(r.phase("asr"), Phase::Paused);
    r.finish();
}

#[test]
fn requests_no_gpu_left_can_take_end_at_restore() {
    // g1 (2,000 MB) is gone after the restart: a request pinned to it, and a paused one that needs
    // more than g0 has, would wait forever.
    let mut s = sim(&[("g0", 1_000), ("g1", 2_000)]);
    s.request("big", req("big", 2).vram(1_500));
    s.request("hold", req("hold", 0).vram(2_000).gpu("g1"));
    s.ack_paused("big", "big");
    s.request("pin", req("pin", 1).vram(500).gpu("g1"));
    assert_eq!(s.phase("big"), Phase::Paused);
    assert_eq!(s.phase("pin"), Phase::Queued);
    let snapshot = s.snapshot(true);
    let (mut r, a) = Sim::restored(config(), gpus(&[("g0", 1_000)]), snapshot, s.now + 10);
    let pin = a.reply("pin");
    assert_eq!(pin.outcome, Outcome::Rejected);
    assert!(
        pin.error.as_deref().unwrap_or_default().contains("`g1`"),
        "{pin:?}"
    );
    assert_eq!(r.record("pin").end, Some(End::Rejected));
    assert_eq!(a.control_actions("big"), vec![Revoke]);
    assert!(
        a.control("big", Revoke)
            .reason
            .to_string()
            .contains("1500 MB"),
        "{:?}",
        a.control("big", Revoke).reason
    );
    assert_eq!(r.record("big").end, Some(End::Revoked));
    // (hold, on the removed GPU, is revoked as before.)
    assert_eq!(a.control_actions("hold"), vec![Revoke]);
    assert!(
        r.queue().is_empty(),
        "nothing waits forever: {:?}",
        r.queue()
    );
    r.finish();
}

#[test]
fn the_ack_of_a_resume_that_a_pause_followed_is_accepted() {
    let mut s = sim(&[("g0", 1_000)]);
    s.request("asr", req("asr", 2));
    s.request("chat", req("chat", 0));
    s.ack_paused("asr", "asr");
    let a = s.release("chat", "chat", None);
    let fence = a.control("asr", Resume).fence;
    // Another urgent request before asr answered the resume: asr is asked to pause again.
    let a = s.request("voice", req("voice", 1));
    assert_eq!(a.control_actions("asr"), vec![Pause]);
    // Its ACK of the resume comes now: not an error, and the pause still waits for its own ACK.
    let a = s.ack("asr", "asr", Some(fence), AckAction::Resumed);
    a.no_reply("asr");
    assert_eq!(s.phase("asr"), Phase::Pausing);
    let a = s.ack("asr", "asr", Some(fence), AckAction::Paused);
    assert_eq!(a.events("asr"), vec![Paused]);
    assert_eq!(a.reply("voice").outcome, Outcome::Granted);
    s.finish();
}

#[test]
fn a_refused_lease_is_revoked() {
    let mut s = sim(&[("g0", 1_000)]);
    s.request("a", req("a", 1));
    s.request("b", req("b", 1));
    // A refusal of an older fence is ignored.
    let a = s.input(Input::LeaseRefused {
        request_id: "a".into(),
        fence: Fence(0),
        why: "stale".into(),
    });
    assert!(a.is_empty());
    let a = s.input(Input::LeaseRefused {
        request_id: "a".into(),
        fence: Fence(1),
        why: "GPU g0 is held by x".into(),
    });
    assert_eq!(a.control_actions("a"), vec![Revoke]);
    assert!(a
        .control("a", Revoke)
        .reason
        .to_string()
        .contains("GPU g0 is held by x"));
    assert_eq!(a.events("a"), vec![Revoked]);
    assert_eq!(a.reply("b").fence, Some(2));
}

// ----- the seed's sequence diagram --------------------------------------------------------------------

#[test]
fn chat_preempts_background_transcription() {
    let mut s = sim(&[("gpu0", 24_000)]);
    let mut fences = Vec::new();

    // Background ASR holds the GPU.
    let a = s.request("asr", req("asr-1", 2).vram(20_000));
    fences.push(a.reply("asr-1").fence.expect("granted"));

    // Chat at priority 0 asks: ASR is told to pause; chat waits.
    s.advance(1_000);
    let a = s.request("chat", req("chat-1", 0).vram(16_000));
    let pause = a.control("asr-1", Pause);
    assert_eq!((pause.fence, pause.deadline_ms), (fences[0], Some(ACK_MS)));
    assert_eq!(a.events("asr-1"), vec![Preempting]);
    assert_eq!(a.events("chat-1"), vec![Requested, Queued]);
    a.no_reply("chat-1");

    // No grant before the ACK.
    let a = s.advance(2_000);
    assert!(a.is_empty());

    // ASR ACKs: paused; chat is granted.
    let a = s.ack("asr", "asr-1", Some(fences[0]), AckAction::Paused);
    assert_eq!(a.events("asr-1"), vec![Paused]);
    let grant = a.reply("chat-1");
    assert_eq!(
        (grant.outcome, grant.gpu.as_deref(), grant.waited_ms),
        (Outcome::Granted, Some("gpu0"), Some(2_000))
    );
    fences.push(grant.fence.expect("granted"));

    // Chat releases: ASR resumes with a new fence.
    s.advance(3_000);
    let a = s.release("chat", "chat-1", grant.fence);
    assert_eq!(a.reply("chat-1").outcome, Outcome::Released);
    let resume = a.control("asr-1", Resume);
    fences.push(resume.fence);
    assert_eq!(a.events("asr-1"), vec![Resumed]);

    assert!(fences.windows(2).all(|w| w[0] < w[1]), "{fences:?}");
    assert_eq!(
        s.history.events("asr-1"),
        vec![Requested, Granted, Preempting, Paused, Resumed]
    );
    assert_eq!(
        s.history.events("chat-1"),
        vec![Requested, Queued, Granted, Released]
    );
    s.release("asr", "asr-1", None);
    s.finish();
}

#[test]
fn aged_request_preempts_at_its_effective_priority() {
    // ASR1 (p2) holds; ASR2 (p2) waits long enough to count as p0; chat (p0) arrives later.
    let config = SchedConfig {
        aging_ms: 1_000,
        default_timeout_ms: 3_600_000,
        lease_default_ms: 3_600_000,
        lease_max_ms: 3_600_000,
        ..config()
    };
    let mut s = sim_with(config, &[("g0", 1_000)]);
    s.request("asr", req("asr1", 2));
    s.request("asr", req("asr2", 2));
    let a = s.advance(2_000);
    // Aged to priority 0, ASR2 pauses ASR1 (a holder is preempted by its own priority).
    a.control("asr1", ControlAction::Pause);
    let a = s.request("chat", req("chat", 0));
    assert!(a.control_actions("asr1").is_empty());
    let a = s.ack_paused("asr", "asr1");
    assert_eq!(a.granted(), vec!["asr2".to_string()]);
    // Chat, more urgent than ASR2's own priority, pauses it at once: it never waits for a lease.
    a.control("asr2", ControlAction::Pause);
    let a = s.ack_paused("asr", "asr2");
    assert_eq!(a.granted(), vec!["chat".to_string()]);
}

#[test]
fn whole_gpu_request_waits_while_outside_usage_fills_the_gpu() {
    let mut s = sim(&[("g0", 1_000)]);
    s.outside("g0", 1_000);
    let a = s.request("svc", req("whole", 1));
    a.no_reply("whole");
    let a = s.outside("g0", 100);
    assert_eq!(a.reply("whole").vram_mb, Some(900));
}

/// With NVML, a GPU where a holder paused waits for a sample showing its VRAM freed before granting.
#[test]
fn settle_waits_for_nvml_to_see_the_paused_vram_freed() {
    let config = SchedConfig {
        settle_ms: 2_000,
        ..config()
    };
    let mut s = sim_with(config, &[("g0", 1_000)]);
    s.sched
        .set_vram_source(gpu_coordinator_wire::VramSource::Nvml);
    s.outside("g0", 50);
    s.request("asr", req("asr", 2).vram(800));
    let a = s.request("chat", req("chat", 0).vram(800));
    a.control("asr", ControlAction::Pause);
    let a = s.ack_paused("asr", "asr");
    a.no_reply("chat");
    // A sample taken before the process freed its memory: NVML still sees the 800 MB, outside the leases.
    let a = s.outside("g0", 850);
    a.no_reply("chat");
    // Freed: the grant goes ahead, without a warning.
    let a = s.outside("g0", 50);
    assert_eq!(
        a.reply("chat").outcome,
        gpu_coordinator_wire::Outcome::Granted
    );
    let detail = a
        .event("chat", EventKind::Granted)
        .detail
        .clone()
        .unwrap_or_default();
    assert!(!detail.contains("granted anyway"), "{detail}");
}

#[test]
fn settle_grants_with_a_warning_past_its_bound() {
    let config = SchedConfig {
        settle_ms: 2_000,
        ..config()
    };
    let mut s = sim_with(config, &[("g0", 1_000)]);
    s.sched
        .set_vram_source(gpu_coordinator_wire::VramSource::Nvml);
    s.request("asr", req("asr", 2).vram(800));
    s.request("chat", req("chat", 0).vram(800));
    s.ack_paused("asr", "asr");
    let a = s.outside("g0", 800);
    a.no_reply("chat");
    let a = s.advance(1_999);
    a.no_reply("chat");
    let a = s.advance(1);
    a.reply("chat");
    let detail = a
        .event("chat", EventKind::Granted)
        .detail
        .clone()
        .unwrap_or_default();
    assert!(detail.contains("granted anyway"), "{detail}");
}

#[test]
fn preemption_spares_a_victim_that_is_not_needed() {
    // V1 (priority 3, 100 MB) is the least urgent, so it is considered first; V2 (priority 2, 800 MB)
    // alone makes room for the 800 MB request: V1 is spared.
    let mut s = sim(&[("g0", 1_000)]);
    s.request("v1", req("v1", 3).vram(100));
    s.request("v2", req("v2", 2).vram(800));
    let a = s.request("chat", req("chat", 0).vram(800));
    assert_eq!(a.control_actions("v2"), vec![ControlAction::Pause]);
    assert!(a.control_actions("v1").is_empty(), "v1 is not needed");
}

// ----- the pause_ms hint ----------------------------------------------------------------------------

/// The requests told to pause by `a`, in order.
fn paused_by(a: &harness::Acts) -> Vec<String> {
    a.all_controls()
        .iter()
        .filter(|(_, c)| c.action == Pause)
        .map(|(_, c)| c.request_id.to_string())
        .collect()
}

#[test]
fn among_holders_the_rules_treat_alike_the_one_that_pauses_soonest_is_paused() {
    // Three priority-2 holders of 300 MB on g0 (1000 MB), granted at the same instant, in this
    // order: `fast` (500 ms), `slow` (2000 ms), `unknown` (no hint); 100 MB free. Before the hint the
    // latest arrival went first. (urgent vram) -> holders paused, in order.
    let cases: &[(u64, &[&str])] = &[
        (350, &["fast"]),
        (650, &["fast", "slow"]),
        (1_000, &["fast", "slow", "unknown"]),
    ];
    for &(vram, want) in cases {
        let mut s = sim(&[("g0", 1_000)]);
        s.request("fast", req("fast", 2).vram(300).pause_ms(500));
        s.request("slow", req("slow", 2).vram(300).pause_ms(2_000));
        s.request("unknown", req("unknown", 2).vram(300));
        let a = s.request("chat", req("chat", 0).vram(vram));
        assert_eq!(paused_by(&a), want, "urgent {vram} MB");
    }
    // Without hints, or with equal ones, the latest arrival goes first, as before.
    for hint in [None, Some(0), Some(700)] {
        let mut s = sim(&[("g0", 1_000)]);
        for id in ["a", "b", "c"] {
            let mut r = req(id, 2).vram(300);
            r.0.pause_ms = hint;
            s.request(id, r);
        }
        let a = s.request("chat", req("chat", 0).vram(350));
        assert_eq!(paused_by(&a), ["c"], "hint {hint:?}");
    }
}

#[test]
fn an_unknown_pause_time_counts_as_slower_than_any_known_one() {
    let max = gpu_coordinator_wire::validate::MAX_PAUSE_MS;
    let mut s = sim(&[("g0", 1_000)]);
    s.request("known", req("known", 2).vram(500).pause_ms(max));
    s.request("unknown", req("unknown", 2).vram(500));
    let a = s.request("chat", req("chat", 0).vram(500));
    assert_eq!(paused_by(&a), ["known"]);
}

#[test]
fn the_pause_hint_changes_no_choice_the_rules_already_make() {
    const SLOW: u64 = 3_600_000;
    // A less urgent holder goes first, however slow it says it is.
    let mut s = sim(&[("g0", 1_000)]);
    s.request("p3", req("p3", 3).vram(500).pause_ms(SLOW));
    s.request("p2", req("p2", 2).vram(500).pause_ms(0));
    assert_eq!(
        paused_by(&s.request("chat", req("chat", 0).vram(500))),
        ["p3"]
    );

    // Among equal priorities the most recently granted goes first, however slow.
    let mut s = sim(&[("g0", 1_000)]);
    s.request("old", req("old", 2).vram(500).pause_ms(0));
    s.advance(10);
    s.request("new", req("new", 2).vram(500).pause_ms(SLOW));
    assert_eq!(
        paused_by(&s.request("chat", req("chat", 0).vram(500))),
        ["new"]
    );

    // Only as many as needed: the slow big holder alone makes room, the fast small one is spared.
    let mut s = sim(&[("g0", 1_000)]);
    s.request("small", req("small", 2).vram(200).pause_ms(0));
    s.request("big", req("big", 2).vram(800).pause_ms(SLOW));
    assert_eq!(
        paused_by(&s.request("chat", req("chat", 0).vram(800))),
        ["big"]
    );

    // The GPU where the fewest are paused, though its one holder is slow and the other GPU's two
    // are fast.
    let mut s = sim(&[("g0", 1_000), ("g1", 1_000)]);
    s.request("slow", req("slow", 2).vram(800).gpu("g0").pause_ms(SLOW));
    s.request("f1", req("f1", 2).vram(400).gpu("g1").pause_ms(0));
    s.request("f2", req("f2", 2).vram(400).gpu("g1").pause_ms(0));
    assert_eq!(
        paused_by(&s.request("chat", req("chat", 0).vram(800))),
        ["slow"]
    );

    // Nor does it make a plan pause more: two fast holders would make room, but one slow one
    // alone does (the rules take the latest arrival first among equals).
    let mut s = sim(&[("g0", 1_200)]);
    s.request("f1", req("f1", 2).vram(300).pause_ms(0));
    s.request("f2", req("f2", 2).vram(300).pause_ms(0));
    s.request("slow", req("slow", 2).vram(600).pause_ms(SLOW));
    assert_eq!(
        paused_by(&s.request("chat", req("chat", 0).vram(600))),
        ["slow"]
    );

    // Then the GPU where the least VRAM is paused, though its holder is slow.
    let mut s = sim(&[("g0", 1_000), ("g1", 1_000)]);
    s.request("fast", req("fast", 2).vram(1_000).gpu("g0").pause_ms(0));
    s.request("slow", req("slow", 2).vram(900).gpu("g1").pause_ms(SLOW));
    assert_eq!(
        paused_by(&s.request("chat", req("chat", 0).vram(900))),
        ["slow"]
    );
}

#[test]
fn between_gpus_equal_for_the_rules_the_one_whose_holder_pauses_soonest_is_chosen() {
    // One priority-2 holder of 800 MB on each GPU, granted at the same instant. (g0's hint, g1's
    // hint) -> the holder paused. Without a difference, the first GPU by id, as before.
    let cases = [
        (Some(5_000), Some(200), "on1"),
        (None, Some(200), "on1"),
        (Some(200), Some(5_000), "on0"),
        (Some(200), None, "on0"),
        (None, None, "on0"),
        (Some(300), Some(300), "on0"),
    ];
    for (h0, h1, want) in cases {
        let mut s = sim(&[("g0", 1_000), ("g1", 1_000)]);
        for (id, gpu, hint) in [("on0", "g0", h0), ("on1", "g1", h1)] {
            let mut r = req(id, 2).vram(800).gpu(gpu);
            r.0.pause_ms = hint;
            s.request(id, r);
        }
        let a = s.request("chat", req("chat", 0).vram(800));
        assert_eq!(paused_by(&a), [want], "hints {h0:?} {h1:?}");
        a.no_reply("chat");
    }
}

#[test]
fn the_pause_hint_is_in_the_status_and_survives_a_restart() {
    let mut s = sim(&[("g0", 1_000)]);
    s.request("fast", req("fast", 2).vram(500).pause_ms(300));
    s.request("slow", req("slow", 2).vram(500).pause_ms(2_000));
    let hints = |s: &Sim| -> Vec<(String, Option<u64>)> {
        s.status().gpus[0]
            .holders
            .iter()
            .map(|h| (h.request_id.to_string(), h.pause_ms))
            .collect()
    };
    let want = vec![
        ("fast".to_string(), Some(300)),
        ("slow".to_string(), Some(2_000)),
    ];
    assert_eq!(hints(&s), want);
    assert_eq!(s.records["fast"].pause_ms, Some(300));
    // A new coordinator starts from what was persisted: the hint still decides the tie (without it,
    // the latest arrival, `slow`, would be paused).
    s.restart(100, true);
    assert_eq!(hints(&s), want);
    let a = s.request("chat", req("chat", 0).vram(500));
    assert_eq!(paused_by(&a), ["fast"]);
}

#[test]
fn a_renewal_after_the_expiry_finds_the_lease_revoked() {
    let mut s = sim(&[("g0", 1_000)]);
    s.request("svc", req("r", 1).lease(1_000));
    let fence = s.fence("r");
    // No wake-up between: the renewal arrives 1 ms after the expiry.
    s.now += 1_001;
    let a = s.renew("svc", "r", Some(fence), None);
    a.control("r", ControlAction::Revoke);
    assert_eq!(
        a.reply("r").outcome,
        gpu_coordinator_wire::Outcome::Rejected
    );
}

#[test]
fn arrival_numbers_are_not_reused_after_a_restart_that_forgot_ended_requests() {
    let config = SchedConfig {
        retain_ended: 0,
        ..config()
    };
    let mut s = sim_with(config, &[("g0", 1_000)]);
    s.request("svc", req("a1", 1));
    s.release("svc", "a1", None);
    let first = s.persisted_arrival("a1");
    s.restart(10, true);
    s.request("svc", req("a2", 1));
    assert!(s.persisted_arrival("a2") > first);
}

#[test]
fn restore_catches_the_store_up_with_a_renewal_it_missed() {
    // chat renewed to T0 + 90 s; the coordinator stopped after the commit, before the store heard it.
    let s = busy();
    let mut snapshot = s.snapshot(true);
    for rec in &mut snapshot.requests {
        if rec.request_id == "chat" {
            rec.expires_at = Some(T0 + 90_000);
        }
    }
    let chat_fence = s.record("chat").fence.expect("chat holds");
    let stored_expiry = snapshot
        .leases
        .iter()
        .find(|l| l.request_id == "chat")
        .expect("the store holds chat")
        .expires_at;
    assert!(stored_expiry < T0 + 90_000);
    let (mut r, a) = Sim::restored(config(), gpus(&[("g0", 1_000)]), snapshot, T0 + 100);
    assert!(a.lease_ops().contains(&&LeaseOp::Renew {
        request_id: "chat".into(),
        gpu: "g0".into(),
        fence: chat_fence,
        expires_at: T0 + 90_000,
    }));
    assert_eq!(r.record("chat").expires_at, Some(T0 + 90_000));
    r.finish();
}

// ----- decisions fed by the driver's observations -----------------------------------------------------

#[test]
fn outside_use_is_what_nvml_sees_minus_what_the_leases_hold() {
    let mut s = sim(&[("g0", 1_000)]);
    s.request("a", req("a", 1).vram(600));
    // NVML sees 900 MB used: 600 are a's lease, 300 someone else's.
    s.input(Input::GpuUsed {
        gpu: "g0".into(),
        used_mb: 900,
    });
    let g0 = &s.status().gpus[0];
    assert_eq!((g0.external_mb, g0.free_mb), (300, 100));
    assert_eq!(
        s.request("b", req("b", 1).vram(200)).events("b"),
        vec![Requested, Queued]
    );
    // Less in use than the leases hold (a has not loaded yet): nothing outside, never below zero.
    let a = s.input(Input::GpuUsed {
        gpu: "g0".into(),
        used_mb: 100,
    });
    assert_eq!(s.status().gpus[0].external_mb, 0);
    assert_eq!(a.granted(), vec!["b"]);
    // A GPU the coordinator does not manage changes nothing.
    assert!(s
        .input(Input::GpuUsed {
            gpu: "nope".into(),
            used_mb: 1,
        })
        .is_empty());
    s.finish();
}

#[test]
fn a_whole_gpu_holder_stays_alone_when_outside_use_goes() {
    let mut s = sim(&[("g0", 1_000)]);
    // 300 MB used outside when the whole GPU is granted: the lease holds the other 700.
    s.outside("g0", 300);
    let a = s.request("w", req("w", 1));
    assert_eq!(a.granted(), vec!["w"]);
    match a.lease_ops_for("w").as_slice() {
        [LeaseOp::Acquire(l)] => assert_eq!(
            (l.vram_mb, l.capacity_mb),
            (1_000, 1_000),
            "the lease store sees the whole capacity taken"
        ),
        other => panic!("{other:?}"),
    }
    // The outside process exits: NVML shows VRAM free, but nothing goes beside the whole-GPU holder.
    s.outside("g0", 0);
    let a = s.request("b", req("b", 1).vram(200));
    assert!(a.granted().is_empty(), "{a:#?}");
    assert_eq!(a.events("b"), vec![Requested, Queued]);
    // Its release lets b in.
    let a = s.release("w", "w", None);
    assert_eq!(a.granted(), vec!["b"]);
    s.finish();
}

fn lease(id: &str, gpu: &str, fence: u64, expires_at: u64) -> Lease {
    Lease {
        request_id: id.into(),
        service_id: id.into(),
        gpu: gpu.into(),
        fence: Fence(fence),
        vram_mb: 100,
        capacity_mb: 1_000,
        expires_at,
    }
}

#[test]
fn the_lease_store_is_made_to_hold_exactly_the_leases_held() {
    let mut s = sim(&[("g0", 1_000), ("g1", 1_000)]);
    s.request("a", req("a", 1).vram(100).gpu("g1"));
    s.request("b", req("b", 1).vram(100).gpu("g0"));
    let held = s.sched.leases();
    // The store agrees: nothing to do.
    let a = s.input(Input::LeaseStoreHolds {
        leases: held.clone(),
    });
    assert!(a.lease_ops().is_empty(), "{:?}", a.lease_ops());
    // The store lost everything and holds one lease nobody granted: released; ours back in fence order.
    let a = s.input(Input::LeaseStoreHolds {
        leases: vec![lease("ghost", "g0", 99, T0 + 30_000)],
    });
    let mut restored: Vec<&Lease> = held.iter().collect();
    restored.sort_by_key(|l| l.fence);
    let mut expected = vec![LeaseOp::Release {
        request_id: "ghost".into(),
        gpu: "g0".into(),
        fence: Fence(99),
    }];
    expected.extend(restored.into_iter().map(|l| LeaseOp::Restore(l.clone())));
    assert_eq!(
        a.lease_ops().into_iter().cloned().collect::<Vec<_>>(),
        expected
    );
    // A stored lease of ours under an older fence is stale, and ours is written back.
    let a_lease = held.iter().find(|l| l.request_id == "a").expect("a holds");
    let mut old = a_lease.clone();
    old.fence = Fence(0);
    let b_lease = held.iter().find(|l| l.request_id == "b").expect("b holds");
    let a = s.input(Input::LeaseStoreHolds {
        leases: vec![old, b_lease.clone()],
    });
    assert_eq!(
        a.lease_ops().into_iter().cloned().collect::<Vec<_>>(),
        vec![
            LeaseOp::Release {
                request_id: "a".into(),
                gpu: "g1".into(),
                fence: Fence(0),
            },
            LeaseOp::Restore(a_lease.clone()),
        ]
    );
    s.finish();
}

#[test]
fn an_expired_lease_is_not_written_back_but_revoked() {
    let mut s = sim(&[("g0", 1_000)]);
    s.request("a", req("a", 1).vram(100).lease(1_000));
    s.now = T0 + 1_000;
    let a = s.input(Input::LeaseStoreHolds { leases: vec![] });
    assert!(
        !a.lease_ops()
            .iter()
            .any(|op| matches!(op, LeaseOp::Restore(_))),
        "{:?}",
        a.lease_ops()
    );
    assert_eq!(a.control_actions("a"), vec![Revoke, Restart]);
    s.finish();
}

#[test]
fn a_renewed_lease_the_store_lost_is_written_back_only_while_held() {
    let mut s = sim(&[("g0", 1_000)]);
    s.request("a", req("a", 1).vram(100));
    let fence = Fence(s.fence("a"));
    let held = s.sched.leases();
    let a = s.input(Input::LeaseNotHeld {
        request_id: "a".into(),
        fence,
    });
    assert_eq!(
        a.lease_ops().into_iter().cloned().collect::<Vec<_>>(),
        vec![LeaseOp::Restore(held[0].clone())]
    );
    // Another fence, or a lease that ended since: nothing.
    let a = s.input(Input::LeaseNotHeld {
        request_id: "a".into(),
        fence: Fence(fence.0 + 1),
    });
    assert!(a.lease_ops().is_empty());
    s.release("a", "a", None);
    let a = s.input(Input::LeaseNotHeld {
        request_id: "a".into(),
        fence,
    });
    assert!(a.lease_ops().is_empty());
    s.finish();
}
