//! The servers' sections: `[nats]`, `[redis]` and `[database]`, with `Debug` impls that hide their
//! secrets.

use serde::{Deserialize, Serialize};

/// The most replicas a JetStream stream may have (`nats.replicas`).
pub const MAX_REPLICAS: usize = 5;

/// The default of `nats.max_bytes` (per stream) and `embedded.max_bytes`: 1 GiB.
pub const DEFAULT_STREAM_BYTES: i64 = 1 << 30;

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// `nats.url`, default `nats://127.0.0.1:4222`. Several servers of a NATS cluster are separated by
    /// commas (`nats://n1:4222,nats://n2:4222,nats://n3:4222`, as the `nats` CLI's `--server`): the
    /// coordinator connects to one of them and, when it goes away, to another. An entry that is not
    /// a NATS URL stops the start.
    pub url: String,
    /// `nats.replicas`, default 1: the replicas of every stream the coordinator makes (input,
    /// output, and the journal stream of `database.write_behind`), 1 to 5. With 3 on a cluster of 3
    /// or more servers, an input acknowledged to its publisher is on a majority of them, and survives
    /// the loss of any one. The start refuses more replicas than the cluster has servers; a stream
    /// that exists with other replicas is updated to these.
    pub replicas: usize,
    /// `nats.prefix`, default `gpu`: the first token of every subject.
    pub prefix: String,
    /// `nats.max_age_ms`: how long the streams keep messages, default 7 days.
    pub max_age_ms: u64,
    /// `nats.max_bytes`: the most bytes each stream keeps, default 1 GiB (`DEFAULT_STREAM_BYTES`).
    /// JetStream sets a stream's `max_bytes` aside in its store up front and refuses a stream that does
    /// not fit ("insufficient storage resources"): the two streams need a JetStream store
    /// (`max_file_store`, by default 75% of the disk free when nats-server starts) of 2 GiB. -1: no
    /// limit of its own, only the server's store bounds it. A full input stream refuses new inputs at
    /// publish (the publisher gets the error), and the coordinator removes the inputs it handled once
    /// it is 80% full; a full output stream drops its oldest.
    pub max_bytes: i64,
    /// `nats.max_msgs`: the most messages each stream keeps, default 10,000,000 (same policy).
    pub max_msgs: i64,
    /// `nats.max_msg_size`: the largest message the streams accept, default 65,536 bytes.
    pub max_msg_size: i32,
    /// `nats.creds_file`: a NATS credentials file (`.creds`) to connect with, as an alternative to
    /// the user and password in `nats.url`.
    pub creds_file: Option<String>,
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis.url`, default `redis://127.0.0.1:6379`.
    pub url: String,
    /// `redis.key_prefix`, default `gpu`.
    pub key_prefix: String,
    /// `redis.sentinels`, default none: the Sentinels (`host:port` or `redis://` URLs) to ask for the
    /// master named `redis.master`, in place of `redis.url`.
    pub sentinels: Vec<String>,
    /// `redis.master`: the name the Sentinels monitor the master under (`sentinel monitor <name> ...`).
    pub master: String,
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `database.url`, default `postgres://postgres@127.0.0.1:5432/gpu_coordinator`. A primary and its
    /// standbys are named together, libpq's way: `postgres://user@h1:5432,h2:5432/database`; the
    /// coordinator uses the host that takes writes and moves to a promoted standby when the primary
    /// goes. An acknowledged batch survives that move only with synchronous replication
    /// (`synchronous_standby_names` on the primary); the start warns without it.
    pub url: String,
    /// `database.write_behind`, default false: a batch of effects is durable once JetStream stored it
    /// (stream `<P>_JOURNAL`), and Postgres is written behind, off the grant path. Faster where a
    /// Postgres commit is slow (it waits for the disk); a power loss of the NATS host can lose what
    /// nats-server had not yet synced to disk, grants included. Needs `backends.journal = "postgres"`
    /// and `backends.bus = "nats"`.
    pub write_behind: bool,
}
impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://127.0.0.1:4222".to_owned(),
            replicas: 1,
            prefix: "gpu".to_owned(),
            max_age_ms: 7 * 24 * 60 * 60 * 1000,
            max_bytes: DEFAULT_STREAM_BYTES,
            max_msgs: 10_000_000,
            max_msg_size: 65_536,
            creds_file: None,
        }
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379".to_owned(),
            key_prefix: "gpu".to_owned(),
            sentinels: Vec::new(),
            master: String::new(),
        }
    }
}

impl RedisConfig {
    /// What is wrong with `redis.sentinels` and `redis.master`, each naming its key.
    pub(super) fn sentinel_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let master = self.master.trim();
        if self.sentinels.is_empty() {
            if !master.is_empty() {
                problems.push(format!(
                    "redis.master ({master:?}) is set without redis.sentinels: list the Sentinels \
                     that monitor it (e.g. [\"s1:26379\", \"s2:26379\", \"s3:26379\"])"
                ));
            }
            return problems;
        }
        if master.is_empty() {
            problems.push(
                "redis.master must name the master the Sentinels monitor (the name in their \
                 `sentinel monitor <name> ...` line) when redis.sentinels is set"
                    .to_owned(),
            );
        }
        for (i, entry) in self.sentinels.iter().enumerate() {
            if let Err(why) = crate::urls::sentinel_url(entry) {
                problems.push(format!(
                    "redis.sentinels[{i}]: {why} (expected e.g. \"10.0.0.1:26379\" or \
                     \"redis://10.0.0.1:26379\")"
                ));
            }
        }
        problems
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: "postgres://postgres@127.0.0.1:5432/gpu_coordinator".to_owned(),
            write_behind: false,
        }
    }
}
/// The sections that hold secrets show them as `***` when printed with `Debug` (the configuration is
/// logged at `debug`): the passwords (and tokens) of the URLs, and the `[http.tokens]` tokens.
impl std::fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsConfig")
            // A URL with a user alone carries a token: the client's redaction hides that too.
            .field("url", &gpu_coordinator_client::redact(&self.url))
            .field("replicas", &self.replicas)
            .field("prefix", &self.prefix)
            .field("max_age_ms", &self.max_age_ms)
            .field("max_bytes", &self.max_bytes)
            .field("max_msgs", &self.max_msgs)
            .field("max_msg_size", &self.max_msg_size)
            // A path: its contents are read by the NATS library, never kept here.
            .field("creds_file", &self.creds_file)
            .finish()
    }
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sentinels: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| crate::telemetry::redact_url(s))
            .collect();
        f.debug_struct("RedisConfig")
            .field("url", &crate::telemetry::redact_url(&self.url))
            .field("key_prefix", &self.key_prefix)
            .field("sentinels", &sentinels)
            .field("master", &self.master)
            .finish()
    }
}

impl std::fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &crate::telemetry::redact_url(&self.url))
            .field("write_behind", &self.write_behind)
            .finish()
    }
}
