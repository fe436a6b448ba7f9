//! The control plane's HTTP server: health for `aex daemon start`, and the built-in mock
//! provider that serves providers without an API key (offline quick start).

use std::sync::Arc;

use axum::routing::get;
use axum::Router;

use crate::core::Core;
use crate::providers::MOCK_PREFIX;

pub fn router(_core: Arc<Core>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .nest(MOCK_PREFIX, aex_mock::router())
}
