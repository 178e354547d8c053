//! `bench ssh`: what the agent saves over SSH, on the same host in one run.
//! A VM from a cloud disk image (reached over SSH, as Lima and vm-manager
//! reach theirs) against a VM from the default image (the agent):
//! - start -> ready (SSH: the key accepted and cloud-init done; agent: its
//!   hello);
//! - a whole `hangar exec VM -- true` process, N times each.

use std::time::{Duration, Instant};

use anyhow::bail;
use hangar::spec::ImageSource;
use hangar::{BackendKind, Manager, VmSpec};

use super::bench::{median, ratio, time_hangar};
use super::open;
use crate::cli::Global;
use crate::output::print_json;

/// One side of the comparison.
struct Side {
    ready: Duration,
    execs: Vec<Duration>,
}

pub fn ssh(global: &Global, image: &str, runs: usize) -> anyhow::Result<u8> {
    let source = hangar::manager::parse_image(image)?;
    if !matches!(source, ImageSource::Disk { .. }) {
        bail!("--image {image:?}: give a cloud disk image as disk:NAME (add one with `hangar image add FILE --name NAME`)");
    }
    if runs == 0 {
        bail!("--runs must be at least 1");
    }
    let mut manager = open(global)?;
    let suffix = hangar::manager::new_id()?;
    let ssh_name = format!("bench-ssh-{suffix}");
    let agent_name = format!("bench-agent-{suffix}");
    let mut ssh_spec = VmSpec::new(&ssh_name);
    ssh_spec.image = source;
    ssh_spec.cpus = 2;
    ssh_spec.memory = hangar::ByteSize(512 << 20);
    let mut agent_spec = VmSpec::new(&agent_name);
    agent_spec.cpus = 2;
    agent_spec.memory = hangar::ByteSize(512 << 20);
    let result = measure(global, &mut manager, &ssh_name, ssh_spec, runs).and_then(|ssh| {
        let agent = measure(global, &mut manager, &agent_name, agent_spec, runs)?;
        Ok((ssh, agent))
    });
    for name in [&ssh_name, &agent_name] {
        let _ = manager.remove(None, name, true);
    }
    let (ssh, agent) = result?;
    report(global, image, runs, &ssh, &agent)?;
    Ok(0)
}

fn measure(
    global: &Global,
    manager: &mut Manager,
    name: &str,
    spec: VmSpec,
    runs: usize,
) -> anyhow::Result<Side> {
    manager.create(spec, BackendKind::Qemu)?;
    let started = Instant::now();
    manager.start(None, name)?;
    let ready = started.elapsed();
    let state = manager.layout().root().to_path_buf();
    if !global.json {
        eprintln!("{name}: ready in {:.1} s", ready.as_secs_f64());
    }
    let execs = (0..runs)
        .map(|_| time_hangar(&state, &["exec", name, "--", "true"]))
        .collect::<anyhow::Result<Vec<_>>>()?;
    manager.remove(None, name, true)?;
    Ok(Side { ready, execs })
}

fn report(
    global: &Global,
    image: &str,
    runs: usize,
    ssh: &Side,
    agent: &Side,
) -> anyhow::Result<()> {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let (ssh_exec, agent_exec) = (median(&ssh.execs), median(&agent.execs));
    let exec_ratio = ratio(ssh_exec, agent_exec);
    let ready_ratio = ratio(ssh.ready, agent.ready);
    if global.json {
        print_json(&serde_json::json!({
            "image": image,
            "runs": runs,
            "ssh": { "ready_ms": ms(ssh.ready), "exec_true_median_ms": ms(ssh_exec) },
            "agent": { "ready_ms": ms(agent.ready), "exec_true_median_ms": ms(agent_exec) },
            "exec_ratio": exec_ratio,
            "ready_ratio": ready_ratio,
        }))?;
        return Ok(());
    }
    println!(
        "SSH guest ({image}) against the agent (default image), 2 vCPUs, 512 MiB, {runs} runs"
    );
    println!(
        "start -> ready          SSH {:>9.0} ms   agent {:>7.0} ms   {ready_ratio:>6.1}x",
        ms(ssh.ready),
        ms(agent.ready)
    );
    println!(
        "hangar exec -- true     SSH {:>9.1} ms   agent {:>7.1} ms   {exec_ratio:>6.1}x (medians)",
        ms(ssh_exec),
        ms(agent_exec)
    );
    Ok(())
}
