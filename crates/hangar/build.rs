//! Builds `hangar-agent` as a static musl binary and embeds it in the
//! library, so whoever installs Hangar has the agent too (no copying).
//!
//! A nested cargo builds it into OUT_DIR with its own target dir, so it never
//! contends with the outer build's lock. Set `HANGAR_AGENT_BINARY` to embed a
//! prebuilt agent instead.

use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "x86_64-unknown-linux-musl";

fn main() {
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let manifest_dir =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let workspace = manifest_dir.join("../..");
    println!("cargo:rerun-if-env-changed=HANGAR_AGENT_BINARY");
    for watched in ["crates/hangar-agent", "crates/hangar-proto", "Cargo.lock"] {
        println!(
            "cargo:rerun-if-changed={}",
            workspace.join(watched).display()
        );
    }
    let dest = out_dir.join("hangar-agent");
    let built = match std::env::var_os("HANGAR_AGENT_BINARY") {
        Some(prebuilt) => PathBuf::from(prebuilt),
        None => build_agent(&workspace, &out_dir),
    };
    std::fs::copy(&built, &dest).unwrap_or_else(|err| {
        panic!(
            "copy agent {} -> {}: {err}",
            built.display(),
            dest.display()
        )
    });
}

fn build_agent(workspace: &Path, out_dir: &Path) -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target_dir = out_dir.join("agent-target");
    let mut command = Command::new(cargo);
    command
        .current_dir(workspace)
        .args(["build", "--package", "hangar-agent", "--profile", "agent"])
        .args(["--target", TARGET])
        .arg("--target-dir")
        .arg(&target_dir);
    // The outer build's settings (clippy's wrapper, coverage flags, a
    // jobserver) are not meant for the guest binary.
    for var in [
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_WRAPPER",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
    ] {
        command.env_remove(var);
    }
    let status = command
        .status()
        .unwrap_or_else(|err| panic!("cannot run cargo to build hangar-agent: {err}"));
    if !status.success() {
        panic!(
            "building hangar-agent for {TARGET} failed. If the target is missing, run \
             `rustup target add {TARGET}` (or set HANGAR_AGENT_BINARY to a prebuilt agent)."
        );
    }
    target_dir.join(TARGET).join("agent").join("hangar-agent")
}
