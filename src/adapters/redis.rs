//! The lease store: Redis is the source of truth for who holds a GPU.
//!
//! This module owns the translation between the core's [`Lease`]s and [`LeaseOp`]s and Redis keys. Every
//! write is a Lua script, so that the checks (capacity, fence, owner) and the write are one atomic step on
//! the server: two coordinators, or a coordinator and its own stale retry, can never both hold a place
//! that only fits one. It decides nothing: when a lease is written, extended or dropped comes from the
//! core through the driver; a refusal goes back to the core (`Input::LeaseRefused`) as it is.
//!
//! ## Keys, under `<key_prefix>:`
//!
//! | key | type | TTL | holds |
//! |---|---|---|---|
//! | `lease:<request_id>` | hash | relative (`PEXPIRE`, `expires_at` less this coordinator's now) | `request_id`, `service_id`, `gpu`, `fence`, `vram_mb`, `capacity_mb`, `expires_at` |
//! | `gpu:<gpu>` | hash | none | `request_id -> vram_mb` of the leases on that GPU |
//! | `gpus` | set | none | the GPU ids that have a `gpu:` hash, so that [`LeaseStore::leases`] needs no `SCAN` |
//! | `fence` | string | none | the highest fence ever written; only raised |
//! | `epoch` | string | none | set once ([`LeaseStore::ensure_epoch`]); missing later means Redis lost its data |
//! | `writes` | string | none | counts the writes of the scripts; below the count a write was answered with, Redis lost writes it had acknowledged |
//!
//! A lease ends by itself when its key expires: Redis drops it at `expires_at`, whatever happens to the
//! coordinator. The TTL is written relative (`PEXPIRE`) from the coordinator's clock, which is the one
//! `expires_at` was counted on: an absolute `PEXPIREAT` would be read on Redis's clock, and a Redis
//! whose clock is behind would keep a lease past its end (ahead: drop it early). A `gpu:` member whose lease key is gone (or now names another GPU) counts for nothing and
//! is removed by the next script that looks at that GPU, so an expired lease frees its capacity at once.
//!
//! The scripts name keys they compute from the prefix, so the store needs a standalone Redis (or a
//! cluster-free setup); fences and milliseconds are compared as Lua numbers, exact below 2^53.
//!
//! ## Lost writes
//!
//! A Redis can come back without writes it acknowledged: Sentinel promotes a replica that had not yet
//! received the master's last writes (replication is asynchronous), or a Redis restarts from a snapshot
//! older than its last writes. The `epoch` marker catches only a Redis that lost everything. Every
//! script that writes counts its write in `writes`, and the store remembers the highest count it was
//! answered with; a replica holds a prefix of its master's writes, so a count below that one means
//! writes were lost. Every write checks it first: a store that is behind writes nothing and answers
//! [`LeaseOutcome::Behind`], until [`LeaseStore::recover`] raises the term, the fence and the count
//! again (the driver then writes the leases back, before anything new).
//!
//! ## Sentinel
//!
//! With [`LeaseStore::connect_sentinel`] the store asks the Sentinels which server is the master, and
//! asks them again after every lost connection or `READONLY` answer (a master that was turned into a
//! replica), so that after a failover its commands go to the promoted replica.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gpu_coordinator_core::{Fence, Lease, LeaseOp, Millis};
use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::sentinel::{SentinelClient, SentinelServerType};
use redis::{AsyncConnectionConfig, Cmd, ErrorKind, Pipeline, RedisFuture, ServerErrorKind, Value};

use crate::ports::{Deposed, Leases, PortError, Term};
pub use crate::ports::{LeaseOutcome, Refused};
use crate::telemetry::redact_url;
use redis::Script;

/// The milliseconds from now (this coordinator's clock) to `expires_at`, at least 1: a lease already
/// past its end is dropped at once.
fn ttl_ms(expires_at: Millis) -> u64 {
    expires_at.saturating_sub(crate::clock::now_ms()).max(1)
}

/// How long one command may wait for its answer before the call fails (the manager reconnects behind it).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long opening a connection may take.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);

/// How long asking the Sentinels for the master and connecting to it may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

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
static CLAIM_TERM: LazyLock<Script> = LazyLock::new(|| {
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
static RECOVER: LazyLock<Script> = LazyLock::new(|| {
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
static EPOCH: LazyLock<Script> = LazyLock::new(|| {
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
static LEASES: LazyLock<Script> = LazyLock::new(|| {
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

/// What went wrong talking to Redis. Each message names the server (URL without password) and the
/// operation; the cause is the error's `source`.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    /// The URL does not parse, or the first connection could not be opened.
    #[error("cannot connect to Redis at {server}")]
    Connect {
        server: String,
        #[source]
        source: redis::RedisError,
    },
    /// A command or script failed: connection lost, no answer within the response timeout, or an error
    /// reply.
    #[error("Redis at {server}: {op} failed")]
    Command {
        server: String,
        op: &'static str,
        #[source]
        source: redis::RedisError,
    },
    /// A write of a term that is no longer the leader's: nothing was written.
    #[error("Redis at {server} refused a write: {deposed}")]
    Deposed {
        server: String,
        #[source]
        deposed: Deposed,
    },
    /// The server lacks writes it acknowledged before (see "Lost writes" in the module's documentation):
    /// nothing was written; [`LeaseStore::recover`] and the leases written back come first.
    #[error(
        "Redis at {server} lacks lease writes it acknowledged (a failover to a replica that was \
         behind, or a restart from an old snapshot); the leases must be written back first"
    )]
    Behind { server: String },
    /// The server answered something this store never writes (a key changed by hand, a foreign key under
    /// the prefix).
    #[error("Redis at {server}: {op} got an unexpected answer: {detail}")]
    Unexpected {
        server: String,
        op: &'static str,
        detail: String,
    },
}

/// The leases of one deployment (one key prefix) in one Redis: the [`Leases`] port.
#[derive(Clone)]
pub struct LeaseStore {
    conn: Link,
    prefix: String,
    /// The URL without password, or the master's name and its Sentinels, for messages.
    server: String,
    /// The leadership term this store writes under (0: unfenced, for tools and tests); every write is
    /// refused once a newer term was claimed.
    term: Arc<AtomicU64>,
    /// The highest write count an answer carried (see "Lost writes").
    seen: Arc<AtomicU64>,
}

/// How the store reaches Redis: one server, reconnected by the connection manager, or the master that
/// the Sentinels name.
#[derive(Clone)]
enum Link {
    Direct(ConnectionManager),
    Sentinel(Arc<SentinelLink>),
}

/// The master that the Sentinels name, and the connection to it in use.
struct SentinelLink {
    state: tokio::sync::Mutex<SentinelState>,
    config: AsyncConnectionConfig,
}

struct SentinelState {
    client: SentinelClient,
    /// The connection in use, numbered (none: the next command asks the Sentinels).
    current: Option<(u64, MultiplexedConnection)>,
    /// How many connections were made, to number the next one.
    made: u64,
}

impl SentinelLink {
    /// The connection in use, or a new one to the master the Sentinels name now.
    async fn connection(&self) -> redis::RedisResult<(u64, MultiplexedConnection)> {
        let mut state = self.state.lock().await;
        if let Some(current) = &state.current {
            return Ok(current.clone());
        }
        let lookup = state.client.get_async_connection_with_config(&self.config);
        let conn = tokio::time::timeout(LOOKUP_TIMEOUT, lookup)
            .await
            .map_err(|_| {
                redis::RedisError::from((
                    ErrorKind::Io,
                    "no answer from the Sentinels or the master they name within 10 s",
                ))
            })??;
        state.made += 1;
        let current = (state.made, conn);
        state.current = Some(current.clone());
        Ok(current)
    }

    /// After a command on connection `number` failed with `error`: when the connection is lost or the
    /// server is no longer the master, forgets it, so that the next command asks the Sentinels again.
    async fn failed(&self, number: u64, error: &redis::RedisError) {
        let moved = error.is_io_error()
            || error.is_connection_dropped()
            || error.is_connection_refusal()
            || error.is_timeout()
            || error.is_unrecoverable_error()
            || error.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly);
        let mut state = self.state.lock().await;
        if moved && state.current.as_ref().is_some_and(|(n, _)| *n == number) {
            tracing::warn!("lost the Redis master ({error}); asking the Sentinels again");
            state.current = None;
        }
    }
}

/// The error in an answer, if it is one.
fn answer_error(value: &Value) -> Option<redis::RedisError> {
    match value {
        Value::ServerError(e) => Some(e.clone().into()),
        _ => None,
    }
}

impl ConnectionLike for Link {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Link::Direct(conn) => conn.req_packed_command(cmd),
            Link::Sentinel(link) => Box::pin(async move {
                let (number, mut conn) = link.connection().await?;
                let answer = conn.req_packed_command(cmd).await;
                let error = match &answer {
                    Ok(value) => answer_error(value),
                    Err(e) => Some(e.clone()),
                };
                if let Some(error) = error {
                    link.failed(number, &error).await;
                }
                answer
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Link::Direct(conn) => conn.req_packed_commands(pipeline, offset, count),
            Link::Sentinel(link) => Box::pin(async move {
                let (number, mut conn) = link.connection().await?;
                let answers = conn.req_packed_commands(pipeline, offset, count).await;
                let error = match &answers {
                    Ok(values) => values.iter().find_map(answer_error),
                    Err(e) => Some(e.clone()),
                };
                if let Some(error) = error {
                    link.failed(number, &error).await;
                }
                answers
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Link::Direct(conn) => conn.get_db(),
            Link::Sentinel(_) => 0,
        }
    }
}

impl std::fmt::Debug for LeaseStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseStore")
            .field("server", &self.server)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl LeaseStore {
    /// Connects to `url` (waiting for the first connection) and uses the keys under `<key_prefix>:`. The
    /// connection manager reconnects by itself afterwards; each command waits at most a few seconds.
    pub async fn connect(url: &str, key_prefix: &str) -> Result<LeaseStore, RedisError> {
        let server = redact_url(url);
        let fail = |source| RedisError::Connect {
            server: server.clone(),
            source,
        };
        let client = redis::Client::open(url).map_err(fail)?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_connection_timeout(Some(CONNECTION_TIMEOUT));
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(fail)?;
        Ok(LeaseStore::over(Link::Direct(conn), server, key_prefix))
    }

    /// Connects to the master that the Sentinels at `sentinels` (`host:port` or `redis://` URLs) name
    /// `master` (waiting for the first connection), and uses the keys under `<key_prefix>:`. After a lost
    /// connection, the next command asks the Sentinels again, so that a failover moves the store to
    /// the promoted replica; each command waits at most a few seconds.
    pub async fn connect_sentinel(
        sentinels: &[String],
        master: &str,
        key_prefix: &str,
    ) -> Result<LeaseStore, RedisError> {
        let urls: Vec<String> = sentinels
            .iter()
            .map(|entry| crate::urls::sentinel_url(entry).unwrap_or_else(|_| entry.clone()))
            .collect();
        let server = format!(
            "master `{master}` of the Sentinels {}",
            urls.iter()
                .map(|url| redact_url(url))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let fail = |source| RedisError::Connect {
            server: server.clone(),
            source,
        };
        let client = SentinelClient::build(
            urls.iter().map(String::as_str).collect(),
            master.to_owned(),
            None,
            SentinelServerType::Master,
        )
        .map_err(fail)?;
        let link = Arc::new(SentinelLink {
            state: tokio::sync::Mutex::new(SentinelState {
                client,
                current: None,
                made: 0,
            }),
            config: AsyncConnectionConfig::new()
                .set_response_timeout(Some(RESPONSE_TIMEOUT))
                .set_connection_timeout(Some(CONNECTION_TIMEOUT)),
        });
        link.connection().await.map_err(fail)?;
        Ok(LeaseStore::over(Link::Sentinel(link), server, key_prefix))
    }

    fn over(conn: Link, server: String, key_prefix: &str) -> LeaseStore {
        LeaseStore {
            conn,
            prefix: key_prefix.to_owned(),
            server,
            term: Arc::new(AtomicU64::new(0)),
            seen: Arc::new(AtomicU64::new(0)),
        }
    }

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

    /// The script call (`EVAL`) that carries out `op`.
    fn script_call(&self, op: &LeaseOp) -> redis::Cmd {
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
    fn outcome(&self, op: &LeaseOp, answer: redis::Value) -> Result<LeaseOutcome, RedisError> {
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
    /// writes it acknowledged to this store (see "Lost writes"): [`LeaseStore::recover`], then the
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

    /// Makes a store that lost writes accept writes again, once [`LeaseStore::ensure_epoch`] or a write
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
    fn saw(&self, count: u64) {
        self.seen.fetch_max(count, Ordering::SeqCst);
    }

    fn behind(&self) -> RedisError {
        RedisError::Behind {
            server: self.server.clone(),
        }
    }

    /// Writes back leases after Redis lost them, with the checks of [`LeaseStore::acquire`] except the
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
    fn key(&self, kind: &str, name: &str) -> String {
        format!("{}:{kind}{name}", self.prefix)
    }

    fn number(&self, op: &'static str, field: &str, text: &str) -> Result<u64, RedisError> {
        text.parse()
            .map_err(|_| self.unexpected(op, format!("{field} is {text:?}, not a number")))
    }

    fn command(&self, op: &'static str, source: redis::RedisError) -> RedisError {
        RedisError::Command {
            server: self.server.clone(),
            op,
            source,
        }
    }

    fn deposed(&self, leader: u64) -> RedisError {
        let term = self.term.load(Ordering::SeqCst);
        RedisError::Deposed {
            server: self.server.clone(),
            deposed: Deposed {
                term,
                detail: if leader > 0 {
                    format!("the lease store is in term {leader}")
                } else {
                    "a newer term was claimed in the lease store".to_owned()
                },
            },
        }
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

    /// The newest term claimed ([`LeaseStore::claim_term`]; 0 when none).
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

    fn unexpected(&self, op: &'static str, detail: String) -> RedisError {
        RedisError::Unexpected {
            server: self.server.clone(),
            op,
            detail,
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

/// What an operation is called in errors.
fn op_name(op: &LeaseOp) -> &'static str {
    match op {
        LeaseOp::Acquire(_) => "acquiring a lease",
        LeaseOp::Restore(_) => "rewriting a lease",
        LeaseOp::Renew { .. } => "renew",
        LeaseOp::Release { .. } => "release",
    }
}

#[async_trait::async_trait]
impl Leases for LeaseStore {
    async fn apply(&self, op: &LeaseOp) -> Result<LeaseOutcome, PortError> {
        LeaseStore::apply(self, op).await.map_err(PortError::new)
    }

    async fn apply_all(&self, ops: &[LeaseOp]) -> Result<Vec<LeaseOutcome>, PortError> {
        LeaseStore::apply_all(self, ops)
            .await
            .map_err(PortError::new)
    }

    async fn leases(&self) -> Result<Vec<Lease>, PortError> {
        LeaseStore::leases(self).await.map_err(PortError::new)
    }

    async fn max_fence(&self) -> Result<Fence, PortError> {
        LeaseStore::max_fence(self).await.map_err(PortError::new)
    }

    async fn ensure_epoch(&self) -> Result<bool, PortError> {
        LeaseStore::ensure_epoch(self).await.map_err(PortError::new)
    }

    async fn recover(&self, fence: Fence) -> Result<(), PortError> {
        LeaseStore::recover(self, fence)
            .await
            .map_err(PortError::new)
    }

    async fn ping(&self) -> Result<(), PortError> {
        LeaseStore::ping(self).await.map_err(PortError::new)
    }

    async fn claim_term(&self, term: Term) -> Result<(), PortError> {
        LeaseStore::claim_term(self, term.0)
            .await
            .map_err(PortError::new)
    }

    async fn term(&self) -> Result<Term, PortError> {
        LeaseStore::claimed_term(self)
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
