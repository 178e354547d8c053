//! `hangar pull` against a real registry: Debian's docker-registry on
//! 127.0.0.1 (a free port, its own storage), images pushed into it with
//! skopeo from OCI layouts the test builds. Traffic stays on loopback.

#![allow(clippy::unwrap_used)] // a test that cannot go on should panic loudly

mod common;
mod oci_layout;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use oci_layout::app_image;

/// A docker-registry process, killed when dropped.
struct Registry {
    child: Child,
    port: u16,
    storage: PathBuf,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn scratch(prefix: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(unique(prefix));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn require(program: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|out| out.status.success());
    assert!(
        found,
        "the registry tests need {program} (apt-get install {package}); run `make deps` (CI={:?})",
        std::env::var("CI").ok()
    );
}

fn start_registry() -> Registry {
    require("docker-registry", "docker-registry");
    require("skopeo", "skopeo");
    let dir = scratch("registry");
    let storage = dir.join("data");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = dir.join("config.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            storage.display()
        ),
    )
    .unwrap();
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let registry = Registry {
        child,
        port,
        storage,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if v2_answers(port) {
            return registry;
        }
        assert!(
            Instant::now() < deadline,
            "docker-registry did not answer on 127.0.0.1:{port} within 20 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// True once `GET /v2/` answers 200.
fn v2_answers(port: u16) -> bool {
    let Ok(mut conn) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET /v2/ HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    if conn.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut reply = String::new();
    let _ = conn.read_to_string(&mut reply);
    reply.starts_with("HTTP/1.1 200") || reply.starts_with("HTTP/1.0 200")
}

fn push(layout: &Path, target: &str) {
    let out = Command::new("skopeo")
        .args(["copy", "-q", "--dest-tls-verify=false"])
        .arg(format!("oci:{}", layout.display()))
        .arg(format!("docker://{target}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo copy failed: {}",
        text(&out.stderr)
    );
}

#[test]
fn pull_from_a_registry_then_run() {
    let state = shared_state();
    let registry = start_registry();
    let name = format!(
        "127.0.0.1:{}/hangar-test/{}:1",
        registry.port,
        unique("app")
    );
    push(&app_image(&scratch("layout"), None), &name);

    let out = ok(&hangar(state, &["pull", &name]));
    assert!(out.starts_with(&format!("{name} sha256:")), "{out}");
    let listed = ok(&hangar(state, &["image", "ls"]));
    assert!(listed.contains(&name), "{listed}");
    let run = hangar(state, &["run", "--image", &name]);
    assert_eq!(
        text(&run.stdout),
        "hi from ID=hangar-test\n",
        "{}",
        text(&run.stderr)
    );

    let missing = hangar(
        state,
        &[
            "pull",
            &format!("127.0.0.1:{}/hangar-test/none:1", registry.port),
        ],
    );
    assert_eq!(missing.status.code(), Some(125));
    assert!(
        text(&missing.stderr).contains("manifest unknown"),
        "{}",
        text(&missing.stderr)
    );
    ok(&hangar(state, &["image", "rm", &name]));
}

#[test]
fn a_blob_tampered_in_the_registry_is_refused() {
    let state = shared_state();
    let registry = start_registry();
    let name = format!(
        "127.0.0.1:{}/hangar-test/{}:1",
        registry.port,
        unique("bad")
    );
    push(&app_image(&scratch("layout"), None), &name);
    // Flip a byte of the biggest blob in the registry's own storage.
    let blobs = registry.storage.join("docker/registry/v2/blobs/sha256");
    let mut files = Vec::new();
    for prefix in std::fs::read_dir(&blobs).unwrap() {
        for blob in std::fs::read_dir(prefix.unwrap().path()).unwrap() {
            files.push(blob.unwrap().path().join("data"));
        }
    }
    let biggest = files
        .into_iter()
        .max_by_key(|f| std::fs::metadata(f).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(&biggest).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&biggest, &bytes).unwrap();

    let out = hangar(state, &["pull", &name]);
    assert_eq!(out.status.code(), Some(125));
    // oci-client checks as it downloads; the blob store checks again.
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("Invalid digest") || stderr.contains("does not match its digest"),
        "{stderr}"
    );
    assert!(!ok(&hangar(state, &["image", "ls"])).contains(&name));
}
