//! `create`, `start`, `stop`, `rm`.

use std::time::Duration;

use anyhow::Context;

use super::{open, spec_from};
use crate::cli::{CreateArgs, Global, RmArgs, StopArgs, VmArg};
use crate::output::{print_json, Spinner};

pub fn create(global: &Global, args: CreateArgs) -> anyhow::Result<u8> {
    let backend = args
        .backend
        .parse()
        .map_err(anyhow::Error::msg)
        .context("--backend")?;
    let spec = match (&args.file, args.name) {
        (Some(file), name) => {
            let mut spec = hangar::spec_file::read_spec_file(file)?;
            if let Some(name) = name {
                spec.name = name;
                spec.validate()?;
            }
            spec
        }
        (None, Some(name)) => spec_from(name, &args.resources)?,
        (None, None) => anyhow::bail!("give --name or a spec file with -f"),
    };
    let password = if args.password_stdin {
        let mut line = String::new();
        std::io::stdin()
            .read_line(&mut line)
            .context("--password-stdin")?;
        Some(line.trim_end_matches(['\n', '\r']).to_owned())
    } else {
        None
    };
    let record = open(global)?.create_with_password(spec, backend, password.as_deref())?;
    if global.json {
        print_json(&record)?;
    } else {
        println!("{}", record.id);
    }
    Ok(0)
}

pub fn start(global: &Global, args: VmArg) -> anyhow::Result<u8> {
    let mut manager = open(global)?;
    let spinner = Spinner::start(&format!("starting {}", args.vm), global.json);
    let result = manager.start(args.namespace.as_deref(), &args.vm);
    spinner.finish();
    if let (Some(reason), false) = (manager.fresh_tcg_note(), global.json) {
        eprintln!("hangar: {reason}");
    }
    let record = result?;
    if global.json {
        print_json(&record)?;
    } else {
        println!("{}", record.name);
    }
    Ok(0)
}

pub fn stop(global: &Global, args: StopArgs) -> anyhow::Result<u8> {
    let mut manager = open(global)?;
    let record = manager.stop(
        args.vm.namespace.as_deref(),
        &args.vm.vm,
        Some(Duration::from_secs(args.timeout)),
    )?;
    if global.json {
        print_json(&record)?;
    } else {
        println!("{}", record.name);
    }
    Ok(0)
}

pub fn rm(global: &Global, args: RmArgs) -> anyhow::Result<u8> {
    let mut manager = open(global)?;
    let mut removed = Vec::new();
    for vm in &args.vms {
        let record = manager.remove(args.namespace.as_deref(), vm, args.force)?;
        if !global.json {
            println!("{}", record.name);
        }
        removed.push(record);
    }
    if global.json {
        print_json(&removed)?;
    }
    Ok(0)
}
