//! The embedded mode's journal (`SqliteJournal`) keeps the contract of the Postgres one: every field and
//! phase round-trips, the later of two records wins, the fence only rises, the load order is the same,
//! and a batch carries the outbox and the input position. The migrations run on a fresh directory and
//! again on an existing one.

use gpu_coordinator::adapters::sqlite::SqliteJournal;
use gpu_coordinator::ports::{Batch, Journal, OutboxRow};
use gpu_coordinator_core::{End, Fence, Phase, RequestRecord};
use sea_orm::{ConnectionTrait as _, DbBackend, Statement, TransactionTrait as _};

use crate::store_pg::{bare, ended_at, holder, paused_after_restore, record, BASE};

async fn write(store: &SqliteJournal, records: &[RequestRecord], max_fence: Option<Fence>) {
    Journal::write(
        store,
        &Batch {
            records,
            max_fence,
            ..Batch::default()
        },
    )
    .await
    .expect("a batch written");
}

fn ids(records: &[RequestRecord]) -> Vec<&str> {
    records.iter().map(|r| r.request_id.as_str()).collect()
}

#[tokio::test]
async fn sqlite_keeps_the_journal_contract() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = SqliteJournal::open(dir.path())
        .await
        .expect("a fresh store");

    // Every phase and field, and a bare record.
    let records = vec![
        record("queued", 1, Phase::Queued),
        record("active", 2, Phase::Active),
        record("pausing", 3, Phase::Pausing),
        record("paused", 4, Phase::Paused),
        bare("bare", 5),
        record("ended", 6, Phase::Ended),
    ];
    write(&store, &records, Some(Fence(106))).await;
    let loaded = store.load(10).await.expect("load");
    assert_eq!(loaded.records, records);
    assert_eq!(loaded.max_fence, Fence(106));

    // The later of two records of one request wins; the fence only rises; a request's own fence counts.
    let paused = record("queued", 1, Phase::Paused);
    write(
        &store,
        &[record("queued", 1, Phase::Active), paused.clone()],
        Some(Fence(5)),
    )
    .await;
    let loaded = store.load(10).await.expect("load");
    assert_eq!(loaded.records[0], paused);
    assert_eq!(loaded.max_fence, Fence(106), "never lowered");
    let high = RequestRecord {
        fence: Some(Fence(200)),
        ..record("active", 2, Phase::Active)
    };
    write(&store, &[high], None).await;
    assert_eq!(store.load(0).await.expect("load").max_fence, Fence(200));

    // Open requests in arrival order, then the most recently ended, oldest first.
    let ended = [
        ended_at("e1", 11, BASE + 500),
        ended_at("e2", 12, BASE + 100),
        ended_at("e3", 13, BASE + 900),
    ];
    write(&store, &ended, None).await;
    let loaded = store.load(2).await.expect("load");
    assert_eq!(
        ids(&loaded.records),
        ["queued", "active", "pausing", "paused", "bare", "e1", "e3"]
    );

    // A batch larger than one statement.
    let many: Vec<_> = (100..1_300)
        .map(|seq| record(&format!("bulk-{seq}"), seq, Phase::Queued))
        .collect();
    write(&store, &many, None).await;
    assert_eq!(
        store.load(0).await.expect("load").records.len(),
        5 + many.len()
    );

    // The outbox and the input position, in the same batches.
    let row = |id: u64| OutboxRow {
        id,
        msg_id: format!("m-{id}"),
        subject: format!("gpu.reply.s{id}"),
        msgpack: id.is_multiple_of(2),
        payload: vec![0, 1, id as u8, 0xff],
    };
    let outbox = [row(1), row(2), row(3)];
    Journal::write(
        &store,
        &Batch {
            input_seq: Some(40),
            outbox: &outbox,
            ..Batch::default()
        },
    )
    .await
    .expect("write");
    let mut gone = bare("bare", 5);
    gone.phase = Phase::Ended;
    gone.end = Some(End::Released);
    gone.ended_at = Some(1);
    Journal::write(
        &store,
        &Batch {
            records: std::slice::from_ref(&gone),
            input_seq: Some(41),
            outbox: &[row(4)],
            published_upto: Some(2),
            ..Batch::default()
        },
    )
    .await
    .expect("write");
    let loaded = store.load(0).await.expect("load");
    assert_eq!(loaded.input_seq, 41);
    // The position only rises, but for a reset (an input stream made anew).
    for (seq, reset, stored) in [(12, false, 41), (12, true, 12), (41, false, 41)] {
        Journal::write(
            &store,
            &Batch {
                input_seq: Some(seq),
                input_reset: reset,
                ..Batch::default()
            },
        )
        .await
        .expect("write");
        assert_eq!(store.load(0).await.expect("load").input_seq, stored);
    }
    assert_eq!(loaded.outbox, [row(3), row(4)]);
    assert_eq!(loaded.max_arrival, 1_299);
    assert!(!ids(&loaded.records).contains(&"bare"));

    // Opened again (the migrations run again on an up-to-date schema): the same state.
    Journal::close(&store).await;
    let again = SqliteJournal::open(dir.path()).await.expect("opened again");
    let reloaded = again.load(0).await.expect("load");
    assert_eq!(
        (reloaded.records, reloaded.input_seq, reloaded.outbox),
        (loaded.records, loaded.input_seq, loaded.outbox)
    );
}

/// The embedded journal keeps each request's `pause_ms` hint: a coordinator that opens the data
/// directory after another breaks ties between victims as that one did.
#[tokio::test]
async fn sqlite_a_restart_keeps_each_requests_pause_hint() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = SqliteJournal::open(dir.path())
        .await
        .expect("a fresh store");
    let hinted = [
        holder("unknown", 1, None),
        holder("fast", 2, Some(200)),
        holder("slow", 3, Some(5_000)),
    ];
    write(&store, &hinted, Some(Fence(103))).await;
    Journal::close(&store).await;

    let again = SqliteJournal::open(dir.path()).await.expect("opened again");
    let loaded = again.load(10).await.expect("load").records;
    assert_eq!(loaded, hinted);
    assert_eq!(paused_after_restore(loaded), ["fast"]);
}

/// A transaction that SQLite ends by itself, as it does on a full disk (SQLITE_FULL rolls the whole
/// transaction back; the COMMIT, and sqlx's ROLLBACK after it, then fail), leaves no connection of
/// the pool inside a transaction. Before, each such connection went back to the pool counted one
/// transaction deep by sqlx: its next transaction was a SAVEPOINT, whose rollback left SQLite's
/// write lock held, so that every other writer got "database is locked" for good and this
/// connection's own writes never reached the disk.
#[tokio::test]
async fn sqlite_a_transaction_that_sqlite_ended_itself_leaves_no_connection_inside_one() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = SqliteJournal::open(dir.path())
        .await
        .expect("a fresh store");
    let db = store.connection();
    db.execute_unprepared("CREATE TABLE probe (id INTEGER PRIMARY KEY)")
        .await
        .expect("a table of the test's own");

    // On every connection of the pool at once (four), a transaction that SQLite ends behind sqlx's
    // back, then a COMMIT that fails for it.
    let ended = futures::future::join_all((0..4).map(|_| async {
        let txn = db.begin().await.expect("a transaction");
        txn.execute_unprepared("INSERT INTO probe DEFAULT VALUES")
            .await
            .expect("a write");
        txn.execute_unprepared("ROLLBACK")
            .await
            .expect("SQLite ends the transaction");
        txn
    }))
    .await;
    for txn in ended {
        assert!(txn.commit().await.is_err(), "no transaction left to commit");
    }

    // A transaction that fails and is rolled back, then the journal's own write: neither is kept
    // from the disk, and no writer waits on a lock left behind.
    let txn = db.begin().await.expect("a transaction");
    txn.execute_unprepared("INSERT INTO probe (id) VALUES (7)")
        .await
        .expect("a write");
    assert!(
        txn.execute_unprepared("INSERT INTO probe (id) VALUES (7)")
            .await
            .is_err(),
        "the same key twice"
    );
    txn.rollback().await.expect("rolled back");
    let after = [record("after", 1, Phase::Queued)];
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        write(&store, &after, Some(Fence(1))),
    )
    .await
    .expect("the write is not kept waiting by a lock left behind");

    // What another process reading the directory sees: the journal's write, and no probe row.
    let other = SqliteJournal::open(dir.path())
        .await
        .expect("opened beside it");
    assert_eq!(other.load(10).await.expect("load").records, after);
    let probes = other
        .connection()
        .query_one(Statement::from_string(
            DbBackend::Sqlite,
            "SELECT count(*) AS n FROM probe",
        ))
        .await
        .expect("read")
        .expect("a row")
        .try_get::<i64>("", "n")
        .expect("a count");
    assert_eq!(probes, 0, "nothing rolled back was kept");
}
