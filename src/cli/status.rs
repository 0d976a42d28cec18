//! `status`: the status document of a running coordinator, over NATS (`<prefix>.status`) or HTTP
//! (`GET /gpu/status`, with the engine sidecars of `GET /gpu/engines`), as tables or JSON.

use std::time::Duration;

use anyhow::Context as _;
use gpu_coordinator::adapters::nats::NatsSettings;
use gpu_coordinator::config::Config;
use gpu_coordinator::engines::EngineView;
use gpu_coordinator_wire::StatusDoc;

use super::render::render_status;

/// How long `status` waits for an answer.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

async fn status_over_nats(config: &Config) -> anyhow::Result<StatusDoc> {
    let url = &config.nats.url;
    let nats = NatsSettings::from(&config.nats);
    let client = gpu_coordinator::adapters::nats::options(&nats)
        .await?
        .name("gpu-coordinator status")
        .connection_timeout(STATUS_TIMEOUT)
        .connect(gpu_coordinator::adapters::nats::servers(&nats)?)
        .await
        .with_context(|| {
            format!(
                "cannot connect to NATS at {} (nats.url)",
                gpu_coordinator_client::redact(url)
            )
        })?;
    let subject = format!("{}.status", config.nats.prefix);
    let msg = tokio::time::timeout(STATUS_TIMEOUT, client.request(subject.clone(), "".into()))
        .await
        .with_context(|| format!("no answer on {subject} within {STATUS_TIMEOUT:?}"))?
        .with_context(|| {
            format!("no coordinator answers on {subject} (is it running, with this nats.prefix?)")
        })?;
    serde_json::from_slice(&msg.payload)
        .with_context(|| format!("the answer on {subject} is not a status document"))
}

async fn status_over_http(base: &str, token: Option<&str>) -> anyhow::Result<StatusDoc> {
    get_over_http(base, "/gpu/status", token, "a status document").await
}

/// The engine sidecars of the coordinator at `base` (`GET /gpu/engines`); `None` when the call fails
/// (a coordinator from before the sidecars answers 404): the status is worth showing without them.
async fn engines_over_http(base: &str, token: Option<&str>) -> Option<Vec<EngineView>> {
    match get_over_http(base, "/gpu/engines", token, "a list of engines").await {
        Ok(engines) => Some(engines),
        Err(e) => {
            tracing::debug!("no engines shown: {e:#}");
            None
        }
    }
}

/// `GET base + path` with the bearer token, its JSON answer read as `what`; an error answer's
/// `error` field in the message.
async fn get_over_http<T: serde::de::DeserializeOwned>(
    base: &str,
    path: &str,
    token: Option<&str>,
    what: &str,
) -> anyhow::Result<T> {
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let client = reqwest::Client::builder()
        .timeout(STATUS_TIMEOUT)
        .build()
        .context("cannot make an HTTP client")?;
    let mut request = client.get(&url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let status = response.status();
    let body = response
        .bytes()
        .await
        .with_context(|| format!("cannot read the answer of {url}"))?;
    if !status.is_success() {
        let error = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        anyhow::bail!("{url} answered {status}: {error}");
    }
    serde_json::from_slice(&body).with_context(|| format!("the answer of {url} is not {what}"))
}

/// `status`: over HTTP when `http` names a coordinator (or the bus is embedded: it answers over HTTP
/// only), else over NATS; as tables, or the JSON document with `json`.
pub async fn status(
    config: &Config,
    json: bool,
    http: Option<String>,
    token: Option<&str>,
) -> anyhow::Result<()> {
    let base = match http {
        Some(url) => Some(url),
        // With no NATS, the coordinator answers over HTTP only.
        None if config.backends.bus == gpu_coordinator::config::BusBackend::Embedded => {
            Some(format!("http://{}", config.http.listen))
        }
        None => None,
    };
    let (doc, engines) = match &base {
        Some(base) => {
            let doc = status_over_http(base, token).await?;
            (doc, engines_over_http(base, token).await)
        }
        // The sidecars' figures are served over HTTP only.
        None => (status_over_nats(config).await?, None),
    };
    if !json {
        print!(
            "{}",
            render_status(&doc, engines.as_deref().unwrap_or_default())
        );
        return Ok(());
    }
    let mut out = serde_json::to_value(&doc).context("cannot write the status as JSON")?;
    if let (Some(engines), Some(fields)) = (&engines, out.as_object_mut()) {
        fields.insert(
            "engines".to_owned(),
            serde_json::to_value(engines).context("cannot write the engines as JSON")?,
        );
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&out).context("cannot write the status as JSON")?
    );
    Ok(())
}

/// `gpus`: what this coordinator would manage here (NVML's GPUs, VRAM and processes, or the
/// configured ones), as tables or JSON.
pub fn gpus(config: &Config, json: bool) -> anyhow::Result<()> {
    let (doc, samples) = gpu_coordinator::app::gpus::local_status(config);
    if json {
        let processes: Vec<serde_json::Value> = samples
            .iter()
            .flat_map(|d| {
                d.processes.iter().map(move |p| {
                    serde_json::json!({"gpu_index": d.index, "gpu_name": d.name, "pid": p.pid, "used_mb": p.used_mb})
                })
            })
            .collect();
        let out = serde_json::json!({"status": doc, "processes": processes});
        println!(
            "{}",
            serde_json::to_string_pretty(&out).context("cannot write the view as JSON")?
        );
        return Ok(());
    }
    print!("{}", render_status(&doc, &[]));
    for d in &samples {
        println!(
            "\nNVML device {} ({}, {}): {} MB total, {} MB used",
            d.index, d.name, d.uuid, d.total_mb, d.used_mb
        );
        for p in &d.processes {
            println!("  pid {:<8} {} MB", p.pid, p.used_mb);
        }
    }
    Ok(())
}
