//! Measurements for `hangar bench`: the raw-QEMU baseline lives here so the
//! CLI only times and prints.

use std::time::Duration;

use crate::backend::qemu::accel::boot_to_marker;
use crate::manager::{Manager, ManagerError};

/// How long one baseline boot may take.
pub const BASELINE_TIMEOUT: Duration = Duration::from_secs(60);

/// One raw QEMU boot of the default image to the agent's first console line,
/// with the accelerator Hangar would use.
pub fn raw_qemu_boot(manager: &mut Manager) -> Result<Duration, ManagerError> {
    let accel = manager.accelerator()?.accel;
    let inputs = manager.probe_inputs()?;
    boot_to_marker(&inputs, accel, BASELINE_TIMEOUT).map_err(ManagerError::Config)
}

/// Fills the store under `state_dir` with `count` noop VM records in one
/// transaction (no work dirs: `ps` does not read them).
pub fn seed_noop_records(state_dir: &std::path::Path, count: usize) -> Result<(), ManagerError> {
    use crate::record::{BackendKind, VmRecord};
    let layout = crate::layout::Layout::at(state_dir.to_path_buf())?;
    let mut store = crate::store::Store::open(&layout.database())?;
    let records: Vec<VmRecord> = (0..count)
        .map(|i| {
            let mut spec = crate::spec::VmSpec::new(format!("bench-{i}"));
            spec.labels.insert("bench".into(), "store".into());
            let id = format!("{i:012x}");
            let dir = layout.vm_dir(&id);
            VmRecord::new(id, spec, BackendKind::Noop, dir)
        })
        .collect();
    store.insert_batch(&records)?;
    Ok(())
}

/// Time to read every row without decoding it (the baseline for `ps`).
pub fn raw_row_scan(state_dir: &std::path::Path) -> Result<(usize, Duration), ManagerError> {
    let layout = crate::layout::Layout::at(state_dir.to_path_buf())?;
    let store = crate::store::Store::open(&layout.database())?;
    let started = std::time::Instant::now();
    let n = store.count_raw()?;
    Ok((n, started.elapsed()))
}

/// `len` bytes that do not compress (xorshift64 from `seed`, never 0):
/// payloads for throughput benchmarks, cheap to make.
pub fn incompressible_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut data = vec![0u8; len];
    for chunk in data.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let n = chunk.len();
        chunk.copy_from_slice(&state.to_le_bytes()[..n]);
    }
    data
}
