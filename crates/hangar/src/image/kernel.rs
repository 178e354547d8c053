//! Turning a compressed x86 `bzImage` (`vmlinuz`) into the uncompressed ELF
//! `vmlinux`.
//!
//! Why: QEMU boots an ELF kernel with a PVH note directly in 64-bit mode,
//! skipping the real-mode setup code and the in-guest decompression, which
//! under TCG costs most of a second. The payload's place and size are in the
//! boot protocol header (2.08+: `payload_offset` at 0x248, `payload_length`
//! at 0x24c, both relative to the protected-mode code after the setup
//! sectors).

use std::io::Read;

/// Why a kernel image could not be unpacked.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The file is not a bzImage this code understands.
    #[error("not a bzImage ({reason}); give a Debian vmlinuz or an uncompressed vmlinux")]
    NotBzImage { reason: &'static str },
    /// The payload uses a compression Hangar does not decode.
    #[error("kernel payload is compressed with an unsupported format (magic {magic}); Hangar decodes LZ4 and gzip")]
    UnsupportedCompression { magic: String },
    /// The payload did not decompress.
    #[error("kernel payload is corrupt: {reason}")]
    Corrupt { reason: String },
}

/// ELF magic: an input that already is a vmlinux is returned unchanged.
const ELF_MAGIC: &[u8] = b"\x7fELF";
/// Linux's legacy LZ4 framing (`lz4 -l`), used by `CONFIG_KERNEL_LZ4`.
const LZ4_LEGACY_MAGIC: u32 = 0x184c_2102;
const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
/// Each legacy LZ4 block decompresses to at most 8 MiB.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;

/// Returns the uncompressed ELF kernel inside `image`.
pub fn extract_vmlinux(image: &[u8]) -> Result<Vec<u8>, KernelError> {
    if image.starts_with(ELF_MAGIC) {
        return Ok(image.to_vec());
    }
    let payload = payload(image)?;
    let vmlinux = if payload.len() >= 4
        && u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]) == LZ4_LEGACY_MAGIC
    {
        decode_lz4_legacy(&payload[4..])?
    } else if payload.starts_with(GZIP_MAGIC) {
        decode_gzip(payload)?
    } else {
        return Err(KernelError::UnsupportedCompression {
            magic: hex::encode(&payload[..payload.len().min(4)]),
        });
    };
    if !vmlinux.starts_with(ELF_MAGIC) {
        return Err(KernelError::Corrupt {
            reason: "decompressed payload is not an ELF file".into(),
        });
    }
    Ok(vmlinux)
}

fn payload(image: &[u8]) -> Result<&[u8], KernelError> {
    let not = |reason| KernelError::NotBzImage { reason };
    if image.len() < 0x250 || &image[0x202..0x206] != b"HdrS" {
        return Err(not("no HdrS boot header"));
    }
    let version = u16::from_le_bytes([image[0x206], image[0x207]]);
    if version < 0x0208 {
        return Err(not("boot protocol older than 2.08 has no payload fields"));
    }
    let setup_sects = match image[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let read_u32 = |at: usize| {
        u32::from_le_bytes([image[at], image[at + 1], image[at + 2], image[at + 3]]) as usize
    };
    let start = (setup_sects + 1) * 512 + read_u32(0x248);
    let end = start + read_u32(0x24c);
    image
        .get(start..end)
        .ok_or(not("payload lies outside the file"))
}

/// Legacy LZ4: a sequence of `u32 LE compressed size` + block, each block
/// decompressing to at most 8 MiB. The kernel appends its own size after the
/// last block, which reads as a block size that does not fit: stop there.
fn decode_lz4_legacy(mut data: &[u8]) -> Result<Vec<u8>, KernelError> {
    let mut out = Vec::new();
    let mut block = vec![0u8; LZ4_LEGACY_BLOCK];
    while data.len() >= 4 {
        let size = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize;
        if size == LZ4_LEGACY_MAGIC as usize {
            data = &data[4..];
            continue;
        }
        if size == 0 || size > data.len() - 4 {
            break;
        }
        let written =
            lz4_flex::block::decompress_into(&data[4..4 + size], &mut block).map_err(|err| {
                KernelError::Corrupt {
                    reason: format!("lz4 block at output offset {}: {err}", out.len()),
                }
            })?;
        out.extend_from_slice(&block[..written]);
        data = &data[4 + size..];
    }
    if out.is_empty() {
        return Err(KernelError::Corrupt {
            reason: "lz4 stream has no blocks".into(),
        });
    }
    Ok(out)
}

fn decode_gzip(data: &[u8]) -> Result<Vec<u8>, KernelError> {
    let mut out = Vec::new();
    // Trailing bytes after the gzip member are expected (the kernel appends
    // its size), so read one member and ignore what follows.
    flate2::read::GzDecoder::new(data)
        .read_to_end(&mut out)
        .map_err(|err| KernelError::Corrupt {
            reason: format!("gzip: {err}"),
        })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elf_input_is_returned_as_is() {
        let elf = b"\x7fELF rest".to_vec();
        assert_eq!(extract_vmlinux(&elf).unwrap(), elf);
    }

    #[test]
    fn garbage_is_not_a_bzimage() {
        let err = extract_vmlinux(&[0u8; 4096]).unwrap_err();
        assert!(err.to_string().contains("no HdrS"), "{err}");
    }

    #[test]
    fn lz4_legacy_round_trips_and_stops_at_trailer() {
        let original: Vec<u8> = b"\x7fELF"
            .iter()
            .copied()
            .chain((0..50_000u32).map(|i| (i % 251) as u8))
            .collect();
        let block = lz4_flex::block::compress(&original);
        let mut stream = Vec::new();
        stream.extend((block.len() as u32).to_le_bytes());
        stream.extend(&block);
        stream.extend((original.len() as u32 * 3).to_le_bytes()); // size trailer
        assert_eq!(decode_lz4_legacy(&stream).unwrap(), original);
    }
}
