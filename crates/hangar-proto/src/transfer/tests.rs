use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

use tar::{EntryType, Header};

use super::*;

fn mode_of(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
}

/// A source tree: files with modes, a nested and a read-only directory,
/// relative and absolute symlinks, an empty file.
fn sample_tree(root: &Path) -> PathBuf {
    let src = root.join("src");
    fs::create_dir_all(src.join("nested/deeper")).unwrap();
    fs::write(src.join("run.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(src.join("run.sh"), fs::Permissions::from_mode(0o750)).unwrap();
    fs::write(src.join("empty"), b"").unwrap();
    fs::write(src.join("nested/deeper/data.bin"), vec![7u8; 100_000]).unwrap();
    symlink("nested/deeper/data.bin", src.join("relative-link")).unwrap();
    symlink("/etc/passwd", src.join("absolute-link")).unwrap();
    fs::create_dir(src.join("readonly")).unwrap();
    fs::write(src.join("readonly/kept"), b"kept").unwrap();
    fs::set_permissions(src.join("readonly"), fs::Permissions::from_mode(0o555)).unwrap();
    src
}

fn round_trip(source: &Path, dest: &Path) -> Result<CopySummary, TransferError> {
    let mut stream = Vec::new();
    pack(source, &mut stream)?;
    unpack(stream.as_slice(), dest, UnpackOptions::default())
}

#[test]
fn a_directory_to_a_new_path_takes_that_name_with_modes_and_links() {
    let tmp = tempfile::tempdir().unwrap();
    let src = sample_tree(tmp.path());
    let dest = tmp.path().join("copy");
    let summary = round_trip(&src, &dest).unwrap();
    assert_eq!(
        summary,
        CopySummary {
            files: 4,
            dirs: 4,
            symlinks: 2,
            bytes: 100_000 + 18 + 4,
        }
    );
    assert_eq!(
        fs::read(dest.join("run.sh")).unwrap(),
        b"#!/bin/sh\necho hi\n"
    );
    assert_eq!(mode_of(&dest.join("run.sh")), 0o750);
    assert_eq!(mode_of(&dest.join("readonly")), 0o555);
    assert_eq!(fs::read(dest.join("readonly/kept")).unwrap(), b"kept");
    assert_eq!(
        fs::read_link(dest.join("relative-link")).unwrap(),
        Path::new("nested/deeper/data.bin")
    );
    assert_eq!(
        fs::read_link(dest.join("absolute-link")).unwrap(),
        Path::new("/etc/passwd")
    );
    assert_eq!(
        fs::read(dest.join("nested/deeper/data.bin")).unwrap().len(),
        100_000
    );
    assert_eq!(
        fs::metadata(dest.join("run.sh")).unwrap().mtime(),
        fs::metadata(src.join("run.sh")).unwrap().mtime()
    );
    fs::set_permissions(dest.join("readonly"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(src.join("readonly"), fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn into_an_existing_directory_keeps_the_source_name() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("notes.txt");
    fs::write(&file, b"n").unwrap();
    let dir = tmp.path().join("into");
    fs::create_dir(&dir).unwrap();
    round_trip(&file, &dir).unwrap();
    assert_eq!(fs::read(dir.join("notes.txt")).unwrap(), b"n");
    // A file onto an existing file replaces it.
    let other = tmp.path().join("other.txt");
    fs::write(&other, b"old").unwrap();
    round_trip(&file, &other).unwrap();
    assert_eq!(fs::read(&other).unwrap(), b"n");
}

#[test]
fn destination_errors_name_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let src = sample_tree(tmp.path());
    let file = tmp.path().join("f");
    fs::write(&file, b"x").unwrap();
    assert!(matches!(
        round_trip(&src, &file),
        Err(TransferError::DirectoryOntoFile { .. })
    ));
    assert!(matches!(
        round_trip(&file, &tmp.path().join("missing/dir/f")),
        Err(TransferError::NoDestination { .. })
    ));
    assert!(matches!(
        round_trip(&file, &tmp.path().join("newdir/")),
        Err(TransferError::NoDestination { .. })
    ));
    assert!(matches!(
        round_trip(&tmp.path().join("absent"), &tmp.path().join("x")),
        Err(TransferError::NoSource { .. })
    ));
    fs::set_permissions(src.join("readonly"), fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn a_symlink_source_is_copied_as_a_link() {
    let tmp = tempfile::tempdir().unwrap();
    let link = tmp.path().join("link");
    symlink("/nonexistent/target", &link).unwrap();
    let dest = tmp.path().join("copied");
    let summary = round_trip(&link, &dest).unwrap();
    assert_eq!(summary.symlinks, 1);
    assert_eq!(
        fs::read_link(&dest).unwrap(),
        Path::new("/nonexistent/target")
    );
}

#[test]
fn an_existing_symlink_at_the_target_is_replaced_not_followed() {
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside");
    fs::write(&outside, b"untouched").unwrap();
    let dest = tmp.path().join("dest");
    fs::create_dir(&dest).unwrap();
    symlink(&outside, dest.join("file")).unwrap();
    let file = tmp.path().join("file");
    fs::write(&file, b"new").unwrap();
    round_trip(&file, &dest).unwrap();
    assert_eq!(fs::read(&outside).unwrap(), b"untouched");
    assert_eq!(fs::read(dest.join("file")).unwrap(), b"new");
    assert!(!fs::symlink_metadata(dest.join("file"))
        .unwrap()
        .file_type()
        .is_symlink());
}

#[test]
fn special_files_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let fifo = tmp.path().join("fifo");
    let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path and a plain mode.
    #[allow(unsafe_code)]
    let made = unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) };
    assert_eq!(made, 0);
    let err = pack(&fifo, Vec::new()).unwrap_err();
    assert!(err.to_string().contains("named pipe"), "{err}");
}

/// A raw tar entry with any name, bypassing the tar crate's own checks
/// (hostile streams are what the other side may send).
fn raw_entry(name: &[u8], kind: EntryType, link: Option<&[u8]>, data: &[u8]) -> Vec<u8> {
    let mut header = Header::new_old();
    header.as_old_mut().name[..name.len()].copy_from_slice(name);
    if let Some(link) = link {
        header.as_old_mut().linkname[..link.len()].copy_from_slice(link);
    }
    header.set_entry_type(kind);
    header.set_mode(0o644);
    header.set_size(data.len() as u64);
    header.set_cksum();
    let mut out = header.as_bytes().to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

fn stream(entries: &[Vec<u8>]) -> Vec<u8> {
    let mut out: Vec<u8> = entries.concat();
    out.extend_from_slice(&[0u8; 1024]);
    out
}

fn unpack_hostile(entries: &[Vec<u8>]) -> (tempfile::TempDir, TransferError) {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("dest");
    fs::create_dir(&dest).unwrap();
    let err = unpack(stream(entries).as_slice(), &dest, UnpackOptions::default()).unwrap_err();
    (tmp, err)
}

/// Every file under `root` except those under `dest`.
fn outside_dest(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in fs::read_dir(root).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name() != Some("dest".as_ref()) {
            found.push(path);
        }
    }
    found
}

#[test]
fn hostile_paths_are_refused_and_nothing_lands_outside() {
    let cases: Vec<(&str, Vec<Vec<u8>>)> = vec![
        (
            "parent",
            vec![raw_entry(b"../evil", EntryType::Regular, None, b"x")],
        ),
        (
            "nested parent",
            vec![
                raw_entry(b"root/", EntryType::Directory, None, b""),
                raw_entry(b"root/../../evil", EntryType::Regular, None, b"x"),
            ],
        ),
        (
            "absolute",
            vec![raw_entry(b"/tmp/evil", EntryType::Regular, None, b"x")],
        ),
        (
            "second root",
            vec![
                raw_entry(b"root/", EntryType::Directory, None, b""),
                raw_entry(b"other/evil", EntryType::Regular, None, b"x"),
            ],
        ),
    ];
    for (what, entries) in cases {
        let (tmp, err) = unpack_hostile(&entries);
        assert!(
            matches!(err, TransferError::UnsafePath { .. }),
            "{what}: {err}"
        );
        assert!(outside_dest(tmp.path()).is_empty(), "{what}");
    }
}

#[test]
fn a_symlink_in_the_stream_is_never_followed() {
    let entries = [
        raw_entry(b"root/", EntryType::Directory, None, b""),
        raw_entry(b"root/escape", EntryType::Symlink, Some(b".."), b""),
        raw_entry(b"root/escape/evil", EntryType::Regular, None, b"x"),
    ];
    let (tmp, err) = unpack_hostile(&entries);
    assert!(matches!(err, TransferError::ThroughSymlink { .. }), "{err}");
    assert!(err.to_string().contains("root/escape/evil"), "{err}");
    assert!(outside_dest(tmp.path()).is_empty());
    assert!(!tmp.path().join("dest/evil").exists());
}

#[test]
fn links_and_devices_in_the_stream_are_refused() {
    for kind in [
        EntryType::Link,
        EntryType::Char,
        EntryType::Block,
        EntryType::Fifo,
    ] {
        let entries = [
            raw_entry(b"root/", EntryType::Directory, None, b""),
            raw_entry(b"root/x", kind, Some(b"/etc/shadow"), b""),
        ];
        let (_tmp, err) = unpack_hostile(&entries);
        assert!(
            matches!(err, TransferError::UnsupportedEntry { .. }),
            "{kind:?}: {err}"
        );
    }
}

#[test]
fn setid_bits_are_dropped_unless_asked_for() {
    let mut header = Header::new_old();
    header.set_path("tool").unwrap();
    header.set_entry_type(EntryType::Regular);
    header.set_mode(0o4755);
    header.set_size(1);
    header.set_cksum();
    let mut entry = header.as_bytes().to_vec();
    entry.push(b'x');
    entry.resize(1024, 0);
    let bytes = stream(&[entry]);
    let tmp = tempfile::tempdir().unwrap();
    unpack(bytes.as_slice(), tmp.path(), UnpackOptions::default()).unwrap();
    assert_eq!(mode_of(&tmp.path().join("tool")), 0o755);
    let kept = tmp.path().join("kept");
    fs::create_dir(&kept).unwrap();
    let options = UnpackOptions {
        keep_setid_bits: true,
        ..Default::default()
    };
    unpack(bytes.as_slice(), &kept, options).unwrap();
    assert_eq!(mode_of(&kept.join("tool")), 0o4755);
}

#[test]
fn a_truncated_stream_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("big");
    fs::write(&file, vec![1u8; 50_000]).unwrap();
    let mut bytes = Vec::new();
    pack(&file, &mut bytes).unwrap();
    bytes.truncate(20_000);
    let dest = tmp.path().join("dest");
    fs::create_dir(&dest).unwrap();
    let err = unpack(bytes.as_slice(), &dest, UnpackOptions::default()).unwrap_err();
    assert!(matches!(err, TransferError::Stream(_)), "{err}");
    assert!(matches!(
        unpack(&[][..], &dest, UnpackOptions::default()),
        Err(TransferError::Empty)
    ));
}

#[test]
fn long_names_survive() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let long = "d".repeat(120);
    let deep = src.join(&long).join(&long);
    fs::create_dir_all(&deep).unwrap();
    fs::write(deep.join("f".repeat(200)), b"long").unwrap();
    symlink("t".repeat(150), deep.join("l")).unwrap();
    let dest = tmp.path().join("dest");
    round_trip(&src, &dest).unwrap();
    let copied = dest.join(&long).join(&long);
    assert_eq!(fs::read(copied.join("f".repeat(200))).unwrap(), b"long");
    assert_eq!(
        fs::read_link(copied.join("l")).unwrap(),
        PathBuf::from("t".repeat(150))
    );
}

#[test]
fn the_host_names_what_a_guest_stream_creates_in_an_existing_directory() {
    // A guest asked for `/var/log/app.log` answers with `.ssh/` instead,
    // hoping to replace the user's keys and loosen the directory.
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    fs::create_dir_all(home.join(".ssh")).unwrap();
    fs::set_permissions(home.join(".ssh"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::write(home.join(".ssh/authorized_keys"), "mine").unwrap();
    let mut dir_header = Header::new_gnu();
    dir_header.set_entry_type(EntryType::Directory);
    dir_header.set_mode(0o777);
    dir_header.set_size(0);
    let mut builder = tar::Builder::new(Vec::new());
    builder
        .append_data(&mut dir_header, ".ssh", std::io::empty())
        .unwrap();
    let mut file_header = Header::new_gnu();
    file_header.set_entry_type(EntryType::Regular);
    file_header.set_mode(0o644);
    file_header.set_size(8);
    builder
        .append_data(&mut file_header, ".ssh/authorized_keys", &b"attacker"[..])
        .unwrap();
    let bytes = builder.into_inner().unwrap();
    let options = UnpackOptions {
        root_name: Some(expected_root_name("/var/log/app.log")),
        ..Default::default()
    };
    unpack(bytes.as_slice(), &home, options).unwrap();
    assert_eq!(
        fs::read(home.join(".ssh/authorized_keys")).unwrap(),
        b"mine"
    );
    assert_eq!(mode_of(&home.join(".ssh")), 0o700);
    assert_eq!(
        fs::read(home.join("app.log/authorized_keys")).unwrap(),
        b"attacker"
    );
}

#[test]
fn an_existing_directory_keeps_its_mode_and_huge_mtimes_do_not_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("dest");
    fs::create_dir_all(dest.join("tree")).unwrap();
    fs::set_permissions(dest.join("tree"), fs::Permissions::from_mode(0o750)).unwrap();
    let mut builder = tar::Builder::new(Vec::new());
    let mut dir_header = Header::new_gnu();
    dir_header.set_entry_type(EntryType::Directory);
    dir_header.set_mode(0o777);
    dir_header.set_size(0);
    dir_header.set_mtime(u64::MAX);
    builder
        .append_data(&mut dir_header, "tree", std::io::empty())
        .unwrap();
    let mut file_header = Header::new_gnu();
    file_header.set_entry_type(EntryType::Regular);
    file_header.set_mode(0o644);
    file_header.set_size(1);
    file_header.set_mtime(u64::MAX);
    builder
        .append_data(&mut file_header, "tree/f", &b"x"[..])
        .unwrap();
    let bytes = builder.into_inner().unwrap();
    unpack(bytes.as_slice(), &dest, UnpackOptions::default()).unwrap();
    assert_eq!(mode_of(&dest.join("tree")), 0o750);
    assert_eq!(fs::read(dest.join("tree/f")).unwrap(), b"x");
}
