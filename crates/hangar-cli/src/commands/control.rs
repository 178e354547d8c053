//! `kill`, `restart`, `pause`, `resume`, `wait`.

use std::str::FromStr;
use std::time::Duration;

use anyhow::{bail, Context};
use hangar::backend::Signal;

use super::{open, parse_state, print_vm};
use crate::cli::{Global, KillArgs, StopArgs, VmArg, WaitArgs};

pub fn kill(global: &Global, args: KillArgs) -> anyhow::Result<u8> {
    let signal = parse_signal(&args.signal)?;
    let record = open(global)?.kill(args.vm.namespace.as_deref(), &args.vm.vm, signal)?;
    print_vm(global, &record)?;
    Ok(0)
}

pub fn restart(global: &Global, args: StopArgs) -> anyhow::Result<u8> {
    let record = open(global)?.restart(
        args.vm.namespace.as_deref(),
        &args.vm.vm,
        Some(Duration::from_secs(args.timeout)),
    )?;
    print_vm(global, &record)?;
    Ok(0)
}

pub fn pause(global: &Global, args: VmArg) -> anyhow::Result<u8> {
    let record = open(global)?.pause(args.namespace.as_deref(), &args.vm)?;
    print_vm(global, &record)?;
    Ok(0)
}

pub fn resume(global: &Global, args: VmArg) -> anyhow::Result<u8> {
    let record = open(global)?.resume(args.namespace.as_deref(), &args.vm)?;
    print_vm(global, &record)?;
    Ok(0)
}

pub fn wait(global: &Global, args: WaitArgs) -> anyhow::Result<u8> {
    let target = parse_state(&args.state)?;
    let record = open(global)?.wait_for(
        args.vm.namespace.as_deref(),
        &args.vm.vm,
        target,
        Duration::from_secs(args.timeout),
    )?;
    print_vm(global, &record)?;
    Ok(0)
}

/// `KILL`, `SIGKILL`, `kill` or `9`.
fn parse_signal(text: &str) -> anyhow::Result<Signal> {
    if let Ok(number) = text.parse::<i32>() {
        return Signal::try_from(number)
            .with_context(|| format!("--signal {text}: no such signal number"));
    }
    let upper = text.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    match Signal::from_str(&name) {
        Ok(signal) => Ok(signal),
        Err(_) => {
            bail!("--signal {text:?} is not a signal name; use e.g. KILL, TERM, INT or a number")
        }
    }
}
