//! Finding a command's program in its PATH before it is spawned.
//!
//! With a bare name and a PATH of its own, std's `Command` must fork and
//! let `execvp` search; given the file itself it can use `posix_spawn`
//! (a vfork-style clone: no copy of the agent's page tables). Under TCG a
//! restored guest runs its first spawn through cold translation caches,
//! and the fork path cost several times the spawn path there.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The file `execvp` would run for `program` with `path_var` as PATH, or
/// None when `program` names a path itself (it has a `/`) or no PATH
/// entry has an executable file of that name (the spawn then fails as it
/// always did). An empty PATH entry means the working directory `cwd`.
pub fn resolve(program: &str, path_var: &str, cwd: &Path) -> Option<PathBuf> {
    if program.is_empty() || program.contains('/') {
        return None;
    }
    path_var.split(':').find_map(|dir| {
        let dir = if dir.is_empty() { cwd } else { Path::new(dir) };
        let candidate = dir.join(program);
        let metadata = std::fs::metadata(&candidate).ok()?;
        (metadata.is_file() && metadata.permissions().mode() & 0o111 != 0).then_some(candidate)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hangar-agent-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("a")).unwrap();
        std::fs::create_dir_all(dir.join("b")).unwrap();
        dir
    }

    fn write(path: &Path, mode: u32) {
        std::fs::write(path, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn the_first_executable_file_in_path_order_wins() {
        let dir = scratch("order");
        write(&dir.join("a/tool"), 0o644);
        write(&dir.join("b/tool"), 0o755);
        std::fs::create_dir_all(dir.join("a/sub")).unwrap();
        let path_var = format!("{0}/a:{0}/b", dir.display());
        // a/tool is not executable: skipped, as execvp skips it.
        assert_eq!(resolve("tool", &path_var, &dir), Some(dir.join("b/tool")));
        write(&dir.join("a/tool"), 0o700);
        assert_eq!(resolve("tool", &path_var, &dir), Some(dir.join("a/tool")));
        // A directory of that name is not a program.
        assert_eq!(resolve("sub", &path_var, &dir), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn paths_and_unknown_names_are_left_to_exec() {
        let dir = scratch("left");
        write(&dir.join("a/tool"), 0o755);
        let path_var = format!("{}/a", dir.display());
        assert_eq!(resolve("./tool", &path_var, &dir), None);
        assert_eq!(resolve("/bin/sh", &path_var, &dir), None);
        assert_eq!(resolve("missing", &path_var, &dir), None);
        assert_eq!(resolve("", &path_var, &dir), None);
        // An empty entry is the working directory.
        assert_eq!(
            resolve("tool", "/nonexistent:", &dir.join("a")),
            Some(dir.join("a/tool"))
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
