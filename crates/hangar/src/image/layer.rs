//! Applying OCI image layers onto a root filesystem directory.
//!
//! A layer is a tar stream (plain, gzip or zstd, told apart by their magic
//! bytes) applied over the layers before it, with OCI semantics: `dir/.wh.NAME`
//! deletes `dir/NAME` (a whole tree if need be) and `dir/.wh..wh..opq` empties
//! `dir`; whiteouts only hide lower layers, so every path the current layer
//! writes is remembered and spared. An entry replaces what is at its path (a
//! directory over a directory keeps the contents). Owners, modes (all of
//! `0o7777`, setuid included) and mtimes are applied exactly; directories get
//! theirs once the whole layer is in, deepest first, since children change the
//! mtime and a read-only directory must still receive its children.
//!
//! Layers come from registries and are hostile until proven otherwise, and we
//! run as root, so nothing may be written outside the root: absolute paths and
//! `..` are refused in entry names and hard link targets; every parent of an
//! entry must be a real directory, checked component by component with
//! `lstat`, so a planted symlink (`a -> /`, then `a/etc/passwd`) cannot
//! redirect a write; the old entry is removed (a link, never its target) and
//! files are created `O_EXCL`, so the last component is never followed
//! either; hard links must name an existing non-directory inside the root;
//! device nodes are refused. This assumes nothing else changes the root
//! meanwhile.
//!
//! Extended attributes (PAX `SCHILY.xattr.*`) are set on files and
//! directories, after owner and mode (a chown clears file capabilities):
//! `user.*`, `trusted.*`, `security.capability` and POSIX ACLs. Others
//! (`security.selinux`, ...) describe the build host's policy and are
//! skipped; a name over 255 bytes or a value over 64 KiB is refused.
//!
//! Not applied: atimes, sub-second mtimes, and the header metadata of hard
//! links (they share their target's inode). The root
//! entry (`./`) is skipped: the caller owns the root directory.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, FileTimes, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::ops::Bound;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nix::fcntl::OFlag;
use nix::sys::stat::{utimensat, Mode, UtimensatFlags};
use nix::sys::time::TimeSpec;
use tar::EntryType;

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
const WHITEOUT: &[u8] = b".wh.";
/// What follows [`WHITEOUT`] in the opaque marker `.wh..wh..opq`.
const OPAQUE_REST: &[u8] = b".wh..opq";
const BUF_SIZE: usize = 64 * 1024;

/// What one layer did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LayerStats {
    /// Entries created or updated (files, directories, links, FIFOs).
    pub entries: u64,
    /// Bytes of regular file content written.
    pub bytes: u64,
    /// Whiteout and opaque markers applied.
    pub whiteouts: u64,
}

/// Why a layer could not be applied. Entries are named as the layer spells them.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("layer root {root}: {source}")]
    Root {
        root: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("layer stream is truncated or corrupt{}: {source}", near(.entry))]
    Stream {
        /// The entry being read, or the last one read.
        entry: Option<String>,
        #[source]
        source: io::Error,
    },
    #[error("layer entry {entry:?} is refused: {reason}")]
    Refused { entry: String, reason: &'static str },
    #[error("layer entry {entry:?} goes through {link:?}, which is a symlink; layers may not write through symlinks")]
    SymlinkInPath { entry: String, link: String },
    #[error("layer entry {entry:?} needs {parent:?} to be a directory, but it is not")]
    NotADirectory { entry: String, parent: String },
    #[error("hard link {entry:?} -> {target:?} is refused: {reason}")]
    BadHardLink {
        entry: String,
        target: String,
        reason: &'static str,
    },
    #[error("layer entry {entry:?}: device nodes are not allowed in image layers")]
    DeviceNode { entry: String },
    #[error("layer entry {entry:?} has unsupported tar entry type {kind}")]
    Unsupported { entry: String, kind: String },
    #[error("layer entry {entry:?}: {action} {path}: {source}")]
    Io {
        entry: String,
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn near(entry: &Option<String>) -> String {
    entry
        .as_ref()
        .map(|e| format!(" near entry {e:?}"))
        .unwrap_or_default()
}

fn stream(entry: Option<&str>) -> impl FnOnce(io::Error) -> LayerError + '_ {
    move |source| LayerError::Stream {
        entry: entry.map(str::to_owned),
        source,
    }
}

fn io_err<'a, E: Into<io::Error>>(
    entry: &'a str,
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(E) -> LayerError + 'a {
    move |source| LayerError::Io {
        entry: entry.to_owned(),
        action,
        path: path.to_owned(),
        source: source.into(),
    }
}

/// The type of what is at `path` (not following a symlink), `None` if nothing.
fn lstat(name: &str, path: &Path) -> Result<Option<fs::FileType>, LayerError> {
    match fs::symlink_metadata(path) {
        Ok(meta) => Ok(Some(meta.file_type())),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(io_err(name, "inspecting", path)(err)),
    }
}

/// Creates directory `abs` with exactly `mode` (umask aside).
fn mkdir(name: &str, abs: &Path, mode: u32) -> Result<(), LayerError> {
    fs::DirBuilder::new()
        .mode(mode)
        .create(abs)
        .map_err(io_err(name, "creating directory", abs))?;
    fs::set_permissions(abs, Permissions::from_mode(mode)).map_err(io_err(name, "chmod", abs))
}

/// The entries of directory `dir`: (absolute path, file name).
fn list(name: &str, dir: &Path) -> Result<Vec<(PathBuf, OsString)>, LayerError> {
    let mut children = Vec::new();
    for child in fs::read_dir(dir).map_err(io_err(name, "listing", dir))? {
        let child = child.map_err(io_err(name, "listing", dir))?;
        children.push((child.path(), child.file_name()));
    }
    Ok(children)
}

/// The error for a device node (`None`) or an unsupported entry type.
fn refused_as(name: &str, kind: Option<EntryType>) -> LayerError {
    let entry = name.to_owned();
    match kind {
        None => LayerError::DeviceNode { entry },
        Some(kind) => LayerError::Unsupported {
            entry,
            kind: format!("{kind:?}"),
        },
    }
}

/// Applies one layer onto `root` (an existing directory).
pub fn apply_layer(mut layer: impl Read, root: &Path) -> Result<LayerStats, LayerError> {
    let root_err = |source| LayerError::Root {
        root: root.to_owned(),
        source,
    };
    if !fs::metadata(root).map_err(root_err)?.is_dir() {
        return Err(root_err(io::Error::other("not a directory")));
    }
    let mut head = [0u8; 4];
    let mut len = 0;
    while len < head.len() {
        match layer.read(&mut head[len..]) {
            Ok(0) => break,
            Ok(n) => len = (len + n).min(head.len()),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(stream(None)(err)),
        }
    }
    let head = &head[..len];
    let reader = io::Cursor::new(head.to_vec()).chain(layer);
    if head.starts_with(&GZIP_MAGIC) {
        apply_tar(flate2::read::MultiGzDecoder::new(reader), root)
    } else if head == ZSTD_MAGIC {
        let decoder = zstd::stream::read::Decoder::new(reader).map_err(stream(None))?;
        apply_tar(decoder, root)
    } else {
        apply_tar(io::BufReader::with_capacity(BUF_SIZE, reader), root)
    }
}

fn apply_tar(reader: impl Read, root: &Path) -> Result<LayerStats, LayerError> {
    let mut archive = tar::Archive::new(reader);
    let mut layer = Layer {
        root,
        written: BTreeSet::new(),
        dirs: BTreeMap::new(),
        stats: LayerStats::default(),
        buf: vec![0; BUF_SIZE],
    };
    let mut last = None;
    for entry in archive.entries().map_err(stream(None))? {
        let mut entry = entry.map_err(stream(last.as_deref()))?;
        let raw = entry.path_bytes().into_owned();
        let name = String::from_utf8_lossy(&raw).into_owned();
        layer.entry(&mut entry, &raw, &name)?;
        last = Some(name);
    }
    layer.finish_dirs()?;
    Ok(layer.stats)
}

/// Turns an entry path (or hard link target) into a relative path of plain
/// components; `None` is the root itself.
fn normalize(raw: &[u8]) -> Result<Option<PathBuf>, &'static str> {
    let mut rest = raw;
    while let Some(stripped) = rest.strip_prefix(b"./") {
        rest = stripped;
    }
    if rest.starts_with(b"/") {
        return Err("absolute paths are not allowed in image layers");
    }
    if rest.contains(&0) {
        return Err("NUL bytes are not allowed in paths");
    }
    let mut rel = PathBuf::new();
    for part in rest.split(|&byte| byte == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err("`..` components are not allowed in image layers"),
            part => rel.push(OsStr::from_bytes(part)),
        }
    }
    Ok((!rel.as_os_str().is_empty()).then_some(rel))
}

/// Owner, mode and mtime from a tar header.
#[derive(Debug, Clone, Copy)]
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: Option<Duration>,
}

/// Owners from the layer are applied only as root: another user cannot
/// give files away, and its tree (and so the ext4 built from it) keeps its
/// own ids.
fn owners_apply() -> bool {
    nix::unistd::geteuid().is_root()
}

impl Meta {
    fn of(header: &tar::Header) -> io::Result<Self> {
        let id = |id: u64| u32::try_from(id).map_err(|_| io::Error::other("uid/gid over 32 bits"));
        let mtime = header.mtime().ok().map(Duration::from_secs);
        Ok(Self {
            mode: header.mode()? & 0o7777,
            uid: id(header.uid()?)?,
            gid: id(header.gid()?)?,
            mtime: mtime.filter(|&d| SystemTime::UNIX_EPOCH.checked_add(d).is_some()),
        })
    }

    /// Owner, then mode (chown clears setuid bits), then times, on an open
    /// file or directory.
    fn apply_to(self, file: &File, name: &str, abs: &Path) -> Result<(), LayerError> {
        if owners_apply() {
            let (uid, gid) = (Some(self.uid), Some(self.gid));
            std::os::unix::fs::fchown(file, uid, gid).map_err(io_err(name, "chown", abs))?;
        }
        file.set_permissions(Permissions::from_mode(self.mode))
            .map_err(io_err(name, "chmod", abs))?;
        if let Some(mtime) = self.mtime {
            let time = SystemTime::UNIX_EPOCH + mtime;
            file.set_times(FileTimes::new().set_accessed(time).set_modified(time))
                .map_err(io_err(name, "utimes", abs))?;
        }
        Ok(())
    }

    /// Owner and times on a path whose last component is not followed.
    fn apply_nofollow(self, name: &str, abs: &Path) -> Result<(), LayerError> {
        if owners_apply() {
            let (uid, gid) = (Some(self.uid), Some(self.gid));
            std::os::unix::fs::lchown(abs, uid, gid).map_err(io_err(name, "chown", abs))?;
        }
        if let Some(mtime) = self.mtime {
            let time = TimeSpec::from(mtime);
            utimensat(None, abs, &time, &time, UtimensatFlags::NoFollowSymlink)
                .map_err(io_err(name, "utimes", abs))?;
        }
        Ok(())
    }
}

struct Layer<'r> {
    root: &'r Path,
    /// Every path this layer wrote (whiteouts spare them).
    written: BTreeSet<PathBuf>,
    /// Directories this layer wrote, finished once the layer is in.
    dirs: BTreeMap<PathBuf, (String, Meta, Xattrs)>,
    stats: LayerStats,
    buf: Vec<u8>,
}

impl Layer<'_> {
    fn entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        raw: &[u8],
        name: &str,
    ) -> Result<(), LayerError> {
        use EntryType::*;
        let kind = match entry.header().entry_type() {
            Regular if raw.ends_with(b"/") => Directory, // old (v7) tar
            kind => kind,
        };
        if matches!(kind, XGlobalHeader | XHeader | GNULongName | GNULongLink) {
            return Ok(());
        }
        let refused = |reason| LayerError::Refused {
            entry: name.to_owned(),
            reason,
        };
        let Some(rel) = normalize(raw).map_err(refused)? else {
            return Ok(()); // the root directory itself
        };
        let base = rel.file_name().map(OsStrExt::as_bytes).unwrap_or_default();
        if let Some(rest) = base.strip_prefix(WHITEOUT) {
            return self.whiteout(name, &rel, rest);
        }
        match kind {
            Char | Block => return Err(refused_as(name, None)),
            Regular | Continuous | GNUSparse | Directory | Symlink | Link | Fifo => {}
            other => return Err(refused_as(name, Some(other))),
        }
        let meta = Meta::of(entry.header()).map_err(stream(Some(name)))?;
        let xattrs = xattrs_of(entry, name)?;
        let abs = self
            .walk(name, &rel, true)?
            .ok_or_else(|| refused("its parent directory is missing"))?;
        let link = || {
            let link = entry.link_name_bytes().map(|link| link.into_owned());
            link.ok_or_else(|| refused("the link has no target"))
        };
        match kind {
            Directory => {
                if !self.clear(name, &abs, true)? {
                    mkdir(name, &abs, 0o700)?;
                }
                self.dirs
                    .insert(rel.clone(), (name.to_owned(), meta, xattrs));
            }
            Symlink => {
                let target = link()?;
                self.clear(name, &abs, false)?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &abs).map_err(io_err(
                    name,
                    "creating symlink",
                    &abs,
                ))?;
                meta.apply_nofollow(name, &abs)?;
            }
            Link => self.hard_link(name, &abs, &rel, &link()?)?,
            Fifo => {
                self.clear(name, &abs, false)?;
                nix::unistd::mkfifo(&abs, Mode::from_bits_truncate(0o600)).map_err(io_err(
                    name,
                    "creating fifo",
                    &abs,
                ))?;
                meta.apply_nofollow(name, &abs)?;
                fs::set_permissions(&abs, Permissions::from_mode(meta.mode))
                    .map_err(io_err(name, "chmod", &abs))?;
            }
            _ => self.file(entry, name, &abs, meta, &xattrs)?,
        }
        self.written.insert(rel);
        self.stats.entries += 1;
        Ok(())
    }

    /// Checks that every parent of `rel` is a real directory inside the root
    /// (creating missing ones, mode 0755, when `create`) and returns the
    /// absolute path of `rel`. Without `create`, a missing or non-directory
    /// parent gives `None`: nothing can exist at `rel`.
    fn walk(&self, name: &str, rel: &Path, create: bool) -> Result<Option<PathBuf>, LayerError> {
        let mut abs = self.root.to_path_buf();
        let mut seen = PathBuf::new();
        for part in rel.parent().unwrap_or(Path::new("")) {
            abs.push(part);
            seen.push(part);
            let (entry, at) = (|| name.to_owned(), || seen.display().to_string());
            match lstat(name, &abs)? {
                Some(kind) if kind.is_dir() => {}
                Some(kind) if kind.is_symlink() => {
                    let (entry, link) = (entry(), at());
                    return Err(LayerError::SymlinkInPath { entry, link });
                }
                Some(_) if create => {
                    let (entry, parent) = (entry(), at());
                    return Err(LayerError::NotADirectory { entry, parent });
                }
                None if create => mkdir(name, &abs, 0o755)?,
                _ => return Ok(None),
            }
        }
        Ok(Some(self.root.join(rel)))
    }

    /// Removes what is at `abs` (the entry itself, never a symlink's target).
    /// A real directory is kept when `keep_dir`; returns whether one was kept.
    fn clear(&self, name: &str, abs: &Path, keep_dir: bool) -> Result<bool, LayerError> {
        let removed = match lstat(name, abs)? {
            None => return Ok(false),
            Some(kind) if kind.is_dir() && keep_dir => return Ok(true),
            Some(kind) if kind.is_dir() => fs::remove_dir_all(abs),
            Some(_) => fs::remove_file(abs),
        };
        removed.map_err(io_err(name, "removing", abs))?;
        Ok(false)
    }

    fn file<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        name: &str,
        abs: &Path,
        meta: Meta,
        xattrs: &Xattrs,
    ) -> Result<(), LayerError> {
        self.clear(name, abs, false)?;
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC).bits())
            .open(abs)
            .map_err(io_err(name, "creating file", abs))?;
        let mut written = 0u64;
        loop {
            let n = match entry.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n.min(self.buf.len()),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(stream(Some(name))(err)),
            };
            file.write_all(&self.buf[..n])
                .map_err(io_err(name, "writing", abs))?;
            written += n as u64;
        }
        if written != entry.size() {
            let short = format!(
                "file content ends after {written} of {} bytes",
                entry.size()
            );
            let err = io::Error::new(io::ErrorKind::UnexpectedEof, short);
            return Err(stream(Some(name))(err));
        }
        self.stats.bytes += written;
        meta.apply_to(&file, name, abs)?;
        set_xattrs(&file, xattrs, name, abs)
    }

    fn hard_link(&self, name: &str, abs: &Path, rel: &Path, raw: &[u8]) -> Result<(), LayerError> {
        let refuse = |reason| LayerError::BadHardLink {
            entry: name.to_owned(),
            target: String::from_utf8_lossy(raw).into_owned(),
            reason,
        };
        let missing = || refuse("the target does not exist");
        let target = normalize(raw)
            .map_err(refuse)?
            .ok_or_else(|| refuse("the target is the root directory"))?;
        let target_abs = self.walk(name, &target, false)?.ok_or_else(missing)?;
        if lstat(name, &target_abs)?.ok_or_else(missing)?.is_dir() {
            return Err(refuse("the target is a directory"));
        }
        if target == rel {
            return Ok(());
        }
        self.clear(name, abs, false)?;
        // linkat without AT_SYMLINK_FOLLOW: a symlink target is linked itself.
        fs::hard_link(&target_abs, abs).map_err(io_err(name, "creating hard link", abs))
    }

    fn whiteout(&mut self, name: &str, rel: &Path, rest: &[u8]) -> Result<(), LayerError> {
        let parent = rel.parent().unwrap_or(Path::new(""));
        if rest == OPAQUE_REST {
            // Walking the marker checks every component of the directory.
            if self.walk(name, rel, false)?.is_some() {
                for (abs, child) in list(name, &self.root.join(parent))? {
                    self.remove_lower(name, &abs, &parent.join(child))?;
                }
            }
        } else if rest.starts_with(WHITEOUT) {
            return Ok(()); // other AUFS metadata (`.wh..wh.plnk`, ...): ignored
        } else if matches!(rest, b"" | b"." | b"..") {
            return Err(LayerError::Refused {
                entry: name.to_owned(),
                reason: "invalid whiteout name",
            });
        } else {
            let target = parent.join(OsStr::from_bytes(rest));
            if let Some(abs) = self.walk(name, &target, false)? {
                self.remove_lower(name, &abs, &target)?;
            }
        }
        self.stats.whiteouts += 1;
        Ok(())
    }

    /// Removes what lower layers left at `abs` (`rel` in the root), keeping
    /// everything this layer wrote there.
    fn remove_lower(&self, name: &str, abs: &Path, rel: &Path) -> Result<(), LayerError> {
        let after = (Bound::Excluded(rel), Bound::Unbounded);
        let mut later = self.written.range::<Path, _>(after);
        let below = later.next().is_some_and(|path| path.starts_with(rel));
        if !below && !self.written.contains(rel) {
            self.clear(name, abs, false)?;
        } else if lstat(name, abs)?.is_some_and(|kind| kind.is_dir()) {
            for (child_abs, child) in list(name, abs)? {
                self.remove_lower(name, &child_abs, &rel.join(child))?;
            }
        }
        Ok(())
    }

    /// Owner, mode and mtime of the layer's directories, deepest first
    /// (reverse path order puts descendants before their ancestors). A
    /// directory replaced later in the layer is skipped.
    fn finish_dirs(&self) -> Result<(), LayerError> {
        for (rel, (name, meta, xattrs)) in self.dirs.iter().rev() {
            let abs = match self.walk(name, rel, false) {
                Ok(Some(abs)) => abs,
                Ok(None) | Err(LayerError::SymlinkInPath { .. }) => continue,
                Err(err) => return Err(err),
            };
            if !lstat(name, &abs)?.is_some_and(|kind| kind.is_dir()) {
                continue;
            }
            let dir = OpenOptions::new()
                .read(true)
                .custom_flags((OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC).bits())
                .open(&abs)
                .map_err(io_err(name, "opening directory", &abs))?;
            meta.apply_to(&dir, name, &abs)?;
            set_xattrs(&dir, xattrs, name, &abs)?;
        }
        Ok(())
    }
}

/// Extended attributes of one entry: (name, value).
type Xattrs = Vec<(String, Vec<u8>)>;

/// Linux's limits (XATTR_NAME_MAX, XATTR_SIZE_MAX).
const XATTR_NAME_MAX: usize = 255;
const XATTR_SIZE_MAX: usize = 64 * 1024;
/// What an ext4 inode's attribute block holds, roughly.
const XATTR_TOTAL_MAX: usize = 4000;

/// Namespaces an image may carry into its file system.
fn wanted_xattr(name: &str) -> bool {
    name.starts_with("user.")
        // overlayfs keeps its own state in trusted.overlay.*: never from
        // an image.
        || (name.starts_with("trusted.") && !name.starts_with("trusted.overlay."))
        || matches!(
            name,
            "security.capability" | "system.posix_acl_access" | "system.posix_acl_default"
        )
}

fn xattrs_of<R: Read>(entry: &mut tar::Entry<'_, R>, name: &str) -> Result<Xattrs, LayerError> {
    let mut out = Vec::new();
    let mut total = 0usize;
    let Some(extensions) = entry.pax_extensions().map_err(stream(Some(name)))? else {
        return Ok(out);
    };
    for extension in extensions {
        let extension = extension.map_err(stream(Some(name)))?;
        let Some(attr) = extension
            .key()
            .ok()
            .and_then(|key| key.strip_prefix("SCHILY.xattr."))
        else {
            continue;
        };
        let value = extension.value_bytes();
        if attr.len() > XATTR_NAME_MAX || value.len() > XATTR_SIZE_MAX || attr.contains('\0') {
            return Err(LayerError::Refused {
                entry: name.to_owned(),
                reason:
                    "an extended attribute is over Linux's limits (255-byte name, 64 KiB value)",
            });
        }
        if wanted_xattr(attr) {
            total += attr.len() + value.len();
            // ext4 keeps an inode's attributes in one block: more would
            // fail in mkfs later, and unbounded ones would pile up here.
            if total > XATTR_TOTAL_MAX {
                return Err(LayerError::Refused {
                    entry: name.to_owned(),
                    reason: "its extended attributes exceed 4000 bytes in total (what one ext4 block holds)",
                });
            }
            out.push((attr.to_owned(), value.to_vec()));
        }
    }
    Ok(out)
}

fn set_xattrs(file: &File, xattrs: &Xattrs, name: &str, abs: &Path) -> Result<(), LayerError> {
    use xattr::FileExt;
    for (attr, value) in xattrs {
        file.set_xattr(attr, value)
            .map_err(io_err(name, "setting extended attribute", abs))?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
