//! `hangar`: parse, call the library once, print. Exit codes: the guest
//! command's own code for `run`/`exec` (128+N for a signal, like a shell),
//! 125 when Hangar itself failed (as docker does), 130 on Ctrl-C.

mod cli;
mod commands;
mod output;
mod terminal;

use std::process::ExitCode;

use clap::Parser;

/// Exit code when Hangar itself fails (docker uses the same).
const EXIT_HANGAR_ERROR: u8 = 125;
const EXIT_INTERRUPTED: u8 = 130;
/// Exit code when `--timeout` killed the guest command (as `timeout(1)`).
const EXIT_TIMED_OUT: u8 = 124;

fn main() -> ExitCode {
    hangar::trace::init();
    let cli = cli::Cli::parse();
    // Ctrl-C sets a flag the library polls; it then cleans up and returns.
    let _ = ctrlc::set_handler(hangar::interrupt::request);
    match commands::dispatch(cli) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            if err
                .downcast_ref::<hangar::ManagerError>()
                .is_some_and(hangar::ManagerError::is_interrupted)
            {
                eprintln!("hangar: interrupted");
                return ExitCode::from(EXIT_INTERRUPTED);
            }
            let timed_out = err.chain().any(|cause| {
                cause
                    .downcast_ref::<hangar::guest::GuestError>()
                    .is_some_and(|e| matches!(e, hangar::guest::GuestError::ExecTimeout { .. }))
            });
            if timed_out {
                eprintln!("hangar: {}", output::error_chain(&err));
                return ExitCode::from(EXIT_TIMED_OUT);
            }
            // `hangar ps | head` closes our stdout early: not an error.
            let broken_pipe = err.chain().any(|cause| {
                cause
                    .downcast_ref::<std::io::Error>()
                    .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
            });
            if broken_pipe {
                return ExitCode::SUCCESS;
            }
            eprintln!("hangar: error: {}", output::error_chain(&err));
            ExitCode::from(EXIT_HANGAR_ERROR)
        }
    }
}
