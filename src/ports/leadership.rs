//! Leadership: whether this process may act for its prefix, and under which term. The real adapter is a
//! lease row in Postgres ([`PgLeadership`](crate::adapters::postgres::PgLeadership)); the embedded one
//! [`DirLock`](crate::adapters::sqlite::DirLock); a deployment with one coordinator uses
//! [`AlwaysLeader`].

use async_trait::async_trait;

use super::PortError;

/// A leadership term: strictly increases with each new leader of a prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Term(pub u64);

/// Whether this process may act for its prefix. The composition root waits for
/// [`Leadership::acquire`] before it starts a driver, the driver stops acting when
/// [`Leadership::lost`] resolves, and a graceful stop hands the leadership on at once with
/// [`Leadership::release`].
#[async_trait]
pub trait Leadership: Send + Sync + 'static {
    /// Waits until this process leads; answers its term.
    async fn acquire(&self) -> Result<Term, PortError>;
    /// Resolves when this process may no longer act under `term`: before its leadership can have
    /// expired from any other coordinator's point of view.
    async fn lost(&self, term: Term);
    /// Gives the leadership of `term` up (a graceful stop), so that a standby takes over at once.
    async fn release(&self, term: Term);
    /// Who leads now, as far as this process knows: `(term, holder)`.
    async fn leader(&self) -> Option<(Term, String)>;
    /// While this process leads: its name, its term and the standbys seen lately (kept up to date by the
    /// renewals, so it costs nothing to read).
    fn roster(&self) -> Option<Roster>;
    /// Why this process does not take the leadership even when it is free (its clock is too far from
    /// the leadership's), if it does not.
    fn refusal(&self) -> Option<String>;
}

/// The coordinators of a deployment as the leader sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Roster {
    pub holder: String,
    pub term: Term,
    pub standbys: Vec<String>,
}

/// The leadership of a deployment with one coordinator: always the leader, in term 1.
#[derive(Debug, Clone, Copy, Default)]
pub struct AlwaysLeader;

#[async_trait]
impl Leadership for AlwaysLeader {
    async fn acquire(&self) -> Result<Term, PortError> {
        Ok(Term(1))
    }

    async fn lost(&self, _term: Term) {
        std::future::pending::<()>().await
    }

    /// Nobody else could take it: nothing to hand on.
    async fn release(&self, _term: Term) {}

    /// Not known: nobody else leads, and no term is read back.
    async fn leader(&self) -> Option<(Term, String)> {
        None
    }

    /// No standbys, and no name to give.
    fn roster(&self) -> Option<Roster> {
        None
    }

    /// Never refuses.
    fn refusal(&self) -> Option<String> {
        None
    }
}
