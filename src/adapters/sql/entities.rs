//! sea-orm entities for the two tables of `migrations/`: rows as the database holds them (`i64`, text),
//! not as the core sees them, and the conversions between rows and the core's records, shared by the
//! Postgres and the SQLite journal.

/// `requests`: one row per request, every field of [`RequestRecord`](gpu_coordinator_core::RequestRecord).
pub mod request {
    use sea_orm::entity::prelude::*;

    #[derive(
        Clone, Debug, PartialEq, Eq, DeriveEntityModel, serde::Serialize, serde::Deserialize,
    )]
    #[sea_orm(table_name = "requests")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub request_id: String,
        pub service_id: String,
        pub priority: i16,
        #[sea_orm(unique)]
        pub seq: i64,
        /// `Encoding::as_str`.
        pub encoding: String,
        pub vram_mb: Option<i64>,
        pub gpu_pin: Option<String>,
        pub preemptible: bool,
        pub lease_ms: i64,
        pub requested_at: i64,
        pub timeout_at: i64,
        /// `Phase::as_str`.
        pub phase: String,
        pub gpu: Option<String>,
        pub held_mb: Option<i64>,
        pub fence: Option<i64>,
        pub granted_at: Option<i64>,
        pub expires_at: Option<i64>,
        pub pause_deadline: Option<i64>,
        pub paused_at: Option<i64>,
        pub waited_ms: Option<i64>,
        /// The core's `End`, by `End::as_str` (`end` is a reserved word in SQL).
        pub outcome: Option<String>,
        pub ended_at: Option<i64>,
        pub detail: Option<String>,
        /// The number of the batch that wrote the row (rising across terms): a row is overwritten
        /// only by one of at least its version. `None`: written unnumbered.
        #[serde(default)]
        pub version: Option<i64>,
        /// The request's `pause_ms` hint. (Absent from the write-behind journal's older entries.)
        #[serde(default)]
        pub pause_ms: Option<i64>,
        /// A rejected request's `RejectCode`, by `as_str`. (Absent from older journal entries.)
        #[serde(default)]
        pub reject_code: Option<String>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `fence`: a single row (`id = 1`) holding the highest fence ever issued.
pub mod fence {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "fence")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: i32,
        pub max_fence: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

use gpu_coordinator_core::{End, Fence, Phase, RequestRecord};
use gpu_coordinator_wire::{Encoding, RejectCode};
use sea_orm::sea_query::{Alias, Expr, OnConflict, Query};
use sea_orm::{
    ConnectionTrait, DbBackend, DbErr, EntityTrait as _, IntoActiveModel as _, Iterable as _,
    QueryFilter as _, QueryOrder as _, QuerySelect as _, QueryTrait as _, Statement,
};

use crate::ports::{Loaded, OutboxRow, TRIM_ENDED_BATCH};

/// Non-ended rows. `'ended'` (`Phase::Ended.as_str()`) is written literally so that the planner matches the
/// partial index `requests_open_seq`; a bind parameter would hide it from a generic plan.
pub(crate) const OPEN: &str = "\"requests\".\"phase\" <> 'ended'";

/// Ended rows, matching the partial index `requests_ended_recent`.
pub(crate) const ENDED: &str = "\"requests\".\"phase\" = 'ended'";

/// The messages not yet stored by the bus, in the order they were made.
pub(crate) const OUTBOX: &str =
    "SELECT id, msg_id, subject, msgpack, payload FROM outbox ORDER BY id";

/// One statement that writes `rows` (each a new request, or a newer state of one) in `backend`'s
/// dialect.
pub(crate) fn upsert_requests(rows: &[request::Model], backend: DbBackend) -> Statement {
    let upsert = OnConflict::column(request::Column::RequestId)
        .update_columns(
            request::Column::iter().filter(|c| !matches!(c, request::Column::RequestId)),
        )
        .to_owned();
    request::Entity::insert_many(rows.iter().cloned().map(|row| row.into_active_model()))
        .on_conflict(upsert)
        .build(backend)
}

/// One statement that adds `rows` to the outbox, in `backend`'s dialect.
pub(crate) fn insert_outbox(rows: &[OutboxRow], backend: DbBackend) -> Result<Statement, RowError> {
    let mut insert = Query::insert();
    insert.into_table(Alias::new("outbox")).columns([
        Alias::new("id"),
        Alias::new("msg_id"),
        Alias::new("subject"),
        Alias::new("msgpack"),
        Alias::new("payload"),
    ]);
    for row in rows {
        insert
            .values([
                bigint("", "outbox id", row.id)?.into(),
                row.msg_id.clone().into(),
                row.subject.clone().into(),
                row.msgpack.into(),
                row.payload.clone().into(),
            ])
            .expect("five columns, five values");
    }
    Ok(backend.build(&insert))
}

/// Deletes, on `conn` (a transaction), up to [`TRIM_ENDED_BATCH`] ended requests beyond the `retain_ended`
/// most recently ended ones (those [`read_journal`] reads), keeping the request that arrived last (the
/// arrival numbers go on from it). The stored highest fence is raised first to every fence the rows
/// hold, so that no fence is forgotten with its row. Returns how many went.
pub(crate) async fn trim_ended(
    conn: &impl ConnectionTrait,
    retain_ended: usize,
) -> Result<u64, DbErr> {
    let backend = conn.get_database_backend();
    let (raise, delete) = match backend {
        DbBackend::Postgres => (
            "UPDATE fence SET max_fence = GREATEST(max_fence, \
             COALESCE((SELECT max(fence) FROM requests), 0)) WHERE id = 1",
            "DELETE FROM requests WHERE seq IN (SELECT seq FROM requests \
             WHERE phase = 'ended' ORDER BY ended_at DESC, seq DESC LIMIT $1 OFFSET $2) \
             AND seq < (SELECT max(seq) FROM requests)",
        ),
        _ => (
            "UPDATE fence SET max_fence = max(max_fence, \
             COALESCE((SELECT max(fence) FROM requests), 0)) WHERE id = 1",
            "DELETE FROM requests WHERE seq IN (SELECT seq FROM requests \
             WHERE phase = 'ended' ORDER BY ended_at DESC, seq DESC LIMIT ?1 OFFSET ?2) \
             AND seq < (SELECT max(seq) FROM requests)",
        ),
    };
    conn.execute(Statement::from_string(backend, raise)).await?;
    let deleted = conn
        .execute(Statement::from_sql_and_values(
            backend,
            delete,
            [
                (TRIM_ENDED_BATCH as i64).into(),
                i64::try_from(retain_ended).unwrap_or(i64::MAX).into(),
            ],
        ))
        .await?
        .rows_affected();
    Ok(deleted)
}

/// What a journal holds, as its database stores it.
pub(crate) struct StoredJournal {
    pub(crate) rows: Vec<request::Model>,
    pub(crate) max_fence: i64,
    pub(crate) max_arrival: i64,
    pub(crate) input_seq: i64,
    pub(crate) outbox: Vec<OutboxRow>,
}

/// Reads, on `conn` (a transaction, so that the parts agree), every request not ended in `seq` order,
/// then the `retain_ended` most recently ended ones (oldest first); the counters `max_fence`,
/// `max_arrival` and `input_seq` that the `counters` query of the store's dialect selects; and the
/// outbox, in order.
pub(crate) async fn read_journal(
    conn: &impl ConnectionTrait,
    counters: &str,
    retain_ended: usize,
) -> Result<StoredJournal, DbErr> {
    let backend = conn.get_database_backend();
    let mut rows = request::Entity::find()
        .filter(Expr::cust(OPEN))
        .order_by_asc(request::Column::Seq)
        .all(conn)
        .await?;
    if retain_ended > 0 {
        let mut ended = request::Entity::find()
            .filter(Expr::cust(ENDED))
            .order_by_desc(request::Column::EndedAt)
            .order_by_desc(request::Column::Seq)
            .limit(u64::try_from(retain_ended).unwrap_or(u64::MAX))
            .all(conn)
            .await?;
        ended.reverse();
        rows.append(&mut ended);
    }
    let counters = conn
        .query_one(Statement::from_string(backend, counters))
        .await?;
    let counter = |name: &str| -> Result<i64, DbErr> {
        counters
            .as_ref()
            .map(|row| row.try_get::<i64>("", name))
            .transpose()
            .map(|v| v.unwrap_or(0))
    };
    let outbox = conn
        .query_all(Statement::from_string(backend, OUTBOX))
        .await?
        .into_iter()
        .map(|row| {
            Ok(OutboxRow {
                id: u64::try_from(row.try_get::<i64>("", "id")?).unwrap_or(0),
                msg_id: row.try_get("", "msg_id")?,
                subject: row.try_get("", "subject")?,
                msgpack: row.try_get("", "msgpack")?,
                payload: row.try_get("", "payload")?,
            })
        })
        .collect::<Result<Vec<_>, DbErr>>()?;
    Ok(StoredJournal {
        rows,
        max_fence: counter("max_fence")?,
        max_arrival: counter("max_arrival")?,
        input_seq: counter("input_seq")?,
        outbox,
    })
}

impl StoredJournal {
    /// What the driver starts from: the records as the core sees them, and the counters, which are
    /// never negative.
    pub(crate) fn into_loaded(self) -> Result<Loaded, RowError> {
        let unsigned = |name: &str, value: i64| {
            u64::try_from(value).map_err(|_| RowError::Corrupt {
                request_id: format!("({name})"),
                detail: format!("{name} is negative ({value})"),
            })
        };
        Ok(Loaded {
            records: self
                .rows
                .into_iter()
                .map(to_record)
                .collect::<Result<Vec<_>, _>>()?,
            max_fence: Fence(unsigned("max_fence", self.max_fence)?),
            max_arrival: unsigned("max_arrival", self.max_arrival)?,
            input_seq: unsigned("input_seq", self.input_seq)?,
            outbox: self.outbox,
        })
    }
}

/// A record that does not translate to a row, or a row that does not translate back. The store that
/// meets it names its server around it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowError {
    /// A value to write does not fit a `bigint`.
    OutOfRange {
        request_id: String,
        field: &'static str,
        value: u64,
    },
    /// A stored row the core cannot represent (a negative number, an unknown phase).
    Corrupt { request_id: String, detail: String },
}

/// `value` as a `bigint`, refused above `i64::MAX` rather than wrapped.
pub fn bigint(request_id: &str, field: &'static str, value: u64) -> Result<i64, RowError> {
    i64::try_from(value).map_err(|_| RowError::OutOfRange {
        request_id: request_id.to_owned(),
        field,
        value,
    })
}

/// The row of a record.
pub fn to_row(r: &RequestRecord) -> Result<request::Model, RowError> {
    let id = r.request_id.as_str();
    let opt = |field, value: Option<u64>| value.map(|v| bigint(id, field, v)).transpose();
    Ok(request::Model {
        request_id: r.request_id.to_string(),
        service_id: r.service_id.to_string(),
        priority: i16::from(r.priority),
        seq: bigint(id, "seq", r.arrival)?,
        encoding: r.encoding.as_str().to_owned(),
        vram_mb: opt("vram_mb", r.vram_mb)?,
        gpu_pin: r.gpu_pin.as_ref().map(|g| g.to_string()),
        preemptible: r.preemptible,
        lease_ms: bigint(id, "lease_ms", r.lease_ms)?,
        requested_at: bigint(id, "requested_at", r.requested_at)?,
        timeout_at: bigint(id, "timeout_at", r.timeout_at)?,
        phase: r.phase.as_str().to_owned(),
        gpu: r.gpu.as_ref().map(|g| g.to_string()),
        held_mb: opt("held_mb", r.held_mb)?,
        fence: opt("fence", r.fence.map(|f| f.0))?,
        granted_at: opt("granted_at", r.granted_at)?,
        expires_at: opt("expires_at", r.expires_at)?,
        pause_deadline: opt("pause_deadline", r.pause_deadline)?,
        paused_at: opt("paused_at", r.paused_at)?,
        waited_ms: opt("waited_ms", r.waited_ms)?,
        outcome: r.end.map(|e| e.as_str().to_owned()),
        ended_at: opt("ended_at", r.ended_at)?,
        detail: r.detail.clone(),
        version: None,
        pause_ms: opt("pause_ms", r.pause_ms)?,
        reject_code: r.code.map(|c| c.as_str().to_owned()),
    })
}

/// The record of a row.
pub fn to_record(row: request::Model) -> Result<RequestRecord, RowError> {
    let corrupt = |detail: String| RowError::Corrupt {
        request_id: row.request_id.clone(),
        detail,
    };
    let num = |field: &str, value: i64| {
        u64::try_from(value).map_err(|_| corrupt(format!("{field} is negative ({value})")))
    };
    let opt = |field: &str, value: Option<i64>| value.map(|v| num(field, v)).transpose();
    let phase = Phase::from_name(&row.phase)
        .ok_or_else(|| corrupt(format!("unknown phase {:?}", row.phase)))?;
    let end = row
        .outcome
        .as_deref()
        .map(|name| {
            End::from_name(name).ok_or_else(|| corrupt(format!("unknown outcome {name:?}")))
        })
        .transpose()?;
    let priority = u8::try_from(row.priority)
        .map_err(|_| corrupt(format!("priority {} is outside 0-255", row.priority)))?;
    let arrival = num("seq", row.seq)?;
    let vram_mb = opt("vram_mb", row.vram_mb)?;
    let lease_ms = num("lease_ms", row.lease_ms)?;
    let requested_at = num("requested_at", row.requested_at)?;
    let timeout_at = num("timeout_at", row.timeout_at)?;
    let held_mb = opt("held_mb", row.held_mb)?;
    let fence = opt("fence", row.fence)?.map(Fence);
    let granted_at = opt("granted_at", row.granted_at)?;
    let expires_at = opt("expires_at", row.expires_at)?;
    let pause_deadline = opt("pause_deadline", row.pause_deadline)?;
    let paused_at = opt("paused_at", row.paused_at)?;
    let waited_ms = opt("waited_ms", row.waited_ms)?;
    let ended_at = opt("ended_at", row.ended_at)?;
    let pause_ms = opt("pause_ms", row.pause_ms)?;
    let encoding = Encoding::from_name(&row.encoding);
    // Every check is done: the text fields move into the record.
    Ok(RequestRecord {
        service_id: row.service_id.into(),
        priority,
        arrival,
        encoding,
        vram_mb,
        gpu_pin: row.gpu_pin.map(Into::into),
        preemptible: row.preemptible,
        pause_ms,
        lease_ms,
        requested_at,
        timeout_at,
        phase,
        gpu: row.gpu.map(Into::into),
        held_mb,
        fence,
        granted_at,
        expires_at,
        pause_deadline,
        paused_at,
        waited_ms,
        end,
        ended_at,
        detail: row.detail,
        // A code this version does not know (written by a newer one) reads as `other`.
        code: row
            .reject_code
            .as_deref()
            .map(|c| RejectCode::parse(c).unwrap_or(RejectCode::Other)),
        request_id: row.request_id.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_literal_phase_is_the_core_s() {
        assert_eq!(
            OPEN,
            format!("\"requests\".\"phase\" <> '{}'", Phase::Ended.as_str())
        );
        assert_eq!(
            ENDED,
            format!("\"requests\".\"phase\" = '{}'", Phase::Ended.as_str())
        );
    }
}
