//! AEX proxy-wasm filter. Decision logic lives in plain modules that unit-test on the host
//! ([`classify`], [`policy`], [`decide`], [`lease`], [`sse`], [`usage`], [`body_usage`], [`json_edit`],
//! [`headers`], [`errors`]); the
//! `glue` module (wasm32 only) moves bytes between Envoy and that logic.

// Tests may unwrap: a failing test should panic. The filter itself may not (see Cargo.toml lints).
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod body_usage;
pub mod borrowed;
pub mod classify;
pub mod decide;
pub mod errors;
pub mod event_head;
pub mod headers;
pub mod json_edit;
pub mod lease;
pub mod policy;
pub mod sse;
pub mod state;
pub mod usage;

#[cfg(target_arch = "wasm32")]
mod glue;
