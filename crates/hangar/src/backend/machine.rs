//! A VM's machine shape beyond its vCPU count and RAM: the ceilings it may
//! grow to without a reboot (hot-added vCPUs and memory DIMMs) and the
//! memory added so far. A saved state loads only into a machine of the same
//! shape, so a snapshot records it, and a restore or fork grows the guest
//! after loading it: vCPUs and a DIMM are plugged in, the guest agent
//! brings them online.

use serde::{Deserialize, Serialize};

use crate::size::{ByteSize, GIB, MIB};

/// Memory is added in whole Linux memory blocks (128 MiB on x86-64 guests
/// of this size): the guest cannot use part of one.
pub const MEMORY_STEP: u64 = 128 * MIB;
/// DIMM slots a machine has: the number of times memory can be added.
pub const MEMORY_SLOTS: usize = 8;
/// The most vCPUs QEMU's q35 machine takes, and a ceiling on memory a
/// recorded shape may name (a record from an archive is checked against
/// them before QEMU sees it).
const MAX_CPUS: u32 = 288;
const MAX_MEMORY: u64 = 1 << 40;
/// Every VM may grow to at least this many vCPUs...
const MIN_MAX_CPUS: u32 = 8;
/// ...and at least this much memory (address space only: nothing is
/// allocated until a DIMM is added).
const MIN_MAX_MEMORY: u64 = 16 * GIB;

/// The ceilings a VM booted with and the memory hot-added since.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineShape {
    pub max_cpus: u32,
    pub max_memory: ByteSize,
    /// One DIMM each, in the order they were added.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub added_memory: Vec<ByteSize>,
}

/// What a restore adds to the guest it loads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Growth {
    /// The vCPU count to reach, when more than the saved guest had.
    pub cpus: Option<u32>,
    /// One more DIMM of this size.
    pub memory: Option<ByteSize>,
}

impl Growth {
    pub fn is_empty(&self) -> bool {
        self.cpus.is_none() && self.memory.is_none()
    }
}

impl MachineShape {
    /// The shape of a cold boot with `cpus` and `memory`: room to double
    /// and more, and nothing added yet.
    pub fn for_boot(cpus: u32, memory: ByteSize) -> Self {
        Self {
            max_cpus: cpus.max(MIN_MAX_CPUS),
            max_memory: ByteSize(memory.0.saturating_mul(2).max(MIN_MAX_MEMORY)),
            added_memory: Vec::new(),
        }
    }

    /// The RAM the machine booted with, of `total` (what the guest has).
    pub fn boot_memory(&self, total: ByteSize) -> ByteSize {
        ByteSize(
            total
                .0
                .saturating_sub(self.added_total().unwrap_or(u64::MAX)),
        )
    }

    /// The memory in added DIMMs; None if it does not fit in a u64.
    fn added_total(&self) -> Option<u64> {
        self.added_memory
            .iter()
            .try_fold(0u64, |sum, dimm| sum.checked_add(dimm.0))
    }

    /// What takes a guest saved with `cpus` and `memory` to the wanted
    /// counts, or why it cannot (the flag, the limit and what to give).
    pub fn growth(
        &self,
        (cpus, memory): (u32, ByteSize),
        (want_cpus, want_memory): (Option<u32>, Option<ByteSize>),
    ) -> Result<Growth, String> {
        let mut growth = Growth::default();
        if let Some(want) = want_cpus.filter(|want| *want != cpus) {
            if want < cpus {
                return Err(format!(
                    "--cpus {want}: the guest was saved with {cpus} vCPUs and cannot give any back; give {cpus} to {}",
                    self.max_cpus
                ));
            }
            if want > self.max_cpus {
                return Err(format!(
                    "--cpus {want}: its machine booted with room for {} vCPUs at most; give {cpus} to {}",
                    self.max_cpus, self.max_cpus
                ));
            }
            growth.cpus = Some(want);
        }
        if let Some(want) = want_memory.filter(|want| *want != memory) {
            if want < memory {
                return Err(format!(
                    "--memory {want}: the guest was saved with {memory} of RAM and cannot give any back; give {memory} or more"
                ));
            }
            let more = want.0 - memory.0;
            if !more.is_multiple_of(MEMORY_STEP) {
                let below = memory.0 + more / MEMORY_STEP * MEMORY_STEP;
                let above = below + MEMORY_STEP;
                let hint = match (below > memory.0, above <= self.max_memory.0) {
                    (true, true) => format!("{} or {}", ByteSize(below), ByteSize(above)),
                    (true, false) => ByteSize(below).to_string(),
                    (false, _) => ByteSize(above).to_string(),
                };
                return Err(format!(
                    "--memory {want}: memory is added in steps of 128M (a guest memory block) to the saved {memory}; give {hint}"
                ));
            }
            if want > self.max_memory {
                return Err(format!(
                    "--memory {want}: its machine booted with room for {} of RAM at most; give {memory} to {}",
                    self.max_memory,
                    ByteSize(self.largest_memory(memory))
                ));
            }
            if self.added_memory.len() >= MEMORY_SLOTS {
                return Err(format!(
                    "--memory {want}: memory was added {MEMORY_SLOTS} times already, all its slots are taken; give {memory}"
                ));
            }
            growth.memory = Some(ByteSize(more));
        }
        Ok(growth)
    }

    /// The most memory a guest saved with `memory` can grow to: the
    /// ceiling, in whole steps.
    fn largest_memory(&self, memory: ByteSize) -> u64 {
        let room = self.max_memory.0.saturating_sub(memory.0);
        memory.0 + room / MEMORY_STEP * MEMORY_STEP
    }

    /// Whether the shape fits the vCPUs and memory recorded with it and
    /// QEMU's limits (a snapshot record may come from an archive: checked
    /// before QEMU sees it).
    pub fn validate_against(&self, cpus: u32, memory: ByteSize) -> Result<(), String> {
        if cpus == 0 || cpus > self.max_cpus || self.max_cpus > MAX_CPUS {
            return Err(format!(
                "{cpus} vCPUs and a ceiling of {} (1 to {MAX_CPUS})",
                self.max_cpus
            ));
        }
        let added = self
            .added_total()
            .ok_or("its DIMMs add up to more than any machine has")?;
        if self.added_memory.len() > MEMORY_SLOTS {
            return Err(format!(
                "{} DIMMs in {MEMORY_SLOTS} slots",
                self.added_memory.len()
            ));
        }
        if self
            .added_memory
            .iter()
            .any(|m| m.0 == 0 || !m.0.is_multiple_of(MEMORY_STEP))
        {
            return Err("a DIMM is not a whole number of 128M blocks".into());
        }
        // QEMU wants the boot memory below the ceiling, both in whole MiB.
        let fits = added < memory.0
            && memory <= self.max_memory
            && memory.0 - added < self.max_memory.0
            && self.max_memory.0 <= MAX_MEMORY
            && memory.0.is_multiple_of(MIB)
            && self.max_memory.0.is_multiple_of(MIB);
        if !fits {
            return Err(format!(
                "{memory} of RAM does not fit {} added and a ceiling of {}",
                ByteSize(added),
                self.max_memory
            ));
        }
        Ok(())
    }

    /// The shape after `growth`.
    pub fn grown(&self, growth: &Growth) -> Self {
        let mut shape = self.clone();
        shape.added_memory.extend(growth.memory);
        shape
    }
}

/// The bounce buffer a guest with room for memory above 4 GiB keeps.
/// Linux sets one up whenever memory may exist above 4 GiB (a memory
/// hotplug range does): 64 MiB by default, taken from the guest's RAM and
/// initialised at boot (a quarter of a 256 MiB guest, and 13% more boot
/// instructions, measured with `-icount`). Hangar's devices are all
/// virtio, which address all memory and never bounce: 1024 slabs of 2 KiB
/// (2 MiB) are plenty.
const BOUNCE_BUFFER: &str = "swiotlb=1024";

/// Kernel arguments that let a guest booted by Hangar take hot-added
/// resources cheaply: added memory comes online on its own; a small bounce
/// buffer (see [`BOUNCE_BUFFER`]); under TCG the delay loop is preset
/// (`lpj`), because an added vCPU that calibrates its own (the guest sees
/// no constant TSC under TCG) can hang the guest while it comes online.
/// `host_mhz` is the host's TSC rate, which TCG's guest TSC follows; the
/// value assumes the guest kernel's HZ is 250 (Debian's).
pub fn kernel_args(tcg: bool, host_mhz: Option<f64>) -> Vec<String> {
    let mut args = vec![
        "memhp_default_state=online".to_owned(),
        BOUNCE_BUFFER.to_owned(),
    ];
    if let Some(mhz) = host_mhz.filter(|mhz| tcg && *mhz >= 1.0) {
        args.push(format!("lpj={}", (mhz * 1_000_000.0 / 250.0) as u64));
    }
    args
}

/// The host's TSC rate in MHz (what TCG's guest TSC runs at), from
/// /proc/cpuinfo: half the first `bogomips` (on x86 the kernel derives it
/// from the TSC rate, so frequency scaling does not move it), else the
/// first `cpu MHz` (the current clock, which it may). Read once per
/// process: the rate does not change, and /proc/cpuinfo is long on big
/// hosts.
pub fn host_mhz() -> Option<f64> {
    static RATE: std::sync::OnceLock<Option<f64>> = std::sync::OnceLock::new();
    *RATE.get_or_init(|| {
        let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
        parse_tsc_mhz(&text)
    })
}

fn parse_tsc_mhz(cpuinfo: &str) -> Option<f64> {
    let first = |name: &str| {
        cpuinfo
            .lines()
            .find_map(|line| {
                let (key, value) = line.split_once(':')?;
                (key.trim() == name).then(|| value.trim().parse::<f64>().ok())?
            })
            .filter(|value| value.is_finite() && *value > 0.0)
    };
    first("bogomips")
        .map(|b| b / 2.0)
        .or_else(|| first("cpu MHz"))
}

/// Whether a kernel boots with room to grow: only a command line made
/// with [`kernel_args`] (a firmware boot's kernel, or a snapshot's from
/// before them, would lose 64 MiB to a bounce buffer).
pub fn cmdline_allows_growth(cmdline: &str) -> bool {
    cmdline.split_whitespace().any(|word| word == BOUNCE_BUFFER)
}

/// Whether a kernel command line presets the delay loop.
pub fn presets_delay_loop(cmdline: &str) -> bool {
    cmdline
        .split_whitespace()
        .any(|word| word.starts_with("lpj="))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> MachineShape {
        MachineShape::for_boot(1, ByteSize::mib(256))
    }

    #[test]
    fn a_boot_has_room_for_eight_vcpus_and_sixteen_gib() {
        assert_eq!(shape().max_cpus, 8);
        assert_eq!(shape().max_memory, ByteSize(16 * GIB));
        let big = MachineShape::for_boot(12, ByteSize(20 * GIB));
        assert_eq!((big.max_cpus, big.max_memory), (12, ByteSize(40 * GIB)));
    }

    #[test]
    fn the_same_or_no_counts_need_no_growth() {
        let saved = (1, ByteSize::mib(256));
        assert!(shape().growth(saved, (None, None)).unwrap().is_empty());
        assert!(shape()
            .growth(saved, (Some(1), Some(ByteSize::mib(256))))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn growth_adds_vcpus_and_one_dimm_of_the_difference() {
        let growth = shape()
            .growth((1, ByteSize::mib(256)), (Some(3), Some(ByteSize::mib(768))))
            .unwrap();
        assert_eq!(growth.cpus, Some(3));
        assert_eq!(growth.memory, Some(ByteSize::mib(512)));
        let grown = shape().grown(&growth);
        assert_eq!(grown.added_memory, vec![ByteSize::mib(512)]);
        assert_eq!(grown.boot_memory(ByteSize::mib(768)), ByteSize::mib(256));
    }

    #[test]
    fn shrinking_is_refused_naming_the_flag_and_the_range() {
        let err = shape()
            .growth((2, ByteSize::mib(256)), (Some(1), None))
            .unwrap_err();
        assert!(
            err.contains("--cpus 1") && err.contains("give 2 to 8"),
            "{err}"
        );
        let err = shape()
            .growth((1, ByteSize::mib(512)), (None, Some(ByteSize::mib(256))))
            .unwrap_err();
        assert!(
            err.contains("--memory 256M") && err.contains("512M or more"),
            "{err}"
        );
    }

    #[test]
    fn growth_past_the_ceilings_is_refused() {
        let err = shape()
            .growth((1, ByteSize::mib(256)), (Some(9), None))
            .unwrap_err();
        assert!(err.contains("room for 8 vCPUs"), "{err}");
        let err = shape()
            .growth((1, ByteSize::mib(256)), (None, Some(ByteSize(17 * GIB))))
            .unwrap_err();
        assert!(
            err.contains("room for 16G") && err.contains("give 256M to 16G"),
            "{err}"
        );
        // The step hint stays under the ceiling.
        let near = MachineShape {
            max_cpus: 8,
            max_memory: ByteSize::mib(448),
            added_memory: Vec::new(),
        };
        let err = near
            .growth((1, ByteSize::mib(256)), (None, Some(ByteSize::mib(500))))
            .unwrap_err();
        assert!(
            err.contains("give 384M;") || err.ends_with("give 384M"),
            "{err}"
        );
    }

    #[test]
    fn memory_grows_in_whole_blocks() {
        let err = shape()
            .growth((1, ByteSize::mib(256)), (None, Some(ByteSize::mib(300))))
            .unwrap_err();
        assert!(
            err.contains("steps of 128M") && err.contains("give 384M"),
            "{err}"
        );
        let err = shape()
            .growth((1, ByteSize::mib(256)), (None, Some(ByteSize::mib(500))))
            .unwrap_err();
        assert!(err.contains("give 384M or 512M"), "{err}");
    }

    #[test]
    fn a_machine_with_every_slot_taken_cannot_add_memory() {
        let mut full = shape();
        full.added_memory = vec![ByteSize::mib(128); MEMORY_SLOTS];
        let saved = (1, ByteSize::mib(256 + 128 * MEMORY_SLOTS as u64));
        let err = full
            .growth(saved, (None, Some(ByteSize(saved.1 .0 + MEMORY_STEP))))
            .unwrap_err();
        assert!(err.contains("slots are taken"), "{err}");
        // vCPUs may still grow.
        assert_eq!(full.growth(saved, (Some(2), None)).unwrap().cpus, Some(2));
    }

    #[test]
    fn a_recorded_shape_must_fit_its_counts() {
        let mut grown = shape();
        assert_eq!(grown.validate_against(1, ByteSize::mib(256)), Ok(()));
        assert!(grown.validate_against(9, ByteSize::mib(256)).is_err());
        assert!(grown.validate_against(0, ByteSize::mib(256)).is_err());
        assert!(grown.validate_against(1, ByteSize(17 * GIB)).is_err());
        grown.added_memory = vec![ByteSize::mib(256)];
        assert_eq!(grown.validate_against(1, ByteSize::mib(512)), Ok(()));
        assert!(
            grown.validate_against(1, ByteSize::mib(256)).is_err(),
            "nothing left to boot with"
        );
        grown.added_memory = vec![ByteSize::mib(100)];
        assert!(grown.validate_against(1, ByteSize::mib(356)).is_err());
        // Sizes that would overflow, ceilings past QEMU's, a ceiling no
        // higher than the boot memory.
        grown.added_memory = vec![ByteSize(1 << 63), ByteSize(1 << 63)];
        assert!(grown.validate_against(1, ByteSize::mib(256)).is_err());
        let mut wild = shape();
        wild.max_cpus = 100_000;
        assert!(wild.validate_against(1, ByteSize::mib(256)).is_err());
        let mut flat = shape();
        flat.max_memory = ByteSize::mib(256);
        assert!(flat.validate_against(1, ByteSize::mib(256)).is_err());
        flat.max_memory = ByteSize((1 << 50) + (1 << 20));
        assert!(flat.validate_against(1, ByteSize::mib(256)).is_err());
    }

    #[test]
    fn tcg_boots_preset_the_delay_loop_from_the_host_clock() {
        assert_eq!(
            kernel_args(true, Some(2442.176)),
            vec!["memhp_default_state=online", "swiotlb=1024", "lpj=9768704"]
        );
        assert_eq!(
            kernel_args(false, Some(2442.0)),
            vec!["memhp_default_state=online", "swiotlb=1024"]
        );
        assert_eq!(kernel_args(true, None).len(), 2);
        let cmdline = kernel_args(false, None).join(" ");
        assert!(cmdline_allows_growth(&format!("console=ttyS0 {cmdline}")));
        assert!(!cmdline_allows_growth("console=ttyS0 swiotlb=65536"));
        assert!(presets_delay_loop("console=ttyS0 lpj=9768704 quiet"));
        assert!(!presets_delay_loop("console=ttyS0 quiet"));
    }

    #[test]
    fn the_tsc_rate_is_read_from_cpuinfo() {
        let text = "processor\t: 0\ncpu MHz\t\t: 1200.000\nbogomips\t: 4890.85\n";
        assert_eq!(parse_tsc_mhz(text), Some(2445.425));
        let text = "processor\t: 0\nmodel name\t: X\ncpu MHz\t\t: 2445.428\n";
        assert_eq!(parse_tsc_mhz(text), Some(2445.428));
        assert_eq!(parse_tsc_mhz("processor\t: 0\n"), None);
        assert_eq!(parse_tsc_mhz("cpu MHz\t: nan\n"), None);
    }
}
