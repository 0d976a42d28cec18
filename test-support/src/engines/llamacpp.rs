//! llama.cpp's router mode (see [`Kind::Llamacpp`](super::Kind::Llamacpp)): its models with their
//! status, load and unload.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde_json::json;

use super::format::now_unix;
use super::infer::{chat_completions, completions, llama_error};
use super::parse_body;
use super::state::{Parts, Shared};

pub(super) fn llamacpp_router() -> Router<Shared> {
    Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/models", get(llamacpp_models))
        .route("/v1/models", get(llamacpp_models))
        .route("/models/load", post(llamacpp_load))
        .route("/models/unload", post(llamacpp_unload))
        .route("/v1/completions", post(completions))
        .route("/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/chat/completions", post(chat_completions))
}

/// `GET /models`: the model with its status; `loaded` until the instance has exited.
async fn llamacpp_models(State(eng): State<Shared>) -> Response {
    let status = eng.read(|st| {
        let args = json!(["llama-server", "--host", "127.0.0.1"]);
        if st.acquiring {
            json!({"value": "loading", "args": args})
        } else if st.resident() {
            json!({"value": "loaded", "args": args})
        } else if st.failed.is_some() {
            json!({"value": "unloaded", "args": args, "failed": true, "exit_code": 1})
        } else {
            json!({"value": "unloaded", "args": args})
        }
    });
    Json(json!({"object": "list", "data": [{
        "id": eng.opts.model, "object": "model", "owned_by": "llamacpp", "created": now_unix(),
        "in_cache": true, "path": format!("/models/{}.gguf", eng.opts.model), "status": status,
    }]}))
    .into_response()
}

/// `POST /models/load {"model"}`: starts loading and answers at once; a load that runs out of memory
/// shows in `GET /models` as `unloaded`, `failed`, `exit_code` 1.
async fn llamacpp_load(State(eng): State<Shared>, body: Bytes) -> Response {
    let body = parse_body(&body);
    if body["model"].as_str() != Some(eng.opts.model.as_str()) {
        return llama_error(404, "model is not found", "not_found_error");
    }
    let start = eng.update(|st| {
        if st.resident() {
            Err(())
        } else if st.acquiring {
            Ok(false)
        } else {
            st.acquiring = true;
            st.failed = None;
            Ok(true)
        }
    });
    match start {
        Err(()) => llama_error(400, "model is already loaded", "invalid_request_error"),
        Ok(start) => {
            if start {
                let eng = eng.clone();
                tokio::spawn(async move {
                    let _ = eng.acquire(Parts::ALL).await;
                });
            }
            Json(json!({"success": true})).into_response()
        }
    }
}

/// `POST /models/unload {"model"}`: stops the instance (in-flight requests end) and answers at once;
/// the memory goes when the instance has exited, `sleep_time` later.
async fn llamacpp_unload(State(eng): State<Shared>, body: Bytes) -> Response {
    let body = parse_body(&body);
    if body["model"].as_str() != Some(eng.opts.model.as_str()) {
        return llama_error(400, "model is not found", "invalid_request_error");
    }
    if eng.read(|st| st.release_pending) {
        return Json(json!({"success": true})).into_response();
    }
    if !eng.read(|st| st.resident() && !st.acquiring) {
        return llama_error(400, "model is not loaded", "invalid_request_error");
    }
    let task = tokio::spawn(async move {
        let guard = eng.op_lock().await;
        if eng.read(|st| st.weights || st.kv) {
            eng.update(|st| {
                st.paused = true;
                st.abort_epoch += 1;
            });
            eng.spawn_release(guard, Parts::ALL, false);
        }
    });
    let _ = task.await;
    Json(json!({"success": true})).into_response()
}
