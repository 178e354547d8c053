//! `bench exec`: on one running VM,
//! - round trip of `true` on an open agent session (the protocol's floor)
//!   against a whole `hangar exec -- true` process;
//! - streaming N MB from guest stdout against the guest writing the same
//!   bytes to /dev/null (what the channel adds);
//! - 16 `hangar exec` processes at once against 16 one after another;
//! - `cp` of an N MB file into and out of the guest, against the stdout
//!   stream above.

use std::time::{Duration, Instant};

use anyhow::Context;
use hangar::guest::{CollectSink, OutputSink};
use hangar::{BackendKind, ExecRequest, VmSpec};

use super::bench::{median, time_hangar};
use super::open;
use crate::cli::Global;
use crate::output::print_json;

/// Counts bytes without keeping them.
#[derive(Default)]
struct CountSink(u64);

impl OutputSink for CountSink {
    fn on_stdout(&mut self, chunk: &[u8]) {
        self.0 += chunk.len() as u64;
    }
    fn on_stderr(&mut self, _chunk: &[u8]) {}
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        ..Default::default()
    }
}

pub fn exec(global: &Global, runs: usize, megabytes: u64) -> anyhow::Result<u8> {
    let mut manager = open(global)?;
    let name = format!("bench-exec-{}", hangar::manager::new_id()?);
    let mut spec = VmSpec::new(&name);
    // Room for the copied file in the guest's RAM-backed /tmp.
    spec.memory = hangar::ByteSize(megabytes * 1024 * 1024 * 2 + (256 << 20));
    manager.create(spec, BackendKind::Qemu)?;
    let result = measure(global, &mut manager, &name, runs.max(1), megabytes.max(1));
    let _ = manager.remove(None, &name, true);
    result
}

fn measure(
    global: &Global,
    manager: &mut hangar::Manager,
    name: &str,
    runs: usize,
    megabytes: u64,
) -> anyhow::Result<u8> {
    manager.start(None, name)?;
    let state = manager.layout().root().to_path_buf();
    let mut client = manager.connect_agent(None, name)?;
    let mut no_check = || Ok(());
    let mut session = Vec::new();
    for _ in 0..runs {
        let started = Instant::now();
        client.exec(
            ExecRequest {
                argv: vec!["true".into()],
                ..Default::default()
            },
            &mut CollectSink::default(),
            &mut no_check,
        )?;
        session.push(started.elapsed());
    }
    drop(client);
    let process = (0..runs)
        .map(|_| time_hangar(&state, &["exec", name, "--", "true"]))
        .collect::<anyhow::Result<Vec<_>>>()?;

    let bytes = megabytes * 1024 * 1024;
    let mut client = manager.connect_agent(None, name)?;
    let generate = format!("head -c {bytes} /dev/zero");
    let started = Instant::now();
    client.exec(
        sh(&format!("{generate} > /dev/null")),
        &mut CountSink::default(),
        &mut no_check,
    )?;
    let in_guest = started.elapsed();
    let mut counted = CountSink::default();
    let started = Instant::now();
    client.exec(sh(&generate), &mut counted, &mut no_check)?;
    let streamed = started.elapsed();
    anyhow::ensure!(
        counted.0 == bytes,
        "streamed {} of {bytes} bytes",
        counted.0
    );
    let (copy_in, copy_out) = time_copies(&mut client, bytes)?;
    drop(client);

    let sequential = time_each(&state, name, 16, false)?;
    let parallel = time_each(&state, name, 16, true)?;
    let session_ms = median(&session).as_secs_f64() * 1000.0;
    let process_ms = median(&process).as_secs_f64() * 1000.0;
    let mb = megabytes as f64;
    let (guest_rate, stream_rate) = (mb / in_guest.as_secs_f64(), mb / streamed.as_secs_f64());
    if global.json {
        print_json(&serde_json::json!({
            "exec_true_open_session_median_ms": session_ms,
            "hangar_exec_true_process_median_ms": process_ms,
            "stream_mb": megabytes,
            "guest_dev_null_mb_per_s": guest_rate,
            "guest_stdout_to_host_mb_per_s": stream_rate,
            "sixteen_sequential_ms": sequential.as_millis(),
            "sixteen_parallel_ms": parallel.as_millis(),
            "cp_into_guest_mb_per_s": mb / copy_in.as_secs_f64(),
            "cp_out_of_guest_mb_per_s": mb / copy_out.as_secs_f64(),
        }))?;
    } else {
        println!("exec -- true on an open session   median {session_ms:>8.1} ms");
        println!(
            "hangar exec -- true (process)     median {process_ms:>8.1} ms  ({:.1}x)",
            process_ms / session_ms
        );
        println!("{megabytes} MB to /dev/null in the guest   {guest_rate:>8.1} MB/s");
        println!("{megabytes} MB guest stdout -> host        {stream_rate:>8.1} MB/s  ({:.2}x of in-guest)", stream_rate / guest_rate);
        println!(
            "16 x hangar exec, one at a time   {:>8} ms",
            sequential.as_millis()
        );
        println!(
            "16 x hangar exec, all at once     {:>8} ms  ({:.1}x faster)",
            parallel.as_millis(),
            sequential.as_secs_f64() / parallel.as_secs_f64()
        );
        for (what, took) in [("into the guest", copy_in), ("out of the guest", copy_out)] {
            let rate = mb / took.as_secs_f64();
            println!(
                "{megabytes} MB cp {what:<16}   {rate:>8.1} MB/s  ({:.2}x of guest stdout)",
                rate / stream_rate
            );
        }
    }
    Ok(0)
}

/// Copies a file of `bytes` random-ish bytes into the guest and back out,
/// checks it came back whole, and returns both times.
fn time_copies(
    client: &mut hangar::guest::AgentClient,
    bytes: u64,
) -> anyhow::Result<(Duration, Duration)> {
    let dir = tempfile::tempdir()?;
    let source = dir.path().join("payload");
    let data = hangar::bench::incompressible_bytes(bytes as usize, 0x2545_f491_4f6c_dd1d);
    std::fs::write(&source, &data)?;
    let mut no_check = || Ok(());
    let started = Instant::now();
    client.copy_in(&source, "/tmp/bench-payload", &mut no_check)?;
    let copy_in = started.elapsed();
    let back = dir.path().join("back");
    let started = Instant::now();
    client.copy_out("/tmp/bench-payload", &back, &mut no_check)?;
    let copy_out = started.elapsed();
    anyhow::ensure!(
        std::fs::read(&back)? == data,
        "the copied file came back different"
    );
    client.exec(
        sh("rm /tmp/bench-payload"),
        &mut CollectSink::default(),
        &mut no_check,
    )?;
    Ok((copy_in, copy_out))
}

/// 16 `hangar exec -- sleep 0.2` processes, in parallel or in a row.
fn time_each(
    state: &std::path::Path,
    name: &str,
    n: usize,
    parallel: bool,
) -> anyhow::Result<Duration> {
    let args = ["exec", name, "--", "sleep", "0.2"];
    let started = Instant::now();
    if parallel {
        let handles: Vec<_> = (0..n)
            .map(|_| {
                let state = state.to_path_buf();
                let name = name.to_owned();
                std::thread::spawn(move || {
                    time_hangar(&state, &["exec", &name, "--", "sleep", "0.2"])
                })
            })
            .collect();
        for handle in handles {
            handle
                .join()
                .map_err(|_| anyhow::anyhow!("exec thread panicked"))??;
        }
    } else {
        for _ in 0..n {
            time_hangar(state, &args).context("sequential exec")?;
        }
    }
    Ok(started.elapsed())
}
