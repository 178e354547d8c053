//! Finding and opening the agent's virtio-serial port.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use hangar_proto::VIRTIO_PORT_NAME;

/// How long to sleep when the host side is not connected (reads return 0).
const HOST_ABSENT_POLL: Duration = Duration::from_millis(20);

/// The port device, with reads that wait for a host instead of ending.
#[derive(Debug)]
pub struct AgentPort {
    file: File,
}

impl AgentPort {
    pub fn try_clone_file(&self) -> io::Result<File> {
        self.file.try_clone()
    }
}

impl Read for AgentPort {
    /// A virtio-serial port reads 0 bytes while no host is connected; the
    /// agent outlives host connections, so it waits for the next one.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.file.read(buf) {
                Ok(0) => std::thread::sleep(HOST_ABSENT_POLL),
                other => return other,
            }
        }
    }
}

/// Waits for the port named [`VIRTIO_PORT_NAME`] and opens it.
pub fn open_agent_port(timeout: Duration) -> io::Result<AgentPort> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(device) = find_port_device()? {
            let file = OpenOptions::new().read(true).write(true).open(&device)?;
            crate::log(&format!("serving on {}", device.display()));
            return Ok(AgentPort { file });
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "no virtio-serial port named {VIRTIO_PORT_NAME} after {}s \
                     (is virtio_console loaded?)",
                    timeout.as_secs()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn find_port_device() -> io::Result<Option<PathBuf>> {
    let entries = match std::fs::read_dir("/sys/class/virtio-ports") {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err),
    };
    for entry in entries.flatten() {
        let name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if name.trim() == VIRTIO_PORT_NAME {
            let device = PathBuf::from("/dev").join(entry.file_name());
            if device.exists() {
                return Ok(Some(device));
            }
        }
    }
    Ok(None)
}
