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
