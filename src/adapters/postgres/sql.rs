//! The text of the statements the Postgres journal runs, and the binding of request rows to them: one
//! array per column of `requests`, so that a statement's text is the same whatever the batch's size.

use std::sync::LazyLock;

use sea_orm::sqlx::{self, Row as _};

use crate::adapters::sql::entities::{self, request};

/// Raises the stored fence, the input position (but for a reset: an input stream made anew) and the
/// highest row version written; never lowers them, whatever order batches arrive in. `{fence}`,
/// `{input_seq}` (null: unchanged), `{reset}` and `{version}` (null: none) stand for the batch's
/// values.
const RAISE_FENCE: &str = "INSERT INTO fence (id, max_fence, input_seq, version) \
     VALUES (1, {fence}, COALESCE({input_seq}, 0), COALESCE({version}, 0)) \
     ON CONFLICT (id) DO UPDATE SET max_fence = GREATEST(fence.max_fence, EXCLUDED.max_fence), \
     input_seq = CASE WHEN {reset} THEN COALESCE({input_seq}, fence.input_seq) \
                 ELSE GREATEST(fence.input_seq, {input_seq}) END, \
     version = GREATEST(fence.version, {version})";

/// Overwrites a request's row only with one of at least its version: an older batch written late
/// leaves a newer row as it is. A row without a version (written unnumbered) is overwritten, and
/// overwrites.
const NEWER_ROW: &str = "requests.version IS NULL OR EXCLUDED.version IS NULL \
     OR requests.version <= EXCLUDED.version";

/// Fences a batch by the writer's term: locks the `leader` row and raises SQLSTATE `GC001` when its term
/// is another (see the migration that made `gpu_coordinator_check_term`).
pub(super) const CHECK_TERM: &str =
    "UPDATE leader SET term = term WHERE id = 1 AND gpu_coordinator_check_term(term, $1) RETURNING term";

/// The counters the driver starts from: the highest fence (the `fence` row, and the requests' own in
/// case), the highest arrival number (an index read on the unique `seq`), the last input handled.
pub(super) const COUNTERS: &str = "SELECT \
     GREATEST(COALESCE((SELECT max_fence FROM fence WHERE id = 1), 0), \
              COALESCE((SELECT max(fence) FROM requests), 0)) AS max_fence, \
     COALESCE((SELECT max(seq) FROM requests), 0) AS max_arrival, \
     COALESCE((SELECT input_seq FROM fence WHERE id = 1), 0) AS input_seq, \
     COALESCE((SELECT version FROM fence WHERE id = 1), 0) AS version";

/// The highest row version written.
pub(super) const VERSION: &str =
    "SELECT COALESCE((SELECT version FROM fence WHERE id = 1), 0) AS version";

/// The columns of `requests`, in the order of [`RequestColumns`], with each one's type for `unnest`.
const REQUEST_COLUMNS: [(&str, &str); 25] = [
    ("request_id", "text"),
    ("service_id", "text"),
    ("priority", "smallint"),
    ("seq", "bigint"),
    ("encoding", "text"),
    ("vram_mb", "bigint"),
    ("gpu_pin", "text"),
    ("preemptible", "boolean"),
    ("lease_ms", "bigint"),
    ("requested_at", "bigint"),
    ("timeout_at", "bigint"),
    ("phase", "text"),
    ("gpu", "text"),
    ("held_mb", "bigint"),
    ("fence", "bigint"),
    ("granted_at", "bigint"),
    ("expires_at", "bigint"),
    ("pause_deadline", "bigint"),
    ("paused_at", "bigint"),
    ("waited_ms", "bigint"),
    ("outcome", "text"),
    ("ended_at", "bigint"),
    ("detail", "text"),
    ("pause_ms", "bigint"),
    ("reject_code", "text"),
];

/// `request_id, service_id, ...`: the columns of [`REQUEST_COLUMNS`], in order.
fn column_names() -> String {
    REQUEST_COLUMNS.map(|(name, _)| name).join(", ")
}

/// The batch statement under a term ([`CHECK_TERM`] as its first part); its parameters are the term, then
/// those of [`WRITE_BATCH`].
pub(super) static WRITE_BATCH_FENCED: LazyLock<String> = LazyLock::new(|| write_batch(true));

/// The batch statement, unfenced. Its parameters: one array per column of `requests` (see
/// [`RequestColumns`]), then the rows' versions; the outbox's five columns as arrays; the outbox ids to delete (from, up to; both
/// null for none); the fence to raise to; the last input handled (null: unchanged); whether that
/// position is a reset (an input stream made anew), which may lower it.
pub(super) static WRITE_BATCH: LazyLock<String> = LazyLock::new(|| write_batch(false));

/// The text of [`WRITE_BATCH`] or [`WRITE_BATCH_FENCED`]: data-modifying CTEs, which commit or fail
/// together.
fn write_batch(fenced: bool) -> String {
    let mut next = 0;
    let mut param = || {
        next += 1;
        format!("${next}")
    };
    let mut parts = Vec::new();
    if fenced {
        parts.push(format!("t AS ({})", CHECK_TERM.replace("$1", &param())));
    }
    let arrays = REQUEST_COLUMNS.map(|(_, ty)| format!("{}::{ty}[]", param()));
    let versions = format!("{}::bigint[]", param());
    let updates = REQUEST_COLUMNS[1..]
        .iter()
        .map(|(c, _)| format!("{c} = EXCLUDED.{c}"));
    parts.push(format!(
        "r AS (INSERT INTO requests ({}, version) SELECT * FROM unnest({}, {versions}) \
         ON CONFLICT (request_id) DO UPDATE SET {}, version = EXCLUDED.version WHERE {NEWER_ROW})",
        column_names(),
        arrays.join(", "),
        updates.collect::<Vec<_>>().join(", ")
    ));
    let outbox =
        ["bigint", "text", "text", "boolean", "bytea"].map(|ty| format!("{}::{ty}[]", param()));
    parts.push(format!(
        "o AS (INSERT INTO outbox (id, msg_id, subject, msgpack, payload) SELECT * FROM unnest({}) \
         ON CONFLICT (id) DO NOTHING)",
        outbox.join(", ")
    ));
    // The outbox rows JetStream has stored, from the last id deleted on: the rows below it are gone, and
    // a range from the table's start would walk the index entries of every dead row not yet vacuumed (a
    // cost that grows with the traffic).
    let (from, upto) = (param(), param());
    parts.push(format!(
        "d AS (DELETE FROM outbox WHERE id > {from}::bigint AND id <= {upto}::bigint)"
    ));
    let (fence, input_seq, reset) = (param(), param(), param());
    let raise = RAISE_FENCE
        .replace("{fence}", &format!("{fence}::bigint"))
        .replace("{input_seq}", &format!("{input_seq}::bigint"))
        .replace("{reset}", &format!("{reset}::boolean"))
        .replace(
            "{version}",
            &format!("(SELECT max(v) FROM unnest({versions}) AS v)"),
        );
    format!("WITH {} {raise}", parts.join(", "))
}

/// Every request not ended, in arrival order: the columns of [`REQUEST_COLUMNS`], in order, for
/// [`request_row`]. `'ended'` is literal, to match the partial index `requests_open_seq`.
pub(super) static SELECT_OPEN: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {} FROM requests WHERE {} ORDER BY seq",
        column_names(),
        entities::OPEN
    )
});

/// The `$1` most recently ended requests, the most recent first (one backward scan of
/// `requests_ended_recent`).
pub(super) static SELECT_ENDED: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {} FROM requests WHERE {} ORDER BY ended_at DESC, seq DESC LIMIT $1",
        column_names(),
        entities::ENDED
    )
});

/// A row of [`SELECT_OPEN`] or [`SELECT_ENDED`], its columns read by position.
pub(super) fn request_row(row: &sqlx::postgres::PgRow) -> Result<request::Model, sqlx::Error> {
    Ok(request::Model {
        request_id: row.try_get(0)?,
        service_id: row.try_get(1)?,
        priority: row.try_get(2)?,
        seq: row.try_get(3)?,
        encoding: row.try_get(4)?,
        vram_mb: row.try_get(5)?,
        gpu_pin: row.try_get(6)?,
        preemptible: row.try_get(7)?,
        lease_ms: row.try_get(8)?,
        requested_at: row.try_get(9)?,
        timeout_at: row.try_get(10)?,
        phase: row.try_get(11)?,
        gpu: row.try_get(12)?,
        held_mb: row.try_get(13)?,
        fence: row.try_get(14)?,
        granted_at: row.try_get(15)?,
        expires_at: row.try_get(16)?,
        pause_deadline: row.try_get(17)?,
        paused_at: row.try_get(18)?,
        waited_ms: row.try_get(19)?,
        outcome: row.try_get(20)?,
        ended_at: row.try_get(21)?,
        detail: row.try_get(22)?,
        pause_ms: row.try_get(23)?,
        reject_code: row.try_get(24)?,
        version: None,
    })
}

/// Request rows as one vector per column, in the order of [`REQUEST_COLUMNS`], then their versions.
#[derive(Default)]
pub(super) struct RequestColumns<'a> {
    request_id: Vec<&'a str>,
    service_id: Vec<&'a str>,
    priority: Vec<i16>,
    seq: Vec<i64>,
    encoding: Vec<&'a str>,
    vram_mb: Vec<Option<i64>>,
    gpu_pin: Vec<Option<&'a str>>,
    preemptible: Vec<bool>,
    lease_ms: Vec<i64>,
    requested_at: Vec<i64>,
    timeout_at: Vec<i64>,
    phase: Vec<&'a str>,
    gpu: Vec<Option<&'a str>>,
    held_mb: Vec<Option<i64>>,
    fence: Vec<Option<i64>>,
    granted_at: Vec<Option<i64>>,
    expires_at: Vec<Option<i64>>,
    pause_deadline: Vec<Option<i64>>,
    paused_at: Vec<Option<i64>>,
    waited_ms: Vec<Option<i64>>,
    outcome: Vec<Option<&'a str>>,
    ended_at: Vec<Option<i64>>,
    detail: Vec<Option<&'a str>>,
    pause_ms: Vec<Option<i64>>,
    reject_code: Vec<Option<&'a str>>,
    version: Vec<Option<i64>>,
}

impl<'a> RequestColumns<'a> {
    /// The columns of `rows`, borrowing their text.
    pub(super) fn of(rows: &'a [request::Model]) -> RequestColumns<'a> {
        let mut c = RequestColumns::default();
        for r in rows {
            c.request_id.push(&r.request_id);
            c.service_id.push(&r.service_id);
            c.priority.push(r.priority);
            c.seq.push(r.seq);
            c.encoding.push(&r.encoding);
            c.vram_mb.push(r.vram_mb);
            c.gpu_pin.push(r.gpu_pin.as_deref());
            c.preemptible.push(r.preemptible);
            c.lease_ms.push(r.lease_ms);
            c.requested_at.push(r.requested_at);
            c.timeout_at.push(r.timeout_at);
            c.phase.push(&r.phase);
            c.gpu.push(r.gpu.as_deref());
            c.held_mb.push(r.held_mb);
            c.fence.push(r.fence);
            c.granted_at.push(r.granted_at);
            c.expires_at.push(r.expires_at);
            c.pause_deadline.push(r.pause_deadline);
            c.paused_at.push(r.paused_at);
            c.waited_ms.push(r.waited_ms);
            c.outcome.push(r.outcome.as_deref());
            c.ended_at.push(r.ended_at);
            c.detail.push(r.detail.as_deref());
            c.pause_ms.push(r.pause_ms);
            c.reject_code.push(r.reject_code.as_deref());
            c.version.push(r.version);
        }
        c
    }

    /// `query` with the columns bound, in order.
    pub(super) fn bind(self, query: PgQuery<'a>) -> PgQuery<'a> {
        query
            .bind(self.request_id)
            .bind(self.service_id)
            .bind(self.priority)
            .bind(self.seq)
            .bind(self.encoding)
            .bind(self.vram_mb)
            .bind(self.gpu_pin)
            .bind(self.preemptible)
            .bind(self.lease_ms)
            .bind(self.requested_at)
            .bind(self.timeout_at)
            .bind(self.phase)
            .bind(self.gpu)
            .bind(self.held_mb)
            .bind(self.fence)
            .bind(self.granted_at)
            .bind(self.expires_at)
            .bind(self.pause_deadline)
            .bind(self.paused_at)
            .bind(self.waited_ms)
            .bind(self.outcome)
            .bind(self.ended_at)
            .bind(self.detail)
            .bind(self.pause_ms)
            .bind(self.reject_code)
            .bind(self.version)
    }
}

/// A statement with its arguments, on Postgres.
type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;
