//! Property tests: random sequences of inputs over one to three GPUs (requests with random priority,
//! VRAM, pin, preemptibility, timeouts and lease; releases, renewals, ACKs that come late or never,
//! cancels, garbage ids and stale fences, external VRAM, refused leases, clock advances, timeouts and
//! restarts), with every invariant of the harness checked after every step, the preemption-liveness
//! property whenever aging is off, and at the end: every accepted request reached exactly one end.

use gpu_coordinator_core::{
    Action, Input, Phase, RequestRecord, SchedConfig, ServicePolicies, ServicePolicy,
};
use gpu_coordinator_wire::{AckAction, Encoding, HolderState};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;

use crate::harness::{gpus, req, Sim};

const SERVICES: usize = 3;
const IDS: usize = 40;

#[derive(Debug, Clone)]
struct Setup {
    totals: Vec<u64>,
    ack_deadline_ms: u64,
    min_hold_ms: u64,
    aging_ms: u64,
    retain_ended: usize,
    /// `[services]`: today's behaviour unless a test draws policies.
    services: ServicePolicies,
    /// The GPUs come from three hosts' samples (`host_ttl_ms`), each GPU `i` of `totals[i]`.
    fleet: bool,
}

/// Which fence an input about a request carries.
#[derive(Debug, Clone, Copy)]
enum Fz {
    Absent,
    Current,
    Stale,
}

#[derive(Debug, Clone)]
enum Op {
    Request {
        svc: usize,
        id: usize,
        priority: u8,
        vram: Option<u64>,
        /// An index of 3 or more names an unknown GPU.
        gpu: Option<usize>,
        preemptible: Option<bool>,
        timeout: Option<u64>,
        lease: Option<u64>,
        msgpack: bool,
        /// A few values, so that holders tie on it as often as not.
        pause_ms: Option<u64>,
    },
    /// `svc: None`: sent by the request's owner. `id: None`: release everything of the service.
    Release {
        svc: Option<usize>,
        id: Option<usize>,
        fence: Fz,
    },
    Renew {
        svc: Option<usize>,
        id: usize,
        fence: Fz,
        lease: Option<u64>,
    },
    Ack {
        svc: Option<usize>,
        id: usize,
        fence: Fz,
        resumed: bool,
    },
    Cancel {
        svc: Option<usize>,
        id: usize,
    },
    /// With node agents: host `h<host>` reports the GPUs of `mask` (bit i: GPU `i`, of the setup's
    /// i-th size), heard now.
    HostSample {
        host: usize,
        mask: u8,
    },
    /// The k-th pausing holder ACKs with its fence (the ACKs that do come).
    AckPausing(usize),
    /// The k-th queued or paused request is cancelled by its service.
    CancelWaiting(usize),
    /// The k-th holder releases with its fence.
    ReleaseHolder(usize),
    RenewHolder(usize),
    /// The lease store refuses the k-th holder's lease.
    Refuse(usize),
    Invalid {
        svc: Option<usize>,
        id: Option<usize>,
    },
    External {
        gpu: usize,
        mb: u64,
    },
    Advance(u64),
    NextTimeout,
    Restart {
        gap: u64,
        keep_store: bool,
    },
}

fn setup(aging: bool) -> impl Strategy<Value = Setup> {
    (
        vec(select(vec![100u64, 200, 400]), 1..=3),
        select(vec![0u64, 300, 2_000]),
        select(vec![0u64, 0, 200]),
        select(if aging {
            vec![0u64, 0, 300]
        } else {
            vec![0u64]
        }),
        select(vec![0usize, 3, 100_000, 100_000]),
    )
        .prop_map(
            |(totals, ack_deadline_ms, min_hold_ms, aging_ms, retain_ended)| Setup {
                totals,
                ack_deadline_ms,
                min_hold_ms,
                aging_ms,
                retain_ended,
                services: ServicePolicies::default(),
                fleet: false,
            },
        )
}

/// One service's `[services.<id>]`, drawn among values that bite on GPUs of 100-400 MB.
fn policy() -> impl Strategy<Value = ServicePolicy> {
    (
        (
            prop::option::of(0u8..4),
            any::<bool>(),
            prop::option::of(select(vec![50u64, 150])),
            prop::option::of(select(vec![500u64, 3_000])),
        ),
        (
            prop::option::weighted(0.7, select(vec![100u64, 250, 500])),
            prop::option::of(select(vec![0u64, 300])),
            prop::bool::weighted(0.85),
            select(vec![0u64, 0, 100, 150, 300]),
        ),
    )
        .prop_map(
            |(
                (max_priority, clamp_priority, default_vram_mb, default_lease_ms),
                (max_vram_mb, min_hold_ms, preemptible, guaranteed_vram_mb),
            )| ServicePolicy {
                max_priority,
                clamp_priority,
                default_priority: None,
                default_vram_mb,
                default_lease_ms,
                max_vram_mb,
                // Within the cap, as the configuration check wants it.
                guaranteed_vram_mb: max_vram_mb
                    .map_or(guaranteed_vram_mb, |cap| guaranteed_vram_mb.min(cap)),
                min_hold_ms,
                preemptible,
            },
        )
}

/// Sections for some of the services, and for the others `[services.default]` or a refusal.
fn policies() -> impl Strategy<Value = ServicePolicies> {
    (
        vec(prop::option::weighted(0.8, policy()), SERVICES),
        prop::option::weighted(0.8, policy()),
    )
        .prop_map(|(sections, others)| ServicePolicies {
            named: sections
                .into_iter()
                .enumerate()
                .filter_map(|(i, p)| p.map(|p| (svc_name(i), p)))
                .collect(),
            others,
        })
}

/// [`setup`] with service policies drawn.
fn setup_with_services(aging: bool) -> impl Strategy<Value = Setup> {
    (setup(aging), policies()).prop_map(|(setup, services)| Setup { services, ..setup })
}

fn owner() -> impl Strategy<Value = Option<usize>> {
    prop_oneof![4 => Just(None), 1 => (0..SERVICES).prop_map(Some)]
}

fn fence() -> impl Strategy<Value = Fz> {
    prop_oneof![2 => Just(Fz::Current), 2 => Just(Fz::Absent), 1 => Just(Fz::Stale)]
}

fn request() -> impl Strategy<Value = Op> {
    (
        // Mostly its own service's id; now and then another service's.
        (0..IDS, prop::option::weighted(0.1, 0..SERVICES), 0u8..4),
        prop_oneof![4 => Just(None), 10 => (30u64..=200).prop_map(Some), 1 => (200u64..=450).prop_map(Some)],
        prop_oneof![6 => Just(None), 2 => (0usize..3).prop_map(Some), 1 => Just(Some(7))],
        prop::option::of(any::<bool>()),
        prop::option::of(0u64..8_000),
        prop::option::of(1u64..10_000),
        any::<bool>(),
        prop_oneof![2 => Just(None), 1 => select(vec![0u64, 500, 2_000]).prop_map(Some)],
    )
        .prop_map(
            |((id, svc, priority), vram, gpu, preemptible, timeout, lease, msgpack, pause_ms)| Op::Request {
                svc: svc.unwrap_or(id % SERVICES),
                id,
                priority,
                vram,
                gpu,
                preemptible,
                timeout,
                lease,
                msgpack,
                pause_ms,
            },
        )
}

fn op(restarts: bool) -> BoxedStrategy<Op> {
    if restarts {
        let restart = (0u64..3_000, any::<bool>())
            .prop_map(|(gap, keep_store)| Op::Restart { gap, keep_store });
        prop_oneof![30 => op(false), 1 => restart].boxed()
    } else {
        one_op().boxed()
    }
}

/// [`op`] with restarts, and the hosts' samples of a fleet.
fn fleet_op() -> BoxedStrategy<Op> {
    prop_oneof![
        8 => op(true),
        2 => (0usize..3, 1u8..8).prop_map(|(host, mask)| Op::HostSample { host, mask }),
    ]
    .boxed()
}

fn one_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        14 => request(),
        1 => (owner(), prop::option::weighted(0.9, 0..IDS), fence())
            .prop_map(|(svc, id, fence)| Op::Release { svc, id, fence }),
        1 => (owner(), 0..IDS, fence(), prop::option::of(1u64..3_000))
            .prop_map(|(svc, id, fence, lease)| Op::Renew { svc, id, fence, lease }),
        1 => (owner(), 0..IDS, fence(), any::<bool>())
            .prop_map(|(svc, id, fence, resumed)| Op::Ack { svc, id, fence, resumed }),
        1 => (owner(), 0..IDS).prop_map(|(svc, id)| Op::Cancel { svc, id }),
        8 => any::<usize>().prop_map(Op::AckPausing),
        3 => any::<usize>().prop_map(Op::ReleaseHolder),
        1 => any::<usize>().prop_map(Op::CancelWaiting),
        1 => any::<usize>().prop_map(Op::RenewHolder),
        1 => any::<usize>().prop_map(Op::Refuse),
        1 => (prop::option::of(0..SERVICES), prop::option::of(0..IDS + 4))
            .prop_map(|(svc, id)| Op::Invalid { svc, id }),
        1 => (0usize..3, prop_oneof![Just(0u64), 1u64..150]).prop_map(|(gpu, mb)| Op::External { gpu, mb }),
        5 => prop_oneof![0u64..50, 0u64..800].prop_map(Op::Advance),
        2 => Just(Op::NextTimeout),
    ]
}

fn svc_name(i: usize) -> String {
    format!("s{i}")
}

fn id_name(i: usize) -> String {
    format!("r{i}")
}

/// The service an input about `id` comes from: the one given, or the request's owner.
fn sender(s: &Sim, svc: Option<usize>, id: &str) -> String {
    match svc {
        Some(i) => svc_name(i),
        None => s
            .sched
            .record(id)
            .map(|r| r.service_id.to_string())
            .unwrap_or_else(|| svc_name(0)),
    }
}

fn fence_of(s: &Sim, id: &str, fz: Fz) -> Option<u64> {
    let current = s.sched.record(id).and_then(|r| r.fence).map(|f| f.0);
    match fz {
        Fz::Absent => None,
        Fz::Current => current,
        Fz::Stale => Some(current.map_or(1_000_000, |f| f.saturating_sub(1))),
    }
}

/// The holders, in GPU order: (service, request id, pausing).
fn holders(s: &Sim) -> Vec<(String, String, bool)> {
    s.status()
        .gpus
        .into_iter()
        .flat_map(|g| g.holders)
        .map(|h| {
            (
                h.service_id.into_string(),
                h.request_id.into_string(),
                h.state == HolderState::Pausing,
            )
        })
        .collect()
}

fn apply(s: &mut Sim, op: Op) {
    match op {
        Op::Request {
            svc,
            id,
            priority,
            vram,
            gpu,
            preemptible,
            timeout,
            lease,
            msgpack,
            pause_ms,
        } => {
            let mut r = req(&id_name(id), priority);
            r.0.vram_mb = vram;
            if s.config.host_ttl_ms.is_some() {
                // With node agents: indices below 3 name a host, above a GPU no agent has.
                match gpu {
                    Some(g) if g < 3 => r.0.host = Some(format!("h{g}")),
                    Some(g) => r.0.gpu = Some(format!("h{g}/0")),
                    None => {}
                }
            } else {
                // Indices below 3 name one of the GPUs; above, an unknown one.
                r.0.gpu = gpu.map(|g| {
                    if g < 3 {
                        format!("g{}", g % s.specs.len())
                    } else {
                        format!("g{g}")
                    }
                });
            }
            r.0.preemptible = preemptible;
            r.0.timeout_ms = timeout;
            r.0.lease_ms = lease;
            r.0.pause_ms = pause_ms;
            let encoding = if msgpack {
                Encoding::MsgPack
            } else {
                Encoding::Json
            };
            s.request_enc(&svc_name(svc), encoding, r);
        }
        Op::Release { svc, id, fence } => match id {
            None => {
                s.release_all(&svc_name(svc.unwrap_or(0)));
            }
            Some(id) => {
                let id = id_name(id);
                let (from, fence) = (sender(s, svc, &id), fence_of(s, &id, fence));
                s.release(&from, &id, fence);
            }
        },
        Op::Renew {
            svc,
            id,
            fence,
            lease,
        } => {
            let id = id_name(id);
            let (from, fence) = (sender(s, svc, &id), fence_of(s, &id, fence));
            s.renew(&from, &id, fence, lease);
        }
        Op::Ack {
            svc,
            id,
            fence,
            resumed,
        } => {
            let id = id_name(id);
            let (from, fence) = (sender(s, svc, &id), fence_of(s, &id, fence));
            let action = if resumed {
                AckAction::Resumed
            } else {
                AckAction::Paused
            };
            s.ack(&from, &id, fence, action);
        }
        Op::Cancel { svc, id } => {
            let id = id_name(id);
            let from = sender(s, svc, &id);
            s.cancel(&from, &id);
        }
        Op::CancelWaiting(k) => {
            let waiting = s.status().queue;
            if !waiting.is_empty() {
                let q = &waiting[k % waiting.len()];
                s.cancel(&q.service_id, &q.request_id);
            }
        }
        Op::AckPausing(k) => {
            let pausing: Vec<_> = holders(s).into_iter().filter(|h| h.2).collect();
            if !pausing.is_empty() {
                let (svc, id, _) = &pausing[k % pausing.len()];
                s.ack_paused(svc, id);
            }
        }
        Op::ReleaseHolder(k) | Op::RenewHolder(k) | Op::Refuse(k) => {
            let all = holders(s);
            if all.is_empty() {
                return;
            }
            let (svc, id, _) = &all[k % all.len()];
            let fence = s.fence(id);
            match op {
                Op::ReleaseHolder(_) => s.release(svc, id, Some(fence)),
                Op::RenewHolder(_) => s.renew(svc, id, Some(fence), None),
                _ => s.input(Input::LeaseRefused {
                    request_id: id.clone().into(),
                    fence: gpu_coordinator_core::Fence(fence),
                    why: "another holder is in its place".into(),
                }),
            };
        }
        Op::Invalid { svc, id } => {
            let svc = svc.map(svc_name);
            let id = id.map(id_name);
            s.invalid(
                svc.as_deref(),
                id.as_deref(),
                "field `priority`: expected an integer 0-255",
            );
        }
        Op::HostSample { host, mask } => {
            let totals = s.host_gpu_totals.clone();
            let gpus: Vec<(String, u64, u64)> = totals
                .iter()
                .enumerate()
                .filter(|(i, _)| mask & (1 << i) != 0)
                .map(|(i, &total)| (i.to_string(), total, 0))
                .collect();
            let gpus: Vec<(&str, u64, u64)> = gpus
                .iter()
                .map(|(id, t, u)| (id.as_str(), *t, *u))
                .collect();
            s.host_sample(&format!("h{host}"), &gpus);
        }
        Op::External { .. } if s.specs.is_empty() => {}
        Op::External { gpu, mb } => {
            // NVML never reports more than the GPU has.
            let gpu = s.specs[gpu % s.specs.len()].clone();
            let used_mb = (mb + s.sched.held_mb(&gpu.id)).min(gpu.total_mb);
            s.input(Input::GpuUsed {
                gpu: gpu.id,
                used_mb,
            });
        }
        Op::Advance(ms) => {
            s.advance(ms);
        }
        Op::NextTimeout => {
            s.step_to_next_timeout();
        }
        Op::Restart { gap, keep_store } => {
            s.restart(gap, keep_store);
        }
    }
}

fn run(setup: Setup, ops: Vec<Op>) {
    run_with(setup, ops, |hint| hint);
}

/// [`run`] with every request's `pause_ms` replaced by `hint` of it; returns the simulation.
fn run_with(setup: Setup, ops: Vec<Op>, hint: impl Fn(Option<u64>) -> Option<u64>) -> Sim {
    let fleet = setup.fleet;
    let mut s = play(setup, ops, hint);
    if fleet {
        // Paused requests wait for a GPU that takes grants: every host is heard again, a second
        // apart, until nothing is left (the holders' leases run out within 10 s, the queue's
        // requests time out, the paused ones resume).
        let mut rounds = 0;
        while s.sched.live_count() > 0 {
            for host in 0..3 {
                apply(&mut s, Op::HostSample { host, mask: 0b111 });
            }
            s.advance(1_000);
            rounds += 1;
            assert!(
                rounds < 100,
                "requests still live with every host heard: {:#?}",
                s.status()
            );
        }
    }
    s.finish();
    s
}

/// The inputs played, every invariant checked after each, the simulation left as they leave it.
fn play(setup: Setup, ops: Vec<Op>, hint: impl Fn(Option<u64>) -> Option<u64>) -> Sim {
    let config = SchedConfig {
        host_ttl_ms: None,
        lease_default_ms: 5_000,
        lease_max_ms: 10_000,
        ack_deadline_ms: setup.ack_deadline_ms,
        min_hold_ms: setup.min_hold_ms,
        default_timeout_ms: 5_000,
        aging_ms: setup.aging_ms,
        retain_ended: setup.retain_ended,
        // The settle wait closes a GPU on purpose; it has table tests of its own.
        settle_ms: 0,
        max_per_service: usize::MAX,
        services: setup.services,
    };
    let names: Vec<String> = (0..setup.totals.len()).map(|i| format!("g{i}")).collect();
    let specs: Vec<(&str, u64)> = names
        .iter()
        .map(String::as_str)
        .zip(setup.totals.iter().copied())
        .collect();
    let mut s = if setup.fleet {
        Sim::new(
            SchedConfig {
                host_ttl_ms: Some(2_000),
                ..config
            },
            Vec::new(),
        )
    } else {
        Sim::new(config, gpus(&specs))
    };
    s.host_gpu_totals = setup.totals.clone();
    // With hosts falling silent, an urgent request may wait on holders of a host that takes no new
    // grants: the liveness property is the one-box one.
    s.liveness = setup.aging_ms == 0 && !setup.fleet;
    for mut op in ops {
        if let Op::Request { pause_ms, .. } = &mut op {
            *pause_ms = hint(*pause_ms);
        }
        apply(&mut s, op);
    }
    s
}

/// After `ops`, nothing new comes: every pause is ACKed at once and every lease renewed, round
/// after round, `round_ms` apart. Returns the pauses ordered in each round.
fn settle(s: &mut Sim, rounds: usize, round_ms: u64) -> Vec<usize> {
    let mut pauses = Vec::new();
    for _ in 0..rounds {
        let mut n = 0;
        let count = |acts: &crate::harness::Acts| {
            acts.all_controls()
                .iter()
                .filter(|(_, c)| c.action == gpu_coordinator_wire::ControlAction::Pause)
                .count()
        };
        for (svc, id, _) in holders(s) {
            // An ACK or a renewal before it may have ended it, or paused it.
            let Some(rec) = s.sched.record(&id) else {
                continue;
            };
            let (phase, fence) = (rec.phase, rec.fence.map(|f| f.0));
            let acts = match phase {
                Phase::Pausing => s.ack_paused(&svc, &id),
                Phase::Active => s.renew(&svc, &id, fence, None),
                _ => continue,
            };
            n += count(&acts);
        }
        n += count(&s.advance(round_ms));
        pauses.push(n);
    }
    pauses
}

/// Everything the core asked for, the records persisted without their `pause_ms`.
fn without_hints(s: &Sim) -> Vec<Action> {
    s.history
        .0
        .iter()
        .cloned()
        .map(|action| match action {
            Action::Persist(rec) => Action::Persist(RequestRecord {
                pause_ms: None,
                ..rec
            }),
            other => other,
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 128,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Random inputs on a fleet of three hosts whose agents report, change and fall silent, with
    /// restarts and aging: every invariant (no grant on a silent host, nothing beyond a GPU's size,
    /// the lease store model), and every request ends.
    #[test]
    fn random_inputs_on_a_fleet_of_hosts(
        setup in setup(true),
        ops in vec(fleet_op(), 1..80),
    ) {
        run(Setup { fleet: true, ..setup }, ops);
    }

    /// Random inputs with aging off: every invariant, and preemption liveness.
    #[test]
    fn random_inputs_keep_every_invariant(setup in setup(false), ops in vec(op(false), 1..60)) {
        run(setup, ops);
    }

    /// Random inputs with aging and restarts (from what was persisted, with or without the lease store).
    #[test]
    fn random_inputs_with_restarts_and_aging(setup in setup(true), ops in vec(op(true), 1..60)) {
        run(setup, ops);
    }

    /// Random inputs under random `[services.<id>]` policies (caps, priority limits, defaults, graces,
    /// services that are not preemptible, unknown services refused): every invariant, preemption
    /// liveness as the rules allow it, and no grant ever takes a service beyond its cap.
    #[test]
    fn random_inputs_under_service_policies(
        setup in setup_with_services(false),
        ops in vec(op(false), 1..60),
    ) {
        run(setup, ops);
    }

    /// Reclaims do not go back and forth: after random inputs under random policies with guarantees,
    /// when nothing new comes, every pause is ACKed at once and every lease renewed, the pauses
    /// stop (none in the last half of 40 rounds of 250 ms, once every queued request has timed out or
    /// been granted: only paused requests and holders are left); and at every step the harness
    /// checks that no reclaim undoes one of the same pair within the reclaiming service's grace.
    #[test]
    fn reclaims_do_not_go_back_and_forth(
        setup in setup_with_services(false),
        ops in vec(op(false), 1..60),
    ) {
        let mut s = play(setup, ops, |hint| hint);
        // Requests time out within 8 s of their arrival.
        let mut rounds = 0;
        while s.status().queue.iter().any(|q| !q.paused) {
            settle(&mut s, 1, 250);
            rounds += 1;
            prop_assert!(rounds < 100, "a queued request never timed out");
        }
        let pauses = settle(&mut s, 40, 250);
        prop_assert!(
            pauses[20..].iter().all(|&n| n == 0),
            "pauses per round, nothing new coming: {:?}\nreclaims: {:?}",
            pauses,
            s.reclaims
        );
        s.finish();
    }

    /// The same with aging and restarts.
    #[test]
    fn random_inputs_under_service_policies_with_restarts(
        setup in setup_with_services(true),
        ops in vec(op(true), 1..60),
    ) {
        run(setup, ops);
    }

    /// The `pause_ms` hint only breaks ties: when every request gives the same one, every decision
    /// is the one made without hints (the same orders, replies, events and lease writes).
    #[test]
    fn equal_pause_hints_decide_nothing(
        setup in setup(true),
        ops in vec(op(true), 1..60),
        hint in 0u64..=3_600_000,
    ) {
        let none = without_hints(&run_with(setup.clone(), ops.clone(), |_| None));
        let equal = without_hints(&run_with(setup, ops, |_| Some(hint)));
        prop_assert_eq!(none, equal);
    }
}
