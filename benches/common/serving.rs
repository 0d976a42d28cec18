//! A coordinator as a process of its own (`gpu-coordinator serve`, [`Serving`]) and what is read of
//! one: its resident set, and its batch stages from `/metrics`.

use super::write_behind_env;

/// The resident set of process `pid`, in MB (NaN where `/proc` does not say).
pub fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// A coordinator process, killed and waited for on drop (a bench that fails leaves none running).
pub struct Serving(pub std::process::Child);

impl Serving {
    /// SIGKILL, and wait for the process to go.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    pub fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `gpu-coordinator serve` on the machine's servers under the bench's `tag` (subject prefix, key
/// prefix, database `gpu_<tag>`), HTTP on a free port, without NVML, its output discarded; the caller
/// adds what else it needs and spawns it.
pub fn serve_command(tag: &str) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_gpu-coordinator"));
    command
        .arg("serve")
        .env("GPU_COORDINATOR_NATS__PREFIX", tag)
        .env("GPU_COORDINATOR_REDIS__KEY_PREFIX", tag)
        .env(
            "GPU_COORDINATOR_DATABASE__URL",
            format!("postgres://postgres@127.0.0.1:5432/gpu_{tag}"),
        )
        .env("GPU_COORDINATOR_HTTP__LISTEN", "127.0.0.1:0")
        .env("GPU_COORDINATOR_NVML__ENABLED", "false")
        .env(
            "GPU_COORDINATOR_DATABASE__WRITE_BEHIND",
            write_behind_env().to_string(),
        )
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    command
}

/// The coordinator's `gpu_coordinator_batch_stage_seconds` as read from `/metrics` at `http`: each
/// stage's total seconds and count.
pub async fn batch_stages(
    http: &str,
) -> anyhow::Result<std::collections::BTreeMap<String, (f64, u64)>> {
    let text = reqwest::get(format!("{http}/metrics"))
        .await?
        .text()
        .await?;
    let mut stages = std::collections::BTreeMap::<String, (f64, u64)>::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("gpu_coordinator_batch_stage_seconds_") else {
            continue;
        };
        let (Some((what, rest)), Some(value)) =
            (rest.split_once("{stage=\""), line.split(' ').nth(1))
        else {
            continue;
        };
        let Some((stage, _)) = rest.split_once('"') else {
            continue;
        };
        let entry = stages.entry(stage.to_owned()).or_default();
        match what {
            "sum" => entry.0 = value.parse()?,
            "count" => entry.1 = value.parse()?,
            _ => {}
        }
    }
    Ok(stages)
}

/// Prints each stage's mean between two readings of [`batch_stages`], in milliseconds.
pub fn print_stage_means(
    name: &str,
    before: &std::collections::BTreeMap<String, (f64, u64)>,
    after: &std::collections::BTreeMap<String, (f64, u64)>,
) {
    let means: Vec<String> = after
        .iter()
        .filter_map(|(stage, (sum, count))| {
            let (sum0, count0) = before.get(stage).copied().unwrap_or_default();
            let n = count.checked_sub(count0).filter(|&n| n > 0)?;
            Some(format!("{stage} {:.3}", (sum - sum0) / n as f64 * 1e3))
        })
        .collect();
    println!("{name}, mean ms per batch: {}", means.join(", "));
}
