//! What the Postgres and the SQLite journal share: the sea-orm entities of the tables of
//! `migrations/`, the conversions between their rows and the core's records, and the statements both
//! dialects build the same way.

pub(crate) mod entities;

use std::collections::HashSet;

use gpu_coordinator_core::RequestRecord;

/// The last record of each `request_id`, in the order of their last appearance: one statement cannot
/// update the same row twice.
pub(crate) fn last_of_each(records: &[RequestRecord]) -> Vec<&RequestRecord> {
    let mut seen = HashSet::with_capacity(records.len());
    let mut last: Vec<&RequestRecord> = records
        .iter()
        .rev()
        .filter(|r| seen.insert(r.request_id.as_str()))
        .collect();
    last.reverse();
    last
}
