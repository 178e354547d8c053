//! `image import|add|ls|inspect|rm|gc`, and `pull`.

use super::open;
use crate::cli::{Global, ImageCommand, PullArgs};
use crate::output::{print_json, Spinner};

pub fn image(global: &Global, command: ImageCommand) -> anyhow::Result<u8> {
    let mut manager = open(global)?;
    match command {
        ImageCommand::Import { source, tag } => {
            let spinner = Spinner::start("importing image", global.json);
            let imported = manager.import_image(&source, tag.as_deref());
            spinner.finish();
            let imported = imported?;
            if global.json {
                let list: Vec<_> = imported
                    .iter()
                    .map(|(names, record)| serde_json::json!({"names": names, "image": record}))
                    .collect();
                print_json(&list)?;
            } else {
                for (names, record) in &imported {
                    println!("{} {}", names.join(","), record.manifest_digest);
                }
            }
        }
        ImageCommand::Add {
            source: Some(source),
            name,
            sha256,
            ..
        } => {
            let bar = PullBar::new(&source, global.json);
            let added =
                manager.add_disk_image(&source, name.as_deref(), sha256.as_deref(), &mut |event| {
                    bar.on(event)
                });
            bar.finish();
            let record = added?;
            if global.json {
                print_json(&record)?;
            } else {
                println!(
                    "{}{} {} sha256:{}",
                    hangar::manager::DISK_PREFIX,
                    record.name,
                    record.format.as_str(),
                    record.sha256
                );
            }
        }
        ImageCommand::Add {
            manifest: Some(manifest),
            max_bundles,
            ..
        } => {
            let bar = PullBar::new(&manifest, global.json);
            let added = manager.add_bundle(&manifest, max_bundles, &mut |event| bar.on(event));
            bar.finish();
            let report = added?;
            for evicted in &report.evicted {
                eprintln!(
                    "hangar: bundle cache full: evicted bundle {evicted} (least recently used)"
                );
            }
            if let Some(warning) = &report.over_limit {
                eprintln!("hangar: warning: {warning}");
            }
            for damaged in &report.damaged {
                eprintln!("hangar: warning: {damaged}");
            }
            if global.json {
                print_json(&report)?;
            } else {
                println!(
                    "{}{} kernel sha256:{} rootfs sha256:{}",
                    hangar::manager::BUNDLE_PREFIX,
                    report.bundle.bundle_id,
                    report.bundle.kernel.sha256,
                    report.bundle.rootfs.sha256
                );
            }
        }
        ImageCommand::Add { .. } => {
            anyhow::bail!("give a disk image (FILE|URL) or --manifest FILE|URL")
        }
        ImageCommand::Ls => {
            let images = manager.images()?;
            let (bundles, damaged) = manager.scan_bundles()?;
            for damaged in &damaged {
                eprintln!("hangar: warning: {damaged}");
            }
            if global.json {
                let mut list: Vec<_> = images
                    .iter()
                    .map(|(names, record)| serde_json::json!({"names": names, "image": record}))
                    .collect();
                list.extend(bundles.iter().map(|bundle| {
                    serde_json::json!({
                        "names": [format!("{}{}", hangar::manager::BUNDLE_PREFIX, bundle.bundle_id)],
                        "bundle": bundle,
                    })
                }));
                list.extend(manager.disk_images()?.iter().map(|disk| {
                    serde_json::json!({
                        "names": [format!("{}{}", hangar::manager::DISK_PREFIX, disk.name)],
                        "disk": disk,
                    })
                }));
                return print_json(&list).map(|()| 0);
            }
            let bundle_rows = bundles.iter().map(|bundle| {
                vec![
                    format!("{}{}", hangar::manager::BUNDLE_PREFIX, bundle.bundle_id),
                    short_digest(&bundle.rootfs.sha256),
                    format!(
                        "{:.1} MB",
                        (bundle.kernel.size + bundle.rootfs.size) as f64 / 1e6
                    ),
                    bundle.added_at.format("%Y-%m-%d %H:%M").to_string(),
                ]
            });
            let disk_rows: Vec<Vec<String>> = manager
                .disk_images()?
                .iter()
                .map(|disk| {
                    vec![
                        format!("{}{}", hangar::manager::DISK_PREFIX, disk.name),
                        short_digest(&disk.sha256),
                        format!("{:.1} MB", disk.file_size as f64 / 1e6),
                        disk.added_at.format("%Y-%m-%d %H:%M").to_string(),
                    ]
                })
                .collect();
            let rows = images
                .iter()
                .map(|(names, record)| {
                    vec![
                        if names.is_empty() {
                            "<none>".to_owned()
                        } else {
                            names.join(",")
                        },
                        short_digest(&record.manifest_digest),
                        format!("{:.1} MB", record.size as f64 / 1e6),
                        record.imported_at.format("%Y-%m-%d %H:%M").to_string(),
                    ]
                })
                .chain(bundle_rows)
                .chain(disk_rows)
                .collect();
            print_rows(&["NAME", "DIGEST", "SIZE", "IMPORTED"], rows)?;
        }
        ImageCommand::Inspect { reference } => {
            if let Some(id) = reference.strip_prefix(hangar::manager::BUNDLE_PREFIX) {
                print_json(&manager.bundle(id)?)?;
            } else if let Some(name) = reference.strip_prefix(hangar::manager::DISK_PREFIX) {
                print_json(&manager.disk_image(name)?)?;
            } else {
                print_json(&manager.image(&reference)?)?;
            }
        }
        ImageCommand::Gc => {
            let report = manager.gc_images()?;
            if global.json {
                print_json(&report)?;
            } else {
                println!(
                    "removed {} blobs ({:.1} MB) and {} leftovers",
                    report.blobs_removed,
                    report.bytes_freed as f64 / 1e6,
                    report.scratch_removed
                );
            }
        }
        ImageCommand::Rm { reference } => {
            let digest = manager.remove_image(&reference)?;
            if global.json {
                print_json(&serde_json::json!({"removed": reference, "digest": digest}))?;
            } else {
                println!("{reference}");
            }
        }
    }
    Ok(0)
}

/// Left-aligned columns as wide as their widest cell.
pub(super) fn print_rows(header: &[&str], rows: Vec<Vec<String>>) -> anyhow::Result<()> {
    use std::io::Write;
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let mut out = std::io::stdout().lock();
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(header).chain(rows) {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        writeln!(out, "{}", line.join("  ").trim_end())?;
    }
    Ok(())
}

pub fn pull(global: &Global, args: PullArgs) -> anyhow::Result<u8> {
    let credentials = match args.username {
        Some(user) => {
            let mut password = String::new();
            std::io::stdin().read_line(&mut password)?;
            Some((user, password.trim_end_matches(['\n', '\r']).to_owned()))
        }
        None => None,
    };
    let options = hangar::image::pull::PullOptions {
        insecure_registries: args.insecure_registries,
        credentials,
    };
    let manager = open(global)?;
    let bar = PullBar::new(&args.reference, global.json);
    let pulled = manager.pull_image(&args.reference, &options, &mut |event| bar.on(event));
    bar.finish();
    let (name, record) = pulled?;
    if global.json {
        print_json(&serde_json::json!({"name": name, "image": record}))?;
    } else {
        println!("{name} {}", record.manifest_digest);
    }
    Ok(0)
}

/// A byte progress bar for a pull on a terminal; nothing otherwise.
struct PullBar {
    bar: Option<indicatif::ProgressBar>,
    reference: String,
}

impl PullBar {
    /// `reference` is shown redacted (a URL may carry a token).
    fn new(reference: &str, json: bool) -> Self {
        use std::io::IsTerminal;
        let reference = hangar::image::fetch::redact_url(reference);
        let bar = (!json && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar
        });
        Self { bar, reference }
    }

    fn on(&self, event: hangar::image::pull::PullEvent) {
        use hangar::image::pull::PullEvent;
        let Some(bar) = &self.bar else { return };
        match event {
            PullEvent::Step(step) => bar.set_message(format!("{}: {step}", self.reference)),
            PullEvent::Total(total) => bar.set_length(total),
            PullEvent::Bytes(n) => bar.inc(n),
        }
    }

    fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}

fn short_digest(digest: &str) -> String {
    digest
        .strip_prefix("sha256:")
        .unwrap_or(digest)
        .chars()
        .take(12)
        .collect()
}
