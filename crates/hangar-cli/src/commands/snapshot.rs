//! `snapshot create|ls|inspect|rm|export|import`, `restore`, `fork`.

use anyhow::Context;
use hangar::manager::{RestoreOptions, SnapshotOptions};

use super::{open, print_vm};
use crate::cli::{ForkArgs, Global, RestoreArgs, RestoreResources, SnapshotCommand};
use crate::output::{print_json, Spinner};

pub fn snapshot(global: &Global, command: SnapshotCommand) -> anyhow::Result<u8> {
    let mut manager = open(global)?;
    match command {
        SnapshotCommand::Create {
            vm,
            name,
            description,
            stop,
        } => {
            let options = SnapshotOptions {
                name,
                description,
                stop,
            };
            let spinner = Spinner::start("saving", global.json);
            let record = manager.snapshot_create(vm.namespace.as_deref(), &vm.vm, &options);
            spinner.finish();
            let record = record?;
            print_snapshot(global, &record)?;
        }
        SnapshotCommand::Ls => {
            let records = manager.snapshot_list()?;
            if global.json {
                return print_json(&records).map(|()| 0);
            }
            let store = manager.snapshot_store();
            let rows = records
                .iter()
                .map(|s| {
                    vec![
                        s.name.clone(),
                        s.id.clone(),
                        s.source.name.clone(),
                        format!("{:.1} MB", store.own_bytes(s) as f64 / 1e6),
                        s.created_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                        s.description.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            super::image::print_rows(
                &["NAME", "ID", "VM", "SIZE", "CREATED", "DESCRIPTION"],
                rows,
            )?;
        }
        SnapshotCommand::Inspect { snapshot } => print_json(&manager.snapshot_inspect(&snapshot)?)?,
        SnapshotCommand::Rm { snapshots, force } => {
            let mut failed = false;
            for reference in snapshots {
                match manager.snapshot_remove(&reference, force) {
                    Ok(removed) => {
                        println!("{}", removed.record.name);
                        if !removed.broken.is_empty() {
                            eprintln!(
                                "hangar: removed snapshot {} with --force: {} built on it and can no longer start",
                                removed.record.name,
                                removed.broken.join(", ")
                            );
                        }
                    }
                    Err(err) => {
                        eprintln!("hangar: {err}");
                        failed = true;
                    }
                }
            }
            return Ok(if failed { 1 } else { 0 });
        }
        SnapshotCommand::Export { snapshot, output } => {
            let spinner = Spinner::start("exporting", global.json);
            let summary = manager.snapshot_export(&snapshot, &output);
            spinner.finish();
            let summary = summary?;
            if global.json {
                print_json(&summary)?;
            } else {
                println!("{}", output.display());
            }
        }
        SnapshotCommand::Import { file, name } => {
            let spinner = Spinner::start("importing", global.json);
            let record = manager.snapshot_import(&file, name.as_deref());
            spinner.finish();
            let record = record?;
            print_snapshot(global, &record)?;
        }
    }
    Ok(0)
}

fn options(resources: &RestoreResources) -> anyhow::Result<RestoreOptions> {
    let size = |flag: &str, text: &Option<String>| -> anyhow::Result<Option<hangar::ByteSize>> {
        text.as_deref()
            .map(|t| t.parse().with_context(|| format!("--{flag} {t:?}")))
            .transpose()
    };
    Ok(RestoreOptions {
        namespace: resources.namespace.clone(),
        cpus: resources.cpus,
        memory: size("memory", &resources.memory)?,
        disk_size: size("disk", &resources.disk)?,
        ..RestoreOptions::default()
    })
}

pub fn restore(global: &Global, args: RestoreArgs) -> anyhow::Result<u8> {
    let mut options = options(&args.resources)?;
    options.name = args.name;
    options.hostname = args.hostname;
    let spinner = Spinner::start("restoring", global.json);
    let record = open(global)?.restore(&args.snapshot, &options);
    spinner.finish();
    print_vm(global, &record?)?;
    Ok(0)
}

pub fn fork(global: &Global, args: ForkArgs) -> anyhow::Result<u8> {
    let options = options(&args.resources)?;
    let spinner = Spinner::start("forking", global.json);
    let records = open(global)?.fork(&args.snapshot, args.count, &options);
    spinner.finish();
    let records = records?;
    if global.json {
        print_json(&records)?;
    } else {
        for record in &records {
            println!("{}", record.name);
        }
    }
    Ok(0)
}

/// A snapshot as JSON, or its name.
fn print_snapshot(
    global: &Global,
    record: &hangar::snapshot::SnapshotRecord,
) -> anyhow::Result<()> {
    if global.json {
        print_json(record)
    } else {
        println!("{}", record.name);
        Ok(())
    }
}
