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
        let rootfs_sha = rootfs_sha.unwrap_or_else(|| sha_hex(rootfs));
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
    let wrong_sha = sha_hex(b"something else");
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

/// Serves `files` (name -> bytes) over HTTP/1.1 on 127.0.0.1 until the
/// test process ends, ignoring credentials and query strings; returns
/// `host:port`.
fn serve(files: Vec<(&'static str, Vec<u8>)>) -> String {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let files = std::sync::Arc::new(files);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let files = files.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request = String::new();
                let _ = reader.read_line(&mut request);
                loop {
                    let mut header = String::new();
                    if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
                        break;
                    }
                }
                let target = request.split_whitespace().nth(1).unwrap_or("/");
                let name = target
                    .split('?')
                    .next()
                    .unwrap_or("")
                    .trim_start_matches('/');
                let mut stream = stream;
                let _ = match files.iter().find(|(n, _)| *n == name) {
                    Some((_, body)) => write!(
                        stream,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    )
                    .and_then(|()| stream.write_all(body)),
                    None => stream.write_all(
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    ),
                };
            });
        }
    });
    addr
}

fn sha_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

#[test]
fn a_damaged_record_is_skipped_and_its_bundle_still_removable() {
    let fx = Fixture::new();
    for id in ["a", "b"] {
        let m = fx.manifest(id, &fake_kernel(id), &fake_ext4(id), None);
        fx.add(&m, 8, &[]).unwrap();
    }
    let record = fx.store.bundle_dir("b").join("bundle.json");
    std::fs::write(&record, b"{\"bundle_id\": \"b\", trunc").unwrap();
    // A folder with no record at all is damaged too.
    std::fs::create_dir(fx.store.bundle_dir("c")).unwrap();
    std::fs::write(fx.store.bundle_dir("c").join("kernel"), b"x").unwrap();

    let (records, damaged) = fx.store.scan().unwrap();
    assert_eq!(
        records
            .iter()
            .map(|r| r.bundle_id.as_str())
            .collect::<Vec<_>>(),
        ["a"]
    );
    assert_eq!(
        damaged
            .iter()
            .map(|d| d.bundle_id.as_str())
            .collect::<Vec<_>>(),
        ["b", "c"]
    );
    let warning = damaged[0].to_string();
    for part in [
        fx.store.bundle_dir("b").display().to_string(),
        "key must be a string".to_owned(),
        "`hangar image rm bundle:b`".to_owned(),
    ] {
        assert!(warning.contains(&part), "{warning} lacks {part}");
    }
    assert!(damaged[1].detail.contains("no bundle.json"), "{damaged:?}");
    assert_eq!(fx.ids(), ["a"]);
    let err = fx.store.require("b").unwrap_err().to_string();
    assert!(err.contains("`hangar image rm bundle:b`"), "{err}");

    // Eviction skips them (neither counted nor removed) and says so.
    let d = fx.manifest("d", &fake_kernel("d"), &fake_ext4("d"), None);
    let report = fx.add(&d, 1, &[]).unwrap();
    assert_eq!(report.evicted, ["a"]);
    assert_eq!(report.damaged.len(), 2);
    assert_eq!(fx.ids(), ["d"]);

    // `rm` does not need the record.
    let removed = fx.store.remove("b").unwrap();
    assert_eq!(removed.bundle_id, "b");
    assert_eq!(removed.record, None);
    assert!(!fx.store.bundle_dir("b").exists());
    fx.store.remove("c").unwrap();
    let err = fx.store.remove("c").unwrap_err().to_string();
    assert!(err.contains("not in the bundle cache"), "{err}");
    assert!(fx.store.scan().unwrap().1.is_empty());
    assert!(fx.scratch_is_empty());
}

#[test]
fn adding_a_damaged_bundle_again_replaces_it() {
    let fx = Fixture::new();
    let m = fx.manifest("a", &fake_kernel("a"), &fake_ext4("a"), None);
    fx.add(&m, 2, &[]).unwrap();
    std::fs::write(fx.store.bundle_dir("a").join("bundle.json"), b"[]").unwrap();
    // In use, it stays (its content is unknown).
    let err = fx.add(&m, 2, &["a"]).unwrap_err().to_string();
    assert!(err.contains("in use"), "{err}");
    let report = fx.add(&m, 2, &[]).unwrap();
    assert!(!report.unchanged);
    assert_eq!(fx.ids(), ["a"]);
    assert!(fx.scratch_is_empty());
}

#[test]
fn the_staged_bundle_takes_the_old_ones_place_in_one_step() {
    let dir = tempfile::tempdir().unwrap();
    let folder = |name: &str, content: &str| {
        let path = dir.path().join(name);
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("bundle.json"), content).unwrap();
        path
    };
    let content = |path: &Path| std::fs::read_to_string(path.join("bundle.json")).unwrap();
    let target = folder("target", "old");
    let staged = folder("staged", "new");
    let aside = dir.path().join("aside");
    let old = replace_dir(&staged, &target, &aside).unwrap();
    assert_eq!(content(&target), "new");
    assert_eq!(content(&old), "old");

    // Without an exchange: when the new folder cannot take the name, the
    // old one is back in place and nothing is deleted.
    std::fs::remove_dir_all(&old).unwrap();
    let staged = folder("staged2", "newer");
    let mut calls = Vec::new();
    let err = replace_by_renames(&staged, &target, &aside, &mut |from, to| {
        calls.push((from.to_path_buf(), to.to_path_buf()));
        if from == staged {
            return Err(std::io::Error::other("injected"));
        }
        std::fs::rename(from, to)
    })
    .unwrap_err();
    assert!(err.to_string().contains("injected"), "{err}");
    assert_eq!(content(&target), "new");
    assert_eq!(content(&staged), "newer");
    assert_eq!(calls.len(), 3, "{calls:?}");
    // And when it can, the old one waits aside for its deletion.
    replace_by_renames(&staged, &target, &aside, &mut |from, to| {
        std::fs::rename(from, to)
    })
    .unwrap();
    assert_eq!(content(&target), "newer");
    assert_eq!(content(&aside), "new");
}

#[test]
fn a_download_without_a_declared_size_is_capped() {
    let fx = Fixture::new();
    let fx = Fixture {
        store: fx.store.clone().with_download_cap(1024),
        ..fx
    };
    let rootfs = fake_ext4("big");
    let addr = serve(vec![("rootfs.ext4", rootfs.clone())]);
    std::fs::write(fx.files.join("k"), fake_kernel("k")).unwrap();
    let manifest = |size: Option<usize>| {
        let mut rootfs_entry = serde_json::json!({
            "url": format!("http://{addr}/rootfs.ext4"),
            "sha256": sha_hex(&rootfs),
        });
        if let Some(size) = size {
            rootfs_entry["sizeBytes"] = size.into();
        }
        let path = fx.files.join("capped.json");
        let value = serde_json::json!({
            "schemaVersion": 1, "bundleId": "capped", "arch": "x86_64", "rootfsType": "ext4",
            "kernel": {"path": "k"}, "rootfs": rootfs_entry,
        });
        std::fs::write(&path, value.to_string()).unwrap();
        path
    };
    let err = fx.add(&manifest(None), 2, &[]).unwrap_err().to_string();
    for part in [
        "is larger than 1024 bytes",
        "without `sizeBytes`",
        "MAX_UNDECLARED_DOWNLOAD_BYTES",
        "declare `rootfs.sizeBytes` in the manifest",
    ] {
        assert!(err.contains(part), "{err} lacks {part}");
    }
    assert!(fx.ids().is_empty());
    assert!(fx.scratch_is_empty());
    // A declared size is the manifest's word: no cap then.
    fx.add(&manifest(Some(rootfs.len())), 2, &[]).unwrap();
    assert_eq!(fx.ids(), ["capped"]);
    // The real cap, named in the error.
    let expect = BundleStore::new(Path::new("/x")).expect(
        "rootfs",
        &Artifact {
            source: ArtifactSource::Url {
                url: "http://h/r".into(),
            },
            sha256: None,
            size_bytes: None,
        },
    );
    assert_eq!(expect.limit, Some(4 << 30));
    assert!(expect.limit_note.unwrap().contains("(4 GiB,"));
}

#[test]
fn urls_are_recorded_and_reported_without_their_secrets() {
    let fx = Fixture::new();
    let kernel = fake_kernel("k");
    let rootfs = fake_ext4("r");
    let addr = serve(vec![
        ("vmlinux", kernel.clone()),
        ("rootfs.ext4", rootfs.clone()),
    ]);
    let secret_url =
        |name: &str| format!("http://user:hunter2@{addr}/{name}?X-Amz-Signature=hunter2");
    let manifest = |rootfs_sha: String| {
        let path = fx.files.join("secret.json");
        let value = serde_json::json!({
            "schemaVersion": 1, "bundleId": "secret", "arch": "x86_64", "rootfsType": "ext4",
            "kernel": {"url": secret_url("vmlinux"), "sha256": sha_hex(&kernel)},
            "rootfs": {"url": secret_url("rootfs.ext4"), "sha256": rootfs_sha},
        });
        std::fs::write(&path, value.to_string()).unwrap();
        path
    };
    let err = fx
        .add(&manifest("0".repeat(64)), 2, &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("not the declared sha256"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
    assert!(
        err.contains(&format!("http://***@{addr}/rootfs.ext4?***")),
        "{err}"
    );

    let report = fx.add(&manifest(sha_hex(&rootfs)), 2, &[]).unwrap();
    assert_eq!(
        report.bundle.rootfs.source,
        ArtifactSource::Url {
            url: format!("http://***@{addr}/rootfs.ext4?***")
        }
    );
    let stored =
        std::fs::read_to_string(fx.store.bundle_dir("secret").join("bundle.json")).unwrap();
    assert!(!stored.contains("hunter2"), "{stored}");

    // A manifest from a URL: recorded and named in errors redacted too.
    let served = std::fs::read(manifest(sha_hex(&rootfs))).unwrap();
    let addr2 = serve(vec![("m.json", served), ("bad.json", b"{".to_vec())]);
    let manifest_url = format!("http://u:hunter2@{addr2}/m.json?token=hunter2");
    let parsed = fx.store.read_manifest(&manifest_url).unwrap();
    let fetched = fx.store.fetch(&parsed, &mut |_| {}).unwrap();
    let report = fx
        .store
        .install(&parsed, &manifest_url, fetched, 2, &BTreeSet::new())
        .unwrap();
    assert_eq!(
        report.bundle.manifest,
        format!("http://***@{addr2}/m.json?***")
    );
    for url in [
        format!("http://u:hunter2@{addr2}/bad.json?token=hunter2"),
        format!("http://u:hunter2@{addr2}/missing.json?token=hunter2"),
    ] {
        let err = fx.store.read_manifest(&url).unwrap_err().to_string();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(err.contains(&format!("http://***@{addr2}/")), "{err}");
    }
}

#[test]
fn a_touch_waits_while_the_cache_changes() {
    let fx = Fixture::new();
    let m = fx.manifest("a", &fake_kernel("a"), &fake_ext4("a"), None);
    let added = fx.add(&m, 2, &[]).unwrap().bundle;
    let changing = fx.store.lock(true).unwrap();
    let (done, finished) = std::sync::mpsc::channel();
    let store = fx.store.clone();
    let toucher = std::thread::spawn(move || {
        let touched = store.touch("a");
        done.send(()).unwrap();
        touched
    });
    assert!(
        finished
            .recv_timeout(std::time::Duration::from_millis(500))
            .is_err(),
        "the touch did not wait for the exclusive cache lock"
    );
    drop(changing);
    finished
        .recv_timeout(std::time::Duration::from_secs(30))
        .unwrap();
    let touched = toucher.join().unwrap().unwrap();
    assert!(touched.last_accessed_at >= added.last_accessed_at);
    // Many touches at once: each one a whole record, the clock never back.
    let before = fx.store.require("a").unwrap().last_accessed_at;
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let store = fx.store.clone();
            std::thread::spawn(move || (0..10).for_each(|_| drop(store.touch("a").unwrap())))
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    assert!(fx.store.require("a").unwrap().last_accessed_at >= before);
    // A caller holding the lock shared (a VM create) may touch.
    let _using = fx.store.lock(false).unwrap();
    fx.store.touch("a").unwrap();
}

#[test]
fn a_replaced_bundle_is_never_missing() {
    let fx = Fixture::new();
    let versions: Vec<PathBuf> = ["v1", "v2"]
        .iter()
        .map(|v| {
            let m = fx.manifest("r", &fake_kernel(v), &fake_ext4(v), None);
            let kept = fx.files.join(format!("r-{v}.json"));
            std::fs::rename(&m, &kept).unwrap();
            // Each version's artifacts under their own names.
            for ext in ["vmlinux", "ext4"] {
                std::fs::copy(
                    fx.files.join(format!("r.{ext}")),
                    fx.files.join(format!("r-{v}.{ext}")),
                )
                .unwrap();
            }
            let text = std::fs::read_to_string(&kept)
                .unwrap()
                .replace("\"r.", &format!("\"r-{v}."));
            std::fs::write(&kept, text).unwrap();
            kept
        })
        .collect();
    fx.add(&versions[0], 2, &[]).unwrap();
    // A reader looks at the bundle all along: it must always find one,
    // old or new, whole.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (stop, store) = (stop.clone(), fx.store.clone());
        std::thread::spawn(move || {
            let (mut reads, mut missing) = (0u64, 0u64);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                reads += 1;
                if !matches!(store.get("r"), Ok(Some(_))) {
                    missing += 1;
                }
            }
            (reads, missing)
        })
    };
    for round in 0..40 {
        let report = fx.add(&versions[(round + 1) % 2], 2, &[]).unwrap();
        assert!(!report.unchanged);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (reads, missing) = reader.join().unwrap();
    assert_eq!(
        missing, 0,
        "the bundle was missing in {missing} of {reads} reads"
    );
    assert!(fx.scratch_is_empty());
}
