//! File helpers: atomic writes and reading the tail of a log.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

/// Creates (or truncates) `path` with mode 0600: state files are private.
pub fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// An exclusive `flock` on `path` (created 0600), held until the returned
/// value drops; the kernel releases it if the process dies. `wait` blocks
/// for a holder; otherwise a held lock is `WouldBlock`.
pub fn lock_file(path: &Path, wait: bool) -> std::io::Result<nix::fcntl::Flock<std::fs::File>> {
    lock_file_as(path, true, wait)
}

/// Like [`lock_file`], shared (many holders) or exclusive.
pub fn lock_file_as(
    path: &Path,
    exclusive: bool,
    wait: bool,
) -> std::io::Result<nix::fcntl::Flock<std::fs::File>> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)?;
    use nix::fcntl::FlockArg;
    let how = match (exclusive, wait) {
        (true, true) => FlockArg::LockExclusive,
        (true, false) => FlockArg::LockExclusiveNonblock,
        (false, true) => FlockArg::LockShared,
        (false, false) => FlockArg::LockSharedNonblock,
    };
    nix::fcntl::Flock::lock(file, how).map_err(|(_, errno)| std::io::Error::from(errno))
}

/// `std::fs::write` with mode 0600.
pub fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    create_private(path)?.write_all(data)
}

/// Writes `data` to a temp file beside `path`, syncs it and renames it over
/// `path`, so readers see the old or the new content, never a mix.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(data)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|err| err.error)?;
    Ok(())
}

/// Hands `sink` the bytes of `path` from `offset` to its current end and
/// returns the new offset. A missing file has no bytes; a file that shrank
/// (rotated) is read from its start.
pub fn copy_new_bytes(
    path: &Path,
    offset: u64,
    sink: &mut dyn FnMut(&[u8]),
) -> std::io::Result<u64> {
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(offset),
        Err(err) => return Err(err),
    };
    let len = file.metadata()?.len();
    let mut offset = if len < offset { 0 } else { offset };
    file.seek(SeekFrom::Start(offset))?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(offset);
        }
        sink(&buf[..n]);
        offset += n as u64;
    }
}

/// The last `lines` lines of a text file (at most the last 64 KiB are read),
/// with carriage returns and terminal escape sequences removed.
pub fn tail_lines(path: &Path, lines: usize) -> Vec<String> {
    const WINDOW: u64 = 64 * 1024;
    let Ok(mut file) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if file
        .seek(SeekFrom::Start(len.saturating_sub(WINDOW)))
        .is_err()
    {
        return Vec::new();
    }
    let mut bytes = Vec::new();
    if file.read_to_end(&mut bytes).is_err() {
        return Vec::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    let mut out: Vec<String> = text
        .lines()
        .map(clean_line)
        .filter(|line| !line.trim().is_empty())
        .collect();
    let skip = out.len().saturating_sub(lines);
    out.drain(..skip);
    out
}

/// Drops control characters and ANSI escape sequences.
fn clean_line(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for n in chars.by_ref() {
                    if n.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        if !c.is_control() || c == '\t' {
            out.push(c);
        }
    }
    out
}

/// Copies `from` to a new private file `to`, keeping holes: only the data
/// extents are read and written (SEEK_DATA/SEEK_HOLE), so a guest's
/// untouched RAM costs nothing. Not flushed: the caller syncs when the
/// guest runs again.
pub fn copy_sparse(from: &Path, to: &Path) -> std::io::Result<()> {
    use nix::unistd::{lseek, Whence};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let source = std::fs::File::open(from)?;
    let length = source.metadata()?.len();
    let target = create_private(to)?;
    target.set_len(length)?;
    let mut buffer = vec![0u8; 1 << 20];
    let mut position: i64 = 0;
    let end = i64::try_from(length).map_err(std::io::Error::other)?;
    while position < end {
        let data = match lseek(source.as_raw_fd(), position, Whence::SeekData) {
            Ok(offset) => offset,
            Err(nix::errno::Errno::ENXIO) => break, // only a hole is left
            Err(err) => return Err(err.into()),
        };
        let hole = lseek(source.as_raw_fd(), data, Whence::SeekHole)?.min(end);
        let mut at = data;
        while at < hole {
            let want =
                usize::try_from((hole - at).min(buffer.len() as i64)).unwrap_or(buffer.len());
            let read = source.read_at(&mut buffer[..want], at as u64)?;
            if read == 0 {
                break;
            }
            target.write_all_at(&buffer[..read], at as u64)?;
            at += read as i64;
        }
        position = hole;
    }
    Ok(())
}

/// Writes `data` at `offset` of `file`, leaving out the 4 KiB blocks that
/// are all zeros: in a file grown to its length (`set_len`), they stay
/// holes. An imported guest RAM file then costs its data, not its size.
pub fn write_skipping_zeros(file: &std::fs::File, offset: u64, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    const BLOCK: usize = 4096;
    // One write per run of blocks with data, not one per block.
    let mut run_start = None;
    for (index, block) in data.chunks(BLOCK).enumerate() {
        let zeros = block.iter().all(|byte| *byte == 0);
        match (zeros, run_start) {
            (false, None) => run_start = Some(index * BLOCK),
            (true, Some(start)) => {
                file.write_all_at(&data[start..index * BLOCK], offset + start as u64)?;
                run_start = None;
            }
            _ => {}
        }
    }
    if let Some(start) = run_start {
        file.write_all_at(&data[start..], offset + start as u64)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_returns_last_clean_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        write_atomic(&path, b"one\r\n\x1b[0mtwo\n\nthree\n").unwrap();
        assert_eq!(tail_lines(&path, 2), vec!["two", "three"]);
        assert!(tail_lines(&dir.path().join("none"), 3).is_empty());
    }

    #[test]
    fn a_sparse_copy_keeps_data_and_holes() {
        use std::os::unix::fs::{FileExt, MetadataExt};
        let dir = tempfile::tempdir().unwrap();
        let (from, to) = (dir.path().join("from"), dir.path().join("to"));
        let file = std::fs::File::create(&from).unwrap();
        file.set_len(64 << 20).unwrap();
        file.write_all_at(b"start", 0).unwrap();
        file.write_all_at(b"middle", 32 << 20).unwrap();
        super::copy_sparse(&from, &to).unwrap();
        assert_eq!(std::fs::read(&from).unwrap(), std::fs::read(&to).unwrap());
        // Two small extents, not 64 MiB.
        assert!(std::fs::metadata(&to).unwrap().blocks() * 512 < 4 << 20);
    }

    #[test]
    fn zero_blocks_are_left_as_holes() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ram");
        let file = std::fs::File::create(&path).unwrap();
        let mut data = vec![0u8; 16 << 20];
        data[5] = 1;
        data[(8 << 20) + 4095] = 2;
        // Written in two pieces at their offsets, as an import does.
        write_skipping_zeros(&file, 0, &data[..4 << 20]).unwrap();
        write_skipping_zeros(&file, 4 << 20, &data[4 << 20..]).unwrap();
        file.set_len(data.len() as u64).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data);
        assert!(std::fs::metadata(&path).unwrap().blocks() * 512 < 1 << 20);
    }
}
