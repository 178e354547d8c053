//! Hangar's host <-> guest agent protocol.
//!
//! One byte stream (a virtio-serial port, or a vsock connection) carries
//! *frames*. A frame
//! is a fixed header and a payload:
//!
//! ```text
//! magic "HGRF" | kind: u8 | stream: u32 LE | len: u32 LE | payload (len bytes)
//! ```
//!
//! Control frames carry one JSON-encoded [`HostMessage`] or [`GuestMessage`];
//! data frames carry raw stdout/stderr bytes of the exec named by `stream`.
//! The magic lets a reader resynchronise after garbage (a host that died in
//! the middle of a frame), and the length is bounded so a corrupt header can
//! never make either side allocate without limit.
//!
//! Versioning: the first exchange is `HostMessage::Hello` /
//! `GuestMessage::Hello`, both carrying [`PROTOCOL_VERSION`]; a peer with a
//! different version is refused with an error naming both versions.

mod frame;
mod message;
pub mod transfer;

pub use frame::{Frame, FrameDecoder, FrameError, FrameKind, FrameReader, MAGIC, MAX_PAYLOAD};
pub use message::{
    CopySummary, ExecRequest, ExitStatus, GuestFacts, GuestIdentity, GuestMessage, GuestResources,
    HostMessage, TtySize,
};

/// Version of the wire format. Bump on any incompatible change.
/// 2: stdin frames, `CloseStdin`, `Signal`, `ExecRequest::stdin`.
/// 3: `user` and `tty` in `ExecRequest`, `Resize`, `CopyIn`/`CopyOut`/
///    `CopyDone` (file copy as a tar stream), boot time in the facts.
/// 4: `StdinCredit` flow control; `token` in the host hello (vsock).
/// 5: `SetIdentity` / `IdentitySet` (restore and fork).
pub const PROTOCOL_VERSION: u32 = 5;

/// Stdin bytes a host may send for one exec or copy before the guest
/// acknowledges them (`GuestMessage::StdinCredit`).
pub const STDIN_WINDOW: u64 = 1 << 20;

/// How many virtio-serial ports the agent serves. A QEMU socket chardev
/// takes one host connection at a time, so each port is one concurrent host
/// session (one `hangar exec` process); within a session any number of
/// commands run at once.
pub const AGENT_PORTS: u32 = 16;

/// The vsock port the agent listens on, where the VM has vsock.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// Name of agent port `index`. The guest kernel exposes it under
/// `/sys/class/virtio-ports/*/name`.
pub fn port_name(index: u32) -> String {
    format!("org.hangar.agent.{index}")
}
