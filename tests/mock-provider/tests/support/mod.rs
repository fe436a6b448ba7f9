//! A tiny HTTP/1.1 client over `tokio::net::TcpStream` for the integration
//! tests. It keeps the chunked-transfer framing visible, so tests can check
//! that every SSE event is sent as its own body frame, and it tolerates a
//! connection cut mid-body (reported as `complete == false`).

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One HTTP response as read off the wire.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    /// Header names lower-cased, in arrival order.
    pub headers: Vec<(String, String)>,
    /// The decoded body.
    pub body: Vec<u8>,
    /// The chunked-encoding frames (empty for content-length bodies).
    pub chunks: Vec<Vec<u8>>,
    /// Whether the body ended properly (terminal chunk / full length).
    pub complete: bool,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text()))
    }

    /// The body split into SSE events (text between blank lines).
    pub fn events(&self) -> Vec<String> {
        self.text()
            .split("\n\n")
            .filter(|e| !e.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// The `data:` payloads of all events, raw.
    pub fn data_lines(&self) -> Vec<String> {
        self.events()
            .iter()
            .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")))
            .map(str::to_owned)
            .collect()
    }

    /// The `data:` payloads parsed as JSON (skipping `[DONE]`).
    pub fn data_json(&self) -> Vec<Value> {
        self.data_lines()
            .iter()
            .filter(|d| d.as_str() != "[DONE]")
            .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("bad data {d}: {e}")))
            .collect()
    }

    /// Named events as `(event name, parsed data)`.
    pub fn named_events(&self) -> Vec<(String, Value)> {
        self.events()
            .iter()
            .map(|e| {
                let mut name = String::new();
                let mut data = Value::Null;
                for line in e.lines() {
                    if let Some(n) = line.strip_prefix("event: ") {
                        name = n.to_owned();
                    } else if let Some(d) = line.strip_prefix("data: ") {
                        data = serde_json::from_str(d).unwrap_or_else(|err| panic!("{d}: {err}"));
                    }
                }
                (name, data)
            })
            .collect()
    }
}

/// Starts `aex_mock::serve` on a free loopback port.
pub async fn start() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(aex_mock::serve(listener));
    addr
}

/// Serves an arbitrary router on a free loopback port.
pub async fn start_router(router: axum::Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move { axum::serve(listener, router).await });
    addr
}

/// Sends one request (with `Connection: close`) and reads the whole reply.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Reply {
    tokio::time::timeout(
        Duration::from_secs(20),
        exchange(addr, method, path, headers, body),
    )
    .await
    .expect("request timed out")
}

pub async fn post(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: &Value) -> Reply {
    let bytes = serde_json::to_vec(body).expect("serialize");
    request(addr, "POST", path, headers, Some(&bytes)).await
}

pub async fn get(addr: SocketAddr, path: &str) -> Reply {
    request(addr, "GET", path, &[], None).await
}

async fn exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Reply {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut head = format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        head.push_str(&format!(
            "content-type: application/json\r\ncontent-length: {}\r\n",
            b.len()
        ));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.expect("write head");
    if let Some(b) = body {
        stream.write_all(b).await.expect("write body");
    }
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
    }
    parse(&raw)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn parse(raw: &[u8]) -> Reply {
    let end = find(raw, b"\r\n\r\n").expect("no complete response head");
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let rest = &raw[end + 4..];
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let mut reply = Reply {
        status,
        headers,
        body: Vec::new(),
        chunks: Vec::new(),
        complete: false,
    };
    if chunked {
        let mut pos = 0;
        while let Some(line_end) = find(&rest[pos..], b"\r\n") {
            let size_str = String::from_utf8_lossy(&rest[pos..pos + line_end]).into_owned();
            let size = usize::from_str_radix(size_str.split(';').next().unwrap_or("").trim(), 16)
                .expect("chunk size");
            let start = pos + line_end + 2;
            if size == 0 {
                reply.complete = true;
                break;
            }
            if start + size + 2 > rest.len() {
                break; // cut mid-chunk
            }
            let chunk = rest[start..start + size].to_vec();
            reply.body.extend_from_slice(&chunk);
            reply.chunks.push(chunk);
            pos = start + size + 2;
        }
    } else {
        let len = reply
            .header("content-length")
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(rest.len());
        let take = len.min(rest.len());
        reply.body = rest[..take].to_vec();
        reply.complete = take == len;
    }
    reply
}

/// The `n` of an `x-request-id: req_mock_<n>` header.
pub fn request_number(reply: &Reply) -> String {
    reply
        .header("x-request-id")
        .and_then(|v| v.strip_prefix("req_mock_"))
        .expect("x-request-id req_mock_<n>")
        .to_owned()
}
