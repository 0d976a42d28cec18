//! Ollama's API (see [`Kind::Ollama`](super::Kind::Ollama)): generate and chat, which load on
//! request, and load or unload with no prompt.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde_json::{json, Value};

use super::format::{now_rfc3339, Api};
use super::infer::infer;
use super::state::{Engine, Parts, Shared, St};
use super::{parse_body, MB};

pub(super) fn ollama_router() -> Router<Shared> {
    Router::new()
        .route(
            "/",
            get(|| async { "Ollama is running" }).head(|| async { StatusCode::OK }),
        )
        .route(
            "/api/version",
            get(|| async { Json(json!({"version": "0.0.0-fake"})) }),
        )
        .route("/api/ps", get(ollama_ps))
        .route("/api/tags", get(ollama_tags))
        .route("/api/generate", post(ollama_generate))
        .route("/api/chat", post(ollama_chat))
}

/// Whether a `keep_alive` (seconds as a number, or a duration string like `"0"`, `"0s"`, `"5m"`) is zero.
fn keep_alive_is_zero(v: &Value) -> bool {
    match v {
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => {
            let digits = s.trim().trim_end_matches(|c: char| c.is_ascii_alphabetic());
            digits.parse::<f64>().is_ok_and(|x| x == 0.0)
        }
        _ => false,
    }
}

fn ollama_model_entry(eng: &Engine) -> Value {
    let tag = eng.ollama_tag();
    json!({
        "name": tag, "model": tag, "size": eng.opts.vram_mb * MB,
        "digest": "0000000000000000000000000000000000000000000000000000000000000000",
        "details": {"parent_model": "", "format": "gguf", "family": "fake", "families": ["fake"],
                    "parameter_size": "1B", "quantization_level": "Q4_0"},
    })
}

/// `GET /api/ps`: the model while loaded (until its unload has freed it), with `size_vram`.
async fn ollama_ps(State(eng): State<Shared>) -> Response {
    let models = if eng.read(St::resident) {
        let mut m = ollama_model_entry(&eng);
        m["expires_at"] = json!("2318-01-01T00:00:00Z");
        m["size_vram"] = json!(eng.opts.vram_mb * MB);
        m["context_length"] = json!(4096);
        vec![m]
    } else {
        vec![]
    };
    Json(json!({"models": models})).into_response()
}

async fn ollama_tags(State(eng): State<Shared>) -> Response {
    let mut m = ollama_model_entry(&eng);
    m["modified_at"] = json!("2024-01-01T00:00:00Z");
    Json(json!({"models": [m]})).into_response()
}

async fn ollama_generate(State(eng): State<Shared>, body: Bytes) -> Response {
    let v = parse_body(&body);
    let empty = match &v["prompt"] {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        _ => false,
    };
    if empty {
        ollama_load_or_unload(eng, &v, Api::OllamaGenerate).await
    } else {
        infer(eng, Api::OllamaGenerate, None, body).await
    }
}

async fn ollama_chat(State(eng): State<Shared>, body: Bytes) -> Response {
    let v = parse_body(&body);
    let empty = match &v["messages"] {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        _ => false,
    };
    if empty {
        ollama_load_or_unload(eng, &v, Api::OllamaChat).await
    } else {
        infer(eng, Api::OllamaChat, None, body).await
    }
}

/// A request with no prompt: `keep_alive` 0 unloads (answered at once; the memory goes once in-flight
/// requests end, `sleep_time` later); anything else loads (answered once loaded, 500 on an OOM).
async fn ollama_load_or_unload(eng: Shared, v: &Value, api: Api) -> Response {
    if let Some(rejected) = eng.check_model(v) {
        return rejected;
    }
    let model = v["model"].as_str().unwrap_or_default().to_string();
    let mut answer = if api == Api::OllamaChat {
        json!({
            "model": model, "created_at": now_rfc3339(),
            "message": {"role": "assistant", "content": ""}, "done": true,
        })
    } else {
        json!({"model": model, "created_at": now_rfc3339(), "response": "", "done": true})
    };
    if keep_alive_is_zero(&v["keep_alive"]) {
        eng.unload_all().await;
        answer["done_reason"] = json!("unload");
        return Json(answer).into_response();
    }
    match eng.acquire(Parts::ALL).await {
        Ok(_) => {
            answer["done_reason"] = json!("load");
            Json(answer).into_response()
        }
        Err(line) => eng.load_failed(&line),
    }
}
