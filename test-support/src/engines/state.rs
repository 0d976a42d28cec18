//! A fake engine's state, shared by its handlers: which parts of its memory are resident, what is
//! paused, and the operations on memory (release, acquire) every kind is built from.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::watch;

use super::{lock, FakeEngineOptions, FakeGpu, Kind};

/// Which parts of an engine's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Parts {
    pub(super) weights: bool,
    pub(super) kv: bool,
}

impl Parts {
    pub(super) const ALL: Parts = Parts {
        weights: true,
        kv: true,
    };

    /// From tag names (vLLM's and SGLang's); none, or none known, means all.
    pub(super) fn from_tags<'a>(tags: impl IntoIterator<Item = &'a str>) -> Parts {
        let mut p = Parts {
            weights: false,
            kv: false,
        };
        for t in tags {
            match t {
                "weights" => p.weights = true,
                "kv_cache" => p.kv = true,
                _ => {}
            }
        }
        if p.weights || p.kv {
            p
        } else {
            Parts::ALL
        }
    }
}

#[derive(Default)]
pub(super) struct St {
    /// Resident parts, as the engine believes.
    pub(super) weights: bool,
    pub(super) kv: bool,
    /// The memory is being freed (after any drain): in-flight requests cannot go on.
    pub(super) releasing: bool,
    /// A release was started (answered, or about to be) and has not ended, drain included.
    pub(super) release_pending: bool,
    /// A wake or load is under way.
    pub(super) acquiring: bool,
    /// New requests are not admitted (vLLM's paused scheduler, SGLang's paused generation, an unload
    /// under way).
    pub(super) paused: bool,
    /// In-flight requests are held (vLLM `keep`, SGLang `retract`/`in_place`).
    pub(super) hold: bool,
    /// vLLM after a level-2 sleep: the weights are garbage until `reload_weights`.
    pub(super) stale: bool,
    /// Why the last load failed (llama.cpp's `failed`, Triton's reason).
    pub(super) failed: Option<String>,
    pub(super) ever_loaded: bool,
    pub(super) in_flight: usize,
    /// Bumped to abort in-flight requests.
    pub(super) abort_epoch: u64,
    pub(super) last_level: Option<u8>,
    pub(super) intervals: Vec<(Instant, Option<Instant>)>,
}

impl St {
    pub(super) fn resident(&self) -> bool {
        self.weights && self.kv
    }

    pub(super) fn serving(&self) -> bool {
        self.resident() && !self.releasing && !self.acquiring && !self.paused
    }

    fn progressing(&self) -> bool {
        self.resident() && !self.releasing && !self.acquiring && !self.hold
    }
}

pub(super) struct Engine {
    pub(super) opts: FakeEngineOptions,
    pub(super) gpu: FakeGpu,
    pub(super) st: Mutex<St>,
    pub(super) changed: watch::Sender<u64>,
    /// Serialises the operations on memory, as the engines' cores do: a wake waits for a release
    /// under way to have freed the memory.
    pub(super) op: Arc<tokio::sync::Mutex<()>>,
    pub(super) stopped: AtomicBool,
    pub(super) served: AtomicU64,
    pub(super) served_stale: AtomicU64,
    pub(super) refused_asleep: AtomicU64,
    pub(super) implicit_loads: AtomicU64,
    pub(super) sleeps: AtomicU64,
    pub(super) wakes: AtomicU64,
}

pub(super) type Shared = Arc<Engine>;

impl Engine {
    /// Changes the state, keeps the awake intervals and wakes whoever waits on a change.
    pub(super) fn update<R>(&self, f: impl FnOnce(&mut St) -> R) -> R {
        let r = {
            let mut st = lock(&self.st);
            let r = f(&mut st);
            let serving = st.serving() && !self.stopped.load(Ordering::SeqCst);
            let open = st.intervals.last().is_some_and(|(_, end)| end.is_none());
            if serving && !open {
                st.intervals.push((Instant::now(), None));
            } else if !serving && open {
                if let Some(last) = st.intervals.last_mut() {
                    last.1 = Some(Instant::now());
                }
            }
            r
        };
        self.changed.send_modify(|v| *v += 1);
        r
    }

    pub(super) fn read<R>(&self, f: impl FnOnce(&St) -> R) -> R {
        f(&lock(&self.st))
    }

    pub(super) fn mb(&self, p: Parts) -> u64 {
        (if p.weights { self.opts.weights() } else { 0 }) + (if p.kv { self.opts.kv() } else { 0 })
    }

    /// Waits until `cond` holds on the state.
    pub(super) async fn wait_for(&self, cond: impl Fn(&St) -> bool) {
        loop {
            let mut rx = self.changed.subscribe();
            if self.read(&cond) {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Waits until an in-flight request admitted at `epoch` may send its next token: false if it was
    /// aborted (or the engine stopped).
    pub(super) async fn wait_progress(&self, epoch: u64) -> bool {
        loop {
            let mut rx = self.changed.subscribe();
            let verdict = self.read(|st| {
                if st.abort_epoch != epoch || self.stopped.load(Ordering::SeqCst) {
                    Some(false)
                } else if st.progressing() {
                    Some(true)
                } else {
                    None
                }
            });
            if let Some(v) = verdict {
                return v;
            }
            if rx.changed().await.is_err() {
                return false;
            }
        }
    }

    /// Admits an inference request if the engine serves: its abort epoch, and whether the weights are
    /// garbage.
    pub(super) fn admit(self: &Arc<Self>) -> Option<Admitted> {
        if self.stopped.load(Ordering::SeqCst) {
            return None;
        }
        self.update(|st| {
            st.serving().then(|| {
                st.in_flight += 1;
                (st.abort_epoch, st.stale)
            })
        })
        .map(|(epoch, stale)| Admitted {
            eng: self.clone(),
            epoch,
            stale,
        })
    }

    /// Unloads the whole model (Ollama's `keep_alive: 0`, Triton's unload): paused, and everything it
    /// holds freed after in-flight requests end; returns once the release has started.
    pub(super) async fn unload_all(self: &Arc<Self>) {
        let eng = self.clone();
        let task = tokio::spawn(async move {
            let guard = eng.op_lock().await;
            if eng.read(|st| st.weights || st.kv) {
                eng.update(|st| st.paused = true);
                eng.spawn_release(guard, Parts::ALL, true);
            }
        });
        let _ = task.await;
    }

    /// Starts freeing `parts`: the caller holds the operation lock and has answered or is about to; the
    /// memory goes `sleep_time` later (after in-flight requests end, if `drain`), and the lock with it.
    pub(super) fn spawn_release(
        self: &Arc<Self>,
        guard: tokio::sync::OwnedMutexGuard<()>,
        parts: Parts,
        drain: bool,
    ) {
        let eng = self.clone();
        self.sleeps.fetch_add(1, Ordering::SeqCst);
        self.update(|st| {
            st.release_pending = true;
            st.releasing = !drain;
        });
        tokio::spawn(async move {
            if drain {
                eng.wait_for(|st| st.in_flight == 0).await;
                eng.update(|st| st.releasing = true);
            }
            tokio::time::sleep(eng.opts.sleep_time).await;
            if !eng.opts.never_frees {
                eng.gpu.ledger.free(&eng.opts.name, Some(eng.mb(parts)));
            }
            eng.update(|st| {
                if parts.weights {
                    st.weights = false;
                }
                if parts.kv {
                    st.kv = false;
                }
                st.releasing = false;
                st.release_pending = false;
            });
            drop(guard);
        });
    }

    /// Takes `parts` back: waits for any release under way, allocates what is missing (an OOM fails
    /// it), and `wake_time` later marks them resident and ends the wake as the kind does. Ok(true) if it
    /// loaded anything. Runs in its own task, so that a client going away does not cut it half-way.
    pub(super) async fn acquire(self: &Arc<Self>, parts: Parts) -> Result<bool, String> {
        let eng = self.clone();
        let task = tokio::spawn(async move {
            let _guard = eng.op.clone().lock_owned().await;
            let (want, has) = eng.read(|st| {
                (
                    Parts {
                        weights: st.weights || parts.weights,
                        kv: st.kv || parts.kv,
                    },
                    Parts {
                        weights: st.weights,
                        kv: st.kv,
                    },
                )
            });
            if want == has {
                eng.update(|st| eng.end_wake(st));
                return Ok(false);
            }
            eng.update(|st| st.acquiring = true);
            let need = eng.mb(want).saturating_sub(eng.gpu.holding(&eng.opts.name));
            if need > 0 {
                if let Err(line) = eng.gpu.ledger.alloc(&eng.opts.name, need, None) {
                    eng.update(|st| {
                        st.acquiring = false;
                        st.failed = Some(line.clone());
                    });
                    return Err(line);
                }
            }
            tokio::time::sleep(eng.opts.wake_time).await;
            eng.update(|st| {
                st.weights = want.weights;
                st.kv = want.kv;
                st.acquiring = false;
                if st.resident() {
                    eng.wakes.fetch_add(1, Ordering::SeqCst);
                }
                eng.end_wake(st);
            });
            Ok(true)
        });
        let result = task
            .await
            .unwrap_or_else(|e| Err(format!("the wake failed: {e}")));
        if result.is_err() && self.opts.wake_oom_hangs {
            std::future::pending::<()>().await;
        }
        result
    }

    /// What the end of a wake does besides the memory.
    fn end_wake(&self, st: &mut St) {
        if !st.resident() {
            return;
        }
        st.ever_loaded = true;
        st.failed = None;
        match self.opts.kind {
            // vLLM's wake_up resumes the scheduler; SGLang waits for continue_generation.
            Kind::Sglang => {}
            Kind::Vllm | Kind::Ollama | Kind::Llamacpp | Kind::Triton => {
                st.paused = false;
                st.hold = false;
            }
        }
    }

    /// The operation lock, taken in a task of its own by the caller.
    pub(super) async fn op_lock(&self) -> tokio::sync::OwnedMutexGuard<()> {
        self.op.clone().lock_owned().await
    }
}

/// An admitted inference request: counts as in flight until dropped.
pub(super) struct Admitted {
    pub(super) eng: Shared,
    pub(super) epoch: u64,
    pub(super) stale: bool,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.eng.update(|st| st.in_flight -= 1);
    }
}

impl Admitted {
    pub(super) fn served(&self) {
        self.eng.served.fetch_add(1, Ordering::SeqCst);
        if self.stale {
            self.eng.served_stale.fetch_add(1, Ordering::SeqCst);
        }
    }
}
