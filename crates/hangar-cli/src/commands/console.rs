//! `console`: the serial console on this terminal, raw, until Ctrl-].

use std::io::IsTerminal;

use hangar::console::{attach, AttachEnd, DETACH_KEY};
use nix::sys::termios::{self, SetArg, Termios};

use super::open;
use crate::cli::{Global, VmArg};

pub fn console(global: &Global, args: VmArg) -> anyhow::Result<u8> {
    let socket = open(global)?.console_socket(args.namespace.as_deref(), &args.vm)?;
    let stdin = std::io::stdin();
    let raw = if stdin.is_terminal() {
        eprintln!("hangar: attached to {}; detach with Ctrl-]\r", args.vm);
        Some(RawMode::enter(&stdin)?)
    } else {
        None
    };
    let end = attach(&socket, stdin.lock(), std::io::stdout(), DETACH_KEY);
    drop(raw);
    match end? {
        AttachEnd::Detached => eprintln!("hangar: detached from {}", args.vm),
        AttachEnd::ConsoleClosed => eprintln!("hangar: console of {} closed (VM stopped)", args.vm),
    }
    Ok(0)
}

/// The terminal in raw mode while alive; the saved mode comes back on drop,
/// whatever path leaves the command.
struct RawMode {
    saved: Termios,
}

impl RawMode {
    fn enter(stdin: &std::io::Stdin) -> anyhow::Result<Self> {
        let saved = termios::tcgetattr(stdin)?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin, SetArg::TCSANOW, &raw)?;
        Ok(Self { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin(), SetArg::TCSANOW, &self.saved);
    }
}
