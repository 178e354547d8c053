//! `ps`, `inspect`, `logs`, `info`.

use std::io::Write;

use anyhow::Context;

use super::open;
use crate::cli::{Global, LogsArgs, PsArgs, VmArg};
use crate::output::{print_json, print_table};

pub fn ps(global: &Global, args: PsArgs) -> anyhow::Result<u8> {
    let mut filter = hangar::manager::ListFilter {
        all: args.all,
        namespace: args.namespace,
        ..Default::default()
    };
    for state in &args.state {
        filter.states.push(super::parse_state(state)?);
    }
    for label in &args.label {
        let (key, value) = match label.split_once('=') {
            Some((key, value)) => (key.to_owned(), Some(value.to_owned())),
            None => (label.clone(), None),
        };
        filter.labels.insert(key, value);
    }
    let mut manager = open(global)?;
    if global.json {
        print_json(&manager.list_filtered(&filter)?)?;
    } else {
        print_table(&manager.list_summaries(&filter)?)?;
    }
    Ok(0)
}

pub fn inspect(global: &Global, args: VmArg) -> anyhow::Result<u8> {
    let record = open(global)?.inspect(args.namespace.as_deref(), &args.vm)?;
    print_json(&record)?;
    Ok(0)
}

pub fn logs(global: &Global, args: LogsArgs) -> anyhow::Result<u8> {
    let mut out = std::io::stdout().lock();
    let mut write_error = None;
    open(global)?.console_log_stream(
        args.vm.namespace.as_deref(),
        &args.vm.vm,
        args.tail,
        args.follow,
        &mut |chunk| {
            if write_error.is_none() {
                write_error = out.write_all(chunk).and_then(|()| out.flush()).err();
            }
        },
    )?;
    match write_error {
        // A closed pipe (`hangar logs | head`) is not an error.
        Some(err) if err.kind() != std::io::ErrorKind::BrokenPipe => Err(err.into()),
        _ => Ok(0),
    }
}

pub fn info(global: &Global) -> anyhow::Result<u8> {
    let mut manager = open(global)?;
    let image = manager.default_image()?;
    let accel = manager.accelerator()?;
    let info = serde_json::json!({
        "state_dir": manager.layout().root(),
        "accelerator": accel.accel,
        "accelerator_reason": accel.reason,
        "accelerator_cached": accel.cached,
        "default_image": image,
    });
    if global.json {
        print_json(&info)?;
    } else {
        println!("state dir:    {}", manager.layout().root().display());
        println!("accelerator:  {} ({})", accel.accel, accel.reason);
        println!(
            "kernel:       {} ({})",
            image.kernel.display(),
            image.kernel_release
        );
        println!("initramfs:    {}", image.initramfs.display());
    }
    Ok(0)
}

pub fn gc(global: &Global) -> anyhow::Result<u8> {
    let report = open(global)?.gc()?;
    if global.json {
        print_json(&report)?;
        return Ok(0);
    }
    let list = |items: &[String]| {
        if items.is_empty() {
            "none".to_owned()
        } else {
            items.join(", ")
        }
    };
    let pids: Vec<String> = report
        .killed_orphan_processes
        .iter()
        .map(u32::to_string)
        .collect();
    println!(
        "removed VMs of dead runs: {}",
        list(&report.removed_ephemeral)
    );
    println!("killed orphan VMM processes: {}", list(&pids));
    println!(
        "removed orphan work dirs: {}",
        list(&report.removed_orphan_dirs)
    );
    println!("removed stale image builds: {}", list(&report.removed_tmp));
    println!(
        "removed unfinished snapshots: {}",
        list(&report.removed_unfinished_snapshots)
    );
    Ok(0)
}

/// `agent -o FILE`: the embedded guest agent, for disk images.
pub fn export_agent(global: &Global, output: &std::path::Path) -> anyhow::Result<u8> {
    hangar::image::agent::export(output)
        .with_context(|| format!("writing the agent to {}", output.display()))?;
    if global.json {
        crate::output::print_json(&serde_json::json!({
            "path": output,
            "bytes": hangar::image::agent::AGENT_BINARY.len(),
            "protocol_version": hangar::PROTOCOL_VERSION,
        }))?;
    }
    Ok(0)
}
