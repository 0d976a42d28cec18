//! The lease operations of [`RedisLeases`], and the [`Leases`] port on them.

use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use gpu_coordinator_core::{Fence, Lease, LeaseOp, Millis};

use super::scripts::{op_name, CLAIM_TERM, EPOCH, LEASES, RECOVER};
use super::{LeaseOutcome, RedisError, RedisLeases, Refused};
use crate::ports::{Leases, PortError, Term};

impl RedisLeases {
    /// Writes `lease` if the fence is newer than every fence stored, no live lease of the request exists
    /// under another fence, and the GPU's live leases leave room for it; raises the stored fence. Writing
    /// the same lease again (same request and fence) is accepted and changes nothing.
    pub async fn acquire(&self, lease: &Lease) -> Result<Result<(), Refused>, RedisError> {
        self.write(LeaseOp::Acquire(lease.clone())).await
    }

    /// Extends the lease of `request_id` to `expires_at` if it is held under `fence`. `false`: no such
    /// lease (expired, released, or another fence).
    pub async fn renew(
        &self,
        request_id: &str,
        fence: Fence,
        expires_at: Millis,
    ) -> Result<bool, RedisError> {
        let op = LeaseOp::Renew {
            request_id: request_id.into(),
            gpu: Default::default(),
            fence,
            expires_at,
        };
        self.done(&op).await
    }

    /// Deletes the lease of `request_id` if it is held under `fence`, freeing its place on its GPU.
    /// `false`: no such lease.
    pub async fn release(&self, request_id: &str, fence: Fence) -> Result<bool, RedisError> {
        let op = LeaseOp::Release {
            request_id: request_id.into(),
            gpu: Default::default(),
            fence,
        };
        self.done(&op).await
    }

    /// Whether a renewal or release was carried out; an error when the store is behind.
    async fn done(&self, op: &LeaseOp) -> Result<bool, RedisError> {
        match self.apply(op).await? {
            LeaseOutcome::Behind => Err(self.behind()),
            outcome => Ok(outcome == LeaseOutcome::Done),
        }
    }

    /// Carries out one of the core's lease operations.
    pub async fn apply(&self, op: &LeaseOp) -> Result<LeaseOutcome, RedisError> {
        let answer: redis::Value = self
            .script_call(op)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(|e| self.command(op_name(op), e))?;
        self.outcome(op, answer)
    }

    /// Carries out `ops` in order, sent together in one pipeline (one round trip): the outcomes in the
    /// same order. Each goes as `EVAL` with its script's text, which Redis compiles once and keeps:
    /// with `EVALSHA`, a server that forgot a script (a restart, `SCRIPT FLUSH`) would fail that one
    /// operation alone and run those after it, out of order.
    pub async fn apply_all(&self, ops: &[LeaseOp]) -> Result<Vec<LeaseOutcome>, RedisError> {
        let mut pipe = redis::pipe();
        for op in ops {
            pipe.add_command(self.script_call(op));
        }
        let answers: Vec<redis::Value> = pipe
            .query_async(&mut self.conn.clone())
            .await
            .map_err(|e| self.command("applying lease changes", e))?;
        if answers.len() != ops.len() {
            return Err(self.unexpected(
                "applying lease changes",
                format!("{} answers to {} operations", answers.len(), ops.len()),
            ));
        }
        ops.iter()
            .zip(answers)
            .map(|(op, answer)| self.outcome(op, answer))
            .collect()
    }

    /// Every live lease, read atomically, in no particular order. `capacity_mb` is the capacity the lease
    /// was written with.
    pub async fn leases(&self) -> Result<Vec<Lease>, RedisError> {
        let rows: Vec<Vec<String>> = LEASES
            .key(self.key("gpus", ""))
            .arg(self.key("gpu:", ""))
            .arg(self.key("lease:", ""))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| self.command("reading the leases", e))?;
        rows.into_iter().map(|row| self.to_lease(row)).collect()
    }

    /// The highest fence ever written (0 when none).
    pub async fn max_fence(&self) -> Result<Fence, RedisError> {
        let stored: Option<String> = redis::cmd("GET")
            .arg(self.key("fence", ""))
            .query_async(&mut self.conn.clone())
            .await
            .map_err(|e| self.command("reading the fence", e))?;
        match stored {
            None => Ok(Fence(0)),
            Some(text) => self.number("reading the fence", "fence", &text).map(Fence),
        }
    }

    /// Sets the epoch marker if it is missing. `true`: it was missing, so the store is new, or Redis
    /// restarted without its data or was flushed, and the leases it held are gone; or the store lacks
    /// writes it acknowledged to this store (see "Lost writes"): [`RedisLeases::recover`], then the
    /// leases written back.
    pub async fn ensure_epoch(&self) -> Result<bool, RedisError> {
        let seen = self.seen.load(Ordering::SeqCst);
        let (missing, writes): (u8, u64) = EPOCH
            .key(self.key("epoch", ""))
            .key(self.key("writes", ""))
            .arg(epoch_now())
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| self.command("setting the epoch", e))?;
        Ok(missing == 1 || writes < seen)
    }

    /// Makes a store that lost writes accept writes again, once [`RedisLeases::ensure_epoch`] or a write
    /// ([`LeaseOutcome::Behind`]) said so: raises the stored term to this store's (refused,
    /// [`RedisError::Deposed`], when a newer term is stored), the stored fence to `fence` (the highest
    /// fence ever issued, so that none is issued again), and the write count above every count seen,
    /// and sets the epoch marker. The leases it lost are the caller's to write back, before anything
    /// new.
    pub async fn recover(&self, fence: Fence) -> Result<(), RedisError> {
        const OP: &str = "recovering lost writes";
        let answer: Vec<String> = RECOVER
            .key(self.key("term", ""))
            .key(self.key("fence", ""))
            .key(self.key("writes", ""))
            .key(self.key("epoch", ""))
            .arg(self.term.load(Ordering::SeqCst))
            .arg(fence.0)
            .arg(self.seen.load(Ordering::SeqCst))
            .arg(epoch_now())
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| self.command(OP, e))?;
        let count = answer
            .get(1)
            .map(|text| self.number(OP, "writes", text))
            .transpose()?
            .ok_or_else(|| self.unexpected(OP, format!("{answer:?}")))?;
        match answer.first().map(String::as_str) {
            Some("ok") => {
                self.saw(count);
                Ok(())
            }
            Some("deposed") => Err(self.deposed(count)),
            _ => Err(self.unexpected(OP, format!("{answer:?}"))),
        }
    }

    /// Remembers a write count an answer carried.
    pub(super) fn saw(&self, count: u64) {
        self.seen.fetch_max(count, Ordering::SeqCst);
    }

    /// Writes back leases after Redis lost them, with the checks of [`RedisLeases::acquire`] except the
    /// fence's: a lease is written back under its own fence even when newer fences were issued since
    /// (Redis lost that one lease, not the others). No second holder can appear: a live lease of the
    /// request under another fence, or a GPU without room, refuses it, and an older term is deposed.
    /// Leases are written in fence order; the answer is in `leases`' order.
    pub async fn rewrite(&self, leases: &[Lease]) -> Result<Vec<Result<(), Refused>>, RedisError> {
        let mut order: Vec<usize> = (0..leases.len()).collect();
        order.sort_by_key(|&i| leases[i].fence);
        let mut outcomes = vec![Ok(()); leases.len()];
        for i in order {
            outcomes[i] = self.write(LeaseOp::Restore(leases[i].clone())).await?;
        }
        Ok(outcomes)
    }

    /// Checks that the server answers.
    pub async fn ping(&self) -> Result<(), RedisError> {
        let _: String = redis::cmd("PING")
            .query_async(&mut self.conn.clone())
            .await
            .map_err(|e| self.command("ping", e))?;
        Ok(())
    }

    /// The server, as messages name it: its URL without password, or the master and its Sentinels.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The key prefix, without the trailing `:`.
    pub fn key_prefix(&self) -> &str {
        &self.prefix
    }

    /// Writes a lease (`Acquire` or `Restore`): whether the store refused it.
    async fn write(&self, op: LeaseOp) -> Result<Result<(), Refused>, RedisError> {
        Ok(match self.apply(&op).await? {
            LeaseOutcome::Refused(refused) => Err(refused),
            LeaseOutcome::Behind => return Err(self.behind()),
            LeaseOutcome::Done | LeaseOutcome::NotHeld => Ok(()),
        })
    }

    fn to_lease(&self, row: Vec<String>) -> Result<Lease, RedisError> {
        const OP: &str = "reading the leases";
        let [request_id, service_id, gpu, fence, vram_mb, capacity_mb, expires_at]: [String; 7] =
            row.try_into().map_err(|row: Vec<String>| {
                self.unexpected(OP, format!("a lease of {} fields: {row:?}", row.len()))
            })?;
        Ok(Lease {
            fence: Fence(self.number(OP, "fence", &fence)?),
            vram_mb: self.number(OP, "vram_mb", &vram_mb)?,
            capacity_mb: self.number(OP, "capacity_mb", &capacity_mb)?,
            expires_at: self.number(OP, "expires_at", &expires_at)?,
            request_id: request_id.into(),
            service_id: service_id.into(),
            gpu: gpu.into(),
        })
    }

    /// `<prefix>:<kind><name>`; `kind` carries its own `:` where the key has a name part.
    pub(super) fn key(&self, kind: &str, name: &str) -> String {
        format!("{}:{kind}{name}", self.prefix)
    }

    /// Writes under leadership `term` from now on, raising the store's term to it: every write of an
    /// older term is refused from then on. Refused ([`RedisError::Deposed`]) when a newer term was
    /// claimed already.
    pub async fn claim_term(&self, term: u64) -> Result<(), RedisError> {
        self.term.store(term, Ordering::SeqCst);
        let (stored, writes): (u64, u64) = CLAIM_TERM
            .key(self.key("term", ""))
            .key(self.key("writes", ""))
            .arg(term)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| self.command("claiming the term", e))?;
        self.saw(writes);
        if stored > term {
            return Err(self.deposed(stored));
        }
        Ok(())
    }

    /// The newest term claimed ([`RedisLeases::claim_term`]; 0 when none).
    pub async fn claimed_term(&self) -> Result<u64, RedisError> {
        let stored: Option<String> = redis::cmd("GET")
            .arg(self.key("term", ""))
            .query_async(&mut self.conn.clone())
            .await
            .map_err(|e| self.command("reading the term", e))?;
        match stored {
            None => Ok(0),
            Some(text) => self.number("reading the term", "term", &text),
        }
    }
}

/// The epoch marker's value: the milliseconds since 1970 now.
fn epoch_now() -> String {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default()
        .to_string()
}

#[async_trait::async_trait]
impl Leases for RedisLeases {
    async fn apply(&self, op: &LeaseOp) -> Result<LeaseOutcome, PortError> {
        RedisLeases::apply(self, op).await.map_err(PortError::new)
    }

    async fn apply_all(&self, ops: &[LeaseOp]) -> Result<Vec<LeaseOutcome>, PortError> {
        RedisLeases::apply_all(self, ops)
            .await
            .map_err(PortError::new)
    }

    async fn leases(&self) -> Result<Vec<Lease>, PortError> {
        RedisLeases::leases(self).await.map_err(PortError::new)
    }

    async fn max_fence(&self) -> Result<Fence, PortError> {
        RedisLeases::max_fence(self).await.map_err(PortError::new)
    }

    async fn ensure_epoch(&self) -> Result<bool, PortError> {
        RedisLeases::ensure_epoch(self)
            .await
            .map_err(PortError::new)
    }

    async fn recover(&self, fence: Fence) -> Result<(), PortError> {
        RedisLeases::recover(self, fence)
            .await
            .map_err(PortError::new)
    }

    async fn ping(&self) -> Result<(), PortError> {
        RedisLeases::ping(self).await.map_err(PortError::new)
    }

    async fn claim_term(&self, term: Term) -> Result<(), PortError> {
        RedisLeases::claim_term(self, term.0)
            .await
            .map_err(PortError::new)
    }

    async fn term(&self) -> Result<Term, PortError> {
        RedisLeases::claimed_term(self)
            .await
            .map(Term)
            .map_err(PortError::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_read_as_sentences() {
        let refused = Refused::Capacity {
            gpu: "0".into(),
            used_mb: 60,
            vram_mb: 50,
            capacity_mb: 100,
        };
        assert_eq!(
            refused.to_string(),
            "GPU 0 has 60 MB of 100 MB leased; 50 MB more do not fit"
        );
    }
}
