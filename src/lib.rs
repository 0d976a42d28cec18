//! # GPU Coordinator
//!
//! A preemptive priority semaphore for GPUs: services ask for a GPU with a priority over NATS JetStream (or
//! HTTP); the coordinator grants leases held in Redis, keeps its queue durable in Postgres, pauses less
//! urgent holders when an urgent request arrives, and records every change of state in a replayable stream.
//!
//! ## Code map
//!
//! - `core/` (crate `gpu-coordinator-core`): the scheduler, a deterministic state machine with no I/O, no
//!   clock and no async. Inputs go in with `now`; actions come out; it says when it next wants waking.
//! - `wire/` (crate `gpu-coordinator-wire`): the wire contract's messages, JSON/MessagePack, validation.
//! - [`app`]: the composition root. It chooses the adapters, gives them their settings (built from the
//!   configuration, which no adapter reads), connects them, spawns the HTTP API and the NVML sampler
//!   under one task tracker, runs the driver and stops everything in order.
//! - [`driver`]: the one event loop that owns the scheduler and carries out its actions through the
//!   [`ports`].
//! - [`ports`]: the traits the driver needs from the outside (journal, lease store, bus, leadership).
//! - [`adapters`]: thin translations to NATS JetStream (the bus), Redis (the lease store), Postgres (the
//!   journal), NVML (VRAM as the driver sees it) and HTTP (axum: the API, SSE control orders, health,
//!   OpenAPI), and in-memory implementations of every port. No scheduling decision lives there.
//! - [`render`]: the one step that turns the core's typed outputs into the contract's documents.
//! - [`metrics`]: Prometheus metrics, fed by the core's typed events and the status document.
//! - [`config`]: the typed configuration (figment). [`telemetry`]: logging.
//! - `migrations/` (crate `migration`): the Postgres schema.
//! - `client/` (crate `gpu-coordinator-client`): the library services use.
//!
//! ## Invariants
//!
//! - Only the driver task touches the scheduler; everything else sends it commands. HTTP handlers publish
//!   their inputs to the same JetStream input stream as NATS clients, so there is one order and one audit
//!   trail.
//! - An input is acknowledged to JetStream only after its effects, its position in the input stream and
//!   the messages it causes (the outbox) are committed to Postgres in one statement, the lease store is
//!   written, and the messages are stored by JetStream. A restart publishes the outbox again and reads
//!   the inputs again from the one after the last handled: each is handled once, no message is lost.
//! - Fences strictly increase over the deployment's life: the highest issued is persisted with every batch
//!   and restored above both Postgres's and Redis's record.

pub mod adapters;
pub mod agent;
pub mod app;
pub mod audit;
pub mod clock;
pub mod config;
pub mod demo;
pub mod driver;
pub mod engines;
pub mod metrics;
pub mod nats_auth;
pub mod ports;
pub mod render;
pub mod retry;
pub mod storage;
mod sync;
pub mod telemetry;
pub mod urls;
