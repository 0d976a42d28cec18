use super::*;

fn event(seq: u64, kind: EventKind, id: &str, gpu: &str, fence: Option<u64>) -> Record {
    Record {
        seq,
        subject: format!("gpu.event.{}.svc", kind.as_str()),
        output: Output::Event(Event {
            capacity_mb: None,
            at: "2026-01-01T00:00:00Z".into(),
            kind,
            request_id: Some(id.into()),
            service_id: "svc".into(),
            priority: Some(1),
            gpu: Some(gpu.into()),
            fence,
            detail: None,
            reclaim_for: None,
            code: None,
        }),
    }
}

fn granted(seq: u64, id: &str, gpu: &str, fence: u64, vram_mb: u64) -> [Record; 2] {
    let mut reply = Reply::new(id, Outcome::Granted);
    reply.gpu = Some(gpu.into());
    reply.fence = Some(fence);
    reply.vram_mb = Some(vram_mb);
    [
        Record {
            seq,
            subject: "gpu.reply.svc".into(),
            output: Output::Reply(reply),
        },
        event(seq + 1, EventKind::Granted, id, gpu, Some(fence)),
    ]
}

fn run(whole: &[&str], records: Vec<Record>) -> Result<Summary, Violation> {
    let mut checker = Checker::new(
        HashMap::from([("0".to_owned(), 24_000)]),
        whole.iter().map(|s| s.to_string()).collect(),
    );
    for r in records {
        checker.feed(r)?;
    }
    checker.finish()
}

#[test]
fn a_preemption_keeps_every_rule() {
    let mut h = vec![event(1, EventKind::Requested, "a", "0", None)];
    h.extend(granted(2, "a", "0", 1, 20_000));
    h.push(event(4, EventKind::Requested, "b", "0", None));
    h.push(event(5, EventKind::Preempting, "a", "0", Some(1)));
    h.push(event(6, EventKind::Paused, "a", "0", Some(1)));
    h.extend(granted(7, "b", "0", 2, 20_000));
    h.push(event(9, EventKind::Released, "b", "0", Some(2)));
    h.push(event(10, EventKind::Resumed, "a", "0", Some(3)));
    h.push(event(11, EventKind::Released, "a", "0", Some(3)));
    let summary = run(&[], h).expect("a clean history");
    assert_eq!(
        (
            summary.requests,
            summary.grants,
            summary.resumes,
            summary.preemptions,
            summary.releases,
            summary.live
        ),
        (2, 2, 1, 1, 2, 0)
    );
}

#[test]
fn two_holders_beyond_capacity_are_caught() {
    let mut h = Vec::new();
    h.extend(granted(1, "a", "0", 1, 20_000));
    h.extend(granted(3, "b", "0", 2, 8_000));
    let v = run(&[], h).expect_err("28,000 MB on a 24,000 MB GPU");
    assert!(v.rule.contains("holds 28000 MB of 24000 MB"), "{}", v.rule);
    assert_eq!(v.records.last().map(|r| r.seq), Some(4));
}

#[test]
fn a_whole_gpu_holder_must_be_alone() {
    let mut h = Vec::new();
    h.extend(granted(1, "a", "0", 1, 1_000));
    h.extend(granted(3, "b", "0", 2, 1_000));
    let v = run(&["a"], h).expect_err("b beside a whole-GPU holder");
    assert!(v.rule.contains("whole-GPU holder"), "{}", v.rule);
}

#[test]
fn fences_must_rise() {
    let mut h = Vec::new();
    h.extend(granted(1, "a", "0", 5, 1_000));
    h.push(event(3, EventKind::Released, "a", "0", Some(5)));
    h.extend(granted(4, "b", "0", 5, 1_000));
    let v = run(&[], h).expect_err("fence 5 twice");
    assert!(v.rule.contains("does not rise"), "{}", v.rule);
}

#[test]
fn a_pausing_holder_holds_until_its_ack() {
    let mut h = Vec::new();
    h.extend(granted(1, "a", "0", 1, 20_000));
    h.push(event(3, EventKind::Preempting, "a", "0", Some(1)));
    // Room beside the pausing holder may be used (the preemptor need not wait for a pause it no
    // longer needs)...
    h.extend(granted(4, "b", "0", 2, 4_000));
    run(&[], h.clone()).expect("b fits beside the pausing a");
    // ...but not the room the pause is to make.
    h.extend(granted(6, "c", "0", 3, 4_000));
    let v = run(&[], h).expect_err("c granted before a's ACK");
    assert!(v.rule.contains("still pausing"), "{}", v.rule);
}

#[test]
fn a_request_ends_once() {
    let h = vec![
        event(1, EventKind::Requested, "a", "0", None),
        event(2, EventKind::TimedOut, "a", "0", None),
        event(3, EventKind::Cancelled, "a", "0", None),
    ];
    let v = run(&[], h).expect_err("two ends");
    assert!(v.rule.contains("after it ended"), "{}", v.rule);
    assert_eq!(v.records.len(), 3, "the request's records are shown");
}

#[test]
fn a_granted_reply_needs_its_event() {
    let [reply, _] = granted(1, "a", "0", 1, 1_000);
    let v = run(&[], vec![reply]).expect_err("a reply alone");
    assert!(v.rule.contains("no `granted` event"), "{}", v.rule);
}

#[test]
fn a_granted_reply_to_a_repeated_request_matches_the_resume() {
    let mut h = Vec::new();
    h.extend(granted(1, "a", "0", 1, 1_000));
    h.push(event(3, EventKind::Preempting, "a", "0", Some(1)));
    h.push(event(4, EventKind::Paused, "a", "0", Some(1)));
    h.push(event(5, EventKind::Resumed, "a", "0", Some(2)));
    // The request is published again: its answer is the current grant.
    let [reply, _] = granted(6, "a", "0", 2, 1_000);
    h.push(reply);
    run(&[], h).expect("the repeated request's answer is the resumed lease");
}

#[test]
fn revocations_are_counted_by_cause() {
    let mut h = Vec::new();
    h.extend(granted(1, "a", "0", 1, 1_000));
    h.push(event(3, EventKind::Expired, "a", "0", Some(1)));
    h.push(event(4, EventKind::Revoked, "a", "0", Some(1)));
    let summary = run(&[], h).expect("an expiry is no violation");
    assert_eq!(summary.revocations.get("expired"), Some(&1));
}

/// With node agents the GPUs are in no configuration: the capacity a `granted` event carries is what
/// the holders are checked against.
#[test]
fn a_grant_beyond_the_capacity_its_event_gives_is_a_violation() {
    let with_capacity = |mut records: [Record; 2], mb: u64| {
        if let Output::Event(e) = &mut records[1].output {
            e.capacity_mb = Some(mb);
        }
        records
    };
    let mut h = vec![event(1, EventKind::Requested, "a", "h1/0", None)];
    h.extend(with_capacity(granted(2, "a", "h1/0", 1, 60), 100));
    h.push(event(4, EventKind::Requested, "b", "h1/0", None));
    h.extend(with_capacity(granted(5, "b", "h1/0", 2, 30), 100));
    h.push(event(7, EventKind::Released, "b", "h1/0", Some(2)));
    assert!(run(&[], h.clone()).is_ok(), "90 MB of 100 fits");
    h.push(event(8, EventKind::Requested, "c", "h1/0", None));
    h.extend(with_capacity(granted(9, "c", "h1/0", 3, 50), 100));
    let violation = run(&[], h).expect_err("110 MB of 100");
    assert!(
        violation
            .to_string()
            .contains("GPU h1/0 holds 110 MB of 100 MB"),
        "{violation}"
    );
}
