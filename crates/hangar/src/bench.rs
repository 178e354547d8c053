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
