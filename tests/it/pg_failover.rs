//! The distributed mode on a Postgres primary and its streaming standby: `database.url` names both
//! hosts (`postgres://postgres@h1:p1,h2:p2/db`), the primary is killed with SIGKILL while services hold
//! and queue and requests keep coming, and the standby is promoted. The coordinator moves to it by
//! itself. With a synchronous standby no acknowledged input is lost and the history passes `audit`;
//! with an asynchronous one that missed the last commits, neither a fence nor a leadership term is
//! handed out twice.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use gpu_coordinator_wire::{LeaderStatus, StatusDoc, Subjects};
use serde_json::json;

use crate::client::joined;
use crate::nats_cluster::{Load, Replies};
use crate::support::{
    eventually, eventually_within, nats_connect, test_config, Coordinator, PgServer, Probe,
};

/// The database on the private servers.
const DB: &str = "gpu_pgfo";

/// How long the coordinator may take to serve again after the kill: seconds on an idle machine (see
/// the README), more on a loaded one.
const FAILOVER: Duration = Duration::from_secs(60);

/// How many acknowledged requests the publisher makes before the kill, while it happens, and after.
const BEFORE: usize = 20;
const DURING: usize = 20;
const AFTER: usize = 30;

/// `database.url` naming the primary, then the standby.
fn both(primary: &PgServer, standby: &PgServer) -> String {
    format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{DB}",
        primary.port, standby.port
    )
}

/// Runs `work` (a server's start, kill or promotion) off the async runtime.
async fn blocking<T: Send + 'static>(what: &str, work: impl FnOnce() -> T + Send + 'static) -> T {
    joined(what, tokio::task::spawn_blocking(work)).await
}

/// A primary and a streaming standby of it; synchronous (a commit waits until the standby has it) or
/// not.
async fn pair(synchronous: bool) -> (Arc<PgServer>, Arc<PgServer>) {
    blocking("the primary and its standby", move || {
        let primary = PgServer::start();
        let standby = primary.standby();
        primary.set_synchronous(synchronous);
        (Arc::new(primary), Arc::new(standby))
    })
    .await
}

/// Kills the primary (SIGKILL, every process of it) and promotes the standby.
async fn fail_over(primary: &Arc<PgServer>, standby: &Arc<PgServer>) {
    let (primary, standby) = (primary.clone(), standby.clone());
    blocking("the kill of the primary and the promotion", move || {
        primary.kill();
        standby.promote();
    })
    .await
}

/// Who leads, as the coordinator's HTTP API says (none while it stands by).
async fn leader(coordinator: &Coordinator) -> Option<LeaderStatus> {
    let doc: StatusDoc = reqwest::get(coordinator.url("/gpu/status"))
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    doc.leader
}

/// The leadership term the `leader` row of `server` holds.
async fn stored_term(server: &Arc<PgServer>) -> u64 {
    let server = server.clone();
    blocking("reading the leader row", move || {
        server.sql_on(DB, "SELECT term FROM leader WHERE id = 1")
    })
    .await
    .parse()
    .expect("a term")
}

/// A grant of `request_id` (1 MB on GPU 0, a long lease): its fence.
async fn granted(probe: &mut Probe, svc: &str, request_id: &str) -> u64 {
    probe
        .pub_json(
            "request",
            svc,
            json!({"request_id": request_id, "priority": 1, "vram_mb": 1, "gpu": "0",
                   "lease_ms": 600_000}),
        )
        .await;
    probe
        .reply(request_id, "granted")
        .await
        .fence
        .expect("a grant carries its fence")
}

/// A synchronous standby promoted after a SIGKILL of the primary, while a lease is held, a request
/// waits behind it and requests keep coming: the coordinator moves to the standby by itself, answers
/// every request JetStream acknowledged, keeps the holder and the waiter, grants above every fence
/// handed out before, and the history keeps every rule.
#[tokio::test]
async fn a_coordinator_follows_its_primary_to_the_promoted_synchronous_standby() {
    let (primary, standby) = pair(true).await;
    let mut config = test_config("pgfo_sync", &[("0", 24_000), ("1", 24_000)]);
    config.database.url = both(&primary, &standby);
    // A clock reading skewed by a slow round trip would hand the term on: another test's matter.
    config.leader.max_clock_skew_ms = 0;
    let subjects = Subjects::new(&config.nats.prefix).expect("a valid prefix");
    let coordinator = Coordinator::start(config.clone()).await;
    let before = eventually("it leads", || leader(&coordinator)).await;

    // A holder of most of GPU 0 and a request waiting behind it (less urgent: it never preempts).
    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;
    probe
        .pub_json(
            "request",
            "hold",
            json!({"request_id": "hold-1", "priority": 1, "vram_mb": 20_000, "gpu": "0",
                   "lease_ms": 600_000, "preemptible": false}),
        )
        .await;
    let held = probe.reply("hold-1", "granted").await;
    let held_fence = held.fence.expect("a grant carries its fence");
    probe
        .pub_json(
            "request",
            "wait",
            json!({"request_id": "wait-1", "priority": 2, "vram_mb": 10_000, "gpu": "0",
                   "timeout_ms": 600_000}),
        )
        .await;
    eventually("the second request waits", || async {
        let status = probe.status().await;
        status
            .queue
            .iter()
            .any(|q| q.request_id == "wait-1")
            .then_some(())
    })
    .await;

    // Requests keep coming, each acknowledged by JetStream before the next.
    let js = jetstream::new(nats_connect(&config.nats.url).await);
    let mut load = Load::start(&config.nats.url, &subjects).await;
    load.wait_for(BEFORE, "before the kill").await;

    // More while the primary dies, and after it died: a bounded backlog, however long the
    // failover takes.
    load.publish_more(DURING);
    let killed_at = std::time::Instant::now();
    fail_over(&primary, &standby).await;
    let promoted = killed_at.elapsed();
    let total = load.publish_more(AFTER);
    load.wait_for(total, "after the kill").await;
    let (acked, _) = load.stop().await;

    // Every acknowledged request is answered, so on the promoted standby (the primary is gone): the
    // coordinator moved by itself, and lost none with the primary.
    let wanted: BTreeSet<String> = acked.iter().map(|(id, _)| id.clone()).collect();
    let mut replies = Replies::default();
    replies
        .wait_for_all(&js, &subjects, "load", &wanted, FAILOVER)
        .await;
    println!(
        "every acknowledged request answered {:?} after the kill (the promotion took {promoted:?})",
        killed_at.elapsed()
    );
    // It leads there: in its term, if it reached the standby within its trust window, else in the next.
    let after = leader(&coordinator).await.expect("it leads");
    assert!(after.term >= before.term);
    assert_eq!(
        stored_term(&standby).await,
        after.term,
        "the promoted standby holds the leadership"
    );
    // Every fence handed out so far, before the failover and after: the holder's and the requests'.
    let handed_out = replies.max_fence.max(held_fence);

    // The holder and the waiter came through: the holder releases, the waiter is granted above every
    // fence handed out before the failover.
    let status = probe.status().await;
    let holder = status
        .gpus
        .iter()
        .flat_map(|g| &g.holders)
        .find(|h| h.request_id == "hold-1")
        .expect("the holder is still held");
    assert_eq!(holder.fence, held_fence);
    probe
        .pub_json(
            "release",
            "hold",
            json!({"request_id": "hold-1", "fence": held_fence}),
        )
        .await;
    let waiter = probe.reply("wait-1", "granted").await;
    let waiter_fence = waiter.fence.expect("a grant carries its fence");
    assert!(
        waiter_fence > handed_out,
        "the waiter's fence {waiter_fence} is above every earlier one ({handed_out})"
    );

    coordinator.stop_and_audit().await;
    drop((primary, standby));
}

/// An asynchronous standby stops receiving, then the leadership changes hands and more is granted on
/// the primary: the standby's `leader` row and fence are behind. The primary is killed and the
/// standby promoted: the coordinator leads again in a term above every term led before (the lease
/// store's, not the older one the standby holds) and grants above every fence handed out. (What the
/// standby missed is lost: `audit` is not asked; only a synchronous standby keeps it.)
#[tokio::test]
async fn after_a_failover_to_a_standby_that_missed_commits_no_term_or_fence_is_used_again() {
    let (primary, standby) = pair(false).await;
    let mut config = test_config("pgfo_async", &[("0", 24_000)]);
    config.database.url = both(&primary, &standby);
    config.leader.max_clock_skew_ms = 0;
    let first = Coordinator::start(config.clone()).await;
    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;
    let mut fences = vec![granted(&mut probe, "a", "a-1").await];
    let first_term = eventually("the first leads", || leader(&first)).await.term;
    // The standby has had everything so far; from now on it receives nothing.
    let behind = standby.clone();
    let want = first_term.to_string();
    blocking("the standby cut off", move || {
        behind.wait_for_on(DB, "SELECT term FROM leader WHERE id = 1", &want);
        behind.stop_receiving();
    })
    .await;

    // A new leader and more grants, which the standby does not see.
    first.stop().await.expect("the first stops cleanly");
    let second = Coordinator::start(config.clone()).await;
    let second_term = eventually("the second leads", || leader(&second))
        .await
        .term;
    assert!(second_term > first_term);
    for n in 1..=3 {
        fences.push(granted(&mut probe, "b", &format!("b-{n}")).await);
    }
    let handed_out = fences.iter().copied().max().expect("fences");
    assert_eq!(
        stored_term(&standby).await,
        first_term,
        "the standby missed the new term"
    );
    let stale = standby.clone();
    let standby_fence: u64 = blocking("reading the standby's fence", move || {
        stale.sql_on(DB, "SELECT max_fence FROM fence WHERE id = 1")
    })
    .await
    .parse()
    .expect("a fence");
    assert!(
        standby_fence < handed_out,
        "the standby missed the last fences ({standby_fence} < {handed_out})"
    );

    let killed_at = std::time::Instant::now();
    fail_over(&primary, &standby).await;
    // The standby's row is in an older term than the second's: it leads again in a new term, above
    // every term led before (not the standby's plus one, which the second led already).
    let now = eventually_within(
        &format!("leading in a term above {second_term} (the standby's is {first_term})"),
        FAILOVER,
        || async { leader(&second).await.filter(|l| l.term > second_term) },
    )
    .await;
    let fence = granted(&mut probe, "c", "c-1").await;
    println!(
        "led again in term {} and granted {:?} after the kill",
        now.term,
        killed_at.elapsed()
    );
    assert_eq!(stored_term(&standby).await, now.term);
    assert!(
        fence > handed_out,
        "fence {fence} after the failover is above every earlier one ({handed_out})"
    );
    second.stop().await.expect("the second stops cleanly");
    drop((primary, standby));
}
