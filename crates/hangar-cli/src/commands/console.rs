//! `console`: the serial console on this terminal, raw, until Ctrl-].

use std::io::IsTerminal;

use hangar::console::{attach, AttachEnd, DETACH_KEY};

use super::open;
use crate::cli::{Global, VmArg};
use crate::terminal::RawMode;

pub fn console(global: &Global, args: VmArg) -> anyhow::Result<u8> {
    let socket = open(global)?.console_socket(args.namespace.as_deref(), &args.vm)?;
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprintln!("hangar: attached to {}; detach with Ctrl-]\r", args.vm);
    }
    let raw = RawMode::enter_if_terminal()?;
    let end = attach(&socket, stdin.lock(), std::io::stdout(), DETACH_KEY);
    drop(raw);
    match end? {
        AttachEnd::Detached => eprintln!("hangar: detached from {}", args.vm),
        AttachEnd::ConsoleClosed => eprintln!("hangar: console of {} closed (VM stopped)", args.vm),
    }
    Ok(0)
}
