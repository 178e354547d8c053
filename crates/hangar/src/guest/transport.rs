//! The byte streams one agent protocol runs over. The backend says which
//! it offers; the frames on top are the same.
//!
//! - virtio-serial: a QEMU chardev unix socket per port (works wherever
//!   QEMU runs, TCG included; one host connection per port at a time).
//! - vsock: AF_VSOCK to the guest's CID (QEMU `vhost-vsock-pci`, needs
//!   `/dev/vhost-vsock` on the host); any number of connections.
//! - hybrid vsock: Firecracker's and Cloud Hypervisor's unix socket, where
//!   the host writes `CONNECT <port>\n` and the VMM answers `OK <n>\n`
//!   before the stream reaches the guest's vsock listener.

use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use socket2::{Domain, SockAddr, Socket, Type};

/// The vsock port the agent listens on in the guest.
pub const AGENT_VSOCK_PORT: u32 = hangar_proto::AGENT_VSOCK_PORT;

/// How long the hybrid vsock handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest handshake answer we read (`OK <u32>\n` is far shorter).
const HANDSHAKE_LINE_MAX: usize = 64;

/// Where a VM's agent is reached.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "transport", rename_all = "snake_case")]
pub enum AgentEndpoint {
    /// A virtio-serial port's chardev socket.
    Serial { socket: PathBuf },
    /// AF_VSOCK to guest `cid`, `port`.
    Vsock { cid: u32, port: u32 },
    /// A hybrid vsock unix socket (Firecracker, Cloud Hypervisor).
    HybridVsock { socket: PathBuf, port: u32 },
}

impl std::fmt::Display for AgentEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Serial { socket } => write!(f, "{}", socket.display()),
            Self::Vsock { cid, port } => write!(f, "vsock {cid}:{port}"),
            Self::HybridVsock { socket, port } => {
                write!(f, "{} (vsock port {port})", socket.display())
            }
        }
    }
}

/// Opens a stream to the endpoint (after the handshake, for hybrid vsock).
pub fn open(endpoint: &AgentEndpoint) -> io::Result<Socket> {
    match endpoint {
        AgentEndpoint::Serial { socket } => {
            let stream = Socket::new(Domain::UNIX, Type::STREAM, None)?;
            stream.connect(&SockAddr::unix(socket)?)?;
            Ok(stream)
        }
        AgentEndpoint::Vsock { cid, port } => {
            let stream = Socket::new(Domain::VSOCK, Type::STREAM, None)?;
            stream.connect(&SockAddr::vsock(*cid, *port))?;
            Ok(stream)
        }
        AgentEndpoint::HybridVsock { socket, port } => {
            let stream = Socket::new(Domain::UNIX, Type::STREAM, None)?;
            stream.connect(&SockAddr::unix(socket)?)?;
            hybrid_handshake(&stream, *port)?;
            Ok(stream)
        }
    }
}

/// `CONNECT <port>\n`, then one `OK ...\n` line read byte by byte, so no
/// byte of the agent's stream that follows is consumed here.
fn hybrid_handshake(stream: &Socket, port: u32) -> io::Result<()> {
    let saved = stream.read_timeout()?;
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    (&*stream).write_all(format!("CONNECT {port}\n").as_bytes())?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < HANDSHAKE_LINE_MAX {
        match (&*stream).read(&mut byte) {
            Ok(0) => break,
            Ok(_) if byte[0] == b'\n' => {
                stream.set_read_timeout(saved)?;
                let answer = String::from_utf8_lossy(&line);
                if answer.starts_with("OK ") {
                    return Ok(());
                }
                return Err(refused(port, &answer));
            }
            Ok(_) => line.push(byte[0]),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => {
                return Err(io::Error::new(
                    err.kind(),
                    format!("hybrid vsock: no answer to CONNECT {port}: {err}"),
                ))
            }
        }
    }
    Err(refused(port, &String::from_utf8_lossy(&line)))
}

fn refused(port: u32, answer: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionRefused,
        format!(
            "hybrid vsock: CONNECT {port} answered {answer:?} (is the agent listening on vsock port {port} in the guest?)"
        ),
    )
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;

    /// A fake VMM socket: checks the CONNECT line, answers `reply`, then
    /// sends `after` (the first bytes of the guest's stream).
    fn fake_vmm(reply: &'static [u8], after: &'static [u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut line = Vec::new();
            let mut byte = [0u8; 1];
            while conn.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
                line.push(byte[0]);
            }
            assert_eq!(line, b"CONNECT 1024");
            conn.write_all(reply).unwrap();
            conn.write_all(after).unwrap();
            std::thread::sleep(Duration::from_millis(200));
        });
        (dir, path)
    }

    #[test]
    fn hybrid_vsock_handshake_leaves_the_stream_untouched() {
        let (_dir, socket) = fake_vmm(b"OK 1073741824\n", b"HGRF");
        let stream = open(&AgentEndpoint::HybridVsock { socket, port: 1024 }).unwrap();
        let mut first = [0u8; 4];
        (&stream).read_exact(&mut first).unwrap();
        assert_eq!(&first, b"HGRF");
    }

    #[test]
    fn a_refused_handshake_says_what_came_back() {
        let (_dir, socket) = fake_vmm(b"NO such port\n", b"");
        let err = open(&AgentEndpoint::HybridVsock { socket, port: 1024 }).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
        assert!(err.to_string().contains("\"NO such port\""), "{err}");
    }

    #[test]
    fn endpoints_serialize_with_their_transport() {
        let endpoint = AgentEndpoint::Vsock { cid: 7, port: 1024 };
        let json = serde_json::to_string(&endpoint).unwrap();
        assert_eq!(json, r#"{"transport":"vsock","cid":7,"port":1024}"#);
        assert_eq!(
            serde_json::from_str::<AgentEndpoint>(&json).unwrap(),
            endpoint
        );
    }
}
