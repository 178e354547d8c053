//! `gc`: after crashes (even `kill -9` of hangar at any point) leaves no
//! orphan VMM process, no orphan work dir, no VM stuck in `starting` or
//! `stopping`, and no VM of a `run` whose process is gone.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::Serialize;

use super::reconcile::kill_processes_in;
use super::{Manager, ManagerError};
use crate::backend::process;

/// Half-built images older than this belong to a build that died.
const STALE_TMP_AGE: Duration = Duration::from_secs(600);

/// What `gc` did.
#[derive(Debug, Default, Serialize)]
pub struct GcReport {
    /// VMs of dead `run` processes, removed.
    pub removed_ephemeral: Vec<String>,
    /// VMM processes no record owned, killed.
    pub killed_orphan_processes: Vec<u32>,
    /// Work dirs without a record, removed.
    pub removed_orphan_dirs: Vec<String>,
    /// Leftovers of interrupted image builds, removed.
    pub removed_tmp: Vec<String>,
    /// Snapshot folders of interrupted creates and imports, removed.
    pub removed_unfinished_snapshots: Vec<String>,
    /// RAM files of VMs without a VMM, removed.
    pub removed_ram_files: Vec<String>,
}

impl Manager {
    pub fn gc(&mut self) -> Result<GcReport, ManagerError> {
        let mut report = GcReport::default();
        // Reconciling every record finishes interrupted starts and stops
        // and records VMMs that died.
        let records = self.list()?;
        for record in &records {
            let orphaned = record
                .ephemeral_for
                .is_some_and(|owner| !process::is_running(&owner));
            if orphaned {
                self.remove(None, &record.id, true)?;
                report.removed_ephemeral.push(record.name.clone());
            }
        }
        let records = self.store.list()?;
        let known: BTreeSet<&str> = records.iter().map(|r| r.id.as_str()).collect();
        let live_pids: BTreeSet<u32> = records.iter().filter_map(|r| r.pid).collect();
        // A start under way in another live process may not have recorded
        // its VMM's pid yet: that VMM is not an orphan.
        let busy: BTreeSet<&str> = records
            .iter()
            .filter(|r| r.owner.is_some_and(|o| process::is_running(&o)))
            .map(|r| r.id.as_str())
            .collect();
        let vms_dir = self.layout.vms_dir().join("");
        let pidfile_arg = format!("-pidfile {}", vms_dir.display());
        for (pid, cmdline) in process::processes_mentioning(&vms_dir) {
            // Only VMMs: QEMU names its pidfile in our work dir. A `tail -f`
            // of a console log mentions the dir too and is left alone.
            if !cmdline.contains(&pidfile_arg) {
                continue;
            }
            let id = vm_id_in(&cmdline, &vms_dir.to_string_lossy());
            let owned = id.is_some_and(|id| {
                known.contains(id) && (live_pids.contains(&pid) || busy.contains(id))
            });
            // The list above may be stale: a start may have recorded this
            // VMM since. Look again before killing.
            if !owned && !self.owned_now(id, pid)? {
                let start = process::start_time(pid);
                if process::signal(pid, start, nix::sys::signal::Signal::SIGKILL) {
                    process::wait_gone(pid, start, crate::backend::qemu::KILL_TIMEOUT);
                    report.killed_orphan_processes.push(pid);
                }
            }
        }
        for entry in std::fs::read_dir(self.layout.vms_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            // A create since the list above has its record by now.
            if known.contains(name.as_str()) || self.store.get(&name)?.is_some() {
                continue;
            }
            report
                .killed_orphan_processes
                .extend(kill_processes_in(&entry.path()));
            if std::fs::remove_dir_all(entry.path()).is_ok() {
                report.removed_orphan_dirs.push(name);
            }
        }
        let tmp = self.layout.images_dir().join("tmp");
        for entry in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let stale = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > STALE_TMP_AGE);
            if stale && std::fs::remove_dir_all(entry.path()).is_ok() {
                report
                    .removed_tmp
                    .push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        // RAM files (on tmpfs) of VMs whose VMM is gone, or that are gone.
        let records = self.store.list()?;
        for (id, path) in crate::backend::qemu::snapshot::ram_files(self.layout.root()) {
            let live = records.iter().any(|r| {
                r.id == id && (r.pid.is_some() || r.state == crate::record::VmState::Starting)
            });
            if !live && std::fs::remove_file(&path).is_ok() {
                report.removed_ram_files.push(id);
            }
        }
        // Creates and imports hold the lock from the folder's creation to
        // the record's: under it, a folder without a record is a leftover.
        let snapshots = self.snapshot_store();
        let _lock = snapshots.lock()?;
        let (_, unreadable) = snapshots.scan()?;
        for folder in unreadable {
            let finished = folder
                .dir
                .join(crate::snapshot::store::RECORD_FILE)
                .exists();
            if !finished && std::fs::remove_dir_all(&folder.dir).is_ok() {
                report.removed_unfinished_snapshots.push(
                    folder
                        .dir
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                );
            }
        }
        Ok(report)
    }
}

impl Manager {
    /// Whether, by the store as it is now, VM `id` owns VMM `pid` (its
    /// recorded pid, or a start under way in a live process).
    fn owned_now(&self, id: Option<&str>, pid: u32) -> Result<bool, ManagerError> {
        let Some(id) = id else {
            return Ok(false);
        };
        Ok(self.store.get(id)?.is_some_and(|r| {
            r.pid == Some(pid) || r.owner.is_some_and(|o| process::is_running(&o))
        }))
    }
}

/// The VM id in a VMM command line: the folder after `<vms_dir>/`.
fn vm_id_in<'a>(cmdline: &'a str, vms_dir: &str) -> Option<&'a str> {
    let start = cmdline.find(vms_dir)? + vms_dir.len();
    let rest = &cmdline[start..];
    let end = rest.find('/')?;
    Some(&rest[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_vm_id_in_a_qemu_command_line() {
        let cmdline = "qemu -chardev socket,id=qmp,path=/s/vms/0123456789ab/qmp.sock,server=on";
        assert_eq!(vm_id_in(cmdline, "/s/vms/"), Some("0123456789ab"));
        assert_eq!(vm_id_in("qemu -m 1G", "/s/vms/"), None);
    }
}
