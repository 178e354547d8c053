use super::*;
use sha2::Digest;

/// A file that passes the kernel check (an ELF header, then filler).
fn fake_kernel(tag: &str) -> Vec<u8> {
    let mut bytes = b"\x7fELF".to_vec();
    bytes.extend(tag.as_bytes());
    bytes.resize(4096, 0);
    bytes
}

/// A file that passes the ext4 check (the superblock magic in place).
fn fake_ext4(tag: &str) -> Vec<u8> {
    let mut bytes = vec![0u8; 4096];
    bytes[1080] = 0x53;
    bytes[1081] = 0xEF;
    bytes[2048..2048 + tag.len()].copy_from_slice(tag.as_bytes());
    bytes
}

struct Fixture {
    _dir: tempfile::TempDir,
    files: PathBuf,
    store: BundleStore,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let files = dir.path().join("files");
        std::fs::create_dir(&files).unwrap();
        let store = BundleStore::new(&dir.path().join("state"));
        Self {
            _dir: dir,
            files,
            store,
        }
    }

    /// Writes a manifest for bundle `id` with the given artifacts.
    fn manifest(
        &self,
        id: &str,
        kernel: &[u8],
        rootfs: &[u8],
        rootfs_sha: Option<String>,
    ) -> PathBuf {
        let kernel_path = self.files.join(format!("{id}.vmlinux"));
        let rootfs_path = self.files.join(format!("{id}.ext4"));
        std::fs::write(&kernel_path, kernel).unwrap();
        std::fs::write(&rootfs_path, rootfs).unwrap();
        let rootfs_sha = rootfs_sha.unwrap_or_else(|| hex::encode(sha2::Sha256::digest(rootfs)));
        let manifest = serde_json::json!({
            "schemaVersion": 1,
            "bundleId": id,
            "arch": "x86_64",
            "rootfsType": "ext4",
            "kernel": {"path": format!("{id}.vmlinux"), "sizeBytes": kernel.len()},
            "rootfs": {"path": format!("{id}.ext4"), "sha256": rootfs_sha},
        });
        let path = self.files.join(format!("{id}.json"));
        std::fs::write(&path, manifest.to_string()).unwrap();
        path
    }

    fn add(&self, manifest: &Path, max: usize, pinned: &[&str]) -> Result<AddReport, BundleError> {
        let source = manifest.to_string_lossy();
        let parsed = self.store.read_manifest(&source)?;
        let fetched = self.store.fetch(&parsed, &mut |_| {})?;
        let pinned = pinned.iter().map(|s| (*s).to_owned()).collect();
        self.store.install(&parsed, &source, fetched, max, &pinned)
    }

    fn ids(&self) -> Vec<String> {
        self.store
            .list()
            .unwrap()
            .into_iter()
            .map(|b| b.bundle_id)
            .collect()
    }

    fn scratch_is_empty(&self) -> bool {
        std::fs::read_dir(self.store.scratch_dir())
            .map(|mut entries| entries.next().is_none())
            .unwrap_or(true)
    }
}

#[test]
fn add_verifies_and_stores_both_artifacts() {
    let fx = Fixture::new();
    let manifest = fx.manifest("one", &fake_kernel("k1"), &fake_ext4("r1"), None);
    let report = fx.add(&manifest, 2, &[]).unwrap();
    assert!(!report.unchanged);
    assert_eq!(report.bundle.kernel.size, 4096);
    assert_eq!(
        std::fs::read(fx.store.rootfs_path("one")).unwrap(),
        fake_ext4("r1")
    );
    assert_eq!(fx.ids(), ["one"]);
    assert!(fx.scratch_is_empty());
    // Adding it again changes only the access time.
    let again = fx.add(&manifest, 2, &[]).unwrap();
    assert!(again.unchanged);
    assert_eq!(again.bundle.added_at, report.bundle.added_at);
    assert!(again.bundle.last_accessed_at >= report.bundle.last_accessed_at);
    assert!(fx.scratch_is_empty());
}

#[test]
fn the_least_recently_used_bundle_is_evicted_but_never_a_pinned_one() {
    let fx = Fixture::new();
    for id in ["a", "b"] {
        let m = fx.manifest(id, &fake_kernel(id), &fake_ext4(id), None);
        fx.add(&m, 2, &[]).unwrap();
    }
    // "a" used after "b": "b" is now the least recently used.
    fx.store.touch("a").unwrap();
    let c = fx.manifest("c", &fake_kernel("c"), &fake_ext4("c"), None);
    let report = fx.add(&c, 2, &[]).unwrap();
    assert_eq!(report.evicted, ["b"]);
    assert_eq!(report.over_limit, None);
    assert_eq!(fx.ids(), ["a", "c"]);
    // Everything else pinned: nothing evicted, and the report says why.
    let d = fx.manifest("d", &fake_kernel("d"), &fake_ext4("d"), None);
    let report = fx.add(&d, 2, &["a", "c"]).unwrap();
    assert!(report.evicted.is_empty());
    let warning = report.over_limit.unwrap();
    assert!(
        warning.contains("holds 3 bundles, over its limit of 2: a, c in use"),
        "{warning}"
    );
    assert_eq!(fx.ids(), ["a", "c", "d"]);
    // A limit of one keeps just the new bundle.
    let e = fx.manifest("e", &fake_kernel("e"), &fake_ext4("e"), None);
    let report = fx.add(&e, 1, &[]).unwrap();
    assert_eq!(report.evicted, ["a", "c", "d"]);
    assert_eq!(fx.ids(), ["e"]);
}

#[test]
fn a_wrong_checksum_or_format_stores_nothing() {
    let fx = Fixture::new();
    let wrong_sha = hex::encode(sha2::Sha256::digest(b"something else"));
    let m = fx.manifest("bad", &fake_kernel("k"), &fake_ext4("r"), Some(wrong_sha));
    let err = fx.add(&m, 2, &[]).unwrap_err().to_string();
    assert!(err.contains("not the declared sha256"), "{err}");
    let m = fx.manifest("notelf", b"just text, not a kernel", &fake_ext4("r"), None);
    let err = fx.add(&m, 2, &[]).unwrap_err().to_string();
    assert!(err.contains("not an ELF vmlinux or a bzImage"), "{err}");
    let m = fx.manifest("notext4", &fake_kernel("k"), &[0u8; 4096], None);
    let err = fx.add(&m, 2, &[]).unwrap_err().to_string();
    assert!(err.contains("not an ext4 file system"), "{err}");
    assert!(fx.ids().is_empty());
    assert!(fx.scratch_is_empty());
}

#[test]
fn a_bundle_in_use_keeps_its_files() {
    let fx = Fixture::new();
    let m = fx.manifest("used", &fake_kernel("v1"), &fake_ext4("v1"), None);
    fx.add(&m, 2, &[]).unwrap();
    let m = fx.manifest("used", &fake_kernel("v2"), &fake_ext4("v2"), None);
    let err = fx.add(&m, 2, &["used"]).unwrap_err().to_string();
    assert!(err.contains("in use"), "{err}");
    assert_eq!(
        std::fs::read(fx.store.kernel_path("used")).unwrap(),
        fake_kernel("v1")
    );
    // Not in use: the new content replaces the old.
    fx.add(&m, 2, &[]).unwrap();
    assert_eq!(
        std::fs::read(fx.store.kernel_path("used")).unwrap(),
        fake_kernel("v2")
    );
    assert!(fx.scratch_is_empty());
}
