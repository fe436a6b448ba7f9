//! Benchmark arm W1: a proxy-wasm filter that does what any governing filter must do per
//! request and nothing more. It reads the request headers (one host call), holds the request
//! until the whole body is buffered and reads it, then reads the response headers and every
//! response body chunk. No parsing, no decisions, no control plane.
//!
//! Envoy with this filter against plain Envoy (A1) is the floor of the Wasm host's own cost;
//! the AEX filter (A2) against this arm is what AEX's logic adds on top.
#![cfg(target_arch = "wasm32")]

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
}}

struct Root;

impl Context for Root {}

impl RootContext for Root {
    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Floor))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// Every read below is a host call (the host copies the bytes into the VM): none can be
/// optimised away, so the results are dropped.
struct Floor;

impl Context for Floor {}

impl HttpContext for Floor {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let _ = proxy_wasm::hostcalls::get_map_bytes(MapType::HttpRequestHeaders);
        if end_of_stream {
            Action::Continue
        } else {
            Action::Pause
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !end_of_stream {
            return Action::Pause;
        }
        let _ = proxy_wasm::hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size);
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let _ = proxy_wasm::hostcalls::get_map_bytes(MapType::HttpResponseHeaders);
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, _end_of_stream: bool) -> Action {
        let _ = proxy_wasm::hostcalls::get_buffer(BufferType::HttpResponseBody, 0, body_size);
        Action::Continue
    }
}
