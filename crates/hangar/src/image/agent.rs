//! The guest agent binary, embedded at build time (see `build.rs`).

/// The static `hangar-agent` executable that runs as PID 1 in the guest.
/// Writes the agent to `path` (atomically, mode 0755), for disk images
/// that run it as a service.
pub fn export(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    crate::fsutil::write_atomic(path, AGENT_BINARY)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
}

pub static AGENT_BINARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/hangar-agent"));
