//! `aex mock`: serves the mock OpenAI-compatible provider on 127.0.0.1.

use std::io::Write;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Port to listen on (0 = any free port; the chosen one is printed).
    #[arg(long, default_value_t = 0)]
    port: u16,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    crate::cli::runtime()?.block_on(async {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", args.port)).await?;
        println!("listening on {}", listener.local_addr()?);
        std::io::stdout().flush()?;
        aex_mock::serve(listener).await?;
        Ok(ExitCode::SUCCESS)
    })
}
