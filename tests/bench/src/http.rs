//! A minimal HTTP/1.1 keep-alive client over one `TcpStream`: sends a pre-built request and reads
//! the response (Content-Length, chunked, or until close), noting when the first body byte
//! arrived. Nothing is buffered beyond what framing needs; the body is counted, not kept, except
//! its last bytes (to check that a stream ended with `data: [DONE]`).

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Failure {
    Connect,
    Io,
    Timeout,
    /// Malformed response framing.
    Protocol,
    /// Non-2xx status.
    Status(u16),
    /// A stream that did not end with `data: [DONE]`.
    IncompleteStream,
}

impl Failure {
    pub fn key(&self) -> String {
        match self {
            Failure::Connect => "connect".into(),
            Failure::Io => "io".into(),
            Failure::Timeout => "timeout".into(),
            Failure::Protocol => "protocol".into(),
            Failure::Status(s) => format!("status_{s}"),
            Failure::IncompleteStream => "incomplete_stream".into(),
        }
    }
}

/// One completed exchange.
pub struct Exchange {
    /// When the first byte of the response body arrived (None for an empty body).
    pub first_body_byte: Option<Instant>,
    pub done: Instant,
}

pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Start of unconsumed data in `buf`.
    pos: usize,
    /// The server said `Connection: close` (or the body was delimited by close).
    pub closed: bool,
}

const TAIL: usize = 16;

impl Conn {
    pub async fn connect(addr: &str) -> std::io::Result<Conn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(64 * 1024),
            pos: 0,
            closed: false,
        })
    }

    fn avail(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// Reads more bytes into the buffer; Ok(0) = EOF.
    async fn fill(&mut self) -> std::io::Result<usize> {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > 32 * 1024 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        let old = self.buf.len();
        if self.buf.capacity() - old < 16 * 1024 {
            self.buf.reserve(64 * 1024);
        }
        let cap = self.buf.capacity();
        self.buf.resize(cap, 0);
        let n = match self.stream.read(&mut self.buf[old..]).await {
            Ok(n) => n,
            Err(e) => {
                self.buf.truncate(old);
                return Err(e);
            }
        };
        self.buf.truncate(old + n);
        Ok(n)
    }

    /// Consumes exactly `n` body bytes, handing each piece to `note` as it arrives.
    async fn consume(&mut self, mut n: usize, note: &mut impl FnMut(&[u8])) -> Result<(), Failure> {
        while n > 0 {
            if self.avail().is_empty() {
                self.fill_or_eof().await?;
            }
            let take = n.min(self.avail().len());
            let (a, b) = (self.pos, self.pos + take);
            note(&self.buf[a..b]);
            self.pos = b;
            n -= take;
        }
        Ok(())
    }

    async fn fill_or_eof(&mut self) -> Result<(), Failure> {
        match self.fill().await {
            Ok(0) => Err(Failure::Io),
            Ok(_) => Ok(()),
            Err(_) => Err(Failure::Io),
        }
    }

    /// Sends `request` and reads the whole response, within `timeout`.
    pub async fn exchange(
        &mut self,
        request: &[u8],
        check_sse_done: bool,
        timeout: Duration,
    ) -> Result<Exchange, Failure> {
        match tokio::time::timeout(timeout, self.exchange_inner(request, check_sse_done)).await {
            Ok(r) => r,
            Err(_) => Err(Failure::Timeout),
        }
    }

    async fn exchange_inner(
        &mut self,
        request: &[u8],
        check_sse_done: bool,
    ) -> Result<Exchange, Failure> {
        self.stream
            .write_all(request)
            .await
            .map_err(|_| Failure::Io)?;
        // Status line and headers.
        let head_end = loop {
            if let Some(i) = find(self.avail(), b"\r\n\r\n") {
                break i;
            }
            if self.avail().len() > 64 * 1024 {
                return Err(Failure::Protocol);
            }
            self.fill_or_eof().await?;
        };
        let head = &self.buf[self.pos..self.pos + head_end];
        let (status, framing, close) = parse_head(head).ok_or(Failure::Protocol)?;
        self.pos += head_end + 4;
        if close {
            self.closed = true;
        }
        // 1xx interim responses are not expected from these servers.
        let mut first: Option<Instant> = None;
        let mut tail: Vec<u8> = Vec::with_capacity(TAIL * 2);
        let mut note = |data: &[u8], first: &mut Option<Instant>| {
            if data.is_empty() {
                return;
            }
            if first.is_none() {
                *first = Some(Instant::now());
            }
            tail.extend_from_slice(data);
            if tail.len() > TAIL {
                tail.drain(..tail.len() - TAIL);
            }
        };
        match framing {
            Framing::Length(left) => {
                self.consume(left, &mut |d| note(d, &mut first)).await?;
            }
            Framing::Chunked => loop {
                // chunk-size line
                let line_end = loop {
                    if let Some(i) = find(self.avail(), b"\r\n") {
                        break i;
                    }
                    if self.avail().len() > 1024 {
                        return Err(Failure::Protocol);
                    }
                    self.fill_or_eof().await?;
                };
                let line = &self.buf[self.pos..self.pos + line_end];
                let size_str = std::str::from_utf8(line)
                    .map_err(|_| Failure::Protocol)?
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .trim();
                let size = usize::from_str_radix(size_str, 16).map_err(|_| Failure::Protocol)?;
                self.pos += line_end + 2;
                if size == 0 {
                    // trailers until an empty line
                    loop {
                        let end = loop {
                            if let Some(i) = find(self.avail(), b"\r\n") {
                                break i;
                            }
                            self.fill_or_eof().await?;
                        };
                        self.pos += end + 2;
                        if end == 0 {
                            break;
                        }
                    }
                    break;
                }
                self.consume(size, &mut |d| note(d, &mut first)).await?;
                while self.avail().len() < 2 {
                    self.fill_or_eof().await?;
                }
                if &self.avail()[..2] != b"\r\n" {
                    return Err(Failure::Protocol);
                }
                self.pos += 2;
            },
            Framing::UntilClose => {
                self.closed = true;
                loop {
                    if !self.avail().is_empty() {
                        let (a, b) = (self.pos, self.buf.len());
                        note(&self.buf[a..b], &mut first);
                        self.pos = b;
                    }
                    match self.fill().await {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(_) => return Err(Failure::Io),
                    }
                }
            }
        }
        let done = Instant::now();
        if !(200..300).contains(&status) {
            return Err(Failure::Status(status));
        }
        if check_sse_done && !tail.ends_with(b"data: [DONE]\n\n") {
            return Err(Failure::IncompleteStream);
        }
        Ok(Exchange {
            first_body_byte: first,
            done,
        })
    }
}

enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// (status, framing, connection-close)
fn parse_head(head: &[u8]) -> Option<(u16, Framing, bool)> {
    let text = std::str::from_utf8(head).ok()?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next()?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let status: u16 = parts.next()?.parse().ok()?;
    let mut length = None;
    let mut chunked = false;
    let mut close = version == "HTTP/1.0";
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let v = v.trim();
        if k.eq_ignore_ascii_case("content-length") {
            length = v.parse::<usize>().ok();
        } else if k.eq_ignore_ascii_case("transfer-encoding") {
            chunked = v.to_ascii_lowercase().contains("chunked");
        } else if k.eq_ignore_ascii_case("connection") {
            let v = v.to_ascii_lowercase();
            if v.contains("close") {
                close = true;
            } else if v.contains("keep-alive") {
                close = false;
            }
        }
    }
    let framing = if chunked {
        Framing::Chunked
    } else if let Some(n) = length {
        Framing::Length(n)
    } else if status == 204 || status == 304 || (100..200).contains(&status) {
        Framing::Length(0)
    } else {
        Framing::UntilClose
    };
    Some((status, framing, close))
}

/// The request bytes, built once: `POST path HTTP/1.1` with Host, Content-Type, Content-Length
/// and the extra headers.
pub fn build_request(host: &str, path: &str, headers: &[(String, String)], body: &[u8]) -> Vec<u8> {
    let mut r = format!("POST {path} HTTP/1.1\r\nHost: {host}\r\n");
    let has = |name: &str| headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(name));
    if !has("content-type") {
        r.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut out = r.into_bytes();
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    async fn serve_once(resp: &'static [u8]) -> String {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut b = [0u8; 4096];
            loop {
                let n = s.read(&mut b).await.unwrap();
                if n == 0 {
                    return;
                }
                // send in small pieces to exercise split framing
                for c in resp.chunks(7) {
                    s.write_all(c).await.unwrap();
                    s.flush().await.unwrap();
                }
            }
        });
        addr
    }

    #[tokio::test]
    async fn length_and_chunked_and_keepalive() {
        let addr = serve_once(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello").await;
        let mut c = Conn::connect(&addr).await.unwrap();
        let req = build_request("h", "/", &[], b"{}");
        for _ in 0..3 {
            let e = c
                .exchange(&req, false, Duration::from_secs(2))
                .await
                .unwrap();
            assert!(e.first_body_byte.is_some());
        }
        let addr = serve_once(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n6\r\ndata: \r\n8\r\n[DONE]\n\n\r\n0\r\n\r\n",
        )
        .await;
        let mut c = Conn::connect(&addr).await.unwrap();
        for _ in 0..3 {
            c.exchange(&req, true, Duration::from_secs(2))
                .await
                .unwrap();
        }
        let addr = serve_once(b"HTTP/1.1 429 Too Many\r\ncontent-length: 2\r\n\r\n{}").await;
        let mut c = Conn::connect(&addr).await.unwrap();
        assert_eq!(
            c.exchange(&req, false, Duration::from_secs(2)).await.err(),
            Some(Failure::Status(429))
        );
        // the connection is still usable after a non-2xx with a body
        assert_eq!(
            c.exchange(&req, false, Duration::from_secs(2)).await.err(),
            Some(Failure::Status(429))
        );
    }
}
