//! `aex`: the AEX command line and control-plane daemon in one binary.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = aex_control_plane::cli::Cli::parse();
    match aex_control_plane::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
