use super::*;
use crate::record::{BackendKind, VmState};
use crate::spec::VmSpec;

fn record(id: &str, name: &str) -> VmRecord {
    VmRecord::new(
        id.into(),
        VmSpec::new(name),
        BackendKind::Noop,
        "/tmp/x".into(),
    )
}

#[test]
fn insert_find_update_delete() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(&dir.path().join("h.db")).unwrap();
    store.insert(&record("aaaaaaaaaaaa", "web")).unwrap();
    let err = store.insert(&record("bbbbbbbbbbbb", "web")).unwrap_err();
    assert!(matches!(err, StoreError::NameTaken { .. }), "{err}");
    assert_eq!(store.find(None, "web").unwrap().id, "aaaaaaaaaaaa");
    assert_eq!(store.find(None, "aaaa").unwrap().name, "web");
    assert!(matches!(
        store.find(None, "nope"),
        Err(StoreError::NotFound { .. })
    ));
    let updated = store
        .update::<StoreError>("aaaaaaaaaaaa", |r| {
            r.state = VmState::Starting;
            Ok(())
        })
        .unwrap();
    assert_eq!(updated.state, VmState::Starting);
    assert!(store.delete("aaaaaaaaaaaa").unwrap());
    assert!(store.list().unwrap().is_empty());
}

#[test]
fn failed_update_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(&dir.path().join("h.db")).unwrap();
    store.insert(&record("aaaaaaaaaaaa", "web")).unwrap();
    let result = store.update("aaaaaaaaaaaa", |r| {
        r.state = VmState::Running;
        Err(StoreError::NotFound { key: "x".into() })
    });
    assert!(result.is_err());
    assert_eq!(
        store.get("aaaaaaaaaaaa").unwrap().unwrap().state,
        VmState::Created
    );
}

#[test]
fn foreign_files_are_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("notes.db");
    std::fs::write(&text, b"this is not a database at all, just some text....").unwrap();
    let before = std::fs::read(&text).unwrap();
    let err = Store::open(&text).unwrap_err();
    assert!(err.to_string().contains("not a Hangar store"), "{err}");
    assert_eq!(std::fs::read(&text).unwrap(), before);

    let other = dir.path().join("other.db");
    Connection::open(&other)
        .unwrap()
        .execute_batch("CREATE TABLE t (x INT);")
        .unwrap();
    let err = Store::open(&other).unwrap_err();
    assert!(err.to_string().contains("another program"), "{err}");
}

#[test]
fn store_file_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("h.db");
    Store::open(&path).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("h.db");
    drop(Store::open(&path).unwrap());
    Connection::open(&path)
        .unwrap()
        .pragma_update(None, "user_version", 99)
        .unwrap();
    let err = Store::open(&path).unwrap_err();
    assert!(matches!(err, StoreError::TooNew { found: 99, .. }), "{err}");
}

#[test]
fn concurrent_writers_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("h.db");
    drop(Store::open(&path).unwrap());
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let path = path.clone();
            std::thread::spawn(move || {
                let mut store = Store::open(&path).unwrap();
                for i in 0..25 {
                    let id = format!("{t:06x}{i:06x}");
                    store.insert(&record(&id, &format!("vm-{t}-{i}"))).unwrap();
                    store
                        .update::<StoreError>(&id, |r| {
                            r.state = VmState::Starting;
                            Ok(())
                        })
                        .unwrap();
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let records = Store::open(&path).unwrap().list().unwrap();
    assert_eq!(records.len(), 200);
    assert!(records.iter().all(|r| r.state == VmState::Starting));
}

#[test]
fn a_version_one_store_migrates_and_keeps_its_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("h.db");
    let old = record("aaaaaaaaaaaa", "web");
    {
        // The store exactly as version 1 wrote it.
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE vms (id TEXT PRIMARY KEY, namespace TEXT NOT NULL, name TEXT NOT NULL,
                document TEXT NOT NULL, UNIQUE (namespace, name));
             PRAGMA application_id = 1212629330; PRAGMA user_version = 1;",
        )
        .unwrap();
        conn.execute(
            "INSERT INTO vms VALUES (?1, 'default', 'web', ?2)",
            rusqlite::params![old.id, serde_json::to_string(&old).unwrap()],
        )
        .unwrap();
    }
    let store = Store::open(&path).unwrap();
    assert_eq!(store.find(None, "web").unwrap(), old);
    let conn = Connection::open(&path).unwrap();
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, schema::SCHEMA_VERSION);
    let index: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'index' AND name = 'vms_by_name'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(index, 1);
}

#[test]
fn many_processes_opening_a_new_store_at_once_all_succeed() {
    let dir = tempfile::tempdir().unwrap();
    for round in 0..20 {
        let path = dir.path().join(format!("h{round}.db"));
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(12));
        let threads: Vec<_> = (0..12)
            .map(|_| {
                let (path, barrier) = (path.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    Store::open(&path).map(drop).map_err(|e| format!("{e:?}"))
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap().unwrap();
        }
    }
}

/// POSIX locks this process holds on `path`'s inode, from /proc/locks.
fn own_locks_on(path: &std::path::Path) -> usize {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).unwrap();
    let inode = format!(":{}", meta.ino());
    let pid = std::process::id().to_string();
    std::fs::read_to_string("/proc/locks")
        .unwrap()
        .lines()
        .filter(|line| line.contains("POSIX"))
        .filter(|line| line.split_whitespace().nth(4) == Some(pid.as_str()))
        .filter(|line| {
            line.split_whitespace()
                .nth(5)
                .is_some_and(|dev_inode| dev_inode.ends_with(&inode))
        })
        .count()
}

#[test]
fn opening_a_second_store_keeps_the_first_ones_locks() {
    // Regression: opening the store closed a descriptor of the database
    // file, which dropped the locks of connections already open in this
    // process (fork runs one store per VM): then another process deleted
    // the WAL under them and their commits were lost.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hangar.db");
    let first = Store::open(&path).unwrap();
    let tx = first.conn.unchecked_transaction().unwrap();
    let _: i64 = tx
        .query_row("SELECT COUNT(*) FROM vms", [], |row| row.get(0))
        .unwrap();
    let held = own_locks_on(&path);
    assert!(held > 0, "an open read should hold a lock on the database");
    create_private_once(&path).unwrap();
    assert_eq!(own_locks_on(&path), held, "the first store lost its lock");
    drop(tx);
}
