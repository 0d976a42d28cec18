//! A full disk under the servers of the distributed mode, each a private one on a small tmpfs of the
//! test's own (mounted by the test: it needs root): Postgres, whose journal writes are refused
//! (`disk_full`, SQLSTATE 53100) and retried until space comes back, and JetStream, whose store refuses
//! inputs ("insufficient resources", 10023). In both, nothing acknowledged is lost, and the
//! coordinator goes on by itself once space is freed.

use std::path::PathBuf;

use gpu_coordinator::config::Config;
use gpu_coordinator::storage::{is_full, PG_DISK_FULL};
use sea_orm::{ConnectionTrait as _, Database, DatabaseConnection, DbErr, RuntimeErr, Statement};

use crate::disks::{
    every_acknowledged_request_holds, goes_on_by_itself, kept_requests, says_full, Sent,
};
use crate::support::{
    eventually, test_config, unique, CoordinatorProcess, NatsServer, PgServer, SmallDisk,
};

/// A coordinator as a process, its HTTP API on a port of its own and its log in a file.
struct Logged {
    _process: CoordinatorProcess,
    base: String,
    log: PathBuf,
}

impl Logged {
    async fn start(config: &mut Config, tag: &str) -> Logged {
        config.http.listen = format!("127.0.0.1:{}", gpu_coordinator_test_support::free_port());
        // Long leases: every holder must still hold at the end. A request stored while the journal
        // cannot write is answered 202 soon.
        config.lease.default_ms = 600_000;
        config.http.max_wait_ms = 1_000;
        let log = std::env::temp_dir().join(format!("{}.log", unique(tag)));
        let process = CoordinatorProcess::start_logged(config, &log).await;
        Logged {
            _process: process,
            base: format!("http://{}", config.http.listen),
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A private Postgres whose whole data directory (WAL included) is on a 64 MiB tmpfs fills while a
/// coordinator leads on it. What a real full Postgres does: the statements that must grow a file are
/// refused with `disk_full` (SQLSTATE 53100, "could not extend file ...: No space left on device"),
/// as errors of their own; the server neither stops nor crashes (its WAL segments are set aside ahead
/// of need). The coordinator takes the refusal for a full disk (`/readyz` 503 naming Postgres, an
/// error in the log), stores inputs in JetStream meanwhile (202), retries the journal with backoff,
/// and once the filler is deleted goes on by itself: every request acknowledged before or meanwhile
/// holds, under the fence it was given, and is in the journal.
#[tokio::test]
async fn a_full_postgres_holds_the_journal_back_and_recovers_by_itself() {
    full_postgres("disk_pg", false).await;
}

/// The same with Postgres written behind the JetStream journal stream (`database.write_behind`): the
/// stream holds the batches Postgres refuses, so requests are still granted for a while; `/readyz`
/// names Postgres all the same, and once space is back every batch reaches Postgres.
#[tokio::test]
async fn a_full_postgres_written_behind_is_reported_and_catches_up_by_itself() {
    full_postgres("disk_pgwb", true).await;
}

async fn full_postgres(tag: &str, write_behind: bool) {
    let disk = SmallDisk::mount(tag, "64m");
    let dir = disk.dir.clone();
    let pg = tokio::task::spawn_blocking(move || PgServer::start_in(&dir))
        .await
        .expect("a private Postgres");
    let mut config = test_config(tag, &[("0", 100_000)]);
    let database = format!("gpu_{tag}");
    config.database.url = pg.url(&database);
    config.database.write_behind = write_behind;
    let coordinator = Logged::start(&mut config, tag).await;
    let kept = kept_requests(&coordinator.base).await;

    let filler = disk.fill(0);
    let sent = Sent::until(&coordinator.base, 30, |_, ready| {
        says_full(ready, "Postgres")
    })
    .await;
    eprintln!(
        "Postgres (written behind: {write_behind}) filled after {} granted; {} stored meanwhile",
        sent.granted.len(),
        sent.stored.len()
    );
    assert!(
        sent.refused.is_empty(),
        "JetStream has room: no input is refused ({:?})",
        sent.refused
    );
    eventually("the log says Postgres is full", || async {
        let log = coordinator.log();
        (log.contains("Postgres is full") && log.contains("could not extend file")).then_some(())
    })
    .await;
    // What the server says, to another client: the SQLSTATE the coordinator knows it by.
    let db = Database::connect(pg.url(&database))
        .await
        .expect("Postgres takes connections while its disk is full");
    let refused = db
        .execute_unprepared(
            "CREATE TABLE disk_probe AS SELECT g, repeat('x', 1000) AS x \
             FROM generate_series(1, 10000) g",
        )
        .await
        .expect_err("a table that must grow is refused");
    let code = match &refused {
        DbErr::Exec(RuntimeErr::SqlxError(e)) | DbErr::Query(RuntimeErr::SqlxError(e)) => e
            .as_database_error()
            .and_then(|d| d.code())
            .map(|c| c.into_owned()),
        _ => None,
    };
    assert_eq!(code.as_deref(), Some(PG_DISK_FULL), "{refused}");
    assert!(is_full(&refused), "{refused}");
    assert!(
        !pg.log().contains("PANIC"),
        "Postgres did not crash:\n{}",
        pg.log()
    );

    std::fs::remove_file(&filler).expect("the filler goes");
    goes_on_by_itself(&coordinator.base).await;
    every_acknowledged_request_holds(&coordinator.base, &kept, &sent).await;
    every_acknowledged_request_is_in(&db, &kept, &sent).await;
    db.close().await.ok();
    drop(coordinator);
    drop(pg);
    drop(disk);
}

/// Waits until the journal in `db` has every request acknowledged.
async fn every_acknowledged_request_is_in(
    db: &DatabaseConnection,
    kept: &[(String, u64)],
    sent: &Sent,
) {
    let acknowledged: Vec<&String> = kept
        .iter()
        .chain(&sent.granted)
        .map(|(id, _)| id)
        .chain(&sent.stored)
        .collect();
    eventually("every acknowledged request is in Postgres", || async {
        let journal: Vec<String> = db
            .query_all(Statement::from_string(
                db.get_database_backend(),
                "SELECT request_id FROM requests",
            ))
            .await
            .ok()?
            .iter()
            .map(|r| r.try_get_by_index::<String>(0).expect("an id"))
            .collect();
        acknowledged
            .iter()
            .all(|id| journal.iter().any(|j| j.ends_with(id.as_str())))
            .then_some(())
    })
    .await;
}

/// Postgres's WAL (`pg_wal`) on a 16 MiB tmpfs of its own that fills. What Postgres 15 does: it
/// PANICs at the first WAL segment it cannot make ("could not write to file "pg_wal/xlogtemp...": No
/// space left on device"), its crash recovery fails the same way, and the server shuts down; it
/// stays down until it is started again. The coordinator waits for it with backoff (`/readyz` 503
/// naming Postgres; inputs still stored in JetStream, 202), and once space is freed and Postgres is
/// started again it goes on by itself: every acknowledged request holds and is in the journal.
#[tokio::test]
async fn a_postgres_whose_wal_fills_stops_and_the_coordinator_waits_for_it() {
    let wal_disk = SmallDisk::mount("disk_pgwal", "16m");
    let wal = wal_disk.dir.clone();
    let pg = tokio::task::spawn_blocking(move || {
        PgServer::start_with_wal_in(&std::env::temp_dir(), &wal)
    })
    .await
    .expect("a private Postgres");
    let mut config = test_config("disk_pgwal", &[("0", 100_000)]);
    config.database.url = pg.url("gpu_disk_pgwal");
    let coordinator = Logged::start(&mut config, "disk_pgwal").await;
    let kept = kept_requests(&coordinator.base).await;

    // The WAL's disk fills; something writes more WAL than its segments set aside hold.
    let filler = wal_disk.fill(0);
    let db = Database::connect(pg.url("gpu_disk_pgwal"))
        .await
        .expect("Postgres takes connections");
    let crashed = db
        .execute_unprepared(
            "CREATE TABLE scratch AS SELECT g, repeat('x', 1000) AS x \
             FROM generate_series(1, 20000) g",
        )
        .await;
    assert!(crashed.is_err(), "the WAL cannot grow");
    eventually("Postgres shuts down", || async {
        pg.log()
            .contains("database system is shut down")
            .then_some(())
    })
    .await;
    let log = pg.log();
    assert!(
        log.contains("PANIC") && log.contains("could not write to file"),
        "{log}"
    );
    let sent = Sent::until(&coordinator.base, 30, |_, ready| {
        ready["error"]
            .as_str()
            .is_some_and(|e| e.contains("Postgres is not reachable"))
    })
    .await;
    assert!(sent.refused.is_empty(), "{:?}", sent.refused);
    db.close().await.ok();

    // The operator frees space and starts Postgres again.
    std::fs::remove_file(&filler).expect("the filler goes");
    pg.resume();
    goes_on_by_itself(&coordinator.base).await;
    every_acknowledged_request_holds(&coordinator.base, &kept, &sent).await;
    let db = Database::connect(pg.url("gpu_disk_pgwal"))
        .await
        .expect("Postgres is back");
    every_acknowledged_request_is_in(&db, &kept, &sent).await;
    db.close().await.ok();
    drop(coordinator);
    drop(pg);
    drop(wal_disk);
}

/// A private nats-server whose store is on a 32 MiB tmpfs, a coordinator on it (its streams of 1 MiB
/// each), and three requests granted before the disk fills.
async fn on_a_small_nats(tag: &str) -> (SmallDisk, NatsServer, Logged, Vec<(String, u64)>) {
    let disk = SmallDisk::mount(tag, "32m");
    let dir = disk.dir.clone();
    let nats = tokio::task::spawn_blocking(move || NatsServer::start_in(&dir, None))
        .await
        .expect("a private nats-server");
    let mut config = test_config(tag, &[("0", 100_000)]);
    config.nats.url = nats.url();
    config.nats.max_bytes = 1 << 20;
    let coordinator = Logged::start(&mut config, tag).await;
    let kept = kept_requests(&coordinator.base).await;
    (disk, nats, coordinator, kept)
}

/// A private nats-server whose JetStream store is on a 32 MiB tmpfs (JetStream takes 75% of the disk
/// free at its start as its store's limit) fills: another stream on the server takes what is left. What
/// JetStream does: it refuses every publish to a file stream with "insufficient resources" (10023),
/// the coordinator's streams included, though their `max_bytes` was set aside. The coordinator refuses
/// inputs with 507 and says JetStream is full (`/readyz`, the log); nothing it acknowledged is lost,
/// none it refused is stored; once the other stream is deleted it goes on by itself.
///
/// (A disk filled by something else than JetStream, below the limit JetStream took, is another
/// matter: see the next test.)
#[tokio::test]
async fn a_full_jetstream_store_refuses_inputs_and_recovers_by_itself() {
    use async_nats::jetstream;
    let (disk, nats, coordinator, kept) = on_a_small_nats("disk_nats").await;

    // Another tenant's stream takes what is left of the store.
    let js = jetstream::new(async_nats::connect(nats.url()).await.expect("NATS"));
    js.create_stream(jetstream::stream::Config {
        name: "FILLER".into(),
        subjects: vec!["filler.>".into()],
        ..Default::default()
    })
    .await
    .expect("the filler stream");
    let block = bytes::Bytes::from(vec![0u8; 256 << 10]);
    let mut filled = 0u64;
    let refusal = loop {
        let ack = js
            .publish("filler.x", block.clone())
            .await
            .expect("the publish is sent");
        match ack.await {
            Ok(_) => filled += block.len() as u64,
            Err(e) => break e,
        }
        assert!(filled < 64 << 20, "the store never filled");
    };
    assert!(is_full(&refusal), "{refusal}");
    eprintln!("the filler took {filled} bytes; then: {refusal}");

    let sent = Sent::until(&coordinator.base, 5, |_, ready| {
        says_full(ready, "NATS JetStream (the input stream)")
    })
    .await;
    let (id, body) = sent.refused.first().expect("an input is refused with 507");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("full") && e.contains("insufficient resources")),
        "the refusal of {id} says JetStream is full: {body}"
    );
    eventually("the log says JetStream is full", || async {
        let log = coordinator.log();
        (log.contains("NATS JetStream (the input stream) is full")
            && log.contains("insufficient resources"))
        .then_some(())
    })
    .await;

    js.delete_stream("FILLER")
        .await
        .expect("the filler stream goes");
    goes_on_by_itself(&coordinator.base).await;
    // The refused were not stored: only the acknowledged hold.
    every_acknowledged_request_holds(&coordinator.base, &kept, &sent).await;
    drop(coordinator);
    drop(nats);
    drop(disk);
}

/// A disk filled under JetStream by something else, below the limit JetStream took: what nats-server
/// 2.9 does is stop answering its JetStream API at the first write the disk refuses (and on after the
/// space is freed), until it is restarted. The coordinator acknowledges no input it could not store
/// (the HTTP caller gets an error, not 200 or 202); once nats-server is restarted with space back, it
/// goes on by itself, and every request acknowledged before holds.
#[tokio::test]
async fn a_jetstream_whose_disk_fills_under_it_acknowledges_nothing_it_did_not_store() {
    let (disk, nats, coordinator, kept) = on_a_small_nats("disk_nats_enospc").await;

    let filler = disk.fill(0);
    let c = crate::http::client();
    let mut sent = Sent::default();
    let mut unacknowledged = None;
    for i in 0..100 {
        let id = format!("fill-{i}");
        let (status, body) = crate::http::post(
            &c,
            &format!("{}/gpu/request", coordinator.base),
            None,
            crate::disks::request("fill", &id),
        )
        .await;
        match status {
            reqwest::StatusCode::OK => sent
                .granted
                .push((id, body["fence"].as_u64().expect("a fence"))),
            reqwest::StatusCode::ACCEPTED => sent.stored.push(id),
            other => {
                unacknowledged = Some((id, other, body));
                break;
            }
        }
    }
    let (id, status, body) = unacknowledged.expect("an input is not acknowledged");
    eprintln!(
        "after {} granted and {} stored, {id} was answered {status}: {body}",
        sent.granted.len(),
        sent.stored.len()
    );
    assert!(status.is_server_error(), "{id}: {status} {body}");
    // NATS still takes connections; `/readyz` asks JetStream itself, which does not answer.
    let (status, body) = crate::http::get(&c, &format!("{}/readyz", coordinator.base), None).await;
    assert_eq!(
        status,
        reqwest::StatusCode::SERVICE_UNAVAILABLE,
        "/readyz tells that JetStream does not answer: {body}"
    );
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("JetStream")),
        "{body}"
    );

    std::fs::remove_file(&filler).expect("the filler goes");
    // Space is back, yet JetStream still does not answer: it needs a restart.
    // (Asked raw: async-nats 0.51 cannot read nats-server 2.9's account info on this store.)
    let client = async_nats::connect(nats.url()).await.expect("NATS");
    let info = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        client.request("$JS.API.INFO", "{}".into()),
    )
    .await;
    assert!(
        !matches!(info, Ok(Ok(_))),
        "JetStream answers again without a restart: docs/security.md's Disks lines need an update"
    );
    let nats = tokio::task::spawn_blocking(move || {
        let mut nats = nats;
        nats.restart();
        nats
    })
    .await
    .expect("nats-server restarts");
    goes_on_by_itself(&coordinator.base).await;
    every_acknowledged_request_holds(&coordinator.base, &kept, &sent).await;
    drop(coordinator);
    drop(nats);
    drop(disk);
}
