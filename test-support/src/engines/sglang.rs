//! SGLang's API (see [`Kind::Sglang`](super::Kind::Sglang)): pause and continue generation, release
//! and resume the memory.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde_json::{json, Value};

use super::infer::{chat_completions, completions, openai_models};
use super::state::{Parts, Shared, St};
use super::{error400, parse_body};

pub(super) fn sglang_router() -> Router<Shared> {
    Router::new()
        .route("/health", get(sglang_health))
        .route("/health_generate", get(sglang_health))
        .route("/v1/models", get(openai_models))
        .route("/get_model_info", get(sglang_model_info))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/pause_generation", post(sglang_pause))
        .route("/continue_generation", post(sglang_continue))
        .route(
            "/release_memory_occupation",
            get(sglang_release).post(sglang_release),
        )
        .route(
            "/resume_memory_occupation",
            get(sglang_resume).post(sglang_resume),
        )
}

fn sglang_error(message: &str) -> Response {
    error400(json!({"error": {"message": message}}))
}

/// `GET /health`: generates a token, so it only succeeds while generation runs.
async fn sglang_health(State(eng): State<Shared>) -> StatusCode {
    if eng.read(St::serving) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn sglang_model_info(State(eng): State<Shared>) -> Response {
    Json(json!({"model_path": eng.opts.model, "tokenizer_path": eng.opts.model, "is_generation": true}))
        .into_response()
}

fn sglang_parts(body: &Value) -> Parts {
    match body["tags"].as_array() {
        Some(tags) => Parts::from_tags(tags.iter().filter_map(Value::as_str)),
        None => Parts::ALL,
    }
}

/// `POST /pause_generation {"mode": "abort" | "retract" | "in_place"}`.
async fn sglang_pause(State(eng): State<Shared>, body: Bytes) -> Response {
    let body = parse_body(&body);
    let mode = body["mode"].as_str().unwrap_or("abort");
    match mode {
        "abort" => eng.update(|st| {
            st.paused = true;
            st.abort_epoch += 1;
        }),
        "retract" | "in_place" => eng.update(|st| {
            st.paused = true;
            st.hold = true;
        }),
        other => {
            return sglang_error(&format!(
                "Invalid mode: {other:?}. Expected one of ['abort', 'retract', 'in_place']."
            ))
        }
    }
    Json(json!({"message": "Generation paused successfully.", "status": "ok"})).into_response()
}

/// `POST /continue_generation`.
async fn sglang_continue(State(eng): State<Shared>) -> Response {
    eng.update(|st| {
        st.paused = false;
        st.hold = false;
    });
    Json(json!({"message": "Generation continued successfully.", "status": "ok"})).into_response()
}

/// `POST /release_memory_occupation {"tags": [...]}`: answers `null` once the release has started,
/// before the memory is freed; refuses while requests run unpaused.
async fn sglang_release(State(eng): State<Shared>, body: Bytes) -> Response {
    let wanted = sglang_parts(&parse_body(&body));
    let task = tokio::spawn(async move {
        let guard = eng.op_lock().await;
        let (busy, parts) = eng.read(|st| {
            (
                st.in_flight > 0 && !st.hold,
                Parts {
                    weights: wanted.weights && st.weights,
                    kv: wanted.kv && st.kv,
                },
            )
        });
        if busy {
            return Err(
                "release_memory_occupation needs an idle engine: pause generation first"
                    .to_string(),
            );
        }
        if parts.weights || parts.kv {
            eng.spawn_release(guard, parts, false);
        }
        Ok(())
    });
    match task.await {
        Ok(Ok(())) => Json(Value::Null).into_response(),
        Ok(Err(message)) => sglang_error(&message),
        Err(e) => sglang_error(&e.to_string()),
    }
}

/// `POST /resume_memory_occupation {"tags": [...]}`: takes the memory back; answers `null` when done,
/// 400 on an OOM. Generation stays paused if it was.
async fn sglang_resume(State(eng): State<Shared>, body: Bytes) -> Response {
    let parts = sglang_parts(&parse_body(&body));
    match eng.acquire(parts).await {
        Ok(_) => Json(Value::Null).into_response(),
        Err(line) => sglang_error(&line),
    }
}
