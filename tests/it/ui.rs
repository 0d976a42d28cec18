//! The web page in a real browser: headless Chromium driven through chromedriver (Debian's `chromium`
//! and `chromium-driver`, which `.ci/run` installs). With HTTP tokens on, the page asks for a token; the
//! operator's is typed in. Then a grant, a preemption (pause, ACK, grant), a revoke, and a restart of
//! the coordinator: after each, what the page shows is checked (holders, VRAM, the queue, the
//! timeline's bars and markers). The final state's screenshot is kept in `target/ui-test/`. An engine
//! sidecar's state is shown in the Engines panel.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use gpu_coordinator_test_support::free_port;
use serde_json::json;

use crate::engine_board::{complete, vllm_engine, FakeVllm};
use crate::support::{embedded_config, test_config, Coordinator, Probe, DEADLINE};

const OPERATOR_TOKEN: &str = "operator-secret";

/// chromedriver on a free port, and a headless Chromium session through it.
struct Browser {
    driver: Child,
    client: Client,
}

impl Browser {
    /// A browser on the page `path` of the coordinator whose HTTP API listens on `port`.
    async fn open(port: u16, path: &str) -> Browser {
        let browser = Browser::start().await;
        browser
            .client
            .goto(&format!("http://127.0.0.1:{port}{path}"))
            .await
            .expect("load the page");
        browser
    }

    async fn start() -> Browser {
        let port = free_port();
        let binary = ["chromedriver", "/usr/bin/chromedriver"]
            .into_iter()
            .find(|b| {
                Command::new(b)
                    .arg("--version")
                    .output()
                    .is_ok_and(|o| o.status.success())
            })
            .expect("chromedriver (Debian: apt-get install chromium chromium-driver)");
        let driver = Command::new(binary)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({"args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                            "--disable-dev-shm-usage", "--window-size=1280,1000"]}),
        );
        let started = Instant::now();
        let client = loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(capabilities.clone())
                .connect(&format!("http://127.0.0.1:{port}"))
                .await
            {
                Ok(client) => break client,
                Err(e) => {
                    assert!(
                        started.elapsed() < Duration::from_secs(30),
                        "no browser session: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        Browser { driver, client }
    }

    /// The text of every element matching `css`.
    async fn texts(&self, css: &str) -> Vec<String> {
        let mut texts = Vec::new();
        for element in self
            .client
            .find_all(Locator::Css(css))
            .await
            .unwrap_or_default()
        {
            texts.push(element.text().await.unwrap_or_default());
        }
        texts
    }

    /// An attribute of every element matching `css`.
    async fn attrs(&self, css: &str, attr: &str) -> Vec<String> {
        let mut values = Vec::new();
        for element in self
            .client
            .find_all(Locator::Css(css))
            .await
            .unwrap_or_default()
        {
            if let Ok(Some(v)) = element.attr(attr).await {
                values.push(v);
            }
        }
        values
    }

    /// Waits until `check` holds for the page, looking every 50 ms.
    async fn until<F, Fut>(&self, what: &str, check: F)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let start = Instant::now();
        while !check().await {
            if start.elapsed() > DEADLINE {
                let html = self.client.source().await.unwrap_or_default();
                panic!("the page never showed {what}; it shows:\n{html}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn close(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
    }
}

#[tokio::test]
async fn the_page_shows_grants_preemptions_revokes_and_survives_a_restart() {
    let mut config = test_config("ui", &[("0", 24_000)]);
    config.http.tokens.insert(
        OPERATOR_TOKEN.into(),
        gpu_coordinator::config::OPERATOR.into(),
    );
    config.preemption.ack_deadline_ms = 2_000;
    let port = free_port();
    let coordinator = Coordinator::start_at(config.clone(), Default::default(), port).await;
    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;
    let browser = Browser::open(port, "/?minutes=1").await;
    let b = &browser;

    // Tokens are on: the page asks for one, and the operator's is accepted (never in the URL).
    b.until("the token form", || async {
        b.client
            .find(Locator::Css("#login:not([hidden]) #token"))
            .await
            .is_ok()
    })
    .await;
    let field = b.client.find(Locator::Css("#token")).await.expect("field");
    field.send_keys(OPERATOR_TOKEN).await.expect("type");
    b.client
        .find(Locator::Css("#login button"))
        .await
        .expect("button")
        .click()
        .await
        .expect("submit");
    b.until("the live connection", || async {
        b.attrs("#connection", "data-state").await == ["live"]
    })
    .await;
    assert!(!b
        .client
        .current_url()
        .await
        .expect("url")
        .as_str()
        .contains(OPERATOR_TOKEN));
    b.until("GPU 0 with its capacity", || async {
        b.texts("[data-gpu='0'] h3")
            .await
            .iter()
            .any(|t| t.contains("23.4 GB"))
    })
    .await;

    // A grant: the holder, its VRAM, and a bar on the timeline.
    probe
        .pub_json(
            "request",
            "asr",
            json!({"request_id": "asr-1", "priority": 2, "vram_mb": 20000, "lease_ms": 60000}),
        )
        .await;
    let asr = probe.reply("asr-1", "granted").await;
    b.until("asr-1 holding 19.5 GB", || async {
        b.texts("[data-gpu='0'] .holder[data-request='asr-1']")
            .await
            .iter()
            .any(|t| t.contains("asr") && t.contains("19.5 GB") && t.contains("p2"))
    })
    .await;
    // Under the Content-Security-Policy the page's own style sheet applies, and the VRAM bar's width,
    // set through the CSSOM (which the policy allows, unlike a style attribute), holds.
    let styled = b
        .client
        .execute(
            "const seg = document.querySelector(\"[data-gpu='0'] .bar span\"); \
             return [getComputedStyle(document.body).marginTop, \
                     !!seg && seg.style.width.endsWith('%') && seg.getBoundingClientRect().width > 0];",
            vec![],
        )
        .await
        .expect("run a script");
    assert_eq!(styled, json!(["0px", true]), "{styled}");
    b.until("asr-1's bar on the timeline", || async {
        !b.attrs(
            "#timeline rect.bar[data-request='asr-1'][data-open='true']",
            "data-fence",
        )
        .await
        .is_empty()
    })
    .await;

    // A preemption: asr-1 pausing, chat-1 queued, a pause marker; then the ACK, and chat-1 holds.
    probe
        .pub_json(
            "request",
            "chat",
            json!({"request_id": "chat-1", "priority": 0, "vram_mb": 20000, "lease_ms": 1500}),
        )
        .await;
    probe.control("asr-1", "pause").await;
    b.until("asr-1 pausing and chat-1 queued", || async {
        b.attrs(".holder[data-request='asr-1']", "data-state").await == ["pausing"]
            && b.texts("#queue tbody tr[data-request='chat-1']")
                .await
                .len()
                == 1
    })
    .await;
    b.until("the pause marker", || async {
        !b.attrs(
            "#timeline .mark[data-kind='preempting'][data-request='asr-1']",
            "data-kind",
        )
        .await
        .is_empty()
    })
    .await;
    probe
        .pub_json(
            "ack",
            "asr",
            json!({"request_id": "asr-1", "fence": asr.fence, "action": "paused"}),
        )
        .await;
    probe.reply("chat-1", "granted").await;
    b.until(
        "chat-1 holding, asr-1 paused in the queue, the ACK marker",
        || async {
            b.texts(".holder[data-request='chat-1']").await.len() == 1
                && b.texts(".holder[data-request='asr-1']").await.is_empty()
                && b.texts("#queue tbody tr[data-request='asr-1']")
                    .await
                    .iter()
                    .any(|t| t.contains("paused"))
                && !b
                    .attrs("#timeline .mark[data-kind='paused']", "data-kind")
                    .await
                    .is_empty()
        },
    )
    .await;

    // A revoke: chat-1 is not renewed; its lease runs out, it is revoked, and asr-1 is resumed.
    probe.control("chat-1", "revoke").await;
    b.until("the revoke marker, and asr-1 holding again", || async {
        !b.attrs(
            "#timeline .mark[data-kind='revoked'][data-request='chat-1']",
            "data-kind",
        )
        .await
        .is_empty()
            && b.texts(".holder[data-request='asr-1']").await.len() == 1
    })
    .await;

    // A restart of the coordinator: the page reconnects and shows the same state, nothing doubled.
    coordinator.stop().await.expect("a clean stop");
    b.until("the lost connection", || async {
        b.attrs("#connection", "data-state").await != ["live"]
    })
    .await;
    let coordinator = Coordinator::start_at(config.clone(), Default::default(), port).await;
    b.until("live again, asr-1 still holding", || async {
        b.attrs("#connection", "data-state").await == ["live"]
            && b.texts(".holder[data-request='asr-1']").await.len() == 1
    })
    .await;
    let bars = b.attrs("#timeline rect.bar", "data-fence").await;
    let mut unique = bars.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        bars.len(),
        unique.len(),
        "a bar per holding, none doubled: {bars:?}"
    );
    assert_eq!(bars.len(), 3, "asr-1, chat-1, asr-1 resumed: {bars:?}");

    assert!(
        b.client.find(Locator::Css("#login[hidden]")).await.is_ok(),
        "the token form is gone once a token was accepted"
    );
    let screenshot = b.client.screenshot().await.expect("a screenshot");
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("ui-test");
    std::fs::create_dir_all(&dir).expect("the artifact directory");
    std::fs::write(dir.join("final.png"), screenshot).expect("keep the screenshot");
    browser.close().await;
    coordinator.stop().await.expect("a clean stop");
}

/// The Engines panel: a sidecar's engine shown asleep after the start (the sidecar put it to sleep),
/// then awake, with its wake time, once a request through the sidecar woke it; its badge in the
/// style sheet's colour of that state. Its screenshot is kept in `target/tmp/ui-test/engines.png`.
#[tokio::test]
async fn the_engines_panel_shows_each_engines_state() {
    let vllm = FakeVllm::start().await;
    let mut config = embedded_config("ui_engines", &[("0", 24_000)]);
    let engine = vllm_engine("chat", &vllm.url);
    let listen = engine.listen.clone();
    config.engines = vec![engine];
    let port = free_port();
    let coordinator = Coordinator::start_at(config, Default::default(), port).await;
    let browser = Browser::open(port, "/").await;
    let b = &browser;
    let badge = "#engines-panel:not([hidden]) #engines tr[data-service='chat'] .badge";
    b.until("the chat engine asleep", || async {
        b.attrs(badge, "data-state").await == ["asleep"]
    })
    .await;
    let cells = b.texts("#engines tr[data-service='chat'] td").await;
    assert_eq!(
        cells[..5],
        ["chat", "vllm", "asleep", "0", "0"],
        "{cells:?}"
    );
    assert!(
        cells[5].ends_with(" ms") || cells[5].ends_with(" s"),
        "{cells:?}"
    );
    assert_eq!(cells[6], "—", "never woken yet: {cells:?}");

    complete(&listen).await;
    b.until(
        "the chat engine awake, with its wake time, its request answered",
        || async {
            let cells = b.texts("#engines tr[data-service='chat'] td").await;
            b.attrs(badge, "data-state").await == ["awake"]
                && cells.get(4).is_some_and(|t| t == "0")
                && cells.get(6).is_some_and(|t| t != "—")
        },
    )
    .await;
    assert_eq!(b.texts(badge).await, ["awake"]);
    let colour = b
        .client
        .execute(
            "return getComputedStyle(document.querySelector('#engines .badge')).backgroundColor;",
            vec![],
        )
        .await
        .expect("run a script");
    assert_eq!(
        colour,
        json!("rgb(21, 128, 61)"),
        "the awake badge is green"
    );
    let screenshot = b.client.screenshot().await.expect("a screenshot");
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("ui-test");
    std::fs::create_dir_all(&dir).expect("the artifact directory");
    std::fs::write(dir.join("engines.png"), screenshot).expect("keep the screenshot");
    browser.close().await;
    coordinator.stop().await.expect("a clean stop");
}

/// 1,000 queued requests and a busy event stream (a grant and a release every few milliseconds): the
/// page shows the queue's size and keeps painting. Prints the event-to-paint delays it measured (a
/// figure, not a goal checked here).
#[tokio::test]
async fn the_page_keeps_up_with_a_thousand_queued_and_a_busy_stream() {
    let config = test_config("ui_load", &[("0", 24_000)]);
    let port = free_port();
    let coordinator = Coordinator::start_at(config.clone(), Default::default(), port).await;
    let mut probe = Probe::new(&config.nats.url, &config.nats.prefix).await;
    // One holder of the whole GPU; 1,000 requests wait behind it.
    probe
        .pub_json(
            "request",
            "big",
            json!({"request_id": "big-1", "priority": 0}),
        )
        .await;
    probe.reply("big-1", "granted").await;
    for i in 0..1_000 {
        probe
            .pub_json(
                "request",
                "q",
                json!({"request_id": format!("q-{i}"), "priority": 2, "vram_mb": 1000,
                       "timeout_ms": 600000}),
            )
            .await;
    }
    let browser = Browser::open(port, "/").await;
    let b = &browser;
    b.until("1,000 waiting", || async {
        b.texts("#queue-total")
            .await
            .iter()
            .any(|t| t.contains("1000 waiting"))
    })
    .await;
    let events = || async {
        b.client
            .execute("return window.gpuPageStats.events", vec![])
            .await
            .ok()
            .and_then(|v| v.as_u64())
            .unwrap_or(0)
    };
    let before = events().await;
    // A busy stream: 200 short requests of 1 MB, each requested, queued behind the whole-GPU holder
    // and released at once: two events at least each.
    let started = Instant::now();
    for i in 0..200 {
        let id = format!("s-{i}");
        probe
            .pub_json(
                "request",
                "s",
                json!({"request_id": id, "priority": 0, "vram_mb": 1}),
            )
            .await;
        probe
            .pub_json("release", "s", json!({"request_id": id}))
            .await;
    }
    b.until("the stream's events applied", || async {
        events().await >= before + 400
    })
    .await;
    let applied = started.elapsed();
    let delays: Vec<f64> = b
        .client
        .execute("return window.gpuPageStats.eventToPaintMs", vec![])
        .await
        .expect("the page's figures")
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_f64()).collect())
        .unwrap_or_default();
    assert!(!delays.is_empty(), "the page painted after events");
    let mut sorted = delays.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| sorted[((sorted.len() - 1) as f64 * p) as usize];
    println!(
        "page with 1,000 queued: {} events of a busy stream applied in {:?}; event-to-paint p50 {:.1} \
         ms, p99 {:.1} ms, max {:.1} ms over {} paints",
        events().await - before,
        applied,
        pct(0.5),
        pct(0.99),
        sorted[sorted.len() - 1],
        sorted.len()
    );
    assert_eq!(
        b.texts("#queue tbody tr").await.len(),
        1_000,
        "every queued row shown"
    );
    browser.close().await;
    coordinator.stop().await.expect("a clean stop");
}

/// The Services panel shows each service's VRAM against its guarantee and its cap.
#[tokio::test]
async fn the_services_panel_shows_use_against_the_limits() {
    let mut config = embedded_config("ui_services", &[("0", 24_000)]);
    config.services.named.insert(
        "chat".into(),
        gpu_coordinator::config::ServiceConfig {
            guaranteed_vram_mb: Some(8_000),
            max_vram_mb: Some(16_000),
            ..Default::default()
        },
    );
    let port = free_port();
    let coordinator = Coordinator::start_at(config, Default::default(), port).await;
    let granted = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/gpu/request"))
        .json(&json!({"service_id": "chat", "priority": 0, "vram_mb": 4000}))
        .send()
        .await
        .expect("POST /gpu/request");
    assert!(granted.status().is_success(), "{:?}", granted.text().await);
    let browser = Browser::open(port, "/").await;
    let b = &browser;
    let row = "#services-panel:not([hidden]) #services tr[data-service='chat'] td";
    b.until("the chat's row", || async {
        b.texts(row).await == ["chat", "3.9 GB", "0 MB", "7.8 GB", "15.6 GB"]
    })
    .await;
    browser.close().await;
    coordinator.stop().await.expect("a clean stop");
}

/// With node agents the page groups the GPUs by host, with each host's state and last sample's age;
/// an agent killed turns its host unreachable on the page.
#[tokio::test]
async fn the_page_groups_the_gpus_by_host() {
    let config = crate::fleet::fleet_config("ui_fleet");
    let port = free_port();
    let coordinator = Coordinator::start_at(config.clone(), Default::default(), port).await;
    let _h1 = crate::fleet::Agent::start(&config, "h1", &[("0", 24_000), ("1", 24_000)]);
    let h2 = crate::fleet::Agent::start(&config, "h2", &[("0", 48_000)]);
    let browser = Browser::open(port, "/").await;
    let b = &browser;
    b.until("both hosts, up, with their GPUs", || async {
        b.attrs("#gpus .host[data-state='up']", "data-host").await == ["h1", "h2"]
            && b.attrs(".host[data-host='h1'] .gpu", "data-gpu").await == ["h1/0", "h1/1"]
            && b.attrs(".host[data-host='h2'] .gpu", "data-gpu").await == ["h2/0"]
    })
    .await;
    // Read while the page re-renders every two seconds: a stale element reads empty, so wait.
    b.until("h1's last sample's age", || async {
        b.texts(".host[data-host='h1'] .sample-age")
            .await
            .first()
            .is_some_and(|t| t.starts_with("last sample ") && t.ends_with(" ago"))
    })
    .await;
    h2.kill();
    b.until("h2 unreachable", || async {
        b.texts(".host[data-host='h2'] .badge").await == ["unreachable"]
            && b.texts(".host[data-host='h1'] .badge").await == ["up"]
    })
    .await;
    b.until("h2/0 marked", || async {
        b.texts(".gpu[data-gpu='h2/0'] h3")
            .await
            .first()
            .is_some_and(|t| t.contains("takes no new grants"))
    })
    .await;
    browser.close().await;
    coordinator.stop().await.expect("a clean stop");
}
