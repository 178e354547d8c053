//! File copy (`hangar cp`) as a tar stream, the same code on both sides.
//!
//! [`pack`] walks a source without following symlinks and writes one tar
//! entry per directory, regular file and symlink, all under one root named
//! after the source. [`unpack`] writes such a stream into a destination with
//! `docker cp`'s rules: into an existing directory it keeps the root's name;
//! otherwise the root takes the destination's name. It trusts nothing in the
//! stream (the other side may be a hostile guest): every entry must be a
//! plain relative path under the one root, nothing is ever written through a
//! symlink (a link in the stream is created as a link, never followed), and
//! only files, directories and symlinks are accepted. Contents are streamed;
//! nothing is held whole in memory.

use std::fs::{self, File, FileTimes, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use tar::{EntryType, Header};

use crate::CopySummary;

/// Why a copy failed. Messages name the path and what to do.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the copy stream broke: {0}")]
    Stream(#[source] io::Error),
    #[error("{path} does not exist")]
    NoSource { path: PathBuf },
    #[error("{path} is a {kind}; cp copies regular files, directories and symlinks")]
    Unsupported { path: PathBuf, kind: &'static str },
    #[error("{path} changed size while it was copied; copy it again when it is not being written")]
    Changed { path: PathBuf },
    #[error("entry {entry:?} of the copy stream is not a relative path under its root; refused")]
    UnsafePath { entry: String },
    #[error("entry {entry:?} would be written through the symlink {link}; refused")]
    ThroughSymlink { entry: String, link: PathBuf },
    #[error("entry {entry:?} of the copy stream is a {kind}; only files, directories and symlinks are accepted")]
    UnsupportedEntry { entry: String, kind: String },
    #[error("the destination's directory {path} does not exist; create it first")]
    NoDestination { path: PathBuf },
    #[error("cannot copy a directory onto the file {path}; name a directory or a new path")]
    DirectoryOntoFile { path: PathBuf },
    #[error("cannot replace the directory {path} with a file or symlink; remove it first")]
    FileOntoDirectory { path: PathBuf },
    #[error("the copy stream has no entries")]
    Empty,
}

/// How [`unpack`] treats what it writes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnpackOptions {
    /// Keep setuid/setgid bits. Off when the stream comes from a guest:
    /// a guest must not plant a setuid program on the host.
    pub keep_setid_bits: bool,
    /// The name the copy gets inside an existing destination directory,
    /// whatever the stream's root is called. Set it when the stream comes
    /// from a guest: the host decides what lands in its directory (the
    /// last component of the path it asked for), not the guest.
    pub root_name: Option<PathBuf>,
}

/// The name [`unpack`] should give a copy of `source` (its last plain
/// component), for [`UnpackOptions::root_name`].
pub fn expected_root_name(source: &str) -> PathBuf {
    match Path::new(source).components().next_back() {
        Some(Component::Normal(name)) => PathBuf::from(name),
        _ => PathBuf::from("root"),
    }
}

/// Writes `source` (a file, directory or symlink, not followed) to `out` as
/// a tar stream whose root entry is named after `source`.
pub fn pack(source: &Path, out: impl Write) -> Result<CopySummary, TransferError> {
    let root = root_name(source).map_err(|err| TransferError::Io {
        path: source.to_path_buf(),
        source: err,
    })?;
    pack_as(source, &root, out)
}

/// [`pack`] with the root entry named `root` (a copy that gets a new name
/// at its destination).
pub fn pack_as(source: &Path, root: &Path, out: impl Write) -> Result<CopySummary, TransferError> {
    let io_err = |source_err| TransferError::Io {
        path: source.to_path_buf(),
        source: source_err,
    };
    let meta = match fs::symlink_metadata(source) {
        Ok(meta) => meta,
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            return Err(TransferError::NoSource {
                path: source.to_path_buf(),
            })
        }
        Err(err) => return Err(io_err(err)),
    };
    let mut builder = tar::Builder::new(out);
    let mut summary = CopySummary::default();
    pack_entry(&mut builder, source, root, &meta, &mut summary)?;
    builder
        .into_inner()
        .and_then(|mut out| out.flush())
        .map_err(TransferError::Stream)?;
    Ok(summary)
}

/// The name the root entry gets: the source's last component, resolved
/// when the source is `.`, `..` or ends in them.
fn root_name(source: &Path) -> io::Result<PathBuf> {
    match source.components().next_back() {
        Some(Component::Normal(name)) => Ok(PathBuf::from(name)),
        _ => {
            let absolute = fs::canonicalize(source)?;
            Ok(absolute
                .file_name()
                .map_or_else(|| PathBuf::from("root"), PathBuf::from))
        }
    }
}

fn pack_entry<W: Write>(
    builder: &mut tar::Builder<W>,
    path: &Path,
    name: &Path,
    meta: &fs::Metadata,
    summary: &mut CopySummary,
) -> Result<(), TransferError> {
    let io_err = |source| TransferError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut header = Header::new_gnu();
    header.set_mode(meta.mode() & 0o7777);
    header.set_mtime(u64::try_from(meta.mtime()).unwrap_or(0));
    header.set_uid(u64::from(meta.uid()));
    header.set_gid(u64::from(meta.gid()));
    let kind = meta.file_type();
    if kind.is_dir() {
        header.set_entry_type(EntryType::Directory);
        header.set_size(0);
        builder
            .append_data(&mut header, name, io::empty())
            .map_err(TransferError::Stream)?;
        summary.dirs += 1;
        let mut children = fs::read_dir(path)
            .and_then(|dir| dir.collect::<Result<Vec<_>, _>>())
            .map_err(io_err)?;
        children.sort_by_key(fs::DirEntry::file_name);
        for child in children {
            let child_path = child.path();
            let child_meta =
                fs::symlink_metadata(&child_path).map_err(|source| TransferError::Io {
                    path: child_path.clone(),
                    source,
                })?;
            pack_entry(
                builder,
                &child_path,
                &name.join(child.file_name()),
                &child_meta,
                summary,
            )?;
        }
    } else if kind.is_file() {
        header.set_entry_type(EntryType::Regular);
        header.set_size(meta.len());
        let file = File::open(path).map_err(io_err)?;
        let mut exact = ExactReader {
            inner: file,
            left: meta.len(),
            short: false,
        };
        let appended = builder.append_data(&mut header, name, &mut exact);
        if exact.short {
            return Err(TransferError::Changed {
                path: path.to_path_buf(),
            });
        }
        appended.map_err(TransferError::Stream)?;
        summary.files += 1;
        summary.bytes += meta.len();
    } else if kind.is_symlink() {
        header.set_entry_type(EntryType::Symlink);
        header.set_size(0);
        let target = fs::read_link(path).map_err(io_err)?;
        builder
            .append_link(&mut header, name, &target)
            .map_err(TransferError::Stream)?;
        summary.symlinks += 1;
    } else {
        return Err(TransferError::Unsupported {
            path: path.to_path_buf(),
            kind: special_kind(&kind),
        });
    }
    Ok(())
}

fn special_kind(kind: &fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if kind.is_fifo() {
        "named pipe"
    } else if kind.is_socket() {
        "socket"
    } else if kind.is_block_device() || kind.is_char_device() {
        "device node"
    } else {
        "special file"
    }
}

/// Reads exactly `left` bytes: a file that grows is cut at its size when
/// the header was written, and one that shrinks fails the read (a tar entry
/// must hold exactly the size in its header).
struct ExactReader<R> {
    inner: R,
    left: u64,
    short: bool,
}

impl<R: Read> Read for ExactReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            self.short = true;
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file shrank while copied",
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Where entries go: `base/<name>/...` for an entry `<root>/...`.
struct Plan {
    base: PathBuf,
    name: PathBuf,
    root: PathBuf,
    /// The destination was an existing directory (the copy goes inside).
    into_dir: bool,
}

/// Writes a stream made by [`pack`] (or any tar stream following its
/// rules) to `dest`.
pub fn unpack(
    input: impl Read,
    dest: &Path,
    options: UnpackOptions,
) -> Result<CopySummary, TransferError> {
    let mut archive = tar::Archive::new(input);
    let mut plan: Option<Plan> = None;
    let mut summary = CopySummary::default();
    // Directory modes and times are applied last: a read-only directory
    // must still take its children, and writing children changes mtimes.
    let mut directories: Vec<(PathBuf, u32, u64)> = Vec::new();
    for entry in archive.entries().map_err(TransferError::Stream)? {
        let mut entry = entry.map_err(TransferError::Stream)?;
        let raw = entry.path().map_err(TransferError::Stream)?.into_owned();
        let shown = raw.display().to_string();
        let parts = plain_components(&raw).ok_or_else(|| TransferError::UnsafePath {
            entry: shown.clone(),
        })?;
        let header = entry.header();
        let kind = header.entry_type();
        let mode = header.mode().map_err(TransferError::Stream)? & 0o7777;
        let mode = if options.keep_setid_bits {
            mode
        } else {
            mode & 0o1777
        };
        let mtime = header.mtime().unwrap_or(0);
        let plan = match &plan {
            Some(plan) => plan,
            None => {
                let mut resolved = resolve(dest, kind.is_dir(), &parts[0])?;
                if let (true, Some(name)) = (resolved.into_dir, &options.root_name) {
                    resolved.name.clone_from(name);
                }
                plan.insert(resolved)
            }
        };
        if parts[0] != plan.root {
            return Err(TransferError::UnsafePath { entry: shown });
        }
        let target = enter(plan, &parts, &shown)?;
        match kind {
            EntryType::Directory => {
                // A directory that was already there keeps its mode and
                // times: the copy adds to it, it does not take it over.
                if make_directory(&target, &shown)? {
                    directories.push((target, mode, mtime));
                }
                summary.dirs += 1;
            }
            EntryType::Regular | EntryType::Continuous => {
                clear_for_non_directory(&target)?;
                let written = write_file(&mut entry, &target, mode, mtime)?;
                summary.files += 1;
                summary.bytes += written;
            }
            EntryType::Symlink => {
                let link = entry
                    .link_name()
                    .map_err(TransferError::Stream)?
                    .ok_or_else(|| TransferError::UnsafePath {
                        entry: shown.clone(),
                    })?
                    .into_owned();
                clear_for_non_directory(&target)?;
                std::os::unix::fs::symlink(&link, &target).map_err(|source| TransferError::Io {
                    path: target.clone(),
                    source,
                })?;
                summary.symlinks += 1;
            }
            other => {
                return Err(TransferError::UnsupportedEntry {
                    entry: shown,
                    kind: format!("{other:?}").to_lowercase(),
                })
            }
        }
    }
    if plan.is_none() {
        return Err(TransferError::Empty);
    }
    for (dir, mode, mtime) in directories.into_iter().rev() {
        let apply = || -> io::Result<()> {
            fs::set_permissions(&dir, fs::Permissions::from_mode(mode))?;
            match unix_time(mtime) {
                Some(time) => File::open(&dir)?.set_times(FileTimes::new().set_modified(time)),
                None => Ok(()),
            }
        };
        apply().map_err(|source| TransferError::Io { path: dir, source })?;
    }
    Ok(summary)
}

/// The components of an entry path when all are plain names (`.` skipped);
/// None for absolute paths, `..` or an empty path.
fn plain_components(path: &Path) -> Option<Vec<PathBuf>> {
    let mut parts = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(name) => parts.push(PathBuf::from(name)),
            Component::CurDir => {}
            Component::RootDir | Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    (!parts.is_empty()).then_some(parts)
}

/// `docker cp`'s destination rules. `dest` itself may be a symlink (the
/// user named it); nothing below it is followed.
fn resolve(dest: &Path, root_is_dir: bool, root: &Path) -> Result<Plan, TransferError> {
    let as_new = |dest: &Path| -> Result<Plan, TransferError> {
        let name = match dest.components().next_back() {
            Some(Component::Normal(name)) => PathBuf::from(name),
            _ => {
                return Err(TransferError::NoDestination {
                    path: dest.to_path_buf(),
                })
            }
        };
        let base = match dest.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !base.is_dir() {
            return Err(TransferError::NoDestination { path: base });
        }
        Ok(Plan {
            base,
            name,
            root: root.to_path_buf(),
            into_dir: false,
        })
    };
    match fs::metadata(dest) {
        Ok(meta) if meta.is_dir() => Ok(Plan {
            base: dest.to_path_buf(),
            name: root.to_path_buf(),
            root: root.to_path_buf(),
            into_dir: true,
        }),
        Ok(_) if root_is_dir => Err(TransferError::DirectoryOntoFile {
            path: dest.to_path_buf(),
        }),
        Ok(_) => as_new(dest),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            if dest.as_os_str().as_encoded_bytes().ends_with(b"/") {
                return Err(TransferError::NoDestination {
                    path: dest.to_path_buf(),
                });
            }
            as_new(dest)
        }
        Err(source) => Err(TransferError::Io {
            path: dest.to_path_buf(),
            source,
        }),
    }
}

/// The path for an entry, after checking that every directory between the
/// plan's base and the entry is a real directory (created if missing),
/// never a symlink.
fn enter(plan: &Plan, parts: &[PathBuf], shown: &str) -> Result<PathBuf, TransferError> {
    let mut path = plan.base.join(&plan.name);
    for part in &parts[1..] {
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => {}
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(TransferError::ThroughSymlink {
                    entry: shown.to_owned(),
                    link: path,
                })
            }
            Ok(_) => {
                return Err(TransferError::UnsafePath {
                    entry: shown.to_owned(),
                })
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                make_directory(&path, shown)?;
            }
            Err(source) => return Err(TransferError::Io { path, source }),
        }
        path.push(part);
    }
    Ok(path)
}

/// Creates a directory; true if it is new, false if one was there.
fn make_directory(path: &Path, shown: &str) -> Result<bool, TransferError> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => Ok(false),
        Ok(meta) if meta.file_type().is_symlink() => Err(TransferError::ThroughSymlink {
            entry: shown.to_owned(),
            link: path.to_path_buf(),
        }),
        Ok(_) => Err(TransferError::DirectoryOntoFile {
            path: path.to_path_buf(),
        }),
        Err(_) => {
            // Owner-writable until its real mode is applied at the end.
            fs::DirBuilder::new()
                .mode(0o700)
                .create(path)
                .map(|()| true)
                .map_err(|source| TransferError::Io {
                    path: path.to_path_buf(),
                    source,
                })
        }
    }
}

/// Removes a file or symlink where a file or symlink is about to be
/// written (the link itself, never its target); refuses a directory.
fn clear_for_non_directory(path: &Path) -> Result<(), TransferError> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => Err(TransferError::FileOntoDirectory {
            path: path.to_path_buf(),
        }),
        Ok(_) => fs::remove_file(path).map_err(|source| TransferError::Io {
            path: path.to_path_buf(),
            source,
        }),
        Err(_) => Ok(()),
    }
}

fn write_file(
    content: &mut impl Read,
    path: &Path,
    mode: u32,
    mtime: u64,
) -> Result<u64, TransferError> {
    let io_err = |source| TransferError::Io {
        path: path.to_path_buf(),
        source,
    };
    // create_new + O_NOFOLLOW: a link that appeared since the check is an
    // error, never a way out.
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(path)
        .map_err(io_err)?;
    let written = io::copy(content, &mut file).map_err(TransferError::Stream)?;
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_err)?;
    if let Some(time) = unix_time(mtime) {
        file.set_times(FileTimes::new().set_modified(time))
            .map_err(io_err)?;
    }
    Ok(written)
}

/// A header's mtime as a time, or None if it does not fit (a hostile
/// stream may send any 64-bit value; adding it must not panic).
fn unix_time(secs: u64) -> Option<SystemTime> {
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests;
