//! Disks do not fill: every store is bounded in bytes by default, the journal forgets ended requests
//! beyond `queue.retain_ended`, and an HTTP body's unknown fields are not stored.

use std::path::Path;

use async_nats::jetstream;
use gpu_coordinator::config::{Config, DEFAULT_STREAM_BYTES};
use reqwest::StatusCode;
use sea_orm::{ConnectionTrait as _, Database, DatabaseConnection, Statement};
use serde_json::{json, Value};

use crate::http::{client, post};
use crate::support::{embedded_config, eventually, test_config, Coordinator, NATS_URL};

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
    let js = jetstream::new(async_nats::connect(NATS_URL).await.expect("NATS"));
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
