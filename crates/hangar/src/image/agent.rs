//! The guest agent binary, embedded at build time (see `build.rs`).

/// The static `hangar-agent` executable that runs as PID 1 in the guest.
pub static AGENT_BINARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/hangar-agent"));
