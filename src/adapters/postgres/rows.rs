//! A batch as the rows the Postgres journal writes, and batches merged into one.

use crate::adapters::sql::entities::request;
use crate::ports::OutboxRow;

/// A batch as the rows [`PgJournal::write_rows`](super::PgJournal::write_rows) writes: what
/// [`PgJournal::rows`](super::PgJournal::rows) makes of a [`Batch`](crate::ports::Batch), and what the
/// write-behind journal keeps in JetStream until Postgres has it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Rows {
    /// One row per request, the later of two with one `request_id` winning.
    pub requests: Vec<request::Model>,
    /// The fence to raise the stored one to (0: none).
    pub max_fence: i64,
    /// The last input handled, if the batch moves it: only raised, but for `input_reset`.
    pub input_seq: Option<i64>,
    /// `input_seq` may lower the stored position: the input stream was made anew. (Absent from the
    /// journal stream's older entries.)
    #[serde(default)]
    pub input_reset: bool,
    /// Messages to keep until the bus stored them.
    pub outbox: Vec<OutboxRow>,
    /// Outbox rows up to this id are deleted.
    pub published_upto: Option<i64>,
    /// The writer's term (`None`: unfenced).
    pub term: Option<i64>,
}

impl Rows {
    /// Whether writing it would change nothing (but check the term).
    pub fn is_empty(&self) -> bool {
        self.requests.is_empty()
            && self.max_fence == 0
            && self.input_seq.is_none()
            && self.outbox.is_empty()
            && self.published_upto.is_none()
    }

    /// `later` written after `self`, as one batch: what writing both in order leaves (see [`Merged`]).
    pub fn then(&mut self, later: Rows) {
        let mut merged = Merged::new(std::mem::take(self));
        merged.push(later);
        *self = merged.into_rows();
    }
}

/// Batches merged as they come, in the order they were written: what writing them one after the other
/// leaves, as one batch. A request's later row wins, the fence and the deletions take the highest, the
/// input position the later's, and the outbox rows that a later deletion covers are not written at all.
/// Each batch costs its own rows, however many came before it.
#[derive(Debug, Default)]
pub struct Merged {
    rows: Rows,
    /// Where each request's row is in `rows.requests`.
    at: std::collections::HashMap<String, usize>,
}

impl Merged {
    /// Starts with the first batch.
    pub fn new(first: Rows) -> Merged {
        let at = first
            .requests
            .iter()
            .enumerate()
            .map(|(i, r)| (r.request_id.clone(), i))
            .collect();
        Merged { rows: first, at }
    }

    /// Adds the batch written next.
    pub fn push(&mut self, later: Rows) {
        let rows = &mut self.rows;
        for row in later.requests {
            match self.at.get(&row.request_id) {
                Some(&i) => rows.requests[i] = row,
                None => {
                    self.at.insert(row.request_id.clone(), rows.requests.len());
                    rows.requests.push(row);
                }
            }
        }
        rows.max_fence = rows.max_fence.max(later.max_fence);
        rows.input_seq = later.input_seq.or(rows.input_seq);
        // A reset among them: the last position is numbered in the stream made anew.
        rows.input_reset |= later.input_reset;
        rows.outbox.extend(later.outbox);
        rows.published_upto = rows.published_upto.max(later.published_upto);
        rows.term = later.term.or(rows.term);
    }

    /// The batches as one.
    pub fn into_rows(self) -> Rows {
        let mut rows = self.rows;
        if let Some(upto) = rows.published_upto {
            rows.outbox
                .retain(|row| i64::try_from(row.id).map_or(true, |id| id > upto));
        }
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request row of `id` in `phase` (the fields left out are null).
    fn row(id: &str, phase: &str) -> request::Model {
        serde_json::from_value(serde_json::json!({
            "request_id": id, "service_id": "s", "priority": 1, "seq": 1, "encoding": "json",
            "preemptible": true, "lease_ms": 1, "requested_at": 1, "timeout_at": 2, "phase": phase,
        }))
        .expect("a row")
    }

    fn outbox(id: u64) -> OutboxRow {
        OutboxRow {
            id,
            msg_id: format!("m{id}"),
            subject: "gpu.reply.s".into(),
            msgpack: false,
            payload: vec![],
        }
    }

    /// Two batches merged are what writing them in order leaves.
    #[test]
    fn rows_merged_are_the_later_batch_written_over_the_earlier() {
        let mut merged = Rows {
            requests: vec![row("a", "queued"), row("b", "queued")],
            max_fence: 7,
            input_seq: Some(10),
            input_reset: false,
            outbox: vec![outbox(1), outbox(2), outbox(3)],
            published_upto: None,
            term: Some(1),
        };
        merged.then(Rows {
            requests: vec![row("c", "queued"), row("a", "active")],
            max_fence: 5,
            input_seq: None,
            input_reset: false,
            outbox: vec![outbox(4)],
            published_upto: Some(2),
            term: Some(1),
        });
        assert_eq!(
            merged.requests,
            [row("a", "active"), row("b", "queued"), row("c", "queued")],
            "a request's later row wins, in its first place"
        );
        assert_eq!(merged.max_fence, 7, "the fence only rises");
        assert_eq!(
            merged.input_seq,
            Some(10),
            "a batch without a position keeps it"
        );
        assert_eq!(
            merged.outbox,
            [outbox(3), outbox(4)],
            "rows the later deletion covers are not written"
        );
        merged.then(Rows {
            input_seq: Some(12),
            published_upto: Some(1),
            ..Rows::default()
        });
        assert_eq!(
            (merged.input_seq, merged.published_upto),
            (Some(12), Some(2)),
            "the position is the later's, the deletion the highest"
        );
        merged.then(Rows {
            input_seq: Some(3),
            input_reset: true,
            ..Rows::default()
        });
        merged.then(Rows {
            input_seq: Some(4),
            ..Rows::default()
        });
        assert_eq!(
            (merged.input_seq, merged.input_reset),
            (Some(4), true),
            "a reset among them sets the later position as it is"
        );
    }

    /// Many batches merged as they come are the same as merged two at a time, a deletion in the
    /// middle covering outbox rows of the batches before it and not those after.
    #[test]
    fn batches_merged_as_they_come_are_the_pairwise_merge() {
        let batch = |i: u64| Rows {
            requests: vec![
                row(
                    &format!("r{}", i % 7),
                    if i.is_multiple_of(2) {
                        "queued"
                    } else {
                        "active"
                    },
                ),
                row(&format!("n{i}"), "queued"),
            ],
            max_fence: i64::try_from(i % 5).unwrap(),
            input_seq: (!i.is_multiple_of(3)).then(|| i64::try_from(i).unwrap()),
            input_reset: false,
            outbox: vec![outbox(2 * i + 1), outbox(2 * i + 2)],
            published_upto: (i == 20).then_some(30),
            term: Some(1),
        };
        let mut merged = Merged::new(batch(0));
        let mut pairwise = batch(0);
        for i in 1..40 {
            merged.push(batch(i));
            pairwise.then(batch(i));
        }
        let merged = merged.into_rows();
        assert_eq!(merged, pairwise);
        assert_eq!(merged.requests.len(), 7 + 40, "one row per request");
        assert_eq!(merged.outbox.first().map(|r| r.id), Some(31));
        assert_eq!(merged.input_seq, Some(38));
    }

    /// The write-behind journal keeps rows in MessagePack: a row's `pause_ms` goes through it, and
    /// an entry written before the column existed reads back without one.
    #[test]
    fn a_rows_pause_hint_goes_through_the_journal_stream_and_older_entries_have_none() {
        let hinted = request::Model {
            pause_ms: Some(1_500),
            ..row("a", "active")
        };
        let rows = Rows {
            requests: vec![hinted, row("b", "queued")],
            ..Rows::default()
        };
        let bytes = rmp_serde::to_vec_named(&rows).expect("encodes");
        assert_eq!(
            rmp_serde::from_slice::<Rows>(&bytes).expect("decodes"),
            rows
        );

        let mut older = serde_json::to_value(Rows {
            requests: vec![row("c", "queued")],
            ..Rows::default()
        })
        .expect("rows as a map");
        for request in older["requests"].as_array_mut().expect("a list") {
            request
                .as_object_mut()
                .expect("a map")
                .remove("pause_ms")
                .expect("the field is there to remove");
        }
        let bytes = rmp_serde::to_vec_named(&older).expect("encodes");
        let read: Rows = rmp_serde::from_slice(&bytes).expect("an older entry decodes");
        assert_eq!(read.requests, [row("c", "queued")]);
        assert_eq!(read.requests[0].pause_ms, None);
    }
}
