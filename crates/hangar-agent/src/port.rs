//! Finding and opening the agent's virtio-serial port.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The port device. A read returns 0 bytes while no host is connected: the
/// session then drops any half-received frame and waits for the next host.
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
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }
}

/// Waits for the port called `name` and opens it.
pub fn open_agent_port(name: &str, timeout: Duration) -> io::Result<AgentPort> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(device) = find_port_device(name)? {
            let file = OpenOptions::new().read(true).write(true).open(&device)?;

            return Ok(AgentPort { file });
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "no virtio-serial port named {name} after {}s \
                     (is virtio_console loaded?)",
                    timeout.as_secs()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn find_port_device(wanted: &str) -> io::Result<Option<PathBuf>> {
    let entries = match std::fs::read_dir("/sys/class/virtio-ports") {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err),
    };
    for entry in entries.flatten() {
        let name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if name.trim() == wanted {
            let device = PathBuf::from("/dev").join(entry.file_name());
            if device.exists() {
                return Ok(Some(device));
            }
        }
    }
    Ok(None)
}
