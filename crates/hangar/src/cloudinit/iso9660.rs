//! A minimal ISO 9660 image writer: one root directory of small files, the
//! shape of a cloud-init NoCloud seed (`cidata`). No external tool.
//!
//! Layout, in 2048-byte sectors: 0-15 system area (zeros), 16 primary
//! volume descriptor, 17 terminator, 18 little-endian path table, 19
//! big-endian path table, 20 root directory, 21.. file contents (each from
//! a sector boundary). Names are written as ISO 9660 file identifiers
//! (`USER-DATA;1`); Linux shows them lowercased without the version
//! (`user-data`), which is what cloud-init reads. The volume identifier is
//! written as given (cloud-init looks for the label `cidata`, either case).

use chrono::{DateTime, Datelike, Timelike, Utc};

const SECTOR: usize = 2048;
const PVD_SECTOR: u32 = 16;
const PATH_TABLE_L: u32 = 18;
const PATH_TABLE_M: u32 = 19;
const ROOT_DIR: u32 = 20;
const FIRST_FILE: u32 = 21;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IsoError {
    #[error("ISO volume id {0:?} must be 1-32 of A-Z, a-z, 0-9 and _")]
    VolumeId(String),
    #[error(
        "ISO file name {0:?} must be 1-30 of a-z, 0-9, '-' and '_' (one root directory, no dots)"
    )]
    Name(String),
    #[error("ISO file {0:?} is listed twice")]
    Duplicate(String),
    #[error("too many files for one root directory sector")]
    TooManyFiles,
    #[error("file {name:?} is {size} bytes; a seed file may be at most 16 MiB")]
    TooLarge { name: String, size: usize },
}

/// Builds an ISO 9660 image holding `files` (name, content) in its root.
pub fn build(
    volume_id: &str,
    files: &[(&str, &[u8])],
    now: DateTime<Utc>,
) -> Result<Vec<u8>, IsoError> {
    let volume_ok = !volume_id.is_empty()
        && volume_id.len() <= 32
        && volume_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !volume_ok {
        return Err(IsoError::VolumeId(volume_id.to_owned()));
    }
    let mut entries: Vec<(String, &[u8])> = Vec::new();
    for (name, data) in files {
        let name_ok = !name.is_empty()
            && name.len() <= 30
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
        if !name_ok {
            return Err(IsoError::Name((*name).to_owned()));
        }
        if data.len() > 16 << 20 {
            return Err(IsoError::TooLarge {
                name: (*name).to_owned(),
                size: data.len(),
            });
        }
        let id = format!("{};1", name.to_ascii_uppercase());
        if entries.iter().any(|(existing, _)| *existing == id) {
            return Err(IsoError::Duplicate((*name).to_owned()));
        }
        entries.push((id, data));
    }
    // Directory records are sorted by identifier.
    entries.sort_by(|a, b| a.0.cmp(&b.0));

    // Where each file goes.
    let mut extents = Vec::new();
    let mut next = FIRST_FILE;
    for (_, data) in &entries {
        extents.push(next);
        next += sectors(data.len()).max(1);
    }
    let total_sectors = next;
    let stamp = RecordingTime::from(now);

    let mut root = Vec::with_capacity(SECTOR);
    root.extend(dir_record(&[0], ROOT_DIR, SECTOR as u32, true, &stamp));
    root.extend(dir_record(&[1], ROOT_DIR, SECTOR as u32, true, &stamp));
    for ((id, data), extent) in entries.iter().zip(&extents) {
        root.extend(dir_record(
            id.as_bytes(),
            *extent,
            data.len() as u32,
            false,
            &stamp,
        ));
    }
    if root.len() > SECTOR {
        return Err(IsoError::TooManyFiles);
    }

    let mut image = vec![0u8; total_sectors as usize * SECTOR];
    let at = |sector: u32| sector as usize * SECTOR;
    let pvd = primary_volume_descriptor(volume_id, total_sectors, &stamp, now);
    image[at(PVD_SECTOR)..at(PVD_SECTOR) + SECTOR].copy_from_slice(&pvd);
    let terminator = at(PVD_SECTOR + 1);
    image[terminator] = 255;
    image[terminator + 1..terminator + 6].copy_from_slice(b"CD001");
    image[terminator + 6] = 1;
    let (l_table, m_table) = path_tables();
    image[at(PATH_TABLE_L)..at(PATH_TABLE_L) + l_table.len()].copy_from_slice(&l_table);
    image[at(PATH_TABLE_M)..at(PATH_TABLE_M) + m_table.len()].copy_from_slice(&m_table);
    image[at(ROOT_DIR)..at(ROOT_DIR) + root.len()].copy_from_slice(&root);
    for ((_, data), extent) in entries.iter().zip(&extents) {
        let start = at(*extent);
        image[start..start + data.len()].copy_from_slice(data);
    }
    Ok(image)
}

fn sectors(len: usize) -> u32 {
    len.div_ceil(SECTOR) as u32
}

/// ISO 9660 stores many numbers twice: little-endian, then big-endian.
fn both_u32(value: u32) -> [u8; 8] {
    let mut out = [0u8; 8];
    out[..4].copy_from_slice(&value.to_le_bytes());
    out[4..].copy_from_slice(&value.to_be_bytes());
    out
}

fn both_u16(value: u16) -> [u8; 4] {
    let mut out = [0u8; 4];
    out[..2].copy_from_slice(&value.to_le_bytes());
    out[2..].copy_from_slice(&value.to_be_bytes());
    out
}

/// The 7-byte date of a directory record (UTC).
struct RecordingTime([u8; 7]);

impl From<DateTime<Utc>> for RecordingTime {
    fn from(now: DateTime<Utc>) -> Self {
        let year = (now.year() - 1900).clamp(0, 255) as u8;
        Self([
            year,
            now.month() as u8,
            now.day() as u8,
            now.hour() as u8,
            now.minute() as u8,
            now.second() as u8,
            0,
        ])
    }
}

fn dir_record(
    id: &[u8],
    extent: u32,
    size: u32,
    directory: bool,
    stamp: &RecordingTime,
) -> Vec<u8> {
    let len = 33 + id.len() + (id.len() + 1) % 2;
    let mut record = vec![0u8; len];
    record[0] = len as u8;
    record[2..10].copy_from_slice(&both_u32(extent));
    record[10..18].copy_from_slice(&both_u32(size));
    record[18..25].copy_from_slice(&stamp.0);
    record[25] = if directory { 2 } else { 0 };
    record[28..32].copy_from_slice(&both_u16(1));
    record[32] = id.len() as u8;
    record[33..33 + id.len()].copy_from_slice(id);
    record
}

/// Path tables with the root directory alone (10 bytes each).
fn path_tables() -> (Vec<u8>, Vec<u8>) {
    let table = |extent: [u8; 4], parent: [u8; 2]| {
        let mut entry = vec![1u8, 0];
        entry.extend(extent);
        entry.extend(parent);
        entry.extend([0u8, 0]); // root's identifier (0) and padding
        entry
    };
    (
        table(ROOT_DIR.to_le_bytes(), 1u16.to_le_bytes()),
        table(ROOT_DIR.to_be_bytes(), 1u16.to_be_bytes()),
    )
}

/// The 17-byte date-time of a volume descriptor.
fn volume_time(now: Option<DateTime<Utc>>) -> [u8; 17] {
    let mut out = [b'0'; 17];
    out[16] = 0;
    if let Some(now) = now {
        out[..16].copy_from_slice(now.format("%Y%m%d%H%M%S00").to_string().as_bytes());
    }
    out
}

fn primary_volume_descriptor(
    volume_id: &str,
    total_sectors: u32,
    stamp: &RecordingTime,
    now: DateTime<Utc>,
) -> [u8; SECTOR] {
    let mut pvd = [0u8; SECTOR];
    pvd[0] = 1;
    pvd[1..6].copy_from_slice(b"CD001");
    pvd[6] = 1;
    let padded = |field: &mut [u8], text: &str| {
        field.fill(b' ');
        field[..text.len()].copy_from_slice(text.as_bytes());
    };
    padded(&mut pvd[8..40], "LINUX");
    padded(&mut pvd[40..72], volume_id);
    pvd[80..88].copy_from_slice(&both_u32(total_sectors));
    pvd[120..124].copy_from_slice(&both_u16(1));
    pvd[124..128].copy_from_slice(&both_u16(1));
    pvd[128..132].copy_from_slice(&both_u16(SECTOR as u16));
    pvd[132..140].copy_from_slice(&both_u32(10));
    pvd[140..144].copy_from_slice(&PATH_TABLE_L.to_le_bytes());
    pvd[148..152].copy_from_slice(&PATH_TABLE_M.to_be_bytes());
    pvd[156..190].copy_from_slice(&dir_record(&[0], ROOT_DIR, SECTOR as u32, true, stamp));
    for range in [
        190..318,
        318..446,
        446..574,
        574..702,
        702..739,
        739..776,
        776..813,
    ] {
        pvd[range].fill(b' ');
    }
    padded(&mut pvd[574..702], "HANGAR");
    pvd[813..830].copy_from_slice(&volume_time(Some(now)));
    pvd[830..847].copy_from_slice(&volume_time(Some(now)));
    pvd[847..864].copy_from_slice(&volume_time(None));
    pvd[864..881].copy_from_slice(&volume_time(None));
    pvd[881] = 1;
    pvd
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000, 0).unwrap()
    }

    /// Reads the root directory back the way a reader would: PVD -> root
    /// record -> directory records -> extents.
    fn read_back(image: &[u8]) -> (String, Vec<(String, Vec<u8>)>) {
        let pvd = &image[16 * SECTOR..17 * SECTOR];
        assert_eq!(&pvd[1..6], b"CD001");
        let volume = String::from_utf8_lossy(&pvd[40..72]).trim_end().to_owned();
        let total = u32::from_le_bytes(pvd[80..84].try_into().unwrap()) as usize;
        assert_eq!(total * SECTOR, image.len());
        let root_extent = u32::from_le_bytes(pvd[156 + 2..156 + 6].try_into().unwrap()) as usize;
        let dir = &image[root_extent * SECTOR..(root_extent + 1) * SECTOR];
        let mut files = Vec::new();
        let mut at = 0;
        while at < dir.len() && dir[at] != 0 {
            let len = dir[at] as usize;
            let record = &dir[at..at + len];
            let extent = u32::from_le_bytes(record[2..6].try_into().unwrap()) as usize;
            let size = u32::from_le_bytes(record[10..14].try_into().unwrap()) as usize;
            // Big-endian copies agree.
            assert_eq!(
                u32::from_be_bytes(record[6..10].try_into().unwrap()) as usize,
                extent
            );
            let id = &record[33..33 + record[32] as usize];
            if record[25] & 2 == 0 {
                let data = image[extent * SECTOR..extent * SECTOR + size].to_vec();
                files.push((String::from_utf8_lossy(id).into_owned(), data));
            }
            at += len;
        }
        (volume, files)
    }

    #[test]
    fn files_read_back_sorted_with_their_content() {
        let big = vec![7u8; 5000];
        let image = build(
            "cidata",
            &[
                ("user-data", b"#cloud-config\n"),
                ("meta-data", &big),
                ("empty", b""),
            ],
            now(),
        )
        .unwrap();
        let (volume, files) = read_back(&image);
        assert_eq!(volume, "cidata");
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["EMPTY;1", "META-DATA;1", "USER-DATA;1"]);
        assert_eq!(files[1].1, big);
        assert_eq!(files[2].1, b"#cloud-config\n");
        assert!(files[0].1.is_empty());
        // The terminator follows the primary descriptor.
        assert_eq!(image[17 * SECTOR], 255);
    }

    #[test]
    fn bad_names_and_sizes_are_refused() {
        assert_eq!(
            build("ci data", &[], now()),
            Err(IsoError::VolumeId("ci data".into()))
        );
        for name in ["", "../x", "a.b", "UPPER", &"x".repeat(31)] {
            assert!(
                matches!(
                    build("cidata", &[(name, b"")], now()),
                    Err(IsoError::Name(_))
                ),
                "{name}"
            );
        }
        assert!(matches!(
            build("cidata", &[("a", b""), ("a", b"")], now()),
            Err(IsoError::Duplicate(_))
        ));
        let names: Vec<String> = (0..60)
            .map(|i| format!("file-number-{i:04}-padding-x"))
            .collect();
        let files: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), &b""[..])).collect();
        assert_eq!(build("cidata", &files, now()), Err(IsoError::TooManyFiles));
    }
}
