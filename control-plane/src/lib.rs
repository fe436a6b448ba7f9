//! AEX control plane: the daemon that owns the agent registry, the budget ledger, rate counters
//! and the hash-chained audit log, and the `aex` CLI that drives it.
//!
//! Request path: Envoy's filter calls `FilterService` ([`grpc`]) → [`core::Core`] → [`ledger`]
//! (in memory, one mutex) → [`store`] (SQLite writer thread, group commit).

pub mod archive;
pub mod audit;
pub mod cli;
pub mod config;
pub mod core;
pub mod daemon;
pub mod envoy;
pub mod grpc;
pub mod home;
pub mod http;
pub mod ledger;
pub mod metrics;
pub mod money;
pub mod policy;
pub mod procs;
pub mod providers;
pub mod redact;
pub mod stats;
pub mod store;
pub mod tokens;
