//! Disks do not fill: every store is bounded in bytes by default, the journal forgets ended requests
//! beyond `queue.retain_ended`, and an HTTP body's unknown fields are not stored. And when a disk fills
//! anyway (a tmpfs of a few MiB, mounted by the test: it needs root), the embedded store refuses
//! inputs, acknowledges none it did not keep, and goes on by itself once space is freed.

use std::path::Path;

use async_nats::jetstream;
use gpu_coordinator::adapters::sqlite::{SqliteBus, SqliteJournal};
use gpu_coordinator::config::{Config, DEFAULT_STREAM_BYTES};
use gpu_coordinator::ports::{Gateway, Journal};
use gpu_coordinator::storage::is_full;
use reqwest::StatusCode;
use sea_orm::{ConnectionTrait as _, Database, DatabaseConnection, DbBackend, Statement};
use serde_json::{json, Value};

use crate::http::{client, get, post};
use crate::support::{embedded_config, eventually, test_config, Coordinator, SmallDisk, NATS_URL};

/// The SQLite database of an embedded coordinator, read beside it.
async fn database(config: &Config) -> DatabaseConnection {
    let file = Path::new(&config.embedded.data_dir).join("coordinator.db");
    Database::connect(format!("sqlite://{}?mode=ro", file.display()))
        .await
        .expect("the database opens")
}

async fn count(db: &DatabaseConnection, sql: &str) -> i64 {
    db.query_one(Statement::from_string(db.get_database_backend(), sql))
        .await
        .expect("the query runs")
        .expect("a row")
        .try_get_by_index::<i64>(0)
        .expect("a count")
}

/// The default configuration bounds both streams by bytes (JetStream sets that aside up front) and the
/// embedded bus too.
#[tokio::test]
async fn every_store_is_bounded_by_bytes_by_default() {
    let defaults = Config::default();
    assert_eq!(defaults.nats.max_bytes, DEFAULT_STREAM_BYTES);
    assert_eq!(defaults.embedded.max_bytes, DEFAULT_STREAM_BYTES as u64);
    assert!(defaults.nats.max_bytes > 0);

    let mut config = test_config("disk_default", &[("0", 1_000)]);
    config.nats.max_bytes = defaults.nats.max_bytes;
    let coordinator = Coordinator::start(config.clone()).await;
    let js = jetstream::new(async_nats::connect(NATS_URL.as_str()).await.expect("NATS"));
    let subjects = gpu_coordinator_wire::Subjects::new(&config.nats.prefix).expect("a prefix");
    let names = [subjects.input_stream(), subjects.output_stream()];
    for name in &names {
        let mut stream = js.get_stream(&name).await.expect("the stream exists");
        let info = stream.info().await.expect("its info");
        assert_eq!(
            info.config.max_bytes, DEFAULT_STREAM_BYTES,
            "{name} is bounded by bytes"
        );
    }
    coordinator.stop().await.expect("stops cleanly");
    for name in &names {
        // What it set aside goes back to the shared server's store.
        let _ = js.delete_stream(&name).await;
    }
}

/// Ended requests beyond `queue.retain_ended` leave the journal, in the background; those within it
/// still answer a repeated id.
#[tokio::test]
async fn ended_requests_beyond_retain_ended_are_deleted() {
    let mut config = embedded_config("disk_retain", &[("0", 1_000)]);
    config.queue.retain_ended = 5;
    let coordinator = Coordinator::start(config.clone()).await;
    let c = client();
    for i in 0..30 {
        let (status, body) = post(
            &c,
            &coordinator.url("/gpu/request"),
            None,
            json!({"service_id": "a", "request_id": format!("a-{i}"), "priority": 1}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let (status, body) = post(
            &c,
            &coordinator.url("/gpu/release"),
            None,
            json!({"service_id": "a", "request_id": format!("a-{i}"), "fence": body["fence"]}),
        )
        .await;
        assert!(status.is_success(), "{body}");
    }
    let db = database(&config).await;
    eventually(
        "the ended requests beyond retain_ended are deleted",
        || async {
            // The five most recently ended, and the one that arrived last (the same here).
            (count(&db, "SELECT count(*) FROM requests").await <= 5).then_some(())
        },
    )
    .await;
    let kept: Vec<String> = db
        .query_all(Statement::from_string(
            db.get_database_backend(),
            "SELECT request_id FROM requests ORDER BY seq",
        ))
        .await
        .expect("read")
        .iter()
        .map(|r| r.try_get_by_index::<String>(0).expect("an id"))
        .collect();
    for i in 25..30 {
        assert!(
            kept.iter().any(|id| id.ends_with(&format!("a-{i}"))),
            "the most recently ended are kept: {kept:?}"
        );
    }
    // A repeated id within the window is answered with what became of it, not made anew.
    let (status, body) = post(
        &c,
        &coordinator.url("/gpu/request"),
        None,
        json!({"service_id": "a", "request_id": "a-29", "priority": 1}),
    )
    .await;
    assert_eq!(
        (status, body["outcome"].as_str()),
        (StatusCode::CONFLICT, Some("released")),
        "{body}"
    );
    db.close().await.ok();
    coordinator.stop().await.expect("stops cleanly");
    let _ = std::fs::remove_dir_all(&config.embedded.data_dir);
}

/// Fields of an HTTP body that the coordinator does not know are dropped before the input is stored.
#[tokio::test]
async fn unknown_http_fields_are_not_stored() {
    let config = embedded_config("disk_fields", &[("0", 1_000)]);
    let coordinator = Coordinator::start(config.clone()).await;
    let (status, body) = post(
        &client(),
        &coordinator.url("/gpu/request"),
        None,
        json!({"service_id": "a", "request_id": "a-1", "priority": 1,
               "junk": "x".repeat(10_000), "more": {"nested": [1, 2, 3]}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let db = database(&config).await;
    let row = db
        .query_one(Statement::from_string(
            db.get_database_backend(),
            "SELECT payload FROM bus_inputs ORDER BY seq DESC LIMIT 1",
        ))
        .await
        .expect("read")
        .expect("the input is stored");
    let stored: Value =
        serde_json::from_slice(&row.try_get_by_index::<Vec<u8>>(0).expect("a payload"))
            .expect("JSON");
    assert_eq!(
        stored,
        json!({"service_id": "a", "request_id": "a-1", "priority": 1}),
        "only the known fields are stored"
    );
    db.close().await.ok();
    coordinator.stop().await.expect("stops cleanly");
    let _ = std::fs::remove_dir_all(&config.embedded.data_dir);
}

/// An input that the full disk refused is never acknowledged: each `submit` that returned Ok is in
/// the database, as another reader sees it once space is back, and each one refused says the store
/// is full. (The INSERT commits when its statement ends; read only to its first row, a commit refused
/// for space was not reported.)
#[tokio::test]
async fn an_input_a_full_disk_refused_is_never_acknowledged() {
    let disk = SmallDisk::mount("disk_ack", "6m");
    let data = disk.dir.join("data");
    let store = SqliteJournal::open(&data).await.expect("a store");
    let subjects = gpu_coordinator_wire::Subjects::new("tack").expect("a prefix");
    let bus = SqliteBus::open(&store, &subjects, 60_000, 1 << 30)
        .await
        .expect("the embedded bus");
    let filler = disk.fill(0);
    let mut acknowledged = Vec::new();
    let mut refused = 0;
    for i in 0..50 {
        let payload = json!({"service_id": "a", "request_id": format!("a-{i}"), "priority": 1});
        match Gateway::submit(&bus, "tack.request.a", payload.to_string().into_bytes()).await {
            Ok(()) => acknowledged.push(format!("a-{i}")),
            Err(e) => {
                assert!(is_full(&e), "refused for lack of space: {e}");
                refused += 1;
            }
        }
    }
    std::fs::remove_file(&filler).expect("the filler goes");

    let other = SqliteJournal::open(&data).await.expect("opened beside it");
    let stored: Vec<String> = other
        .connection()
        .query_all(Statement::from_string(
            DbBackend::Sqlite,
            "SELECT payload FROM bus_inputs ORDER BY seq",
        ))
        .await
        .expect("read")
        .iter()
        .map(|r| {
            let payload: Value =
                serde_json::from_slice(&r.try_get_by_index::<Vec<u8>>(0).expect("a payload"))
                    .expect("JSON");
            payload["request_id"].as_str().expect("an id").to_owned()
        })
        .collect();
    assert_eq!(stored, acknowledged, "stored exactly what was acknowledged");
    assert!(refused > 0, "the full disk refused inputs");
    Journal::close(&other).await;
    Journal::close(&store).await;
    drop(disk);
}

/// The holders of `service` in a status document: request id and fence.
pub(crate) fn holders_of(doc: &Value, service: &str) -> Vec<(String, u64)> {
    let mut holders: Vec<(String, u64)> = doc["gpus"][0]["holders"]
        .as_array()
        .expect("holders")
        .iter()
        .filter(|h| h["service_id"] == service)
        .map(|h| {
            (
                h["request_id"].as_str().expect("an id").to_owned(),
                h["fence"].as_u64().expect("a fence"),
            )
        })
        .collect();
    holders.sort();
    holders
}

/// A request of `service`, granted at once on an idle GPU while the journal writes.
pub(crate) fn request(service: &str, id: &str) -> Value {
    json!({"service_id": service, "request_id": id, "priority": 1, "vram_mb": 10})
}

/// What became of the requests sent while a disk filled.
#[derive(Default)]
pub(crate) struct Sent {
    /// Answered 200: granted, under this fence.
    pub(crate) granted: Vec<(String, u64)>,
    /// Answered 202: stored, not yet granted.
    pub(crate) stored: Vec<String>,
    /// Answered 507: refused, not stored.
    pub(crate) refused: Vec<(String, Value)>,
}

impl Sent {
    /// Sends `fill-<i>` requests of service `fill` until `done` holds for what was sent and what
    /// `/readyz` answers after
    /// a request that was not granted at once (or after every tenth); fails after `most` requests not
    /// granted at once.
    pub(crate) async fn until(
        base: &str,
        most: usize,
        done: impl Fn(&Sent, &Value) -> bool,
    ) -> Sent {
        let c = client();
        let mut sent = Sent::default();
        for i in 0..10_000 {
            let id = format!("fill-{i}");
            let (status, body) = post(
                &c,
                &format!("{base}/gpu/request"),
                None,
                request("fill", &id),
            )
            .await;
            match status {
                StatusCode::OK => {
                    sent.granted
                        .push((id, body["fence"].as_u64().expect("a fence")));
                    // A store written behind fills while requests are still granted.
                    if i % 10 != 9 {
                        continue;
                    }
                }
                StatusCode::ACCEPTED => sent.stored.push(id),
                StatusCode::INSUFFICIENT_STORAGE => sent.refused.push((id, body)),
                other => panic!("{id}: {other} {body}"),
            }
            let (_, ready) = get(&c, &format!("{base}/readyz"), None).await;
            if done(&sent, &ready) {
                return sent;
            }
            assert!(
                sent.stored.len() + sent.refused.len() < most,
                "{most} requests not granted, and /readyz still says {ready}"
            );
        }
        panic!("the disk never filled");
    }
}

/// Whether `/readyz` answered that `store` is full.
pub(crate) fn says_full(ready: &Value, store: &str) -> bool {
    ready["status"] == "not ready"
        && ready["error"]
            .as_str()
            .is_some_and(|e| e.contains(&format!("{store} is full")))
}

/// Waits until every request acknowledged holds under the fence it was granted (those stored but not
/// granted then are granted now, from the store), and no store is reported full.
pub(crate) async fn every_acknowledged_request_holds(
    base: &str,
    kept: &[(String, u64)],
    sent: &Sent,
) {
    let c = client();
    eventually("every acknowledged request holds", || async {
        let (status, doc) = get(&c, &format!("{base}/gpu/status"), None).await;
        if status != StatusCode::OK {
            return None;
        }
        let fill = holders_of(&doc, "fill");
        let ids: Vec<&str> = fill.iter().map(|(id, _)| id.as_str()).collect();
        let mut expected: Vec<&str> = sent
            .granted
            .iter()
            .map(|(id, _)| id.as_str())
            .chain(sent.stored.iter().map(String::as_str))
            .collect();
        expected.sort();
        (holders_of(&doc, "kept") == kept
            && ids == expected
            && sent.granted.iter().all(|g| fill.contains(g))
            && doc["storage_full"].is_null())
        .then_some(())
    })
    .await;
}

/// Three requests granted before the disk fills, to outlive it.
pub(crate) async fn kept_requests(base: &str) -> Vec<(String, u64)> {
    let c = client();
    let mut kept = Vec::new();
    for i in 0..3 {
        let id = format!("kept-{i}");
        let (status, body) = post(
            &c,
            &format!("{base}/gpu/request"),
            None,
            request("kept", &id),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        kept.push((id, body["fence"].as_u64().expect("a fence")));
    }
    kept
}

/// Once space is back: a new request is granted and `/readyz` answers 200, with no restart.
pub(crate) async fn goes_on_by_itself(base: &str) {
    let c = client();
    let after = eventually("a new request is granted once space is freed", || async {
        let (status, body) = post(
            &c,
            &format!("{base}/gpu/request"),
            None,
            request("after", "after-1"),
        )
        .await;
        (status == StatusCode::OK).then_some(body)
    })
    .await;
    assert!(after["fence"].as_u64().is_some(), "{after}");
    eventually("/readyz answers 200 once space is freed", || async {
        let (status, _) = get(&c, &format!("{base}/readyz"), None).await;
        (status == StatusCode::OK).then_some(())
    })
    .await;
}

/// The embedded store on a disk that fills: inputs are refused with 507 and `/readyz` says which
/// store is full; once space is freed the coordinator goes on by itself, with no restart, and every
/// request acknowledged before, or while the disk filled, is still there.
#[tokio::test]
async fn a_full_disk_refuses_inputs_and_recovers_by_itself_once_space_is_freed() {
    let disk = SmallDisk::mount("disk_full", "6m");
    let mut config = embedded_config("disk_full", &[("0", 100_000)]);
    config.embedded.data_dir = disk.dir.join("data").display().to_string();
    config.lease.default_ms = 600_000;
    // A request stored while the journal cannot write is answered 202 soon, not after 5 minutes.
    config.http.max_wait_ms = 1_000;
    let coordinator = Coordinator::start(config.clone()).await;
    let base = coordinator.url("");
    let c = client();

    // Held before the disk fills: acknowledged, so they must outlive it.
    let kept = kept_requests(&base).await;

    // Requests go on until the store refuses one. Each one acknowledged meanwhile must outlive the
    // full disk: granted (200, under its fence), or stored and not yet granted (202: the journal
    // could not write the grant).
    let filler = disk.fill(256 << 10);
    let sent = Sent::until(&base, 1_000, |sent, ready| {
        !sent.refused.is_empty()
            && ready["error"]
                .as_str()
                .is_some_and(|e| e.contains("is full"))
    })
    .await;
    let (_, refusal) = sent
        .refused
        .first()
        .expect("the full disk refuses an input with 507");
    eprintln!(
        "the disk filled after {} granted and {} stored, not granted: {refusal}",
        sent.granted.len(),
        sent.stored.len()
    );
    assert!(
        refusal["error"]
            .as_str()
            .is_some_and(|e| e.contains("full")),
        "the refusal says the store is full: {refusal}"
    );
    // The status says so too, when the driver can answer it: while it retries a journal write that
    // the disk refused, it answers nothing (503, "did not produce its status").
    let (status, doc) = get(&c, &coordinator.url("/gpu/status"), None).await;
    if status == StatusCode::OK {
        assert!(
            doc["storage_full"]
                .as_str()
                .is_some_and(|e| e.contains("is full")),
            "the status says so: {doc}"
        );
    }

    // Space is freed; no restart. A new request is granted and the store is ready again, and nothing
    // acknowledged was lost. The requests held before still hold, under their fences; those granted
    // while the disk filled too; and those stored but not granted then are granted now, from the
    // store, without being sent again.
    std::fs::remove_file(&filler).expect("the filler goes");
    goes_on_by_itself(&base).await;
    every_acknowledged_request_holds(&base, &kept, &sent).await;
    let (granted, stored) = (&sent.granted, &sent.stored);
    // And the journal has them all.
    let db = database(&config).await;
    let journal: Vec<String> = db
        .query_all(Statement::from_string(
            db.get_database_backend(),
            "SELECT request_id FROM requests",
        ))
        .await
        .expect("read")
        .iter()
        .map(|r| r.try_get_by_index::<String>(0).expect("an id"))
        .collect();
    let acknowledged = kept.iter().chain(granted).map(|(id, _)| id).chain(stored);
    for id in acknowledged {
        assert!(
            journal.iter().any(|j| j.ends_with(id.as_str())),
            "the acknowledged request {id} is in the journal"
        );
    }
    db.close().await.ok();
    coordinator.stop().await.expect("stops cleanly");
    drop(disk);
}
