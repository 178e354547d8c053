//! Control messages, carried JSON-encoded in control frames.

use serde::{Deserialize, Serialize};

use crate::frame::{Frame, FrameError, FrameKind};

/// A command to run in the guest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Program and arguments; the program is looked up in `PATH`.
    pub argv: Vec<String>,
    /// Extra environment, on top of the agent's default environment.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Working directory; the guest's `/` when absent.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Pipe stdin from the host (`Stdin` frames, then `CloseStdin`);
    /// otherwise the command's stdin is /dev/null.
    #[serde(default)]
    pub stdin: bool,
    /// Run as this user: `name`, `uid`, `name:group` or `uid:gid`, like
    /// `docker exec -u`; names are looked up in the guest's /etc/passwd and
    /// /etc/group. Root when absent.
    #[serde(default)]
    pub user: Option<String>,
    /// Give the command a pseudo-terminal of this size as stdin, stdout
    /// and stderr (its output then arrives as stdout only, like `docker
    /// exec -t`); pipes when absent.
    #[serde(default)]
    pub tty: Option<TtySize>,
}

/// A terminal's size in character cells.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TtySize {
    pub rows: u16,
    pub cols: u16,
}

impl Default for TtySize {
    fn default() -> Self {
        Self { rows: 24, cols: 80 }
    }
}

/// What a finished copy moved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopySummary {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Bytes of regular file content.
    pub bytes: u64,
}

/// How a guest process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitStatus {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal number.
    Signal(i32),
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Code(code) => write!(f, "exit code {code}"),
            Self::Signal(signal) => write!(f, "signal {signal}"),
        }
    }
}

/// Facts the agent reports with its hello.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestFacts {
    /// `uname -r` of the guest kernel.
    pub kernel_release: String,
    pub hostname: String,
    /// Milliseconds since the guest kernel started, when the hello was sent.
    pub uptime_ms: u64,
    /// Agent build version (the crate version).
    pub agent_version: String,
    /// Non-loopback IPv4/IPv6 addresses, `addr/prefix`, with their
    /// interface: `eth0 10.0.2.15/24`.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// When the guest kernel started, by the guest's clock (milliseconds
    /// since the Unix epoch).
    #[serde(default)]
    pub boot_time_unix_ms: u64,
    /// The token vsock sessions must present; sent only over
    /// virtio-serial, and never kept in the VM record's facts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_token: Option<String>,
}

/// Host to guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HostMessage {
    /// Opens a session. `nonce` is echoed back so the host can tell its own
    /// hello answer from a stale one sent to an earlier connection.
    ///
    /// On vsock (reachable by any host process that knows the CID) the
    /// hello must carry `token`, which the agent gives only over its
    /// virtio-serial ports (private to the VM's owner on the host).
    Hello {
        version: u32,
        nonce: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
    },
    /// Starts a command; its output and exit come back on `stream` = `id`.
    Exec { id: u32, request: ExecRequest },
    /// No more stdin for the command `id`: its stdin pipe closes.
    CloseStdin { id: u32 },
    /// Sends signal number `signal` to the command `id`.
    Signal { id: u32, signal: i32 },
    /// The terminal of the command `id` (started with `tty`) changed size.
    Resize { id: u32, rows: u16, cols: u16 },
    /// Writes files into the guest at `path`: the host sends a tar stream
    /// (see `transfer`) as stdin frames on stream `id`, then `CloseStdin`.
    /// Answered by `CopyDone`.
    CopyIn { id: u32, path: String },
    /// Reads `path` from the guest: the agent sends a tar stream as stdout
    /// frames on stream `id`, then `CopyDone`.
    CopyOut { id: u32, path: String },
    /// Flushes filesystems and powers the guest off (or reboots it).
    Shutdown { reboot: bool },
    /// Gives a restored or forked guest its own identity (answered by
    /// `IdentitySet`): a VM started from a snapshot is otherwise a copy of
    /// the one the snapshot was taken from.
    SetIdentity { id: u32, identity: GuestIdentity },
}

/// What makes a guest itself, set after a restore or fork.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestIdentity {
    pub hostname: String,
    /// 32 lowercase hex digits (systemd's machine-id format).
    pub machine_id: String,
    /// eth0's new MAC address, when the VM has a NIC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Random bytes from the host, hex: mixed into the guest's pool and
    /// credited, then the kernel's generator reseeds, so forks do not share
    /// a random stream.
    pub entropy: String,
    /// The host's wall clock (ns since the epoch): the guest's clock stood
    /// still while the snapshot was on disk.
    pub clock_unix_ns: u64,
    /// vCPUs the guest should have online: the host plugged more in (a
    /// restore that grew the VM); the agent brings them online.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Memory (MiB) the guest should have: the host plugged a DIMM in; the
    /// agent waits for its blocks and brings any offline one online.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
}

/// The vCPUs and memory a guest has online, reported after an identity
/// that asked for more.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestResources {
    pub cpus_online: u32,
    /// Memory in online blocks, MiB (what the kernel manages; a little
    /// more than MemTotal, which leaves out the kernel's own).
    pub memory_mib: u64,
}

/// The entropy is secret: never printed.
impl std::fmt::Debug for GuestIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestIdentity")
            .field("hostname", &self.hostname)
            .field("machine_id", &self.machine_id)
            .field("mac", &self.mac)
            .field("entropy", &"<hidden>")
            .field("clock_unix_ns", &self.clock_unix_ns)
            .field("cpus", &self.cpus)
            .field("memory_mib", &self.memory_mib)
            .finish()
    }
}

/// Guest to host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum GuestMessage {
    /// Answers a host hello (`nonce` set) or announces the agent at boot
    /// (`nonce` absent).
    Hello {
        version: u32,
        nonce: Option<u64>,
        facts: GuestFacts,
    },
    /// The command `id` is running as guest pid `pid`.
    ExecStarted { id: u32, pid: u32 },
    /// The command `id` could not be started (missing program, bad cwd...).
    ExecFailed { id: u32, message: String },
    /// The command `id` ended; all its output frames precede this message.
    ExecExited { id: u32, status: ExitStatus },
    /// The guest consumed `bytes` of stdin of the exec or copy `id`: the
    /// host may send that much more. The host keeps at most
    /// [`crate::STDIN_WINDOW`] bytes unacknowledged, so the agent never
    /// blocks reading its channel on one command's unread input.
    StdinCredit { id: u32, bytes: u32 },
    /// The copy `id` ended: `error` is None when every entry was written
    /// (`CopyIn`) or sent (`CopyOut`).
    CopyDone {
        id: u32,
        error: Option<String>,
        summary: CopySummary,
    },
    /// The identity `id` was applied: `errors` lists the parts that failed
    /// (empty when all did), `facts` are the guest's facts afterwards.
    IdentitySet {
        id: u32,
        errors: Vec<String>,
        facts: GuestFacts,
        /// What is online, when the identity asked for vCPUs or memory
        /// (an agent that cannot grow a guest leaves it out).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resources: Option<GuestResources>,
    },
    /// The host's hello named a version this agent does not speak.
    VersionMismatch { agent: u32, host: u32 },
    /// A request could not be understood; the session goes on.
    Error { message: String },
}

impl HostMessage {
    pub fn to_frame(&self) -> Frame {
        control_frame(FrameKind::Host, self)
    }

    pub fn from_frame(frame: &Frame) -> Result<Self, FrameError> {
        decode(frame, FrameKind::Host, "host")
    }
}

impl GuestMessage {
    pub fn to_frame(&self) -> Frame {
        control_frame(FrameKind::Guest, self)
    }

    pub fn from_frame(frame: &Frame) -> Result<Self, FrameError> {
        decode(frame, FrameKind::Guest, "guest")
    }
}

fn control_frame(kind: FrameKind, message: &impl Serialize) -> Frame {
    Frame {
        kind,
        stream: 0,
        // Serialising these plain enums cannot fail.
        payload: serde_json::to_vec(message).unwrap_or_default(),
    }
}

fn decode<T: for<'de> Deserialize<'de>>(
    frame: &Frame,
    expected: FrameKind,
    what: &'static str,
) -> Result<T, FrameError> {
    if frame.kind != expected {
        return Err(FrameError::UnexpectedKind {
            expected: what,
            got: frame.kind,
        });
    }
    serde_json::from_slice(&frame.payload).map_err(|source| FrameError::BadMessage { what, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_through_frames() {
        let exec = HostMessage::Exec {
            id: 3,
            request: ExecRequest {
                argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
                env: vec![("A".into(), "b".into())],
                cwd: Some("/tmp".into()),
                stdin: true,
                user: Some("nobody".into()),
                tty: Some(TtySize {
                    rows: 50,
                    cols: 132,
                }),
            },
        };
        assert_eq!(HostMessage::from_frame(&exec.to_frame()).unwrap(), exec);
        let exited = GuestMessage::ExecExited {
            id: 3,
            status: ExitStatus::Signal(9),
        };
        assert_eq!(
            GuestMessage::from_frame(&exited.to_frame()).unwrap(),
            exited
        );
    }

    /// An agent from before growth (same protocol version) sends no
    /// `resources` and ignores `cpus`: both sides still understand each
    /// other, and the host sees that the agent did not grow the guest.
    #[test]
    fn identities_without_growth_fields_still_parse() {
        let old_reply = br#"{"type":"identity_set","id":1,"errors":[],"facts":{"kernel_release":"6.1","hostname":"a","uptime_ms":1,"agent_version":"0.1.0"}}"#;
        let frame = Frame {
            kind: FrameKind::Guest,
            stream: 0,
            payload: old_reply.to_vec(),
        };
        assert!(matches!(
            GuestMessage::from_frame(&frame).unwrap(),
            GuestMessage::IdentitySet {
                resources: None,
                ..
            }
        ));
        let identity = GuestIdentity {
            hostname: "a".into(),
            machine_id: "0".repeat(32),
            mac: None,
            entropy: "00".repeat(32),
            clock_unix_ns: 1,
            cpus: None,
            memory_mib: None,
        };
        let json = serde_json::to_string(&identity).unwrap();
        assert!(
            !json.contains("cpus") && !json.contains("memory_mib"),
            "{json}"
        );
        let grown = GuestIdentity {
            cpus: Some(4),
            memory_mib: Some(1024),
            ..identity
        };
        let message = HostMessage::SetIdentity {
            id: 2,
            identity: grown.clone(),
        };
        assert_eq!(
            HostMessage::from_frame(&message.to_frame()).unwrap(),
            message
        );
    }

    #[test]
    fn wrong_direction_and_bad_json_are_errors() {
        let hello = HostMessage::Hello {
            version: 1,
            nonce: 5,
            token: None,
        };
        assert!(matches!(
            GuestMessage::from_frame(&hello.to_frame()),
            Err(FrameError::UnexpectedKind { .. })
        ));
        let bad = Frame {
            kind: FrameKind::Guest,
            stream: 0,
            payload: b"{not json".to_vec(),
        };
        assert!(matches!(
            GuestMessage::from_frame(&bad),
            Err(FrameError::BadMessage { .. })
        ));
    }
}
