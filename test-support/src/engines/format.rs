//! The answers to inference requests, as each API renders them: OpenAI's completions and chat (SSE),
//! Ollama's generate and chat (NDJSON), streamed chunk by chunk or whole.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use serde_json::{json, Value};

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Api {
    Completions,
    Chat,
    OllamaGenerate,
    OllamaChat,
}

/// Renders one request's answers.
pub(super) struct Fmt {
    pub(super) api: Api,
    pub(super) id: String,
    pub(super) model: String,
    pub(super) created: i64,
}

static REQUESTS: AtomicU64 = AtomicU64::new(0);

pub(super) fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

pub(super) fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

pub(super) fn token(i: usize) -> String {
    format!("tok{i} ")
}

impl Fmt {
    pub(super) fn new(api: Api, model: &str) -> Fmt {
        let n = REQUESTS.fetch_add(1, Ordering::Relaxed);
        let prefix = if api == Api::Chat { "chatcmpl" } else { "cmpl" };
        Fmt {
            api,
            id: format!("{prefix}-fake{n}"),
            model: model.to_string(),
            created: now_unix(),
        }
    }

    pub(super) fn line(&self, v: Value) -> Bytes {
        match self.api {
            Api::Completions | Api::Chat => Bytes::from(format!("data: {v}\n\n")),
            Api::OllamaGenerate | Api::OllamaChat => Bytes::from(format!("{v}\n")),
        }
    }

    pub(super) fn content_type(&self) -> &'static str {
        match self.api {
            Api::Completions | Api::Chat => "text/event-stream",
            Api::OllamaGenerate | Api::OllamaChat => "application/x-ndjson",
        }
    }

    fn openai_chunk(&self, choice: Value) -> Value {
        let object = if self.api == Api::Chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        json!({
            "id": self.id, "object": object, "created": self.created, "model": self.model,
            "choices": [choice],
        })
    }

    fn ollama_stats(&self, v: &mut Value, done_reason: &str, n: usize) {
        v["done"] = json!(true);
        v["done_reason"] = json!(done_reason);
        v["total_duration"] = json!(1_000_000u64);
        v["load_duration"] = json!(1_000u64);
        v["prompt_eval_count"] = json!(1);
        v["prompt_eval_duration"] = json!(1_000u64);
        v["eval_count"] = json!(n);
        v["eval_duration"] = json!(1_000_000u64);
    }

    /// Token `i`, streamed.
    pub(super) fn chunk(&self, i: usize) -> Bytes {
        let t = token(i);
        let v = match self.api {
            Api::Completions => self.openai_chunk(
                json!({"index": 0, "text": t, "logprobs": null, "finish_reason": null}),
            ),
            Api::Chat => {
                let delta = if i == 0 {
                    json!({"role": "assistant", "content": t})
                } else {
                    json!({"content": t})
                };
                self.openai_chunk(
                    json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": null}),
                )
            }
            Api::OllamaGenerate => {
                json!({"model": self.model, "created_at": now_rfc3339(), "response": t, "done": false})
            }
            Api::OllamaChat => json!({
                "model": self.model, "created_at": now_rfc3339(),
                "message": {"role": "assistant", "content": t}, "done": false,
            }),
        };
        self.line(v)
    }

    /// The end of a stream of `n` tokens, `finish` being `stop` or `abort`.
    pub(super) fn end(&self, finish: &str, n: usize) -> Bytes {
        match self.api {
            Api::Completions | Api::Chat => {
                let choice = if self.api == Api::Chat {
                    json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": finish})
                } else {
                    json!({"index": 0, "text": "", "logprobs": null, "finish_reason": finish})
                };
                let mut out = format!("data: {}\n\n", self.openai_chunk(choice));
                out.push_str("data: [DONE]\n\n");
                Bytes::from(out)
            }
            Api::OllamaGenerate | Api::OllamaChat if finish != "stop" => {
                self.line(json!({"error": "the request was aborted: the model was unloaded"}))
            }
            Api::OllamaGenerate | Api::OllamaChat => {
                let mut v = if self.api == Api::OllamaChat {
                    json!({
                        "model": self.model, "created_at": now_rfc3339(),
                        "message": {"role": "assistant", "content": ""},
                    })
                } else {
                    json!({"model": self.model, "created_at": now_rfc3339(), "response": ""})
                };
                self.ollama_stats(&mut v, "stop", n);
                self.line(v)
            }
        }
    }

    /// A whole, non-streamed answer of `n` tokens.
    pub(super) fn whole(&self, finish: &str, n: usize) -> Value {
        let text: String = (0..n).map(token).collect();
        let usage = json!({"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1});
        match self.api {
            Api::Completions => json!({
                "id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}],
                "usage": usage,
            }),
            Api::Chat => json!({
                "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{
                    "index": 0, "message": {"role": "assistant", "content": text},
                    "logprobs": null, "finish_reason": finish,
                }],
                "usage": usage,
            }),
            Api::OllamaGenerate | Api::OllamaChat => {
                let mut v = if self.api == Api::OllamaChat {
                    json!({
                        "model": self.model, "created_at": now_rfc3339(),
                        "message": {"role": "assistant", "content": text},
                    })
                } else {
                    json!({"model": self.model, "created_at": now_rfc3339(), "response": text})
                };
                self.ollama_stats(&mut v, finish, n);
                v
            }
        }
    }
}
