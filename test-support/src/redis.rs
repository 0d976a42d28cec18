//! A private redis-server, or a master with a replica and three Sentinels.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::{free_port, unique, Owned, START_WAIT};

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
