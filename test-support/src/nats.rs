//! A private nats-server, or a cluster of them.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{free_port, unique, Owned, START_WAIT};

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
    /// [`Proxy`](crate::Proxy) in front of each node and cut a client off the whole cluster.
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

    /// Waits until node `i`'s `/healthz` answers ok, for at most `START_WAIT` (20 s).
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
