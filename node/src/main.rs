//! The `tokengo` binary: parses the command line, starts logging and runs the chosen role.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = tokengo::cli::Cli::parse();
    tokengo::logging::init(cli.log_format());
    match tokengo::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // `{:#}` prints the whole context chain on one line: what failed and why.
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
