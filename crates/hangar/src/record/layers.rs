//! A VM's writable disk layers across snapshots.
//!
//! A snapshot freezes each writable layer and QEMU goes on in a new one
//! (`root-<snapshot id>.qcow2`, `data-<index>-<snapshot id>.qcow2`). The
//! record is told before the freeze (`freezing`) and follows after it. If
//! that second write is lost (a full disk, a killed hangar), the next start
//! or snapshot still finds the layers QEMU wrote: a new layer exists only
//! if QEMU made it, and it always sits on the old one, so taking it never
//! loses a write.

use super::VmRecord;

impl VmRecord {
    /// The root disk's layer after the freeze of snapshot `snapshot_id`.
    pub fn next_root_layer(snapshot_id: &str) -> String {
        format!("root-{snapshot_id}.qcow2")
    }

    /// Data disk `index`'s layer after the freeze of snapshot `snapshot_id`.
    pub fn next_data_layer(index: usize, snapshot_id: &str) -> String {
        format!("data-{index}-{snapshot_id}.qcow2")
    }

    /// Takes the new layers the freeze of snapshot `snapshot_id` made (each
    /// that exists is now its disk's writable layer) and ends that freeze
    /// if it is the one under way.
    pub fn adopt_frozen_layers_of(&mut self, snapshot_id: &str) {
        let root = Self::next_root_layer(snapshot_id);
        if self.work_dir.join(&root).is_file() {
            self.root_layer = Some(root);
        }
        let saved_data_disks = self.boot.as_ref().map_or(0, |boot| boot.data_disks.len());
        for index in 0..self.spec.data_disks.len().max(saved_data_disks) {
            let data = Self::next_data_layer(index, snapshot_id);
            if self.work_dir.join(&data).is_file() {
                self.data_layers.insert(index, data);
            }
        }
        if self.freezing.as_deref() == Some(snapshot_id) {
            self.freezing = None;
        }
    }

    /// Ends a freeze left under way (`freezing`) by a snapshot whose record
    /// update was lost. Only where no other process can be in the middle
    /// of that freeze: under the snapshot lock, or with no VMM running.
    /// True if there was one.
    pub fn adopt_frozen_layers(&mut self) -> bool {
        let Some(id) = self.freezing.clone() else {
            return false;
        };
        self.adopt_frozen_layers_of(&id);
        true
    }
}

#[cfg(test)]
mod tests {
    use crate::record::{BackendKind, VmRecord};
    use crate::size::ByteSize;
    use crate::spec::{DataDisk, VmSpec};

    fn vm_with_two_data_disks(dir: &std::path::Path) -> VmRecord {
        let mut spec = VmSpec::new("web");
        let disk = DataDisk {
            size: Some(ByteSize(1 << 20)),
            path: None,
            read_only: false,
        };
        spec.data_disks = vec![disk.clone(), disk];
        VmRecord::new("0123456789ab".into(), spec, BackendKind::Qemu, dir.into())
    }

    #[test]
    fn a_lost_record_update_after_a_freeze_is_found_from_the_layers() {
        let dir = tempfile::tempdir().unwrap();
        let mut vm = vm_with_two_data_disks(dir.path());
        vm.root_layer = Some(VmRecord::next_root_layer("aaaaaaaaaaaa"));
        vm.freezing = Some("bbbbbbbbbbbb".into());
        // Only these two new layers exist (say QEMU died in the
        // transaction after making them).
        for name in ["root-bbbbbbbbbbbb.qcow2", "data-1-bbbbbbbbbbbb.qcow2"] {
            std::fs::write(dir.path().join(name), b"qcow2").unwrap();
        }
        assert!(vm.adopt_frozen_layers());
        assert_eq!(vm.root_layer.as_deref(), Some("root-bbbbbbbbbbbb.qcow2"));
        assert_eq!(
            vm.data_layer_path(1),
            dir.path().join("data-1-bbbbbbbbbbbb.qcow2")
        );
        assert_eq!(vm.data_layer_path(0), dir.path().join("data-0.qcow2"));
        assert_eq!(vm.freezing, None);
        assert!(!vm.adopt_frozen_layers(), "nothing left to adopt");
    }

    #[test]
    fn a_snapshot_takes_its_own_layers_even_if_its_freeze_was_ended_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let mut vm = vm_with_two_data_disks(dir.path());
        std::fs::write(dir.path().join("root-bbbbbbbbbbbb.qcow2"), b"qcow2").unwrap();
        vm.freezing = Some("cccccccccccc".into());
        vm.adopt_frozen_layers_of("bbbbbbbbbbbb");
        assert_eq!(vm.root_layer.as_deref(), Some("root-bbbbbbbbbbbb.qcow2"));
        assert_eq!(
            vm.freezing.as_deref(),
            Some("cccccccccccc"),
            "another snapshot's freeze is not ended by this one"
        );
    }

    #[test]
    fn a_freeze_that_never_happened_changes_no_layer() {
        let dir = tempfile::tempdir().unwrap();
        let mut vm = vm_with_two_data_disks(dir.path());
        vm.freezing = Some("bbbbbbbbbbbb".into());
        assert!(vm.adopt_frozen_layers());
        assert_eq!(vm.root_layer_path(), dir.path().join("root.qcow2"));
        assert!(vm.data_layers.is_empty());
        assert_eq!(vm.freezing, None);
    }
}
