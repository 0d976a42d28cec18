//! The servers a whole test suite shares: one NATS with JetStream, one Redis and one Postgres per test
//! process, each test keeping to names of its own on them (subject and key prefixes, a database).
//!
//! By default each is a private server started on first use from the binaries on the `PATH` (as
//! [`crate::NatsServer`], [`crate::RedisServer`] and [`crate::PgServer`] find them), so that the tests
//! need the server binaries, not servers already running on fixed ports. `GPU_IT_NATS`, `GPU_IT_REDIS`
//! and `GPU_IT_POSTGRES` (a server URL without a database) name running servers to use instead.
//!
//! A private server lives as long as the test process: it is stopped and its files removed when the
//! process exits, and, should the process be killed, the kernel kills the server with it (the servers
//! are children of a thread that never ends, asked for `PR_SET_PDEATHSIG`).

use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

use crate::{NatsServer, PgServer, RedisServer};

/// The variables that name running servers, in place of private ones.
pub const NATS_VAR: &str = "GPU_IT_NATS";
pub const REDIS_VAR: &str = "GPU_IT_REDIS";
pub const POSTGRES_VAR: &str = "GPU_IT_POSTGRES";

/// Where the suite's servers are.
#[derive(Debug, Clone)]
pub struct SuiteServers {
    /// `nats://127.0.0.1:<port>`.
    pub nats: String,
    /// `redis://127.0.0.1:<port>`.
    pub redis: String,
    /// `postgres://postgres@127.0.0.1:<port>`, without a database.
    pub postgres: String,
    /// Whether a variable named any of them: a running server may hold what earlier runs left.
    pub named: bool,
}

impl SuiteServers {
    /// The three as the variables [`NATS_VAR`], [`REDIS_VAR`] and [`POSTGRES_VAR`] give them, for a
    /// child process (a test in another language) to use the same servers.
    pub fn env(&self) -> [(&'static str, &str); 3] {
        [
            (NATS_VAR, &self.nats),
            (REDIS_VAR, &self.redis),
            (POSTGRES_VAR, &self.postgres),
        ]
    }
}

/// The suite's servers, started (those no variable names) on the first call.
pub fn servers() -> &'static SuiteServers {
    static SERVERS: OnceLock<SuiteServers> = OnceLock::new();
    SERVERS.get_or_init(|| {
        remove_what_killed_runs_left();
        let nats = named(NATS_VAR);
        let redis = named(REDIS_VAR);
        let postgres = named(POSTGRES_VAR);
        let any_named = nats.is_some() || redis.is_some() || postgres.is_some();
        SuiteServers {
            nats: nats.unwrap_or_else(|| {
                keep(|| {
                    let server = NatsServer::start_tied();
                    (server.url(), server)
                })
            }),
            redis: redis.unwrap_or_else(|| {
                keep(|| {
                    let server = RedisServer::start_tied();
                    (server.url(), server)
                })
            }),
            postgres: postgres.unwrap_or_else(|| {
                keep(|| {
                    let server = PgServer::start_tied();
                    let url = server.url("");
                    (url.trim_end_matches('/').to_owned(), server)
                })
            }),
            named: any_named,
        }
    })
}

/// Removes the files of private servers whose test process was killed before it could remove them
/// (named by [`crate::unique`] with that process's id, which no process has now).
fn remove_what_killed_runs_left() {
    let temp = std::env::temp_dir();
    let Ok(entries) = std::fs::read_dir(&temp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = [
            "nats_store_",
            "pg_cluster_",
            "pg_standby_",
            "pg_log_",
            "sentinels_",
        ]
        .iter()
        .find_map(|prefix| name.strip_prefix(prefix)) else {
            continue;
        };
        let Some(pid) = rest.split('_').next().filter(|p| p.parse::<u32>().is_ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let path = entry.path();
            let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
        }
    }
}

/// The URL variable `var` gives, if it gives one.
fn named(var: &str) -> Option<String> {
    std::env::var(var)
        .ok()
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// What the keeper thread is asked to do.
type Job = Box<dyn FnOnce() + Send>;

/// The private servers, kept until the process exits.
static KEPT: Mutex<Vec<Box<dyn Send>>> = Mutex::new(Vec::new());

/// Starts a server on the keeper thread (so that it is that thread's child, and dies with the
/// process), keeps it until the process exits, and returns its URL.
fn keep<S: Send + 'static>(start: impl FnOnce() -> (String, S) + Send + 'static) -> String {
    let (tx, rx) = mpsc::channel();
    let job: Job = Box::new(move || {
        // A panic here (a server that does not start) reaches the test through the closed channel.
        let (url, server) = start();
        KEPT.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Box::new(server));
        let _ = tx.send(url);
    });
    keeper().send(job).expect("the keeper thread runs");
    rx.recv()
        .expect("a private test server started (see the panic above)")
}

/// The thread that starts the private servers: it runs until the process exits, so that the kernel's
/// parent-death signal reaches its children only then.
fn keeper() -> mpsc::Sender<Job> {
    static KEEPER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    KEEPER
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<Job>();
            std::thread::Builder::new()
                .name("test-servers".into())
                .spawn(move || {
                    for job in rx {
                        // A job that panics must not end the thread (its servers would die with it).
                        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                    }
                })
                .expect("spawn the test servers' thread");
            // SAFETY: `stop_kept` is an `extern "C" fn()` that does not unwind across the boundary.
            unsafe {
                libc::atexit(stop_kept);
            }
            Mutex::new(tx)
        })
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

/// At the process's exit: stops the private servers and removes their files.
extern "C" fn stop_kept() {
    let _ = std::panic::catch_unwind(|| {
        let kept = std::mem::take(&mut *KEPT.lock().unwrap_or_else(|e| e.into_inner()));
        drop(kept);
    });
}
