//! Thin adapters: each translates between the driver and one server, and decides nothing.

mod client_answers;
pub mod http;
pub mod memory;
pub mod nats;
pub mod nats_gateway;
pub mod nats_nodes;
pub mod nats_readers;
pub mod nvml;
pub mod postgres;
pub mod redis;
pub(crate) mod sql;
pub mod sqlite;
pub mod write_behind;
