//! vLLM's API (see [`Kind::Vllm`](super::Kind::Vllm)): sleep, wake up, is sleeping, and
//! `reload_weights`.

use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde_json::json;

use super::infer::{
    chat_completions, completions, openai_error, openai_models, query_get, query_pairs,
};
use super::parse_body;
use super::state::{Parts, Shared};

pub(super) fn vllm_router() -> Router<Shared> {
    Router::new()
        .route("/health", get(|| async { StatusCode::OK }))
        .route("/v1/models", get(openai_models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/sleep", post(vllm_sleep))
        .route("/wake_up", post(vllm_wake_up))
        .route("/is_sleeping", get(vllm_is_sleeping))
        .route("/collective_rpc", post(vllm_collective_rpc))
        .route("/reset_prefix_cache", post(|| async { StatusCode::OK }))
}

fn vllm_error(status: StatusCode, message: &str, kind: &str) -> Response {
    openai_error(status, message, kind, None)
}

/// `POST /sleep?level=L&mode=M`: pauses the scheduler (aborting, waiting for or holding in-flight
/// requests), then frees the memory; answers once the release has started, before the memory is freed.
async fn vllm_sleep(State(eng): State<Shared>, RawQuery(q): RawQuery) -> Response {
    let pairs = query_pairs(&q);
    let level = match query_get(&pairs, "level") {
        None => eng.opts.vllm_level,
        Some(l) => match l.parse::<u8>() {
            Ok(l) => l,
            Err(_) => {
                return vllm_error(
                    StatusCode::BAD_REQUEST,
                    &format!("invalid level {l:?}"),
                    "BadRequestError",
                )
            }
        },
    };
    let mode = query_get(&pairs, "mode").unwrap_or("abort").to_string();
    if !matches!(mode.as_str(), "abort" | "wait" | "keep") {
        return vllm_error(
            StatusCode::BAD_REQUEST,
            &format!("invalid mode {mode:?}"),
            "BadRequestError",
        );
    }
    let task = tokio::spawn(async move {
        let guard = eng.op_lock().await;
        eng.update(|st| {
            st.paused = true;
            st.last_level = Some(level);
            match mode.as_str() {
                "abort" => st.abort_epoch += 1,
                "keep" => st.hold = true,
                _ => {}
            }
        });
        if level == 0 {
            return;
        }
        if mode == "wait" {
            eng.wait_for(|st| st.in_flight == 0).await;
        }
        if !eng.read(|st| st.weights || st.kv) {
            // "Executor is already sleeping."
            return;
        }
        if level >= 2 {
            eng.update(|st| st.stale = true);
        }
        eng.spawn_release(guard, Parts::ALL, false);
    });
    let _ = task.await;
    StatusCode::OK.into_response()
}

/// `POST /wake_up[?tags=weights][&tags=kv_cache]`: takes the memory back (500 on an OOM) and, once
/// every tag is resident, resumes the scheduler; answers when done.
async fn vllm_wake_up(State(eng): State<Shared>, RawQuery(q): RawQuery) -> Response {
    let pairs = query_pairs(&q);
    let parts = Parts::from_tags(
        pairs
            .iter()
            .filter(|(k, _)| k == "tags")
            .map(|(_, v)| v.as_str()),
    );
    match eng.acquire(parts).await {
        Ok(_) => StatusCode::OK.into_response(),
        Err(line) => vllm_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &line,
            "InternalServerError",
        ),
    }
}

/// `GET /is_sleeping`: the scheduler is paused or a tag is asleep; says nothing of the GPU's memory.
async fn vllm_is_sleeping(State(eng): State<Shared>) -> Response {
    let sleeping = eng.read(|st| st.paused || !st.resident());
    Json(json!({"is_sleeping": sleeping})).into_response()
}

/// `POST /collective_rpc {"method": M}`: `reload_weights` makes the woken weights valid again.
async fn vllm_collective_rpc(State(eng): State<Shared>, body: Bytes) -> Response {
    let body = parse_body(&body);
    let Some(method) = body["method"].as_str() else {
        return vllm_error(
            StatusCode::BAD_REQUEST,
            "Missing 'method' in request body",
            "Bad Request",
        );
    };
    if method == "reload_weights" {
        if !eng.read(|st| st.weights) {
            return vllm_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "reload_weights: the weights are asleep; wake_up?tags=weights first",
                "InternalServerError",
            );
        }
        eng.update(|st| st.stale = false);
    }
    Json(json!({"results": [null]})).into_response()
}
