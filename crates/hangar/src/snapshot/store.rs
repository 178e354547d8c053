//! The snapshot folders under `snapshots-v1/`: listing, lookup by name or
//! id, the record written last, removal. Adding and removing hold
//! `snapshots-v1/lock`, so names stay unique across processes.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::Flock;

use super::{SnapshotError, SnapshotRecord, SNAPSHOT_FORMAT};

/// The record's file name in a snapshot's folder.
pub const RECORD_FILE: &str = "snapshot.json";

/// How long a snapshot operation waits for another one's lock.
pub const LOCK_WAIT: Duration = Duration::from_secs(600);

#[derive(Clone, Debug)]
pub struct SnapshotStore {
    root: PathBuf,
}

/// A folder that is not a readable snapshot (no record yet, or a damaged
/// one), for `gc` and for warnings.
#[derive(Clone, Debug)]
pub struct Unreadable {
    pub dir: PathBuf,
    pub why: String,
}

impl SnapshotStore {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
        move |source| SnapshotError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Held while snapshots are added or removed. Waits for another
    /// holder at most [`LOCK_WAIT`] (an import of a large archive holds it
    /// for minutes; a wedged process must not hold everyone forever).
    pub fn lock(&self) -> Result<Flock<std::fs::File>, SnapshotError> {
        self.lock_within(LOCK_WAIT)
    }

    fn lock_within(&self, wait: Duration) -> Result<Flock<std::fs::File>, SnapshotError> {
        crate::layout::create_private_dir(&self.root).map_err(|err| SnapshotError::Damaged {
            path: self.root.clone(),
            detail: err.to_string(),
        })?;
        let path = self.root.join("lock");
        let deadline = Instant::now() + wait;
        loop {
            match crate::fsutil::lock_file(&path, false) {
                Ok(lock) => return Ok(lock),
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(err) => return Err(Self::io(&path)(err)),
            }
            if Instant::now() >= deadline {
                return Err(SnapshotError::Busy { path, waited: wait });
            }
            if crate::interrupt::requested() {
                return Err(SnapshotError::Interrupted);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A new, empty folder for snapshot `id`.
    pub fn create_dir(&self, id: &str) -> Result<PathBuf, SnapshotError> {
        let dir = self.dir(id);
        crate::layout::create_private_dir(&dir).map_err(|err| SnapshotError::Damaged {
            path: dir.clone(),
            detail: err.to_string(),
        })?;
        Ok(dir)
    }

    /// Writes the record (atomically, flushed): the snapshot exists from
    /// here on.
    pub fn save(&self, record: &SnapshotRecord) -> Result<(), SnapshotError> {
        let path = self.dir(&record.id).join(RECORD_FILE);
        let text = serde_json::to_vec_pretty(record).unwrap_or_default();
        crate::fsutil::write_atomic(&path, &text).map_err(Self::io(&path))
    }

    /// Reads the record in `dir`.
    pub fn read(dir: &Path) -> Result<SnapshotRecord, SnapshotError> {
        let path = dir.join(RECORD_FILE);
        let text = std::fs::read(&path).map_err(Self::io(&path))?;
        parse_record(&path, &text)
    }

    /// Every readable snapshot (oldest first), and the folders that are not.
    pub fn scan(&self) -> Result<(Vec<SnapshotRecord>, Vec<Unreadable>), SnapshotError> {
        let mut records = Vec::new();
        let mut unreadable = Vec::new();
        let entries = match std::fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Ok((records, unreadable))
            }
            Err(source) => {
                return Err(SnapshotError::Io {
                    path: self.root.clone(),
                    source,
                })
            }
        };
        for entry in entries {
            let entry = entry.map_err(Self::io(&self.root))?;
            let dir = entry.path();
            if !dir.is_dir() {
                continue;
            }
            match Self::read(&dir) {
                Ok(record) => records.push(record),
                Err(err) => unreadable.push(Unreadable {
                    dir,
                    why: err.to_string(),
                }),
            }
        }
        records.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok((records, unreadable))
    }

    pub fn list(&self) -> Result<Vec<SnapshotRecord>, SnapshotError> {
        self.scan().map(|(records, _)| records)
    }

    /// A snapshot by name, id, or unique id prefix (4+ characters).
    pub fn find(&self, reference: &str) -> Result<SnapshotRecord, SnapshotError> {
        let records = self.list()?;
        if let Some(found) = records
            .iter()
            .find(|r| r.name == reference || r.id == reference)
        {
            return Ok(found.clone());
        }
        let mut prefixed = records
            .iter()
            .filter(|r| reference.len() >= 4 && r.id.starts_with(reference));
        match (prefixed.next(), prefixed.next()) {
            (Some(one), None) => Ok(one.clone()),
            _ => Err(SnapshotError::NotFound {
                reference: reference.to_owned(),
            }),
        }
    }

    /// Bytes on disk that are this snapshot's alone: allocated blocks of
    /// its files, not counting holes nor files shared by hard link with an
    /// image (the kernel) or a VM.
    pub fn own_bytes(&self, record: &SnapshotRecord) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let dir = self.dir(&record.id);
        record
            .files
            .iter()
            .filter_map(|file| std::fs::metadata(dir.join(&file.name)).ok())
            .filter(|meta| meta.nlink() == 1)
            .map(|meta| meta.blocks() * 512)
            .sum()
    }

    /// Removes a snapshot's folder: the record first, so a crash midway
    /// leaves an unfinished folder for `gc`, never a record without files.
    pub fn remove(&self, id: &str) -> Result<(), SnapshotError> {
        let dir = self.dir(id);
        let record = dir.join(RECORD_FILE);
        match std::fs::remove_file(&record) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(SnapshotError::Io {
                    path: record,
                    source,
                })
            }
        }
        std::fs::remove_dir_all(&dir).map_err(Self::io(&dir))
    }
}

/// Parses and checks a `snapshot.json` (from the store or an archive).
pub fn parse_record(path: &Path, text: &[u8]) -> Result<SnapshotRecord, SnapshotError> {
    let value: serde_json::Value =
        serde_json::from_slice(text).map_err(|err| SnapshotError::Damaged {
            path: path.to_path_buf(),
            detail: format!("not JSON: {err}"),
        })?;
    let format = value
        .get("format")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| SnapshotError::Damaged {
            path: path.to_path_buf(),
            detail: "no `format` number".into(),
        })?;
    if format > u64::from(SNAPSHOT_FORMAT) {
        return Err(SnapshotError::NewerFormat {
            path: path.to_path_buf(),
            found: u32::try_from(format).unwrap_or(u32::MAX),
            supported: SNAPSHOT_FORMAT,
        });
    }
    let record: SnapshotRecord =
        serde_json::from_value(value).map_err(|err| SnapshotError::Damaged {
            path: path.to_path_buf(),
            detail: err.to_string(),
        })?;
    super::validate_name(&record.name)?;
    if !record
        .description
        .as_deref()
        .is_none_or(super::valid_description)
    {
        return Err(SnapshotError::Damaged {
            path: path.to_path_buf(),
            detail: "the description is not one line of text".into(),
        });
    }
    // Printed by `snapshot ls` and `inspect`: names as a VM's are.
    if !crate::spec::is_valid_name(&record.source.name)
        || !crate::manager::is_valid_id(&record.source.id)
    {
        return Err(SnapshotError::Damaged {
            path: path.to_path_buf(),
            detail: format!(
                "source VM {:?} ({:?}) is not a VM name and id",
                record.source.name, record.source.id
            ),
        });
    }
    if !crate::manager::is_valid_id(&record.id) {
        return Err(SnapshotError::Damaged {
            path: path.to_path_buf(),
            detail: format!("id {:?} is not 12 hex digits", record.id),
        });
    }
    let boot = &record.boot;
    let boot_names = boot
        .kernel
        .iter()
        .chain(&boot.initramfs)
        .chain(boot.root_disk.as_ref().map(|d| &d.path))
        .chain(boot.data_disks.iter().map(|d| &d.path));
    for name in boot_names {
        if !name.to_str().is_some_and(is_plain_name) {
            return Err(SnapshotError::Damaged {
                path: path.to_path_buf(),
                detail: format!("boot file {name:?} is not a plain name in the snapshot"),
            });
        }
    }
    for file in &record.files {
        if !is_plain_name(&file.name) {
            return Err(SnapshotError::Damaged {
                path: path.to_path_buf(),
                detail: format!("file name {:?} is not a plain name", file.name),
            });
        }
    }
    Ok(record)
}

/// A file name inside a snapshot folder: no separators, no `.`/`..`.
pub fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\0')
        && name.len() <= 64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_is_waited_for_then_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::new(dir.path().join("snapshots-v1"));
        let held = store.lock().unwrap();
        let started = Instant::now();
        let err = store.lock_within(Duration::from_millis(100)).unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(100));
        assert!(matches!(err, SnapshotError::Busy { .. }), "{err}");
        assert!(err.to_string().contains("snapshot lock"), "{err}");
        drop(held);
        store.lock_within(Duration::from_millis(100)).unwrap();
    }
}
