use super::*;

use std::os::unix::fs::{FileTypeExt, MetadataExt};

use flate2::write::GzEncoder;
use tar::{Builder, Header};

const MTIME: u64 = 1_600_000_000;

/// The owner the layers use: uid/gid 1000 as root (as the tests normally
/// run), our own ids otherwise so the tests still pass unprivileged.
fn owner() -> (u32, u32) {
    if nix::unistd::geteuid().is_root() {
        (1000, 1000)
    } else {
        (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        )
    }
}

/// A layer built in memory.
struct Layer(Builder<Vec<u8>>);

fn header(kind: EntryType, mode: u32, size: u64) -> Header {
    let (uid, gid) = owner();
    let mut header = Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_uid(uid.into());
    header.set_gid(gid.into());
    header.set_mtime(MTIME);
    header.set_size(size);
    header
}

impl Layer {
    fn new() -> Self {
        Self(Builder::new(Vec::new()))
    }

    fn file(mut self, path: &str, mode: u32, data: &[u8]) -> Self {
        let mut header = header(EntryType::Regular, mode, data.len() as u64);
        self.0.append_data(&mut header, path, data).unwrap();
        self
    }

    fn dir(mut self, path: &str, mode: u32) -> Self {
        let mut header = header(EntryType::Directory, mode, 0);
        self.0.append_data(&mut header, path, io::empty()).unwrap();
        self
    }

    fn link(mut self, kind: EntryType, path: &str, target: &str) -> Self {
        let mut header = header(kind, 0o777, 0);
        self.0.append_link(&mut header, path, target).unwrap();
        self
    }

    fn symlink(self, path: &str, target: &str) -> Self {
        self.link(EntryType::Symlink, path, target)
    }

    fn hardlink(self, path: &str, target: &str) -> Self {
        self.link(EntryType::Link, path, target)
    }

    fn special(mut self, kind: EntryType, path: &str, mode: u32) -> Self {
        let mut header = header(kind, mode, 0);
        self.0.append_data(&mut header, path, io::empty()).unwrap();
        self
    }

    /// An entry whose name and link name are written as raw header bytes,
    /// so names the tar crate refuses to write (`../x`, `/x`) can be tested.
    fn raw(mut self, kind: EntryType, name: &[u8], link: &[u8], data: &[u8]) -> Self {
        let mut header = header(kind, 0o644, data.len() as u64);
        header.as_old_mut().name[..name.len()].copy_from_slice(name);
        header.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        header.set_cksum();
        let out = self.0.get_mut();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(512), 0);
        self
    }

    /// A PAX extended header giving the next entry's path.
    fn pax_path(mut self, path: &str) -> Self {
        let record = pax_record("path", path);
        let mut header = header(EntryType::XHeader, 0o644, record.len() as u64);
        self.0
            .append_data(&mut header, "PaxHeaders/next", record.as_bytes())
            .unwrap();
        self
    }

    /// A PAX extended header with records for the next entry.
    fn pax(mut self, records: &[(&str, &str)]) -> Self {
        let body: String = records.iter().map(|(k, v)| pax_record(k, v)).collect();
        let mut header = header(EntryType::XHeader, 0o644, body.len() as u64);
        self.0
            .append_data(&mut header, "PaxHeaders/next", body.as_bytes())
            .unwrap();
        self
    }

    fn finish(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

/// One PAX record: `<length> <key>=<value>\n`, the length counting itself.
fn pax_record(key: &str, value: &str) -> String {
    let body = format!(" {key}={value}\n");
    let mut len = body.len() + 1;
    while format!("{len}{body}").len() != len {
        len += 1;
    }
    format!("{len}{body}")
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

/// `<tmp>/root`, and the checks that nothing escaped it.
struct Sandbox {
    tmp: tempfile::TempDir,
    root: PathBuf,
}

impl Sandbox {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        fs::create_dir(&root).unwrap();
        Self { tmp, root }
    }

    fn apply(&self, layer: &[u8]) -> Result<LayerStats, LayerError> {
        let result = apply_layer(layer, &self.root);
        self.assert_contained();
        result
    }

    fn assert_contained(&self) {
        let names: Vec<_> = fs::read_dir(self.tmp.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(names, ["root"], "something was written beside the root");
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn lmeta(&self, rel: &str) -> fs::Metadata {
        fs::symlink_metadata(self.path(rel)).unwrap()
    }

    fn exists(&self, rel: &str) -> bool {
        fs::symlink_metadata(self.path(rel)).is_ok()
    }

    fn read(&self, rel: &str) -> String {
        fs::read_to_string(self.path(rel)).unwrap()
    }

    /// Root's entries, sorted, as relative paths.
    fn tree(&self) -> Vec<String> {
        fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
            for entry in fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                out.push(path.strip_prefix(base).unwrap().display().to_string());
                if fs::symlink_metadata(&path).unwrap().is_dir() {
                    walk(&path, base, out);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.root, &self.root, &mut out);
        out.sort();
        out
    }
}

#[test]
fn files_dirs_links_and_fifos_with_modes_and_owners() {
    let sandbox = Sandbox::new();
    let (uid, gid) = owner();
    let layer = Layer::new()
        .dir("./", 0o755)
        .dir("./etc", 0o750)
        .file("./etc/hostname", 0o644, b"hangar\n")
        .file("usr/bin/su", 0o4755, b"#!setuid")
        .dir("ro", 0o555)
        .file("ro/inside", 0o400, b"x")
        .symlink("etc/link", "/no/such/target")
        .hardlink("usr/bin/su-again", "usr/bin/su")
        .special(EntryType::Fifo, "run/fifo", 0o620)
        .finish();
    let stats = sandbox.apply(&layer).unwrap();
    assert_eq!(
        stats,
        LayerStats {
            entries: 8,
            bytes: 16,
            whiteouts: 0
        }
    );

    let etc = sandbox.lmeta("etc");
    assert!(etc.is_dir());
    assert_eq!(etc.mode() & 0o7777, 0o750);
    assert_eq!((etc.uid(), etc.gid()), (uid, gid));
    assert_eq!(
        etc.mtime(),
        MTIME as i64,
        "directory mtime set after its children"
    );

    assert_eq!(sandbox.read("etc/hostname"), "hangar\n");
    let su = sandbox.lmeta("usr/bin/su");
    assert_eq!(su.mode() & 0o7777, 0o4755, "setuid bit kept");
    assert_eq!((su.uid(), su.gid()), (uid, gid));
    assert_eq!(su.mtime(), MTIME as i64);
    // Implicit parents are plain 0755 directories.
    assert_eq!(sandbox.lmeta("usr/bin").mode() & 0o7777, 0o755);

    let ro = sandbox.lmeta("ro");
    assert_eq!(ro.mode() & 0o7777, 0o555);
    assert_eq!(sandbox.read("ro/inside"), "x");
    assert_eq!(sandbox.lmeta("ro/inside").mode() & 0o7777, 0o400);

    let link = sandbox.lmeta("etc/link");
    assert!(link.file_type().is_symlink());
    assert_eq!((link.uid(), link.gid()), (uid, gid));
    assert_eq!(
        fs::read_link(sandbox.path("etc/link")).unwrap(),
        Path::new("/no/such/target")
    );

    let again = sandbox.lmeta("usr/bin/su-again");
    assert_eq!(again.ino(), su.ino(), "hard link shares the inode");
    assert_eq!(again.nlink(), 2);

    let fifo = sandbox.lmeta("run/fifo");
    assert!(fifo.file_type().is_fifo());
    assert_eq!(fifo.mode() & 0o7777, 0o620);
    assert_eq!((fifo.uid(), fifo.gid()), (uid, gid));
}

#[test]
fn gzip_layers_are_decompressed() {
    let sandbox = Sandbox::new();
    let layer = Layer::new().file("a/b", 0o644, b"zipped").finish();
    let stats = sandbox.apply(&gzip(&layer)).unwrap();
    assert_eq!(stats.entries, 1);
    assert_eq!(stats.bytes, 6);
    assert_eq!(sandbox.read("a/b"), "zipped");
}

#[test]
fn empty_stream_is_an_empty_layer() {
    let sandbox = Sandbox::new();
    assert_eq!(sandbox.apply(b"").unwrap(), LayerStats::default());
    let empty = Layer::new().finish();
    assert_eq!(sandbox.apply(&empty).unwrap(), LayerStats::default());
}

#[test]
fn long_names_gnu_and_pax() {
    let sandbox = Sandbox::new();
    let long_dir = "d".repeat(120);
    let gnu = format!("{long_dir}/{}", "f".repeat(150));
    let pax = format!("{long_dir}/{}", "p".repeat(130));
    let target = format!("/{}", "t".repeat(200));
    let layer = Layer::new()
        .file(&gnu, 0o644, b"gnu")
        .symlink(&format!("{long_dir}/link"), &target)
        .hardlink(&format!("{long_dir}/hard"), &gnu)
        .pax_path(&pax)
        .file("short-name-replaced-by-pax", 0o644, b"pax")
        .finish();
    sandbox.apply(&layer).unwrap();
    assert_eq!(sandbox.read(&gnu), "gnu");
    assert_eq!(sandbox.read(&pax), "pax");
    assert!(!sandbox.exists("short-name-replaced-by-pax"));
    assert_eq!(
        fs::read_link(sandbox.path(&format!("{long_dir}/link"))).unwrap(),
        Path::new(&target)
    );
    assert_eq!(sandbox.read(&format!("{long_dir}/hard")), "gnu");
}

#[test]
fn whiteouts_remove_lower_files_dirs_and_links() {
    let sandbox = Sandbox::new();
    let outside = tempfile::tempdir().unwrap();
    fs::write(outside.path().join("keep"), "outside").unwrap();
    let lower = Layer::new()
        .file("etc/gone", 0o644, b"1")
        .file("etc/kept", 0o644, b"2")
        .file("var/cache/a/b", 0o644, b"3")
        .symlink("out", outside.path().to_str().unwrap())
        .finish();
    sandbox.apply(&lower).unwrap();

    let upper = Layer::new()
        .special(EntryType::Regular, "etc/.wh.gone", 0o644)
        .special(EntryType::Regular, "var/.wh.cache", 0o644)
        .special(EntryType::Regular, ".wh.out", 0o644)
        .special(EntryType::Regular, "etc/.wh.never-existed", 0o644)
        .special(EntryType::Regular, "no/such/dir/.wh.x", 0o644)
        .finish();
    let stats = sandbox.apply(&upper).unwrap();
    assert_eq!(stats.whiteouts, 5);
    assert_eq!(stats.entries, 0);
    assert_eq!(sandbox.tree(), ["etc", "etc/kept", "var"]);
    assert_eq!(
        fs::read_to_string(outside.path().join("keep")).unwrap(),
        "outside",
        "whiting out a symlink removes the link, not its target"
    );
}

#[test]
fn whiteouts_spare_what_the_same_layer_wrote() {
    let sandbox = Sandbox::new();
    let lower = Layer::new()
        .file("d/old", 0o644, b"old")
        .file("f", 0o644, b"old")
        .finish();
    sandbox.apply(&lower).unwrap();
    let upper = Layer::new()
        .file("f", 0o644, b"new")
        .file("d/new", 0o644, b"new")
        .special(EntryType::Regular, ".wh.f", 0o644)
        .special(EntryType::Regular, ".wh.d", 0o644)
        .finish();
    sandbox.apply(&upper).unwrap();
    assert_eq!(sandbox.tree(), ["d", "d/new", "f"]);
    assert_eq!(sandbox.read("f"), "new");
}

#[test]
fn opaque_directory_hides_only_lower_contents() {
    let sandbox = Sandbox::new();
    let lower = Layer::new()
        .file("d/a", 0o644, b"lower")
        .file("d/sub/b", 0o644, b"lower")
        .file("d/sub2/c", 0o644, b"lower")
        .file("other/x", 0o644, b"lower")
        .finish();
    sandbox.apply(&lower).unwrap();
    let upper = Layer::new()
        .dir("d", 0o711)
        .dir("d/sub", 0o755)
        .file("d/before", 0o644, b"upper")
        .special(EntryType::Regular, "d/.wh..wh..opq", 0o644)
        .file("d/after", 0o644, b"upper")
        .finish();
    let stats = sandbox.apply(&upper).unwrap();
    assert_eq!(stats.whiteouts, 1);
    assert_eq!(
        sandbox.tree(),
        ["d", "d/after", "d/before", "d/sub", "other", "other/x"]
    );
    assert_eq!(sandbox.lmeta("d").mode() & 0o7777, 0o711);
}

#[test]
fn non_directory_and_directory_replace_each_other() {
    let sandbox = Sandbox::new();
    let outside = tempfile::tempdir().unwrap();
    fs::set_permissions(outside.path(), Permissions::from_mode(0o751)).unwrap();
    let victim = outside.path().join("victim");
    fs::write(&victim, "outside").unwrap();
    let lower = Layer::new()
        .file("file-to-dir", 0o644, b"1")
        .file("dir-to-file/x/y", 0o644, b"2")
        .symlink("link-to-dir", outside.path().to_str().unwrap())
        .symlink("link-to-file", victim.to_str().unwrap())
        .dir("dir-kept", 0o755)
        .file("dir-kept/child", 0o644, b"3")
        .finish();
    sandbox.apply(&lower).unwrap();
    let upper = Layer::new()
        .dir("file-to-dir", 0o700)
        .file("dir-to-file", 0o600, b"now a file")
        .dir("link-to-dir", 0o700)
        .file("link-to-file", 0o600, b"replaced")
        .dir("dir-kept", 0o701)
        .finish();
    sandbox.apply(&upper).unwrap();

    assert!(sandbox.lmeta("file-to-dir").is_dir());
    assert_eq!(sandbox.read("dir-to-file"), "now a file");
    assert!(sandbox.lmeta("link-to-dir").is_dir());
    assert_eq!(sandbox.lmeta("link-to-dir").mode() & 0o7777, 0o700);
    assert_eq!(sandbox.read("link-to-file"), "replaced");
    assert_eq!(sandbox.lmeta("dir-kept").mode() & 0o7777, 0o701);
    assert_eq!(sandbox.read("dir-kept/child"), "3");
    // The symlinks' targets were never touched.
    assert_eq!(fs::read_to_string(&victim).unwrap(), "outside");
    let outside_meta = fs::metadata(outside.path()).unwrap();
    assert_eq!(outside_meta.mode() & 0o7777, 0o751);
}

#[test]
fn a_directory_replaced_later_in_the_layer_is_not_finished() {
    let sandbox = Sandbox::new();
    let outside = tempfile::tempdir().unwrap();
    fs::set_permissions(outside.path(), Permissions::from_mode(0o751)).unwrap();
    let layer = Layer::new()
        .dir("d", 0o700)
        .dir("d/e", 0o700)
        .symlink("d", outside.path().to_str().unwrap())
        .finish();
    sandbox.apply(&layer).unwrap();
    assert!(sandbox.lmeta("d").file_type().is_symlink());
    let outside_meta = fs::metadata(outside.path()).unwrap();
    assert_eq!(outside_meta.mode() & 0o7777, 0o751);
}

#[test]
fn dot_dot_escape_is_refused() {
    let sandbox = Sandbox::new();
    for name in [&b"../x"[..], b"./../x", b"a/../../x", b".."] {
        let layer = Layer::new()
            .raw(EntryType::Regular, name, b"", b"evil")
            .finish();
        let err = sandbox.apply(&layer).unwrap_err();
        assert!(
            matches!(&err, LayerError::Refused { reason, .. } if reason.contains("..")),
            "{err}"
        );
    }
    assert!(sandbox.tree().is_empty());
}

#[test]
fn absolute_paths_are_refused() {
    let sandbox = Sandbox::new();
    let name = sandbox.tmp.path().join("evil");
    let layer = Layer::new()
        .raw(
            EntryType::Regular,
            name.to_str().unwrap().as_bytes(),
            b"",
            b"evil",
        )
        .finish();
    let err = sandbox.apply(&layer).unwrap_err();
    assert!(matches!(&err, LayerError::Refused { .. }), "{err}");
    assert!(err.to_string().contains("absolute"), "{err}");
}

#[test]
fn writing_through_a_symlinked_parent_is_refused() {
    let sandbox = Sandbox::new();
    let layer = Layer::new()
        .symlink("a", "/")
        .file("a/etc/hangar-layer-test-evil", 0o644, b"evil")
        .finish();
    let err = sandbox.apply(&layer).unwrap_err();
    match &err {
        LayerError::SymlinkInPath { entry, link } => {
            assert_eq!(entry, "a/etc/hangar-layer-test-evil");
            assert_eq!(link, "a");
        }
        other => panic!("unexpected error: {other}"),
    }
    assert!(!Path::new("/etc/hangar-layer-test-evil").exists());

    let sandbox = Sandbox::new();
    let layer = Layer::new()
        .symlink("up", "..")
        .file("up/evil", 0o644, b"evil")
        .finish();
    let err = sandbox.apply(&layer).unwrap_err();
    assert!(matches!(&err, LayerError::SymlinkInPath { .. }), "{err}");
    // A directory entry through the link is refused too.
    let layer = Layer::new().dir("up/evil-dir", 0o755).finish();
    let err = sandbox.apply(&layer).unwrap_err();
    assert!(matches!(&err, LayerError::SymlinkInPath { .. }), "{err}");
    // And so are whiteouts that would delete through it.
    let layer = Layer::new()
        .special(EntryType::Regular, "up/.wh.root", 0o644)
        .finish();
    let err = sandbox.apply(&layer).unwrap_err();
    assert!(matches!(&err, LayerError::SymlinkInPath { .. }), "{err}");
    let layer = Layer::new()
        .special(EntryType::Regular, "up/.wh..wh..opq", 0o644)
        .finish();
    let err = sandbox.apply(&layer).unwrap_err();
    assert!(matches!(&err, LayerError::SymlinkInPath { .. }), "{err}");
    assert!(sandbox.exists("up"));
}

#[test]
fn hard_links_out_of_the_root_are_refused() {
    let sandbox = Sandbox::new();
    for target in ["../../etc/passwd", "/etc/passwd", "a/../../etc/passwd"] {
        let layer = Layer::new()
            .raw(EntryType::Link, b"passwd", target.as_bytes(), b"")
            .finish();
        let err = sandbox.apply(&layer).unwrap_err();
        match &err {
            LayerError::BadHardLink {
                entry, target: t, ..
            } => {
                assert_eq!(entry, "passwd");
                assert_eq!(t, target);
            }
            other => panic!("unexpected error for {target}: {other}"),
        }
    }
    assert!(sandbox.tree().is_empty());
}

#[test]
fn hard_link_through_a_symlinked_parent_is_refused() {
    let sandbox = Sandbox::new();
    let layer = Layer::new()
        .symlink("etc-outside", "/etc")
        .hardlink("passwd", "etc-outside/passwd")
        .finish();
    let err = sandbox.apply(&layer).unwrap_err();
    match &err {
        LayerError::SymlinkInPath { entry, link } => {
            assert_eq!(entry, "passwd");
            assert_eq!(link, "etc-outside");
        }
        other => panic!("unexpected error: {other}"),
    }
    assert!(!sandbox.exists("passwd"));
}

#[test]
fn hard_links_to_directories_or_missing_targets_are_refused() {
    let sandbox = Sandbox::new();
    let layer = Layer::new()
        .dir("d", 0o755)
        .hardlink("d-link", "d")
        .finish();
    let err = sandbox.apply(&layer).unwrap_err();
    assert!(
        matches!(&err, LayerError::BadHardLink { reason, .. } if reason.contains("directory")),
        "{err}"
    );
    let layer = Layer::new().hardlink("x", "missing").finish();
    let err = sandbox.apply(&layer).unwrap_err();
    assert!(
        matches!(&err, LayerError::BadHardLink { reason, .. } if reason.contains("does not exist")),
        "{err}"
    );
}

#[test]
fn hard_link_to_a_symlink_links_the_symlink_itself() {
    let sandbox = Sandbox::new();
    let layer = Layer::new()
        .symlink("s", "/etc/passwd")
        .hardlink("s2", "s")
        .finish();
    sandbox.apply(&layer).unwrap();
    let link = sandbox.lmeta("s2");
    assert!(link.file_type().is_symlink());
    assert_eq!(link.ino(), sandbox.lmeta("s").ino());
}

#[test]
fn device_nodes_are_refused() {
    for kind in [EntryType::Char, EntryType::Block] {
        let sandbox = Sandbox::new();
        let layer = Layer::new().special(kind, "dev/null", 0o666).finish();
        let err = sandbox.apply(&layer).unwrap_err();
        match &err {
            LayerError::DeviceNode { entry } => assert_eq!(entry, "dev/null"),
            other => panic!("unexpected error: {other}"),
        }
        assert!(err.to_string().contains("device nodes are not allowed"));
        assert!(!sandbox.exists("dev/null"));
    }
}

#[test]
fn truncated_streams_are_errors() {
    let sandbox = Sandbox::new();
    let data = vec![7u8; 10_000];
    let layer = Layer::new()
        .file("first", 0o644, b"ok")
        .file("big", 0o644, &data)
        .finish();
    // Mid-content, mid-header, and gzip cut short.
    for cut in [&layer[..3000], &layer[..1024 + 100]] {
        let err = sandbox.apply(cut).unwrap_err();
        assert!(matches!(&err, LayerError::Stream { .. }), "{err}");
    }
    let zipped = gzip(&layer);
    let err = sandbox.apply(&zipped[..zipped.len() / 2]).unwrap_err();
    assert!(matches!(&err, LayerError::Stream { .. }), "{err}");
    // Corrupt header checksum.
    let mut corrupt = layer.clone();
    corrupt[0] ^= 0x55;
    let err = sandbox.apply(&corrupt).unwrap_err();
    assert!(matches!(&err, LayerError::Stream { .. }), "{err}");
}

#[test]
fn zstd_layers_are_decompressed_and_corrupt_ones_refused() {
    let sandbox = Sandbox::new();
    let layer = Layer::new().file("z/data", 0o644, b"zstd").finish();
    let compressed = zstd::encode_all(layer.as_slice(), 3).unwrap();
    sandbox.apply(&compressed).unwrap();
    assert_eq!(sandbox.read("z/data"), "zstd");
    let err = Sandbox::new()
        .apply(&[0x28, 0xb5, 0x2f, 0xfd, 0, 0, 0, 0])
        .unwrap_err();
    assert!(matches!(err, LayerError::Stream { .. }), "{err}");
}

#[test]
fn root_must_be_a_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let err = apply_layer(&b""[..], &tmp.path().join("missing")).unwrap_err();
    assert!(matches!(err, LayerError::Root { .. }), "{err}");
}

#[test]
fn invalid_whiteout_names_are_refused() {
    let sandbox = Sandbox::new();
    for name in [&b"d/.wh."[..], b"d/.wh..", b"d/.wh..."] {
        let layer = Layer::new()
            .raw(EntryType::Regular, name, b"", b"")
            .finish();
        let err = sandbox.apply(&layer).unwrap_err();
        assert!(matches!(&err, LayerError::Refused { .. }), "{err}");
    }
}

#[test]
fn garbage_never_panics() {
    let sandbox = Sandbox::new();
    let layer = Layer::new()
        .dir("d", 0o755)
        .file("d/f", 0o644, b"content")
        .symlink("s", "d")
        .finish();
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    for _ in 0..300 {
        let mut mutated = layer.clone();
        for _ in 0..4 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let at = (state % mutated.len() as u64) as usize;
            mutated[at] = (state >> 32) as u8;
        }
        let _ = sandbox.apply(&mutated);
    }
}

#[test]
fn dot_components_v7_directories_and_replacing_hard_links() {
    let sandbox = Sandbox::new();
    fs::write(sandbox.path("old"), "old").unwrap();
    let layer = Layer::new()
        .dir(".", 0o755)
        .raw(EntryType::Regular, b"./v7dir/", b"", b"")
        .raw(EntryType::Regular, b"././a//./b", b"", b"ab")
        .hardlink("old", "a/b")
        .finish();
    let stats = sandbox.apply(&layer).unwrap();
    assert_eq!(stats.entries, 3);
    assert!(sandbox.lmeta("v7dir").is_dir());
    assert_eq!(sandbox.read("a/b"), "ab");
    assert_eq!(sandbox.read("old"), "ab", "hard link replaced the old file");
}

#[test]
fn unsupported_entry_types_are_refused() {
    let sandbox = Sandbox::new();
    let layer = Layer::new()
        .special(EntryType::new(b'V'), "volume", 0o644)
        .finish();
    let err = sandbox.apply(&layer).unwrap_err();
    assert!(matches!(&err, LayerError::Unsupported { .. }), "{err}");
    assert!(err.to_string().contains("\"volume\""), "{err}");
}

#[test]
fn errors_name_the_entry_and_the_problem() {
    let sandbox = Sandbox::new();
    let layer = Layer::new()
        .symlink("a", "/")
        .file("a/b", 0o644, b"")
        .finish();
    let message = sandbox.apply(&layer).unwrap_err().to_string();
    assert!(
        message.contains("\"a/b\"") && message.contains("symlink"),
        "{message}"
    );
    let layer = Layer::new()
        .raw(EntryType::Link, b"p", b"/etc/passwd", b"")
        .finish();
    let message = sandbox.apply(&layer).unwrap_err().to_string();
    assert!(
        message.contains("\"p\"") && message.contains("absolute"),
        "{message}"
    );
}

#[test]
fn extended_attributes_are_set_after_owner_and_mode() {
    let sandbox = Sandbox::new();
    let layer = Layer::new()
        .pax(&[
            ("SCHILY.xattr.user.origin", "layer-1"),
            (
                "SCHILY.xattr.security.selinux",
                "system_u:object_r:bin_t:s0",
            ),
        ])
        .file("tool", 0o755, b"#!/bin/sh\n")
        .pax(&[("SCHILY.xattr.user.dir", "yes")])
        .dir("data", 0o750)
        .finish();
    sandbox.apply(&layer).unwrap();
    let tool = sandbox.path("tool");
    assert_eq!(
        xattr::get(&tool, "user.origin").unwrap(),
        Some(b"layer-1".to_vec())
    );
    // The build host's policy labels stay behind.
    let names: Vec<_> = xattr::list(&tool).unwrap().collect();
    assert!(
        !names
            .iter()
            .any(|n| n.to_string_lossy().starts_with("security.selinux")),
        "{names:?}"
    );
    assert_eq!(
        xattr::get(sandbox.path("data"), "user.dir").unwrap(),
        Some(b"yes".to_vec())
    );
    assert_eq!(
        fs::metadata(sandbox.path("data")).unwrap().mode() & 0o7777,
        0o750
    );
}

#[test]
fn an_oversized_extended_attribute_is_refused() {
    let sandbox = Sandbox::new();
    let huge = "x".repeat(70 * 1024);
    let layer = Layer::new()
        .pax(&[("SCHILY.xattr.user.big", huge.as_str())])
        .file("f", 0o644, b"x")
        .finish();
    let err = sandbox.apply(&layer).unwrap_err().to_string();
    assert!(err.contains("over Linux's limits"), "{err}");
}

#[test]
fn extended_attributes_fit_one_ext4_block_and_never_steer_overlayfs() {
    let sandbox = Sandbox::new();
    let big = "x".repeat(5000);
    let layer = Layer::new()
        .pax(&[("SCHILY.xattr.user.big", big.as_str())])
        .file("f", 0o644, b"x")
        .finish();
    let err = sandbox.apply(&layer).unwrap_err().to_string();
    assert!(err.contains("exceed 4000 bytes"), "{err}");
    assert!(!wanted_xattr("trusted.overlay.opaque"));
    assert!(wanted_xattr("trusted.app"));
}
