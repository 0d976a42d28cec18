//! The durable queue: every request's [`RequestRecord`](gpu_coordinator_core::RequestRecord) and
//! the highest fence issued, in PostgreSQL.
//!
//! This module owns the translation between the core's records and the rows of `migrations/` (`requests`,
//! one row per request, and `fence`, one row). It must not decide anything: what is written, and when,
//! comes from the core's `Persist` and `PersistFence` actions through the driver, and what [`PgJournal::load`]
//! returns goes back to the core unchanged.
//!
//! - [`PgJournal::apply`] writes a batch as one statement (one transaction), so the batch is durable entirely or not at all;
//!   the driver acknowledges the batch's inputs to JetStream only after it returns `Ok`.
//! - Nothing goes back, whatever order batches arrive in: the stored fence and the input position only
//!   rise (`GREATEST`; the position is lowered only by a reset, for an input stream made anew), and a
//!   request's row is overwritten only by a row of at least its version (the number of the batch
//!   that made it, which rises across terms: each store numbers its batches from above the highest
//!   it read at [`PgJournal::migrate`] and [`PgJournal::load_state`]).
//! - [`PgJournal::load`] reads from one snapshot (repeatable read), so the requests and the fence agree.
//! - The core's `u64`s are stored as `bigint`: a value above `i64::MAX` is refused ([`PgError::OutOfRange`])
//!   rather than wrapped, and a stored value the core cannot represent is reported ([`PgError::Corrupt`]).

mod connect;
mod error;
mod hosts;
mod journal;
mod leader;
mod presence;
mod rows;
mod sql;

pub use crate::adapters::sql::entities::{fence, request, RowError};
pub use crate::ports::{Batch, Loaded, OutboxRow};
pub(crate) use error::write_error;
pub use error::PgError;
pub use hosts::Primary;
pub use journal::PgJournal;
pub use leader::{forget_unseen, PgLeadership, FORGET_AFTER_TTLS};
pub use presence::presence_file;
pub use rows::{Merged, Rows};
