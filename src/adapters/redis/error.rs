//! What goes wrong talking to Redis, each error naming the server and the operation.

use std::sync::atomic::Ordering;

use super::RedisLeases;
use crate::ports::Deposed;

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
    /// nothing was written; [`RedisLeases::recover`] and the leases written back come first.
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
impl RedisLeases {
    pub(super) fn behind(&self) -> RedisError {
        RedisError::Behind {
            server: self.server.clone(),
        }
    }

    pub(super) fn number(
        &self,
        op: &'static str,
        field: &str,
        text: &str,
    ) -> Result<u64, RedisError> {
        text.parse()
            .map_err(|_| self.unexpected(op, format!("{field} is {text:?}, not a number")))
    }

    pub(super) fn command(&self, op: &'static str, source: redis::RedisError) -> RedisError {
        RedisError::Command {
            server: self.server.clone(),
            op,
            source,
        }
    }

    pub(super) fn deposed(&self, leader: u64) -> RedisError {
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

    pub(super) fn unexpected(&self, op: &'static str, detail: String) -> RedisError {
        RedisError::Unexpected {
            server: self.server.clone(),
            op,
            detail,
        }
    }
}
