//! The embedded metadata store: one SQLite database (WAL mode) under the
//! state dir, VM records kept as JSON documents.
//!
//! Several `hangar` processes may use it at once: every change runs in a
//! `BEGIN IMMEDIATE` transaction that re-reads the record it changes, and a
//! busy database is waited for (up to [`BUSY_TIMEOUT`]) rather than failed.
//! The file is marked with an application id, so a foreign SQLite database
//! or a file that is not a database is refused and never overwritten.

mod schema;

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::record::VmRecord;

/// How long a write waits for another process's transaction.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("{path} is not a Hangar store (it is {what}); it was left untouched: move it away or pass another --state-dir")]
    Foreign { path: PathBuf, what: String },
    #[error("the store {path} has schema version {found}, newer than this Hangar understands ({supported}); upgrade Hangar")]
    TooNew {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error("store query failed")]
    Query(#[from] rusqlite::Error),
    #[error("a VM named {name:?} already exists in namespace {namespace:?}; pick another --name or remove it with `hangar rm {name}`")]
    NameTaken { namespace: String, name: String },
    #[error("no VM named or with id {key:?}; `hangar ps -a` lists them")]
    NotFound { key: String },
    #[error("{key:?} matches several VM ids ({matches}); give more of the id or the name")]
    Ambiguous { key: String, matches: String },
    #[error("record {id} in the store is unreadable: {source}")]
    Corrupt {
        id: String,
        #[source]
        source: serde_json::Error,
    },
}

/// A connection to the store. Cheap to open; one per process or thread.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

impl Store {
    /// Opens (creating if absent, mode 0600) and migrates the store at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let open_err = |source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        create_private_once(path)
            .map_err(|err| open_err(rusqlite::Error::InvalidPath(format!("{err}").into())))?;
        let conn = Connection::open(path).map_err(open_err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
        // Checking, migrating and switching to WAL need the file to
        // themselves; SQLite answers "busy" at once, not after the busy
        // timeout, when two processes do it together on a new store. A
        // short file lock serialises opens (the kernel drops it if the
        // process dies).
        let _open_lock = open_lock(path)?;
        schema::check_and_migrate(&conn, path)?;
        Ok(Self {
            conn,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Adds a new record; a name already used in its namespace is refused.
    pub fn insert(&mut self, record: &VmRecord) -> Result<(), StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let taken: bool = tx.query_row(
            "SELECT EXISTS(SELECT 1 FROM vms WHERE namespace = ?1 AND name = ?2)",
            params![record.namespace, record.name],
            |row| row.get(0),
        )?;
        if taken {
            return Err(StoreError::NameTaken {
                namespace: record.namespace.clone(),
                name: record.name.clone(),
            });
        }
        tx.execute(
            "INSERT INTO vms (id, namespace, name, document) VALUES (?1, ?2, ?3, ?4)",
            params![record.id, record.namespace, record.name, to_json(record)],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Adds many new records in one transaction (bulk import, benchmarks).
    /// Any conflict aborts the whole batch.
    pub fn insert_batch(&mut self, records: &[VmRecord]) -> Result<(), StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO vms (id, namespace, name, document) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for record in records {
                stmt.execute(params![
                    record.id,
                    record.namespace,
                    record.name,
                    to_json(record)
                ])
                .map_err(|err| match err {
                    rusqlite::Error::SqliteFailure(e, _)
                        if e.code == rusqlite::ErrorCode::ConstraintViolation =>
                    {
                        StoreError::NameTaken {
                            namespace: record.namespace.clone(),
                            name: record.name.clone(),
                        }
                    }
                    other => other.into(),
                })?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Summaries of all records, oldest first.
    pub fn list_summaries(&self) -> Result<Vec<crate::record::VmSummary>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT id, document FROM vms ORDER BY rowid")?;
        let mut rows = stmt.query([])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let doc = row.get_ref(1)?.as_str().map_err(rusqlite::Error::from)?;
            let summary =
                crate::record::VmSummary::from_json(doc).map_err(|source| StoreError::Corrupt {
                    id: row.get::<_, String>(0).unwrap_or_default(),
                    source,
                })?;
            out.push(summary);
        }
        Ok(out)
    }

    /// Counts rows without decoding them: the floor under `list`.
    pub fn count_raw(&self) -> Result<usize, StoreError> {
        let mut stmt = self.conn.prepare_cached("SELECT id, document FROM vms")?;
        let mut rows = stmt.query([])?;
        let mut n = 0;
        while let Some(row) = rows.next()? {
            let doc: rusqlite::types::ValueRef<'_> = row.get_ref(1)?;
            n += usize::from(!doc.as_bytes().unwrap_or_default().is_empty());
        }
        Ok(n)
    }

    pub fn get(&self, id: &str) -> Result<Option<VmRecord>, StoreError> {
        let doc: Option<String> = self
            .conn
            .query_row("SELECT document FROM vms WHERE id = ?1", [id], |row| {
                row.get(0)
            })
            .optional()?;
        doc.map(|doc| from_json(id, &doc)).transpose()
    }

    /// Finds a VM by exact id, name (in `namespace`, or any namespace when
    /// the name is unique), or unique id prefix (3 characters or more).
    pub fn find(&self, namespace: Option<&str>, key: &str) -> Result<VmRecord, StoreError> {
        if let Some(record) = self.get(key)? {
            return Ok(record);
        }
        let mut by_name = self.query(
            "SELECT id, document FROM vms WHERE name = ?1 AND (?2 IS NULL OR namespace = ?2)",
            params![key, namespace],
        )?;
        if by_name.len() > 1 {
            return Err(StoreError::Ambiguous {
                key: key.to_owned(),
                matches: by_name
                    .iter()
                    .map(|r| format!("{}/{}", r.namespace, r.name))
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        if let Some(record) = by_name.pop() {
            return Ok(record);
        }
        let mut by_prefix = if key.len() >= 3 {
            self.query(
                "SELECT id, document FROM vms WHERE substr(id, 1, length(?1)) = ?1",
                params![key],
            )?
        } else {
            Vec::new()
        };
        match by_prefix.len() {
            1 => Ok(by_prefix.remove(0)),
            0 => Err(StoreError::NotFound {
                key: key.to_owned(),
            }),
            _ => Err(StoreError::Ambiguous {
                key: key.to_owned(),
                matches: by_prefix
                    .iter()
                    .map(|r| r.id.clone())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// Records from a `SELECT id, document ...` query.
    fn query(&self, sql: &str, params: impl rusqlite::Params) -> Result<Vec<VmRecord>, StoreError> {
        let mut stmt = self.conn.prepare_cached(sql)?;
        let rows = stmt.query_map(params, |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
        })?;
        let mut records = Vec::new();
        for row in rows {
            let (id, doc) = row?;
            records.push(from_json(&id, &doc)?);
        }
        Ok(records)
    }

    /// All records, oldest first.
    pub fn list(&self) -> Result<Vec<VmRecord>, StoreError> {
        self.query("SELECT id, document FROM vms ORDER BY rowid", [])
    }

    /// Re-reads record `id` inside a write transaction, lets `change` edit
    /// it, and writes it back; nothing is written if `change` fails.
    pub fn update<E>(
        &mut self,
        id: &str,
        change: impl FnOnce(&mut VmRecord) -> Result<(), E>,
    ) -> Result<VmRecord, E>
    where
        E: From<StoreError>,
    {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(StoreError::from)?;
        let doc: Option<String> = tx
            .query_row("SELECT document FROM vms WHERE id = ?1", [id], |row| {
                row.get(0)
            })
            .optional()
            .map_err(StoreError::from)?;
        let doc = doc.ok_or_else(|| StoreError::NotFound { key: id.to_owned() })?;
        let mut record = from_json(id, &doc)?;
        change(&mut record)?;
        record.updated_at = chrono::Utc::now();
        tx.execute(
            "UPDATE vms SET document = ?2 WHERE id = ?1",
            params![id, to_json(&record)],
        )
        .map_err(StoreError::from)?;
        tx.commit().map_err(StoreError::from)?;
        Ok(record)
    }

    /// Removes record `id`; true if it existed.
    pub fn delete(&mut self, id: &str) -> Result<bool, StoreError> {
        Ok(self.conn.execute("DELETE FROM vms WHERE id = ?1", [id])? > 0)
    }
}

/// Creates the store file so it is 0600 from its first byte (SQLite gives
/// the -wal and -shm files the same mode). Only when it does not exist
/// yet: closing any descriptor of the database file drops every POSIX lock
/// this process holds on it, including those of its open connections (a
/// fork opens one store per VM in parallel). Without their shared lock,
/// another process's last connection to close believes it is alone,
/// checkpoints and deletes the WAL under them: commits are lost and the
/// file can end up malformed.
fn create_private_once(path: &Path) -> std::io::Result<()> {
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        // A new file: no connection can have it open yet.
        Ok(_) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(err) => Err(err),
    }
}

fn open_lock(db: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, StoreError> {
    let path = db.with_extension("lock");
    crate::fsutil::lock_file(&path, true).map_err(|err| StoreError::Open {
        path,
        source: rusqlite::Error::InvalidPath(err.to_string().into()),
    })
}

fn to_json(record: &VmRecord) -> String {
    // A record is plain data; serialising it cannot fail.
    serde_json::to_string(record).unwrap_or_default()
}

fn from_json(id: &str, doc: &str) -> Result<VmRecord, StoreError> {
    serde_json::from_str(doc).map_err(|source| StoreError::Corrupt {
        id: id.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests;
