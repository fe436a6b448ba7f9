//! `aex`: the AEX command line and control-plane daemon in one binary.

use clap::Parser;

fn main() -> std::process::ExitCode {
    // Known before parsing, so that a usage error is reported as JSON too.
    let json = std::env::args_os()
        .skip(1)
        .take_while(|a| a != "--")
        .any(|a| a == "--json");
    let cli = match aex_control_plane::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if json && e.use_stderr() => {
            let text = e.render().to_string();
            let msg = text.trim().strip_prefix("error: ").unwrap_or(text.trim());
            aex_control_plane::cli::report_error(true, msg);
            return std::process::ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
        Err(e) => e.exit(),
    };
    match aex_control_plane::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            aex_control_plane::cli::report_error(json, &format!("{e:#}"));
            std::process::ExitCode::FAILURE
        }
    }
}
