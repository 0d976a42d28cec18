//! Triton with explicit model control (see [`Kind::Triton`](super::Kind::Triton)): the repository's
//! index, load and unload, and inference.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde_json::{json, Value};

use super::format::token;
use super::infer::generate;
use super::state::{Parts, Shared, St};
use super::{error400, parse_body};

pub(super) fn triton_router() -> Router<Shared> {
    Router::new()
        .route("/v2/health/live", get(|| async { StatusCode::OK }))
        .route("/v2/health/ready", get(|| async { StatusCode::OK }))
        .route("/v2", get(triton_server_metadata))
        .route("/v2/models/{m}/ready", get(triton_model_ready))
        .route("/v2/models/{m}/infer", post(triton_infer))
        .route("/v2/repository/index", post(triton_index))
        .route("/v2/repository/models/{m}/load", post(triton_load))
        .route("/v2/repository/models/{m}/unload", post(triton_unload))
}

fn triton_error(message: String) -> Response {
    error400(json!({"error": message}))
}

async fn triton_server_metadata() -> Response {
    Json(json!({"name": "triton", "version": "2.0.0-fake", "extensions": ["model_repository"]}))
        .into_response()
}

async fn triton_model_ready(State(eng): State<Shared>, Path(m): Path<String>) -> StatusCode {
    if m == eng.opts.model && eng.read(St::serving) {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    }
}

/// `POST /v2/repository/index {"ready": bool}`: the model with its state.
async fn triton_index(State(eng): State<Shared>, body: Bytes) -> Response {
    let only_ready = parse_body(&body)["ready"].as_bool().unwrap_or(false);
    let m = &eng.opts.model;
    let entry = eng.read(|st| {
        let (state, reason) = if st.acquiring {
            ("LOADING", String::new())
        } else if st.resident() && !st.paused && !st.releasing {
            ("READY", String::new())
        } else if st.resident() {
            ("UNLOADING", String::new())
        } else if let Some(failed) = &st.failed {
            ("UNAVAILABLE", failed.clone())
        } else if st.ever_loaded {
            ("UNAVAILABLE", "unloaded".to_string())
        } else {
            return json!({"name": m});
        };
        json!({"name": m, "version": "1", "state": state, "reason": reason})
    });
    let ready = entry["state"] == "READY";
    let index = if only_ready && !ready {
        vec![]
    } else {
        vec![entry]
    };
    Json(Value::Array(index)).into_response()
}

/// `POST /v2/repository/models/M/load`: answers once loaded, 400 on an OOM.
async fn triton_load(State(eng): State<Shared>, Path(m): Path<String>) -> Response {
    if m != eng.opts.model {
        return triton_error(format!(
            "failed to load '{m}', failed to poll from model repository"
        ));
    }
    match eng.acquire(Parts::ALL).await {
        Ok(_) => StatusCode::OK.into_response(),
        Err(line) => triton_error(format!("failed to load '{m}', {line}")),
    }
}

/// `POST /v2/repository/models/M/unload`: answers at once, "does not wait for the requested model to
/// be fully unloaded": the memory goes once in-flight requests end, `sleep_time` later.
async fn triton_unload(State(eng): State<Shared>, Path(m): Path<String>) -> Response {
    if m == eng.opts.model {
        eng.unload_all().await;
    }
    StatusCode::OK.into_response()
}

/// `POST /v2/models/M/infer`: answers after the `chunks` tokens, the text in a BYTES output.
async fn triton_infer(State(eng): State<Shared>, Path(m): Path<String>) -> Response {
    if m != eng.opts.model {
        return triton_error(format!("Request for unknown model: '{m}' is not found"));
    }
    let Some(adm) = eng.admit() else {
        return eng.refusal();
    };
    let (ok, n) = generate(&adm).await;
    if !ok {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": "the request was cancelled: the model was unloaded"})),
        )
            .into_response();
    }
    adm.served();
    let text: String = (0..n).map(token).collect();
    Json(json!({
        "model_name": m, "model_version": "1",
        "outputs": [{"name": "OUTPUT0", "datatype": "BYTES", "shape": [1], "data": [text]}],
    }))
    .into_response()
}
