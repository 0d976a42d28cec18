//! While the journal refuses its writes for lack of space, the driver retries them and answers no
//! status; the HTTP API says why (507, naming the full store) rather than timing out, and
//! `/metrics` counts it, both read from the stores rather than from the driver.
//!
//! The full disk is Postgres's own refusal, `disk_full` (SQLSTATE 53100) with the text a full data
//! directory gives, raised by a trigger on the journal's `requests` table: the shared server is
//! never filled, and the refusal comes and goes when the test says.

use reqwest::StatusCode;
use sea_orm::{ConnectionTrait as _, Database};
use serde_json::json;

use crate::http::{client, get, post, text_of};
use crate::support::{eventually, test_config, Coordinator};

const REFUSE: &str = r#"
CREATE FUNCTION refuse_for_space() RETURNS trigger AS $$
BEGIN
  RAISE EXCEPTION 'could not extend file "base/16384/16385": No space left on device'
    USING ERRCODE = 'disk_full', HINT = 'Check free disk space.';
END $$ LANGUAGE plpgsql;
CREATE TRIGGER refuse_for_space BEFORE INSERT OR UPDATE ON requests
  FOR EACH ROW EXECUTE FUNCTION refuse_for_space();
"#;

#[tokio::test]
async fn a_status_asked_while_the_journal_is_full_names_the_full_store() {
    let mut config = test_config("full_status", &[("0", 24_000)]);
    // A request stored while the journal refuses is answered 202 soon.
    config.http.max_wait_ms = 500;
    let coordinator = Coordinator::start(config.clone()).await;
    let c = client();
    let request =
        |id: &str| json!({"service_id": "asr", "request_id": id, "priority": 1, "vram_mb": 10});
    let (status, body) = post(
        &c,
        &coordinator.url("/gpu/request"),
        None,
        request("before"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let db = Database::connect(&config.database.url)
        .await
        .expect("the journal's database");
    db.execute_unprepared(REFUSE)
        .await
        .expect("the trigger is made");

    // Stored on the bus, acknowledged; its grant cannot be written, so the driver retries.
    let (status, body) = post(
        &c,
        &coordinator.url("/gpu/request"),
        None,
        request("during"),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let (status, body) = get(&c, &coordinator.url("/gpu/status"), None).await;
    assert_eq!(
        status,
        StatusCode::INSUFFICIENT_STORAGE,
        "the status says why it cannot answer: {body}"
    );
    let error = body["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("is full") && error.contains("No space left on device"),
        "the status names the full store and its reason: {body}"
    );
    let metrics = text_of(&c, &coordinator.url("/metrics")).await;
    assert!(
        metrics.contains("gpu_coordinator_storage_full 1"),
        "/metrics counts the full store: {metrics}"
    );

    // Space is back: the stored request is granted from the bus, and the status answers again.
    db.execute_unprepared("DROP TRIGGER refuse_for_space ON requests")
        .await
        .expect("the trigger goes");
    eventually(
        "the status answers, with the stored request holding",
        || async {
            let (status, doc) = get(&c, &coordinator.url("/gpu/status"), None).await;
            let holders = doc["gpus"][0]["holders"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let ids: Vec<&str> = holders
                .iter()
                .filter_map(|h| h["request_id"].as_str())
                .collect();
            (status == StatusCode::OK && ids.contains(&"during") && doc["storage_full"].is_null())
                .then_some(())
        },
    )
    .await;
    let metrics = text_of(&c, &coordinator.url("/metrics")).await;
    assert!(
        metrics.contains("gpu_coordinator_storage_full 0"),
        "/metrics shows the store writable again: {metrics}"
    );
    coordinator.stop().await.expect("a clean stop");
}
