//! Inference requests, shared by the kinds: admission (or a load first, where the kind loads on
//! request, or the kind's refusal), the streamed or whole answer, and the OpenAI endpoints.

use std::convert::Infallible;
use std::sync::atomic::Ordering;

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde_json::{json, Value};

use super::format::{now_unix, Api, Fmt};
use super::state::{Admitted, Engine, Parts, Shared};
use super::{error400, parse_body, Kind};

struct StreamState {
    pub(super) adm: Admitted,
    fmt: Fmt,
    idx: usize,
    pub(super) done: bool,
}

/// Streams the answer, each token `chunk_delay` after the one before, each sent as it is made.
fn stream_response(adm: Admitted, fmt: Fmt) -> Response {
    let content_type = fmt.content_type();
    let chunks = adm.eng.opts.chunks;
    let delay = adm.eng.opts.chunk_delay;
    let state = StreamState {
        adm,
        fmt,
        idx: 0,
        done: false,
    };
    let stream = futures::stream::unfold(state, move |mut s| async move {
        if s.done {
            return None;
        }
        let bytes = if s.idx < chunks {
            tokio::time::sleep(delay).await;
            if s.adm.eng.wait_progress(s.adm.epoch).await {
                s.idx += 1;
                s.fmt.chunk(s.idx - 1)
            } else {
                s.done = true;
                s.fmt.end("abort", s.idx)
            }
        } else {
            s.done = true;
            s.adm.served();
            s.fmt.end("stop", s.idx)
        };
        Some((Ok::<Bytes, Infallible>(bytes), s))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .expect("a streamed response")
}

/// Makes the `chunks` tokens; false if aborted first. Returns how many were made.
pub(super) async fn generate(adm: &Admitted) -> (bool, usize) {
    for n in 0..adm.eng.opts.chunks {
        tokio::time::sleep(adm.eng.opts.chunk_delay).await;
        if !adm.eng.wait_progress(adm.epoch).await {
            return (false, n);
        }
    }
    (true, adm.eng.opts.chunks)
}

async fn whole_response(adm: Admitted, fmt: Fmt) -> Response {
    let (ok, n) = generate(&adm).await;
    if ok {
        adm.served();
    }
    Json(fmt.whole(if ok { "stop" } else { "abort" }, n)).into_response()
}

pub(super) fn query_pairs(q: &Option<String>) -> Vec<(String, String)> {
    q.as_deref()
        .unwrap_or("")
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_string(), v.replace('+', " "))
        })
        .collect()
}

pub(super) fn query_get<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

impl Engine {
    /// The model this Ollama serves as Ollama names it (`m` is `m:latest`).
    pub(super) fn ollama_tag(&self) -> String {
        if self.opts.model.contains(':') {
            self.opts.model.clone()
        } else {
            format!("{}:latest", self.opts.model)
        }
    }

    /// Rejects a request for another model, as the kind does.
    pub(super) fn check_model(&self, body: &Value) -> Option<Response> {
        let asked = body["model"].as_str();
        let m = &self.opts.model;
        match self.opts.kind {
            Kind::Vllm => asked.filter(|a| a != m).map(|a| {
                let message = format!("The model `{a}` does not exist.");
                openai_error(
                    StatusCode::NOT_FOUND,
                    &message,
                    "NotFoundError",
                    Some("model"),
                )
            }),
            Kind::Sglang | Kind::Triton => None,
            Kind::Ollama => match asked {
                None | Some("") => Some(error400(json!({"error": "model is required"}))),
                Some(a) if a == m || a == self.ollama_tag() => None,
                Some(a) => {
                    let body = json!({"error": format!("model '{a}' not found")});
                    Some((StatusCode::NOT_FOUND, Json(body)).into_response())
                }
            },
            Kind::Llamacpp => match asked {
                None | Some("") => {
                    let message = "model name is missing from the request";
                    Some(llama_error(400, message, "invalid_request_error"))
                }
                Some(a) if a == m => None,
                Some(a) => {
                    let message = format!("model '{a}' not found");
                    Some(llama_error(400, &message, "invalid_request_error"))
                }
            },
        }
    }

    /// The answer to an inference request that came while it is not awake.
    pub(super) fn refusal(&self) -> Response {
        self.refused_asleep.fetch_add(1, Ordering::SeqCst);
        match self.opts.kind {
            Kind::Vllm => openai_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "The engine is sleeping: wake it up first",
                "ServiceUnavailableError",
                None,
            ),
            Kind::Sglang => {
                let body = json!({
                    "object": "error", "message": "Generation is paused or the GPU memory released",
                    "type": "ServiceUnavailable", "param": null, "code": 503,
                });
                (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
            }
            Kind::Llamacpp => llama_error(400, "model is not loaded", "invalid_request_error"),
            Kind::Triton => {
                let m = &self.opts.model;
                let message = format!("Request for unknown model: '{m}' has no available versions");
                error400(json!({"error": message}))
            }
            Kind::Ollama => {
                let body = json!({"error": "the model is being unloaded"});
                (StatusCode::INTERNAL_SERVER_ERROR, Json(body)).into_response()
            }
        }
    }

    /// The answer to a request whose load failed.
    pub(super) fn load_failed(&self, line: &str) -> Response {
        match self.opts.kind {
            Kind::Llamacpp => llama_error(500, line, "server_error"),
            _ => (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({"error": line})),
            )
                .into_response(),
        }
    }
}

pub(super) fn llama_error(code: u16, message: &str, kind: &str) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        Json(json!({"error": {"code": code, "message": message, "type": kind}})),
    )
        .into_response()
}

/// An inference request: admitted if awake; otherwise, where the kind loads on request, loaded first;
/// otherwise refused.
pub(super) async fn infer(eng: Shared, api: Api, query: Option<String>, body: Bytes) -> Response {
    let body = parse_body(&body);
    if let Some(rejected) = eng.check_model(&body) {
        return rejected;
    }
    let loads_on_request = match eng.opts.kind {
        Kind::Ollama => true,
        Kind::Llamacpp => query_get(&query_pairs(&query), "autoload")
            .map_or(eng.opts.autoload, |v| v == "true" || v == "1"),
        Kind::Vllm | Kind::Sglang | Kind::Triton => false,
    };
    let adm = match eng.admit() {
        Some(adm) => adm,
        None if loads_on_request && !eng.stopped.load(Ordering::SeqCst) => {
            match eng.acquire(Parts::ALL).await {
                Ok(true) => {
                    eng.implicit_loads.fetch_add(1, Ordering::SeqCst);
                }
                Ok(false) => {}
                Err(line) => return eng.load_failed(&line),
            }
            match eng.admit() {
                Some(adm) => adm,
                None => return eng.refusal(),
            }
        }
        None => return eng.refusal(),
    };
    let ollama = matches!(api, Api::OllamaGenerate | Api::OllamaChat);
    let stream = body["stream"].as_bool().unwrap_or(ollama);
    let model = body["model"]
        .as_str()
        .unwrap_or(&eng.opts.model)
        .to_string();
    let fmt = Fmt::new(api, &model);
    if stream {
        stream_response(adm, fmt)
    } else {
        whole_response(adm, fmt).await
    }
}

pub(super) async fn completions(
    State(eng): State<Shared>,
    RawQuery(q): RawQuery,
    body: Bytes,
) -> Response {
    infer(eng, Api::Completions, q, body).await
}

pub(super) async fn chat_completions(
    State(eng): State<Shared>,
    RawQuery(q): RawQuery,
    body: Bytes,
) -> Response {
    infer(eng, Api::Chat, q, body).await
}

pub(super) async fn openai_models(State(eng): State<Shared>) -> Response {
    Json(json!({"object": "list", "data": [{
        "id": eng.opts.model, "object": "model", "created": now_unix(), "owned_by": "fake",
        "root": eng.opts.model, "parent": null, "max_model_len": 4096,
    }]}))
    .into_response()
}

/// vLLM's error body (OpenAI's): `{"error": {"message", "type", "param", "code"}}`.
pub(super) fn openai_error(
    status: StatusCode,
    message: &str,
    kind: &str,
    param: Option<&str>,
) -> Response {
    let code = status.as_u16();
    let body = json!({"error": {"message": message, "type": kind, "param": param, "code": code}});
    (status, Json(body)).into_response()
}
