//! The demo's services speak the HTTP API, as a service without a NATS client would, so that the demo
//! runs the same against the embedded and the distributed coordinator: `POST /gpu/*` calls, the status,
//! and Server-Sent Events (control orders, events).

use anyhow::Context as _;
use futures::StreamExt;
use gpu_coordinator_wire::StatusDoc;
use serde_json::Value;
use tokio::sync::mpsc;

/// One SSE event: its name and its data.
pub(super) type SseEvent = (String, String);

/// The coordinator's HTTP API at `base`.
#[derive(Clone)]
pub(super) struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    pub(super) fn new(base: String) -> Api {
        Api {
            base,
            http: reqwest::Client::new(),
        }
    }

    /// `POST path` with a JSON body: the status and the JSON answer.
    pub(super) async fn call(&self, path: &str, body: Value) -> anyhow::Result<(u16, Value)> {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .with_context(|| format!("POST {path}"))?;
        let status = response.status().as_u16();
        let answer = response
            .json::<Value>()
            .await
            .with_context(|| format!("the answer to POST {path}"))?;
        Ok((status, answer))
    }

    /// `GET /gpu/status`; `None` while the coordinator is not ready (503).
    pub(super) async fn status(&self) -> anyhow::Result<Option<StatusDoc>> {
        let response = self
            .http
            .get(format!("{}/gpu/status", self.base))
            .send()
            .await
            .context("GET /gpu/status")?;
        if response.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE {
            return Ok(None);
        }
        let response = response.error_for_status().context("GET /gpu/status")?;
        Ok(Some(response.json().await.context("the status document")?))
    }

    /// `GET path` as Server-Sent Events: once this returns, the stream is open (nothing stored later
    /// is missed), and its events come on the receiver until the coordinator ends the stream.
    pub(super) async fn events(
        &self,
        path: &str,
    ) -> anyhow::Result<mpsc::UnboundedReceiver<SseEvent>> {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .with_context(|| format!("GET {path}"))?
            .error_for_status()
            .with_context(|| format!("GET {path}"))?;
        let (tx, rx) = mpsc::unbounded_channel();
        let mut body = response.bytes_stream();
        tokio::spawn(async move {
            let mut buffer = String::new();
            while let Some(Ok(chunk)) = body.next().await {
                buffer.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(end) = buffer.find("\n\n") {
                    let block: String = buffer.drain(..end + 2).collect();
                    if let Some(event) = parse_event(&block) {
                        if tx.send(event).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Ok(rx)
    }

    /// The number of events the coordinator keeps (`GET /gpu/events?since=...&format=jsonl`).
    pub(super) async fn events_kept(&self) -> anyhow::Result<usize> {
        let text = self
            .http
            .get(format!("{}/gpu/events?since=1d&format=jsonl", self.base))
            .send()
            .await
            .context("GET /gpu/events")?
            .error_for_status()
            .context("GET /gpu/events")?
            .text()
            .await
            .context("reading the events")?;
        Ok(text.lines().filter(|l| !l.trim().is_empty()).count())
    }
}

/// An SSE block's event name and data; `None` for a comment or keep-alive.
fn parse_event(block: &str) -> Option<SseEvent> {
    let (mut name, mut data) = (None, Vec::new());
    for line in block.lines() {
        if let Some(v) = line.strip_prefix("event:") {
            name = Some(v.trim().to_owned());
        } else if let Some(v) = line.strip_prefix("data:") {
            data.push(v.strip_prefix(' ').unwrap_or(v).to_owned());
        }
    }
    Some((name?, data.join("\n")))
}

#[cfg(test)]
mod tests {
    use super::parse_event;

    #[test]
    fn sse_blocks_give_their_name_and_data() {
        assert_eq!(
            parse_event("event: pause\nid: 7\ndata: {\"a\":1}\n\n"),
            Some(("pause".into(), "{\"a\":1}".into()))
        );
        assert_eq!(parse_event(": hello\n\n"), None);
    }
}
