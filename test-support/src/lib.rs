//! Private servers for tests that must stop, restart or cut off a server, so that they never touch the
//! shared ones: a nats-server with JetStream, a cluster of them ([`NatsCluster`]), a redis-server, a
//! Redis master with a replica and three Sentinels ([`RedisSentinels`]), a Postgres cluster made with `initdb`, and
//! a TCP proxy that cuts a client off. Each runs on a free port of loopback with a temporary directory
//! and is killed and removed on drop.
//!
//! Used by the root crate's integration tests (`tests/it`) and by the client crate's tests; it depends on
//! neither, so that both can use it. Binaries are found as an operator would start them: `$NATS_SERVER`,
//! else `nats-server` on the `PATH`, else `/usr/sbin/nats-server`; `redis-server` on the `PATH`; Postgres's
//! tools under `/usr/lib/postgresql/*/bin`.
//!
//! [`engines`] holds fake inference engines (vLLM, SGLang, Ollama, llama.cpp, Triton, a whole process)
//! that allocate from a fake GPU, for the engine sidecars' tests.

mod disk;
pub mod engines;
mod nats;
mod postgres;
mod proxy;
mod redis;
pub mod suite;

pub use disk::SmallDisk;
pub use nats::{NatsCluster, NatsServer};
pub use postgres::PgServer;
pub use proxy::Proxy;
pub use redis::{RedisSentinels, RedisServer};

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long a server may take to accept connections after it was started.
pub(crate) const START_WAIT: Duration = Duration::from_secs(20);

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A name unique to this process and call: `<tag>_<pid>_<n>_<nanos>` (lower-case letters, digits, `_`).
/// The process id lets a later run tell what an earlier one left behind.
pub fn unique(tag: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{tag}_{}_{n}_{nanos:x}", std::process::id())
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    // The kernel may hand the same port to two binds in a row once the first listener is closed:
    // servers started side by side (a NATS cluster, Sentinels and a Postgres at once) would then
    // race for it, and one fail to start. A port is handed out once per process.
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if given.insert(port) {
            return port;
        }
    }
}

/// A server process a test owns: started (again) on a known port, killed on drop.
#[derive(Default)]
pub(crate) struct Owned {
    pub(crate) child: Option<Child>,
    /// Whether the process asks the kernel to kill it when the thread that started it ends
    /// ([`die_with_parent`]): only for servers started by a thread that lasts as long as the process.
    pub(crate) tied: bool,
}

impl Owned {
    /// SIGKILL, and wait for the process to go.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM (the server finishes its writes), and wait for the process to go; SIGKILL after
    /// [`START_WAIT`].
    pub(crate) fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + START_WAIT;
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Kills the running process, if any, starts `cmd`, and waits until `port` accepts connections.
    pub(crate) fn respawn(&mut self, mut cmd: Command, port: u16) {
        self.kill();
        if self.tied {
            die_with_parent(&mut cmd);
        }
        let what = format!("{:?}", cmd.get_program());
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {what}: {e}"));
        self.child = Some(child);
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(start.elapsed() < START_WAIT, "{what} did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Asks the kernel to kill the process `cmd` starts (SIGKILL) once the thread that starts it ends, so
/// that a test process killed before it could stop its servers leaves none running.
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: `prctl` is async-signal-safe; the closure allocates nothing. It runs after the child
    // took its user and group (a change of credentials clears the setting).
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The processes whose parent is `pid`.
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let child: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // `pid (comm) state ppid ...`: the name may hold spaces and parentheses.
            let after = &stat[stat.rfind(')')? + 1..];
            let ppid: u32 = after.split_whitespace().nth(1)?.parse().ok()?;
            (ppid == pid).then_some(child)
        })
        .collect()
}

/// Whether `pid` runs (a zombie, dead but not reaped, does not).
pub fn process_runs(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let after = &stat[stat.rfind(')')? + 1..];
            after.split_whitespace().next().map(|state| state != "Z")
        })
        .unwrap_or(false)
}

/// The name of process `pid` (its `comm`), if it is there.
pub fn process_name(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(stat[stat.find('(')? + 1..stat.rfind(')')?].to_owned())
}

/// libfaketime, to preload into a process whose clock is to be shifted (`FAKETIME=+10m`). Preloaded
/// directly rather than through the `faketime` wrapper: the wrapper names a semaphore after its own
/// process id and leaves it behind when it is killed, and a later wrapper given the same id then
/// refuses to start.
pub fn libfaketime() -> PathBuf {
    let found = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|arch| arch.path().join("faketime/libfaketime.so.1"))
        .chain(std::iter::once(PathBuf::from(
            "/usr/lib/faketime/libfaketime.so.1",
        )))
        .find(|path| path.exists());
    found.expect("libfaketime is installed (Debian: apt-get install faketime)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_carry_the_process() {
        let (a, b) = (unique("x"), unique("x"));
        assert_ne!(a, b);
        assert!(a.starts_with(&format!("x_{}_", std::process::id())), "{a}");
    }

    /// A synchronous standby has every commit when its primary is killed; a standby that stopped
    /// receiving misses what came after; a promoted one takes writes.
    #[test]
    fn a_promoted_standby_has_what_it_received_and_takes_writes() {
        let primary = PgServer::start();
        let standby = primary.standby();
        assert_eq!(standby.sql("SELECT pg_is_in_recovery()"), "t");
        primary.set_synchronous(true);
        primary.sql("CREATE TABLE t (x int); INSERT INTO t VALUES (1)");
        let late = primary.standby();
        late.stop_receiving();
        primary.set_synchronous(false);
        primary.sql("INSERT INTO t VALUES (2)");
        primary.kill();
        standby.promote();
        late.promote();
        assert_eq!(
            standby.sql("SELECT string_agg(x::text, ',' ORDER BY x) FROM t"),
            "1,2"
        );
        assert_eq!(
            late.sql("SELECT string_agg(x::text, ',' ORDER BY x) FROM t"),
            "1"
        );
        standby.sql("INSERT INTO t VALUES (3)");
    }

    #[tokio::test]
    async fn a_cut_proxy_refuses_and_a_restored_one_forwards() {
        let upstream = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = upstream.local_addr().expect("address").port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = upstream.accept().await {
                tokio::spawn(async move {
                    use tokio::io::AsyncWriteExt;
                    let _ = s.write_all(b"hi").await;
                });
            }
        });
        let proxy = Proxy::start(port).await;
        let read = |p: u16| async move {
            use tokio::io::AsyncReadExt;
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", p))
                .await
                .expect("connect");
            let mut buf = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf)).await;
            buf
        };
        assert_eq!(read(proxy.port).await, b"hi");
        proxy.cut();
        assert!(
            read(proxy.port).await.is_empty(),
            "a cut proxy forwards nothing"
        );
        proxy.restore();
        assert_eq!(read(proxy.port).await, b"hi");
    }
}
