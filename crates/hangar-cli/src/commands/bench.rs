//! `bench`: boot time of `hangar run -- true` against raw QEMU booting the
//! same kernel and initramfs to a marker line, medians and their ratio from
//! one run.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::open;
use crate::cli::{BenchArgs, Global};
use crate::output::print_json;

pub fn bench(global: &Global, args: BenchArgs) -> anyhow::Result<u8> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let mut manager = open(global)?;
    let accel = manager.accelerator()?;
    let baseline_samples = (0..args.runs)
        .map(|_| hangar::bench::raw_qemu_boot(&mut manager))
        .collect::<Result<Vec<_>, _>>()?;
    let exe = std::env::current_exe().context("locating the hangar binary")?;
    let mut hangar_samples = Vec::new();
    for _ in 0..args.runs {
        let mut command = Command::new(&exe);
        command.arg("--state-dir").arg(manager.layout().root());
        command.args(["--accel", &accel.accel.to_string(), "run", "--", "true"]);
        let started = Instant::now();
        let status = command
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .status()
            .context("running hangar run -- true")?;
        if !status.success() {
            bail!("hangar run -- true failed with {status}");
        }
        hangar_samples.push(started.elapsed());
    }
    let baseline = median(&baseline_samples);
    let hangar = median(&hangar_samples);
    let ratio = hangar.as_secs_f64() / baseline.as_secs_f64();
    if global.json {
        print_json(&serde_json::json!({
            "accelerator": accel.accel,
            "runs": args.runs,
            "raw_qemu_to_marker_median_ms": baseline.as_millis(),
            "hangar_run_true_median_ms": hangar.as_millis(),
            "ratio": ratio,
        }))?;
    } else {
        println!("accelerator: {} ({} runs each)", accel.accel, args.runs);
        println!(
            "raw QEMU boot to marker   median {:>6} ms",
            baseline.as_millis()
        );
        println!(
            "hangar run -- true        median {:>6} ms",
            hangar.as_millis()
        );
        println!("ratio hangar / raw QEMU   {ratio:.2}x");
    }
    Ok(0)
}

fn median(samples: &[Duration]) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}
