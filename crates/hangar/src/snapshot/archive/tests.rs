//! Export/import round trips and hostile envelopes.

use super::*;
use crate::record::{Accel, BackendKind, SavedBoot};
use crate::snapshot::{MemoryForm, Resources, SourceVm, SNAPSHOT_FORMAT};
use serde_json::json;

fn record() -> SnapshotRecord {
    SnapshotRecord {
        format: SNAPSHOT_FORMAT,
        id: "0a0000000001".into(),
        name: "warm".into(),
        description: None,
        created_at: chrono::Utc::now(),
        source: SourceVm {
            id: "0a0000000002".into(),
            name: "web".into(),
        },
        backend: BackendKind::Qemu,
        accel: Accel::Tcg,
        vmm_version: "QEMU emulator version 7.2.22".into(),
        agent_protocol: hangar_proto::PROTOCOL_VERSION,
        spec: crate::spec::VmSpec::new("web"),
        resources: Resources {
            cpus: 1,
            memory: crate::size::ByteSize(256 << 20),
            disk_bytes: None,
            nics: Vec::new(),
            machine: None,
        },
        memory: MemoryForm::File,
        boot: SavedBoot {
            kernel: Some("kernel".into()),
            initramfs: None,
            cmdline: String::new(),
            root_disk: None,
            firmware_boot: false,
            data_disks: Vec::new(),
        },
        parent: None,
        image: Some("default".into()),
        seed_bytes: None,
        paused_ms: 1,
        files: vec![
            SnapshotFile {
                name: "kernel".into(),
                bytes: 6,
                sha256: None,
            },
            SnapshotFile {
                name: "state".into(),
                bytes: 5,
                sha256: None,
            },
        ],
    }
}

fn exported(dir: &Path) -> (SnapshotRecord, PathBuf) {
    let source = dir.join("source");
    std::fs::create_dir_all(&source).unwrap();
    std::fs::write(source.join("kernel"), b"kernel").unwrap();
    std::fs::write(source.join("state"), b"state").unwrap();
    let record = record();
    let archive = dir.join("warm.tar.zst");
    let summary = export(&record, &source, &archive).unwrap();
    assert_eq!((summary.members, summary.bytes), (2, 11));
    (record, archive)
}

#[test]
fn an_export_imports_back_with_checked_members() {
    let dir = tempfile::tempdir().unwrap();
    let (record, archive) = exported(dir.path());
    let target = dir.path().join("target");
    std::fs::create_dir_all(&target).unwrap();
    let imported = import(&archive, &target, "0a00000000ff", Some("copy")).unwrap();
    assert_eq!(
        (imported.id.as_str(), imported.name.as_str()),
        ("0a00000000ff", "copy")
    );
    assert_eq!(imported.spec, record.spec);
    assert!(imported.files.iter().all(|f| f.sha256.is_some()));
    assert_eq!(std::fs::read(target.join("state")).unwrap(), b"state");
}

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_data_disk_chain_travels_and_an_imported_snapshot_exports_again() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source");
    std::fs::create_dir_all(&source).unwrap();
    std::fs::write(source.join("kernel"), b"kernel").unwrap();
    std::fs::write(source.join("state"), b"state").unwrap();
    // The data disk's frozen layer sits on an earlier snapshot's.
    let earlier = dir.path().join("earlier.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        earlier.to_str().unwrap(),
        "1M",
    ]);
    let top = source.join("data-0.qcow2");
    let backing = earlier.to_str().unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        "-b",
        backing,
        top.to_str().unwrap(),
    ]);
    let mut record = record();
    record.spec.data_disks = vec![crate::spec::DataDisk {
        size: Some(crate::size::ByteSize(1 << 20)),
        path: None,
        read_only: false,
    }];
    record.boot.data_disks = vec![crate::record::SavedDisk {
        path: "data-0.qcow2".into(),
        format: DiskFormat::Qcow2,
        read_only: false,
    }];
    record.files.push(SnapshotFile {
        name: "data-0.qcow2".into(),
        bytes: 0,
        sha256: None,
    });
    let mut from = source;
    for round in 0..2 {
        let archive = dir.path().join(format!("round-{round}.tar.zst"));
        let summary = export(&record, &from, &archive).unwrap();
        assert_eq!(summary.members, 4, "kernel, state and two layers");
        let target = dir.path().join(format!("target-{round}"));
        std::fs::create_dir_all(&target).unwrap();
        record = import(&archive, &target, "0a00000000ff", None).unwrap();
        let chain = disk_chain(&target.join("data-0.qcow2")).unwrap();
        let inside: Vec<PathBuf> = chain.into_iter().map(|(path, _)| path).collect();
        assert_eq!(
            inside,
            [target.join("data-0.qcow2"), target.join("data-0-1")]
        );
        from = target;
    }
}

/// Rewrites the archive's envelope with `edit` (members unchanged).
fn with_envelope(archive: &Path, edit: impl Fn(&mut serde_json::Value)) -> Vec<u8> {
    let plain = zstd::decode_all(std::fs::File::open(archive).unwrap()).unwrap();
    let mut reader = tar::Archive::new(plain.as_slice());
    let mut builder = tar::Builder::new(Vec::new());
    for entry in reader.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().to_string_lossy().into_owned();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        if name == RECORD_FILE {
            let mut value: serde_json::Value = serde_json::from_slice(&data).unwrap();
            edit(&mut value);
            data = serde_json::to_vec(&value).unwrap();
        }
        append(&mut builder, &name, data.len() as u64, &mut data.as_slice()).unwrap();
    }
    zstd::encode_all(builder.into_inner().unwrap().as_slice(), 1).unwrap()
}

type Edit = Box<dyn Fn(&mut serde_json::Value)>;

fn layer(name: &str) -> serde_json::Value {
    json!({ "name": name, "format": "qcow2" })
}

/// Gives the envelope's VM one data disk of its own, frozen as `path`,
/// whose chain is `chain`.
fn one_data_disk(v: &mut serde_json::Value, path: &str, chain: serde_json::Value) {
    v["snapshot"]["spec"]["data_disks"] = json!([{ "size": 1 << 20 }]);
    v["snapshot"]["boot"]["data_disks"] =
        json!([{ "path": path, "format": "qcow2", "read_only": false }]);
    v["data_chains"] = json!([chain]);
}

#[test]
fn hostile_or_damaged_envelopes_are_refused_and_nothing_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (_, archive) = exported(dir.path());
    let cases: Vec<(&str, Edit)> = vec![
        (
            "member name \"../x\"",
            Box::new(|v| v["members"][0]["name"] = "../x".into()),
        ),
        (
            "listed twice",
            Box::new(|v| {
                let first = v["members"][0].clone();
                v["members"].as_array_mut().unwrap().push(first);
            }),
        ),
        (
            "checksum mismatch",
            Box::new(|v| v["members"][1]["sha256"] = "0".repeat(64).into()),
        ),
        (
            "no sha256",
            Box::new(|v| v["members"][1]["sha256"] = serde_json::Value::Null),
        ),
        (
            "not a plain name",
            Box::new(|v| v["snapshot"]["boot"]["kernel"] = "/etc/shadow".into()),
        ),
        (
            "is not a VM name and id",
            Box::new(|v| v["snapshot"]["source"]["name"] = "web\u{1b}[2J".into()),
        ),
        (
            "snapshot.json is format 7",
            Box::new(|v| v["snapshot"]["format"] = 7.into()),
        ),
        (
            "is not in the envelope",
            Box::new(|v| {
                v["members"].as_array_mut().unwrap().remove(0);
            }),
        ),
        (
            "host disk files",
            Box::new(|v| {
                v["snapshot"]["spec"]["data_disks"] = json!([{ "path": "/dev/sda" }]);
            }),
        ),
        (
            "1 data disks, the envelope 0 chains and the record 0 frozen layers",
            Box::new(|v| {
                v["snapshot"]["spec"]["data_disks"] = json!([{ "size": 1 << 20 }]);
            }),
        ),
        (
            "not a plain name",
            Box::new(|v| one_data_disk(v, "/etc/shadow", json!([layer("state")]))),
        ),
        (
            "disk layer state should be named data-0.qcow2",
            Box::new(|v| one_data_disk(v, "state", json!([layer("state"), layer("state")]))),
        ),
        (
            "data disk 0 is not data-0.qcow2",
            Box::new(|v| one_data_disk(v, "kernel", json!([layer("data-0.qcow2")]))),
        ),
        (
            "the writable root disk is not disk.qcow2",
            Box::new(|v| {
                v["snapshot"]["boot"]["root_disk"] =
                    json!({ "path": "state", "format": "qcow2", "read_only": false });
            }),
        ),
    ];
    for (expected, edit) in cases {
        let bad = dir.path().join("bad.tar.zst");
        std::fs::write(&bad, with_envelope(&archive, edit)).unwrap();
        let target = dir.path().join("bad-target");
        std::fs::create_dir_all(&target).unwrap();
        let err = import(&bad, &target, "0a00000000fe", None)
            .unwrap_err()
            .to_string();
        assert!(err.contains(expected), "{expected}: {err}");
        std::fs::remove_dir_all(&target).unwrap();
    }
}
