//! The Lua scripts that write the leases, each check and its write one atomic step on the server; the
//! call that carries out each of the core's lease operations, and what its answer means.

use std::sync::atomic::Ordering;
use std::sync::LazyLock;

use gpu_coordinator_core::{Fence, Lease, LeaseOp, Millis};
use redis::Script;

use super::{LeaseOutcome, RedisError, RedisLeases, Refused};

/// The milliseconds from now (this coordinator's clock) to `expires_at`, at least 1: a lease already
/// past its end is dropped at once.
fn ttl_ms(expires_at: Millis) -> u64 {
    expires_at.saturating_sub(crate::clock::now_ms()).max(1)
}
/// Writes a lease if it fits. `KEYS`: the lease, its GPU's hash, `fence`, `gpus`. `ARGV`: the lease key
/// prefix, request id, service id, GPU, fence, VRAM, capacity, expiry, then `acquire` (the fence must be
/// above the stored one) or `rewrite` (any fence: a lease the store lost is written back under its own
/// fence even when newer ones were issued since; the term, the `held` and the capacity checks keep out
/// an old leader and a second holder), the term, the milliseconds left until the expiry, and the
/// highest write count seen (see "Lost writes"); `KEYS[5]`, `KEYS[6]`: `term`, `writes`. Answers
/// `{"ok", count}` (written), `{"ok"}` (held already), `{"held", fence}`, `{"stale", stored}`,
/// `{"capacity", used_mb}`, `{"deposed", term}` or `{"behind", count}`.
const ACQUIRE: &str = r#"
local mine = tonumber(ARGV[10])
local leader = tonumber(redis.call('GET', KEYS[5]) or '0')
if mine > 0 and mine < leader then return {'deposed', tostring(leader)} end
local writes = tonumber(redis.call('GET', KEYS[6]) or '0')
if writes < tonumber(ARGV[12]) then return {'behind', tostring(writes)} end
local held = redis.call('HGET', KEYS[1], 'fence')
if held then
  if held == ARGV[5] then return {'ok'} end
  return {'held', held}
end
local fence = tonumber(ARGV[5])
local stored = tonumber(redis.call('GET', KEYS[3]) or '0')
if ARGV[9] ~= 'rewrite' and fence <= stored then
  return {'stale', tostring(redis.call('GET', KEYS[3]) or '0')}
end
local used = 0
local members = redis.call('HGETALL', KEYS[2])
for i = 1, #members, 2 do
  if redis.call('HGET', ARGV[1] .. members[i], 'gpu') == ARGV[4] then
    used = used + tonumber(members[i + 1])
  else
    redis.call('HDEL', KEYS[2], members[i])
  end
end
if used + tonumber(ARGV[6]) > tonumber(ARGV[7]) then
  return {'capacity', tostring(used)}
end
redis.call('HSET', KEYS[1], 'request_id', ARGV[2], 'service_id', ARGV[3], 'gpu', ARGV[4], 'fence', ARGV[5],
  'vram_mb', ARGV[6], 'capacity_mb', ARGV[7], 'expires_at', ARGV[8])
redis.call('PEXPIRE', KEYS[1], ARGV[11])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[6])
redis.call('SADD', KEYS[4], ARGV[4])
if fence > stored then redis.call('SET', KEYS[3], ARGV[5]) end
return {'ok', tostring(redis.call('INCR', KEYS[6]))}
"#;

/// Extends a lease whose fence matches. `KEYS`: the lease, `term`, `writes`. `ARGV`: fence, new expiry,
/// term, the milliseconds left until that expiry, the highest write count seen. Answers the write
/// count (done), 0 (not held), -1 (deposed) or -2 (behind).
const RENEW: &str = r#"
local mine = tonumber(ARGV[3])
local leader = tonumber(redis.call('GET', KEYS[2]) or '0')
if mine > 0 and mine < leader then return -1 end
if tonumber(redis.call('GET', KEYS[3]) or '0') < tonumber(ARGV[5]) then return -2 end
if redis.call('HGET', KEYS[1], 'fence') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'expires_at', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return redis.call('INCR', KEYS[3])
"#;

/// Deletes a lease whose fence matches, and its place on its GPU. `KEYS`: the lease, `term`, `writes`.
/// `ARGV`: fence, the GPU key prefix, request id, term, the highest write count seen. Answers as
/// [`RENEW`].
const RELEASE: &str = r#"
local mine = tonumber(ARGV[4])
local leader = tonumber(redis.call('GET', KEYS[2]) or '0')
if mine > 0 and mine < leader then return -1 end
if tonumber(redis.call('GET', KEYS[3]) or '0') < tonumber(ARGV[5]) then return -2 end
local lease = redis.call('HMGET', KEYS[1], 'fence', 'gpu')
if lease[1] ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HDEL', ARGV[2] .. lease[2], ARGV[3])
return redis.call('INCR', KEYS[3])
"#;

/// Raises the stored leadership term to `ARGV[1]` unless a newer one is stored. `KEYS`: `term`,
/// `writes`. Answers the term stored after and the write count.
pub(super) static CLAIM_TERM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local mine = tonumber(ARGV[1])
local leader = tonumber(redis.call('GET', KEYS[1]) or '0')
local writes = redis.call('INCR', KEYS[2])
if mine > leader then
  redis.call('SET', KEYS[1], ARGV[1])
  return {mine, writes}
end
return {leader, writes}
"#,
    )
});

/// Makes a store that lost writes accept writes again: raises `term` to `ARGV[1]` (unless a newer one
/// is stored: then answers `{"deposed", term}` and changes nothing), `fence` to `ARGV[2]`, `writes`
/// above both the stored count and `ARGV[3]` (the highest count seen), and sets `epoch` (`ARGV[4]`) if
/// it is missing. `KEYS`: `term`, `fence`, `writes`, `epoch`. Answers `{"ok", count}`.
pub(super) static RECOVER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local mine = tonumber(ARGV[1])
local leader = tonumber(redis.call('GET', KEYS[1]) or '0')
if mine > 0 and mine < leader then return {'deposed', tostring(leader)} end
if mine > leader then redis.call('SET', KEYS[1], ARGV[1]) end
if tonumber(ARGV[2]) > tonumber(redis.call('GET', KEYS[2]) or '0') then
  redis.call('SET', KEYS[2], ARGV[2])
end
local writes = math.max(tonumber(redis.call('GET', KEYS[3]) or '0'), tonumber(ARGV[3])) + 1
redis.call('SET', KEYS[3], tostring(writes))
redis.call('SET', KEYS[4], ARGV[4], 'NX')
return {'ok', tostring(writes)}
"#,
    )
});

/// Sets `epoch` (`KEYS[1]`) to `ARGV[1]` if it is missing. Answers 1 (it was missing) or 0, and the
/// write count (`KEYS[2]`).
pub(super) static EPOCH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local set = redis.call('SET', KEYS[1], ARGV[1], 'NX')
local writes = tonumber(redis.call('GET', KEYS[2]) or '0')
if set then return {1, writes} end
return {0, writes}
"#,
    )
});

/// Every live lease, read in one step. `KEYS`: `gpus`. `ARGV`: the GPU key prefix, the lease key prefix.
/// Answers a list of `{request_id, service_id, gpu, fence, vram_mb, capacity_mb, expires_at}`.
pub(super) static LEASES: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local out = {}
for _, gpu in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  for _, id in ipairs(redis.call('HKEYS', ARGV[1] .. gpu)) do
    local l = redis.call('HMGET', ARGV[2] .. id, 'service_id', 'gpu', 'fence', 'vram_mb', 'capacity_mb',
      'expires_at')
    if l[2] == gpu then
      table.insert(out, {id, l[1] or '', l[2], l[3] or '', l[4] or '', l[5] or '0', l[6] or ''})
    end
  end
end
return out
"#,
    )
});
impl RedisLeases {
    /// The script call (`EVAL`) that carries out `op`.
    pub(super) fn script_call(&self, op: &LeaseOp) -> redis::Cmd {
        let term = self.term.load(Ordering::SeqCst);
        let seen = self.seen.load(Ordering::SeqCst);
        let mut call = redis::cmd("EVAL");
        match op {
            LeaseOp::Acquire(lease) | LeaseOp::Restore(lease) => {
                let mode = if matches!(op, LeaseOp::Acquire(_)) {
                    "acquire"
                } else {
                    "rewrite"
                };
                call.arg(ACQUIRE)
                    .arg(6)
                    .arg(self.key("lease:", &lease.request_id))
                    .arg(self.key("gpu:", &lease.gpu))
                    .arg(self.key("fence", ""))
                    .arg(self.key("gpus", ""))
                    .arg(self.key("term", ""))
                    .arg(self.key("writes", ""))
                    .arg(self.key("lease:", ""))
                    .arg(lease.request_id.as_str())
                    .arg(lease.service_id.as_str())
                    .arg(lease.gpu.as_str())
                    .arg(lease.fence.0)
                    .arg(lease.vram_mb)
                    .arg(lease.capacity_mb)
                    .arg(lease.expires_at)
                    .arg(mode)
                    .arg(term)
                    .arg(ttl_ms(lease.expires_at))
                    .arg(seen);
            }
            LeaseOp::Renew {
                request_id,
                fence,
                expires_at,
                ..
            } => {
                call.arg(RENEW)
                    .arg(3)
                    .arg(self.key("lease:", request_id))
                    .arg(self.key("term", ""))
                    .arg(self.key("writes", ""))
                    .arg(fence.0)
                    .arg(*expires_at)
                    .arg(term)
                    .arg(ttl_ms(*expires_at))
                    .arg(seen);
            }
            LeaseOp::Release {
                request_id, fence, ..
            } => {
                call.arg(RELEASE)
                    .arg(3)
                    .arg(self.key("lease:", request_id))
                    .arg(self.key("term", ""))
                    .arg(self.key("writes", ""))
                    .arg(fence.0)
                    .arg(self.key("gpu:", ""))
                    .arg(request_id.as_str())
                    .arg(term)
                    .arg(seen);
            }
        }
        call
    }

    /// What the script's `answer` to `op` means.
    pub(super) fn outcome(
        &self,
        op: &LeaseOp,
        answer: redis::Value,
    ) -> Result<LeaseOutcome, RedisError> {
        let name = op_name(op);
        match op {
            LeaseOp::Acquire(lease) | LeaseOp::Restore(lease) => {
                let answer: Vec<String> = redis::from_redis_value(answer)
                    .map_err(|e| self.unexpected(name, e.to_string()))?;
                if answer.first().is_some_and(|word| word == "behind") {
                    return Ok(LeaseOutcome::Behind);
                }
                if let (Some("ok"), Some(count)) =
                    (answer.first().map(String::as_str), answer.get(1))
                {
                    self.saw(self.number(name, "writes", count)?);
                }
                Ok(self.written(lease, name, answer)?.into())
            }
            LeaseOp::Renew { .. } | LeaseOp::Release { .. } => {
                let done: i64 = redis::from_redis_value(answer)
                    .map_err(|e| self.unexpected(name, e.to_string()))?;
                match done {
                    -2 => Ok(LeaseOutcome::Behind),
                    ..0 => Err(self.deposed(0)),
                    0 => Ok(LeaseOutcome::NotHeld),
                    count => {
                        self.saw(count.unsigned_abs());
                        Ok(LeaseOutcome::Done)
                    }
                }
            }
        }
    }

    /// What the lease script answered to writing `lease`.
    fn written(
        &self,
        lease: &Lease,
        op: &'static str,
        answer: Vec<String>,
    ) -> Result<Result<(), Refused>, RedisError> {
        let value = |field| {
            answer
                .get(1)
                .map(|text| self.number(op, field, text))
                .unwrap_or_else(|| Err(self.unexpected(op, format!("no {field} in {answer:?}"))))
        };
        Ok(match answer.first().map(String::as_str) {
            Some("ok") => Ok(()),
            Some("deposed") => return Err(self.deposed(value("term")?)),
            Some("held") => Err(Refused::Held {
                request_id: lease.request_id.clone(),
                fence: Fence(value("fence")?),
            }),
            Some("stale") => Err(Refused::StaleFence {
                fence: lease.fence,
                stored: Fence(value("fence")?),
            }),
            Some("capacity") => Err(Refused::Capacity {
                gpu: lease.gpu.clone(),
                used_mb: value("used_mb")?,
                vram_mb: lease.vram_mb,
                capacity_mb: lease.capacity_mb,
            }),
            _ => return Err(self.unexpected(op, format!("{answer:?}"))),
        })
    }
}

/// What an operation is called in errors.
pub(super) fn op_name(op: &LeaseOp) -> &'static str {
    match op {
        LeaseOp::Acquire(_) => "acquiring a lease",
        LeaseOp::Restore(_) => "rewriting a lease",
        LeaseOp::Renew { .. } => "renew",
        LeaseOp::Release { .. } => "release",
    }
}
