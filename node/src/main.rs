//! The `tokengo` binary: parses the command line and runs the chosen role (which starts
//! logging, and trace export when configured).

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = tokengo::Cli::parse();
    match tokengo::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // `{:#}` prints the whole context chain on one line: what failed and why.
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
