//! The `aex.v1` control-plane API shared by the filter, the daemon and the CLI.
//!
//! Messages are always generated; tonic client/server stubs only with the `grpc` feature, so the
//! wasm filter links nothing but prost.

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/aex.v1.rs"));
}

pub mod glob;
pub mod money;

/// Lease limits both sides must agree on.
pub mod lease {
    /// The longest a worker admits requests under one lease: its rate slots were recorded in the
    /// agent's one-minute window at grant, and the admissions must reach the control plane well
    /// within that minute. The control plane may grant a shorter life (`Lease.max_age_ms`).
    pub const MAX_AGE_MS: u64 = 20_000;
}

/// The environment variable that carries the filter's key to the control plane into Envoy (and,
/// through `vm_config.environment_variables.host_env_keys`, into the filter's VM). Not in the
/// plugin configuration: Envoy's unauthenticated admin port serves that (`/config_dump`), and the
/// key unlocks `FilterService/Sync`, which hands out the provider keys.
pub const FILTER_KEY_ENV: &str = "AEX_FILTER_KEY";
