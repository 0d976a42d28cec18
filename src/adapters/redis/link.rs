//! How the store reaches Redis: one server through the connection manager, or the master that the
//! Sentinels name, asked again after a lost connection or a master turned replica.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::sentinel::{SentinelClient, SentinelServerType};
use redis::{AsyncConnectionConfig, Cmd, ErrorKind, Pipeline, RedisFuture, ServerErrorKind, Value};

use super::{RedisError, RedisLeases};
use crate::telemetry::redact_url;

/// How long one command may wait for its answer before the call fails (the manager reconnects behind it).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long opening a connection may take.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);

/// How long asking the Sentinels for the master and connecting to it may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How the store reaches Redis: one server, reconnected by the connection manager, or the master that
/// the Sentinels name.
#[derive(Clone)]
pub(super) enum Link {
    Direct(ConnectionManager),
    Sentinel(Arc<SentinelLink>),
}

/// The master that the Sentinels name, and the connection to it in use.
pub(super) struct SentinelLink {
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
impl RedisLeases {
    /// Connects to `url` (waiting for the first connection) and uses the keys under `<key_prefix>:`. The
    /// connection manager reconnects by itself afterwards; each command waits at most a few seconds.
    pub async fn connect(url: &str, key_prefix: &str) -> Result<RedisLeases, RedisError> {
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
        Ok(RedisLeases::over(Link::Direct(conn), server, key_prefix))
    }

    /// Connects to the master that the Sentinels at `sentinels` (`host:port` or `redis://` URLs) name
    /// `master` (waiting for the first connection), and uses the keys under `<key_prefix>:`. After a lost
    /// connection, the next command asks the Sentinels again, so that a failover moves the store to
    /// the promoted replica; each command waits at most a few seconds.
    pub async fn connect_sentinel(
        sentinels: &[String],
        master: &str,
        key_prefix: &str,
    ) -> Result<RedisLeases, RedisError> {
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
        Ok(RedisLeases::over(Link::Sentinel(link), server, key_prefix))
    }

    fn over(conn: Link, server: String, key_prefix: &str) -> RedisLeases {
        RedisLeases {
            conn,
            prefix: key_prefix.to_owned(),
            server,
            term: Arc::new(AtomicU64::new(0)),
            seen: Arc::new(AtomicU64::new(0)),
        }
    }
}
