//! What operators see of the engine sidecars: `GET /gpu/engines`, the engines' lines of `/metrics`, and
//! the `status --http` table, from a coordinator that runs one `[[engines]]` sidecar in front of a fake
//! vLLM (the few calls of its sleep mode, and a completion that fails while it sleeps).

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use gpu_coordinator::engines::{EngineConfig, EngineKind};
use gpu_coordinator_test_support::free_port;
use serde_json::{json, Value};

use crate::http::{client, get as get_json};
use crate::support::{embedded_config, eventually, test_config, Coordinator};

/// What the fake vLLM was asked, and whether it sleeps.
#[derive(Default)]
struct VllmState {
    sleeping: AtomicBool,
    sleeps: AtomicUsize,
    wakes: AtomicUsize,
    completions: AtomicUsize,
}

/// A vLLM started with `--enable-sleep-mode`, as far as the sidecar and a client see it: it starts
/// awake (holding its memory), sleeps on `POST /sleep?level=1`, wakes on `POST /wake_up`, and answers
/// a completion only while awake (a sleeping vLLM has no weights on the GPU).
pub(crate) struct FakeVllm {
    /// Its base URL, the engine's `upstream`.
    pub(crate) url: String,
    state: Arc<VllmState>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeVllm {
    pub(crate) async fn start() -> FakeVllm {
        #[derive(serde::Deserialize)]
        struct Level {
            level: Option<u8>,
        }
        type Shared = State<Arc<VllmState>>;
        let state = Arc::new(VllmState::default());
        let app = Router::new()
            .route(
                "/is_sleeping",
                get(|State(s): Shared| async move {
                    Json(json!({"is_sleeping": s.sleeping.load(Ordering::SeqCst)}))
                }),
            )
            .route(
                "/sleep",
                post(|State(s): Shared, Query(q): Query<Level>| async move {
                    // Level 1 is the one configured: another would leave the engine awake here.
                    if q.level != Some(1) {
                        return StatusCode::BAD_REQUEST;
                    }
                    s.sleeps.fetch_add(1, Ordering::SeqCst);
                    s.sleeping.store(true, Ordering::SeqCst);
                    StatusCode::OK
                }),
            )
            .route(
                "/wake_up",
                post(|State(s): Shared| async move {
                    s.wakes.fetch_add(1, Ordering::SeqCst);
                    s.sleeping.store(false, Ordering::SeqCst);
                    StatusCode::OK
                }),
            )
            .route("/health", get(|| async { StatusCode::OK }))
            .route(
                "/v1/completions",
                post(|State(s): Shared, Json(body): Json<Value>| async move {
                    if s.sleeping.load(Ordering::SeqCst) {
                        return (
                            StatusCode::SERVICE_UNAVAILABLE,
                            Json(json!({"error": "the engine sleeps"})),
                        )
                            .into_response();
                    }
                    s.completions.fetch_add(1, Ordering::SeqCst);
                    Json(json!({
                        "object": "text_completion",
                        "model": body["model"],
                        "choices": [{"index": 0, "text": " a GPU", "finish_reason": "stop"}],
                    }))
                    .into_response()
                }),
            )
            .with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a port for the fake vLLM");
        let url = format!("http://{}", listener.local_addr().expect("its address"));
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .await
                .expect("the fake vLLM serves");
        });
        FakeVllm { url, state, task }
    }

    pub(crate) fn sleeping(&self) -> bool {
        self.state.sleeping.load(Ordering::SeqCst)
    }

    /// How many times it was put to sleep and woken, and how many completions it answered.
    pub(crate) fn calls(&self) -> (usize, usize, usize) {
        (
            self.state.sleeps.load(Ordering::SeqCst),
            self.state.wakes.load(Ordering::SeqCst),
            self.state.completions.load(Ordering::SeqCst),
        )
    }
}

impl Drop for FakeVllm {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One `[[engines]]` entry: `service`'s vLLM at `upstream`, its sidecar on a free port of loopback,
/// never idle long enough to sleep during a test.
pub(crate) fn vllm_engine(service: &str, upstream: &str) -> EngineConfig {
    EngineConfig {
        priority: Some(1),
        vram_mb: Some(8_000),
        idle_ms: 600_000,
        max_wait_ms: 20_000,
        drain_ms: 1_000,
        sleep_level: Some(1),
        ..EngineConfig::new(
            service,
            EngineKind::Vllm,
            &format!("127.0.0.1:{}", free_port()),
            upstream,
        )
    }
}

/// `GET /gpu/engines` with `token`; the list it answers.
pub(crate) async fn engines(coordinator: &Coordinator, token: Option<&str>) -> Vec<Value> {
    let (status, body) = get_json(&client(), &coordinator.url("/gpu/engines"), token).await;
    assert_eq!(status, 200, "{body}");
    body.as_array()
        .unwrap_or_else(|| panic!("a list: {body}"))
        .clone()
}

/// Waits until the coordinator lists `service`'s engine in `state`; returns its entry.
pub(crate) async fn engine_in(
    coordinator: &Coordinator,
    token: Option<&str>,
    service: &str,
    state: &str,
) -> Value {
    eventually(&format!("{service}'s engine {state}"), || async {
        engines(coordinator, token)
            .await
            .into_iter()
            .find(|e| e["service"] == service && e["state"] == state)
    })
    .await
}

/// A completion through the sidecar's `listen` address, as the engine's clients call it.
pub(crate) async fn complete(listen: &str) -> Value {
    let response = client()
        .post(format!("http://{listen}/v1/completions"))
        .json(&json!({"model": "m", "prompt": "Who shares", "max_tokens": 4}))
        .send()
        .await
        .expect("the sidecar answers");
    let status = response.status();
    let body: Value = response.json().await.expect("a JSON answer");
    assert_eq!(status, 200, "{body}");
    body
}

/// `gpu-coordinator <args>` with `env` added (and no token from this process's environment); its
/// standard output, once it succeeded.
async fn run_status(args: Vec<String>, env: Vec<(&'static str, String)>) -> String {
    tokio::task::spawn_blocking(move || {
        let output = Command::new(env!("CARGO_BIN_EXE_gpu-coordinator"))
            .args(&args)
            .envs(env)
            .env("RUST_LOG", "warn")
            .env_remove("GPU_COORDINATOR_TOKEN")
            .output()
            .expect("run gpu-coordinator status");
        let out = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "{args:?} failed:\n{out}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        out
    })
    .await
    .expect("the status command ran")
}

const OPERATOR: &str = "op-token";
const CHAT: &str = "chat-token";
const ASR: &str = "asr-token";

/// The sidecar puts the awake engine to sleep at start; a request through it wakes the engine under a
/// lease; the list and the metrics say so; another service's token sees no engine (nor does the status
/// command with it), its own sees it; the status command over NATS shows no engines.
#[tokio::test]
async fn the_engines_list_and_metrics_follow_a_sleep_and_a_wake() {
    let vllm = FakeVllm::start().await;
    let mut config = test_config("eng_board", &[("0", 24_000)]);
    for (token, service) in [(OPERATOR, "*"), (CHAT, "chat"), (ASR, "asr")] {
        config.http.tokens.insert(token.into(), service.into());
    }
    let engine = vllm_engine("chat", &vllm.url);
    let listen = engine.listen.clone();
    config.engines = vec![engine];
    let coordinator = Coordinator::start(config).await;

    let asleep = engine_in(&coordinator, Some(OPERATOR), "chat", "asleep").await;
    assert!(vllm.sleeping(), "the engine found awake was put to sleep");
    assert_eq!(asleep["kind"], "vllm", "{asleep}");
    assert_eq!(asleep["listen"], listen.as_str(), "{asleep}");
    assert_eq!(
        (&asleep["sleeps"], &asleep["wakes"]),
        (&json!(1), &json!(0)),
        "{asleep}"
    );
    assert_eq!(
        (&asleep["waiting"], &asleep["in_flight"]),
        (&json!(0), &json!(0)),
        "{asleep}"
    );
    assert!(asleep["last_sleep_ms"].is_u64(), "{asleep}");
    assert!(asleep["last_wake_ms"].is_null(), "{asleep}");

    // A completion through the sidecar: the GPU asked for, the engine woken, then the request passed.
    let answer = complete(&listen).await;
    assert_eq!(answer["choices"][0]["text"], " a GPU", "{answer}");
    assert_eq!(
        vllm.calls(),
        (1, 1, 1),
        "one sleep, one wake, one completion"
    );
    let awake = engine_in(&coordinator, Some(OPERATOR), "chat", "awake").await;
    assert_eq!(awake["wakes"], 1, "{awake}");
    assert!(awake["last_wake_ms"].is_u64(), "{awake}");
    assert_eq!(awake["waiting"], 0, "{awake}");
    // Counted in flight until its body has ended, which may be a moment after the client read it.
    eventually("the answered request out of flight", || async {
        engines(&coordinator, Some(OPERATOR))
            .await
            .iter()
            .any(|e| e["in_flight"] == 0)
            .then_some(())
    })
    .await;
    // The coordinator holds the sidecar's lease under its service.
    let (_, status) = get_json(&client(), &coordinator.url("/gpu/status"), Some(OPERATOR)).await;
    let holders = &status["gpus"][0]["holders"];
    assert_eq!(holders[0]["service_id"], "chat", "{status}");
    assert_eq!(holders[0]["vram_mb"], 8_000, "{status}");

    let response = client()
        .get(coordinator.url("/metrics"))
        .bearer_auth(OPERATOR)
        .send()
        .await
        .expect("the metrics");
    assert_eq!(response.status(), 200);
    let metrics = response.text().await.expect("the metrics' text");
    let state_line = |state: &str| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("gpu_coordinator_engine_state{")
                    && l.contains("service=\"chat\"")
                    && l.contains("kind=\"vllm\"")
                    && l.contains(&format!("state=\"{state}\""))
            })
            .unwrap_or_else(|| panic!("no {state} line in:\n{metrics}"))
            .to_owned()
    };
    assert!(state_line("awake").ends_with("} 1"), "{metrics}");
    assert!(state_line("asleep").ends_with("} 0"), "{metrics}");
    assert!(
        metrics.contains("gpu_coordinator_engine_wake_seconds_count{service=\"chat\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("gpu_coordinator_engine_sleep_seconds_count{service=\"chat\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.trim_end().ends_with("# EOF"),
        "the exposition still ends with its EOF line"
    );

    // A service's token sees its own engine only.
    assert_eq!(engines(&coordinator, Some(ASR)).await, Vec::<Value>::new());
    let own = engines(&coordinator, Some(CHAT)).await;
    assert_eq!(own.len(), 1, "{own:?}");
    assert_eq!(own[0]["service"], "chat");
    let (status, body) = get_json(&client(), &coordinator.url("/gpu/engines"), None).await;
    assert_eq!(status, 401, "{body}");

    // The status command over HTTP with that token: an empty list, so no table, yet the key in JSON.
    let http = |json: bool| {
        let mut args = vec![
            "status".to_owned(),
            "--http".to_owned(),
            coordinator.url(""),
        ];
        args.extend(["--token".to_owned(), ASR.to_owned()]);
        if json {
            args.push("--json".to_owned());
        }
        run_status(args, vec![])
    };
    let text = http(false).await;
    assert!(
        text.contains("\nGPUs\n") && !text.contains("Engines"),
        "{text}"
    );
    let json: Value = serde_json::from_str(&http(true).await).expect("JSON");
    assert_eq!(json["engines"], json!([]), "{json}");
    // Over NATS nothing changes: the sidecars' figures are served over HTTP only.
    let nats = run_status(
        vec!["status".to_owned(), "--json".to_owned()],
        vec![
            (
                "GPU_COORDINATOR_NATS__URL",
                coordinator.config.nats.url.clone(),
            ),
            (
                "GPU_COORDINATOR_NATS__PREFIX",
                coordinator.config.nats.prefix.clone(),
            ),
        ],
    )
    .await;
    let json: Value = serde_json::from_str(&nats).expect("JSON");
    assert!(
        json["gpus"].is_array() && json.get("engines").is_none(),
        "{json}"
    );

    coordinator.stop().await.expect("a clean stop");
}

/// `gpu-coordinator status --http URL`, run as an operator runs it: the engines table after the GPUs,
/// and `--json` with an `engines` key.
#[tokio::test]
async fn the_status_command_over_http_shows_the_engines() {
    let vllm = FakeVllm::start().await;
    let mut config = embedded_config("eng_status", &[("0", 24_000)]);
    let engine = vllm_engine("chat", &vllm.url);
    let listen = engine.listen.clone();
    config.engines = vec![engine];
    let coordinator = Coordinator::start(config).await;
    engine_in(&coordinator, None, "chat", "asleep").await;
    complete(&listen).await;
    engine_in(&coordinator, None, "chat", "awake").await;

    let base = coordinator.url("");
    let status = |json: bool| {
        let mut args = vec!["status".to_owned(), "--http".to_owned(), base.clone()];
        if json {
            args.push("--json".to_owned());
        }
        run_status(args, vec![])
    };

    let text = status(false).await;
    let gpus = text.find("\nGPUs\n").expect(&text);
    let table = text.find("\nEngines\n").expect(&text);
    let holders = text.find("\nHolders\n").expect(&text);
    assert!(gpus < table && table < holders, "{text}");
    let lines: Vec<&str> = text[table..holders].lines().collect();
    let header: Vec<&str> = lines[2].split_whitespace().collect();
    assert_eq!(
        header,
        [
            "SERVICE", "KIND", "STATE", "WAITING", "IN", "FLIGHT", "LAST", "SLEEP", "MS", "LAST",
            "WAKE", "MS"
        ],
        "{text}"
    );
    let row: Vec<&str> = lines[3].split_whitespace().collect();
    assert_eq!(row[..5], ["chat", "vllm", "awake", "0", "0"], "{text}");
    assert!(
        row[5].parse::<u64>().is_ok() && row[6].parse::<u64>().is_ok(),
        "the last sleep and wake in ms: {text}"
    );

    let json: Value = serde_json::from_str(&status(true).await).expect("the status as JSON");
    assert_eq!(json["gpus"][0]["id"], "0", "{json}");
    let listed = json["engines"].as_array().expect("an engines key");
    assert_eq!(listed.len(), 1, "{json}");
    assert_eq!(
        (
            &listed[0]["service"],
            &listed[0]["state"],
            &listed[0]["wakes"]
        ),
        (&json!("chat"), &json!("awake"), &json!(1)),
        "{json}"
    );
    coordinator.stop().await.expect("a clean stop");
}
