//! `aex-mock --port N`: run the mock OpenAI-compatible provider on 127.0.0.1.
//!
//! Port 0 (the default) picks a free port. Once bound, the binary prints
//! `listening on 127.0.0.1:PORT` to stdout (flushed), so a parent process can
//! read the address from the first line.

use std::io::Write;
use std::process::ExitCode;

const USAGE: &str = "usage: aex-mock [--port N]\n\nServes a mock OpenAI-compatible API on 127.0.0.1:N (0 = any free port).";

fn parse_port(args: &[String]) -> Result<Option<u16>, String> {
    let mut port = 0u16;
    let mut i = 0;
    while i < args.len() {
        let arg = args[i].as_str();
        let value = if arg == "--port" || arg == "-p" {
            i += 1;
            args.get(i)
                .map(String::as_str)
                .ok_or_else(|| format!("{arg} needs a value"))?
        } else if let Some(v) = arg.strip_prefix("--port=") {
            v
        } else if arg == "--help" || arg == "-h" {
            return Ok(None);
        } else {
            return Err(format!("unexpected argument: {arg}"));
        };
        port = value
            .parse()
            .map_err(|_| format!("invalid port: {value}"))?;
        i += 1;
    }
    Ok(Some(port))
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let port = match parse_port(&args) {
        Ok(Some(port)) => port,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("aex-mock: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let listener = match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("aex-mock: cannot bind 127.0.0.1:{port}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let addr = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("aex-mock: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::stdout();
    if writeln!(out, "listening on {addr}")
        .and_then(|()| out.flush())
        .is_err()
    {
        return ExitCode::FAILURE;
    }
    match aex_mock::serve(listener).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aex-mock: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_port;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_ports() {
        assert_eq!(parse_port(&args(&[])), Ok(Some(0)));
        assert_eq!(parse_port(&args(&["--port", "8080"])), Ok(Some(8080)));
        assert_eq!(parse_port(&args(&["--port=0"])), Ok(Some(0)));
        assert_eq!(parse_port(&args(&["--help"])), Ok(None));
        assert!(parse_port(&args(&["--port"])).is_err());
        assert!(parse_port(&args(&["--port", "x"])).is_err());
        assert!(parse_port(&args(&["--port", "70000"])).is_err());
        assert!(parse_port(&args(&["extra"])).is_err());
    }
}
