//! `up` / `down` with real VMs: only what changed is acted on.

#![allow(clippy::unwrap_used)] // a test that cannot go on should panic loudly

mod common;

use common::*;

const TWO_VMS: &str = r#"
namespace = "NS"
[[vm]]
name = "web"
[[vm.provision]]
copy = "site"
to = "/run/site"
[[vm.provision]]
run = ["sh", "-c", "cat /run/site/index.html > /run/marker"]
[[vm]]
name = "db"
"#;

fn pid_of(state: &std::path::Path, ns: &str, vm: &str) -> u64 {
    let out = ok(&hangar(state, &["inspect", "-n", ns, vm]));
    let record: serde_json::Value = serde_json::from_str(&out).unwrap();
    record["pid"].as_u64().unwrap()
}

#[test]
fn up_acts_only_on_what_changed_and_down_removes_all() {
    let state = shared_state();
    let ns = unique("stack");
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(&ns);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("hangar.toml");
    let file_arg = file.to_str().unwrap();
    let write = |body: &str| std::fs::write(&file, body.replace("NS", &ns)).unwrap();
    struct Down<'a>(&'a std::path::Path, String);
    impl Drop for Down<'_> {
        fn drop(&mut self) {
            let _ = hangar(self.0, &["down", "-f", &self.1]);
        }
    }
    let _down = Down(state, file_arg.to_owned());

    std::fs::create_dir_all(dir.join("site")).unwrap();
    std::fs::write(dir.join("site/index.html"), "provisioned\n").unwrap();
    write(TWO_VMS);
    let out = ok(&hangar(state, &["up", "-f", file_arg]));
    assert!(
        out.contains("web: created") && out.contains("db: created"),
        "{out}"
    );
    let marker = ok(&hangar(
        state,
        &["exec", "-n", &ns, "web", "--", "cat", "/run/marker"],
    ));
    assert_eq!(marker, "provisioned\n");
    let (web_pid, db_pid) = (pid_of(state, &ns, "web"), pid_of(state, &ns, "db"));

    let out = ok(&hangar(state, &["up", "-f", file_arg]));
    assert!(
        out.contains("web: unchanged") && out.contains("db: unchanged"),
        "{out}"
    );
    assert_eq!(
        (pid_of(state, &ns, "web"), pid_of(state, &ns, "db")),
        (web_pid, db_pid)
    );

    write(&TWO_VMS.replace("name = \"db\"", "name = \"db\"\nmemory = \"320M\""));
    let out = ok(&hangar(state, &["up", "-f", file_arg]));
    assert!(
        out.contains("web: unchanged") && out.contains("db: replaced"),
        "{out}"
    );
    assert_eq!(pid_of(state, &ns, "web"), web_pid);

    // An edited file of a copy step changes the entry: web is replaced and
    // provisioned with the new content.
    std::fs::write(dir.join("site/index.html"), "edited\n").unwrap();
    let out = ok(&hangar(state, &["up", "-f", file_arg]));
    assert!(
        out.contains("web: replaced") && out.contains("db: unchanged"),
        "{out}"
    );
    let marker = ok(&hangar(
        state,
        &["exec", "-n", &ns, "web", "--", "cat", "/run/marker"],
    ));
    assert_eq!(marker, "edited\n");

    write("namespace = \"NS\"\n[[vm]]\nname = \"db\"\nmemory = \"320M\"\n");
    let out = ok(&hangar(state, &["up", "-f", file_arg]));
    assert!(out.contains("web: removed"), "{out}");

    write("namespace = \"NS\"\n[[vm]]\nname = \"bad\"\n[[vm.provision]]\nrun = [\"sh\", \"-c\", \"exit 7\"]\n");
    let failed = hangar(state, &["up", "-f", file_arg]);
    assert_eq!(failed.status.code(), Some(125));
    let stderr = text(&failed.stderr);
    assert!(
        stderr.contains("provision step 1") && stderr.contains("exit code 7"),
        "{stderr}"
    );

    let out = ok(&hangar(state, &["down", "-f", file_arg]));
    assert!(
        out.contains("bad: removed") && out.contains("db: removed"),
        "{out}"
    );
    let left = ok(&hangar(state, &["ps", "-a", "--json", "-n", &ns]));
    assert_eq!(left.trim(), "[]");
}
