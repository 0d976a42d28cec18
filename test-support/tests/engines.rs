//! The fake engines over real HTTP: each kind's switches free memory only after its sleep time (the
//! call answering before), a wake into a full GPU is an OOM, streams come chunk by chunk, Ollama loads on
//! request, and the process engine's memory goes with its process.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use gpu_coordinator_test_support::engines::{
    fake_process_engine_script, poll_until, FakeEngine, FakeEngineOptions, FakeGpu, Kind,
};
use gpu_coordinator_test_support::free_port;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(10);

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("an HTTP client")
}

async fn post(url: String, body: Value) -> reqwest::Response {
    client()
        .post(url)
        .json(&body)
        .send()
        .await
        .expect("the request")
}

async fn post_empty(url: String) -> reqwest::Response {
    client().post(url).send().await.expect("the request")
}

async fn get(url: String) -> reqwest::Response {
    client().get(url).send().await.expect("the request")
}

async fn json_of(resp: reqwest::Response) -> Value {
    resp.json().await.expect("a JSON body")
}

fn opts(name: &str, kind: Kind, mb: u64) -> FakeEngineOptions {
    FakeEngineOptions::new(name, kind, mb)
}

/// Polls until `engine` holds `mb`, within [`WAIT`].
async fn until_holding(gpu: &FakeGpu, engine: &str, mb: u64) {
    poll_until(WAIT, &format!("{engine} to hold {mb} MB"), || {
        gpu.holding(engine) == mb
    })
    .await;
}

/// When the ledger last set `engine` to `mb`.
fn when_set(gpu: &FakeGpu, engine: &str, mb: u64) -> Instant {
    gpu.log()
        .iter()
        .rev()
        .find(|e| e.engine == engine && e.engine_mb == mb)
        .unwrap_or_else(|| panic!("no event setting {engine} to {mb} MB"))
        .at
}

/// Reads a streamed body, splitting it on `sep`: each event with when it arrived.
async fn events(resp: reqwest::Response, sep: &str) -> Vec<(Instant, String)> {
    assert!(resp.status().is_success(), "status {}", resp.status());
    let mut out = Vec::new();
    let mut buf = String::new();
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        buf.push_str(std::str::from_utf8(&chunk.expect("a chunk")).expect("UTF-8"));
        while let Some(i) = buf.find(sep) {
            let event: String = buf.drain(..i + sep.len()).collect();
            out.push((Instant::now(), event.trim().to_string()));
        }
    }
    assert!(buf.trim().is_empty(), "a partial event at the end: {buf:?}");
    out
}

#[tokio::test]
async fn the_gpu_refuses_an_allocation_beyond_its_capacity_and_records_it() {
    let gpu = FakeGpu::start(1000).await;
    gpu.alloc("a", 600, None).expect("room for a");
    let line = gpu.alloc("b", 600, None).expect_err("no room for b");
    assert!(
        line.contains("`b` asked for 600 MB") && line.contains("a: 600 MB"),
        "{line}"
    );
    assert_eq!(gpu.ooms(), vec![line]);

    // The same ledger over HTTP, for engines in other processes.
    let resp = post(
        format!("{}/alloc", gpu.url()),
        json!({"engine": "c", "mb": 500}),
    )
    .await;
    assert_eq!(resp.status(), 507);
    assert!(json_of(resp).await["error"]
        .as_str()
        .unwrap()
        .contains("`c` asked for 500 MB"));
    let resp = post(
        format!("{}/alloc", gpu.url()),
        json!({"engine": "c", "mb": 400}),
    )
    .await;
    assert_eq!(json_of(resp).await["total_mb"], 1000);
    let resp = post(format!("{}/free", gpu.url()), json!({"engine": "a"})).await;
    assert_eq!(json_of(resp).await["freed_mb"], 600);
    let state = json_of(get(format!("{}/state", gpu.url())).await).await;
    assert_eq!(state["used_mb"], 400);
    assert_eq!(state["ooms"].as_array().unwrap().len(), 2);

    assert_eq!(
        (gpu.used_mb(), gpu.peak_mb(), gpu.holding("c")),
        (400, 1000, 400)
    );
    let totals: Vec<u64> = gpu.log().iter().map(|e| e.total_mb).collect();
    assert_eq!(totals, vec![600, 1000, 400]);
}

#[tokio::test]
async fn every_kind_answers_its_health_path_and_refuses_a_second_engine_without_room() {
    let gpu = FakeGpu::start(10_000).await;
    for kind in [
        Kind::Vllm,
        Kind::Sglang,
        Kind::Ollama,
        Kind::Llamacpp,
        Kind::Triton,
    ] {
        let name = format!("{kind:?}");
        let engine = FakeEngine::start(&gpu, opts(&name, kind, 1000)).await;
        assert_eq!(gpu.holding(&name), 1000);
        let resp = get(format!("{}{}", engine.url(), kind.health_path())).await;
        assert_eq!(resp.status(), 200, "{kind:?}");
        assert!(engine.awake());
        engine.stop().await;
        assert_eq!(
            gpu.holding(&name),
            0,
            "a stopped engine's memory goes with it"
        );
    }
    let _big = FakeEngine::start(&gpu, opts("big", Kind::Vllm, 9_500)).await;
    let err = FakeEngine::try_start(&gpu, opts("late", Kind::Vllm, 1000))
        .await
        .err()
        .expect("no room at start");
    assert!(err.contains("`late`"), "{err}");
    let o = FakeEngine::start(
        &gpu,
        FakeEngineOptions {
            awake_at_start: false,
            ..opts("o", Kind::Ollama, 100)
        },
    )
    .await;
    let root = get(format!("{}/", o.url())).await.text().await.unwrap();
    assert_eq!(
        root, "Ollama is running",
        "whether its model is loaded or not"
    );
}

#[tokio::test]
async fn vllm_sleep_answers_before_the_memory_is_freed_and_wakes_it_back() {
    let gpu = FakeGpu::start(1000).await;
    let sleep_time = Duration::from_millis(300);
    let v = FakeEngine::start(
        &gpu,
        FakeEngineOptions {
            sleep_time,
            ..opts("v", Kind::Vllm, 600)
        },
    )
    .await;
    let completion = json!({"model": "m", "prompt": "hi"});
    let resp = post(format!("{}/v1/completions", v.url()), completion.clone()).await;
    assert_eq!(json_of(resp).await["choices"][0]["finish_reason"], "stop");
    assert_eq!(v.served(), 1);

    let asked = Instant::now();
    let resp = post_empty(format!("{}/sleep?level=1", v.url())).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.bytes().await.unwrap().len(),
        0,
        "vLLM's /sleep answers an empty body"
    );
    assert_eq!(
        gpu.holding("v"),
        600,
        "the answer comes before the memory is freed"
    );
    // True from the call on: is_sleeping says nothing of the memory.
    let s = json_of(get(format!("{}/is_sleeping", v.url())).await).await;
    assert_eq!(s, json!({"is_sleeping": true}));
    assert!(!v.awake());
    let resp = post(format!("{}/v1/completions", v.url()), completion.clone()).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(v.refused_asleep(), 1);
    assert_eq!(
        get(format!("{}/health", v.url())).await.status(),
        200,
        "alive while asleep"
    );

    until_holding(&gpu, "v", 0).await;
    assert!(
        when_set(&gpu, "v", 0) >= asked + sleep_time,
        "freed no sooner than sleep_time"
    );
    assert_eq!((v.sleeps(), v.last_sleep_level()), (1, Some(1)));

    let resp = post_empty(format!("{}/wake_up", v.url())).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(gpu.holding("v"), 600);
    assert!(v.awake());
    let s = json_of(get(format!("{}/is_sleeping", v.url())).await).await;
    assert_eq!(s["is_sleeping"], false);
    let resp = post(format!("{}/v1/completions", v.url()), completion).await;
    assert_eq!(resp.status(), 200);
    assert_eq!((v.served(), v.wakes()), (2, 1));

    let intervals = v.awake_intervals();
    assert_eq!(intervals.len(), 2);
    assert!(intervals[0]
        .1
        .is_some_and(|end| end <= when_set(&gpu, "v", 0)));
    assert!(intervals[1].1.is_none());
}

#[tokio::test]
async fn a_vllm_wake_before_the_gpu_is_free_is_an_oom() {
    let gpu = FakeGpu::start(1000).await;
    let a = FakeEngine::start(
        &gpu,
        FakeEngineOptions {
            sleep_time: Duration::from_millis(300),
            ..opts("a", Kind::Vllm, 600)
        },
    )
    .await;
    let b = FakeEngine::start(
        &gpu,
        FakeEngineOptions {
            awake_at_start: false,
            ..opts("b", Kind::Vllm, 600)
        },
    )
    .await;
    assert_eq!(
        json_of(get(format!("{}/is_sleeping", b.url())).await).await["is_sleeping"],
        true
    );

    assert_eq!(post_empty(format!("{}/sleep", a.url())).await.status(), 200);
    // The bug a sidecar must avoid: a's 200 does not mean its memory is back.
    let resp = post_empty(format!("{}/wake_up", b.url())).await;
    assert_eq!(resp.status(), 500);
    let err = json_of(resp).await;
    assert_eq!(err["error"]["type"], "InternalServerError");
    assert!(err["error"]["message"]
        .as_str()
        .unwrap()
        .contains("out of memory"));
    assert_eq!(gpu.ooms().len(), 1);
    assert!(gpu.ooms()[0].contains("`b` asked for 600 MB") && gpu.ooms()[0].contains("a: 600 MB"));
    assert!(!b.awake());

    until_holding(&gpu, "a", 0).await;
    assert_eq!(
        post_empty(format!("{}/wake_up", b.url())).await.status(),
        200
    );
    assert!(b.awake());
    assert_eq!((gpu.used_mb(), gpu.peak_mb()), (600, 600));
}

#[tokio::test]
async fn a_vllm_level_two_sleep_wakes_by_tags_and_needs_reload_weights() {
    let gpu = FakeGpu::start(1000).await;
    let v = FakeEngine::start(
        &gpu,
        FakeEngineOptions {
            weights_mb: 400,
            ..opts("v", Kind::Vllm, 600)
        },
    )
    .await;
    let completion = json!({"prompt": "hi"});
    assert_eq!(
        post_empty(format!("{}/sleep?level=2", v.url()))
            .await
            .status(),
        200
    );
    until_holding(&gpu, "v", 0).await;

    assert_eq!(
        post_empty(format!("{}/wake_up?tags=weights", v.url()))
            .await
            .status(),
        200
    );
    assert_eq!(gpu.holding("v"), 400);
    assert_eq!(
        json_of(get(format!("{}/is_sleeping", v.url())).await).await["is_sleeping"],
        true
    );
    assert_eq!(
        post(format!("{}/v1/completions", v.url()), completion.clone())
            .await
            .status(),
        503
    );

    assert_eq!(
        post_empty(format!("{}/wake_up?tags=kv_cache", v.url()))
            .await
            .status(),
        200
    );
    assert_eq!(gpu.holding("v"), 600);
    assert_eq!(
        json_of(get(format!("{}/is_sleeping", v.url())).await).await["is_sleeping"],
        false
    );
    assert_eq!(
        post(format!("{}/v1/completions", v.url()), completion.clone())
            .await
            .status(),
        200
    );
    assert_eq!(
        v.served_stale(),
        1,
        "woken weights are garbage until reload_weights"
    );

    let resp = post(
        format!("{}/collective_rpc", v.url()),
        json!({"method": "reload_weights"}),
    )
    .await;
    assert_eq!(json_of(resp).await, json!({"results": [null]}));
    assert_eq!(
        post(format!("{}/v1/completions", v.url()), completion)
            .await
            .status(),
        200
    );
    assert_eq!(
        (v.served(), v.served_stale(), v.last_sleep_level()),
        (2, 1, Some(2))
    );
}

#[tokio::test]
async fn a_vllm_sleep_aborts_in_flight_streams_or_waits_for_them() {
    let gpu = FakeGpu::start(1000).await;
    let v = FakeEngine::start(
        &gpu,
        FakeEngineOptions {
            chunks: 8,
            chunk_delay: Duration::from_millis(50),
            ..opts("v", Kind::Vllm, 600)
        },
    )
    .await;
    let stream = json!({"prompt": "hi", "stream": true});

    let resp = post(format!("{}/v1/completions", v.url()), stream.clone()).await;
    poll_until(WAIT, "a request in flight", || v.in_flight() == 1).await;
    assert_eq!(post_empty(format!("{}/sleep", v.url())).await.status(), 200);
    let got = events(resp, "\n\n").await;
    let last_chunk: Value =
        serde_json::from_str(got[got.len() - 2].1.trim_start_matches("data: ")).unwrap();
    assert_eq!(last_chunk["choices"][0]["finish_reason"], "abort");
    assert_eq!(got.last().unwrap().1, "data: [DONE]");
    assert_eq!(v.served(), 0);

    until_holding(&gpu, "v", 0).await;
    assert_eq!(
        post_empty(format!("{}/wake_up", v.url())).await.status(),
        200
    );
    let resp = post(format!("{}/v1/completions", v.url()), stream).await;
    poll_until(WAIT, "a request in flight", || v.in_flight() == 1).await;
    let sleep = tokio::spawn(post_empty(format!("{}/sleep?mode=wait", v.url())));
    let got = events(resp, "\n\n").await;
    assert_eq!(got.len(), 8 + 2, "every token, the end and [DONE]");
    let answered = sleep.await.unwrap();
    assert_eq!(answered.status(), 200);
    assert_eq!(v.served(), 1);
    until_holding(&gpu, "v", 0).await;
}

/// Asserts that a stream of `chunks` tokens `delay` apart came token by token.
fn assert_chunk_by_chunk(got: &[(Instant, String)], chunks: usize, delay: Duration) {
    assert!(got.len() >= chunks, "{got:?}");
    let first = got[0].0;
    let last = got[chunks - 1].0;
    let spread = delay * (chunks as u32 - 1);
    assert!(
        last.duration_since(first) >= spread.mul_f64(0.7),
        "the first token came {:?} before the last: buffered, not streamed",
        last.duration_since(first)
    );
}

#[tokio::test]
async fn streamed_completions_arrive_chunk_by_chunk_on_every_openai_kind() {
    let gpu = FakeGpu::start(10_000).await;
    let delay = Duration::from_millis(120);
    for kind in [Kind::Vllm, Kind::Sglang, Kind::Llamacpp] {
        let name = format!("{kind:?}");
        let e = FakeEngine::start(
            &gpu,
            FakeEngineOptions {
                chunks: 4,
                chunk_delay: delay,
                ..opts(&name, kind, 100)
            },
        )
        .await;
        for (path, body) in [
            (
                "/v1/completions",
                json!({"model": "m", "prompt": "hi", "stream": true}),
            ),
            (
                "/v1/chat/completions",
                json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true}),
            ),
        ] {
            let resp = post(format!("{}{path}", e.url()), body).await;
            assert_eq!(
                resp.headers()["content-type"],
                "text/event-stream",
                "{kind:?}"
            );
            let got = events(resp, "\n\n").await;
            assert_eq!(got.len(), 4 + 2, "{kind:?} {path}: {got:?}");
            assert_chunk_by_chunk(&got, 4, delay);
            let first: Value = serde_json::from_str(got[0].1.trim_start_matches("data: ")).unwrap();
            if path == "/v1/chat/completions" {
                assert_eq!(first["object"], "chat.completion.chunk");
                assert_eq!(first["choices"][0]["delta"]["content"], "tok0 ");
            } else {
                assert_eq!(first["object"], "text_completion");
                assert_eq!(first["choices"][0]["text"], "tok0 ");
            }
            assert_eq!(got[5].1, "data: [DONE]");
        }
        let resp = post(
            format!("{}/v1/chat/completions", e.url()),
            json!({"model": "m", "messages": []}),
        )
        .await;
        let whole = json_of(resp).await;
        assert_eq!(whole["object"], "chat.completion");
        assert_eq!(
            whole["choices"][0]["message"]["content"],
            "tok0 tok1 tok2 tok3 "
        );
        assert_eq!(e.served(), 3, "{kind:?}");
    }
}

#[tokio::test]
async fn ollama_streams_ndjson_unloads_on_keep_alive_zero_and_reloads_on_any_prompt() {
    let gpu = FakeGpu::start(1000).await;
    let delay = Duration::from_millis(120);
    let sleep_time = Duration::from_millis(200);
    let o = FakeEngine::start(
        &gpu,
        FakeEngineOptions {
            chunks: 4,
            chunk_delay: delay,
            sleep_time,
            ..opts("o", Kind::Ollama, 600)
        },
    )
    .await;
    let ps = json_of(get(format!("{}/api/ps", o.url())).await).await;
    assert_eq!(ps["models"][0]["name"], "m:latest");
    assert_eq!(ps["models"][0]["size_vram"], 600 * 1024 * 1024);

    // Streams by default, as NDJSON.
    let resp = post(
        format!("{}/api/generate", o.url()),
        json!({"model": "m", "prompt": "hi"}),
    )
    .await;
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    let got = events(resp, "\n").await;
    assert_eq!(got.len(), 4 + 1);
    assert_chunk_by_chunk(&got, 4, delay);
    let end: Value = serde_json::from_str(&got[4].1).unwrap();
    assert_eq!(
        (end["done"].clone(), end["done_reason"].clone()),
        (json!(true), json!("stop"))
    );

    // keep_alive 0 with no prompt unloads: answered at once, the memory goes later.
    let asked = Instant::now();
    let resp = post(
        format!("{}/api/generate", o.url()),
        json!({"model": "m", "keep_alive": 0}),
    )
    .await;
    let answer = json_of(resp).await;
    assert_eq!(
        (answer["done"].clone(), answer["done_reason"].clone()),
        (json!(true), json!("unload"))
    );
    assert_eq!(gpu.holding("o"), 600);
    until_holding(&gpu, "o", 0).await;
    assert!(when_set(&gpu, "o", 0) >= asked + sleep_time);
    assert_eq!(
        json_of(get(format!("{}/api/ps", o.url())).await).await,
        json!({"models": []})
    );

    // Any prompt loads it again: the quirk that makes a sidecar own the port.
    let chat = json!({"model": "m:latest", "messages": [{"role": "user", "content": "hi"}], "stream": false});
    let answer = json_of(post(format!("{}/api/chat", o.url()), chat).await).await;
    assert_eq!(answer["message"]["content"], "tok0 tok1 tok2 tok3 ");
    assert_eq!(
        (o.implicit_loads(), o.refused_asleep(), gpu.holding("o")),
        (1, 0, 600)
    );

    // keep_alive -1 with no prompt loads, and is no implicit load.
    post(
        format!("{}/api/generate", o.url()),
        json!({"model": "m", "keep_alive": "0s"}),
    )
    .await;
    until_holding(&gpu, "o", 0).await;
    let resp = post(
        format!("{}/api/generate", o.url()),
        json!({"model": "m", "keep_alive": -1}),
    )
    .await;
    assert_eq!(json_of(resp).await["done_reason"], "load");
    assert_eq!(
        (o.implicit_loads(), o.wakes(), o.sleeps(), gpu.holding("o")),
        (1, 2, 2, 600)
    );

    let resp = post(
        format!("{}/api/generate", o.url()),
        json!({"model": "other", "prompt": "hi"}),
    )
    .await;
    assert_eq!(resp.status(), 404);
    assert_eq!(
        json_of(resp).await,
        json!({"error": "model 'other' not found"})
    );
}

#[tokio::test]
async fn an_ollama_reload_into_a_full_gpu_fails() {
    let gpu = FakeGpu::start(1000).await;
    let o = FakeEngine::start(
        &gpu,
        FakeEngineOptions {
            awake_at_start: false,
            ..opts("o", Kind::Ollama, 600)
        },
    )
    .await;
    gpu.alloc("someone else", 500, None).unwrap();
    let resp = post(
        format!("{}/api/generate", o.url()),
        json!({"model": "m", "prompt": "hi"}),
    )
    .await;
    assert_eq!(resp.status(), 500);
    assert!(json_of(resp).await["error"]
        .as_str()
        .unwrap()
        .contains("out of memory"));
    assert_eq!(
        (gpu.ooms().len(), o.implicit_loads(), o.served()),
        (1, 0, 0)
    );
}

async fn llama_status(url: &str) -> Value {
    let models = json_of(get(format!("{url}/models")).await).await;
    assert_eq!(models["data"][0]["id"], "m");
    models["data"][0]["status"].clone()
}

#[tokio::test]
async fn llamacpp_router_loads_and_unloads_in_the_background() {
    let gpu = FakeGpu::start(1000).await;
    let l = FakeEngine::start(
        &gpu,
        FakeEngineOptions {
            awake_at_start: false,
            wake_time: Duration::from_millis(200),
            sleep_time: Duration::from_millis(200),
            ..opts("l", Kind::Llamacpp, 600)
        },
    )
    .await;
    let url = l.url();
    assert_eq!(llama_status(&url).await["value"], "unloaded");
    let completion = json!({"model": "m", "prompt": "hi"});
    let resp = post(format!("{url}/v1/completions"), completion.clone()).await;
    assert_eq!(resp.status(), 400);
    assert_eq!(
        json_of(resp).await,
        json!({"error": {"code": 400, "message": "model is not loaded", "type": "invalid_request_error"}})
    );
    assert_eq!(l.refused_asleep(), 1);

    let resp = post(format!("{url}/models/load"), json!({"model": "m"})).await;
    assert_eq!(json_of(resp).await, json!({"success": true}));
    assert_eq!(
        llama_status(&url).await["value"],
        "loading",
        "the load answers before it is done"
    );
    poll_until(WAIT, "l awake", || l.awake()).await;
    assert_eq!(
        (llama_status(&url).await["value"].clone(), gpu.holding("l")),
        (json!("loaded"), 600)
    );
    let resp = post(format!("{url}/models/load"), json!({"model": "m"})).await;
    assert_eq!(
        json_of(resp).await["error"]["message"],
        "model is already loaded"
    );
    assert_eq!(
        post(format!("{url}/v1/completions"), completion.clone())
            .await
            .status(),
        200
    );

    let resp = post(format!("{url}/models/unload"), json!({"model": "m"})).await;
    assert_eq!(json_of(resp).await, json!({"success": true}));
    assert_eq!(gpu.holding("l"), 600);
    assert_eq!(
        llama_status(&url).await["value"],
        "loaded",
        "loaded until the instance has exited"
    );
    until_holding(&gpu, "l", 0).await;
    assert_eq!(llama_status(&url).await["value"], "unloaded");
    let resp = post(format!("{url}/models/unload"), json!({"model": "m"})).await;
    assert_eq!(
        json_of(resp).await["error"]["message"],
        "model is not loaded"
    );

    // With autoload the router loads the model for the request.
    let resp = post(format!("{url}/v1/completions?autoload=true"), completion).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        (l.implicit_loads(), l.served(), l.wakes(), l.sleeps()),
        (1, 2, 2, 1)
    );

    // A load into a full GPU fails after its answer, as the instance dies.
    post(format!("{url}/models/unload"), json!({"model": "m"})).await;
    until_holding(&gpu, "l", 0).await;
    gpu.alloc("someone else", 500, None).unwrap();
    let resp = post(format!("{url}/models/load"), json!({"model": "m"})).await;
    assert_eq!(resp.status(), 200);
    let deadline = Instant::now() + WAIT;
    let status = loop {
        let status = llama_status(&url).await;
        if status["value"] != "loading" {
            break status;
        }
        assert!(Instant::now() < deadline, "the load never ended");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(
        (
            status["value"].clone(),
            status["failed"].clone(),
            status["exit_code"].clone()
        ),
        (json!("unloaded"), json!(true), json!(1))
    );
    assert_eq!(gpu.ooms().len(), 1);
}

async fn triton_index(url: &str, body: Value) -> Value {
    json_of(post(format!("{url}/v2/repository/index"), body).await).await
}

#[tokio::test]
async fn triton_unload_answers_before_the_memory_goes_and_a_load_without_room_fails() {
    let gpu = FakeGpu::start(1000).await;
    let sleep_time = Duration::from_millis(300);
    let t = FakeEngine::start(
        &gpu,
        FakeEngineOptions {
            awake_at_start: false,
            sleep_time,
            ..opts("t", Kind::Triton, 600)
        },
    )
    .await;
    let url = t.url();
    assert_eq!(triton_index(&url, json!({})).await, json!([{"name": "m"}]));
    let infer =
        json!({"inputs": [{"name": "INPUT0", "shape": [1], "datatype": "BYTES", "data": ["hi"]}]});
    let resp = post(format!("{url}/v2/models/m/infer"), infer.clone()).await;
    assert_eq!(resp.status(), 400);
    assert_eq!(t.refused_asleep(), 1);

    assert_eq!(
        post_empty(format!("{url}/v2/repository/models/m/load"))
            .await
            .status(),
        200
    );
    assert_eq!(
        triton_index(&url, json!({"ready": true})).await,
        json!([{"name": "m", "version": "1", "state": "READY", "reason": ""}])
    );
    assert_eq!(get(format!("{url}/v2/models/m/ready")).await.status(), 200);
    let out = json_of(post(format!("{url}/v2/models/m/infer"), infer).await).await;
    assert_eq!(out["outputs"][0]["data"][0], "tok0 tok1 tok2 ");

    let asked = Instant::now();
    assert_eq!(
        post_empty(format!("{url}/v2/repository/models/m/unload"))
            .await
            .status(),
        200
    );
    assert_eq!(
        gpu.holding("t"),
        600,
        "unload does not wait for the model to be unloaded"
    );
    assert_eq!(
        triton_index(&url, Value::Null).await[0]["state"],
        "UNLOADING"
    );
    until_holding(&gpu, "t", 0).await;
    assert!(when_set(&gpu, "t", 0) >= asked + sleep_time);
    assert_eq!(
        triton_index(&url, json!({})).await,
        json!([{"name": "m", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"}])
    );
    assert_eq!(triton_index(&url, json!({"ready": true})).await, json!([]));

    gpu.alloc("someone else", 500, None).unwrap();
    let resp = post_empty(format!("{url}/v2/repository/models/m/load")).await;
    assert_eq!(resp.status(), 400);
    assert!(json_of(resp).await["error"]
        .as_str()
        .unwrap()
        .contains("failed to load 'm'"));
    assert_eq!(
        triton_index(&url, json!({})).await[0]["state"],
        "UNAVAILABLE"
    );
    assert_eq!(gpu.ooms().len(), 1);
}

#[tokio::test]
async fn an_engine_that_never_frees_says_it_is_asleep_while_the_gpu_still_holds_its_memory() {
    let gpu = FakeGpu::start(1000).await;
    let t = FakeEngine::start(
        &gpu,
        FakeEngineOptions {
            never_frees: true,
            ..opts("t", Kind::Triton, 600)
        },
    )
    .await;
    assert_eq!(
        post_empty(format!("{}/v2/repository/models/m/unload", t.url()))
            .await
            .status(),
        200
    );
    let url = t.url();
    poll_until(WAIT, "t's release to end", || !t.releasing()).await;
    assert_eq!(
        triton_index(&url, json!({})).await[0]["state"],
        "UNAVAILABLE"
    );
    assert_eq!(
        gpu.holding("t"),
        600,
        "UNAVAILABLE, and the VRAM still held"
    );
    // A load takes back what it still holds without allocating more.
    assert_eq!(
        post_empty(format!("{url}/v2/repository/models/m/load"))
            .await
            .status(),
        200
    );
    assert_eq!((gpu.holding("t"), gpu.peak_mb()), (600, 600));

    let v = FakeEngine::start(
        &gpu,
        FakeEngineOptions {
            never_frees: true,
            ..opts("v", Kind::Vllm, 300)
        },
    )
    .await;
    assert_eq!(post_empty(format!("{}/sleep", v.url())).await.status(), 200);
    poll_until(WAIT, "v's release to end", || {
        v.sleeps() == 1 && !v.releasing()
    })
    .await;
    assert_eq!(
        json_of(get(format!("{}/is_sleeping", v.url())).await).await["is_sleeping"],
        true
    );
    assert_eq!(gpu.holding("v"), 300);
}

#[tokio::test]
async fn sglang_releases_after_its_answer_and_a_resume_into_a_full_gpu_fails() {
    let gpu = FakeGpu::start(1000).await;
    let sleep_time = Duration::from_millis(300);
    let a = FakeEngine::start(
        &gpu,
        FakeEngineOptions {
            sleep_time,
            ..opts("a", Kind::Sglang, 600)
        },
    )
    .await;
    let b = FakeEngine::start(
        &gpu,
        FakeEngineOptions {
            awake_at_start: false,
            ..opts("b", Kind::Sglang, 600)
        },
    )
    .await;
    assert_eq!(get(format!("{}/health", b.url())).await.status(), 503);

    let resp = post(
        format!("{}/pause_generation", a.url()),
        json!({"mode": "retract"}),
    )
    .await;
    assert_eq!(
        json_of(resp).await,
        json!({"message": "Generation paused successfully.", "status": "ok"})
    );
    let resp = post(
        format!("{}/v1/completions", a.url()),
        json!({"prompt": "hi"}),
    )
    .await;
    assert_eq!(resp.status(), 503);
    assert_eq!(a.refused_asleep(), 1);

    let asked = Instant::now();
    let resp = post(format!("{}/release_memory_occupation", a.url()), json!({})).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "null");
    assert_eq!(gpu.holding("a"), 600, "released after the answer");

    let resp = post(format!("{}/resume_memory_occupation", b.url()), json!({})).await;
    assert_eq!(resp.status(), 400);
    assert!(json_of(resp).await["error"]["message"]
        .as_str()
        .unwrap()
        .contains("out of memory"));
    assert_eq!(gpu.ooms().len(), 1);

    until_holding(&gpu, "a", 0).await;
    assert!(when_set(&gpu, "a", 0) >= asked + sleep_time);
    let resp = post(
        format!("{}/resume_memory_occupation", b.url()),
        json!({"tags": ["weights", "kv_cache"]}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert!(b.awake(), "b was never paused");
    assert_eq!(get(format!("{}/health", b.url())).await.status(), 200);

    // a: its memory back only when there is room, and serving only after continue_generation.
    post(format!("{}/release_memory_occupation", b.url()), json!({})).await;
    until_holding(&gpu, "b", 0).await;
    assert_eq!(
        post(format!("{}/resume_memory_occupation", a.url()), json!({}))
            .await
            .status(),
        200
    );
    assert!(!a.awake(), "still paused");
    let resp = post_empty(format!("{}/continue_generation", a.url())).await;
    assert_eq!(
        json_of(resp).await,
        json!({"message": "Generation continued successfully.", "status": "ok"})
    );
    assert!(a.awake());
    assert_eq!((a.sleeps(), a.wakes(), b.sleeps(), b.wakes()), (1, 1, 1, 1));
}

#[tokio::test]
async fn sglang_refuses_to_release_while_requests_run_unpaused() {
    let gpu = FakeGpu::start(1000).await;
    let s = FakeEngine::start(
        &gpu,
        FakeEngineOptions {
            chunks: 20,
            chunk_delay: Duration::from_millis(25),
            ..opts("s", Kind::Sglang, 600)
        },
    )
    .await;
    let resp = post(
        format!("{}/v1/completions", s.url()),
        json!({"prompt": "hi", "stream": true}),
    )
    .await;
    poll_until(WAIT, "a request in flight", || s.in_flight() == 1).await;
    let refused = post(format!("{}/release_memory_occupation", s.url()), json!({})).await;
    assert_eq!(refused.status(), 400);
    assert!(json_of(refused).await["error"]["message"]
        .as_str()
        .unwrap()
        .contains("idle"));

    // Paused with retract, the request is held while the memory is away, and ends after the wake.
    post(
        format!("{}/pause_generation", s.url()),
        json!({"mode": "retract"}),
    )
    .await;
    assert_eq!(
        post(format!("{}/release_memory_occupation", s.url()), json!({}))
            .await
            .status(),
        200
    );
    until_holding(&gpu, "s", 0).await;
    assert_eq!(s.in_flight(), 1);
    post(format!("{}/resume_memory_occupation", s.url()), json!({})).await;
    post_empty(format!("{}/continue_generation", s.url())).await;
    let got = events(resp, "\n\n").await;
    assert_eq!(got.last().unwrap().1, "data: [DONE]");
    assert_eq!((s.served(), s.in_flight()), (1, 0));
}

/// A fake process engine, killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_process(gpu: &FakeGpu, name: &str, mb: u64, port: u16) -> Proc {
    let child = Command::new("python3")
        .arg(fake_process_engine_script())
        .args([
            "--port",
            &port.to_string(),
            "--gpu",
            &gpu.url(),
            "--name",
            name,
        ])
        .args([
            "--vram-mb",
            &mb.to_string(),
            "--startup-ms",
            "200",
            "--chunks",
            "4",
            "--chunk-ms",
            "120",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 runs");
    Proc(child)
}

async fn until_healthy(port: u16) {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(resp) = client()
            .get(format!("http://127.0.0.1:{port}/health"))
            .send()
            .await
        {
            if resp.status() == 200 {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the process engine never became healthy"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn signal(p: &Proc, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(p.0.id()).unwrap();
    // SAFETY: sends a signal to the child this test started.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
}

async fn wait_exit(p: &mut Proc) -> std::process::ExitStatus {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = p.0.try_wait().expect("try_wait") {
            return status;
        }
        assert!(Instant::now() < deadline, "the process engine did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_process_engine_serves_streams_and_frees_its_memory_on_sigterm() {
    let gpu = FakeGpu::start(1000).await;
    let port = free_port();
    let mut p = spawn_process(&gpu, "p", 600, port);
    until_holding(&gpu, "p", 600).await;
    until_healthy(port).await;

    let resp = post(
        format!("http://127.0.0.1:{port}/v1/completions"),
        json!({"model": "m", "prompt": "hi", "stream": true}),
    )
    .await;
    let got = events(resp, "\n\n").await;
    assert_eq!(got.len(), 4 + 2);
    assert_chunk_by_chunk(&got, 4, Duration::from_millis(120));
    assert_eq!(got[5].1, "data: [DONE]");
    let whole = json_of(
        post(
            format!("http://127.0.0.1:{port}/v1/completions"),
            json!({"prompt": "hi"}),
        )
        .await,
    )
    .await;
    assert_eq!(whole["choices"][0]["text"], "tok0 tok1 tok2 tok3 ");

    signal(&p, libc::SIGTERM);
    let status = wait_exit(&mut p).await;
    assert_eq!(status.code(), Some(0));
    assert_eq!(gpu.holding("p"), 0);
}

#[tokio::test]
async fn a_killed_process_engine_frees_its_memory_once_it_is_gone() {
    let gpu = FakeGpu::start(1000).await;
    let port = free_port();
    let mut p = spawn_process(&gpu, "p", 600, port);
    until_holding(&gpu, "p", 600).await;
    until_healthy(port).await;
    signal(&p, libc::SIGKILL);
    // Not reaped yet: a zombie has exited, and the driver has freed its memory.
    until_holding(&gpu, "p", 0).await;
    assert_eq!(gpu.used_mb(), 0);
    let status = wait_exit(&mut p).await;
    assert_eq!(status.code(), None, "killed by a signal");
}

#[tokio::test]
async fn a_process_engine_without_room_exits_1() {
    let gpu = FakeGpu::start(1000).await;
    gpu.alloc("someone else", 500, None).unwrap();
    let mut p = spawn_process(&gpu, "p", 600, free_port());
    let status = wait_exit(&mut p).await;
    assert_eq!(status.code(), Some(1));
    assert_eq!(gpu.ooms().len(), 1);
    assert!(gpu.ooms()[0].contains("`p` asked for 600 MB"));
}
