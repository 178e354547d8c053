//! A writer for the `newc` cpio format the Linux kernel unpacks as an
//! initramfs (see the kernel's `Documentation/driver-api/early-userspace`).
//! Entries are written in order with fixed timestamps, so the same inputs
//! give the same bytes.

use std::io::{self, Write};

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// Streams a newc archive. Call [`CpioWriter::finish`] to write the trailer.
#[derive(Debug)]
pub struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
    written: u64,
}

/// One header's fields besides name and data.
struct Header {
    mode: u32,
    size: u32,
    rdev: (u32, u32),
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            next_ino: 1,
            written: 0,
        }
    }

    pub fn dir(&mut self, path: &str, perm: u32) -> io::Result<()> {
        self.entry(
            path,
            Header {
                mode: S_IFDIR | perm,
                size: 0,
                rdev: (0, 0),
            },
            &[],
        )
    }

    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{path}: over 4 GiB"))
        })?;
        self.entry(
            path,
            Header {
                mode: S_IFREG | perm,
                size,
                rdev: (0, 0),
            },
            data,
        )
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        let data = target.as_bytes();
        let header = Header {
            mode: S_IFLNK | 0o777,
            size: data.len() as u32,
            rdev: (0, 0),
        };
        self.entry(path, header, data)
    }

    pub fn char_device(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(
            path,
            Header {
                mode: S_IFCHR | perm,
                size: 0,
                rdev: (major, minor),
            },
            &[],
        )
    }

    /// Writes the trailer and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry(
            "TRAILER!!!",
            Header {
                mode: 0,
                size: 0,
                rdev: (0, 0),
            },
            &[],
        )?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn entry(&mut self, path: &str, header: Header, data: &[u8]) -> io::Result<()> {
        let name = path.trim_start_matches('/');
        if name.is_empty() || name.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid cpio entry name {path:?}"),
            ));
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if header.mode & S_IFDIR == S_IFDIR {
            2
        } else {
            1
        };
        let fields = [
            ino,
            header.mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            header.size,
            0, // devmajor
            0, // devminor
            header.rdev.0,
            header.rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        let mut head = String::with_capacity(110);
        head.push_str("070701");
        for field in fields {
            head.push_str(&format!("{field:08x}"));
        }
        self.put(head.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let rem = (self.written % 4) as usize;
        if rem == 0 {
            return Ok(());
        }
        self.put(&[0u8; 3][..4 - rem])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_is_aligned_and_ends_with_trailer() {
        let mut writer = CpioWriter::new(Vec::new());
        writer.dir("/bin", 0o755).unwrap();
        writer.file("/bin/x", 0o755, b"abc").unwrap();
        writer.symlink("/bin/sh", "busybox").unwrap();
        writer.char_device("/dev/console", 0o600, 5, 1).unwrap();
        let bytes = writer.finish().unwrap();
        assert_eq!(bytes.len() % 4, 0);
        assert!(bytes.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("bin/x\0"));
        assert!(text.contains("TRAILER!!!\0"));
        // header(110) + "bin\0"(4) = 114 -> padded to 116
        assert_eq!(&bytes[116..122], b"070701");
    }

    #[test]
    fn empty_or_nul_names_are_rejected() {
        let mut writer = CpioWriter::new(Vec::new());
        assert!(writer.file("/", 0o644, b"").is_err());
        assert!(writer.file("a\0b", 0o644, b"").is_err());
    }
}
