//! The scheduling core of the GPU Coordinator: a deterministic state machine with no I/O, no clock and no
//! async. Inputs arrive with the current instant ([`Scheduler::handle_input`], [`Scheduler::handle_timeout`]);
//! actions come out of [`Scheduler::poll_action`]; [`Scheduler::poll_timeout`] says when it next wants to be
//! woken. This crate must not depend on tokio, redis, async-nats or sea-orm.

mod scheduler;
pub mod types;

pub use scheduler::Scheduler;
pub use types::*;
