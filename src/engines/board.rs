//! What the sidecars show operators: each engine's state, the requests waiting in its sidecar and in
//! flight, and its sleep and wake times, as a JSON list (`GET /gpu/engines`) and as Prometheus metrics.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use serde::Serialize;

use super::gate::Gate;

/// Where an engine stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EngineState {
    /// Connecting, or making sure the engine sleeps before anything passes.
    Starting,
    /// Asleep (or stopped), no GPU held or the lease paused.
    Asleep,
    /// Asking the coordinator for the GPU.
    Asking,
    /// Granted: waking the engine.
    Waking,
    /// Serving under a lease.
    Awake,
    /// Draining and putting the engine to sleep.
    GoingToSleep,
}

impl EngineState {
    const ALL: [EngineState; 6] = [
        EngineState::Starting,
        EngineState::Asleep,
        EngineState::Asking,
        EngineState::Waking,
        EngineState::Awake,
        EngineState::GoingToSleep,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EngineState::Starting => "starting",
            EngineState::Asleep => "asleep",
            EngineState::Asking => "asking",
            EngineState::Waking => "waking",
            EngineState::Awake => "awake",
            EngineState::GoingToSleep => "going_to_sleep",
        }
    }
}

/// One engine's figures.
pub struct Stats {
    pub service: String,
    pub kind: &'static str,
    pub listen: String,
    state: Mutex<EngineState>,
    times: Mutex<Times>,
    sleep_seconds: Histogram,
    wake_seconds: Histogram,
}

#[derive(Default, Clone, Copy)]
struct Times {
    sleeps: u64,
    wakes: u64,
    last_sleep: Option<Duration>,
    last_wake: Option<Duration>,
}

fn seconds() -> Histogram {
    // 10 ms to about 160 s.
    Histogram::new(exponential_buckets(0.01, 2.0, 15))
}

impl Stats {
    pub fn set(&self, state: EngineState) {
        *self.state.lock().expect("stats lock") = state;
    }

    pub fn state(&self) -> EngineState {
        *self.state.lock().expect("stats lock")
    }

    pub fn slept(&self, took: Duration) {
        self.sleep_seconds.observe(took.as_secs_f64());
        let mut times = self.times.lock().expect("stats lock");
        times.sleeps += 1;
        times.last_sleep = Some(took);
    }

    pub fn woke(&self, took: Duration) {
        self.wake_seconds.observe(took.as_secs_f64());
        let mut times = self.times.lock().expect("stats lock");
        times.wakes += 1;
        times.last_wake = Some(took);
    }

    /// The last measured sleep, the sidecar's hint of how soon its engine frees the GPU.
    pub fn last_sleep(&self) -> Option<Duration> {
        self.times.lock().expect("stats lock").last_sleep
    }
}

/// One engine, as `GET /gpu/engines` lists it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema, serde::Deserialize)]
pub struct EngineView {
    pub service: String,
    pub kind: String,
    pub listen: String,
    pub state: EngineState,
    pub in_flight: usize,
    pub waiting: usize,
    pub sleeps: u64,
    pub wakes: u64,
    pub last_sleep_ms: Option<u64>,
    pub last_wake_ms: Option<u64>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabel {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    service: String,
    kind: String,
    state: String,
}

/// One sidecar's figures and its gate (which counts its requests).
type Shown = (Arc<Stats>, Arc<Gate>);

/// Every sidecar of this process.
#[derive(Clone)]
pub struct Board {
    engines: Arc<Mutex<Vec<Shown>>>,
    sleep_seconds: Family<ServiceLabel, Histogram>,
    wake_seconds: Family<ServiceLabel, Histogram>,
}

impl Default for Board {
    fn default() -> Self {
        Board {
            engines: Arc::default(),
            sleep_seconds: Family::new_with_constructor(seconds),
            wake_seconds: Family::new_with_constructor(seconds),
        }
    }
}

impl Board {
    /// The figures of a new sidecar, shown from now on.
    pub fn add(
        &self,
        service: &str,
        kind: &'static str,
        listen: &str,
        gate: Arc<Gate>,
    ) -> Arc<Stats> {
        let label = ServiceLabel {
            service: service.to_owned(),
        };
        let stats = Arc::new(Stats {
            service: service.to_owned(),
            kind,
            listen: listen.to_owned(),
            state: Mutex::new(EngineState::Starting),
            times: Mutex::default(),
            sleep_seconds: self.sleep_seconds.get_or_create(&label).clone(),
            wake_seconds: self.wake_seconds.get_or_create(&label).clone(),
        });
        self.engines
            .lock()
            .expect("board lock")
            .push((Arc::clone(&stats), gate));
        stats
    }

    pub fn is_empty(&self) -> bool {
        self.engines.lock().expect("board lock").is_empty()
    }

    pub fn views(&self) -> Vec<EngineView> {
        self.engines
            .lock()
            .expect("board lock")
            .iter()
            .map(|(stats, gate)| {
                let (in_flight, waiting) = gate.counts();
                let times = *stats.times.lock().expect("stats lock");
                let ms = |d: Option<Duration>| d.map(|d| d.as_millis() as u64);
                EngineView {
                    service: stats.service.clone(),
                    kind: stats.kind.to_owned(),
                    listen: stats.listen.clone(),
                    state: stats.state(),
                    in_flight,
                    waiting,
                    sleeps: times.sleeps,
                    wakes: times.wakes,
                    last_sleep_ms: ms(times.last_sleep),
                    last_wake_ms: ms(times.last_wake),
                }
            })
            .collect()
    }

    /// The engines' metrics, in OpenMetrics text (without the `# EOF` line, so that it can be put
    /// before the coordinator's own).
    pub fn render_metrics(&self) -> String {
        let mut registry = Registry::with_prefix("gpu_coordinator_engine");
        let state = Family::<StateLabels, Gauge>::default();
        let waiting = Family::<ServiceLabel, Gauge>::default();
        let in_flight = Family::<ServiceLabel, Gauge>::default();
        registry.register(
            "state",
            "1 for the state each engine is in (asleep, asking, waking, awake, going_to_sleep)",
            state.clone(),
        );
        registry.register(
            "waiting",
            "Requests waiting in the sidecar for the GPU",
            waiting.clone(),
        );
        registry.register(
            "in_flight",
            "Requests passed to the engine and not answered yet",
            in_flight.clone(),
        );
        let engines = self.engines.lock().expect("board lock");
        for (stats, gate) in engines.iter() {
            let service = ServiceLabel {
                service: stats.service.clone(),
            };
            let now = stats.state();
            for s in EngineState::ALL {
                state
                    .get_or_create(&StateLabels {
                        service: stats.service.clone(),
                        kind: stats.kind.to_owned(),
                        state: s.as_str().to_owned(),
                    })
                    .set(i64::from(s == now));
            }
            let (flying, waits) = gate.counts();
            waiting.get_or_create(&service).set(waits as i64);
            in_flight.get_or_create(&service).set(flying as i64);
        }
        drop(engines);
        registry.register(
            "sleep_seconds",
            "How long the engine took to sleep (the call and its confirmation)",
            self.sleep_seconds.clone(),
        );
        registry.register(
            "wake_seconds",
            "How long the engine took to wake and serve",
            self.wake_seconds.clone(),
        );
        let mut text = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
        text.lines()
            .filter(|l| *l != "# EOF")
            .map(|l| format!("{l}\n"))
            .collect()
    }
}

/// `GET /gpu/engines` (the views, JSON) and `GET /metrics` (the engines' metrics), for
/// `gpu-coordinator engines`.
pub fn router(board: Board) -> axum::Router {
    use axum::routing::get;
    axum::Router::new()
        .route(
            "/gpu/engines",
            get(
                |axum::extract::State(board): axum::extract::State<Board>| async move {
                    axum::Json(board.views())
                },
            ),
        )
        .route(
            "/metrics",
            get(
                |axum::extract::State(board): axum::extract::State<Board>| async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            crate::metrics::CONTENT_TYPE,
                        )],
                        format!("{}# EOF\n", board.render_metrics()),
                    )
                },
            ),
        )
        .with_state(board)
}
