//! From a VM record to what the backend boots: kernel or firmware, root
//! disk, seed, kernel command line, accelerator.

use super::{Manager, ManagerError};
use crate::backend::machine::{self, MachineShape};
use crate::backend::{LaunchPlan, RootDisk};
use crate::image::disk::DiskFormat;
use crate::record::{Accel, BackendKind, VmRecord};
use crate::spec::ImageSource;

impl Manager {
    /// Resolves image and accelerator into what the backend boots.
    pub(super) fn plan(&mut self, record: &VmRecord) -> Result<LaunchPlan, ManagerError> {
        let seed = super::seed_path(&record.work_dir);
        let seed = (!record.first_booted && seed.is_file()).then_some(seed);
        let mut plan = LaunchPlan {
            kernel: None,
            initramfs: None,
            root_disk: None,
            seed,
            cmdline: String::new(),
            cpus: record.spec.cpus,
            memory: record.spec.memory,
            accel: Accel::Tcg,
            guest_memory: crate::backend::GuestMemory::Own,
            incoming: false,
            machine: None,
        };
        if record.backend == BackendKind::Noop {
            return Ok(plan);
        }
        plan.accel = self.accelerator()?.accel;
        if let Some(boot) = &record.boot {
            // From a snapshot: what the snapshot booted, under this VM's
            // name (for a cold start; a restore replaces the whole guest).
            plan.kernel = boot.kernel.clone();
            plan.initramfs = boot.initramfs.clone();
            plan.cmdline = with_hostname(&boot.cmdline, &record.name);
            plan.root_disk = boot.root_disk.as_ref().map(|disk| RootDisk {
                base: disk.path.clone(),
                format: disk.format,
                read_only: disk.read_only,
                size: record.spec.disk_size.map(|size| size.0),
            });
            plan.machine = room_to_grow(record, &plan);
            return Ok(plan);
        }
        let mut bundle_args = None;
        let (image, root_disk) = match &record.spec.image {
            ImageSource::Default => (self.default_image()?, None),
            // The default kernel and agent initramfs, switching root into
            // the image's file system.
            ImageSource::Oci { reference } => {
                let root = RootDisk {
                    base: self.image_rootfs(reference)?,
                    format: DiskFormat::Raw,
                    read_only: false,
                    size: None,
                };
                (self.default_image()?, Some(root))
            }
            // The bundle's kernel with the agent initramfs, switching root
            // into the bundle's file system.
            ImageSource::Bundle { id } => {
                let boot = self.bundle_boot(id)?;
                let mut image = self.default_image()?;
                image.kernel = boot.kernel;
                bundle_args = Some(boot.cmdline_extra);
                (image, Some(boot.root_disk))
            }
            // Firmware boots the disk; the image brings its own kernel.
            ImageSource::Disk { name } => {
                let catalog = self.disk_catalog();
                let disk = catalog.require(name)?;
                let size = record.spec.disk_size.map(|size| size.0);
                if let Some(size) = size.filter(|size| *size < disk.virtual_size) {
                    return Err(ManagerError::Config(format!(
                        "--disk {} is smaller than image disk:{name} ({} bytes); give at least its size",
                        crate::size::ByteSize(size),
                        disk.virtual_size
                    )));
                }
                plan.root_disk = Some(RootDisk {
                    base: catalog.disk_path(name),
                    format: disk.format,
                    read_only: false,
                    size,
                });
                return Ok(plan);
            }
            other => {
                return Err(ManagerError::UnknownImage {
                    reference: format!("{other:?}"),
                })
            }
        };
        let mut cmdline = format!(
            "{} hangar.hostname={}",
            crate::image::default_image::KERNEL_CMDLINE,
            record.name
        );
        if record.spec.vsock {
            // The agent loads the vsock modules and listens on vsock too.
            cmdline.push_str(" hangar.vsock=1");
        }
        match bundle_args {
            Some(args) => {
                cmdline.push(' ');
                cmdline.push_str(&args);
            }
            None if root_disk.is_some() => cmdline.push_str(" hangar.root=/dev/vda"),
            None => {}
        }
        if matches!(record.spec.network, crate::spec::NetworkSpec::User { .. }) {
            // The agent gives eth0 user-mode networking's fixed address.
            cmdline.push_str(" hangar.net=user");
        }
        // Before the user's arguments, which may override them.
        let tcg = plan.accel == Accel::Tcg;
        for arg in machine::kernel_args(tcg, machine::host_mhz()) {
            cmdline.push(' ');
            cmdline.push_str(&arg);
        }
        for arg in &record.spec.kernel_args {
            cmdline.push(' ');
            cmdline.push_str(arg);
        }
        plan.kernel = Some(image.kernel);
        plan.initramfs = Some(image.initramfs);
        plan.root_disk = root_disk;
        plan.cmdline = cmdline;
        plan.machine = room_to_grow(record, &plan);
        Ok(plan)
    }
}

/// Room for more vCPUs and memory, for kernels booted with the arguments
/// that make it cheap (firmware boots get none: their kernel's command
/// line is the image's).
fn room_to_grow(record: &VmRecord, plan: &LaunchPlan) -> Option<MachineShape> {
    (plan.kernel.is_some() && machine::cmdline_allows_growth(&plan.cmdline))
        .then(|| MachineShape::for_boot(record.spec.cpus, record.spec.memory))
}

/// `cmdline` with its `hangar.hostname=` set to `name`.
fn with_hostname(cmdline: &str, name: &str) -> String {
    let mut words: Vec<String> = cmdline
        .split_whitespace()
        .filter(|word| !word.starts_with("hangar.hostname="))
        .map(str::to_owned)
        .collect();
    words.push(format!("hangar.hostname={name}"));
    words.join(" ")
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_saved_cmdline_gets_the_new_name() {
        assert_eq!(
            super::with_hostname("console=ttyS0 hangar.hostname=web quiet", "web-2"),
            "console=ttyS0 quiet hangar.hostname=web-2"
        );
    }
}
