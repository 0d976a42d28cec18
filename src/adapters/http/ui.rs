//! The web page (`GET /`, `/ui`): who holds each GPU, the VRAM, the engine sidecars, the queue and a
//! live timeline. Its three files are part of the binary (no build step, no CDN): the page reads
//! `/gpu/status`, `/gpu/engines` and `/gpu/events` like any client, with the token the operator types
//! in (kept in the tab's session storage, never in the URL).

use axum::http::header;
use axum::response::{IntoResponse, Response};

const INDEX: &str = include_str!("ui/index.html");
const APP: &str = include_str!("ui/app.js");
const STYLE: &str = include_str!("ui/style.css");

fn file(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

pub(super) async fn index() -> Response {
    file("text/html; charset=utf-8", INDEX)
}

pub(super) async fn app() -> Response {
    file("text/javascript; charset=utf-8", APP)
}

pub(super) async fn style() -> Response {
    file("text/css; charset=utf-8", STYLE)
}
