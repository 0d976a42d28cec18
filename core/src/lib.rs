//! The scheduling core of the GPU Coordinator: a deterministic state machine with no I/O, no clock and no
//! async. Inputs arrive with the current instant ([`Scheduler::handle_input`], [`Scheduler::handle_timeout`]);
//! actions come out of [`Scheduler::poll_action`]; [`Scheduler::poll_timeout`] says when it next wants to be
//! woken. This crate must not depend on tokio, redis, async-nats or sea-orm.
//!
//! It decides, and only decides: what it emits are typed domain values ([`outputs`]: ids, instants as
//! [`Millis`], outcomes and reasons as enums), never wire documents; turning them into subjects, JSON or
//! MessagePack and RFC 3339 text is the driver's render step. What the driver observes of the world
//! comes in as inputs, so that the decisions on it are here and covered by the rules harness: what NVML
//! sees used ([`Input::GpuUsed`]), what the lease store holds ([`Input::LeaseStoreHolds`],
//! [`Input::LeaseNotHeld`], [`Input::LeaseRefused`]).

pub mod ids;
pub mod outputs;
mod scheduler;
pub mod types;

pub use ids::{scoped, unscope_text, unscoped, GpuId, RequestId, ServiceId, SCOPE};
pub use outputs::*;
pub use scheduler::Scheduler;
pub use types::*;
