//! `ps`, `inspect`, `logs`, `info`.

use std::io::Write;

use super::open;
use crate::cli::{Global, LogsArgs, PsArgs, VmArg};
use crate::output::{print_json, print_table};

pub fn ps(global: &Global, args: PsArgs) -> anyhow::Result<u8> {
    let records: Vec<_> = open(global)?
        .list()?
        .into_iter()
        .filter(|r| args.all || r.state.has_process())
        .collect();
    if global.json {
        print_json(&records)?;
    } else {
        print_table(&records);
    }
    Ok(0)
}

pub fn inspect(global: &Global, args: VmArg) -> anyhow::Result<u8> {
    let record = open(global)?.inspect(args.namespace.as_deref(), &args.vm)?;
    print_json(&record)?;
    Ok(0)
}

pub fn logs(global: &Global, args: LogsArgs) -> anyhow::Result<u8> {
    let path = open(global)?.console_log(args.vm.namespace.as_deref(), &args.vm.vm)?;
    let mut out = std::io::stdout().lock();
    match args.tail {
        Some(n) => {
            for line in hangar::fsutil::tail_lines(&path, n) {
                writeln!(out, "{line}")?;
            }
        }
        None => match std::fs::read(&path) {
            Ok(bytes) => out.write_all(&bytes)?,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(anyhow::Error::new(err).context(path.display().to_string())),
        },
    }
    Ok(0)
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
