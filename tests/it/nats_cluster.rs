//! The distributed mode on a NATS cluster: `nats.url` lists three servers, `nats.replicas = 3`, and
//! the node that leads the input stream is killed with SIGKILL while services work. No input whose
//! publish was acknowledged is lost, the lease holder keeps its lease, and the history passes `audit`.
//! A start that asks for more replicas than the cluster has servers, or whose `nats.url` cannot be
//! parsed, is refused with a message naming the key; streams that exist with other replicas are
//! updated.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream::{self, stream};
use gpu_coordinator::config::Config;
use gpu_coordinator_client::{Client, LeaseEvent, RequestOptions};
use gpu_coordinator_wire::Subjects;
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::client::{joined, next_event};
use crate::support::{
    nats_connect, test_config, unique, Coordinator, NatsCluster, NatsServer, DEADLINE,
};

/// The holder's lease, the default: renewed every 10 s, it rides out the streams' leader elections
/// (5-8 s with nats-server 2.9) and a reader of the client made anew after two missed heartbeats.
const LEASE_MS: u64 = 30_000;

/// How many acknowledged requests the publisher makes before the kill, and after it.
const BEFORE: usize = 20;
const AFTER: usize = 30;

/// `config` on the cluster `nodes`, its leadership steady on a loaded machine: a Postgres renewal
/// that comes late, or a clock reading skewed by a slow round trip, would hand the term on, which is
/// another test's matter (`ha`, `clocks`) and here only noise.
fn on_cluster(mut config: Config, nodes: &NatsCluster) -> Config {
    config.nats.url = nodes.urls();
    config.leader.ttl_ms = 5_000;
    config.leader.max_clock_skew_ms = 0;
    config
}

/// A 3-node cluster, started off the async runtime (it waits for JetStream's meta leader).
async fn cluster(size: usize) -> NatsCluster {
    joined(
        "the NATS cluster's start",
        tokio::task::spawn_blocking(move || NatsCluster::start(size)),
    )
    .await
}

/// A stream's configured replicas and the server that leads it now.
async fn placement(js: &jetstream::Context, name: &str) -> (usize, Option<String>) {
    let mut stream = js.get_stream(name).await.expect("the stream exists");
    let info = stream.info().await.expect("the stream's info");
    (
        info.config.num_replicas,
        info.cluster.as_ref().and_then(|c| c.leader.clone()),
    )
}

/// The request ids of the replies the output stream holds, read message by message from its leader
/// (no consumer: nats-server 2.9 may place a new consumer on a server that is down, and the call
/// then waits for its timeout).
#[derive(Default)]
pub(crate) struct Replies {
    /// The next stream sequence to read.
    next: u64,
    pub(crate) ids: BTreeSet<String>,
    /// The highest fence of the replies read.
    pub(crate) max_fence: u64,
}

impl Replies {
    /// Reads what the stream stored since the last call.
    pub(crate) async fn read(&mut self, js: &jetstream::Context, subjects: &Subjects, svc: &str) {
        let Ok(mut stream) = js.get_stream(subjects.output_stream()).await else {
            return;
        };
        let Ok(info) = stream.info().await else {
            return;
        };
        let (first, last) = (info.state.first_sequence, info.state.last_sequence);
        let subject = subjects.reply(svc);
        for seq in self.next.max(first)..=last {
            let Ok(msg) = stream.get_raw_message(seq).await else {
                return;
            };
            self.next = seq + 1;
            if msg.subject.as_str() != subject {
                continue;
            }
            if let Ok(reply) = serde_json::from_slice::<serde_json::Value>(&msg.payload) {
                if let Some(id) = reply.get("request_id").and_then(|v| v.as_str()) {
                    self.ids.insert(id.to_owned());
                }
                if let Some(fence) = reply.get("fence").and_then(|v| v.as_u64()) {
                    self.max_fence = self.max_fence.max(fence);
                }
            }
        }
    }
}

impl Replies {
    /// Reads the stream until every request of `wanted` is answered, failing after `deadline` with
    /// the ones that are not.
    pub(crate) async fn wait_for_all(
        &mut self,
        js: &jetstream::Context,
        subjects: &Subjects,
        svc: &str,
        wanted: &BTreeSet<String>,
        deadline: Duration,
    ) {
        let start = Instant::now();
        loop {
            self.read(js, subjects, svc).await;
            let missing: Vec<&String> = wanted.difference(&self.ids).collect();
            if missing.is_empty() {
                return;
            }
            assert!(
                start.elapsed() < deadline,
                "{} acknowledged request(s) never answered, among them {:?}",
                missing.len(),
                &missing[..missing.len().min(10)]
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Publishes requests of 1 MB for the service `load` one after the other, each retried with the same
/// `Nats-Msg-Id` until JetStream acknowledges it (stored once however often it is sent), until
/// `stop`, pausing while `limit` were. Records each acknowledged request id with when it was acknowledged.
fn publisher(
    js: jetstream::Context,
    subjects: Subjects,
    acked: Arc<Mutex<Vec<(String, Instant)>>>,
    count: watch::Sender<usize>,
    mut limit: watch::Receiver<usize>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let mut retries = 0;
        let tag = unique("load").replace('_', "-");
        for n in 0usize.. {
            tokio::select! {
                () = stop.cancelled() => break,
                raised = limit.wait_for(|&l| n < l) => if raised.is_err() { break },
            }
            let id = format!("{tag}-{n}");
            let body = json!({"request_id": id, "priority": 1, "vram_mb": 1, "gpu": "1"});
            let payload = serde_json::to_vec(&body).expect("json");
            let started = Instant::now();
            loop {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Nats-Msg-Id", id.as_str());
                let stored = match js
                    .publish_with_headers(subjects.request("load"), headers, payload.clone().into())
                    .await
                {
                    Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                match stored {
                    Ok(()) => break,
                    Err(e) => {
                        assert!(
                            started.elapsed() < DEADLINE,
                            "request {id} not acknowledged within {DEADLINE:?}: {e}"
                        );
                        retries += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            acked
                .lock()
                .expect("the list of acknowledged requests")
                .push((id, Instant::now()));
            count.send_modify(|c| *c += 1);
        }
        retries
    })
}

/// A [`publisher`] running, and what it has done.
pub(crate) struct Load {
    /// The requests JetStream acknowledged, with when.
    acked: Arc<Mutex<Vec<(String, Instant)>>>,
    /// How many.
    count: watch::Receiver<usize>,
    /// How many it publishes, for now.
    limit: watch::Sender<usize>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<usize>,
}

impl Load {
    /// Starts publishing to the input stream of `subjects` on `nats_url`.
    pub(crate) async fn start(nats_url: &str, subjects: &Subjects) -> Load {
        let acked = Arc::new(Mutex::new(Vec::new()));
        let (count_tx, count) = watch::channel(0usize);
        let stop = CancellationToken::new();
        let (limit, limit_rx) = watch::channel(usize::MAX);
        let task = publisher(
            jetstream::new(nats_connect(nats_url).await),
            subjects.clone(),
            acked.clone(),
            count_tx,
            limit_rx,
            stop.clone(),
        );
        Load {
            acked,
            count,
            limit,
            stop,
            task,
        }
    }

    /// Publishes `more` requests beyond those acknowledged so far, then pauses until asked again:
    /// the work a failover leaves behind stays bounded however long it takes. The total.
    pub(crate) fn publish_more(&self, more: usize) -> usize {
        let total = self.count() + more;
        self.limit.send_replace(total);
        total
    }

    /// How many requests were acknowledged so far.
    pub(crate) fn count(&self) -> usize {
        *self.count.borrow()
    }

    /// Waits until `n` requests in all were acknowledged, for at most [`DEADLINE`].
    pub(crate) async fn wait_for(&mut self, n: usize, what: &str) {
        tokio::time::timeout(DEADLINE, self.count.wait_for(|&c| c >= n))
            .await
            .unwrap_or_else(|_| panic!("{what}: fewer than {n} requests acknowledged"))
            .expect("the publisher runs");
    }

    /// Stops publishing: the requests acknowledged, with when, and how many publishes were retried.
    pub(crate) async fn stop(self) -> (Vec<(String, Instant)>, usize) {
        self.stop.cancel();
        let retries = joined("the publisher", self.task).await;
        let acked = self.acked.lock().expect("the list").clone();
        (acked, retries)
    }
}

/// R3 streams on a 3-node cluster; the node leading the input stream dies (SIGKILL) while a lease is
/// held and requests keep coming: every request JetStream acknowledged is answered, the lease is
/// renewed through the failover and never revoked, and the history keeps every rule.
#[tokio::test]
async fn an_r3_input_stream_loses_no_acknowledged_input_when_its_leader_is_killed() {
    let began = Instant::now();
    let mut nodes = cluster(3).await;
    let mut config = on_cluster(
        test_config("nc_r3", &[("0", 24_000), ("1", 24_000)]),
        &nodes,
    );
    config.nats.replicas = 3;
    let subjects = Subjects::new(&config.nats.prefix).expect("a valid prefix");
    let clustered = began.elapsed();
    let coordinator = Coordinator::start(config.clone()).await;
    let js = jetstream::new(nats_connect(&config.nats.url).await);
    for name in [subjects.input_stream(), subjects.output_stream()] {
        assert_eq!(placement(&js, &name).await.0, 3, "{name} has 3 replicas");
    }
    println!(
        "the cluster started in {clustered:?}, the coordinator on it in {:?}",
        began.elapsed() - clustered
    );

    // A holder, through the Rust client given the comma-separated list.
    let holder = Client::connect(&config.nats.url, &config.nats.prefix, "holder")
        .await
        .expect("the client connects to the cluster");
    let lease = holder
        .request(
            RequestOptions::new(1)
                .vram_mb(8_000)
                .gpu("0")
                .lease_ms(LEASE_MS),
        )
        .await
        .expect("granted");
    let fence = lease.fence();
    // Subscribed before the kill: no renewal after it goes unseen.
    let mut events = lease.events();

    // Requests keep coming, each acknowledged by JetStream before the next.
    let mut load = Load::start(&config.nats.url, &subjects).await;
    load.wait_for(BEFORE, "before the kill").await;

    let (_, leader) = placement(&js, &subjects.input_stream()).await;
    let leader = leader.expect("the input stream has a leader");
    let victim = nodes
        .index_of(&leader)
        .expect("a node of the cluster leads");
    let nodes_task = tokio::task::spawn_blocking(move || {
        nodes.kill(victim);
        nodes
    });
    let nodes = joined("the kill of the leader", nodes_task).await;
    let (killed_at, killed_wall) = (Instant::now(), SystemTime::now());
    let before = load.count();
    load.wait_for(before + AFTER, "after the kill").await;
    let (acked, retries) = load.stop().await;
    let first_after = acked
        .iter()
        .find(|(_, at)| *at > killed_at)
        .map(|(_, at)| at.duration_since(killed_at));
    println!(
        "killed {leader} (leader of {}); first acknowledged input {first_after:?} after it, \
         {retries} publish retries",
        subjects.input_stream()
    );
    let (_, new_leader) = placement(&js, &subjects.input_stream()).await;
    assert!(
        new_leader.as_deref().is_some_and(|l| l != leader),
        "another node leads the input stream: {new_leader:?}"
    );

    // Every acknowledged input is answered: none was lost with the node.
    let wanted: BTreeSet<String> = acked.iter().map(|(id, _)| id.clone()).collect();
    let mut replies = Replies::default();
    replies
        .wait_for_all(&js, &subjects, "load", &wanted, DEADLINE)
        .await;
    println!(
        "every acknowledged request answered {:?} after the kill",
        killed_at.elapsed()
    );

    // The holder's lease is renewed through the failover (a renewal stored after the kill) and was
    // never revoked.
    let renewed = next_event(&mut events, "a renewal after the kill", |e| {
        matches!(e, LeaseEvent::Renewed { expires_at }
            if *expires_at >= killed_wall + Duration::from_millis(LEASE_MS - 1_000))
    })
    .await;
    println!(
        "the lease renewed {:?} after the kill: {renewed:?}",
        killed_at.elapsed()
    );
    assert!(!lease.is_revoked());
    assert_eq!(lease.fence(), fence);
    let status = holder.status().await.expect("the status");
    let held = status
        .gpus
        .iter()
        .flat_map(|g| &g.holders)
        .find(|h| h.request_id == lease.request_id())
        .expect("the coordinator still shows the lease held");
    assert_eq!(held.fence, fence);

    lease.release().await.expect("released");
    coordinator.stop_and_audit().await;
    drop(nodes);
    println!("the whole test took {:?}", began.elapsed());
}

/// Starts a coordinator with `config` and waits for it to stop by itself, as a refused start does.
async fn refused(config: Config) -> String {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .expect("bind an HTTP port");
    let ended = tokio::time::timeout(
        DEADLINE,
        gpu_coordinator::app::run(config, listener, CancellationToken::new()),
    )
    .await
    .expect("the start is refused, not retried");
    format!("{:#}", ended.expect_err("the start is refused"))
}

/// A server that is not clustered keeps one copy of a stream: more replicas are refused at start,
/// naming the key, rather than retried for ever.
#[tokio::test]
async fn replicas_on_a_single_server_are_refused_at_start() {
    let single = tokio::task::spawn_blocking(NatsServer::start);
    let single = joined("a nats-server's start", single).await;
    let mut config = test_config("nc_r3single", &[("0", 24_000)]);
    config.nats.url = single.url();
    config.nats.replicas = 3;
    let msg = refused(config).await;
    assert!(msg.contains("nats.replicas = 3"), "{msg}");
    assert!(msg.contains("not part of a cluster"), "{msg}");
}

/// A `nats.url` list with an entry that is not a NATS URL stops `serve` at once, naming the key,
/// rather than being retried for ever as a server that does not answer.
#[tokio::test]
async fn a_malformed_nats_url_list_is_refused_naming_the_key() {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_gpu-coordinator"))
        .arg("serve")
        .env(
            "GPU_COORDINATOR_NATS__URL",
            "nats://127.0.0.1:4222,nats://127.0.0.1:42x2",
        )
        .env("GPU_COORDINATOR_HTTP__LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(DEADLINE, output)
        .await
        .expect("serve stops at once")
        .expect("run gpu-coordinator serve");
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{text}");
    assert!(text.contains("nats.url"), "{text}");
    assert!(
        text.contains("`nats://127.0.0.1:42x2` is not a NATS URL"),
        "{text}"
    );
}

/// On a 3-node cluster: 5 replicas never fit, and the start stops, naming the key and the servers,
/// rather than retrying for ever. Existing streams of 1 replica (input, output, and the journal stream
/// of `database.write_behind`) are updated to `nats.replicas = 3` at start (JetStream copies them to
/// more servers in place), keeping what they hold.
#[tokio::test]
async fn replicas_are_checked_against_the_cluster_and_existing_streams_updated() {
    let nodes = cluster(3).await;
    let mut config = on_cluster(test_config("nc_r5", &[("0", 24_000)]), &nodes);
    config.nats.replicas = 5;
    let msg = refused(config).await;
    assert!(msg.contains("nats.replicas = 5"), "{msg}");
    assert!(msg.contains("has 3 server(s)"), "{msg}");

    let mut config = on_cluster(test_config("nc_scale", &[("0", 24_000)]), &nodes);
    // The journal stream too.
    config.database.write_behind = true;
    let subjects = Subjects::new(&config.nats.prefix).expect("a valid prefix");
    let first = Coordinator::start(config.clone()).await;
    let js = jetstream::new(nats_connect(&config.nats.url).await);
    assert_eq!(placement(&js, &subjects.output_stream()).await.0, 1);
    let client = Client::connect(&config.nats.url, &config.nats.prefix, "svc")
        .await
        .expect("connects");
    let lease = client
        .request(RequestOptions::new(1).vram_mb(1_000))
        .await
        .expect("granted");
    lease.release().await.expect("released");
    first.stop().await.expect("stops cleanly");

    config.nats.replicas = 3;
    let second = Coordinator::start(config.clone()).await;
    let journal = js
        .get_stream(subjects.journal_stream())
        .await
        .expect("the journal stream")
        .cached_info()
        .config
        .num_replicas;
    assert_eq!(journal, 3, "the journal stream updated to 3 replicas");
    for name in [subjects.input_stream(), subjects.output_stream()] {
        let mut stream = js.get_stream(&name).await.expect("the stream");
        let info = stream.info().await.expect("its info");
        assert_eq!(info.config.num_replicas, 3, "{name} updated to 3 replicas");
        assert!(info.state.messages > 0, "{name} keeps its messages");
        assert_eq!(info.config.storage, stream::StorageType::File);
    }
    second.stop().await.expect("stops cleanly");
    drop(nodes);
}
