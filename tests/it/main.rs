//! The one integration-test crate: every area is a module, so the suite links once.
//! Tests talk to the real Postgres, Redis and NATS on loopback (or private servers they start).

mod audit;
mod bounds;
mod client;
mod client_http;
mod clocks;
mod demo;
mod disk_full_status;
mod disks;
mod disks_servers;
mod engine_board;
mod engines;
mod fleet;
mod ha;
mod http;
mod http_hostile;
mod limits;
mod modes;
mod nats_cluster;
mod pg_failover;
mod redis_sentinel;
mod secrets;
mod security;
mod service;
mod store_pg;
mod store_redis;
mod store_sqlite;
mod support;
mod ui;
