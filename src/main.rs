//! The `jobcachefs` command: parses arguments and hands them to the command handlers.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = jobcachefs::cli::Cli::parse();
    jobcachefs::cli::run(args)
}
