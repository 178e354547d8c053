//! Schema versions and migrations. `PRAGMA user_version` holds the version,
//! `PRAGMA application_id` marks the file as Hangar's.

use std::path::Path;

use rusqlite::Connection;

use super::StoreError;

/// "HGAR": marks a database as Hangar's.
pub const APPLICATION_ID: i64 = 0x4847_4152;
/// Schema version this build writes.
pub const SCHEMA_VERSION: i64 = 2;

/// Each entry migrates from version `index` to `index + 1`.
const MIGRATIONS: &[&str] = &[
    // 0 -> 1: the first schema.
    "CREATE TABLE vms (
        id TEXT PRIMARY KEY,
        namespace TEXT NOT NULL,
        name TEXT NOT NULL,
        document TEXT NOT NULL,
        UNIQUE (namespace, name)
    );",
    // 1 -> 2: look VMs up by name across namespaces without a full scan.
    "CREATE INDEX vms_by_name ON vms (name);",
];

pub fn check_and_migrate(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let foreign = |what: String| StoreError::Foreign {
        path: path.to_path_buf(),
        what,
    };
    // One read transaction, so the three facts come from one snapshot: a
    // process migrating a new store at the same moment must not be seen
    // half-done (tables there, application id not yet).
    let not_a_database = |err: rusqlite::Error| match err {
        rusqlite::Error::SqliteFailure(e, _) if e.code == rusqlite::ErrorCode::NotADatabase => {
            foreign("not an SQLite database".into())
        }
        other => StoreError::Query(other),
    };
    conn.execute_batch("BEGIN").map_err(not_a_database)?;
    let snapshot = (|| {
        let app_id: i64 = conn.query_row("PRAGMA application_id", [], |row| row.get(0))?;
        let version: i64 = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
        let tables: i64 =
            conn.query_row("SELECT count(*) FROM sqlite_master", [], |row| row.get(0))?;
        Ok::<_, rusqlite::Error>((app_id, version, tables))
    })();
    let _ = conn.execute_batch("COMMIT");
    let (app_id, version, tables) = snapshot.map_err(not_a_database)?;
    if app_id != APPLICATION_ID && (app_id != 0 || tables > 0) {
        return Err(foreign(format!(
            "an SQLite database of another program (application id {app_id:#x}, {tables} schema objects)"
        )));
    }
    if version > SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            path: path.to_path_buf(),
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    let mode: String = conn.query_row("PRAGMA journal_mode", [], |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        conn.pragma_update(None, "journal_mode", "WAL")?;
    }
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    if version == SCHEMA_VERSION {
        return Ok(());
    }
    // Migrate under an exclusive lock; re-read the version inside it in case
    // another process migrated first.
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let result = (|| {
        let current: i64 = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
        for step in current..SCHEMA_VERSION {
            conn.execute_batch(MIGRATIONS[step as usize])?;
        }
        conn.pragma_update(None, "application_id", APPLICATION_ID)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        Ok::<_, rusqlite::Error>(())
    })();
    match result {
        Ok(()) => conn.execute_batch("COMMIT")?,
        Err(err) => {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(err.into());
        }
    }
    Ok(())
}
