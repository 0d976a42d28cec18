//! The lease's rules, step by step, with a clock the tests move by hand.

use super::*;
use gpu_coordinator_wire::{AckAction, ControlAction, Outcome, RejectCode};

const ID: &str = "job-1";

fn grant(fence: u64, lease_ms: u64) -> Grant {
    Grant {
        fence,
        gpu: "gpu0".into(),
        vram_mb: Some(1_000),
        lease_ms,
        expires_at: None,
    }
}

fn control(action: ControlAction, fence: u64) -> Control {
    Control {
        action,
        request_id: ID.into(),
        fence,
        deadline_ms: Some(5_000),
        reason: "test".into(),
        lease_ms: None,
        expires_at: None,
        gpu: None,
    }
}

fn resume(fence: u64, lease_ms: u64) -> Control {
    Control {
        lease_ms: Some(lease_ms),
        gpu: Some("gpu1".into()),
        deadline_ms: None,
        ..control(ControlAction::Resume, fence)
    }
}

fn reply(outcome: Outcome) -> Reply {
    Reply::new(ID, outcome)
}

fn drain(m: &mut Machine) -> Vec<Action> {
    std::iter::from_fn(|| m.poll_action()).collect()
}

fn published(actions: &[Action]) -> Vec<Input> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Publish { input, .. } => Some(input.clone()),
            _ => None,
        })
        .collect()
}

fn worker(fence: u64, lease_ms: u64, t0: Instant) -> Machine {
    Machine::granted(
        ID.into(),
        grant(fence, lease_ms),
        true,
        true,
        t0,
        SystemTime::now(),
    )
}

#[test]
fn a_lease_without_a_confirmed_renewal_is_given_up_before_the_coordinator_could() {
    let t0 = Instant::now();
    let mut m = worker(7, 3_000, t0);
    // A tenth of the lease before the coordinator's expiry.
    let lost = t0 + Duration::from_millis(2_700);
    // Renewals go out and nothing answers (the client is cut off).
    let mut renewals = 0;
    while let Some(at) = m.poll_timeout().filter(|at| *at < lost) {
        m.handle_timeout(at);
        let sent = published(&drain(&mut m));
        assert!(
            sent.iter().all(|i| matches!(i, Input::Renew(_))),
            "{sent:?}"
        );
        renewals += sent.len();
    }
    assert!(renewals >= 2, "renewals were tried first");
    assert_eq!(m.poll_timeout(), Some(lost));
    m.handle_timeout(lost);
    let actions = drain(&mut m);
    assert_eq!(
        published(&actions),
        vec![Input::Release(ReleaseMsg {
            request_id: Some(ID.into()),
            fence: Some(7),
        })],
        "the GPU is freed at the coordinator as soon as it is reachable"
    );
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::Event(LeaseEvent::Revoked { .. }))),
        "the code holding the lease is told: {actions:?}"
    );
    assert_eq!(m.snapshot().phase, LeasePhase::Revoked);
}

#[test]
fn a_confirmed_renewal_moves_the_local_expiry() {
    let t0 = Instant::now();
    let mut m = worker(7, 3_000, t0);
    let t1 = t0 + Duration::from_secs(1);
    m.handle_timeout(t1);
    drain(&mut m);
    let t2 = t1 + Duration::from_millis(10);
    let wall = SystemTime::now();
    let mut renewed = reply(Outcome::Renewed);
    renewed.fence = Some(7);
    renewed.lease_ms = Some(3_000);
    let at = wall.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64 + 3_000;
    renewed.expires_at = Some(gpu_coordinator_wire::time::rfc3339(at));
    m.handle_reply(renewed, t2, wall);
    drain(&mut m);
    // The coordinator handled the renewal after it was sent: its expiry is at least the sending
    // plus the lease; the local one is a tenth of the lease before that.
    assert_eq!(m.snapshot.lost_at, Some(t1 + Duration::from_millis(2_700)));
    assert_eq!(m.snapshot().phase, LeasePhase::Active);
}

#[test]
fn renews_at_a_third_of_the_lease_with_the_fence() {
    let t0 = Instant::now();
    let mut m = worker(7, 30_000, t0);
    assert_eq!(m.poll_timeout(), Some(t0 + Duration::from_secs(10)));
    m.handle_timeout(t0 + Duration::from_secs(9));
    assert!(drain(&mut m).is_empty());
    let t1 = t0 + Duration::from_secs(10);
    m.handle_timeout(t1);
    assert_eq!(
        published(&drain(&mut m)),
        vec![Input::Renew(RenewMsg {
            request_id: ID.into(),
            fence: Some(7),
            lease_ms: None
        })]
    );
    // Without an answer it tries again sooner.
    assert_eq!(m.poll_timeout(), Some(t1 + Duration::from_secs(5)));
    let mut renewed = reply(Outcome::Renewed);
    renewed.lease_ms = Some(30_000);
    renewed.expires_at = Some("2030-01-01T00:00:00.000Z".into());
    let t2 = t1 + Duration::from_millis(20);
    m.handle_reply(renewed, t2, SystemTime::now());
    assert!(matches!(
        drain(&mut m).as_slice(),
        [Action::Event(LeaseEvent::Renewed { .. })]
    ));
    assert_eq!(m.poll_timeout(), Some(t2 + Duration::from_secs(10)));
    let expected = UNIX_EPOCH
        + Duration::from_millis(
            gpu_coordinator_wire::time::parse_rfc3339("2030-01-01T00:00:00.000Z").unwrap(),
        );
    assert_eq!(m.snapshot().expires_at, expected);
}

#[test]
fn a_late_grant_renews_sooner() {
    let t0 = Instant::now();
    let wall = SystemTime::now();
    let mut late = grant(7, 30_000);
    // Only 3 s of the 30 s lease left when the grant is handled.
    let ms = wall.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64 + 3_000;
    late.expires_at = Some(gpu_coordinator_wire::time::rfc3339(ms));
    let m = Machine::granted(ID.into(), late, false, false, t0, wall);
    let first = m.poll_timeout().unwrap() - t0;
    assert!(first <= Duration::from_secs(1), "{first:?}");
}

#[test]
fn pause_stops_renewing_runs_the_handler_then_acks_with_the_fence() {
    let t0 = Instant::now();
    let mut m = worker(7, 30_000, t0);
    m.handle_control(control(ControlAction::Pause, 7), t0, SystemTime::now());
    let actions = drain(&mut m);
    assert!(matches!(
        actions.as_slice(),
        [
            Action::Event(LeaseEvent::Pausing { fence: 7, .. }),
            Action::RunPause(PauseOrder { fence: 7, .. })
        ]
    ));
    assert_eq!(m.snapshot().phase, LeasePhase::Pausing);
    assert_eq!(m.poll_timeout(), None, "no renewing while pausing");
    m.handle_handler_done(true, t0 + Duration::from_secs(1), SystemTime::now());
    let actions = drain(&mut m);
    assert_eq!(
        published(&actions),
        vec![Input::Ack(AckMsg {
            request_id: ID.into(),
            fence: Some(7),
            action: AckAction::Paused
        })]
    );
    assert!(matches!(
        actions.last(),
        Some(Action::Event(LeaseEvent::Paused { fence: 7 }))
    ));
    assert_eq!(m.snapshot().phase, LeasePhase::Paused);
}

#[test]
fn a_pause_handler_past_its_deadline_still_acks() {
    let t0 = Instant::now();
    let mut m = worker(7, 30_000, t0);
    m.handle_control(control(ControlAction::Pause, 7), t0, SystemTime::now());
    drain(&mut m);
    m.handle_handler_done(true, t0 + Duration::from_secs(6), SystemTime::now());
    assert_eq!(published(&drain(&mut m)).len(), 1);
}

#[test]
fn resume_takes_the_new_fence_and_lease_runs_the_handler_then_acks() {
    let t0 = Instant::now();
    let mut m = worker(7, 30_000, t0);
    m.handle_control(control(ControlAction::Pause, 7), t0, SystemTime::now());
    m.handle_handler_done(true, t0, SystemTime::now());
    drain(&mut m);
    let t1 = t0 + Duration::from_secs(60);
    m.handle_control(resume(9, 12_000), t1, SystemTime::now());
    let actions = drain(&mut m);
    assert!(matches!(
        actions.as_slice(),
        [Action::RunResume(ResumeOrder {
            fence: 9,
            lease_ms: 12_000,
            ..
        })]
    ));
    assert_eq!(m.snapshot().fence, 9);
    assert_eq!(m.snapshot().gpu, "gpu1");
    assert_eq!(m.snapshot().phase, LeasePhase::Resuming);
    // The new lease is renewed from the resume on, even while the handler reloads.
    assert_eq!(m.poll_timeout(), Some(t1 + Duration::from_secs(4)));
    m.handle_handler_done(true, t1 + Duration::from_secs(1), SystemTime::now());
    let actions = drain(&mut m);
    assert_eq!(
        published(&actions),
        vec![Input::Ack(AckMsg {
            request_id: ID.into(),
            fence: Some(9),
            action: AckAction::Resumed
        })]
    );
    assert_eq!(m.snapshot().phase, LeasePhase::Active);
    m.handle_timeout(t1 + Duration::from_secs(4));
    assert_eq!(
        published(&drain(&mut m)),
        vec![Input::Renew(RenewMsg {
            request_id: ID.into(),
            fence: Some(9),
            lease_ms: None
        })]
    );
}

#[test]
fn a_renewed_for_an_older_fence_is_ignored() {
    let t0 = Instant::now();
    let mut m = worker(7, 30_000, t0);
    m.handle_control(control(ControlAction::Pause, 7), t0, SystemTime::now());
    m.handle_handler_done(true, t0, SystemTime::now());
    m.handle_control(resume(9, 12_000), t0, SystemTime::now());
    drain(&mut m);
    let mut late = reply(Outcome::Renewed);
    late.fence = Some(7);
    late.lease_ms = Some(30_000);
    m.handle_reply(late, t0, SystemTime::now());
    assert!(drain(&mut m).is_empty());
    assert_eq!(m.snapshot().lease_ms, 12_000);
}

#[test]
fn an_order_before_the_grant_is_handled_once_the_lease_exists() {
    // What `Lease::start` does with orders that overtook the grant.
    let t0 = Instant::now();
    let mut m = worker(7, 30_000, t0);
    m.handle_control(control(ControlAction::Pause, 7), t0, SystemTime::now());
    assert!(matches!(
        drain(&mut m).as_slice(),
        [
            Action::Event(LeaseEvent::Pausing { .. }),
            Action::RunPause(_)
        ]
    ));
}

#[test]
fn orders_during_a_handler_wait_for_it() {
    let t0 = Instant::now();
    let mut m = worker(7, 30_000, t0);
    m.handle_control(control(ControlAction::Pause, 7), t0, SystemTime::now());
    m.handle_handler_done(true, t0, SystemTime::now());
    m.handle_control(resume(9, 30_000), t0, SystemTime::now());
    drain(&mut m);
    // Paused again while on_resume still runs.
    m.handle_control(control(ControlAction::Pause, 9), t0, SystemTime::now());
    assert!(drain(&mut m).is_empty());
    m.handle_handler_done(true, t0, SystemTime::now());
    let actions = drain(&mut m);
    assert!(matches!(
        actions.as_slice(),
        [
            Action::Publish {
                input: Input::Ack(AckMsg {
                    action: AckAction::Resumed,
                    ..
                }),
                ..
            },
            Action::Event(LeaseEvent::Resumed { fence: 9, .. }),
            Action::Event(LeaseEvent::Pausing { fence: 9, .. }),
            Action::RunPause(PauseOrder { fence: 9, .. }),
        ]
    ));
}

#[test]
fn stale_orders_are_ignored() {
    let t0 = Instant::now();
    let mut m = worker(7, 30_000, t0);
    m.handle_control(control(ControlAction::Pause, 6), t0, SystemTime::now());
    m.handle_control(control(ControlAction::Revoke, 6), t0, SystemTime::now());
    m.handle_control(resume(7, 30_000), t0, SystemTime::now());
    assert!(drain(&mut m).is_empty());
    assert_eq!(m.snapshot().phase, LeasePhase::Active);
}

#[test]
fn revoke_stops_renewing_and_restart_is_surfaced() {
    let t0 = Instant::now();
    let mut m = worker(7, 30_000, t0);
    m.handle_control(control(ControlAction::Revoke, 7), t0, SystemTime::now());
    m.handle_control(control(ControlAction::Restart, 7), t0, SystemTime::now());
    let actions = drain(&mut m);
    assert!(matches!(
        actions.as_slice(),
        [
            Action::Event(LeaseEvent::Revoked { .. }),
            Action::Event(LeaseEvent::Restart { .. })
        ]
    ));
    assert_eq!(m.snapshot().phase, LeasePhase::Revoked);
    assert_eq!(m.poll_timeout(), None);
    m.handle_release(t0);
    assert!(matches!(
        drain(&mut m).as_slice(),
        [Action::ReleaseDone(Err(ClientError::Revoked))]
    ));
    assert!(m.is_done());
}

#[test]
fn a_revoke_during_on_pause_means_no_ack() {
    let t0 = Instant::now();
    let mut m = worker(7, 30_000, t0);
    m.handle_control(control(ControlAction::Pause, 7), t0, SystemTime::now());
    m.handle_control(control(ControlAction::Revoke, 7), t0, SystemTime::now());
    drain(&mut m);
    m.handle_handler_done(true, t0, SystemTime::now());
    assert!(published(&drain(&mut m)).is_empty());
}

#[test]
fn a_panicking_on_pause_is_not_acknowledged() {
    let t0 = Instant::now();
    let mut m = worker(7, 30_000, t0);
    m.handle_control(control(ControlAction::Pause, 7), t0, SystemTime::now());
    drain(&mut m);
    m.handle_handler_done(false, t0, SystemTime::now());
    assert!(published(&drain(&mut m)).is_empty());
    assert_eq!(m.snapshot().phase, LeasePhase::Pausing);
}

#[test]
fn without_a_pause_handler_it_stops_renewing_and_does_not_ack() {
    let t0 = Instant::now();
    let mut m = Machine::granted(
        ID.into(),
        grant(7, 30_000),
        false,
        false,
        t0,
        SystemTime::now(),
    );
    m.handle_control(control(ControlAction::Pause, 7), t0, SystemTime::now());
    let actions = drain(&mut m);
    assert!(matches!(
        actions.as_slice(),
        [Action::Event(LeaseEvent::Pausing { .. })]
    ));
    assert_eq!(m.poll_timeout(), None);
}

#[test]
fn release_waits_for_released() {
    let t0 = Instant::now();
    let mut m = worker(7, 30_000, t0);
    m.handle_release(t0);
    assert_eq!(
        published(&drain(&mut m)),
        vec![Input::Release(ReleaseMsg {
            request_id: Some(ID.into()),
            fence: Some(7)
        })]
    );
    assert_eq!(m.poll_timeout(), Some(t0 + RELEASE_TIMEOUT), "no renewing");
    m.handle_reply(reply(Outcome::Released), t0, SystemTime::now());
    assert!(matches!(
        drain(&mut m).as_slice(),
        [Action::ReleaseDone(Ok(()))]
    ));
    assert!(m.is_done());
}

#[test]
fn a_release_that_crossed_a_resume_is_sent_again_under_the_new_fence() {
    let t0 = Instant::now();
    let mut m = worker(7, 30_000, t0);
    m.handle_release(t0);
    drain(&mut m);
    // The coordinator resumed the request under fence 9 before it took the release under 7.
    let mut stale = reply(Outcome::Rejected);
    stale.error = Some("stale fence 7: the current fence of request `r` is 9".into());
    stale.fence = Some(9);
    m.handle_reply(stale.clone(), t0, SystemTime::now());
    assert!(!m.is_done());
    assert_eq!(
        published(&drain(&mut m)),
        vec![Input::Release(ReleaseMsg {
            request_id: Some(ID.into()),
            fence: Some(9)
        })]
    );
    // The resume itself, read after, and a second rejection of an input under 7 change nothing.
    m.handle_control(resume(9, 30_000), t0, SystemTime::now());
    m.handle_reply(stale, t0, SystemTime::now());
    assert!(drain(&mut m).is_empty());
    assert!(!m.is_done());
    m.handle_reply(reply(Outcome::Released), t0, SystemTime::now());
    assert!(matches!(
        drain(&mut m).as_slice(),
        [Action::ReleaseDone(Ok(()))]
    ));
}

#[test]
fn a_renewal_rejected_for_a_lease_that_is_gone_ends_the_lease_now() {
    let t0 = Instant::now();
    for (code, gone) in [
        (Some(RejectCode::AlreadyEnded), true),
        (Some(RejectCode::NotHolding), true),
        (Some(RejectCode::PauseDeadlinePassed), true),
        (Some(RejectCode::UnknownRequest), true),
        // Any other reason, or none (an older coordinator): the lease runs to its local
        // expiry, as before.
        (Some(RejectCode::InvalidInput), false),
        (Some(RejectCode::Other), false),
        (None, false),
    ] {
        let mut m = worker(7, 30_000, t0);
        m.handle_timeout(t0 + Duration::from_secs(10));
        drain(&mut m);
        let mut rejected = reply(Outcome::Rejected);
        rejected.error = Some("request `r` has already ended (released)".into());
        rejected.code = code;
        m.handle_reply(rejected, t0, SystemTime::now());
        let phase = m.snapshot().phase;
        if gone {
            assert_eq!(phase, LeasePhase::Revoked, "{code:?}");
            assert!(
                drain(&mut m)
                    .iter()
                    .any(|a| matches!(a, Action::Event(LeaseEvent::Revoked { .. }))),
                "{code:?}: the lease says it is lost"
            );
        } else {
            assert_eq!(phase, LeasePhase::Active, "{code:?}");
        }
    }
}

#[test]
fn a_rejection_during_release_belongs_to_an_unanswered_renew_first() {
    let t0 = Instant::now();
    let mut m = worker(7, 30_000, t0);
    m.handle_timeout(t0 + Duration::from_secs(10));
    m.handle_release(t0 + Duration::from_secs(10));
    drain(&mut m);
    m.handle_reply(reply(Outcome::Rejected), t0, SystemTime::now());
    assert!(!m.is_done());
    assert!(matches!(
        drain(&mut m).as_slice(),
        [Action::Event(LeaseEvent::Rejected { .. })]
    ));
    let mut rejected = reply(Outcome::Rejected);
    rejected.error = Some("stale fence".into());
    rejected.code = Some(RejectCode::StaleFence);
    m.handle_reply(rejected, t0, SystemTime::now());
    let actions = drain(&mut m);
    assert!(matches!(
        actions.first(),
        Some(Action::ReleaseDone(Err(ClientError::Rejected { code: Some(RejectCode::StaleFence), error })))
            if error == "stale fence"
    ));
}

#[test]
fn release_gives_up_without_an_answer() {
    let t0 = Instant::now();
    let mut m = worker(7, 30_000, t0);
    m.handle_release(t0);
    drain(&mut m);
    m.handle_timeout(t0 + RELEASE_TIMEOUT);
    assert!(matches!(
        drain(&mut m).as_slice(),
        [Action::ReleaseDone(Err(ClientError::NoReply {
            expected: "released",
            ..
        }))]
    ));
}

#[test]
fn drop_releases_once() {
    let t0 = Instant::now();
    let mut m = worker(7, 30_000, t0);
    m.handle_drop();
    assert_eq!(published(&drain(&mut m)).len(), 1);
    assert!(m.is_done());

    let mut m = worker(7, 30_000, t0);
    m.handle_release(t0);
    drain(&mut m);
    m.handle_drop();
    assert!(published(&drain(&mut m)).is_empty(), "already releasing");

    let mut m = worker(7, 30_000, t0);
    m.handle_control(control(ControlAction::Revoke, 7), t0, SystemTime::now());
    drain(&mut m);
    m.handle_drop();
    assert!(
        published(&drain(&mut m)).is_empty(),
        "nothing left to release"
    );
}

#[test]
fn a_paused_request_starts_holding_on_resume() {
    let t0 = Instant::now();
    let mut m = Machine::paused(ID.into(), false, false, SystemTime::now());
    assert_eq!(m.poll_timeout(), None);
    m.handle_control(resume(9, 30_000), t0, SystemTime::now());
    let actions = drain(&mut m);
    assert_eq!(
        published(&actions),
        vec![Input::Ack(AckMsg {
            request_id: ID.into(),
            fence: Some(9),
            action: AckAction::Resumed
        })]
    );
    assert_eq!(m.snapshot().phase, LeasePhase::Active);
    assert_eq!(m.snapshot().gpu, "gpu1");
    assert_eq!(m.poll_timeout(), Some(t0 + Duration::from_secs(10)));
}
