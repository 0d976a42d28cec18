//! Thin adapters: each translates between the driver and one server, and decides nothing.

pub mod nats;
pub mod postgres;
pub mod redis;
