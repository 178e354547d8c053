//! `bench`: performance against a baseline measured in the same run.
//! - `boot`: `hangar run -- true` vs raw QEMU booting the same kernel and
//!   initramfs to a marker line.
//! - `store`: `hangar ps` over N records vs a raw row scan; create -> rm of
//!   parallel processes vs the same operations run one after another.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::open;
use crate::cli::{BenchArgs, BenchWhat, Global};
use crate::output::print_json;

pub fn bench(global: &Global, args: BenchArgs) -> anyhow::Result<u8> {
    match args.what {
        BenchWhat::Boot { runs } => boot(global, runs),
        BenchWhat::Store { records, storm } => store(global, records, storm),
        BenchWhat::Exec { runs, megabytes } => super::bench_exec::exec(global, runs, megabytes),
        BenchWhat::Ssh { image, runs } => super::bench_ssh::ssh(global, &image, runs),
        BenchWhat::Image { megabytes } => image(global, megabytes.max(1)),
        BenchWhat::Snapshot { runs, forks } => super::bench_snapshot::snapshot(global, runs, forks),
    }
}

fn boot(global: &Global, runs: usize) -> anyhow::Result<u8> {
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    let mut manager = open(global)?;
    let accel = manager.accelerator()?;
    let baseline_samples = (0..runs)
        .map(|_| hangar::bench::raw_qemu_boot(&mut manager))
        .collect::<Result<Vec<_>, _>>()?;
    let mut hangar_samples = Vec::new();
    for _ in 0..runs {
        let args = ["--accel", &accel.accel.to_string(), "run", "--", "true"];
        hangar_samples.push(time_hangar(manager.layout().root(), &args)?);
    }
    let baseline = median(&baseline_samples);
    let hangar = median(&hangar_samples);
    let ratio = ratio(hangar, baseline);
    if global.json {
        print_json(&serde_json::json!({
            "accelerator": accel.accel,
            "runs": runs,
            "raw_qemu_to_marker_median_ms": baseline.as_millis(),
            "hangar_run_true_median_ms": hangar.as_millis(),
            "ratio": ratio,
        }))?;
    } else {
        println!("accelerator: {} ({runs} runs each)", accel.accel);
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

fn store(global: &Global, records: usize, storm: usize) -> anyhow::Result<u8> {
    let dir = tempfile::tempdir().context("creating a scratch state dir")?;
    let ps_state = dir.path().join("ps");
    hangar::bench::seed_noop_records(&ps_state, records)?;
    let (rows, raw) = hangar::bench::raw_row_scan(&ps_state)?;
    let median_of = |args: &[&str]| -> anyhow::Result<Duration> {
        let samples = (0..5)
            .map(|_| time_hangar(&ps_state, args))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(median(&samples))
    };
    let ps = median_of(&["ps", "-a"])?;
    let ps_json = median_of(&["ps", "-a", "--json"])?;

    let storm_state = dir.path().join("storm");
    let sequential = time_sequential(&storm_state, storm.min(20))?;
    let parallel = time_storm(&storm_state, storm)?;
    let seq_rate = storm.min(20) as f64 / sequential.as_secs_f64();
    let par_rate = storm as f64 / parallel.as_secs_f64();
    if global.json {
        print_json(&serde_json::json!({
            "records": rows,
            "raw_row_scan_ms": raw.as_secs_f64() * 1000.0,
            "ps_all_median_ms": ps.as_secs_f64() * 1000.0,
            "ps_all_json_median_ms": ps_json.as_secs_f64() * 1000.0,
            "ps_ratio_to_raw_scan": ratio(ps, raw),
            "storm_processes": storm,
            "sequential_create_rm_per_s": seq_rate,
            "parallel_create_rm_per_s": par_rate,
        }))?;
    } else {
        println!("records: {rows}");
        println!(
            "raw row scan (no decoding)      {:>8.1} ms",
            raw.as_secs_f64() * 1000.0
        );
        println!(
            "hangar ps -a (process)          {:>8.1} ms  ({:.1}x the scan; goal < 100 ms)",
            ps.as_secs_f64() * 1000.0,
            ratio(ps, raw)
        );
        println!(
            "hangar ps -a --json (process)   {:>8.1} ms  ({:.1}x the scan)",
            ps_json.as_secs_f64() * 1000.0,
            ratio(ps_json, raw)
        );
        println!("create -> rm, one at a time     {seq_rate:>8.1} VMs/s");
        println!(
            "create -> rm, {storm} in parallel  {par_rate:>8.1} VMs/s  ({:.2}x)",
            par_rate / seq_rate
        );
    }
    Ok(0)
}

/// Wall time of one `hangar` process, which must succeed.
pub fn time_hangar(state: &Path, args: &[&str]) -> anyhow::Result<Duration> {
    let exe = std::env::current_exe().context("locating the hangar binary")?;
    let started = Instant::now();
    let status = Command::new(exe)
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .status()
        .with_context(|| format!("running hangar {}", args.join(" ")))?;
    if !status.success() {
        bail!("hangar {} failed with {status}", args.join(" "));
    }
    Ok(started.elapsed())
}

/// `n` create + rm pairs, one process after another.
fn time_sequential(state: &Path, n: usize) -> anyhow::Result<Duration> {
    let started = Instant::now();
    for i in 0..n {
        let name = format!("seq{i}");
        time_hangar(state, &["create", "--name", &name, "--backend", "noop"])?;
        time_hangar(state, &["rm", &name])?;
    }
    Ok(started.elapsed())
}

/// `n` processes at once, each creating then removing its own VM.
fn time_storm(state: &Path, n: usize) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let state = state.to_path_buf();
            std::thread::spawn(move || {
                let name = format!("par{i}");
                time_hangar(&state, &["create", "--name", &name, "--backend", "noop"])?;
                time_hangar(&state, &["rm", &name])
            })
        })
        .collect();
    for handle in handles {
        handle
            .join()
            .map_err(|_| anyhow::anyhow!("storm thread panicked"))??;
    }
    Ok(started.elapsed())
}

pub fn median(samples: &[Duration]) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}

/// How many times `b` fits in `a` (a ratio against a baseline).
pub fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-9)
}

/// `bench image`: a cold `hangar pull` (download, verify, unpack, ext4)
/// against doing the same by hand with skopeo, tar and mkfs.ext4, from one
/// local registry in the same run; then the image work of a later run.
fn image(global: &Global, megabytes: u64) -> anyhow::Result<u8> {
    use hangar::bench_image::{by_hand, write_layout, LocalRegistry};
    let work = tempfile::tempdir()?;
    let layout = work.path().join("layout");
    write_layout(&layout, megabytes)?;
    let registry = LocalRegistry::start(work.path())?;
    let name = registry.push(&layout, "bench/image:1")?;
    let baseline = by_hand(&name, work.path(), megabytes)?;
    let manager = hangar::Manager::open(hangar::ManagerOptions {
        state_dir: Some(work.path().join("state")),
        accel: Some(hangar::Accel::Tcg),
    })?;
    let started = Instant::now();
    manager.pull_image(&name, &Default::default(), &mut |_| {})?;
    let hangar_time = started.elapsed();
    let cached: Vec<Duration> = (0..20)
        .map(|_| {
            let started = Instant::now();
            manager.image_rootfs(&name).map(|_| started.elapsed())
        })
        .collect::<Result<_, _>>()?;
    let cached_ms = median(&cached).as_secs_f64() * 1000.0;
    let mb = megabytes as f64;
    let (base_rate, hangar_rate) = (mb / baseline.as_secs_f64(), mb / hangar_time.as_secs_f64());
    if global.json {
        print_json(&serde_json::json!({
            "megabytes": megabytes,
            "by_hand_ms": baseline.as_millis(),
            "hangar_pull_ms": hangar_time.as_millis(),
            "by_hand_mb_per_s": base_rate,
            "hangar_mb_per_s": hangar_rate,
            "ratio": hangar_rate / base_rate,
            "second_run_image_work_median_ms": cached_ms,
        }))?;
    } else {
        println!("{megabytes} MB image, pulled from a local registry");
        println!(
            "skopeo copy + tar -x + mkfs.ext4 -d   {:>7} ms  {base_rate:>6.1} MB/s",
            baseline.as_millis()
        );
        println!(
            "hangar pull (verify, unpack, ext4)     {:>7} ms  {hangar_rate:>6.1} MB/s  ({:.2}x)",
            hangar_time.as_millis(),
            hangar_rate / base_rate
        );
        println!("image work of a later run (median)     {cached_ms:>7.2} ms");
    }
    Ok(0)
}
