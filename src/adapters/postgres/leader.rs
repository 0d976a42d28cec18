//! The [`Leadership`] of a deployment in its Postgres database: one row (`leader`) is the lease of the one
//! coordinator that acts. Postgres is the choice because the journal lives there: the journal's batch is
//! fenced by the same row in the same statement, so leadership and writes cannot disagree.
//!
//! - **Taking it**: a coordinator takes the row when it is free or expired by the server's clock, raising
//!   `term`. A standby tries every `leader.poll_ms`.
//! - **Keeping it**: the leader extends `expires_at` to `now() + ttl` every third of the TTL.
//! - **The trust window**: the leader stops acting at the instant of the last successful renewal's
//!   *start*, on its own monotonic clock, plus 80% of the TTL. The row expires for the others a full
//!   TTL after the renewal *reached* Postgres, later still; so a stalled, partitioned or paused leader
//!   has stopped before anybody can take over, and the new leader needs no extra wait. A leader whose
//!   renewals fail (Postgres away) stops acting when its window ends.
//! - **Handing it on**: a graceful stop expires the row at once, so a standby takes over within its poll.
//! - **A holder known to be gone**: each coordinator holds an exclusive `flock` on a file named after
//!   it in the host's temporary directory (`gpu-coordinator-leaders/`) for as long as its process lives.
//!   A coordinator on the same host that finds the leader's file unlocked knows that process is gone
//!   (killed, crashed: the kernel dropped its lock) and takes the row at once, without waiting for it
//!   to expire. A stopped (`SIGSTOP`) or stalled process still holds its lock; a leader on another
//!   host (or whose file is out of sight) is waited for as before.
//! - **Forgetting**: the leader deletes the `coordinators` rows not seen for [`FORGET_AFTER_TTLS`]
//!   TTLs, once per that many TTLs, and the files that the gone ones among them left on its host (a
//!   standby killed by a signal cannot remove its own). A live coordinator whose row went comes back
//!   at its next sighting, and keeps its file, which it locks.

use std::time::Duration;

use async_trait::async_trait;
use sea_orm::{ConnectionTrait as _, DatabaseConnection, DbBackend, Statement};
use tokio::sync::{watch, Mutex};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use std::sync::Arc;

use super::presence::Presence;
use super::Primary;
use crate::ports::{Leadership, Leases, PortError, Roster, Term};

/// Takes the row when it is free or expired; answers the new term, above the row's and above `$3` (the
/// highest term the lease store saw: a row read back from a standby that missed the last commits may
/// hold an older term than was led).
const TAKE: &str = "INSERT INTO leader (id, term, holder, expires_at) \
     VALUES (1, $3 + 1, $1, clock_timestamp() + make_interval(secs => $2)) \
     ON CONFLICT (id) DO UPDATE SET term = GREATEST(leader.term, $3) + 1, holder = EXCLUDED.holder, \
     expires_at = EXCLUDED.expires_at \
     WHERE leader.expires_at <= clock_timestamp() \
     RETURNING term";

/// Takes the row from the holder `$3`, known to be gone, whatever its expiry; answers the new term (above
/// `$4`, as for [`TAKE`]).
const TAKE_FROM: &str = "UPDATE leader SET term = GREATEST(term, $4) + 1, holder = $1, \
     expires_at = clock_timestamp() + make_interval(secs => $2) \
     WHERE id = 1 AND holder = $3 RETURNING term";

/// Extends the lease of `term` if this process still holds it.
const RENEW: &str = "UPDATE leader SET expires_at = clock_timestamp() + make_interval(secs => $3) \
     WHERE id = 1 AND term = $1 AND holder = $2 RETURNING term";

/// Expires the lease of `term` at once (a graceful stop).
const RELEASE: &str =
    "UPDATE leader SET expires_at = clock_timestamp() WHERE id = 1 AND term = $1 AND holder = $2";

/// Who leads, if the lease is live.
const CURRENT: &str =
    "SELECT term, holder FROM leader WHERE id = 1 AND expires_at > clock_timestamp()";

/// Says this coordinator is there (leader or standby).
const SEEN: &str = "INSERT INTO coordinators (holder, seen_at) VALUES ($1, clock_timestamp()) \
     ON CONFLICT (holder) DO UPDATE SET seen_at = EXCLUDED.seen_at";

/// The other coordinators seen within the last `$2` seconds.
const STANDBYS: &str = "SELECT holder FROM coordinators \
     WHERE holder <> $1 AND seen_at > clock_timestamp() - make_interval(secs => $2) ORDER BY holder";

/// Forgets the coordinators not seen for `$2` seconds, but `$1`; answers their holders.
const FORGET: &str = "DELETE FROM coordinators \
     WHERE holder <> $1 AND seen_at < clock_timestamp() - make_interval(secs => $2) RETURNING holder";

/// After how many TTLs unseen a coordinator is forgotten, and how often the leader looks.
pub const FORGET_AFTER_TTLS: u32 = 60;

/// The share of the TTL the leader trusts itself for, from the start of its last renewal.
const TRUST: f64 = 0.8;

/// The term this process leads in, and until when it may act.
struct Lead {
    term: Term,
    until: watch::Receiver<Instant>,
    stop: CancellationToken,
}

/// Leadership through the `leader` row of the journal's database.
pub struct PgLeadership {
    /// The journal's database, on its primary wherever that moves.
    db: Primary,
    /// The lease store, whose highest term each new term goes above (none: the row's alone).
    terms_of: std::sync::OnceLock<Arc<dyn Leases>>,
    /// This process, as the row names it: `<host>-<pid>-<random>`.
    holder: String,
    ttl: Duration,
    poll: Duration,
    /// The furthest this process's clock may be from Postgres's for it to lead (zero: no check).
    max_skew: Duration,
    /// Why it last refused to lead (its clock), until its clock fits again.
    refusal: std::sync::RwLock<Option<String>>,
    lead: Mutex<Option<Lead>>,
    /// While leading: who the leader is and which standbys it saw lately.
    roster: Arc<std::sync::RwLock<Option<Roster>>>,
    /// Tells the coordinators on this host that this process lives (none when the file cannot be made).
    _presence: Option<Presence>,
}

impl PgLeadership {
    /// The leadership in the database of `db`: a pool, or the journal's [`Primary`] (whose moves it
    /// follows).
    pub fn new(db: impl Into<Primary>, ttl: Duration, poll: Duration) -> PgLeadership {
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "host".into());
        let holder = format!(
            "{host}-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        );
        let presence = Presence::hold(&holder)
            .inspect_err(|e| {
                tracing::debug!("no presence file (a restart waits for the lease to expire): {e}")
            })
            .ok();
        PgLeadership {
            db: db.into(),
            terms_of: std::sync::OnceLock::new(),
            holder,
            ttl,
            poll,
            max_skew: Duration::ZERO,
            refusal: std::sync::RwLock::default(),
            lead: Mutex::new(None),
            roster: Arc::default(),
            _presence: presence,
        }
    }

    /// Refuses to lead while this process's clock is further than `max_skew` from Postgres's (zero:
    /// no check).
    pub fn with_max_clock_skew(mut self, max_skew: Duration) -> PgLeadership {
        self.max_skew = max_skew;
        self
    }

    /// Takes each new term above the highest that `leases` saw as well as above the `leader` row's:
    /// after a failover to a standby that missed the last commits, the row holds an older term than
    /// was led, and the lease store still knows the newer one. A term is never given twice.
    pub fn terms_above(&self, leases: Arc<dyn Leases>) {
        let _ = self.terms_of.set(leases);
    }

    /// The highest term the lease store saw (0 without one).
    async fn term_floor(&self) -> Result<i64, PortError> {
        match self.terms_of.get() {
            Some(leases) => Ok(i64::try_from(leases.term().await?.0).unwrap_or(i64::MAX)),
            None => Ok(0),
        }
    }

    /// `result`; after a failure, the pool moved first if the primary went.
    async fn moved<T>(&self, result: Result<T, PortError>) -> Result<T, PortError> {
        if result.is_err() {
            self.db.recheck().await;
        }
        result
    }

    /// How far this process's clock is ahead of Postgres's (negative: behind), in milliseconds, and the
    /// uncertainty of that figure (half the round trip).
    pub async fn clock_skew(&self) -> Result<(i64, u64), PortError> {
        let before = crate::clock::now_ms();
        let row = self
            .db
            .db()
            .query_one(Statement::from_string(
                DbBackend::Postgres,
                "SELECT (extract(epoch from clock_timestamp()) * 1000)::bigint AS ms",
            ))
            .await
            .map_err(PortError::new);
        let row = self
            .moved(row)
            .await?
            .ok_or_else(|| PortError::msg("reading Postgres's clock: no row"))?;
        let after = crate::clock::now_ms();
        let theirs: i64 = row.try_get("", "ms").map_err(PortError::new)?;
        let mid = before + (after - before) / 2;
        Ok((mid as i64 - theirs, (after - before).div_ceil(2)))
    }

    /// Whether this process's clock is close enough to Postgres's to lead; says why not in the log at
    /// most once a minute.
    async fn clock_fits(&self, warned: &mut Option<Instant>) -> Result<bool, PortError> {
        if self.max_skew.is_zero() {
            return Ok(true);
        }
        let (skew, uncertainty) = self.clock_skew().await?;
        let bound = self.max_skew.as_millis() as u64;
        let fits = skew.unsigned_abs().saturating_sub(uncertainty) <= bound;
        let why = (!fits).then(|| {
            format!(
                "this coordinator's clock is {} ms {} Postgres's (more than leader.max_clock_skew_ms = \
                 {bound}): it does not lead until the clocks agree (check NTP on this host)",
                skew.unsigned_abs(),
                if skew > 0 { "ahead of" } else { "behind" },
            )
        });
        if let Some(why) = &why {
            if warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
                tracing::error!("{why}");
                *warned = Some(Instant::now());
            }
        }
        if let Ok(mut refusal) = self.refusal.write() {
            *refusal = why;
        }
        Ok(fits)
    }

    /// This process's name in the `leader` row.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    fn window(&self) -> Duration {
        self.ttl.mul_f64(TRUST)
    }

    /// Says this coordinator is there.
    async fn seen(db: &DatabaseConnection, holder: &str) -> Result<(), PortError> {
        db.execute(Statement::from_sql_and_values(
            DbBackend::Postgres,
            SEEN,
            [holder.to_owned().into()],
        ))
        .await
        .map(|_| ())
        .map_err(PortError::new)
    }

    async fn take(&self) -> Result<Option<Term>, PortError> {
        let floor = self.term_floor().await?;
        let row = self
            .db
            .db()
            .query_one(Statement::from_sql_and_values(
                DbBackend::Postgres,
                TAKE,
                [
                    self.holder.clone().into(),
                    self.ttl.as_secs_f64().into(),
                    floor.into(),
                ],
            ))
            .await
            .map_err(PortError::new);
        let row = self.moved(row).await?;
        let mut taken = row
            .map(|row| row.try_get::<i64>("", "term"))
            .transpose()
            .map(|term| term.map(|t| Term(t as u64)))
            .map_err(PortError::new)?;
        if taken.is_none() {
            // Held: by a process of this host that is gone?
            if let Some((_, holder)) = self.leader().await {
                if holder != self.holder && Presence::gone(&holder) {
                    taken = self.take_from(&holder, floor).await?;
                    if let Some(term) = taken {
                        tracing::warn!(
                            "the leader `{holder}` is gone (its process on this host ended): \
                             taking over at once in term {}",
                            term.0
                        );
                        Presence::remove(&holder);
                    }
                }
            }
        }
        Ok(taken)
    }

    /// Takes the row from `holder`, whatever its expiry.
    async fn take_from(&self, holder: &str, floor: i64) -> Result<Option<Term>, PortError> {
        let row = self
            .db
            .db()
            .query_one(Statement::from_sql_and_values(
                DbBackend::Postgres,
                TAKE_FROM,
                [
                    self.holder.clone().into(),
                    self.ttl.as_secs_f64().into(),
                    holder.to_owned().into(),
                    floor.into(),
                ],
            ))
            .await
            .map_err(PortError::new)?;
        row.map(|row| row.try_get::<i64>("", "term"))
            .transpose()
            .map(|term| term.map(|t| Term(t as u64)))
            .map_err(PortError::new)
    }
}

/// Deletes the rows of the coordinators (but `holder`) not seen for `after`, and the presence files
/// that the gone ones among them left on this host; answers the holders whose rows went.
pub async fn forget_unseen(
    db: &DatabaseConnection,
    holder: &str,
    after: Duration,
) -> Result<Vec<String>, PortError> {
    let rows = db
        .query_all(Statement::from_sql_and_values(
            DbBackend::Postgres,
            FORGET,
            [holder.to_owned().into(), after.as_secs_f64().into()],
        ))
        .await
        .map_err(PortError::new)?;
    let forgotten = holders(&rows);
    for holder in &forgotten {
        if Presence::gone(holder) {
            Presence::remove(holder);
        }
    }
    if !forgotten.is_empty() {
        tracing::debug!(?forgotten, "forgot the coordinators not seen for {after:?}");
    }
    Ok(forgotten)
}

/// The standbys seen within three TTLs.
async fn standbys(db: &DatabaseConnection, holder: &str, ttl: Duration) -> Vec<String> {
    let rows = db
        .query_all(Statement::from_sql_and_values(
            DbBackend::Postgres,
            STANDBYS,
            [holder.to_owned().into(), (ttl * 3).as_secs_f64().into()],
        ))
        .await
        .unwrap_or_default();
    holders(&rows)
}

/// The `holder` column of `rows`.
fn holders(rows: &[sea_orm::QueryResult]) -> Vec<String> {
    rows.iter()
        .filter_map(|row| row.try_get::<String>("", "holder").ok())
        .collect()
}

/// Renews `term` every third of the TTL until stopped or lost, moving `until` on after each success,
/// and keeps the roster up to date.
#[allow(clippy::too_many_arguments)]
async fn renew(
    primary: Primary,
    holder: String,
    term: Term,
    ttl: Duration,
    window: Duration,
    until: watch::Sender<Instant>,
    stop: CancellationToken,
    roster: Arc<std::sync::RwLock<Option<Roster>>>,
) {
    let every = ttl / 3;
    let forget_after = ttl * FORGET_AFTER_TTLS;
    let mut forgot = Instant::now();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let started = Instant::now();
        let db = primary.db();
        let renewed = db
            .query_one(Statement::from_sql_and_values(
                DbBackend::Postgres,
                RENEW,
                [
                    (term.0 as i64).into(),
                    holder.clone().into(),
                    ttl.as_secs_f64().into(),
                ],
            ))
            .await;
        match renewed {
            Ok(Some(_)) => {
                let _ = until.send(started + window);
                let _ = PgLeadership::seen(&db, &holder).await;
                if forgot.elapsed() >= forget_after {
                    forgot = Instant::now();
                    if let Err(e) = forget_unseen(&db, &holder, forget_after).await {
                        tracing::debug!("forgetting the coordinators long unseen: {e}");
                    }
                }
                let standbys = standbys(&db, &holder, ttl).await;
                if let Ok(mut roster) = roster.write() {
                    *roster = Some(Roster {
                        holder: holder.clone(),
                        term,
                        standbys,
                    });
                }
            }
            Ok(None) => {
                tracing::warn!("leadership of term {} was taken over", term.0);
                let _ = until.send(Instant::now());
                return;
            }
            Err(e) => {
                tracing::warn!("renewing the leadership of term {}: {e}", term.0);
                primary.recheck().await;
            }
        }
        if *until.borrow() <= Instant::now() {
            return;
        }
    }
}

#[async_trait]
impl Leadership for PgLeadership {
    async fn acquire(&self) -> Result<Term, PortError> {
        let mut last_seen: Option<Instant> = None;
        let mut warned: Option<Instant> = None;
        loop {
            if last_seen.is_none_or(|at| at.elapsed() >= self.ttl / 3) {
                let seen = PgLeadership::seen(&self.db.db(), &self.holder).await;
                self.moved(seen).await?;
                last_seen = Some(Instant::now());
            }
            let started = Instant::now();
            if !self.clock_fits(&mut warned).await? {
                tokio::time::sleep(self.poll.max(Duration::from_secs(1))).await;
                continue;
            }
            if let Some(term) = self.take().await? {
                let standbys = standbys(&self.db.db(), &self.holder, self.ttl).await;
                if let Ok(mut roster) = self.roster.write() {
                    *roster = Some(Roster {
                        holder: self.holder.clone(),
                        term,
                        standbys,
                    });
                }
                let (tx, until) = watch::channel(started + self.window());
                let stop = CancellationToken::new();
                tokio::spawn(renew(
                    self.db.clone(),
                    self.holder.clone(),
                    term,
                    self.ttl,
                    self.window(),
                    tx,
                    stop.clone(),
                    self.roster.clone(),
                ));
                *self.lead.lock().await = Some(Lead { term, until, stop });
                return Ok(term);
            }
            tokio::time::sleep(self.poll).await;
        }
    }

    async fn lost(&self, term: Term) {
        let until = match self.lead.lock().await.as_ref() {
            Some(lead) if lead.term == term => lead.until.clone(),
            _ => return,
        };
        let mut until = until;
        loop {
            let deadline = *until.borrow_and_update();
            if deadline <= Instant::now() {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => {}
                changed = until.changed() => if changed.is_err() {
                    // The renewer stopped: the window last set is final.
                    let last = *until.borrow();
                    tokio::time::sleep_until(last).await;
                    return;
                }
            }
        }
    }

    async fn release(&self, term: Term) {
        if let Some(lead) = self.lead.lock().await.take() {
            lead.stop.cancel();
        }
        if let Ok(mut roster) = self.roster.write() {
            *roster = None;
        }
        let released = self
            .db
            .db()
            .execute(Statement::from_sql_and_values(
                DbBackend::Postgres,
                RELEASE,
                [(term.0 as i64).into(), self.holder.clone().into()],
            ))
            .await;
        if let Err(e) = released {
            tracing::warn!("handing the leadership of term {} on: {e}", term.0);
        }
    }

    fn refusal(&self) -> Option<String> {
        self.refusal.read().ok().and_then(|r| r.clone())
    }

    fn roster(&self) -> Option<Roster> {
        self.roster.read().ok()?.clone()
    }

    async fn leader(&self) -> Option<(Term, String)> {
        let row = self
            .db
            .db()
            .query_one(Statement::from_string(DbBackend::Postgres, CURRENT))
            .await
            .ok()??;
        let term: i64 = row.try_get("", "term").ok()?;
        let holder: String = row.try_get("", "holder").ok()?;
        Some((Term(term as u64), holder))
    }
}
