//! `gpu-coordinator nats-auth`: a nats-server configuration with one user per service, one for the
//! coordinator and one read-only auditor, and the file of their passwords.
//!
//! What each user may do (`<p>` the subject prefix, `<P>` the stream base, e.g. `gpu` and `GPU`):
//!
//! - a **service** `<svc>` publishes only its own inputs (`<p>.request|release|renew|ack|cancel.<svc>`),
//!   `<p>.status` and `<p>.reader.<svc>`; it reads its own replies and control orders, through core
//!   subscriptions to `<p>.reply.<svc>` and `<p>.control.<svc>` or through pull consumers on
//!   `<P>_OUTPUT` that the coordinator makes for it on `<p>.reader.<svc>`, filtered to those two
//!   subjects; it receives answers on its own inboxes (`_INBOX_<svc>.>`) only. It can publish no reply,
//!   control order or event, make no consumer, and cannot read another service's subjects.
//! - the **coordinator** publishes under the prefix, calls JetStream and answers on the users' inboxes;
//!   it reads only the status and reader questions and its own inboxes.
//! - a node **agent** `agent-<host>` publishes only its host's samples (`<p>.node.<host>`) and
//!   subscribes to nothing but its own inboxes: it cannot speak for another host, and the coordinator
//!   names the GPUs of a sample after its subject's host (a body naming another host is refused).
//! - the **auditor** reads `<P>_OUTPUT` and `<P>_INPUT` message by message (`STREAM.MSG.GET`; the
//!   audit needs the requests to know which asked for a whole GPU), and can make, pull from or delete
//!   no consumer.
//!
//! Nobody but the coordinator makes a consumer: a consumer's configuration (its deliver subject) is in
//! the body of the API call, which permissions cannot check, and nats-server pushes a push consumer's
//! messages onto its deliver subject with the server's own rights, onto an input or reply subject too.
//! Pulling from a consumer (`$JS.API.CONSUMER.MSG.NEXT.<P>_OUTPUT.<name>`) cannot be limited to one's
//! own consumers by subject, so consumers are named at random and the services may not list the
//! consumers of the stream: a consumer's name is known to its asker only.
//!
//! Passwords are random; the configuration holds only their bcrypt hashes.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context as _;
use gpu_coordinator_wire::Subjects;
use rand::distr::{Alphanumeric, SampleString};
use serde::{Deserialize, Serialize};

/// The user the coordinator connects as.
pub const COORDINATOR: &str = "coordinator";
/// The read-only user of `gpu-coordinator audit`.
pub const AUDITOR: &str = "auditor";
/// bcrypt's cost for the stored hashes (what `nats server passwd` uses).
const BCRYPT_COST: u32 = 11;
const PASSWORD_LEN: usize = 32;

/// One user's credentials, as written to `users.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    pub user: String,
    pub password: String,
    /// `nats://user:password@<host>`, for the host given to `nats-auth --host` (one such URL per
    /// server, separated by commas, for a cluster's list).
    pub url: String,
    /// A service's bearer token for the HTTP API (what `[http.tokens]` maps to it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_token: Option<String>,
}

impl Credentials {
    /// `nats://user:password@<host_port>`; for `h1:4222,h2:4222` (a cluster's servers), one such URL
    /// per server, separated by commas, each with the credentials (a server given without them
    /// would be tried without, and refuse).
    pub fn url_at(&self, host_port: &str) -> String {
        host_port
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(|h| format!("nats://{}:{}@{h}", self.user, self.password))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// What `nats-auth` writes.
#[derive(Debug, Clone)]
pub struct Generated {
    /// `nats-server.conf`.
    pub conf: String,
    /// `users.json`: user name -> credentials.
    pub users: BTreeMap<String, Credentials>,
    /// The hosts whose agents have a user.
    pub hosts: Vec<String>,
}

impl Generated {
    /// `coordinator.env`: the coordinator's NATS URL and the services' HTTP tokens as the environment
    /// variables `serve` reads (a file to source with `set -a`).
    pub fn coordinator_env(&self) -> String {
        let tokens: Vec<String> = self
            .users
            .values()
            .filter_map(|c| Some(format!("{}=\"{}\"", c.http_token.as_ref()?, c.user)))
            .collect();
        format!(
            "GPU_COORDINATOR_NATS__URL='{}'\nGPU_COORDINATOR_HTTP__TOKENS='{{{}}}'\n",
            self.users[COORDINATOR].url,
            tokens.join(", ")
        )
    }
}

impl Generated {
    /// `agent-<host>.env` for each host given: the agent's NATS URL (as its own user) and its host
    /// name, as the environment variables `gpu-coordinator agent` reads.
    pub fn agent_envs(&self) -> Vec<(String, String)> {
        self.hosts
            .iter()
            .map(|host| {
                let url = &self.users[&agent_user(host)].url;
                (
                    host.clone(),
                    format!(
                        "GPU_COORDINATOR_NATS__URL='{url}'\nGPU_COORDINATOR_AGENT__HOST='{host}'\n"
                    ),
                )
            })
            .collect()
    }
}

/// The permissions of one user: subjects it may publish to and subscribe to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

/// What the service `svc` may do.
pub fn service_permissions(subjects: &Subjects, svc: &str) -> Permissions {
    let output = subjects.output_stream();
    let own_reads = [subjects.reply(svc), subjects.control(svc)];
    let mut publish = vec![
        subjects.request(svc),
        subjects.release(svc),
        subjects.renew(svc),
        subjects.ack(svc),
        subjects.cancel(svc),
        subjects.status(),
        // Its readers are made by the coordinator: a consumer the service made itself could carry a
        // deliver subject, which no permission can check (see `adapters::nats_readers`).
        subjects.reader(svc),
        "$JS.API.INFO".to_owned(),
        format!("$JS.API.STREAM.INFO.{output}"),
        format!("$JS.API.STREAM.INFO.{}", subjects.input_stream()),
    ];
    publish.extend(read_consumers(&output));
    let mut subscribe = own_reads.to_vec();
    subscribe.push(format!("{}.>", gpu_coordinator_client::inbox_prefix(svc)));
    Permissions { publish, subscribe }
}

/// The NATS user of the node agent of `host`.
pub fn agent_user(host: &str) -> String {
    format!("agent-{host}")
}

/// What the node agent of `host` may do: publish its host's samples, nothing else.
pub fn agent_permissions(subjects: &Subjects, host: &str) -> Permissions {
    Permissions {
        publish: vec![subjects.node(host)],
        subscribe: vec![format!(
            "{}.>",
            gpu_coordinator_client::inbox_prefix(&agent_user(host))
        )],
    }
}

/// What the auditor may do: read the two streams message by message (the inputs tell which requests
/// asked for a whole GPU), and nothing else. No consumer at all: a consumer of its own could push the
/// history onto any subject (its deliver subject), and pulling from the coordinator's input consumer
/// would take inputs from it.
pub fn auditor_permissions(subjects: &Subjects) -> Permissions {
    let mut publish = vec!["$JS.API.INFO".to_owned()];
    for stream in [subjects.output_stream(), subjects.input_stream()] {
        publish.push(format!("$JS.API.STREAM.INFO.{stream}"));
        publish.push(format!("$JS.API.STREAM.MSG.GET.{stream}"));
    }
    Permissions {
        publish,
        subscribe: vec![format!(
            "{}.>",
            gpu_coordinator_client::inbox_prefix(AUDITOR)
        )],
    }
}

/// What the coordinator may do: publish under the prefix (its outputs, and the inputs the HTTP API
/// stores for its callers), call JetStream, and answer on the users' inboxes; read the status and
/// reader questions and its own inboxes. Nothing else: a reply subject a service chose can name no
/// other subject the coordinator could write to.
pub fn coordinator_permissions(subjects: &Subjects, users: &[String]) -> Permissions {
    let mut publish = vec![
        format!("{}.>", subjects.prefix()),
        "$JS.API.>".to_owned(),
        "$JS.ACK.>".to_owned(),
        "_INBOX.>".to_owned(),
    ];
    publish.extend(
        users
            .iter()
            .map(|user| format!("{}.>", gpu_coordinator_client::inbox_prefix(user))),
    );
    Permissions {
        publish,
        // `_INBOX.>` too: tools that connect as the coordinator without its inbox prefix (the `nats`
        // CLI) get their answers there.
        subscribe: vec![
            subjects.status(),
            subjects.reader("*"),
            subjects.nodes(),
            format!("{}.>", gpu_coordinator_client::inbox_prefix(COORDINATOR)),
            "_INBOX.>".to_owned(),
        ],
    }
}

/// Pulling from and looking at a consumer of `stream` by its name, and deleting it (the client
/// deletes a reader it replaces; names are random and never listed).
fn read_consumers(stream: &str) -> [String; 3] {
    [
        format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.*"),
        format!("$JS.API.CONSUMER.INFO.{stream}.*"),
        format!("$JS.API.CONSUMER.DELETE.{stream}.*"),
    ]
}

/// The configuration and passwords for `services`, and the node agents of `hosts`, under `prefix`;
/// the users' URLs name the server(s) at `host` (`host:port`, comma-separated for a cluster).
pub fn generate(
    prefix: &str,
    services: &[String],
    hosts: &[String],
    host: &str,
) -> anyhow::Result<Generated> {
    let subjects = Subjects::new(prefix).map_err(anyhow::Error::msg)?;
    if services.is_empty() {
        anyhow::bail!("name at least one service (--services chat,asr)");
    }
    let agents: Vec<String> = hosts.iter().map(|h| agent_user(h)).collect();
    let mut users = BTreeMap::new();
    let mut blocks = Vec::new();
    let mut add = |name: &str, permissions: Permissions| -> anyhow::Result<()> {
        let password = Alphanumeric.sample_string(&mut rand::rng(), PASSWORD_LEN);
        let hash = bcrypt::hash(&password, BCRYPT_COST).context("cannot hash a password")?;
        let is_service =
            name != COORDINATOR && name != AUDITOR && !agents.iter().any(|a| a.as_str() == name);
        blocks.push(user_block(name, &hash, &permissions));
        let mut credentials = Credentials {
            user: name.to_owned(),
            url: String::new(),
            password,
            http_token: is_service
                .then(|| Alphanumeric.sample_string(&mut rand::rng(), PASSWORD_LEN)),
        };
        credentials.url = credentials.url_at(host);
        if users.insert(name.to_owned(), credentials).is_some() {
            anyhow::bail!("the user `{name}` is named twice");
        }
        Ok(())
    };
    let mut all_users = vec![COORDINATOR.to_owned(), AUDITOR.to_owned()];
    all_users.extend(services.iter().cloned());
    add(COORDINATOR, coordinator_permissions(&subjects, &all_users))?;
    add(AUDITOR, auditor_permissions(&subjects))?;
    for svc in services {
        if !gpu_coordinator_wire::valid_service_id(svc) {
            anyhow::bail!(
                "`{svc}` is not a service id: expected 1 to 64 characters of A-Z, a-z, 0-9, `_` and `-`"
            );
        }
        if svc == COORDINATOR || svc == AUDITOR {
            anyhow::bail!("`{svc}` is the name of a user of its own: name the service otherwise");
        }
        add(svc, service_permissions(&subjects, svc))?;
    }
    for node in hosts {
        if !gpu_coordinator_wire::valid_host(node) {
            anyhow::bail!(
                "`{node}` is not a host name: expected 1 to 64 characters of A-Z, a-z, 0-9, `_` and `-` \
                 (as `agent.host`)"
            );
        }
        add(&agent_user(node), agent_permissions(&subjects, node))?;
    }
    let conf = format!(
        "# Written by `gpu-coordinator nats-auth` for the subject prefix `{prefix}`.\n\
         # Passwords are in users.json, next to this file; here are only their bcrypt hashes.\n\
         # Add `-sd DIR` (or a `jetstream {{ store_dir: ... }}` block) to choose where streams are kept.\n\
         jetstream: enabled\n\n\
         authorization {{\n  users = [\n{}  ]\n}}\n",
        blocks.concat()
    );
    Ok(Generated {
        conf,
        users,
        hosts: hosts.to_vec(),
    })
}

fn user_block(name: &str, hash: &str, p: &Permissions) -> String {
    let list = |subjects: &[String]| {
        subjects
            .iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let permissions = format!(
        "permissions: {{\n      publish: {{ allow: [{}] }}\n      subscribe: {{ allow: [{}] }}\n    }}",
        list(&p.publish),
        list(&p.subscribe)
    );
    // Quoted: in a nats-server configuration an unquoted `$` starts a variable.
    format!(
        "    {{\n      user: \"{name}\"\n      password: \"{hash}\"\n      {permissions}\n    }}\n"
    )
}

/// Writes `nats-server.conf`, `users.json` and `coordinator.env` into `dir` (made if missing); the
/// last two are readable by their owner only.
pub fn write(dir: &Path, generated: &Generated) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot make {}", dir.display()))?;
    let conf = dir.join("nats-server.conf");
    std::fs::write(&conf, &generated.conf)
        .with_context(|| format!("cannot write {}", conf.display()))?;
    let users = dir.join("users.json");
    let json = serde_json::to_string_pretty(&generated.users)?;
    write_private(&users, json.as_bytes())
        .with_context(|| format!("cannot write {}", users.display()))?;
    let env = dir.join("coordinator.env");
    write_private(&env, generated.coordinator_env().as_bytes())
        .with_context(|| format!("cannot write {}", env.display()))?;
    for (host, text) in generated.agent_envs() {
        let env = dir.join(format!("agent-{host}.env"));
        write_private(&env, text.as_bytes())
            .with_context(|| format!("cannot write {}", env.display()))?;
    }
    Ok(())
}

#[cfg(unix)]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)
}

#[cfg(not(unix))]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_cluster_list_gets_the_credentials_on_every_server() {
        let c = Credentials {
            user: "chat".into(),
            password: "pw".into(),
            url: String::new(),
            http_token: None,
        };
        assert_eq!(c.url_at("127.0.0.1:4222"), "nats://chat:pw@127.0.0.1:4222");
        assert_eq!(
            c.url_at("n1:4222, n2:4222,n3:4222"),
            "nats://chat:pw@n1:4222,nats://chat:pw@n2:4222,nats://chat:pw@n3:4222"
        );
    }

    use super::*;

    #[test]
    fn a_service_publishes_only_its_own_inputs_and_reads_only_its_own_answers() {
        let subjects = Subjects::new("gpu").unwrap();
        let p = service_permissions(&subjects, "chat");
        for own in [
            "gpu.request.chat",
            "gpu.ack.chat",
            "gpu.status",
            "gpu.reader.chat",
        ] {
            assert!(p.publish.iter().any(|s| s == own), "{own}");
        }
        assert!(!p.publish.iter().any(|s| s.contains("reply")));
        assert!(
            !p.publish
                .iter()
                .any(|s| s.contains("CONSUMER.CREATE") || s.contains("CONSUMER.DURABLE")),
            "a service makes no consumer: {:?}",
            p.publish
        );
        assert!(!p
            .publish
            .iter()
            .any(|s| s.starts_with("gpu.") && s.contains('*')));
        assert!(!p.publish.iter().any(|s| s.contains("CONSUMER.LIST")));
        assert_eq!(
            p.subscribe,
            ["gpu.reply.chat", "gpu.control.chat", "_INBOX_chat.>"]
        );
    }

    #[test]
    fn the_auditor_reads_messages_and_touches_no_consumer() {
        let subjects = Subjects::new("gpu").unwrap();
        let p = auditor_permissions(&subjects);
        assert!(
            !p.publish.iter().any(|s| s.contains("CONSUMER")),
            "{:?}",
            p.publish
        );
        assert!(p
            .publish
            .contains(&"$JS.API.STREAM.MSG.GET.GPU_INPUT".to_owned()));
    }

    #[test]
    fn the_coordinator_publishes_under_the_prefix_jetstream_and_inboxes_only() {
        let subjects = Subjects::new("gpu").unwrap();
        let p = coordinator_permissions(&subjects, &["chat".to_owned()]);
        assert_eq!(
            p.publish,
            [
                "gpu.>",
                "$JS.API.>",
                "$JS.ACK.>",
                "_INBOX.>",
                "_INBOX_chat.>"
            ]
        );
        assert_eq!(
            p.subscribe,
            [
                "gpu.status",
                "gpu.reader.*",
                "gpu.node.*",
                "_INBOX_coordinator.>",
                "_INBOX.>"
            ]
        );
    }

    #[test]
    fn passwords_are_stored_as_hashes_only() {
        let generated = generate("gpu", &["chat".to_owned()], &[], "nats:4222").unwrap();
        assert_eq!(
            generated.users.keys().collect::<Vec<_>>(),
            ["auditor", "chat", "coordinator"]
        );
        for credentials in generated.users.values() {
            assert!(!generated.conf.contains(&credentials.password));
            assert_eq!(credentials.password.len(), PASSWORD_LEN);
        }
        assert_eq!(generated.conf.matches("password: \"$2").count(), 3);
        let chat = &generated.users["chat"];
        assert_eq!(chat.url, format!("nats://chat:{}@nats:4222", chat.password));
        let token = chat
            .http_token
            .as_ref()
            .expect("a service has an HTTP token");
        let env = generated.coordinator_env();
        assert!(env.contains(&format!("{{{token}=\"chat\"}}")), "{env}");
        assert!(env.contains(&generated.users["coordinator"].url), "{env}");
        assert!(generated.users["auditor"].http_token.is_none());
    }

    #[test]
    fn an_agent_publishes_only_its_own_hosts_samples() {
        let generated =
            generate("gpu", &["chat".to_owned()], &["h1".to_owned()], "nats:4222").unwrap();
        let subjects = Subjects::new("gpu").unwrap();
        assert_eq!(agent_permissions(&subjects, "h1").publish, ["gpu.node.h1"]);
        let agent = &generated.users["agent-h1"];
        assert!(agent.http_token.is_none(), "an agent has no HTTP token");
        assert!(generated
            .conf
            .contains(r#"publish: { allow: ["gpu.node.h1"] }"#));
        assert!(coordinator_permissions(&subjects, &[])
            .subscribe
            .contains(&"gpu.node.*".to_owned()));
        assert!(!service_permissions(&subjects, "chat")
            .publish
            .iter()
            .any(|s| s.contains(".node.")));
        assert!(generate(
            "gpu",
            &["chat".to_owned()],
            &["a.b".to_owned()],
            "nats:4222"
        )
        .is_err());
        assert!(
            generate(
                "gpu",
                &["agent-h1".to_owned()],
                &["h1".to_owned()],
                "nats:4222"
            )
            .is_err(),
            "a service may not take an agent's name"
        );
    }

    #[test]
    fn bad_service_names_are_refused() {
        assert!(generate("gpu", &["a.b".to_owned()], &[], "nats:4222").is_err());
        assert!(generate("gpu", &["auditor".to_owned()], &[], "nats:4222").is_err());
        assert!(generate("gpu", &[], &[], "nats:4222").is_err());
        assert!(generate("gpu", &["x".to_owned(), "x".to_owned()], &[], "nats:4222").is_err());
    }
}
