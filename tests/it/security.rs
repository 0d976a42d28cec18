//! Per-service permissions on NATS, on a private nats-server started with the configuration that
//! `gpu-coordinator nats-auth` writes: a service cannot act for another, forge an output, or read
//! another's orders; the auditor reads the history and publishes nothing.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use gpu_coordinator::config::Config;
use gpu_coordinator::nats_auth::{self, Credentials};
use gpu_coordinator_client::{Client, RequestOptions};
use gpu_coordinator_wire::Subjects;

use crate::support::{eventually, test_config, Coordinator, NatsServer};

/// A private NATS with the permissions of `services`, and everyone's credentials.
struct Secured {
    server: NatsServer,
    users: BTreeMap<String, Credentials>,
    _dir: TempDir,
}

impl Secured {
    fn start(prefix: &str, services: &[&str]) -> Secured {
        Self::start_with_hosts(prefix, services, &[])
    }

    /// [`Secured::start`] with node agents for `hosts`.
    fn start_with_hosts(prefix: &str, services: &[&str], hosts: &[&str]) -> Secured {
        let dir = TempDir::new("nats_auth");
        let services: Vec<String> = services.iter().map(|s| s.to_string()).collect();
        let hosts: Vec<String> = hosts.iter().map(|s| s.to_string()).collect();
        let generated = nats_auth::generate(prefix, &services, &hosts, "127.0.0.1:4222")
            .expect("a configuration");
        nats_auth::write(&dir.0, &generated).expect("the files are written");
        // What a user reads back is what was written.
        let users: BTreeMap<String, Credentials> =
            serde_json::from_slice(&std::fs::read(dir.0.join("users.json")).expect("users.json"))
                .expect("users.json parses");
        let server = NatsServer::start_with_conf(Some(dir.0.join("nats-server.conf")));
        Secured {
            server,
            users,
            _dir: dir,
        }
    }

    fn url(&self, user: &str) -> String {
        self.users[user].url_at(&format!("127.0.0.1:{}", self.server.port))
    }

    /// A private NATS with the permissions of `services`, and a coordinator on it as its own user:
    /// the secured NATS, the coordinator's configuration and subjects, and the coordinator.
    async fn serving(tag: &str, services: &[&str]) -> (Secured, Config, Subjects, Coordinator) {
        let mut config = test_config(tag, &[("0", 24_000)]);
        let subjects = Subjects::new(&config.nats.prefix).unwrap();
        let nats = Secured::start(&config.nats.prefix, services);
        config.nats.url = nats.url("coordinator");
        let coordinator = Coordinator::start(config.clone()).await;
        (nats, config, subjects, coordinator)
    }
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let path = std::env::temp_dir().join(gpu_coordinator_test_support::unique(tag));
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A raw connection as one user that records the permission violations the server reports.
struct Intruder {
    client: async_nats::Client,
    js: jetstream::Context,
    violations: Arc<Mutex<Vec<String>>>,
}

impl Intruder {
    async fn connect(url: &str) -> Intruder {
        let violations = Arc::new(Mutex::new(Vec::new()));
        let seen = violations.clone();
        let client = gpu_coordinator_client::connect_options(url)
            .expect("a NATS URL")
            .event_callback(move |event| {
                let seen = seen.clone();
                async move {
                    if let async_nats::Event::ServerError(e) = event {
                        seen.lock().unwrap().push(e.to_string());
                    }
                }
            })
            .connect(url)
            .await
            .expect("the user connects");
        let mut js = jetstream::new(client.clone());
        js.set_timeout(Duration::from_secs(1));
        Intruder {
            client,
            js,
            violations,
        }
    }

    /// Waits until the server reported a violation naming `subject`.
    async fn refused(&self, what: &str, subject: &str) {
        let quoted = format!("\"{subject}\"");
        eventually(&format!("{what} on {subject} is refused"), || async {
            self.violations
                .lock()
                .unwrap()
                .iter()
                .any(|v| v.contains("Permissions Violation") && v.contains(&quoted))
                .then_some(())
        })
        .await;
    }

    async fn publish_refused(&self, subject: String) {
        self.client
            .publish(
                subject.clone(),
                r#"{"request_id":"b-1","action":"paused"}"#.into(),
            )
            .await
            .expect("the publish leaves the client");
        self.client.flush().await.expect("flush");
        self.refused("a publish", &subject).await;
    }
}

#[tokio::test]
async fn a_service_cannot_act_for_another_forge_outputs_or_read_its_orders() {
    let (nats, config, subjects, coordinator) = Secured::serving("sec_perm", &["a", "b"]).await;
    let prefix = config.nats.prefix.clone();

    // B holds part of the GPU, at background priority.
    let b = Client::connect(&nats.url("b"), &prefix, "b")
        .await
        .expect("b connects with its credentials");
    let lease = b
        .request(
            RequestOptions::new(2)
                .request_id("b-1")
                .vram_mb(10_000)
                .lease_ms(600_000),
        )
        .await
        .expect("b is granted through its own consumers");
    let fence = lease.fence();

    let a = Intruder::connect(&nats.url("a")).await;
    // A acts for B: release, renew, ACK, cancel, a request in B's name.
    for subject in [
        subjects.release("b"),
        subjects.renew("b"),
        subjects.ack("b"),
        subjects.cancel("b"),
        subjects.request("b"),
    ] {
        a.publish_refused(subject).await;
    }
    // A forges outputs: a reply, a control order, an event.
    for subject in [
        subjects.reply("b"),
        subjects.control("b"),
        subjects.event(gpu_coordinator_wire::EventKind::Granted, "a"),
        subjects.reply("a"),
    ] {
        a.publish_refused(subject).await;
    }
    // A reads B's orders: a core subscription, or a consumer filtered to them (named or not).
    let _sub = a
        .client
        .subscribe(subjects.control("b"))
        .await
        .expect("the subscription leaves the client");
    a.client.flush().await.expect("flush");
    a.refused("a subscription", &subjects.control("b")).await;
    let output =
        a.js.get_stream(subjects.output_stream())
            .await
            .expect("a may look at the output stream");
    // Nor a push consumer on its own replies whose deliver subject is B's release: nats-server would
    // publish A's replies there with its own rights, and they would be stored as B's releases.
    for (name, filter) in [
        (Some("push".to_owned()), subjects.reply("a")),
        (None, subjects.reply("a")),
    ] {
        let made = output
            .create_consumer(consumer::push::Config {
                name,
                deliver_subject: subjects.release("b"),
                filter_subject: filter.clone(),
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await;
        assert!(
            made.is_err(),
            "a pushing {filter} onto b's release was made"
        );
    }
    for (name, filter) in [
        (Some("peek".to_owned()), subjects.control("b")),
        (None, subjects.control("b")),
        (Some("peek2".to_owned()), format!("{prefix}.>")),
    ] {
        let made = output
            .create_consumer(consumer::pull::Config {
                name,
                filter_subject: filter.clone(),
                ..Default::default()
            })
            .await;
        assert!(made.is_err(), "a consumer on {filter} was made for a");
    }
    // Nor can A list the consumers, to pull from B's by its name.
    let mut names = output.consumer_names();
    use futures::StreamExt as _;
    assert!(
        matches!(names.next().await, None | Some(Err(_))),
        "a could list the consumers of the output stream"
    );

    // Every attempt left B's lease as it was.
    let status = b.status().await.expect("b may ask for the status");
    let holders = &status.gpus[0].holders;
    assert_eq!(holders.len(), 1);
    assert_eq!(
        (holders[0].request_id.as_str(), holders[0].fence),
        ("b-1", fence)
    );
    let input = b
        .nats()
        .expect("a NATS client")
        .request(
            format!("$JS.API.STREAM.INFO.{}", subjects.input_stream()),
            "".into(),
        )
        .await
        .expect("b may look at the input stream");
    let info: serde_json::Value = serde_json::from_slice(&input.payload).unwrap();
    assert_eq!(
        info["state"]["messages"], 1,
        "only b's request was stored: {info}"
    );

    // A's own flow works: it preempts B, and B gets its pause through its own consumer.
    let a_client = Client::connect(&nats.url("a"), &prefix, "a")
        .await
        .expect("a connects");
    let urgent = tokio::spawn(async move {
        a_client
            .request(RequestOptions::new(0).request_id("a-1").vram_mb(20_000))
            .await
    });
    let mut events = lease.events();
    loop {
        let event = tokio::time::timeout(crate::support::DEADLINE, events.recv())
            .await
            .expect("b hears from the coordinator in time")
            .expect("b's lease goes on");
        if let gpu_coordinator_client::LeaseEvent::Pausing { fence: paused, .. } = event {
            assert_eq!(paused, fence);
            break;
        }
    }
    drop(events);
    drop(lease);
    drop(urgent);
    drop(b);
    coordinator.stop().await.expect("stops cleanly");
}

#[tokio::test]
async fn the_auditor_reads_the_history_and_publishes_nothing() {
    let (nats, config, subjects, coordinator) = Secured::serving("sec_audit", &["a"]).await;
    let prefix = config.nats.prefix.clone();
    let a = Client::connect(&nats.url("a"), &prefix, "a")
        .await
        .expect("a connects");
    let lease = a
        .request(RequestOptions::new(1).request_id("a-1").vram_mb(1_000))
        .await
        .expect("granted");
    lease.release().await.expect("released");

    let mut auditor_config = config.clone();
    auditor_config.nats.url = nats.url("auditor");
    let summary =
        gpu_coordinator::app::audit::run(&auditor_config, gpu_coordinator::audit::Since::Start)
            .await
            .expect("the auditor reads the output stream")
            .expect("the history holds every rule");
    assert_eq!(summary.grants, 1, "{summary}");

    let auditor = Intruder::connect(&nats.url("auditor")).await;
    for subject in [
        subjects.request("a"),
        subjects.reply("a"),
        subjects.event(gpu_coordinator_wire::EventKind::Granted, "a"),
        subjects.status(),
    ] {
        auditor.publish_refused(subject).await;
    }
    coordinator.stop().await.expect("stops cleanly");
}

#[tokio::test]
async fn a_wrong_password_is_a_clear_error() {
    let nats = Secured::start("gpu", &["a"]);
    let url = nats.url("a").replace(&nats.users["a"].password, "wrong");
    let Err(error) = Client::connect(&url, "gpu", "a").await else {
        panic!("a wrong password is refused");
    };
    let text = error.to_string();
    assert!(text.contains("authorization"), "{text}");
    assert!(!text.contains("wrong"), "the password is shown: {text}");
}

/// A request id belongs to its service: A using `b-1` first neither takes B's `b-1` nor blocks it,
/// and A ending its own `b-1` leaves B's alone.
#[tokio::test]
async fn request_ids_are_scoped_to_their_service() {
    use serde_json::json;
    let config = test_config("sec_ids", &[("0", 24_000)]);
    let coordinator = Coordinator::start(config.clone()).await;
    let mut probe = crate::support::Probe::new(&config.nats.url, &config.nats.prefix).await;
    probe
        .pub_json(
            "request",
            "a",
            json!({"request_id": "b-1", "priority": 1, "vram_mb": 1_000, "lease_ms": 600_000}),
        )
        .await;
    let a = probe.reply("b-1", "granted").await;
    probe
        .pub_json(
            "request",
            "b",
            json!({"request_id": "b-1", "priority": 1, "vram_mb": 1_000, "lease_ms": 600_000}),
        )
        .await;
    let prefix = format!("{}.reply.b", config.nats.prefix);
    let b = probe
        .expect("b's own grant of b-1", |s| {
            s.subject == prefix && s.str("outcome") == Some("granted")
        })
        .await
        .reply();
    assert_eq!(b.request_id, "b-1");
    assert_ne!(a.fence, b.fence, "two leases, two fences");
    probe
        .pub_json(
            "release",
            "a",
            json!({"request_id": "b-1", "fence": a.fence}),
        )
        .await;
    probe.reply("b-1", "released").await;
    let status = probe.status().await;
    let holders: Vec<(&str, &str)> = status.gpus[0]
        .holders
        .iter()
        .map(|h| (h.service_id.as_str(), h.request_id.as_str()))
        .collect();
    assert_eq!(holders, [("b", "b-1")], "b still holds its own b-1");
    let verdict = gpu_coordinator::app::audit::run(&config, gpu_coordinator::audit::Since::Start)
        .await
        .expect("the history can be read");
    assert!(
        verdict.is_ok(),
        "the audit tells the two apart: {verdict:?}"
    );
    coordinator.stop().await.expect("stops cleanly");
}

/// A status question whose reply subject is not an inbox gets no answer: answered with the
/// coordinator's rights on `<p>.release.b` it would be stored as B's release (the status document
/// decodes as a release of everything B holds), on `$JS.API.STREAM.PURGE.<P>_INPUT` it would purge the
/// coordinator's own input stream.
#[tokio::test]
async fn status_is_answered_on_inboxes_only() {
    let (nats, config, subjects, coordinator) = Secured::serving("sec_status", &["a", "b"]).await;
    let prefix = config.nats.prefix.clone();
    let b = Client::connect(&nats.url("b"), &prefix, "b")
        .await
        .expect("b connects");
    let lease = b
        .request(
            RequestOptions::new(2)
                .request_id("b-1")
                .vram_mb(10_000)
                .lease_ms(600_000),
        )
        .await
        .expect("b is granted");
    let a = Intruder::connect(&nats.url("a")).await;
    for reply in [
        subjects.release("b"),
        format!("$JS.API.STREAM.PURGE.{}", subjects.input_stream()),
    ] {
        a.client
            .publish_with_reply(subjects.status(), reply, r#"{"limit":0}"#.into())
            .await
            .expect("a may ask for the status");
    }
    // The coordinator reads status questions in order: once a's own question is answered, the two
    // above were handled, and anything the coordinator published for them was stored before it.
    let answer = a
        .client
        .request(subjects.status(), "".into())
        .await
        .expect("a's own status question, on its inbox, is answered");
    let _: gpu_coordinator_wire::StatusDoc =
        serde_json::from_slice(&answer.payload).expect("a status document");
    // An input of a's stored after them is handled after anything they caused.
    let a_client = Client::connect(&nats.url("a"), &prefix, "a")
        .await
        .expect("a connects");
    a_client
        .request(RequestOptions::new(1).request_id("a-1").vram_mb(1_000))
        .await
        .expect("a is granted beside b")
        .release()
        .await
        .expect("a releases");
    let status = b.status().await.expect("b may ask for the status");
    let holders: Vec<(&str, u64)> = status.gpus[0]
        .holders
        .iter()
        .map(|h| (h.request_id.as_str(), h.fence))
        .collect();
    assert_eq!(holders, [("b-1", lease.fence())], "b's lease is untouched");
    let input = b
        .nats()
        .expect("a NATS client")
        .request(
            format!("$JS.API.STREAM.INFO.{}", subjects.input_stream()),
            "".into(),
        )
        .await
        .expect("b may look at the input stream");
    let info: serde_json::Value = serde_json::from_slice(&input.payload).unwrap();
    assert_eq!(
        info["state"]["messages"], 3,
        "b's request, a's request and release, and nothing else, are stored: {info}"
    );
    drop(lease);
    coordinator.stop().await.expect("stops cleanly");
}

/// The auditor can make no consumer (one with a deliver subject would push the history anywhere), and
/// cannot pull from, change or delete the coordinator's input consumer (pulling an input takes it from
/// the coordinator, which then never answers it); the coordinator goes on handling inputs.
#[tokio::test]
async fn the_auditor_cannot_take_or_stall_the_inputs() {
    let (nats, config, subjects, coordinator) = Secured::serving("sec_auditor", &["a"]).await;
    let prefix = config.nats.prefix.clone();
    let a = Client::connect(&nats.url("a"), &prefix, "a")
        .await
        .expect("a connects");
    a.request(RequestOptions::new(1).request_id("a-1").vram_mb(1_000))
        .await
        .expect("granted")
        .release()
        .await
        .expect("released");

    let auditor = Intruder::connect(&nats.url("auditor")).await;
    let input = subjects.input_stream();
    let consumer = gpu_coordinator::adapters::nats::CONSUMER;
    for subject in [
        format!("$JS.API.CONSUMER.MSG.NEXT.{input}.{consumer}"),
        format!("$JS.API.CONSUMER.DELETE.{input}.{consumer}"),
        format!("$JS.API.CONSUMER.DURABLE.CREATE.{input}.{consumer}"),
        format!("$JS.API.CONSUMER.CREATE.{input}.{consumer}"),
        format!("$JS.API.CONSUMER.CREATE.{input}"),
        format!("$JS.API.CONSUMER.CREATE.{}.x", subjects.output_stream()),
    ] {
        auditor.publish_refused(subject).await;
    }
    let stream = auditor
        .js
        .get_stream(subjects.output_stream())
        .await
        .expect("the auditor may look at the output stream");
    let pushed = stream
        .create_consumer(consumer::push::Config {
            deliver_subject: subjects.reply("a"),
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await;
    assert!(
        pushed.is_err(),
        "the auditor pushed the history onto a's replies"
    );

    // The coordinator still answers every input, and the auditor still reads the whole history.
    a.request(RequestOptions::new(1).request_id("a-2").vram_mb(1_000))
        .await
        .expect("granted after the auditor's attempts")
        .release()
        .await
        .expect("released");
    let mut auditor_config = config.clone();
    auditor_config.nats.url = nats.url("auditor");
    let summary =
        gpu_coordinator::app::audit::run(&auditor_config, gpu_coordinator::audit::Since::Start)
            .await
            .expect("the auditor reads both streams")
            .expect("the history holds every rule");
    assert_eq!(summary.grants, 2, "{summary}");
    coordinator.stop().await.expect("stops cleanly");
}

/// A node agent publishes only its own host's samples: it cannot publish another host's subject nor
/// any input, a sample on its own subject that names another host is refused by the coordinator,
/// and a service cannot publish a host's samples.
#[tokio::test]
async fn an_agent_speaks_only_for_its_own_host() {
    let mut config = crate::fleet::fleet_config("sec_agent");
    let subjects = Subjects::new(&config.nats.prefix).unwrap();
    let nats = Secured::start_with_hosts(&config.nats.prefix, &["a"], &["h1", "h2"]);
    config.nats.url = nats.url("coordinator");
    let coordinator = Coordinator::start(config.clone()).await;
    let mut agent_config = config.clone();
    agent_config.nats.url = nats.url("agent-h1");
    let _agent = crate::fleet::Agent::start(&agent_config, "h1", &[("0", 24_000)]);
    let status_of = || async {
        let answer = reqwest::get(coordinator.url("/gpu/status")).await.ok()?;
        answer.json::<gpu_coordinator_wire::StatusDoc>().await.ok()
    };
    eventually("h1 is heard through its own user", || async {
        let status = status_of().await?;
        crate::fleet::host_state(&status, "h1").map(|_| ())
    })
    .await;

    let agent = Intruder::connect(&nats.url("agent-h1")).await;
    agent.publish_refused(subjects.node("h2")).await;
    agent.publish_refused(subjects.request("a")).await;
    agent.publish_refused(subjects.status()).await;
    // On its own subject, a body that names h2: refused by the coordinator, h2 never appears.
    let forged = serde_json::json!({"host": "h2", "at": 1, "interval_ms": 200, "source": "config",
        "gpus": [{"id": "0", "total_mb": 80_000, "used_mb": 0, "healthy": true}]});
    for _ in 0..5 {
        agent
            .client
            .publish(subjects.node("h1"), forged.to_string().into())
            .await
            .expect("the publish leaves the client");
    }
    agent.client.flush().await.expect("flush");
    let service = Intruder::connect(&nats.url("a")).await;
    service.publish_refused(subjects.node("h2")).await;
    eventually(
        "the coordinator refused the five forged samples",
        || async {
            let text = reqwest::get(coordinator.url("/metrics"))
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            text.contains("gpu_coordinator_node_samples_refused_total 5")
                .then_some(())
        },
    )
    .await;
    // After the forged samples and later good ones: only h1, with its own GPU.
    let status = eventually("a good sample of h1 after the forged ones", || async {
        let status = status_of().await?;
        let h1 = status.hosts.iter().find(|h| h.host == "h1")?;
        (h1.last_sample_age_ms < 150).then_some(status)
    })
    .await;
    let hosts: Vec<&str> = status.hosts.iter().map(|h| h.host.as_str()).collect();
    assert_eq!(hosts, ["h1"]);
    let gpus: Vec<(&str, u64)> = status
        .gpus
        .iter()
        .map(|g| (g.id.as_str(), g.total_mb))
        .collect();
    assert_eq!(gpus, [("h1/0", 24_000)]);
    coordinator.stop().await.expect("stops cleanly");
}
