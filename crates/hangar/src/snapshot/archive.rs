//! Snapshot archives: `export` writes, `import` reads back.
//!
//! An archive is a tar stream compressed with zstd. Its first member is
//! `snapshot.json`, an [`Envelope`]: the archive format, the snapshot's
//! record, and the name, size and sha256 of every other member. Then the
//! members, plain files with plain names: the snapshot's own files, and its
//! whole disk chain (the frozen layer, the layers of the snapshots before
//! it, the image's base) as `disk.qcow2`, `disk-1`, `disk-2`, ... so the
//! archive needs nothing from the host it came from. On import every
//! member is checked against the envelope while it streams (size first,
//! then sha256), the disk chain is relinked inside the new folder, and the
//! record is written last: a bad archive leaves nothing.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::store::{is_plain_name, parse_record, SnapshotStore, RECORD_FILE};
use super::{data_layer_name, SnapshotError, SnapshotFile, SnapshotRecord, ROOT_LAYER};
use crate::image::disk::DiskFormat;

/// Version of the archive layout written today; newer ones are refused.
pub const ARCHIVE_FORMAT: u32 = 1;
/// The envelope is small; a bigger first member is not one.
const MAX_ENVELOPE: u64 = 1 << 20;
/// zstd level: fast, and guest RAM full of zeros compresses anyway.
const ZSTD_LEVEL: i32 = 3;

/// `snapshot.json` inside an archive.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Envelope {
    pub format: u32,
    pub snapshot: SnapshotRecord,
    /// Every other member, in archive order.
    pub members: Vec<SnapshotFile>,
    /// The root disk's chain, top layer first (empty without a writable
    /// root disk): each layer's backing file is the next one.
    #[serde(default)]
    pub disk_chain: Vec<ChainLayer>,
    /// Each data disk's chain, in the spec's order, top layer first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data_chains: Vec<Vec<ChainLayer>>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChainLayer {
    pub name: String,
    pub format: DiskFormat,
}

/// What `export` wrote.
#[derive(Clone, Debug, Serialize)]
pub struct ExportSummary {
    pub snapshot: String,
    pub path: PathBuf,
    pub members: usize,
    /// Bytes of the members before compression, and of the archive.
    pub bytes: u64,
    pub archive_bytes: u64,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `record` (in `dir`) to `output`, atomically: a temporary file in
/// the same folder, renamed when complete.
pub fn export(
    record: &SnapshotRecord,
    dir: &Path,
    output: &Path,
) -> Result<ExportSummary, SnapshotError> {
    // The chains first: their members take the names they get here (an
    // imported snapshot lists `disk-1`... among its own files).
    let mut chain_sources = Vec::new();
    let writable = record.boot.root_disk.as_ref().is_some_and(|d| !d.read_only);
    let chain = if writable {
        add_chain(&mut chain_sources, dir, ROOT_LAYER, "disk")?
    } else {
        Vec::new()
    };
    let mut data_chains = Vec::new();
    for index in 0..record.boot.data_disks.len() {
        let top = data_layer_name(index);
        data_chains.push(add_chain(
            &mut chain_sources,
            dir,
            &top,
            &format!("data-{index}"),
        )?);
    }
    let mut sources: Vec<(String, PathBuf)> = record
        .files
        .iter()
        .filter(|f| !chain_sources.iter().any(|(name, _)| *name == f.name))
        .map(|f| (f.name.clone(), dir.join(&f.name)))
        .collect();
    sources.extend(chain_sources);
    let mut members = Vec::new();
    for (name, path) in &sources {
        let (bytes, sha256) = hash_file(path)?;
        members.push(SnapshotFile {
            name: name.clone(),
            bytes,
            sha256: Some(sha256),
        });
    }
    let envelope = Envelope {
        format: ARCHIVE_FORMAT,
        snapshot: record.clone(),
        members: members.clone(),
        disk_chain: chain,
        data_chains,
    };
    let parent = output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let temp = tempfile::NamedTempFile::new_in(parent).map_err(io(parent))?;
    let encoder = zstd::Encoder::new(temp.as_file(), ZSTD_LEVEL).map_err(io(output))?;
    let mut builder = tar::Builder::new(encoder);
    let text = serde_json::to_vec_pretty(&envelope).unwrap_or_default();
    append(
        &mut builder,
        RECORD_FILE,
        text.len() as u64,
        &mut text.as_slice(),
    )
    .map_err(io(output))?;
    for (name, path) in &sources {
        let mut file = std::fs::File::open(path).map_err(io(path))?;
        let length = file.metadata().map_err(io(path))?.len();
        append(&mut builder, name, length, &mut file).map_err(io(path))?;
    }
    let encoder = builder.into_inner().map_err(io(output))?;
    encoder.finish().map_err(io(output))?;
    temp.as_file().sync_all().map_err(io(output))?;
    temp.persist(output).map_err(|err| SnapshotError::Io {
        path: output.to_path_buf(),
        source: err.error,
    })?;
    let archive_bytes = std::fs::metadata(output).map_err(io(output))?.len();
    Ok(ExportSummary {
        snapshot: record.name.clone(),
        path: output.to_path_buf(),
        members: members.len(),
        bytes: members.iter().map(|m| m.bytes).sum(),
        archive_bytes,
    })
}

/// The chain under `top` (a file of the snapshot) as members: `top`
/// itself, then `PREFIX-1`, `PREFIX-2`, ... for the layers below it.
fn add_chain(
    sources: &mut Vec<(String, PathBuf)>,
    dir: &Path,
    top: &str,
    prefix: &str,
) -> Result<Vec<ChainLayer>, SnapshotError> {
    let mut chain = Vec::new();
    for (index, (path, format)) in disk_chain(&dir.join(top))?.into_iter().enumerate() {
        let name = layer_name(top, prefix, index);
        sources.push((name.clone(), path));
        chain.push(ChainLayer { name, format });
    }
    Ok(chain)
}

/// Layer `index` of a chain whose top is `top`: the top itself, then
/// `PREFIX-1`, `PREFIX-2`, ...
fn layer_name(top: &str, prefix: &str, index: usize) -> String {
    if index == 0 {
        top.to_owned()
    } else {
        format!("{prefix}-{index}")
    }
}

/// Refuses a chain whose layers are not named as `export` names them (no
/// other file of the snapshot can be made a layer).
fn check_names(
    chain: &[ChainLayer],
    top: &str,
    prefix: &str,
    bad: &dyn Fn(String) -> SnapshotError,
) -> Result<(), SnapshotError> {
    for (index, layer) in chain.iter().enumerate() {
        let want = layer_name(top, prefix, index);
        if layer.name != want {
            return Err(bad(format!(
                "disk layer {} should be named {want}",
                layer.name
            )));
        }
    }
    Ok(())
}

fn append<W: Write>(
    builder: &mut tar::Builder<W>,
    name: &str,
    length: u64,
    data: &mut dyn Read,
) -> std::io::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(length);
    header.set_mode(0o600);
    header.set_mtime(0);
    builder.append_data(&mut header, name, data.take(length))
}

/// The files of a qcow2's backing chain, top first, with their formats.
fn disk_chain(top: &Path) -> Result<Vec<(PathBuf, DiskFormat)>, SnapshotError> {
    let output = Command::new("qemu-img")
        .args(["info", "-U", "--backing-chain", "--output=json"])
        .arg(top)
        .output()
        .map_err(|source| SnapshotError::Io {
            path: PathBuf::from("qemu-img (install qemu-utils)"),
            source,
        })?;
    let damaged = |detail: String| SnapshotError::Damaged {
        path: top.to_path_buf(),
        detail,
    };
    if !output.status.success() {
        return Err(damaged(
            String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        ));
    }
    let layers: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout)
        .map_err(|err| damaged(format!("qemu-img info: {err}")))?;
    layers
        .iter()
        .map(|layer| {
            let path = layer
                .get("filename")
                .and_then(serde_json::Value::as_str)
                .ok_or_else(|| damaged("qemu-img info: a layer without a filename".into()))?;
            let format = match layer.get("format").and_then(serde_json::Value::as_str) {
                Some("qcow2") => DiskFormat::Qcow2,
                Some("raw") => DiskFormat::Raw,
                other => return Err(damaged(format!("layer {path}: format {other:?}"))),
            };
            Ok((PathBuf::from(path), format))
        })
        .collect()
}

fn hash_file(path: &Path) -> Result<(u64, String), SnapshotError> {
    let mut file = std::fs::File::open(path).map_err(io(path))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let read = file.read(&mut buffer).map_err(io(path))?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
        total += read as u64;
    }
    Ok((total, hex::encode(hasher.finalize())))
}

/// Reads an archive into the new folder `dir` (which exists, empty) as
/// snapshot `id` named `name`, and returns its record, not yet saved: the
/// caller saves it (the snapshot exists from then on) or removes `dir`.
pub fn import(
    archive: &Path,
    dir: &Path,
    id: &str,
    name: Option<&str>,
) -> Result<SnapshotRecord, SnapshotError> {
    let bad = |detail: String| SnapshotError::BadArchive {
        path: archive.to_path_buf(),
        detail,
    };
    let file = std::fs::File::open(archive).map_err(io(archive))?;
    let decoder = zstd::Decoder::new(file).map_err(|err| bad(format!("not zstd: {err}")))?;
    let mut tar = tar::Archive::new(decoder);
    let mut entries = tar.entries().map_err(|err| bad(err.to_string()))?;
    let mut first = entries
        .next()
        .ok_or_else(|| bad("empty archive".into()))?
        .map_err(|err| bad(format!("unreadable (truncated?): {err}")))?;
    if first.path_bytes().as_ref() != RECORD_FILE.as_bytes() || first.size() > MAX_ENVELOPE {
        return Err(bad(format!(
            "the first member is not a {RECORD_FILE} envelope"
        )));
    }
    let mut text = Vec::new();
    first
        .read_to_end(&mut text)
        .map_err(|err| bad(format!("reading {RECORD_FILE}: {err}")))?;
    drop(first);
    let envelope = parse_envelope(archive, &text)?;
    let mut expected: std::collections::BTreeMap<String, SnapshotFile> = envelope
        .members
        .iter()
        .map(|m| (m.name.clone(), m.clone()))
        .collect();
    for entry in entries {
        let mut entry = entry.map_err(|err| bad(format!("unreadable (truncated?): {err}")))?;
        let member = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        if entry.header().entry_type() != tar::EntryType::Regular {
            return Err(bad(format!("member {member:?} is not a plain file")));
        }
        let declared = expected.remove(&member).ok_or_else(|| {
            bad(format!(
                "member {member:?} is not in the envelope (or repeated)"
            ))
        })?;
        if entry.size() != declared.bytes {
            return Err(bad(format!(
                "member {member}: {} bytes, the envelope says {}",
                entry.size(),
                declared.bytes
            )));
        }
        let path = dir.join(&member);
        let out = crate::fsutil::create_private(&path).map_err(io(&path))?;
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let read = entry
                .read(&mut buffer)
                .map_err(|err| bad(format!("member {member}: {err} (truncated?)")))?;
            if read == 0 {
                break;
            }
            total += read as u64;
            if total > declared.bytes {
                return Err(bad(format!("member {member} is longer than declared")));
            }
            hasher.update(&buffer[..read]);
            // Holes where the member has zeros: a guest's untouched RAM
            // was a hole on the exporting host too.
            crate::fsutil::write_skipping_zeros(&out, total - read as u64, &buffer[..read])
                .map_err(io(&path))?;
        }
        out.set_len(total).map_err(io(&path))?;
        let sha256 = hex::encode(hasher.finalize());
        if total != declared.bytes || Some(&sha256) != declared.sha256.as_ref() {
            return Err(bad(format!(
                "member {member}: checksum mismatch (sha256 {sha256}, the envelope says {}); the archive is damaged or was changed",
                declared.sha256.as_deref().unwrap_or("none")
            )));
        }
        out.sync_all().map_err(io(&path))?;
    }
    if let Some(missing) = expected.keys().next() {
        return Err(bad(format!(
            "member {missing} is missing (truncated archive?)"
        )));
    }
    check_disks(dir, &envelope)?;
    relink_chain(dir, &envelope.disk_chain)?;
    for chain in &envelope.data_chains {
        relink_chain(dir, chain)?;
    }
    let mut record = envelope.snapshot;
    record.id = id.to_owned();
    if let Some(name) = name {
        record.name = name.to_owned();
    }
    // The chain now lives in this folder: no parent, whatever it had.
    record.parent = None;
    // Checked members; the disk layers' headers were relinked since.
    record.files = envelope.members;
    Ok(record)
}

/// Checks an envelope: its format, the record inside, member names and the
/// chain's names.
fn parse_envelope(archive: &Path, text: &[u8]) -> Result<Envelope, SnapshotError> {
    let bad = |detail: String| SnapshotError::BadArchive {
        path: archive.to_path_buf(),
        detail,
    };
    let value: serde_json::Value = serde_json::from_slice(text)
        .map_err(|err| bad(format!("{RECORD_FILE} is not JSON: {err}")))?;
    let format = value
        .get("format")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| bad(format!("{RECORD_FILE} has no archive `format`")))?;
    if format > u64::from(ARCHIVE_FORMAT) {
        return Err(bad(format!(
            "archive format {format} is newer than this hangar reads ({ARCHIVE_FORMAT}); upgrade hangar"
        )));
    }
    let snapshot_text = value
        .get("snapshot")
        .map(|v| serde_json::to_vec(v).unwrap_or_default())
        .ok_or_else(|| bad(format!("{RECORD_FILE} has no `snapshot`")))?;
    let record = parse_record(archive, &snapshot_text).map_err(|err| bad(err.to_string()))?;
    let spec = &record.spec;
    let host_disks = spec
        .data_disks
        .iter()
        .any(|disk| disk.path.is_some() || disk.size.is_none() || disk.read_only);
    if host_disks || spec.vsock || spec.uefi || spec.ssh.is_some() || !spec.shared_dirs.is_empty() {
        return Err(bad(
            "the snapshot's VM has host disk files, read-only data disks, vsock, UEFI, SSH or shared dirs, which snapshots do not carry".into(),
        ));
    }
    let envelope: Envelope =
        serde_json::from_value(value).map_err(|err| bad(format!("{RECORD_FILE}: {err}")))?;
    let mut seen = std::collections::BTreeSet::new();
    for member in &envelope.members {
        if !is_plain_name(&member.name) || member.name == RECORD_FILE {
            return Err(bad(format!("member name {:?} is not allowed", member.name)));
        }
        if !seen.insert(member.name.clone()) {
            return Err(bad(format!("member {} is listed twice", member.name)));
        }
        if member.sha256.as_ref().is_none_or(|s| s.len() != 64) {
            return Err(bad(format!("member {} has no sha256", member.name)));
        }
    }
    let data_disks = envelope.snapshot.spec.data_disks.len();
    if envelope.data_chains.len() != data_disks
        || envelope.snapshot.boot.data_disks.len() != data_disks
    {
        return Err(bad(format!(
            "the VM has {data_disks} data disks, the envelope {} chains and the record {} frozen layers",
            envelope.data_chains.len(),
            envelope.snapshot.boot.data_disks.len()
        )));
    }
    check_names(&envelope.disk_chain, ROOT_LAYER, "disk", &bad)?;
    for (index, chain) in envelope.data_chains.iter().enumerate() {
        check_names(
            chain,
            &data_layer_name(index),
            &format!("data-{index}"),
            &bad,
        )?;
    }
    let boot = &envelope.snapshot.boot;
    let writable_root = boot.root_disk.as_ref().filter(|disk| !disk.read_only);
    if writable_root.is_some_and(|disk| disk.path != Path::new(ROOT_LAYER)) {
        return Err(bad(format!("the writable root disk is not {ROOT_LAYER}")));
    }
    for (index, disk) in boot.data_disks.iter().enumerate() {
        let want = data_layer_name(index);
        if disk.path != Path::new(&want) {
            return Err(bad(format!("data disk {index} is not {want}")));
        }
    }
    let layers = envelope
        .disk_chain
        .iter()
        .chain(envelope.data_chains.iter().flatten());
    for layer in layers {
        if !seen.contains(&layer.name) {
            return Err(bad(format!("disk layer {} is not a member", layer.name)));
        }
    }
    Ok(envelope)
}

/// The disks an archive brings must be what its record boots, and none
/// may name a host file: the writable root is the top of the chain; every
/// layer is qcow2 without an external data file, the bottom one (and a
/// read-only base) without a backing file either (checked from the headers
/// before QEMU or qemu-img opens them).
fn check_disks(dir: &Path, envelope: &Envelope) -> Result<(), SnapshotError> {
    let damaged = |name: &str, detail: String| SnapshotError::Damaged {
        path: dir.join(name),
        detail,
    };
    let chain = &envelope.disk_chain;
    match &envelope.snapshot.boot.root_disk {
        Some(disk) if !disk.read_only => {
            let top = chain
                .first()
                .ok_or_else(|| damaged(ROOT_LAYER, "the root disk has no chain".into()))?;
            if Some(top.name.as_str()) != disk.path.to_str() || top.format != DiskFormat::Qcow2 {
                return Err(damaged(
                    &top.name,
                    "the chain's top is not the root disk".into(),
                ));
            }
        }
        Some(disk) => {
            let name = disk.path.to_string_lossy().into_owned();
            let detected = crate::image::disk::detect_file(&dir.join(&name))
                .map_err(|err| damaged(&name, err.to_string()))?;
            if detected.format != disk.format || !chain.is_empty() {
                return Err(damaged(
                    &name,
                    "the read-only root disk is not what the record says".into(),
                ));
            }
        }
        None if !chain.is_empty() => {
            return Err(damaged(
                ROOT_LAYER,
                "a disk chain without a root disk".into(),
            ));
        }
        None => {}
    }
    check_layers(dir, chain)?;
    let saved = &envelope.snapshot.boot.data_disks;
    for (disk, chain) in saved.iter().zip(&envelope.data_chains) {
        let top = chain.first().ok_or_else(|| {
            damaged(
                &disk.path.to_string_lossy(),
                "a data disk has no chain".into(),
            )
        })?;
        if Some(top.name.as_str()) != disk.path.to_str()
            || top.format != DiskFormat::Qcow2
            || disk.format != DiskFormat::Qcow2
        {
            return Err(damaged(
                &top.name,
                "a data disk chain's top is not its frozen layer".into(),
            ));
        }
        check_layers(dir, chain)?;
    }
    Ok(())
}

/// Every layer of a chain is what the envelope says: upper layers qcow2
/// without an external data file, the bottom one of its stated format.
fn check_layers(dir: &Path, chain: &[ChainLayer]) -> Result<(), SnapshotError> {
    let damaged = |name: &str, detail: String| SnapshotError::Damaged {
        path: dir.join(name),
        detail,
    };
    for (index, layer) in chain.iter().enumerate() {
        let path = dir.join(&layer.name);
        if index + 1 == chain.len() {
            let detected = crate::image::disk::detect_file(&path)
                .map_err(|err| damaged(&layer.name, err.to_string()))?;
            if detected.format != layer.format {
                return Err(damaged(
                    &layer.name,
                    format!(
                        "is {:?}, the envelope says {:?}",
                        detected.format, layer.format
                    ),
                ));
            }
            continue;
        }
        let mut head = [0u8; 80];
        let mut file = std::fs::File::open(&path).map_err(io(&path))?;
        let read = file.read(&mut head).map_err(io(&path))?;
        let be = |range: std::ops::Range<usize>| {
            head[range]
                .iter()
                .fold(0u64, |acc, b| acc << 8 | u64::from(*b))
        };
        if read < 80 || &head[..4] != b"QFI\xfb" || layer.format != DiskFormat::Qcow2 {
            return Err(damaged(
                &layer.name,
                "an upper disk layer is not qcow2".into(),
            ));
        }
        if be(4..8) >= 3 && be(72..80) & (1 << 2) != 0 {
            return Err(damaged(
                &layer.name,
                "the layer names an external data file".into(),
            ));
        }
    }
    Ok(())
}

/// Points each imported layer at the next one in this folder (absolute
/// paths, like every chain on this host).
fn relink_chain(dir: &Path, chain: &[ChainLayer]) -> Result<(), SnapshotError> {
    for pair in chain.windows(2) {
        let (layer, backing) = (&pair[0], &pair[1]);
        if layer.format != DiskFormat::Qcow2 {
            return Err(SnapshotError::Damaged {
                path: dir.join(&layer.name),
                detail: "a raw disk cannot have a backing file".into(),
            });
        }
        let output = Command::new("qemu-img")
            .args([
                "rebase",
                "-u",
                "-f",
                "qcow2",
                "-F",
                backing.format.as_str(),
                "-b",
            ])
            .arg(dir.join(&backing.name))
            .arg(dir.join(&layer.name))
            .output()
            .map_err(|source| SnapshotError::Io {
                path: PathBuf::from("qemu-img (install qemu-utils)"),
                source,
            })?;
        if !output.status.success() {
            return Err(SnapshotError::Damaged {
                path: dir.join(&layer.name),
                detail: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
    }
    // An archive must not make QEMU open a host file it names: the bottom
    // layer stands alone and no layer has an external data file.
    for (index, layer) in chain.iter().enumerate() {
        let path = dir.join(&layer.name);
        let info = Command::new("qemu-img")
            .args(["info", "-U", "--output=json"])
            .arg(&path)
            .output()
            .map_err(io(&path))?;
        let value: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap_or_default();
        let bottom = index + 1 == chain.len();
        let refuse = |detail: &str| SnapshotError::Damaged {
            path: path.clone(),
            detail: detail.into(),
        };
        if !info.status.success() {
            return Err(refuse("qemu-img cannot read this layer"));
        }
        if bottom && value.get("backing-filename").is_some() {
            return Err(refuse(
                "the bottom disk layer names a backing file of its own",
            ));
        }
        if value.pointer("/format-specific/data/data-file").is_some() {
            return Err(refuse("the layer names an external data file"));
        }
    }
    Ok(())
}

/// Removes a folder an import left unfinished.
pub fn discard(store: &SnapshotStore, id: &str) {
    let _ = std::fs::remove_dir_all(store.dir(id));
}

#[cfg(test)]
mod tests;
