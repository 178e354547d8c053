//! Measurements for `hangar bench`: the raw-QEMU baseline lives here so the
//! CLI only times and prints.

use std::time::Duration;

use crate::backend::qemu::accel::{boot_to_marker, ProbeInputs};
use crate::manager::{Manager, ManagerError};

/// How long one baseline boot may take.
pub const BASELINE_TIMEOUT: Duration = Duration::from_secs(60);

/// One raw QEMU boot of the default image to the agent's first console line,
/// with the accelerator Hangar would use.
pub fn raw_qemu_boot(manager: &mut Manager) -> Result<Duration, ManagerError> {
    let image = manager.default_image()?;
    let accel = manager.accelerator()?.accel;
    let qemu = manager.qemu_binary()?;
    let bios = manager.qemu_bios();
    let inputs = ProbeInputs {
        qemu: &qemu,
        bios: bios.as_deref(),
        kernel: &image.kernel,
        initramfs: &image.initramfs,
        image_key: &image.key,
    };
    boot_to_marker(&inputs, accel, BASELINE_TIMEOUT).map_err(ManagerError::Config)
}
