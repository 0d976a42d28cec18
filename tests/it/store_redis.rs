//! `RedisLeases` against the Redis on loopback: each test uses its own key prefix (`it-<random>`) and
//! deletes its keys at the end; nothing else on the shared server is touched.

use std::time::{Duration, Instant};

use gpu_coordinator::adapters::redis::{LeaseOutcome, RedisLeases, Refused};
use gpu_coordinator_core::{Fence, Lease, LeaseOp};
use redis::AsyncCommands;

/// The suite's Redis (`GPU_IT_REDIS` names another).
fn url() -> String {
    crate::support::REDIS_URL.clone()
}

async fn fresh_store() -> RedisLeases {
    let prefix = format!("it-{:016x}", rand::random::<u64>());
    RedisLeases::connect(&url(), &prefix)
        .await
        .expect("the test Redis is up")
}

async fn raw() -> redis::aio::MultiplexedConnection {
    redis::Client::open(url())
        .expect("a valid URL")
        .get_multiplexed_async_connection()
        .await
        .expect("the test Redis is up")
}

/// Deletes every key under the store's prefix (what a flush or an empty restart does to it).
async fn delete_keys(store: &RedisLeases) {
    let mut conn = raw().await;
    let pattern = format!("{}:*", store.key_prefix());
    let keys: Vec<String> = {
        let mut iter = conn.scan_match::<_, String>(&pattern).await.expect("SCAN");
        let mut keys = Vec::new();
        while let Some(key) = futures::StreamExt::next(&mut iter).await {
            keys.push(key.expect("a key"));
        }
        keys
    };
    if !keys.is_empty() {
        let _: () = conn.del(keys).await.expect("DEL");
    }
}

/// The coordinator's clock, the one the store counts a lease's time left on.
fn now_ms() -> u64 {
    gpu_coordinator::clock::now_ms()
}

fn lease(request_id: &str, gpu: &str, fence: u64, vram_mb: u64) -> Lease {
    Lease {
        request_id: request_id.into(),
        service_id: format!("svc-{request_id}").into(),
        gpu: gpu.into(),
        fence: Fence(fence),
        vram_mb,
        capacity_mb: 100,
        expires_at: now_ms() + 60_000,
    }
}

async fn sorted_leases(store: &RedisLeases) -> Vec<Lease> {
    let mut leases = store.leases().await.expect("leases");
    leases.sort_by_key(|l| l.fence);
    leases
}

#[tokio::test]
async fn redis_acquires_within_capacity_and_refuses_beyond() {
    let store = fresh_store().await;
    store.ping().await.expect("ping");
    let a = lease("a", "gpu0", 1, 40);
    let b = lease("b", "gpu0", 2, 50);
    assert_eq!(store.acquire(&a).await.expect("a"), Ok(()));
    assert_eq!(store.acquire(&b).await.expect("b"), Ok(()));

    let c = lease("c", "gpu0", 3, 20);
    let refused = store
        .acquire(&c)
        .await
        .expect("c")
        .expect_err("over capacity");
    assert_eq!(
        refused,
        Refused::Capacity {
            gpu: "gpu0".into(),
            used_mb: 90,
            vram_mb: 20,
            capacity_mb: 100
        }
    );
    assert!(refused.to_string().contains("gpu0"), "{refused}");
    // Another GPU has its own capacity, and a refusal does not consume the fence.
    assert_eq!(
        store.acquire(&lease("c", "gpu1", 3, 100)).await.expect("c"),
        Ok(())
    );
    assert_eq!(store.max_fence().await.expect("fence"), Fence(3));
    // Exactly full is allowed.
    assert_eq!(
        store.acquire(&lease("d", "gpu0", 4, 10)).await.expect("d"),
        Ok(())
    );

    let leases = sorted_leases(&store).await;
    assert_eq!(leases.len(), 4);
    assert_eq!(leases[0], a);
    assert_eq!(leases[1], b);
    delete_keys(&store).await;
}

#[tokio::test]
async fn redis_refuses_a_stale_fence_and_a_second_holder() {
    let store = fresh_store().await;
    assert_eq!(store.max_fence().await.expect("fence"), Fence(0));
    let a = lease("a", "gpu0", 5, 10);
    assert_eq!(store.acquire(&a).await.expect("a"), Ok(()));
    assert_eq!(store.max_fence().await.expect("fence"), Fence(5));

    for fence in [3, 5] {
        let stale = lease("b", "gpu0", fence, 10);
        assert_eq!(
            store.acquire(&stale).await.expect("b"),
            Err(Refused::StaleFence {
                fence: Fence(fence),
                stored: Fence(5)
            })
        );
    }
    // The same lease again (a retried write) is accepted and changes nothing.
    assert_eq!(store.acquire(&a).await.expect("retry"), Ok(()));
    // The same request under a newer fence while its lease lives: a second holder, refused.
    let again = lease("a", "gpu1", 6, 10);
    assert_eq!(
        store.acquire(&again).await.expect("a again"),
        Err(Refused::Held {
            request_id: "a".into(),
            fence: Fence(5)
        })
    );
    assert_eq!(store.max_fence().await.expect("fence"), Fence(5));
    assert_eq!(sorted_leases(&store).await, vec![a]);
    delete_keys(&store).await;
}

#[tokio::test]
async fn redis_renews_and_releases_only_under_the_right_fence() {
    let store = fresh_store().await;
    let a = lease("a", "gpu0", 1, 100);
    assert_eq!(store.acquire(&a).await.expect("a"), Ok(()));

    let later = now_ms() + 120_000;
    assert!(!store.renew("a", Fence(2), later).await.expect("renew"));
    assert!(!store.renew("nobody", Fence(1), later).await.expect("renew"));
    assert!(store.renew("a", Fence(1), later).await.expect("renew"));
    assert_eq!(store.leases().await.expect("leases")[0].expires_at, later);
    let pttl: i64 = raw()
        .await
        .pttl(format!("{}:lease:a", store.key_prefix()))
        .await
        .expect("PTTL");
    assert!(
        pttl > 60_000 && pttl <= 120_000,
        "the key's TTL follows: {pttl}"
    );

    assert!(!store.release("a", Fence(2)).await.expect("release"));
    assert_eq!(store.leases().await.expect("leases").len(), 1);
    assert!(store.release("a", Fence(1)).await.expect("release"));
    assert!(!store.release("a", Fence(1)).await.expect("release twice"));
    assert!(!store
        .renew("a", Fence(1), later)
        .await
        .expect("renew released"));
    assert!(store.leases().await.expect("leases").is_empty());
    // The whole GPU is free again.
    assert_eq!(
        store.acquire(&lease("b", "gpu0", 2, 100)).await.expect("b"),
        Ok(())
    );

    // The same through `apply`.
    let c = lease("c", "gpu1", 3, 100);
    assert_eq!(
        store
            .apply(&LeaseOp::Acquire(c.clone()))
            .await
            .expect("apply"),
        LeaseOutcome::Done
    );
    let refused = store
        .apply(&LeaseOp::Acquire(lease("d", "gpu1", 4, 1)))
        .await
        .expect("apply");
    assert!(matches!(
        refused,
        LeaseOutcome::Refused(Refused::Capacity { .. })
    ));
    assert!(refused.refusal().is_some_and(|why| why.contains("gpu1")));
    let renew = |fence| LeaseOp::Renew {
        request_id: "c".into(),
        gpu: "gpu1".into(),
        fence: Fence(fence),
        expires_at: later,
    };
    assert_eq!(
        store.apply(&renew(9)).await.expect("apply"),
        LeaseOutcome::NotHeld
    );
    assert_eq!(
        store.apply(&renew(3)).await.expect("apply"),
        LeaseOutcome::Done
    );
    let release = |fence| LeaseOp::Release {
        request_id: "c".into(),
        gpu: "gpu1".into(),
        fence: Fence(fence),
    };
    assert_eq!(
        store.apply(&release(9)).await.expect("apply"),
        LeaseOutcome::NotHeld
    );
    assert_eq!(
        store.apply(&release(3)).await.expect("apply"),
        LeaseOutcome::Done
    );
    assert_eq!(
        store.apply(&release(3)).await.expect("apply"),
        LeaseOutcome::NotHeld
    );
    delete_keys(&store).await;
}

#[tokio::test]
async fn redis_lease_past_its_expiry_disappears_and_frees_capacity() {
    let store = fresh_store().await;
    let short = Lease {
        expires_at: now_ms() + 30,
        ..lease("short", "gpu0", 1, 100)
    };
    assert_eq!(store.acquire(&short).await.expect("short"), Ok(()));

    let key = format!("{}:lease:short", store.key_prefix());
    let mut conn = raw().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let exists: bool = conn.exists(&key).await.expect("EXISTS");
        if !exists {
            break;
        }
        assert!(Instant::now() < deadline, "the lease key outlived its PXAT");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(store.leases().await.expect("leases").is_empty());
    assert!(!store
        .renew("short", Fence(1), now_ms() + 60_000)
        .await
        .expect("renew"));
    // Its capacity is free: a lease for the whole GPU fits.
    assert_eq!(
        store
            .acquire(&lease("next", "gpu0", 2, 100))
            .await
            .expect("next"),
        Ok(())
    );
    let members: Vec<String> = conn
        .hkeys(format!("{}:gpu:gpu0", store.key_prefix()))
        .await
        .expect("HKEYS");
    assert_eq!(members, ["next"], "the expired member was dropped");
    delete_keys(&store).await;
}

#[tokio::test]
async fn redis_epoch_tells_when_the_store_lost_its_data() {
    let store = fresh_store().await;
    assert!(
        store.ensure_epoch().await.expect("epoch"),
        "a new store has no epoch"
    );
    assert!(!store.ensure_epoch().await.expect("epoch"));
    assert!(!store.ensure_epoch().await.expect("epoch"));
    delete_keys(&store).await;
    assert!(store.ensure_epoch().await.expect("epoch"), "flushed");
    assert!(!store.ensure_epoch().await.expect("epoch"));
    delete_keys(&store).await;
}

#[tokio::test]
async fn redis_rewrite_restores_leases_without_a_second_holder() {
    let store = fresh_store().await;
    let a = lease("a", "gpu0", 1, 60);
    let b = lease("b", "gpu1", 2, 100);
    let c = lease("c", "gpu0", 3, 40);
    for l in [&a, &b, &c] {
        assert_eq!(store.acquire(l).await.expect("acquire"), Ok(()));
    }
    let before = sorted_leases(&store).await;
    assert_eq!(before, vec![a.clone(), b.clone(), c.clone()]);

    delete_keys(&store).await;
    assert!(store.ensure_epoch().await.expect("epoch"));
    assert!(store.leases().await.expect("leases").is_empty());
    assert_eq!(store.max_fence().await.expect("fence"), Fence(0));
    // A store that lost writes takes writes again once recovered (the driver raises the fence to the
    // highest it issued; none here).
    store.recover(Fence(0)).await.expect("recovered");

    // Any order: the store writes them in fence order.
    let outcomes = store
        .rewrite(&[c.clone(), a.clone(), b.clone()])
        .await
        .expect("rewrite");
    assert_eq!(outcomes, vec![Ok(()), Ok(()), Ok(())]);
    assert_eq!(sorted_leases(&store).await, before);
    assert_eq!(store.max_fence().await.expect("fence"), Fence(3));
    // Rewriting again changes nothing.
    assert_eq!(
        store
            .rewrite(std::slice::from_ref(&a))
            .await
            .expect("rewrite"),
        vec![Ok(())]
    );

    // No second holder: a lease that does not fit stays out. One lost on its own is written back
    // under its fence, though newer fences were issued since.
    let intruder = lease("x", "gpu1", 3, 1);
    let lost = lease("y", "gpu2", 2, 1);
    assert_eq!(
        store
            .rewrite(&[intruder, lost.clone()])
            .await
            .expect("rewrite"),
        vec![
            Err(Refused::Capacity {
                gpu: "gpu1".into(),
                used_mb: 100,
                vram_mb: 1,
                capacity_mb: 100
            }),
            Ok(()),
        ]
    );
    assert!(sorted_leases(&store).await.contains(&lost));
    assert_eq!(
        store.max_fence().await.expect("fence"),
        Fence(3),
        "the fence is not lowered"
    );

    // The lease under the stored fence itself can be written back (acquire would refuse it).
    let _: () = raw()
        .await
        .del(format!("{}:lease:c", store.key_prefix()))
        .await
        .expect("DEL");
    assert_eq!(
        store.acquire(&c).await.expect("acquire"),
        Err(Refused::StaleFence {
            fence: Fence(3),
            stored: Fence(3)
        })
    );
    assert_eq!(
        store
            .apply(&LeaseOp::Restore(c.clone()))
            .await
            .expect("restore"),
        LeaseOutcome::Done
    );
    let mut expected = before.clone();
    expected.push(lost);
    expected.sort_by_key(|l| (l.fence, l.request_id.clone()));
    let mut after = sorted_leases(&store).await;
    after.sort_by_key(|l| (l.fence, l.request_id.clone()));
    assert_eq!(after, expected);
    delete_keys(&store).await;
}

/// Once a newer leadership term is claimed in the store, every write of the older term is refused, and
/// nothing of it is written; the newer term writes on.
#[tokio::test]
async fn redis_refuses_the_writes_of_a_deposed_term() {
    use gpu_coordinator::adapters::redis::RedisError;
    let old = fresh_store().await;
    let new = RedisLeases::connect(&url(), old.key_prefix())
        .await
        .expect("a second connection to the same keys");
    old.claim_term(1).await.expect("term 1 claimed");
    assert_eq!(
        old.acquire(&lease("a", "g0", 1, 10)).await.expect("up"),
        Ok(())
    );
    new.claim_term(2).await.expect("term 2 claimed");
    let deposed = |r: Result<_, RedisError>| matches!(r, Err(RedisError::Deposed { .. }));
    assert!(deposed(
        old.acquire(&lease("b", "g0", 2, 10)).await.map(|_| ())
    ));
    assert!(deposed(
        old.renew("a", Fence(1), now_ms() + 1_000).await.map(|_| ())
    ));
    assert!(deposed(old.release("a", Fence(1)).await.map(|_| ())));
    assert!(deposed(old.claim_term(1).await));
    let left: Vec<(String, Fence)> = sorted_leases(&new)
        .await
        .into_iter()
        .map(|l| (l.request_id.to_string(), l.fence))
        .collect();
    assert_eq!(
        left,
        vec![("a".to_owned(), Fence(1))],
        "the old term wrote nothing"
    );
    assert!(new.release("a", Fence(1)).await.expect("up"));
    assert_eq!(
        new.acquire(&lease("c", "g0", 3, 10)).await.expect("up"),
        Ok(())
    );
    delete_keys(&new).await;
}

/// Lease changes sent together in one pipeline are carried out in order, each answered as alone: a
/// release frees room that an acquire after it in the same batch takes, a renewal of a lease released
/// before it finds none, and a second holder is refused. A server that forgot the scripts (a restart,
/// `SCRIPT FLUSH`) runs the batch in the same order.
#[tokio::test]
async fn redis_applies_a_batch_in_order_in_one_pipeline() {
    let store = fresh_store().await;
    let a = lease("a", "gpu0", 1, 100);
    assert_eq!(store.acquire(&a).await.expect("a"), Ok(()));
    let b = lease("b", "gpu0", 2, 100);
    let c = lease("c", "gpu0", 3, 100);
    let release = |l: &Lease| LeaseOp::Release {
        request_id: l.request_id.clone(),
        gpu: l.gpu.clone(),
        fence: l.fence,
    };
    let renew = |l: &Lease| LeaseOp::Renew {
        request_id: l.request_id.clone(),
        gpu: l.gpu.clone(),
        fence: l.fence,
        expires_at: now_ms() + 120_000,
    };
    let batch = [
        // Full: refused before a's release, taken after it.
        LeaseOp::Acquire(b.clone()),
        release(&a),
        LeaseOp::Acquire(b.clone()),
        renew(&a),
        renew(&b),
        LeaseOp::Acquire(c.clone()),
    ];
    let outcomes = store.apply_all(&batch).await.expect("the batch");
    assert_eq!(outcomes.len(), batch.len());
    assert!(
        matches!(outcomes[0], LeaseOutcome::Refused(Refused::Capacity { .. })),
        "{:?}",
        outcomes[0]
    );
    assert_eq!(
        outcomes[1..5],
        [
            LeaseOutcome::Done,
            LeaseOutcome::Done,
            LeaseOutcome::NotHeld,
            LeaseOutcome::Done
        ]
    );
    assert!(
        matches!(outcomes[5], LeaseOutcome::Refused(Refused::Capacity { .. })),
        "{:?}",
        outcomes[5]
    );
    let leases = sorted_leases(&store).await;
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].request_id, b.request_id);
    assert!(leases[0].expires_at > b.expires_at, "renewed in the batch");

    // The server forgets its scripts, then learns one again (a lease written alone): a batch whose
    // first operation needs a forgotten script still runs in order. Had the release failed alone, the
    // acquire after it would find the GPU full and the one after that would raise the fence past it.
    let mut conn = raw().await;
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .expect("SCRIPT FLUSH");
    let other = lease("other", "gpu1", 4, 10);
    assert_eq!(store.acquire(&other).await.expect("other"), Ok(()));
    let c = lease("c", "gpu0", 5, 100);
    let d = lease("d", "gpu1", 6, 10);
    let again = store
        .apply_all(&[
            release(&b),
            LeaseOp::Acquire(c.clone()),
            LeaseOp::Acquire(d.clone()),
        ])
        .await
        .expect("the batch after the flush");
    assert_eq!(
        again,
        [LeaseOutcome::Done, LeaseOutcome::Done, LeaseOutcome::Done]
    );
    let leases = sorted_leases(&store).await;
    assert_eq!(leases, [other, c, d]);
    delete_keys(&store).await;
}

/// A store that lost its newest writes (the keys as a replica that missed them holds them: the last
/// lease gone, the fence and the write count as before it) refuses every write, writing nothing, and
/// says so at the epoch check, until `recover` raises the fence to the highest fence issued. A
/// private Redis.
#[tokio::test]
async fn redis_behind_the_writes_it_acknowledged_writes_nothing_until_recovered() {
    let server = gpu_coordinator_test_support::RedisServer::start();
    let store = RedisLeases::connect(&server.url(), "behind")
        .await
        .expect("the private Redis is up");
    store.claim_term(1).await.expect("term 1");
    assert!(store.ensure_epoch().await.expect("epoch"), "a new store");
    store
        .acquire(&lease("a", "0", 1, 10))
        .await
        .expect("up")
        .expect("written");
    let mut conn = server.connect();
    let writes_before: u64 = redis::cmd("GET")
        .arg("behind:writes")
        .query(&mut conn)
        .expect("GET");
    store
        .acquire(&lease("b", "0", 2, 10))
        .await
        .expect("up")
        .expect("written");
    assert!(
        !store.ensure_epoch().await.expect("epoch"),
        "nothing lost yet"
    );
    // b's write is lost.
    redis::pipe()
        .cmd("DEL")
        .arg("behind:lease:b")
        .cmd("HDEL")
        .arg("behind:gpu:0")
        .arg("b")
        .cmd("SET")
        .arg("behind:fence")
        .arg(1)
        .cmd("SET")
        .arg("behind:writes")
        .arg(writes_before)
        .query::<()>(&mut conn)
        .expect("lose b's write");

    assert!(
        store.ensure_epoch().await.expect("epoch"),
        "the store is behind"
    );
    let ops = [
        LeaseOp::Acquire(lease("c", "0", 3, 10)),
        LeaseOp::Release {
            request_id: "a".into(),
            gpu: "0".into(),
            fence: Fence(1),
        },
    ];
    let outcomes = store.apply_all(&ops).await.expect("up");
    assert_eq!(outcomes, [LeaseOutcome::Behind, LeaseOutcome::Behind]);
    let err = store
        .acquire(&lease("c", "0", 3, 10))
        .await
        .expect_err("behind");
    assert!(err.to_string().contains("lacks lease writes"), "{err}");
    let ids: Vec<String> = sorted_leases(&store)
        .await
        .into_iter()
        .map(|l| l.request_id.to_string())
        .collect();
    assert_eq!(ids, ["a"], "nothing was written");

    store.recover(Fence(2)).await.expect("recovered");
    assert_eq!(store.max_fence().await.expect("fence"), Fence(2));
    assert!(!store.ensure_epoch().await.expect("epoch"), "caught up");
    store
        .rewrite(&[lease("b", "0", 2, 10)])
        .await
        .expect("up")
        .into_iter()
        .for_each(|written| written.expect("b written back"));
    store
        .acquire(&lease("c", "0", 3, 10))
        .await
        .expect("up")
        .expect("written");
    assert_eq!(sorted_leases(&store).await.len(), 3);

    // A store that claimed a newer term refuses the recovery of an older one.
    let newer = RedisLeases::connect(&server.url(), "behind")
        .await
        .expect("up");
    newer.claim_term(2).await.expect("term 2");
    let err = store.recover(Fence(3)).await.expect_err("deposed");
    assert!(err.to_string().contains("refused a write"), "{err}");
}
