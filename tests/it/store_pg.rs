//! `PgJournal` against the PostgreSQL on loopback: each test makes its own database (`gpu_it_<random>`),
//! created by `PgJournal::connect` itself, and drops it at the end.

use gpu_coordinator::adapters::postgres::{PgError, PgJournal};
use gpu_coordinator_core::{End, Fence, Phase, RequestRecord};
use gpu_coordinator_wire::{Encoding, RejectCode};
use sea_orm::{ConnectionTrait, Database, DbBackend, Statement};

/// The suite's Postgres, without a database (`GPU_IT_POSTGRES` names another).
fn server() -> String {
    crate::support::PG_SERVER.clone()
}

/// A database name no other test uses, and its URL.
fn fresh_database() -> (String, String) {
    let name = format!("gpu_it_{}", crate::support::unique("pg"));
    let url = format!("{}/{name}", server());
    (name, url)
}

async fn drop_database(name: &str) {
    let admin = Database::connect(format!("{}/postgres", server()))
        .await
        .expect("the test server is up");
    admin
        .execute_unprepared(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .await
        .expect("dropping the test database");
    let _ = admin.close().await;
}

/// A store on a fresh database, migrated.
async fn fresh_store() -> (PgJournal, String) {
    let (name, url) = fresh_database();
    let store = PgJournal::connect(&url)
        .await
        .expect("connect creates the database");
    store.migrate().await.expect("migrations run");
    (store, name)
}

async fn finish(store: PgJournal, name: &str) {
    store.close().await;
    drop_database(name).await;
}

/// An outbox row, varied by `id`.
fn outbox_row(id: u64) -> gpu_coordinator::adapters::postgres::OutboxRow {
    gpu_coordinator::adapters::postgres::OutboxRow {
        id,
        msg_id: format!("m-{id}"),
        subject: format!("gpu.reply.s{}", id % 7),
        msgpack: id.is_multiple_of(2),
        payload: id.to_be_bytes().to_vec(),
    }
}

pub(crate) const BASE: u64 = 1_764_000_000_000;

/// A record in `phase` with every field the phase allows filled in, and varied per `seq`.
pub(crate) fn record(id: &str, seq: u64, phase: Phase) -> RequestRecord {
    let granted = !matches!(phase, Phase::Queued);
    let ended = phase == Phase::Ended;
    RequestRecord {
        request_id: id.into(),
        service_id: format!("svc-{}", seq % 3).into(),
        priority: (seq % 3) as u8,
        arrival: seq,
        encoding: if seq.is_multiple_of(2) {
            Encoding::MsgPack
        } else {
            Encoding::Json
        },
        vram_mb: Some(1024 * seq),
        gpu_pin: seq.is_multiple_of(2).then(|| "GPU-1".into()),
        preemptible: !seq.is_multiple_of(3),
        pause_ms: (!seq.is_multiple_of(4)).then_some(250 * seq),
        lease_ms: 30_000 + seq,
        requested_at: BASE + seq,
        timeout_at: BASE + seq + 60_000,
        phase,
        gpu: granted.then(|| "GPU-1".into()),
        held_mb: granted.then_some(1024 * seq),
        fence: granted.then_some(Fence(100 + seq)),
        granted_at: granted.then_some(BASE + seq + 10),
        expires_at: granted.then_some(BASE + seq + 30_010),
        pause_deadline: (phase == Phase::Pausing).then_some(BASE + seq + 20),
        paused_at: (phase == Phase::Paused).then_some(BASE + seq + 30),
        waited_ms: granted.then_some(10),
        // Every other ended record was rejected, with its code.
        end: ended.then_some(if seq.is_multiple_of(2) {
            End::Rejected
        } else {
            End::TimedOut
        }),
        ended_at: ended.then_some(BASE + seq + 40),
        detail: ended.then(|| "waited 60 s for \"GPU-1\"; l'attente a expiré".to_owned()),
        code: (ended && seq.is_multiple_of(2)).then_some(RejectCode::Unplaceable),
    }
}

/// A record with every optional field empty.
pub(crate) fn bare(id: &str, seq: u64) -> RequestRecord {
    RequestRecord {
        request_id: id.into(),
        service_id: "svc".into(),
        priority: 255,
        arrival: seq,
        encoding: Encoding::Json,
        vram_mb: None,
        gpu_pin: None,
        preemptible: false,
        pause_ms: None,
        lease_ms: 0,
        requested_at: 0,
        timeout_at: 0,
        phase: Phase::Queued,
        gpu: None,
        held_mb: None,
        fence: None,
        granted_at: None,
        expires_at: None,
        pause_deadline: None,
        paused_at: None,
        waited_ms: None,
        end: None,
        ended_at: None,
        detail: None,
        code: None,
    }
}

pub(crate) fn ended_at(id: &str, seq: u64, at: u64) -> RequestRecord {
    RequestRecord {
        ended_at: Some(at),
        end: Some(End::Released),
        ..record(id, seq, Phase::Ended)
    }
}

#[tokio::test]
async fn pg_creates_its_database_and_migrates_idempotently() {
    let (name, url) = fresh_database();
    // Two processes starting at once: both create the database and migrate it.
    let (a, b) = tokio::join!(PgJournal::connect(&url), PgJournal::connect(&url));
    let (a, b) = (a.expect("first connect"), b.expect("concurrent connect"));
    let (ma, mb) = tokio::join!(a.migrate(), b.migrate());
    ma.expect("first migration");
    mb.expect("concurrent migration");
    a.migrate().await.expect("a second run is a no-op");
    b.close().await;

    // A database that exists is simply opened.
    let again = PgJournal::connect(&url).await.expect("reconnect");
    again.migrate().await.expect("a third run is a no-op");
    again.ping().await.expect("ping");
    let applied = again
        .connection()
        .query_one(Statement::from_string(
            DbBackend::Postgres,
            "SELECT count(*) AS n FROM seaql_migrations",
        ))
        .await
        .expect("read the migration table")
        .expect("one row")
        .try_get::<i64>("", "n")
        .expect("a count");
    assert_eq!(
        applied,
        <migration::Migrator as migration::MigratorTrait>::migrations().len() as i64,
        "each migration applied once"
    );
    let (records, fence) = again.load(10).await.expect("load an empty store");
    assert!(records.is_empty());
    assert_eq!(fence, Fence(0));
    again.close().await;
    finish(a, &name).await;
}

#[tokio::test]
async fn pg_round_trips_every_phase_and_field() {
    let (store, name) = fresh_store().await;
    let records = vec![
        record("queued", 1, Phase::Queued),
        record("active", 2, Phase::Active),
        record("pausing", 3, Phase::Pausing),
        record("paused", 4, Phase::Paused),
        bare("bare", 5),
        record("ended", 6, Phase::Ended),
    ];
    store
        .apply(&records, Some(Fence(106)))
        .await
        .expect("apply");
    let (loaded, fence) = store.load(10).await.expect("load");
    assert_eq!(
        loaded, records,
        "non-ended in seq order, then the ended one"
    );
    assert_eq!(fence, Fence(106));

    // Every End survives too.
    let ends = [
        End::Released,
        End::TimedOut,
        End::Cancelled,
        End::Revoked,
        End::Rejected,
    ];
    let ended: Vec<_> = ends
        .iter()
        .enumerate()
        .map(|(i, end)| RequestRecord {
            end: Some(*end),
            ..ended_at(&format!("end-{i}"), 10 + i as u64, BASE + 1_000 + i as u64)
        })
        .collect();
    store.apply(&ended, None).await.expect("apply ended");
    let (loaded, _) = store.load(10).await.expect("load");
    assert_eq!(&loaded[5..], &[&records[5..], &ended[..]].concat()[..]);
    finish(store, &name).await;
}

#[tokio::test]
async fn pg_upsert_overwrites_and_the_last_duplicate_wins() {
    let (store, name) = fresh_store().await;
    let queued = record("r1", 1, Phase::Queued);
    store
        .apply(std::slice::from_ref(&queued), None)
        .await
        .expect("insert");

    let active = record("r1", 1, Phase::Active);
    store
        .apply(std::slice::from_ref(&active), None)
        .await
        .expect("update");
    assert_eq!(store.load(10).await.expect("load").0, vec![active.clone()]);

    // The same request twice in one batch: one statement cannot touch a row twice, the later one wins.
    let paused = record("r1", 1, Phase::Paused);
    let other = record("r2", 2, Phase::Queued);
    store
        .apply(&[active.clone(), other.clone(), paused.clone()], None)
        .await
        .expect("batch with a duplicate");
    assert_eq!(store.load(10).await.expect("load").0, vec![paused, other]);

    // A batch larger than one statement's rows.
    let many: Vec<_> = (10..2_510)
        .map(|seq| record(&format!("bulk-{seq}"), seq, Phase::Queued))
        .collect();
    store.apply(&many, None).await.expect("a large batch");
    assert_eq!(store.load(0).await.expect("load").0.len(), 2 + many.len());
    finish(store, &name).await;
}

#[tokio::test]
async fn pg_fence_only_rises() {
    let (store, name) = fresh_store().await;
    store.apply(&[], Some(Fence(10))).await.expect("fence 10");
    assert_eq!(store.load(0).await.expect("load").1, Fence(10));
    store.apply(&[], Some(Fence(5))).await.expect("fence 5");
    assert_eq!(
        store.load(0).await.expect("load").1,
        Fence(10),
        "never lowered"
    );
    store.apply(&[], None).await.expect("an empty batch");

    // A request's own fence above the fence row counts too.
    let active = RequestRecord {
        fence: Some(Fence(20)),
        ..record("r1", 1, Phase::Active)
    };
    store
        .apply(&[active], Some(Fence(15)))
        .await
        .expect("apply");
    assert_eq!(store.load(0).await.expect("load").1, Fence(20));
    store.apply(&[], Some(Fence(30))).await.expect("fence 30");
    assert_eq!(store.load(0).await.expect("load").1, Fence(30));
    finish(store, &name).await;
}

#[tokio::test]
async fn pg_load_returns_open_requests_in_seq_order_and_the_most_recent_ended() {
    let (store, name) = fresh_store().await;
    let open = [
        record("c", 30, Phase::Paused),
        record("a", 10, Phase::Queued),
        record("d", 40, Phase::Active),
        record("b", 20, Phase::Pausing),
    ];
    let ended = [
        ended_at("e1", 1, BASE + 500),
        ended_at("e2", 2, BASE + 100),
        ended_at("e3", 3, BASE + 900),
        ended_at("e4", 4, BASE + 300),
        ended_at("e5", 5, BASE + 700),
    ];
    store.apply(&open, None).await.expect("apply open");
    store.apply(&ended, None).await.expect("apply ended");

    let ids = |records: Vec<RequestRecord>| {
        records
            .into_iter()
            .map(|r| r.request_id)
            .collect::<Vec<_>>()
    };
    let (loaded, _) = store.load(2).await.expect("load 2");
    assert_eq!(ids(loaded), ["a", "b", "c", "d", "e5", "e3"]);
    let (loaded, _) = store.load(0).await.expect("load 0");
    assert_eq!(ids(loaded), ["a", "b", "c", "d"]);
    let (loaded, _) = store.load(100).await.expect("load all");
    assert_eq!(
        ids(loaded),
        ["a", "b", "c", "d", "e2", "e4", "e1", "e5", "e3"]
    );

    // A request that ends leaves the open set.
    store
        .apply(&[ended_at("a", 10, BASE + 1_000)], None)
        .await
        .expect("end a");
    let (loaded, _) = store.load(1).await.expect("load 1");
    assert_eq!(ids(loaded), ["b", "c", "d", "a"]);
    finish(store, &name).await;
}

#[tokio::test]
async fn pg_refuses_what_a_bigint_cannot_hold_and_writes_nothing() {
    let (store, name) = fresh_store().await;
    let fine = record("fine", 1, Phase::Queued);
    let huge = RequestRecord {
        timeout_at: u64::MAX,
        ..record("huge", 2, Phase::Queued)
    };
    let err = store
        .apply(&[fine, huge], Some(Fence(3)))
        .await
        .expect_err("u64::MAX does not fit");
    assert!(
        matches!(&err, PgError::OutOfRange { field: "timeout_at", request_id, .. } if request_id == "huge"),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains(&name) && message.contains("timeout_at"),
        "{message}"
    );
    assert_eq!(store.load(10).await.expect("load"), (vec![], Fence(0)));
    finish(store, &name).await;
}

/// One batch writes records, fence, input position and outbox atomically; published rows go; the
/// fence only rises, a batch without a position keeps the stored one; `load_state` reads it all back, with the highest arrival number even when the
/// ended rows are not reloaded.
#[tokio::test]
async fn pg_batches_carry_the_outbox_and_the_input_position() {
    use gpu_coordinator::adapters::postgres::Batch;
    let (store, name) = fresh_store().await;
    let first = [record("a", 7, Phase::Active), bare("b", 9)];
    let outbox = [outbox_row(1), outbox_row(2), outbox_row(3)];
    store
        .write(&Batch {
            records: &first,
            max_fence: Some(Fence(500)),
            input_seq: Some(40),
            input_reset: false,
            outbox: &outbox,
            published_upto: None,
            term: None,
        })
        .await
        .expect("write a batch");
    let state = store.load_state(0).await.expect("load");
    assert_eq!(state.input_seq, 40);
    assert_eq!(state.max_fence, Fence(500));
    assert_eq!(state.max_arrival, 9);
    assert_eq!(state.outbox, outbox);

    // Rows 1 and 2 were published.
    let mut ended = bare("b", 9);
    ended.phase = Phase::Ended;
    ended.end = Some(End::Released);
    ended.ended_at = Some(1);
    store
        .write(&Batch {
            records: std::slice::from_ref(&ended),
            max_fence: Some(Fence(3)),
            input_seq: Some(12),
            input_reset: false,
            outbox: &[outbox_row(4)],
            published_upto: Some(2),
            term: None,
        })
        .await
        .expect("write a second batch");
    let state = store.load_state(0).await.expect("load");
    // The fence and the position only rise.
    assert_eq!((state.input_seq, state.max_fence), (40, Fence(500)));
    assert_eq!(
        state.max_arrival, 9,
        "the ended row is not reloaded, its seq still counts"
    );
    assert_eq!(state.records.len(), 1);
    assert_eq!(state.outbox, [outbox_row(3), outbox_row(4)]);

    // A position alone; an empty batch writes nothing.
    store
        .write(&Batch {
            input_seq: Some(41),
            published_upto: Some(4),
            ..Batch::default()
        })
        .await
        .expect("write a position");
    store
        .write(&Batch::default())
        .await
        .expect("nothing to write");
    let state = store.load_state(0).await.expect("load");
    assert_eq!(state.input_seq, 41);
    assert!(state.outbox.is_empty());

    // A reset lowers it: the input stream was made anew, numbered from its start again.
    store
        .write(&Batch {
            input_seq: Some(3),
            input_reset: true,
            ..Batch::default()
        })
        .await
        .expect("write a reset position");
    assert_eq!(store.load_state(0).await.expect("load").input_seq, 3);
    finish(store, &name).await;
}

/// An older batch written again after a newer one (a takeover reading back a write-behind journal
/// stream while the earlier leader's writer, still running, wrote Postgres and purged it) takes
/// nothing back: no request row, no fence, no input position.
#[tokio::test]
async fn pg_an_older_batch_written_after_a_newer_one_takes_nothing_back() {
    use gpu_coordinator::adapters::postgres::Batch;
    let (store, name) = fresh_store().await;
    let queued = [record("a", 7, Phase::Queued), bare("b", 9)];
    let older = store
        .rows(&Batch {
            records: &queued,
            max_fence: Some(Fence(30)),
            input_seq: Some(5),
            ..Batch::default()
        })
        .expect("rows");
    store.write_rows(&older).await.expect("the older batch");
    let granted = record("a", 7, Phase::Active);
    let ended = ended_at("b", 9, BASE + 50);
    let newer = store
        .rows(&Batch {
            records: &[granted.clone(), ended.clone()],
            max_fence: Some(Fence(31)),
            input_seq: Some(6),
            ..Batch::default()
        })
        .expect("rows");
    store.write_rows(&newer).await.expect("the newer batch");
    let before = store.load_state(10).await.expect("load");

    // The older batch again, late.
    store.write_rows(&older).await.expect("written late");
    let after = store.load_state(10).await.expect("load");
    assert_eq!(
        after.records,
        [granted.clone(), ended.clone()],
        "the newer rows are kept"
    );
    assert_eq!(after.input_seq, 6, "the input position does not go back");
    assert_eq!(
        after.max_fence, before.max_fence,
        "the fence does not go back"
    );

    // A newer batch still writes.
    let later = store
        .rows(&Batch {
            records: &[bare("c", 11)],
            input_seq: Some(7),
            ..Batch::default()
        })
        .expect("rows");
    store.write_rows(&later).await.expect("a newer batch");
    let last = store.load_state(10).await.expect("load");
    assert_eq!(last.input_seq, 7);
    assert_eq!(
        last.records,
        [granted, bare("c", 11), ended],
        "open ones first"
    );
    finish(store, &name).await;
}

/// A batch carries its writer's leadership term: under another term than the leader row's it is
/// refused whole, with a refusal the driver does not retry; under the leader's own term it is written.
#[tokio::test]
async fn pg_batches_of_a_deposed_term_change_nothing() {
    use gpu_coordinator::adapters::postgres::{Batch, PgError};
    use gpu_coordinator::ports::{Journal, Term};
    use sea_orm::ConnectionTrait;
    let (store, name) = fresh_store().await;
    store
        .connection()
        .execute_unprepared(
            "INSERT INTO leader (id, term, holder, expires_at) VALUES (1, 2, 'other', now())",
        )
        .await
        .expect("a leader row of term 2");
    let records = [record("a", 1, Phase::Active)];
    let stale = Batch {
        records: &records,
        max_fence: Some(Fence(9)),
        input_seq: Some(5),
        term: Some(Term(1)),
        ..Batch::default()
    };
    let refused = store
        .write(&stale)
        .await
        .expect_err("term 1 is not the leader's");
    assert!(
        matches!(&refused, PgError::StaleTerm { term: 1, detail, .. } if detail.contains("term 2")),
        "{refused:?}"
    );
    let through_the_port = Journal::write(&store, &stale)
        .await
        .expect_err("refused through the port too");
    assert!(through_the_port.is_deposed(), "{through_the_port}");
    let state = store.load_state(10).await.expect("load");
    assert!(
        state.records.is_empty() && state.input_seq == 0,
        "nothing written"
    );

    store
        .write(&Batch {
            term: Some(Term(2)),
            ..stale
        })
        .await
        .expect("the leader's term writes");
    let state = store.load_state(10).await.expect("load");
    assert_eq!((state.records.len(), state.input_seq), (1, 5));
    finish(store, &name).await;
}

/// The coordinators long unseen are forgotten: their rows, and the presence file of one that is gone
/// (killed: its file left, its lock dropped); a live one keeps its file, and a recent row stays.
#[tokio::test]
async fn pg_coordinators_long_unseen_are_forgotten_with_the_files_of_the_gone() {
    use gpu_coordinator::adapters::postgres::{forget_unseen, presence_file, PgLeadership};
    use std::time::Duration;
    let (store, name) = fresh_store().await;
    let db = store.connection();
    let unique = crate::support::unique("forget");
    // A standby killed long ago: its row, and its file without a lock.
    let gone = format!("{unique}-gone");
    let file = presence_file(&gone);
    std::fs::create_dir_all(file.parent().expect("a directory")).expect("the directory");
    std::fs::File::create(&file).expect("the file of a killed process");
    // A standby alive (it holds its file locked), but unseen as long: a stall, Postgres away.
    let live = PgLeadership::new(
        db.clone(),
        Duration::from_secs(1),
        Duration::from_millis(100),
    );
    let live_file = presence_file(live.holder());
    assert!(live_file.exists(), "a live coordinator holds its file");
    let recent = format!("{unique}-recent");
    let me = format!("{unique}-me");
    // Two rows unseen for an hour, two seen lately.
    for (holder, seen_ago_secs) in [
        (gone.as_str(), 3_600.0),
        (live.holder(), 3_600.0),
        (recent.as_str(), 10.0),
        (me.as_str(), 10.0),
    ] {
        db.execute(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "INSERT INTO coordinators (holder, seen_at) \
             VALUES ($1, now() - make_interval(secs => $2))",
            [holder.into(), seen_ago_secs.into()],
        ))
        .await
        .expect("a coordinators row");
    }

    let mut forgotten = forget_unseen(&db, &me, Duration::from_secs(60))
        .await
        .expect("forgetting");
    forgotten.sort();
    let mut expected = vec![gone.clone(), live.holder().to_owned()];
    expected.sort();
    assert_eq!(forgotten, expected);
    assert!(!file.exists(), "the file of the gone one is removed");
    assert!(live_file.exists(), "the live one keeps its file");
    let left: Vec<String> = db
        .query_all(Statement::from_string(
            DbBackend::Postgres,
            "SELECT holder FROM coordinators ORDER BY holder",
        ))
        .await
        .expect("the rows")
        .iter()
        .map(|row| row.try_get::<String>("", "holder").expect("a holder"))
        .collect();
    let mut kept = vec![me.clone(), recent.clone()];
    kept.sort();
    assert_eq!(left, kept, "the recent rows and the caller's own stay");
    // The caller's own row is never forgotten, however long unseen.
    let forgotten = forget_unseen(&db, &me, Duration::ZERO)
        .await
        .expect("forgetting");
    assert_eq!(forgotten, [recent]);
    drop(live);
    assert!(!live_file.exists(), "a graceful end takes its file away");
    drop(db);
    finish(store, &name).await;
}

/// A batch is one statement whatever its size (one array per column): 3,000 records, beyond what
/// Postgres's 65,535 bind parameters would allow as rows of values, and 5,000 outbox rows round-trip; a
/// batch whose last record breaks a constraint leaves nothing of itself, records, outbox or position.
#[tokio::test]
async fn pg_a_batch_of_any_size_is_written_whole_or_not_at_all() {
    use gpu_coordinator::adapters::postgres::Batch;
    let (store, name) = fresh_store().await;
    let phases = [Phase::Queued, Phase::Active, Phase::Pausing, Phase::Ended];
    let records: Vec<RequestRecord> = (1..=3_000u64)
        .map(|seq| record(&format!("r{seq}"), seq, phases[seq as usize % phases.len()]))
        .collect();
    let outbox: Vec<_> = (1..=5_000).map(outbox_row).collect();
    store
        .write(&Batch {
            records: &records,
            max_fence: Some(Fence(70_000)),
            input_seq: Some(3_000),
            outbox: &outbox,
            ..Batch::default()
        })
        .await
        .expect("a big batch");
    let state = store.load_state(3_000).await.expect("load");
    let mut loaded = state.records.clone();
    loaded.sort_by_key(|r| r.arrival);
    assert_eq!(loaded, records);
    assert_eq!(state.outbox, outbox);
    assert_eq!((state.input_seq, state.max_fence), (3_000, Fence(70_000)));

    // The last record takes an arrival number another request holds (`seq` is unique).
    let mut broken: Vec<RequestRecord> = (3_001..=5_000u64)
        .map(|seq| bare(&format!("r{seq}"), seq))
        .collect();
    broken.push(bare("thief", 17));
    let err = store
        .write(&Batch {
            records: &broken,
            max_fence: Some(Fence(90_000)),
            input_seq: Some(5_000),
            input_reset: false,
            outbox: &[outbox_row(5_001)],
            published_upto: Some(2_500),
            term: None,
        })
        .await
        .expect_err("a duplicate arrival number");
    assert!(
        matches!(err, PgError::Write { records: 2_001, .. }),
        "{err:?}"
    );
    let after = store.load_state(3_000).await.expect("load");
    assert_eq!(after.records.len(), 3_000, "no record of the failed batch");
    assert_eq!(
        after.outbox, outbox,
        "neither its outbox row nor its deletion"
    );
    assert_eq!((after.input_seq, after.max_fence), (3_000, Fence(70_000)));
    finish(store, &name).await;
}

/// A stored row the core cannot represent (an unknown phase, a negative number) is reported by
/// request and server when the journal is loaded, rather than read as something else.
#[tokio::test]
async fn pg_load_reports_a_row_it_cannot_read() {
    let (store, name) = fresh_store().await;
    store
        .apply(&[record("odd", 1, Phase::Active)], None)
        .await
        .expect("write");
    for (corruption, detail) in [
        ("phase = 'melted'", "unknown phase \"melted\""),
        (
            "phase = 'queued', lease_ms = -5",
            "lease_ms is negative (-5)",
        ),
    ] {
        store
            .connection()
            .execute_unprepared(&format!("UPDATE requests SET {corruption}"))
            .await
            .expect("corrupt the row");
        let err = store.load_state(10).await.expect_err("an unreadable row");
        assert!(
            matches!(&err, PgError::Corrupt { request_id, detail: d, .. } if request_id == "odd" && d == detail),
            "{err:?}"
        );
        assert!(err.to_string().contains(&name), "{err}");
    }
    finish(store, &name).await;
}

/// A priority-2 holder of 300 MB on `g0`, granted at `BASE`, with this `pause_ms` hint.
pub(crate) fn holder(id: &str, seq: u64, pause_ms: Option<u64>) -> RequestRecord {
    RequestRecord {
        priority: 2,
        vram_mb: Some(300),
        gpu_pin: None,
        preemptible: true,
        pause_ms,
        gpu: Some("g0".into()),
        held_mb: Some(300),
        granted_at: Some(BASE),
        expires_at: Some(BASE + 3_600_000),
        ..record(id, seq, Phase::Active)
    }
}

/// Which holder a coordinator restored from `loaded` (holders from [`holder`] on `g0`, 1000 MB)
/// pauses for an urgent request of 350 MB: one of them, the one the tie-break picks.
pub(crate) fn paused_after_restore(loaded: Vec<RequestRecord>) -> Vec<String> {
    use gpu_coordinator_core::{Action, GpuSpec, Input, SchedConfig, Scheduler, Snapshot};
    use gpu_coordinator_wire::{ControlAction, Inbound, RequestMsg};
    let now = BASE + 1_000;
    let mut sched = Scheduler::new(
        SchedConfig::default(),
        vec![GpuSpec {
            id: "g0".into(),
            total_mb: 1_000,
        }],
    );
    let max_arrival = loaded.iter().map(|r| r.arrival).max().unwrap_or(0);
    sched.restore(
        Snapshot {
            requests: loaded,
            max_fence: Fence(1_000),
            leases: Vec::new(),
            max_arrival,
        },
        now,
    );
    let urgent = RequestMsg {
        host: None,
        request_id: Some("urgent".into()),
        service_id: Some("chat".into()),
        priority: 0,
        timeout_ms: None,
        lease_ms: None,
        vram_mb: Some(350),
        gpu: None,
        preemptible: None,
        pause_ms: None,
    };
    sched.handle_input(
        Input::Inbound {
            service: "chat".into(),
            encoding: Encoding::Json,
            input: Inbound::Request(urgent),
        },
        now,
    );
    std::iter::from_fn(|| sched.poll_action())
        .filter_map(|action| match action {
            Action::Control { control, .. } if control.action == ControlAction::Pause => {
                Some(control.request_id.to_string())
            }
            _ => None,
        })
        .collect()
}

/// A request's `pause_ms` hint is kept with its row: a coordinator that takes over from what
/// Postgres holds breaks ties between victims as the one before it did. A row written before the
/// column existed (by a coordinator of the version before) reads back without a hint.
#[tokio::test]
async fn pg_a_takeover_keeps_each_requests_pause_hint() {
    let (name, url) = fresh_database();
    let first = PgJournal::connect(&url)
        .await
        .expect("connect creates the database");
    <migration::Migrator as migration::MigratorTrait>::up(&first.connection(), Some(6))
        .await
        .expect("the migrations before the hint's column");
    first
        .connection()
        .execute_unprepared(&format!(
            "INSERT INTO requests (request_id, service_id, priority, seq, encoding, vram_mb, \
             preemptible, lease_ms, requested_at, timeout_at, phase, gpu, held_mb, fence, \
             granted_at, expires_at) VALUES ('legacy', 'svc-legacy', 2, 1, 'json', 300, true, \
             30000, {BASE}, {}, 'active', 'g0', 300, 101, {BASE}, {})",
            BASE + 60_000,
            BASE + 3_600_000
        ))
        .await
        .expect("a row of the schema before");
    first.migrate().await.expect("the rest of the migrations");
    // Granted at the same instant as `legacy`, and after it: without the hint, the latest arrival
    // (`slow`) would be paused.
    let hinted = [holder("fast", 2, Some(200)), holder("slow", 3, Some(5_000))];
    first.apply(&hinted, Some(Fence(103))).await.expect("write");
    first.close().await;

    let second = PgJournal::connect(&url).await.expect("the next leader");
    second.migrate().await.expect("nothing left to migrate");
    let (loaded, _) = second.load(10).await.expect("load");
    let hints: Vec<(&str, Option<u64>)> = loaded
        .iter()
        .map(|r| (r.request_id.as_str(), r.pause_ms))
        .collect();
    assert_eq!(
        hints,
        [("legacy", None), ("fast", Some(200)), ("slow", Some(5_000))]
    );
    assert_eq!(&loaded[1..], &hinted);
    assert_eq!(paused_after_restore(loaded), ["fast"]);
    finish(second, &name).await;
}

// ----- the write-behind journal -------------------------------------------------------------------

/// A journal stream of its own on the NATS on loopback.
struct JournalStream {
    name: String,
    subject: String,
    js: async_nats::jetstream::Context,
    client: async_nats::Client,
}

impl JournalStream {
    async fn new() -> JournalStream {
        let tag = crate::support::unique("wb");
        let client = async_nats::connect(crate::support::NATS_URL.as_str())
            .await
            .expect("the NATS on loopback");
        JournalStream {
            name: format!("IT_{}_JOURNAL", tag.to_uppercase().replace('-', "_")),
            subject: format!("it-{tag}.journal"),
            js: async_nats::jetstream::new(client.clone()),
            client,
        }
    }

    /// A write-behind journal on `store` and this stream: with its writer task when `writing`, else
    /// what a coordinator that dies before it writes Postgres leaves.
    async fn journal(
        &self,
        store: &PgJournal,
        writing: bool,
    ) -> gpu_coordinator::adapters::write_behind::WriteBehind {
        use gpu_coordinator::adapters::write_behind::WriteBehind;
        let (store, client) = (store.clone(), self.client.clone());
        let (name, subject) = (self.name.clone(), self.subject.clone());
        if writing {
            WriteBehind::new(store, client, name, subject).await
        } else {
            WriteBehind::without_writer(store, client, name, subject).await
        }
        .expect("the journal stream")
    }

    async fn delete(self) {
        self.js
            .delete_stream(&self.name)
            .await
            .expect("deleting the journal stream");
    }
}

/// Write-behind: a batch is acknowledged once the journal stream stored it. A coordinator that dies
/// before Postgres has its batches loses none of them: the next leader writes them to Postgres before
/// it loads, and from then on the dead one's writes are refused (deposed), while the new one's reach
/// Postgres behind it.
#[tokio::test]
async fn pg_behind_batches_stored_before_a_crash_reach_postgres_at_the_takeover() {
    use gpu_coordinator::adapters::postgres::Batch;
    use gpu_coordinator::ports::{deposed_in, Journal, Term};
    let (store, name) = fresh_store().await;
    let stream = JournalStream::new().await;
    // The first leader dies before it writes Postgres: it has no writer task.
    let first = stream.journal(&store, false).await;
    first.take_over(Term(1)).await.expect("takes over");
    let queued = [record("a", 7, Phase::Queued), bare("b", 9)];
    first
        .write(&Batch {
            records: &queued,
            max_fence: Some(Fence(30)),
            input_seq: Some(5),
            input_reset: false,
            outbox: &[outbox_row(1), outbox_row(2)],
            published_upto: None,
            term: Some(Term(1)),
        })
        .await
        .expect("stored in the journal stream");
    let granted = [record("a", 7, Phase::Active)];
    first
        .write(&Batch {
            records: &granted,
            max_fence: Some(Fence(31)),
            input_seq: Some(6),
            input_reset: false,
            outbox: &[outbox_row(3)],
            published_upto: Some(2),
            term: Some(Term(1)),
        })
        .await
        .expect("stored in the journal stream");
    let before = store.load_state(10).await.expect("load");
    assert!(
        before.records.is_empty() && before.input_seq == 0,
        "Postgres is written behind, not before the acknowledgement"
    );

    let second = stream.journal(&store, true).await;
    second.take_over(Term(2)).await.expect("takes over");
    let loaded = second.load(10).await.expect("load");
    assert_eq!(
        loaded.records,
        [record("a", 7, Phase::Active), bare("b", 9)]
    );
    assert_eq!(loaded.input_seq, 6);
    assert!(loaded.max_fence >= Fence(31), "{:?}", loaded.max_fence);
    assert_eq!(
        loaded.outbox,
        [outbox_row(3)],
        "rows 1 and 2 were published"
    );

    let refused = first
        .write(&Batch {
            input_seq: Some(7),
            term: Some(Term(1)),
            ..Batch::default()
        })
        .await
        .expect_err("the first leader is deposed");
    assert!(deposed_in(&refused).is_some(), "{refused}");

    let ended = ended_at("b", 9, BASE + 50);
    second
        .write(&Batch {
            records: std::slice::from_ref(&ended),
            input_seq: Some(8),
            term: Some(Term(2)),
            ..Batch::default()
        })
        .await
        .expect("the leader writes");
    second.caught_up().await;
    let after = store.load_state(10).await.expect("load");
    assert_eq!(after.input_seq, 8);
    assert_eq!(after.records, [record("a", 7, Phase::Active), ended]);
    second.close().await;
    stream.delete().await;
    drop_database(&name).await;
}

/// A batch too big for one NATS message goes in parts, read back whole; a batch whose last part never
/// came (its writer died in between, so it was never acknowledged) is skipped.
#[tokio::test]
async fn pg_behind_a_batch_bigger_than_a_message_goes_in_parts_and_a_torn_one_is_skipped() {
    use gpu_coordinator::adapters::postgres::{Batch, Rows};
    use gpu_coordinator::ports::{Journal, Term};
    let (store, name) = fresh_store().await;
    let stream = JournalStream::new().await;
    let first = stream.journal(&store, false).await;
    first.take_over(Term(1)).await.expect("takes over");
    let records: Vec<RequestRecord> = (1..=8_000)
        .map(|i| record(&format!("r{i}"), i, Phase::Queued))
        .collect();
    first
        .write(&Batch {
            records: &records,
            input_seq: Some(1),
            term: Some(Term(1)),
            ..Batch::default()
        })
        .await
        .expect("stored in parts");
    let info = stream
        .js
        .get_stream(&stream.name)
        .await
        .expect("the stream")
        .info()
        .await
        .expect("its state")
        .state
        .clone();
    assert!(
        info.messages > 2,
        "a marker and the batch in {} parts",
        info.messages - 1
    );
    // The first part of a batch whose writer died before the next.
    #[derive(serde::Serialize)]
    struct Part {
        batch: String,
        last: bool,
        rows: Rows,
    }
    let torn = store
        .rows(&Batch {
            records: &[bare("torn", 9_000)],
            input_seq: Some(2),
            ..Batch::default()
        })
        .expect("rows");
    let part = Part {
        batch: "dead-1".into(),
        last: false,
        rows: torn,
    };
    stream
        .js
        .publish(
            stream.subject.clone(),
            rmp_serde::to_vec_named(&part).unwrap().into(),
        )
        .await
        .expect("publish")
        .await
        .expect("stored");

    let second = stream.journal(&store, true).await;
    second.take_over(Term(2)).await.expect("takes over");
    let loaded = second.load(0).await.expect("load");
    assert_eq!(loaded.records.len(), 8_000);
    assert_eq!(loaded.records, records);
    assert_eq!(loaded.input_seq, 1, "the torn batch is not applied");
    second.close().await;
    stream.delete().await;
    drop_database(&name).await;
}

/// The leader row's writes (`INSERT/UPDATE ... RETURNING term`, autocommit) report a commit that
/// Postgres refused after the statement produced its row as an error, never as the term: the row is
/// read to the end of the exchange (sqlx reads on to `ReadyForQuery`, past the implicit commit). A
/// constraint trigger deferred to the commit refuses it with `disk_full`, as a commit refused for
/// space would be, in the words of a server whose `lc_messages` is German: the refusal is known by its
/// SQLSTATE.
#[tokio::test]
async fn pg_a_leader_row_write_whose_commit_is_refused_is_not_taken_for_a_lead() {
    use gpu_coordinator::adapters::postgres::PgLeadership;
    use gpu_coordinator::ports::Leadership as _;
    use std::time::Duration;
    let (store, name) = fresh_store().await;
    let db = store.connection().clone();
    db.execute_unprepared(
        "CREATE FUNCTION refuse_commit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
             RAISE EXCEPTION 'konnte Datei nicht erweitern: Auf dem Gerät ist kein \
                 Speicherplatz mehr verfügbar' \
                 USING ERRCODE = 'disk_full'; \
         END $$; \
         CREATE CONSTRAINT TRIGGER refuse_commit AFTER INSERT OR UPDATE ON leader \
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_commit();",
    )
    .await
    .expect("the trigger");
    let leadership = PgLeadership::new(
        db.clone(),
        Duration::from_secs(5),
        Duration::from_millis(50),
    );
    let refused = tokio::time::timeout(Duration::from_secs(20), leadership.acquire())
        .await
        .expect("acquire answers");
    let error = refused.expect_err("a lead whose commit was refused is not taken");
    assert!(
        gpu_coordinator::storage::is_full(&error),
        "the refusal is recognised as a full disk: {error}"
    );
    let rows = db
        .query_all(Statement::from_string(
            DbBackend::Postgres,
            "SELECT term FROM leader",
        ))
        .await
        .expect("read");
    assert!(rows.is_empty(), "nothing was committed");
    // Once commits go through, the same call leads.
    db.execute_unprepared("DROP TRIGGER refuse_commit ON leader")
        .await
        .expect("drop the trigger");
    let term = tokio::time::timeout(Duration::from_secs(20), leadership.acquire())
        .await
        .expect("acquire answers")
        .expect("it leads");
    assert_eq!(term.0, 1);
    leadership.release(term).await;
    drop(leadership);
    finish(store, &name).await;
}
