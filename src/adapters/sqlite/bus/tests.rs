use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use gpu_coordinator_wire::{Encoding, Subjects};
use sea_orm::ConnectionTrait as _;

use super::SqliteBus;
use crate::adapters::sqlite::SqliteJournal;
use crate::ports::{Gateway, Outbound, OutputLog, ReadFrom, Which};

fn out(msg_id: &str) -> Outbound {
    Outbound {
        subject: "gpu.reply.chat".into(),
        encoding: Encoding::Json,
        payload: Bytes::from_static(b"{}"),
        msg_id: msg_id.into(),
    }
}

/// A store and its bus in a new temporary directory (removed when the first is dropped).
async fn open_bus() -> (tempfile::TempDir, SqliteJournal, SqliteBus) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = SqliteJournal::open(dir.path()).await.expect("a store");
    let subjects = Subjects::new("gpu").expect("a prefix");
    let bus = SqliteBus::open(&store, &subjects, 60_000, 1 << 30)
        .await
        .expect("a bus");
    (dir, store, bus)
}

/// A reader whose reads fail (its table gone) waits before it answers each error, longer each
/// time, rather than being asked again at once in a spin; once the table is back it goes on.
#[tokio::test]
async fn a_failing_reader_waits_between_errors_and_goes_on_after() {
    let (_dir, store, bus) = open_bus().await;
    bus.publish_in_order(&[out("a")], true)
        .await
        .expect("stored");
    let mut reader = bus
        .follow_outputs(vec!["gpu.>".into()], ReadFrom::Start)
        .await
        .expect("a reader");
    let rename = |from: &str, to: &str| format!("ALTER TABLE {from} RENAME TO {to}");
    store
        .connection()
        .execute_unprepared(&rename("bus_outputs", "bus_outputs_away"))
        .await
        .expect("the table taken away");
    for least in [Duration::from_millis(50), Duration::from_millis(100)] {
        let began = std::time::Instant::now();
        let next = reader.next().await.expect("the reader goes on");
        assert!(next.is_err(), "the table is away: {next:?}");
        assert!(
            began.elapsed() >= least,
            "an error answered after {:?}, before the backoff's {least:?}",
            began.elapsed()
        );
    }
    store
        .connection()
        .execute_unprepared(&rename("bus_outputs_away", "bus_outputs"))
        .await
        .expect("the table back");
    let stored = reader
        .next()
        .await
        .expect("the reader goes on")
        .expect("read again");
    assert_eq!((stored.seq, stored.subject.as_str()), (1, "gpu.reply.chat"));
}

#[tokio::test]
async fn outputs_are_stored_once_per_msg_id_and_known_after() {
    let (_dir, _store, bus) = open_bus().await;
    bus.publish_in_order(&[out("a"), out("b")], true)
        .await
        .expect("stored");
    bus.publish_in_order(&[out("a")], true)
        .await
        .expect("stored again");
    let ids: Vec<String> = ["a", "b", "c"].map(String::from).into();
    assert_eq!(
        bus.already_stored(&ids).await.expect("read"),
        HashSet::from(["a".to_owned(), "b".to_owned()])
    );
    let kept: Vec<_> = bus
        .history(Which::Outputs, "gpu.>", ReadFrom::Start)
        .await
        .expect("read")
        .collect()
        .await;
    assert_eq!(kept.len(), 2, "a published twice is stored once");
}
