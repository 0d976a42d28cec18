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
pub mod suite;

pub use disk::SmallDisk;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a server may take to accept connections after it was started.
const START_WAIT: Duration = Duration::from_secs(20);

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
struct Owned {
    child: Option<Child>,
    /// Whether the process asks the kernel to kill it when the thread that started it ends
    /// ([`die_with_parent`]): only for servers started by a thread that lasts as long as the process.
    tied: bool,
}

impl Owned {
    /// SIGKILL, and wait for the process to go.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM (the server finishes its writes), and wait for the process to go; SIGKILL after
    /// [`START_WAIT`].
    fn terminate(&mut self) {
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
    fn respawn(&mut self, mut cmd: Command, port: u16) {
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

/// The nats-server binary: `$NATS_SERVER`, else `nats-server` on the `PATH`, else `/usr/sbin/nats-server`.
fn nats_server_binary() -> String {
    std::env::var("NATS_SERVER").unwrap_or_else(|_| {
        let on_path = Command::new("nats-server")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if on_path {
            "nats-server".to_owned()
        } else {
            "/usr/sbin/nats-server".to_owned()
        }
    })
}

/// A private nats-server with JetStream on a free port and a temporary store, removed on drop.
pub struct NatsServer {
    pub port: u16,
    store: PathBuf,
    /// A configuration file (`-c`), e.g. one with authorization.
    conf: Option<PathBuf>,
    process: Owned,
}

impl NatsServer {
    pub fn start() -> NatsServer {
        Self::start_with_conf(None)
    }

    /// A private server that also reads the configuration file `conf` (the command line's port,
    /// address and store win over it).
    pub fn start_with_conf(conf: Option<PathBuf>) -> NatsServer {
        Self::start_in(&std::env::temp_dir(), conf)
    }

    /// [`NatsServer::start_with_conf`], its store in a new directory under `parent` (a small disk of
    /// the test's own, say).
    pub fn start_in(parent: &Path, conf: Option<PathBuf>) -> NatsServer {
        Self::start_at(parent, conf, false)
    }

    /// A private server killed with the thread that starts it ([`suite`]'s, which lasts as long as
    /// the process).
    pub(crate) fn start_tied() -> NatsServer {
        Self::start_at(&std::env::temp_dir(), None, true)
    }

    fn start_at(parent: &Path, conf: Option<PathBuf>, tied: bool) -> NatsServer {
        let store = parent.join(unique("nats_store"));
        std::fs::create_dir_all(&store).expect("create the store dir");
        let mut server = NatsServer {
            port: free_port(),
            store,
            conf,
            process: Owned { child: None, tied },
        };
        server.restart();
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stops the server at once (SIGKILL, like a crash).
    pub fn stop(&mut self) {
        self.process.kill();
    }

    /// Kills the server (if it runs) and starts it again on the same port and store; waits until it
    /// accepts connections.
    pub fn restart(&mut self) {
        let mut cmd = Command::new(nats_server_binary());
        if let Some(conf) = &self.conf {
            cmd.arg("-c").arg(conf);
        }
        cmd.args([
            "-a",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-js",
            "-sd",
        ])
        .arg(&self.store);
        self.process.respawn(cmd, self.port);
    }

    /// Stops the server gracefully (SIGTERM: its store is complete), then starts it again.
    pub fn restart_gracefully(&mut self) {
        self.process.terminate();
        self.restart();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.store);
    }
}

/// A private cluster of nats-servers with JetStream, on free ports of loopback, each with a store of
/// its own, removed on drop. Its nodes are named `n1`, `n2`, ... (the names JetStream gives as a
/// stream's leader); each can be killed and started again on the same ports and store.
pub struct NatsCluster {
    /// The cluster's name (`--cluster_name`).
    pub name: String,
    nodes: Vec<ClusterNode>,
    /// Whether the servers tell their clients about each other (not `--no_advertise`).
    advertise: bool,
}

struct ClusterNode {
    name: String,
    port: u16,
    /// The route port, where the other nodes reach it.
    route_port: u16,
    /// The monitoring port, for `/healthz`.
    monitor_port: u16,
    store: PathBuf,
    process: Owned,
}

impl NatsCluster {
    /// Starts `size` nodes routed to each other and waits until each says it is healthy: JetStream
    /// has a meta leader, and the node is current with it.
    pub fn start(size: usize) -> NatsCluster {
        NatsCluster::start_with(size, true)
    }

    /// Like [`NatsCluster::start`], but the servers do not tell their clients about each other
    /// (`--no_advertise`): a client knows only the addresses it was given, so that a test can put a
    /// [`Proxy`] in front of each node and cut a client off the whole cluster.
    pub fn start_unadvertised(size: usize) -> NatsCluster {
        NatsCluster::start_with(size, false)
    }

    fn start_with(size: usize, advertise: bool) -> NatsCluster {
        assert!(size > 0, "a cluster of at least one node");
        let mut cluster = NatsCluster {
            advertise,
            name: unique("nc"),
            nodes: (1..=size)
                .map(|i| {
                    let store = std::env::temp_dir().join(unique(&format!("nats_n{i}")));
                    std::fs::create_dir_all(&store).expect("create the store dir");
                    ClusterNode {
                        name: format!("n{i}"),
                        port: free_port(),
                        route_port: free_port(),
                        monitor_port: free_port(),
                        store,
                        process: Owned::default(),
                    }
                })
                .collect(),
        };
        for i in 0..size {
            cluster.spawn(i);
        }
        for i in 0..size {
            cluster.wait_healthy(i);
        }
        cluster
    }

    /// How many nodes it has (running or not).
    pub fn size(&self) -> usize {
        self.nodes.len()
    }

    /// The client URL of node `i` (0-based).
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].port)
    }

    /// The client port of node `i` (0-based).
    pub fn port(&self, i: usize) -> u16 {
        self.nodes[i].port
    }

    /// Every node's client URL, separated by commas (as `nats.url` and the `nats` CLI take them).
    pub fn urls(&self) -> String {
        (0..self.size())
            .map(|i| self.url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The server name of node `i` (`n<i+1>`).
    pub fn server_name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// The node whose server name is `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// Kills node `i` at once (SIGKILL, like a crash or the loss of its machine).
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].process.kill();
    }

    /// Kills node `i` (if it runs), starts it again on the same ports and store, and waits until it is
    /// healthy (back in the cluster and current with its streams).
    pub fn restart(&mut self, i: usize) {
        self.spawn(i);
        self.wait_healthy(i);
    }

    /// Starts node `i`, routed to every node, and waits until it accepts connections.
    fn spawn(&mut self, i: usize) {
        let routes = self
            .nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.route_port))
            .collect::<Vec<_>>()
            .join(",");
        let node = &mut self.nodes[i];
        let mut cmd = Command::new(nats_server_binary());
        cmd.args(["-a", "127.0.0.1", "-p", &node.port.to_string()])
            .args(["-m", &node.monitor_port.to_string()])
            .args(["--server_name", &node.name])
            .args(["--cluster_name", &self.name])
            .args([
                "--cluster",
                &format!("nats://127.0.0.1:{}", node.route_port),
            ])
            .args(["--routes", &routes])
            .args(["-js", "-sd"])
            .arg(&node.store);
        if !self.advertise {
            cmd.arg("--no_advertise=true");
        }
        node.process.respawn(cmd, node.port);
    }

    /// Waits until node `i`'s `/healthz` answers ok, for at most [`START_WAIT`].
    pub fn wait_healthy(&self, i: usize) {
        let node = &self.nodes[i];
        let start = Instant::now();
        loop {
            let answer = healthz(node.monitor_port);
            if answer.contains("\"ok\"") {
                return;
            }
            assert!(
                start.elapsed() < START_WAIT,
                "NATS node {} is not healthy after {START_WAIT:?}: {answer}",
                node.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The body of `GET /healthz` on the monitoring port `port`, or why there is none.
fn healthz(port: u16) -> String {
    use std::io::{Read, Write};
    let answer = (|| -> std::io::Result<String> {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        stream.write_all(b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        Ok(text)
    })();
    match answer {
        Ok(text) => text
            .split_once("\r\n\r\n")
            .map_or(text.clone(), |(_, body)| body.to_owned()),
        Err(e) => e.to_string(),
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.process.kill();
            let _ = std::fs::remove_dir_all(&node.store);
        }
    }
}

/// A private redis-server on a free port, keeping nothing on disk, stopped on drop.
pub struct RedisServer {
    pub port: u16,
    process: Owned,
    /// More arguments to `redis-server` (`--replicaof`).
    args: Vec<String>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        RedisServer::start_with(Vec::new())
    }

    /// A private server killed with the thread that starts it ([`suite`]'s, which lasts as long as
    /// the process).
    pub(crate) fn start_tied() -> RedisServer {
        let mut server = RedisServer {
            port: free_port(),
            process: Owned {
                child: None,
                tied: true,
            },
            args: Vec::new(),
        };
        server.restart();
        server
    }

    fn start_with(args: Vec<String>) -> RedisServer {
        let mut server = RedisServer {
            port: free_port(),
            process: Owned::default(),
            args,
        };
        server.restart();
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Stops the server (SIGKILL).
    pub fn stop(&mut self) {
        self.process.kill();
    }

    /// Kills the server and starts it again, empty, on the same port.
    pub fn restart(&mut self) {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(std::env::temp_dir())
            .args(&self.args);
        self.process.respawn(cmd, self.port);
    }

    /// A connection to this server, for a test to look at what it holds.
    pub fn connect(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|client| client.get_connection())
            .unwrap_or_else(|e| panic!("connect to redis-server on port {}: {e}", self.port))
    }
}

/// A Redis master, one replica and three Sentinels (`redis-server --sentinel`, quorum 2) on free ports
/// of loopback, with short timeouts (the master is down after 1 s without an answer, a failover may
/// take 3 s), so that a failover takes a few seconds. The replica logs in to its master as a user of
/// its own: [`RedisSentinels::cut_replication`] disables that user and drops its connection, so that
/// the replica misses every write the master takes from then on, as a replica behind its master
/// does, while the Sentinels still see both and may promote it. (A proxy between the two would not
/// do: a Sentinel turns a replica that replicates from another address than the master's back to
/// the master's.) [`RedisSentinels::start`] returns once every Sentinel knows the replica, in sync,
/// and the two other Sentinels (they can fail over).
pub struct RedisSentinels {
    /// The name the Sentinels monitor the master under.
    pub name: String,
    pub master: RedisServer,
    pub replica: RedisServer,
    sentinels: Vec<(u16, Owned)>,
    dir: PathBuf,
}

impl RedisSentinels {
    /// How long the Sentinels wait for the master before they call it down, in ms.
    pub const DOWN_AFTER_MS: u64 = 1000;

    /// The user the replica logs in to its master as.
    const REPLICATION_USER: &str = "replication";

    pub fn start() -> RedisSentinels {
        let name = "leases".to_owned();
        let master = RedisServer::start();
        let password = unique("pw");
        redis::cmd("ACL")
            .arg("SETUSER")
            .arg(Self::REPLICATION_USER)
            .arg("on")
            .arg(format!(">{password}"))
            .arg("+@all")
            .arg("~*")
            .query::<()>(&mut master.connect())
            .expect("make the replication user");
        let replica = RedisServer::start_with(vec![
            "--replicaof".into(),
            "127.0.0.1".into(),
            master.port.to_string(),
            "--masteruser".into(),
            Self::REPLICATION_USER.into(),
            "--masterauth".into(),
            password,
        ]);
        let dir = std::env::temp_dir().join(unique("sentinels"));
        std::fs::create_dir_all(&dir).expect("create the Sentinels' dir");
        let sentinels = (0..3)
            .map(|i| {
                let port = free_port();
                // Sentinel rewrites its configuration file: each has its own.
                let conf = dir.join(format!("sentinel{i}.conf"));
                let text = format!(
                    "port {port}\nbind 127.0.0.1\ndir {dir}\n\
                     sentinel monitor {name} 127.0.0.1 {master} 2\n\
                     sentinel down-after-milliseconds {name} {down}\n\
                     sentinel failover-timeout {name} 3000\n",
                    dir = dir.display(),
                    master = master.port,
                    down = Self::DOWN_AFTER_MS,
                );
                std::fs::write(&conf, text).expect("write a Sentinel's configuration");
                let mut cmd = Command::new("redis-server");
                cmd.arg(&conf).arg("--sentinel");
                let mut process = Owned::default();
                process.respawn(cmd, port);
                (port, process)
            })
            .collect();
        let cluster = RedisSentinels {
            name,
            master,
            replica,
            sentinels,
            dir,
        };
        let start = Instant::now();
        while !cluster.ready() {
            assert!(
                start.elapsed() < START_WAIT,
                "the Sentinels did not all see the replica in sync and the two other Sentinels"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        cluster
    }

    /// The Sentinels' addresses, `127.0.0.1:<port>`, as `redis.sentinels` lists them.
    pub fn addrs(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|(port, _)| format!("127.0.0.1:{port}"))
            .collect()
    }

    /// The port of the master the Sentinels name now (the first that answers).
    pub fn master_port(&self) -> Option<u16> {
        self.sentinels.iter().find_map(|&(port, _)| {
            let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}"))
                .and_then(|c| c.get_connection())
                .ok()?;
            let (_, master_port): (String, u16) = redis::cmd("SENTINEL")
                .arg("GET-MASTER-ADDR-BY-NAME")
                .arg(&self.name)
                .query(&mut conn)
                .ok()?;
            Some(master_port)
        })
    }

    /// Cuts the replica off its master: it misses every write made on the master from now on (its
    /// user on the master is disabled, and its connection dropped).
    pub fn cut_replication(&self) {
        let mut conn = self.master.connect();
        redis::cmd("ACL")
            .arg("SETUSER")
            .arg(Self::REPLICATION_USER)
            .arg("off")
            .query::<()>(&mut conn)
            .expect("disable the replication user");
        redis::cmd("CLIENT")
            .arg("KILL")
            .arg("USER")
            .arg(Self::REPLICATION_USER)
            .query::<()>(&mut conn)
            .expect("drop the replica's connection");
    }

    /// Kills the master (SIGKILL): after [`RedisSentinels::DOWN_AFTER_MS`] the Sentinels agree it is
    /// down and promote the replica.
    pub fn kill_master(&mut self) {
        self.master.stop();
    }

    /// `SENTINEL <what> <name>` on the Sentinel at `port`: one map per server it lists.
    fn ask(
        &self,
        port: u16,
        what: &str,
    ) -> redis::RedisResult<Vec<std::collections::HashMap<String, String>>> {
        let mut conn =
            redis::Client::open(format!("redis://127.0.0.1:{port}"))?.get_connection()?;
        redis::cmd("SENTINEL")
            .arg(what)
            .arg(&self.name)
            .query(&mut conn)
    }

    /// Whether every Sentinel knows the replica, in sync with the master, and the two other Sentinels.
    fn ready(&self) -> bool {
        self.sentinels.iter().all(|&(port, _)| {
            let replicas = self.ask(port, "REPLICAS").unwrap_or_default();
            let others = self.ask(port, "SENTINELS").unwrap_or_default();
            let in_sync = replicas.len() == 1
                && replicas[0].get("master-link-status").map(String::as_str) == Some("ok");
            in_sync && others.len() == 2
        })
    }
}

impl Drop for RedisSentinels {
    fn drop(&mut self) {
        for (_, sentinel) in &mut self.sentinels {
            sentinel.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A private Postgres cluster (initdb) on a free port, in a temporary directory, stopped and removed on
/// drop. Run as the `postgres` user when the tests run as root (initdb refuses root).
///
/// [`PgServer::standby`] makes a streaming standby of it (`pg_basebackup -R`), which
/// [`PgServer::promote`] turns into a primary, as after [`PgServer::kill`] of the primary.
pub struct PgServer {
    pub port: u16,
    dir: PathBuf,
    /// Its WAL, where it is not under `dir`.
    wal: Option<PathBuf>,
    /// The server's log, outside its data directory (which may be on a disk that fills).
    log: PathBuf,
    bin: PathBuf,
    as_root: bool,
    /// The server's process, where this process started it itself ([`PgServer::start_tied`]);
    /// `pg_ctl` starts the others.
    postmaster: Owned,
}

impl PgServer {
    pub fn start() -> PgServer {
        Self::start_in(&std::env::temp_dir())
    }

    /// A private Postgres whose data directory (WAL included) is a new directory under `parent` (a
    /// small disk of the test's own, say). Its WAL segments are of 1 MiB, so that a cluster fits in
    /// some 30 MiB.
    pub fn start_in(parent: &Path) -> PgServer {
        Self::start_at(parent, None)
    }

    /// [`PgServer::start_in`], its WAL (`pg_wal`) in a new directory under `wal_parent` instead.
    pub fn start_with_wal_in(parent: &Path, wal_parent: &Path) -> PgServer {
        Self::start_at(parent, Some(wal_parent))
    }

    fn start_at(parent: &Path, wal_parent: Option<&Path>) -> PgServer {
        let server = Self::init_at(parent, wal_parent);
        server.resume();
        server
    }

    /// A private server killed with the thread that starts it ([`suite`]'s, which lasts as long as
    /// the process): `postgres` itself is that thread's child (`pg_ctl` would detach it), with room
    /// for a whole suite's connections.
    pub(crate) fn start_tied() -> PgServer {
        use std::os::unix::process::CommandExt;
        let mut server = Self::init_at(&std::env::temp_dir(), None);
        server.postmaster.tied = true;
        let mut cmd = Command::new(server.bin.join("postgres"));
        cmd.arg("-D")
            .arg(&server.dir)
            .args(["-p", &server.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1", "-c"])
            .arg(format!("unix_socket_directories={}", server.dir.display()))
            .args(["-c", "fsync=off", "-c", "max_connections=300"]);
        if server.as_root {
            let id = |flag: &str| -> u32 {
                let out = Command::new("id")
                    .args([flag, "postgres"])
                    .output()
                    .expect("id postgres");
                String::from_utf8_lossy(&out.stdout)
                    .trim()
                    .parse()
                    .expect("the postgres user's ids")
            };
            cmd.gid(id("-g")).uid(id("-u"));
        }
        server.postmaster.respawn(cmd, server.port);
        let start = Instant::now();
        while !server.accepting() {
            assert!(start.elapsed() < START_WAIT, "postgres did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    /// A new cluster (`initdb`), not started.
    fn init_at(parent: &Path, wal_parent: Option<&Path>) -> PgServer {
        let mut server = PgServer::empty_in(parent, "pg_cluster");
        server.wal = wal_parent.map(|p| p.join(unique("pg_wal")));
        let mut initdb = vec![
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-sync",
            "--wal-segsize=1",
            "-E",
            "UTF8",
        ];
        let waldir = server
            .wal
            .as_ref()
            .map(|w| w.to_string_lossy().into_owned());
        if let Some(waldir) = &waldir {
            initdb.extend(["-X", waldir.as_str()]);
        }
        initdb.push("-D");
        server.run("initdb", &initdb, true);
        server
    }

    /// A server not made yet: its tools, a free port and an empty directory (owned by `postgres`
    /// when running as root).
    fn empty(tag: &str) -> PgServer {
        Self::empty_in(&std::env::temp_dir(), tag)
    }

    /// [`PgServer::empty`], its directory under `parent`; its log outside it (the directory may be on
    /// a disk that fills).
    fn empty_in(parent: &Path, tag: &str) -> PgServer {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("Postgres under /usr/lib/postgresql")
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .find(|p| p.join("initdb").exists())
            .expect("initdb under /usr/lib/postgresql/*/bin");
        let as_root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        let dir = parent.join(unique(tag));
        std::fs::create_dir_all(&dir).expect("create the cluster dir");
        let server = PgServer {
            port: free_port(),
            dir,
            wal: None,
            log: std::env::temp_dir().join(format!("{}.log", unique("pg_log"))),
            bin,
            as_root,
            postmaster: Owned::default(),
        };
        if as_root {
            server.run("chown", &["-R", "postgres:postgres"], true);
            std::fs::File::create(&server.log).expect("the log file can be made");
            let _ = Command::new("chown")
                .arg("postgres:postgres")
                .arg(&server.log)
                .status();
        }
        server
    }

    /// A streaming standby of this server, started on a port of its own: a base backup
    /// (`pg_basebackup -R`, which writes `primary_conninfo` and `standby.signal`), replaying what the
    /// primary writes. It is asynchronous until [`PgServer::set_synchronous`] on the primary.
    pub fn standby(&self) -> PgServer {
        let standby = PgServer::empty("pg_standby");
        let port = self.port.to_string();
        standby.run(
            "pg_basebackup",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "-R",
                "-X",
                "stream",
                "--no-sync",
                "-D",
            ],
            true,
        );
        // Postgres starts only on a directory of its owner alone; it was made with the default mode.
        std::fs::set_permissions(
            &standby.dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .expect("the standby's directory made private");
        standby.resume();
        standby
    }

    /// Runs `sql` on the `postgres` database through `psql`, failing the test if it fails; its
    /// output, unaligned, without headers (`-At`).
    pub fn sql(&self, sql: &str) -> String {
        self.sql_on("postgres", sql)
    }

    /// [`PgServer::sql`] on `database`.
    pub fn sql_on(&self, database: &str, sql: &str) -> String {
        self.try_sql_on(database, sql)
            .unwrap_or_else(|e| panic!("{sql} failed: {e}"))
    }

    /// [`PgServer::sql_on`], its failure (the server's message) returned.
    pub fn try_sql_on(&self, database: &str, sql: &str) -> Result<String, String> {
        let out = self
            .command("psql")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args([
                "-U",
                "postgres",
                "-d",
                database,
                "-v",
                "ON_ERROR_STOP=1",
                "-At",
                "-c",
            ])
            .arg(sql)
            .output()
            .map_err(|e| format!("run psql: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Polls `sql` on `database` until it answers `want` (a failure, as of a database not made
    /// yet, counts as another answer), for at most [`START_WAIT`].
    pub fn wait_for_on(&self, database: &str, sql: &str, want: &str) {
        let start = Instant::now();
        loop {
            let got = self.try_sql_on(database, sql);
            if got.as_deref() == Ok(want) {
                return;
            }
            assert!(
                start.elapsed() < START_WAIT,
                "{sql} answers {got:?}, not {want:?}, after {START_WAIT:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// [`PgServer::wait_for_on`] the `postgres` database.
    pub fn wait_for(&self, sql: &str, want: &str) {
        self.wait_for_on("postgres", sql, want)
    }

    /// On a primary: with `true`, a commit waits until a standby has it on disk
    /// (`synchronous_standby_names = '*'`), and this returns once one streams synchronously; with
    /// `false`, commits wait for no standby.
    pub fn set_synchronous(&self, on: bool) {
        let names = if on { "*" } else { "" };
        self.sql(&format!(
            "ALTER SYSTEM SET synchronous_standby_names = '{names}'"
        ));
        self.sql("SELECT pg_reload_conf()");
        if on {
            self.wait_for(
                "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'",
                "1",
            );
        }
    }

    /// On a standby: stops receiving the primary's WAL (`primary_conninfo` emptied), and returns
    /// once its receiver has stopped. What the primary commits from then on is missing here, as on a
    /// standby that fell behind.
    pub fn stop_receiving(&self) {
        self.sql("ALTER SYSTEM SET primary_conninfo = ''");
        self.sql("SELECT pg_reload_conf()");
        self.wait_for("SELECT count(*) FROM pg_stat_wal_receiver", "0");
    }

    /// On a standby: makes it a primary (`pg_ctl promote`), and returns once it takes writes.
    pub fn promote(&self) {
        self.run("pg_ctl", &["-w", "promote", "-D"], true);
        self.wait_for("SELECT pg_is_in_recovery()", "f");
    }

    /// Kills the server with SIGKILL, the postmaster first (so that it restarts nothing), then every
    /// process it started, as the loss of its machine would; returns once the postmaster is gone.
    pub fn kill(&self) {
        let pid_file = self.dir.join("postmaster.pid");
        let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|text| text.lines().next()?.trim().parse::<u32>().ok())
        else {
            return;
        };
        let children = children_of(pid);
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
        for child in children {
            let _ = Command::new("kill")
                .args(["-KILL", &child.to_string()])
                .status();
        }
        let start = Instant::now();
        while process_runs(pid) {
            assert!(start.elapsed() < START_WAIT, "postmaster {pid} still runs");
            std::thread::sleep(Duration::from_millis(20));
        }
        // So that `pg_ctl` finds no server, whatever runs under that id later.
        let _ = std::fs::remove_file(pid_file);
    }

    /// A Postgres tool (or `chown`), as the `postgres` user when running as root.
    fn command(&self, tool: &str) -> Command {
        let program = if tool == "chown" {
            PathBuf::from("chown")
        } else {
            self.bin.join(tool)
        };
        if self.as_root && tool != "chown" {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        }
    }

    /// Runs a tool with the cluster directory as its last argument, failing the test if it fails.
    fn run(&self, tool: &str, args: &[&str], dir_last: bool) {
        let mut cmd = self.command(tool);
        cmd.args(args);
        if dir_last {
            cmd.arg(&self.dir);
        }
        let out = cmd.output().unwrap_or_else(|e| panic!("run {tool}: {e}"));
        if !out.status.success() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            panic!(
                "{tool} failed: {}\nthe server's log ends with:\n{}",
                String::from_utf8_lossy(&out.stderr),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }

    /// A URL for a database on this server.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// What the server wrote to its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the server runs and accepts connections (`pg_isready`).
    pub fn accepting(&self) -> bool {
        self.command("pg_isready")
            .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Whether the server's process runs (`pg_ctl status`): not once it shut down by itself (after a
    /// crash it could not recover from).
    pub fn running(&self) -> bool {
        self.command("pg_ctl")
            .args(["status", "-D"])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Stops the server at once (`-m immediate`, like a crash).
    pub fn stop(&self) {
        self.run("pg_ctl", &["-m", "immediate", "-w", "stop", "-D"], true);
    }

    /// Starts the server (again) and waits until it accepts connections.
    pub fn resume(&self) {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c fsync=off",
            self.port,
            self.dir.display()
        );
        let log = &self.log;
        self.run(
            "pg_ctl",
            &[
                "-w",
                "-o",
                &options,
                "-l",
                &log.to_string_lossy(),
                "start",
                "-D",
            ],
            true,
        );
    }
}

/// The processes whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
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
fn process_runs(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let after = &stat[stat.rfind(')')? + 1..];
            after.split_whitespace().next().map(|state| state != "Z")
        })
        .unwrap_or(false)
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .args(["-m", "immediate", "-w", "stop", "-D"])
            .arg(&self.dir)
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some(wal) = &self.wal {
            let _ = std::fs::remove_dir_all(wal);
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A TCP proxy in front of a server: [`Proxy::cut`] closes the client's connections and refuses new
/// ones until [`Proxy::restore`], while the server stays up. Start it inside a tokio runtime.
pub struct Proxy {
    pub port: u16,
    blocked: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// A proxy on a free port of loopback to `upstream` on loopback.
    pub async fn start(upstream: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let port = listener.local_addr().expect("the proxy's address").port();
        let blocked = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(Mutex::new(Vec::new()));
        let accept = tokio::spawn({
            let (blocked, connections) = (blocked.clone(), connections.clone());
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if blocked.load(Ordering::SeqCst) {
                        continue; // dropped: the connection is refused
                    }
                    let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    else {
                        continue;
                    };
                    let copy = tokio::spawn(async move {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    });
                    connections
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(copy);
                }
            }
        });
        Proxy {
            port,
            blocked,
            connections,
            accept,
        }
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Cuts every connection through the proxy and refuses new ones.
    pub fn cut(&self) {
        self.blocked.store(true, Ordering::SeqCst);
        for connection in self
            .connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            connection.abort();
        }
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.blocked.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
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
