//! What the integration tests share: unique names per test (subject prefix, Redis key prefix, database), a
//! coordinator running in-process or as a real process, and a probe that records every output message so
//! that a test waits for the message it expects, with a deadline. The private servers (nats-server,
//! redis-server, Postgres, a proxy) come from the `gpu-coordinator-test-support` crate.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::HeaderMap;
use futures::StreamExt;
use gpu_coordinator::config::{BackendsConfig, BusBackend, Config, GpuConfig};
use gpu_coordinator_wire::{codec, Control, Encoding, Event, Reply, StatusDoc};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use gpu_coordinator_test_support::{
    suite, unique, NatsCluster, NatsServer, PgServer, RedisServer, SmallDisk,
};

/// The suite's servers: private ones this process starts on first use, or those `GPU_IT_NATS`,
/// `GPU_IT_REDIS` and `GPU_IT_POSTGRES` (a server URL without a database) name
/// ([`gpu_coordinator_test_support::suite`]).
pub static NATS_URL: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| suite::servers().nats.clone());
pub static REDIS_URL: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| suite::servers().redis.clone());
pub static PG_SERVER: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| suite::servers().postgres.clone());

/// The port of the suite's NATS, for a proxy in front of it (on loopback).
pub fn nats_port() -> u16 {
    NATS_URL
        .rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .unwrap_or_else(|| panic!("a port in the suite's NATS URL {}", *NATS_URL))
}

/// How long a test waits for a message it expects before it fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A configuration of its own for one test: subject prefix, key prefix and database.
pub fn test_config(tag: &str, gpus: &[(&str, u64)]) -> Config {
    SWEEP.call_once(sweep_previous_runs);
    let name = unique(tag);
    let mut config = Config::default();
    config.nats.url = NATS_URL.to_string();
    config.nats.prefix = format!("t{}", name.replace('_', "-"));
    // JetStream sets each stream's max_bytes aside in its store: the default (1 GiB) for every test's
    // streams would not fit the shared server's store.
    config.nats.max_bytes = 16 << 20;
    config.redis.url = REDIS_URL.to_string();
    config.redis.key_prefix = format!("it:{name}");
    config.database.url = format!("{}/gpu_it_{name}", *PG_SERVER);
    config.http.listen = "127.0.0.1:0".to_string();
    config.gpus = gpus
        .iter()
        .map(|(id, mb)| GpuConfig {
            id: id.to_string(),
            vram_mb: *mb,
        })
        .collect();
    config
}

static SWEEP: std::sync::Once = std::sync::Once::new();

/// Removes what earlier runs of this suite left on servers the `GPU_IT_*` variables name (their test
/// databases, streams and Redis keys, all named with another process id), so that they do not pile up
/// run after run; private servers start empty. Runs once per test process, on a thread of its own; a
/// failure only leaves the garbage.
fn sweep_previous_runs() {
    if !suite::servers().named {
        return;
    }
    let thread = std::thread::spawn(move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        runtime.block_on(async move {
            use sea_orm::{ConnectionTrait, Database, Statement};
            if let Ok(db) = Database::connect(format!("{}/postgres", *PG_SERVER)).await {
                let rows = db
                    .query_all(Statement::from_string(
                        db.get_database_backend(),
                        "SELECT datname FROM pg_database WHERE datname LIKE 'gpu\\_it\\_%'",
                    ))
                    .await
                    .unwrap_or_default();
                for row in rows {
                    let Ok(name) = row.try_get::<String>("", "datname") else {
                        continue;
                    };
                    if is_earlier_run(&name) {
                        let _ = db
                            .execute_unprepared(&format!(
                                "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                            ))
                            .await;
                    }
                }
                let _ = db.close().await;
            }
            if let Ok(client) = async_nats::connect(NATS_URL.as_str()).await {
                let js = jetstream::new(client);
                let names: Vec<String> = js
                    .stream_names()
                    .filter_map(|n| async { n.ok() })
                    .collect()
                    .await;
                for name in names {
                    // Test prefixes are `t<tag>-<pid>-...`: streams `T<TAG>_<PID>_..._INPUT` / `_OUTPUT`.
                    let ours = name.starts_with('T')
                        && (name.ends_with("_INPUT") || name.ends_with("_OUTPUT"));
                    if ours && is_earlier_run(&name) {
                        let _ = js.delete_stream(&name).await;
                    }
                }
            }
            if let Ok(client) = redis::Client::open(REDIS_URL.as_str()) {
                if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
                    let keys: Vec<String> = redis::cmd("KEYS")
                        .arg("it:*")
                        .query_async(&mut conn)
                        .await
                        .unwrap_or_default();
                    let old: Vec<&String> = keys.iter().filter(|k| is_earlier_run(k)).collect();
                    for chunk in old.chunks(500) {
                        let _: Result<(), _> =
                            redis::cmd("DEL").arg(chunk).query_async(&mut conn).await;
                    }
                }
            }
        });
    });
    let _ = thread.join();
}

/// Whether a name was made by [`unique`] in a test process that has ended: it carries a process id
/// and a counter (two all-digit `_` tokens, the id first), and no process of that id runs. A suite
/// running beside this one (another checkout's) keeps what it made.
fn is_earlier_run(name: &str) -> bool {
    let mut numbers = name
        .split(['_', ':'])
        .filter(|t| !t.is_empty() && t.chars().all(|c| c.is_ascii_digit()));
    let (Some(pid), Some(_)) = (numbers.next(), numbers.next()) else {
        return false;
    };
    pid != std::process::id().to_string() && !std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// A coordinator running in this process.
pub struct Coordinator {
    pub config: Config,
    /// Where its HTTP API listens.
    pub http_addr: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Coordinator {
    /// Starts it and waits until it answers `status`.
    pub async fn start(config: Config) -> Coordinator {
        Self::start_with(config, gpu_coordinator::app::Extras::default()).await
    }

    /// [`Coordinator::start`] with extras (a fake GPU probe).
    pub async fn start_with(config: Config, extras: gpu_coordinator::app::Extras) -> Coordinator {
        Self::start_at(config, extras, 0).await
    }

    /// [`Coordinator::start_with`], its HTTP API on `port` of loopback (0: any free port).
    pub async fn start_at(
        config: Config,
        extras: gpu_coordinator::app::Extras,
        port: u16,
    ) -> Coordinator {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind an HTTP port");
        let http_addr = listener.local_addr().expect("the HTTP listener's address");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(gpu_coordinator::app::run_with(
            config.clone(),
            listener,
            shutdown.clone(),
            extras,
        ));
        let coordinator = Coordinator {
            config,
            http_addr,
            shutdown,
            task,
        };
        if coordinator.config.backends.bus == BusBackend::Embedded {
            wait_ready_http(&coordinator.url("")).await;
        } else {
            wait_ready(&coordinator.config).await;
        }
        coordinator
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http_addr)
    }

    /// Stops it gracefully and returns how it ended.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.task.await.expect("the coordinator task panicked")
    }

    /// Stops it gracefully, then checks the whole history of its configuration with `audit`, failing
    /// the test on a violation.
    pub async fn stop_and_audit(self) {
        let config = self.config.clone();
        self.stop().await.expect("the coordinator stops cleanly");
        let verdict =
            gpu_coordinator::app::audit::run(&config, gpu_coordinator::audit::Since::Start)
                .await
                .expect("the history can be read");
        if let Err(violation) = verdict {
            panic!("{violation}");
        }
    }
}

/// A backend's name as the configuration writes it (`sqlite`, `memory`, ...).
fn backend_name(backend: impl serde::Serialize) -> String {
    serde_json::to_value(backend)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .expect("a backend is named by a string")
}

/// A configuration of its own for one test of the embedded mode: no server, a data directory of its
/// own (under the system's temporary directory).
pub fn embedded_config(tag: &str, gpus: &[(&str, u64)]) -> Config {
    let mut config = test_config(tag, gpus);
    config.backends = BackendsConfig::embedded();
    config.embedded.data_dir = std::env::temp_dir()
        .join(format!("gpu-it-{}", unique(tag)))
        .display()
        .to_string();
    config
}

/// Waits until the HTTP API at `base` answers `GET /gpu/status`.
pub async fn wait_ready_http(base: &str) -> StatusDoc {
    let client = reqwest::Client::new();
    let start = Instant::now();
    loop {
        if let Ok(res) = client.get(format!("{base}/gpu/status")).send().await {
            if res.status().is_success() {
                if let Ok(doc) = res.json::<StatusDoc>().await {
                    return doc;
                }
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the coordinator at {base} did not answer GET /gpu/status within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A NATS connection to `url` (one server, or several separated by commas), with its credentials.
pub async fn nats_connect(url: &str) -> async_nats::Client {
    gpu_coordinator_client::connect_options(url)
        .expect("a NATS URL")
        .connect(gpu_coordinator_client::server_addrs(url).expect("NATS URLs"))
        .await
        .expect("connect to NATS")
}

/// Waits until a coordinator with this configuration answers `<prefix>.status`.
pub async fn wait_ready(config: &Config) -> StatusDoc {
    let client = nats_connect(&config.nats.url).await;
    let subject = format!("{}.status", config.nats.prefix);
    let start = Instant::now();
    loop {
        if let Ok(Ok(msg)) = tokio::time::timeout(
            Duration::from_millis(500),
            client.request(subject.clone(), "".into()),
        )
        .await
        {
            if let Ok(doc) = serde_json::from_slice::<StatusDoc>(&msg.payload) {
                return doc;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the coordinator did not answer {subject} within 60 s"
        );
    }
}

/// A coordinator as a real process (`gpu-coordinator serve`), configured by environment variables, so
/// that a test can kill it with SIGKILL.
pub struct CoordinatorProcess {
    child: Child,
}

impl CoordinatorProcess {
    pub async fn start(config: &Config) -> CoordinatorProcess {
        Self::start_with_stderr(config, Stdio::inherit()).await
    }

    /// [`CoordinatorProcess::start`], its log (at `warn`) written to `log`.
    pub async fn start_logged(config: &Config, log: &std::path::Path) -> CoordinatorProcess {
        let file = std::fs::File::create(log).expect("the log file can be made");
        Self::start_with_stderr(config, file.into()).await
    }

    /// Starts it, its stderr to `stderr`, and waits until it answers.
    async fn start_with_stderr(config: &Config, stderr: Stdio) -> CoordinatorProcess {
        let mut cmd = Self::command(config, Command::new(env!("CARGO_BIN_EXE_gpu-coordinator")));
        cmd.stderr(stderr);
        let child = cmd.spawn().expect("start gpu-coordinator serve");
        if config.backends.bus == BusBackend::Embedded {
            wait_ready_http(&format!("http://{}", config.http.listen)).await;
        } else {
            wait_ready(config).await;
        }
        CoordinatorProcess { child }
    }

    /// A coordinator whose wall clock is shifted by `offset` (libfaketime's `FAKETIME`, e.g. `+10m`),
    /// its log written to `log`; not waited for (it may never lead).
    pub fn start_shifted(
        config: &Config,
        offset: &str,
        log: &std::path::Path,
    ) -> CoordinatorProcess {
        let mut cmd = Self::command(config, Command::new(env!("CARGO_BIN_EXE_gpu-coordinator")));
        cmd.env("LD_PRELOAD", gpu_coordinator_test_support::libfaketime())
            .env("FAKETIME", offset)
            .stderr(std::fs::File::create(log).expect("the log file can be made"));
        let child = cmd
            .spawn()
            .expect("start gpu-coordinator serve under libfaketime");
        CoordinatorProcess { child }
    }

    /// `serve` with `config` in the environment, run by `cmd` (the binary, or a wrapper of it).
    fn command(config: &Config, mut cmd: Command) -> Command {
        cmd.arg("serve")
            .env("GPU_COORDINATOR_NATS__URL", &config.nats.url)
            .env("GPU_COORDINATOR_NATS__PREFIX", &config.nats.prefix)
            .env(
                "GPU_COORDINATOR_NATS__REPLICAS",
                config.nats.replicas.to_string(),
            )
            .env("GPU_COORDINATOR_REDIS__URL", &config.redis.url)
            .env(
                "GPU_COORDINATOR_REDIS__KEY_PREFIX",
                &config.redis.key_prefix,
            )
            .env("GPU_COORDINATOR_DATABASE__URL", &config.database.url)
            .env(
                "GPU_COORDINATOR_DATABASE__WRITE_BEHIND",
                config.database.write_behind.to_string(),
            )
            .env("GPU_COORDINATOR_HTTP__LISTEN", &config.http.listen)
            .env(
                "GPU_COORDINATOR_HTTP__MAX_WAIT_MS",
                config.http.max_wait_ms.to_string(),
            )
            .env(
                "GPU_COORDINATOR_NATS__MAX_BYTES",
                config.nats.max_bytes.to_string(),
            )
            .env(
                "GPU_COORDINATOR_BACKENDS__JOURNAL",
                backend_name(config.backends.journal),
            )
            .env(
                "GPU_COORDINATOR_BACKENDS__LEASES",
                backend_name(config.backends.leases),
            )
            .env(
                "GPU_COORDINATOR_BACKENDS__BUS",
                backend_name(config.backends.bus),
            )
            .env(
                "GPU_COORDINATOR_BACKENDS__ONE_BOX",
                config.backends.one_box.to_string(),
            )
            .env(
                "GPU_COORDINATOR_EMBEDDED__DATA_DIR",
                &config.embedded.data_dir,
            )
            .env(
                "GPU_COORDINATOR_PREEMPTION__ACK_DEADLINE_MS",
                config.preemption.ack_deadline_ms.to_string(),
            )
            .env(
                "GPU_COORDINATOR_REQUEST__DEFAULT_TIMEOUT_MS",
                config.request.default_timeout_ms.to_string(),
            )
            .env(
                "GPU_COORDINATOR_LEASE__DEFAULT_MS",
                config.lease.default_ms.to_string(),
            )
            .env(
                "GPU_COORDINATOR_LEADER__TTL_MS",
                config.leader.ttl_ms.to_string(),
            )
            .env(
                "GPU_COORDINATOR_LEADER__MAX_CLOCK_SKEW_MS",
                config.leader.max_clock_skew_ms.to_string(),
            )
            .env(
                "GPU_COORDINATOR_GPUS",
                format!(
                    "[{}]",
                    config
                        .gpus
                        .iter()
                        .map(|g| format!("{{id=\"{}\",vram_mb={}}}", g.id, g.vram_mb))
                        .collect::<Vec<_>>()
                        .join(",")
                ),
            )
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        cmd
    }

    /// The process id, to send it signals (SIGSTOP, SIGCONT).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no graceful anything.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One output message the probe saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub subject: String,
    pub encoding: Encoding,
    pub json: Value,
}

impl Seen {
    pub fn reply(&self) -> Reply {
        serde_json::from_value(self.json.clone()).expect("a reply document")
    }
    pub fn control(&self) -> Control {
        serde_json::from_value(self.json.clone()).expect("a control document")
    }
    pub fn event(&self) -> Event {
        serde_json::from_value(self.json.clone()).expect("an event document")
    }
    pub fn str(&self, field: &str) -> Option<&str> {
        self.json.get(field).and_then(Value::as_str)
    }
}

/// A NATS client that publishes inputs as services would and records every output of a prefix.
pub struct Probe {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub prefix: String,
    rx: mpsc::UnboundedReceiver<Seen>,
    pub seen: Vec<Seen>,
}

impl Probe {
    /// Connects and subscribes to the replies, control orders and events of `prefix`.
    pub async fn new(nats_url: &str, prefix: &str) -> Probe {
        let client = nats_connect(nats_url).await;
        let (tx, rx) = mpsc::unbounded_channel();
        for kind in ["reply.*", "control.*", "event.*.*"] {
            let mut sub = client
                .subscribe(format!("{prefix}.{kind}"))
                .await
                .expect("subscribe");
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Some(msg) = sub.next().await {
                    let ct = msg
                        .headers
                        .as_ref()
                        .and_then(|h| h.get("Content-Type"))
                        .map(|v| v.as_str().to_string());
                    let encoding = Encoding::from_content_type(ct.as_deref());
                    let json: Value = codec::decode(encoding, &msg.payload)
                        .unwrap_or_else(|e| panic!("undecodable output on {}: {e}", msg.subject));
                    let _ = tx.send(Seen {
                        subject: msg.subject.to_string(),
                        encoding,
                        json,
                    });
                }
            });
        }
        client.flush().await.expect("flush the subscriptions");
        let js = jetstream::new(client.clone());
        Probe {
            client,
            js,
            prefix: prefix.to_string(),
            rx,
            seen: Vec::new(),
        }
    }

    /// Plain publish of raw bytes, as `nats pub` does (no headers).
    pub async fn pub_raw(&self, kind: &str, svc: &str, payload: impl Into<bytes::Bytes>) {
        self.client
            .publish(format!("{}.{kind}.{svc}", self.prefix), payload.into())
            .await
            .expect("publish");
        self.client.flush().await.expect("flush");
    }

    /// Plain publish of a JSON value.
    pub async fn pub_json(&self, kind: &str, svc: &str, body: Value) {
        self.pub_raw(kind, svc, serde_json::to_vec(&body).expect("json"))
            .await;
    }

    /// JetStream publish with headers, waiting for the PubAck.
    pub async fn js_pub(&self, kind: &str, svc: &str, headers: HeaderMap, payload: Vec<u8>) {
        self.js
            .publish_with_headers(
                format!("{}.{kind}.{svc}", self.prefix),
                headers,
                payload.into(),
            )
            .await
            .expect("publish")
            .await
            .expect("PubAck");
    }

    /// JetStream publish in MessagePack (maps with field names) with the header.
    pub async fn pub_msgpack(&self, kind: &str, svc: &str, body: &impl serde::Serialize) {
        let mut headers = HeaderMap::new();
        headers.insert("Content-Type", "application/msgpack");
        self.js_pub(kind, svc, headers, codec::encode(Encoding::MsgPack, body))
            .await;
    }

    /// Waits for the first message not yet consumed that matches, and consumes it. Fails after
    /// [`DEADLINE`], listing what was seen.
    pub async fn expect(&mut self, what: &str, pred: impl Fn(&Seen) -> bool) -> Seen {
        if let Some(i) = self.seen.iter().position(&pred) {
            return self.seen.remove(i);
        }
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(seen)) => {
                    if pred(&seen) {
                        return seen;
                    }
                    self.seen.push(seen);
                }
                _ => panic!(
                    "no {what} within {DEADLINE:?}; seen meanwhile: {:#?}",
                    self.seen
                        .iter()
                        .map(|s| (&s.subject, &s.json))
                        .collect::<Vec<_>>()
                ),
            }
        }
    }

    /// The reply with this request id and outcome.
    pub async fn reply(&mut self, request_id: &str, outcome: &str) -> Reply {
        let prefix = format!("{}.reply.", self.prefix);
        self.expect(&format!("reply {outcome} for {request_id}"), |s| {
            s.subject.starts_with(&prefix)
                && s.str("request_id") == Some(request_id)
                && s.str("outcome") == Some(outcome)
        })
        .await
        .reply()
    }

    /// The control order with this request id and action.
    pub async fn control(&mut self, request_id: &str, action: &str) -> Control {
        let prefix = format!("{}.control.", self.prefix);
        self.expect(&format!("control {action} for {request_id}"), |s| {
            s.subject.starts_with(&prefix)
                && s.str("request_id") == Some(request_id)
                && s.str("action") == Some(action)
        })
        .await
        .control()
    }

    /// The event of this kind for this request id (`None`: any request).
    pub async fn event(&mut self, kind: &str, request_id: Option<&str>) -> Event {
        let prefix = format!("{}.event.{kind}.", self.prefix);
        self.expect(&format!("event {kind} for {request_id:?}"), |s| {
            s.subject.starts_with(&prefix)
                && request_id.is_none_or(|id| s.str("request_id") == Some(id))
        })
        .await
        .event()
    }

    /// Whether a message matching `pred` has been received so far (without waiting).
    pub fn drain_and_find(&mut self, pred: impl Fn(&Seen) -> bool) -> bool {
        while let Ok(seen) = self.rx.try_recv() {
            self.seen.push(seen);
        }
        self.seen.iter().any(pred)
    }

    /// The status document, over NATS request-reply.
    pub async fn status(&self) -> StatusDoc {
        self.status_page(None, None).await
    }

    /// The status document, or `None` when no coordinator answered in time (one catching up after a
    /// stall answers once its loop is back).
    pub async fn try_status(&self) -> Option<StatusDoc> {
        self.ask_status(Vec::new()).await.ok()
    }

    /// The status document with this page of the queue.
    pub async fn status_page(&self, offset: Option<u64>, limit: Option<u64>) -> StatusDoc {
        let body = if offset.is_none() && limit.is_none() {
            Vec::new()
        } else {
            serde_json::to_vec(&serde_json::json!({"offset": offset, "limit": limit})).unwrap()
        };
        self.ask_status(body).await.expect("status request")
    }

    /// Asks `<prefix>.status` with `body`; the answer must be a status document.
    async fn ask_status(&self, body: Vec<u8>) -> Result<StatusDoc, async_nats::RequestError> {
        let msg = self
            .client
            .request(format!("{}.status", self.prefix), body.into())
            .await?;
        Ok(serde_json::from_slice(&msg.payload).expect("a status document"))
    }
}

/// Polls `check` until it returns `Some`, failing after [`DEADLINE`] with `what`.
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    eventually_within(what, DEADLINE, check).await
}

/// [`eventually`] with a deadline of its own, for what takes longer (a failover).
pub async fn eventually_within<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            start.elapsed() < deadline,
            "{what} did not happen within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
