//! One active coordinator per prefix: a second one stands by, takes over when the leader stops or dies,
//! and the history shows no two holders beyond capacity and fences that only rise.

use std::time::{Duration, Instant};

use gpu_coordinator::audit::Since;
use reqwest::StatusCode;
use serde_json::json;

use crate::support::{eventually, test_config, Coordinator, CoordinatorProcess, Probe};

/// The HTTP status of `GET /gpu/status` on a coordinator.
async fn status_code(coordinator: &Coordinator) -> StatusCode {
    reqwest::get(coordinator.url("/gpu/status"))
        .await
        .expect("the HTTP API answers")
        .status()
}

#[tokio::test]
async fn a_second_coordinator_stands_by_and_takes_over_with_the_state() {
    let config = test_config("ha_two", &[("0", 24_000)]);
    let first = Coordinator::start(config.clone()).await;
    let second = Coordinator::start(config.clone()).await;
    assert_eq!(status_code(&first).await, StatusCode::OK);
    // Once connected, the second one says it stands by (before that: it is starting).
    let url = second.url("/gpu/status");
    eventually("the second coordinator stands by", || async {
        let answer = reqwest::get(&url).await.ok()?;
        let status = answer.status();
        let body = answer.text().await.unwrap_or_default();
        (status == StatusCode::SERVICE_UNAVAILABLE && body.contains("not leading")).then_some(())
    })
    .await;
    assert_eq!(
        status_code(&first).await,
        StatusCode::OK,
        "the first still leads"
    );
    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;
    // The status names the leader, its term, and (once seen) the standby; the standby's 503 names the
    // leader.
    let leader = eventually("the leader sees its standby", || async {
        let leader = probe.status().await.leader?;
        (leader.standbys.len() == 1).then_some(leader)
    })
    .await;
    assert_eq!(leader.term, 1);
    let body = reqwest::get(&url)
        .await
        .expect("the standby answers")
        .text()
        .await
        .unwrap_or_default();
    assert!(body.contains(&leader.holder), "{body}");
    probe
        .pub_json(
            "request",
            "asr",
            json!({"request_id": "asr-1", "priority": 2, "vram_mb": 20000}),
        )
        .await;
    let held = probe.reply("asr-1", "granted").await;

    // The leader stops; the standby takes over at once (the lease is handed on) with the queue and
    // the holder as they were.
    first.stop().await.expect("the leader stops cleanly");
    eventually("the standby leads", || async {
        (status_code(&second).await == StatusCode::OK).then_some(())
    })
    .await;
    let status = probe.status().await;
    assert_eq!(status.gpus[0].holders[0].request_id, "asr-1");
    let now = status.leader.expect("the new leader says who it is");
    assert_eq!(
        (now.term, now.holder.as_str()),
        (2, leader.standbys[0].as_str()),
        "the standby leads in the next term"
    );
    probe
        .pub_json(
            "request",
            "chat",
            json!({"request_id": "chat-1", "priority": 0, "vram_mb": 20000}),
        )
        .await;
    probe.control("asr-1", "pause").await;
    probe
        .pub_json(
            "ack",
            "asr",
            json!({"request_id": "asr-1", "fence": held.fence, "action": "paused"}),
        )
        .await;
    let chat = probe.reply("chat-1", "granted").await;
    assert!(chat.fence > held.fence, "fences go on rising across terms");
    second.stop().await.expect("stops cleanly");
    let verdict = gpu_coordinator::app::audit::run(&config, Since::Start)
        .await
        .expect("the history can be read");
    if let Err(violation) = verdict {
        panic!("{violation}");
    }
}

/// A leader killed on the same host is replaced at once: its process is gone (the kernel dropped its
/// presence lock), so the standby does not wait for its lease (30 s here) to expire.
#[tokio::test]
async fn a_killed_leader_is_replaced_at_once_by_a_standby_of_its_host() {
    let mut config = test_config("ha_kill", &[("0", 24_000)]);
    config.leader.ttl_ms = 30_000;
    let leader = CoordinatorProcess::start(&config).await;
    let standby = Coordinator::start(config.clone()).await;
    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;
    probe
        .pub_json(
            "request",
            "a",
            json!({"request_id": "a-1", "priority": 1, "vram_mb": 1000}),
        )
        .await;
    let first = probe.reply("a-1", "granted").await;
    let db = sea_orm::Database::connect(&config.database.url)
        .await
        .expect("the journal's database");
    let lease_end = leader_lease_end(&db).await;

    leader.kill();
    let killed = Instant::now();
    probe
        .pub_json(
            "request",
            "b",
            json!({"request_id": "b-1", "priority": 1, "vram_mb": 1000}),
        )
        .await;
    let second = probe.reply("b-1", "granted").await;
    println!(
        "first grant {:?} after kill -9 of the leader",
        killed.elapsed()
    );
    assert!(second.fence > first.fence);
    assert_eq!(status_code(&standby).await, StatusCode::OK);
    // Granted while the dead leader's lease still ran, by Postgres's clock.
    let row = sea_orm::ConnectionTrait::query_one(
        &db,
        sea_orm::Statement::from_sql_and_values(
            sea_orm::DbBackend::Postgres,
            "SELECT extract(epoch FROM clock_timestamp())::float8 < $1 AS before, term \
             FROM leader WHERE id = 1",
            [lease_end.into()],
        ),
    )
    .await
    .expect("the leader row")
    .expect("a leader");
    assert!(
        row.try_get::<bool>("", "before").expect("a boolean"),
        "taken over before the dead leader's lease ended"
    );
    assert_eq!(row.try_get::<i64>("", "term").expect("the term"), 2);
    standby.stop().await.expect("stops cleanly");
}

/// When the lease of the leader in the `leader` row ends, by Postgres's clock (seconds since the epoch).
async fn leader_lease_end(db: &sea_orm::DatabaseConnection) -> f64 {
    sea_orm::ConnectionTrait::query_one(
        db,
        sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT extract(epoch FROM expires_at)::float8 AS expires_at FROM leader WHERE id = 1",
        ),
    )
    .await
    .expect("the leader row")
    .expect("a leader")
    .try_get("", "expires_at")
    .expect("a timestamp")
}

fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {signal} {pid}");
}

/// The leader is paused (SIGSTOP) past its lease: the standby takes over and grants; when the old
/// leader wakes it is deposed, writes nothing and publishes no grant, and the history keeps every rule.
#[tokio::test]
async fn a_paused_leader_wakes_up_deposed() {
    paused_leader_wakes_up_deposed(false).await
}

/// The same with Postgres written behind the journal stream: the new leader's marker in the stream
/// refuses the old one's next batch.
#[tokio::test]
async fn a_paused_leader_wakes_up_deposed_with_postgres_written_behind() {
    paused_leader_wakes_up_deposed(true).await
}

async fn paused_leader_wakes_up_deposed(write_behind: bool) {
    let mut config = test_config("ha_stop", &[("0", 24_000)]);
    config.database.write_behind = write_behind;
    let leader = CoordinatorProcess::start(&config).await;
    let standby = Coordinator::start(config.clone()).await;
    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;
    probe
        .pub_json(
            "request",
            "a",
            json!({"request_id": "a-1", "priority": 1, "vram_mb": 20000}),
        )
        .await;
    let a = probe.reply("a-1", "granted").await;

    signal(leader.pid(), "-STOP");
    let stopped = Instant::now();
    // The standby leads once the lease expires, with a-1 still holding: a stopped process still
    // holds its presence lock, so it is not taken for gone.
    eventually("the standby leads", || async {
        (status_code(&standby).await == StatusCode::OK).then_some(())
    })
    .await;
    let takeover = stopped.elapsed();
    println!("the standby leads {takeover:?} after SIGSTOP");
    // The lease lasts leader.ttl_ms (1 s) from the last renewal (every third of it): the standby
    // cannot have taken over much sooner.
    assert!(
        takeover >= Duration::from_millis(200),
        "taken over {takeover:?} after the stop: before the lease could expire?"
    );
    probe
        .pub_json(
            "request",
            "b",
            json!({"request_id": "b-1", "priority": 1, "vram_mb": 20000}),
        )
        .await;
    probe
        .pub_json(
            "release",
            "a",
            json!({"request_id": "a-1", "fence": a.fence}),
        )
        .await;
    let b = probe.reply("b-1", "granted").await;

    // The old leader wakes: whatever it was doing is refused; the new leader goes on granting.
    signal(leader.pid(), "-CONT");
    probe
        .pub_json(
            "release",
            "b",
            json!({"request_id": "b-1", "fence": b.fence}),
        )
        .await;
    probe.reply("b-1", "released").await;
    probe
        .pub_json(
            "request",
            "c",
            json!({"request_id": "c-1", "priority": 1, "vram_mb": 20000}),
        )
        .await;
    let c = probe.reply("c-1", "granted").await;
    assert!(c.fence > b.fence && b.fence > a.fence);
    // Every grant seen is one of the three (a copy of the outbox published again at a takeover is the
    // same message): none of the old leader's making.
    let known = [("a-1", a.fence), ("b-1", b.fence), ("c-1", c.fence)];
    let foreign = |s: &crate::support::Seen| {
        s.str("outcome") == Some("granted")
            && !known.iter().any(|(id, fence)| {
                s.str("request_id") == Some(id) && s.json["fence"].as_u64() == *fence
            })
    };
    assert!(
        !probe.drain_and_find(foreign),
        "a grant of the old leader's after it woke"
    );
    assert_eq!(
        status_code(&standby).await,
        StatusCode::OK,
        "the new leader still leads"
    );
    standby.stop().await.expect("stops cleanly");
    drop(leader);
    let verdict = gpu_coordinator::app::audit::run(&config, Since::Start)
        .await
        .expect("the history can be read");
    if let Err(violation) = verdict {
        panic!("{violation}");
    }
}

/// The leader loses Postgres: its lease cannot be renewed, so it stops acting within its trust window;
/// when Postgres is back it leads again, in a new term, with the state it had.
#[tokio::test]
async fn a_leader_cut_off_from_postgres_stops_acting_and_comes_back() {
    let pg = crate::support::PgServer::start();
    let mut config = test_config("ha_pgcut", &[("0", 24_000)]);
    config.database.url = pg.url("gpu_ha_pgcut");
    let coordinator = Coordinator::start(config.clone()).await;
    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;
    probe
        .pub_json(
            "request",
            "a",
            json!({"request_id": "a-1", "priority": 1, "vram_mb": 1000, "lease_ms": 600000}),
        )
        .await;
    let a = probe.reply("a-1", "granted").await;

    pg.stop();
    eventually("the leader stops acting", || async {
        (status_code(&coordinator).await == StatusCode::SERVICE_UNAVAILABLE).then_some(())
    })
    .await;
    pg.resume();
    let url = coordinator.url("/gpu/status");
    let leader = eventually("it leads again", || async {
        let doc: gpu_coordinator_wire::StatusDoc =
            reqwest::get(&url).await.ok()?.json().await.ok()?;
        let leader = doc.leader?;
        (leader.term >= 2).then_some(leader)
    })
    .await;
    assert!(leader.term >= 2);
    let status = probe.status().await;
    assert_eq!(
        status.gpus[0].holders[0].request_id, "a-1",
        "the holder kept"
    );
    probe
        .pub_json(
            "request",
            "b",
            json!({"request_id": "b-1", "priority": 1, "vram_mb": 1000}),
        )
        .await;
    let b = probe.reply("b-1", "granted").await;
    assert!(b.fence > a.fence);
    coordinator.stop().await.expect("stops cleanly");
}

/// Three coordinators of one prefix: exactly one leads, the other two stand by, and requests flow.
#[tokio::test]
async fn of_three_coordinators_exactly_one_leads() {
    let config = test_config("ha_three", &[("0", 24_000)]);
    let coordinators = [
        Coordinator::start(config.clone()).await,
        Coordinator::start(config.clone()).await,
        Coordinator::start(config.clone()).await,
    ];
    let leading = eventually("one leads and two stand by", || async {
        let mut codes = Vec::new();
        for c in &coordinators {
            codes.push(status_code(c).await);
        }
        let leading = codes.iter().filter(|c| **c == StatusCode::OK).count();
        let standing_by = codes
            .iter()
            .filter(|c| **c == StatusCode::SERVICE_UNAVAILABLE)
            .count();
        (leading == 1 && standing_by == 2).then_some(leading)
    })
    .await;
    assert_eq!(leading, 1);
    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;
    for (i, svc) in ["a", "b", "c"].iter().enumerate() {
        probe
            .pub_json(
                "request",
                svc,
                json!({"request_id": format!("{svc}-1"), "priority": 1, "vram_mb": 1000 + i}),
            )
            .await;
        probe.reply(&format!("{svc}-1"), "granted").await;
    }
    let status = probe.status().await;
    assert_eq!(status.gpus[0].holders.len(), 3);
    eventually("the leader names both standbys", || async {
        let leader = probe.status().await.leader?;
        (leader.standbys.len() == 2).then_some(())
    })
    .await;
    for c in coordinators {
        c.stop().await.expect("stops cleanly");
    }
}

/// The leader is cut off from NATS (a proxy in front of it cuts its connection): it gives the
/// leadership up within its trust window, and the coordinator that reaches NATS leads.
#[tokio::test]
async fn a_leader_cut_off_from_nats_gives_way() {
    let config = test_config("ha_natscut", &[("0", 24_000)]);
    let port = config
        .nats
        .url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse::<u16>().ok())
        .expect("the NATS URL has a port");
    let proxy = gpu_coordinator_test_support::Proxy::start(port).await;
    let mut through_proxy = config.clone();
    through_proxy.nats.url = proxy.url();
    let first = Coordinator::start(through_proxy).await;
    let leader_of = |coordinator: &Coordinator| {
        let url = coordinator.url("/gpu/status");
        async move {
            let doc: gpu_coordinator_wire::StatusDoc =
                reqwest::get(url).await.ok()?.json().await.ok()?;
            doc.leader
        }
    };
    let before = eventually("the first leads", || leader_of(&first)).await;
    let second = Coordinator::start(config.clone()).await;

    proxy.cut();
    let after = eventually("the second leads", || async {
        let leader = leader_of(&second).await?;
        (leader.term > before.term).then_some(leader)
    })
    .await;
    assert_ne!(after.holder, before.holder, "the other coordinator leads");
    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;
    probe
        .pub_json(
            "request",
            "a",
            json!({"request_id": "a-1", "priority": 1, "vram_mb": 1000}),
        )
        .await;
    probe.reply("a-1", "granted").await;
    proxy.restore();
    first.stop().await.expect("stops cleanly");
    second.stop().await.expect("stops cleanly");
}

/// JetStream loses the output stream and the coordinator's input consumer while it runs: it makes
/// both anew and goes on, instead of retrying forever against what is missing.
#[tokio::test]
async fn a_stream_and_a_consumer_lost_at_run_time_are_made_anew() {
    streams_lost_at_run_time(false).await
}

/// The same with Postgres written behind, its journal stream deleted too: made anew, and written on.
#[tokio::test]
async fn a_journal_stream_lost_at_run_time_is_made_anew() {
    streams_lost_at_run_time(true).await
}

async fn streams_lost_at_run_time(write_behind: bool) {
    let mut config = test_config("ha_streams", &[("0", 24_000)]);
    config.database.write_behind = write_behind;
    let coordinator = Coordinator::start(config.clone()).await;
    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;
    probe
        .pub_json(
            "request",
            "a",
            json!({"request_id": "a-1", "priority": 1, "vram_mb": 1000}),
        )
        .await;
    probe.reply("a-1", "granted").await;
    let subjects = gpu_coordinator_wire::Subjects::new(&config.nats.prefix).expect("prefix");
    probe
        .js
        .delete_stream(subjects.output_stream())
        .await
        .expect("delete the output stream");
    probe
        .js
        .delete_consumer_from_stream(
            gpu_coordinator::adapters::nats::CONSUMER,
            subjects.input_stream(),
        )
        .await
        .expect("delete the input consumer");
    if write_behind {
        probe
            .js
            .delete_stream(subjects.journal_stream())
            .await
            .expect("delete the journal stream");
    }
    probe
        .pub_json(
            "request",
            "b",
            json!({"request_id": "b-1", "priority": 1, "vram_mb": 1000}),
        )
        .await;
    probe.reply("b-1", "granted").await;
    let output = probe
        .js
        .get_stream(subjects.output_stream())
        .await
        .expect("the output stream is there again");
    assert!(
        output.cached_info().state.messages > 0,
        "and keeps the new messages"
    );
    if write_behind {
        probe
            .js
            .get_stream(subjects.journal_stream())
            .await
            .expect("the journal stream is there again");
    }
    coordinator.stop().await.expect("stops cleanly");
    if write_behind {
        // What was granted reached Postgres.
        let store = gpu_coordinator::adapters::postgres::PgJournal::connect(&config.database.url)
            .await
            .expect("the journal's database");
        let loaded = store.load_state(10).await.expect("load");
        let ids: Vec<&str> = loaded
            .records
            .iter()
            .map(|r| r.request_id.as_str())
            .collect();
        assert!(ids.iter().any(|id| id.ends_with("b-1")), "{ids:?}");
        store.close().await;
    }
}

/// Postgres slowed for the journal's writes: each statement that raises the `fence` row waits
/// `ms` (a row of `slowness`, changed at will), so that with Postgres written behind the journal
/// stream holds batches Postgres does not yet. And each change of leadership term is logged with
/// the input position Postgres held at that instant (`takeovers`).
async fn slow_postgres_and_log_takeovers(db: &sea_orm::DatabaseConnection, ms: u64) {
    sea_orm::ConnectionTrait::execute_unprepared(
        db,
        &format!(
            "CREATE TABLE slowness (ms bigint NOT NULL); INSERT INTO slowness VALUES ({ms}); \
             CREATE FUNCTION slow_journal() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
                 PERFORM pg_sleep((SELECT ms FROM slowness) / 1000.0); RETURN NULL; END $$; \
             CREATE TRIGGER slow_journal BEFORE INSERT ON fence \
                 FOR EACH STATEMENT EXECUTE FUNCTION slow_journal(); \
             CREATE TABLE takeovers (term bigint NOT NULL, input_seq bigint NOT NULL); \
             CREATE FUNCTION log_takeover() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
                 INSERT INTO takeovers SELECT NEW.term, input_seq FROM fence WHERE id = 1; \
                 RETURN NULL; END $$; \
             CREATE TRIGGER log_takeover AFTER UPDATE ON leader FOR EACH ROW \
                 WHEN (OLD.term IS DISTINCT FROM NEW.term) EXECUTE FUNCTION log_takeover();"
        ),
    )
    .await
    .expect("slow the journal's writes");
}

/// One `bigint` that `sql` selects.
async fn select_i64(db: &sea_orm::DatabaseConnection, sql: &str) -> Option<i64> {
    sea_orm::ConnectionTrait::query_one(
        db,
        sea_orm::Statement::from_string(sea_orm::DbBackend::Postgres, sql),
    )
    .await
    .ok()
    .flatten()
    .and_then(|row| row.try_get_by_index::<i64>(0).ok())
}

/// Write-behind, Postgres slowed so that the journal stream holds what Postgres does not yet, and
/// the leader stopped gracefully twice, each time with a standby taking over at once. The old
/// leader's writer is done before the leadership is handed on: at each change of term Postgres
/// holds every input the old leader handled, so the new leader reads back a stream nobody purges
/// under it. Nothing goes back: the input position in Postgres only rises, no request is granted
/// twice (under two fences), and `audit` finds the history sound.
#[tokio::test]
async fn a_graceful_takeover_behind_a_slow_postgres_takes_nothing_back() {
    let mut config = test_config("ha_behind", &[("0", 24_000)]);
    config.database.write_behind = true;
    let mut leader = Coordinator::start(config.clone()).await;
    let db = sea_orm::Database::connect(&config.database.url)
        .await
        .expect("the journal's database");
    slow_postgres_and_log_takeovers(&db, 400).await;
    let subjects = gpu_coordinator_wire::Subjects::new(&config.nats.prefix).expect("prefix");
    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;

    // The input position as Postgres holds it, watched until the end: it never goes back.
    let watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watcher = tokio::spawn({
        let (url, watching) = (config.database.url.clone(), watching.clone());
        async move {
            let db = sea_orm::Database::connect(&url)
                .await
                .expect("the database");
            let mut seen = Vec::new();
            while watching.load(std::sync::atomic::Ordering::SeqCst) {
                if let Some(seq) = select_i64(&db, "SELECT input_seq FROM fence WHERE id = 1").await
                {
                    if seen.last() != Some(&seq) {
                        seen.push(seq);
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            seen
        }
    });

    let mut held = Vec::new();
    let mut grants: std::collections::BTreeMap<String, std::collections::BTreeSet<u64>> =
        Default::default();
    for round in 0..2 {
        let standby = Coordinator::start(config.clone()).await;
        let url = standby.url("/gpu/status");
        eventually("the new coordinator stands by", || async {
            let answer = reqwest::get(&url).await.ok()?;
            (answer.status() == StatusCode::SERVICE_UNAVAILABLE).then_some(())
        })
        .await;
        // Requests granted and released, a few held across the takeover.
        for i in 0..40 {
            let id = format!("r{round}-{i}");
            probe
                .pub_json(
                    "request",
                    "svc",
                    json!({"request_id": id, "priority": 1, "vram_mb": 1000, "lease_ms": 600000}),
                )
                .await;
            let grant = probe.reply(&id, "granted").await;
            grants
                .entry(id.clone())
                .or_default()
                .insert(grant.fence.unwrap_or(0));
            if i % 10 == 0 {
                held.push((id, grant.fence));
            } else {
                probe
                    .pub_json(
                        "release",
                        "svc",
                        json!({"request_id": id, "fence": grant.fence}),
                    )
                    .await;
                probe.reply(&id, "released").await;
            }
        }
        // Every input stored so far is handled (each answered); Postgres lags behind.
        let handled = probe
            .js
            .get_stream(subjects.input_stream())
            .await
            .expect("the input stream")
            .info()
            .await
            .expect("its state")
            .state
            .last_sequence;
        let stored = select_i64(&db, "SELECT input_seq FROM fence WHERE id = 1")
            .await
            .unwrap_or(0);
        println!("round {round}: {handled} input(s) handled, Postgres holds {stored}");

        leader.stop().await.expect("the leader stops cleanly");
        let url = standby.url("/gpu/status");
        eventually("the standby leads", || async {
            (reqwest::get(&url).await.ok()?.status() == StatusCode::OK).then_some(())
        })
        .await;
        let term = i64::from(round) + 2;
        let at_takeover = select_i64(
            &db,
            &format!("SELECT input_seq FROM takeovers WHERE term = {term}"),
        )
        .await
        .expect("the takeover is logged");
        assert_eq!(
            u64::try_from(at_takeover).expect("a position"),
            handled,
            "when term {term} took over, Postgres held every input the old leader handled"
        );
        leader = standby;
    }

    // The holders kept across both takeovers release; each was granted once.
    for (id, fence) in &held {
        probe
            .pub_json("release", "svc", json!({"request_id": id, "fence": fence}))
            .await;
        probe.reply(id, "released").await;
    }
    leader.stop().await.expect("stops cleanly");
    watching.store(false, std::sync::atomic::Ordering::SeqCst);
    let positions = watcher.await.expect("the watcher");
    assert!(
        positions.windows(2).all(|w| w[0] <= w[1]),
        "the input position in Postgres went back: {positions:?}"
    );
    // Every grant seen, also those published again (the same message) or made again (another fence).
    probe.drain_and_find(|_| false);
    for seen in &probe.seen {
        if seen.str("outcome") == Some("granted") {
            grants
                .entry(seen.str("request_id").unwrap_or_default().to_owned())
                .or_default()
                .insert(seen.json["fence"].as_u64().unwrap_or(0));
        }
    }
    let twice: Vec<_> = grants.iter().filter(|(_, f)| f.len() > 1).collect();
    assert!(twice.is_empty(), "granted twice: {twice:?}");
    let verdict = gpu_coordinator::app::audit::run(&config, Since::Start)
        .await
        .expect("the history can be read");
    if let Err(violation) = verdict {
        panic!("{violation}");
    }
}
