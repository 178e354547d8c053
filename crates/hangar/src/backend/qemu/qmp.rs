//! A small QMP client: typed commands over the VM's control socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use crate::backend::BackendError;

/// How long one QMP exchange may take before the VMM is deemed unresponsive.
pub const QMP_TIMEOUT: Duration = Duration::from_secs(5);

/// The commands Hangar sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QmpCommand {
    QueryStatus,
    SystemPowerdown,
    Stop,
    Cont,
    Quit,
}

impl QmpCommand {
    fn name(self) -> &'static str {
        match self {
            Self::QueryStatus => "query-status",
            Self::SystemPowerdown => "system_powerdown",
            Self::Stop => "stop",
            Self::Cont => "cont",
            Self::Quit => "quit",
        }
    }
}

/// `query-status`'s answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunStatus {
    pub running: bool,
    pub status: String,
}

#[derive(Debug)]
pub struct QmpClient {
    socket: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl QmpClient {
    /// Connects, reads the greeting and enters command mode.
    pub fn connect(socket: &Path) -> Result<Self, BackendError> {
        let err = |detail: String| BackendError::Qmp {
            socket: socket.to_path_buf(),
            detail,
        };
        let stream = UnixStream::connect(socket).map_err(|e| err(format!("connect: {e}")))?;
        stream
            .set_read_timeout(Some(QMP_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(QMP_TIMEOUT)))
            .map_err(|e| err(e.to_string()))?;
        let writer = stream.try_clone().map_err(|e| err(e.to_string()))?;
        let mut client = Self {
            socket: socket.to_path_buf(),
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = client.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(err(format!("unexpected greeting {greeting}")));
        }
        client.call("qmp_capabilities")?;
        Ok(client)
    }

    pub fn execute(&mut self, command: QmpCommand) -> Result<Value, BackendError> {
        self.call(command.name())
    }

    pub fn query_status(&mut self) -> Result<RunStatus, BackendError> {
        let value = self.execute(QmpCommand::QueryStatus)?;
        Ok(RunStatus {
            running: value
                .get("running")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            status: value
                .get("status")
                .and_then(Value::as_str)
                .unwrap_or("unknown")
                .to_owned(),
        })
    }

    fn call(&mut self, name: &str) -> Result<Value, BackendError> {
        let request = json!({ "execute": name }).to_string() + "\n";
        self.writer
            .write_all(request.as_bytes())
            .map_err(|e| self.error(format!("send {name}: {e}")))?;
        self.answer(name)
    }

    /// Runs a command with arguments.
    pub fn call_with(&mut self, name: &str, arguments: Value) -> Result<Value, BackendError> {
        self.try_call_with(name, arguments)?
            .map_err(|error| self.error(format!("{name}: {error}")))
    }

    /// Runs a command with arguments; the inner error is QEMU's own answer
    /// (the command was refused: QEMU changed nothing), the outer one a
    /// broken channel (whether it ran is unknown).
    pub fn try_call_with(
        &mut self,
        name: &str,
        arguments: Value,
    ) -> Result<Result<Value, Value>, BackendError> {
        let request = json!({ "execute": name, "arguments": arguments }).to_string() + "\n";
        self.writer
            .write_all(request.as_bytes())
            .map_err(|e| self.error(format!("send {name}: {e}")))?;
        self.reply()
    }

    /// Hands QEMU an open file under `name` (`getfd` with the descriptor
    /// passed as SCM_RIGHTS): migration then reads or writes it as
    /// `fd:NAME`, and no path or shell is involved.
    pub fn pass_fd(
        &mut self,
        name: &str,
        fd: std::os::fd::BorrowedFd<'_>,
    ) -> Result<(), BackendError> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        use std::os::fd::AsRawFd;
        let request =
            json!({ "execute": "getfd", "arguments": { "fdname": name } }).to_string() + "\n";
        let fds = [fd.as_raw_fd()];
        let iov = [std::io::IoSlice::new(request.as_bytes())];
        let sent = sendmsg::<()>(
            self.writer.as_raw_fd(),
            &iov,
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .map_err(|e| self.error(format!("send getfd: {e}")))?;
        if sent != request.len() {
            return Err(self.error("getfd: short write".into()));
        }
        self.answer("getfd").map(drop)
    }

    fn answer(&mut self, name: &str) -> Result<Value, BackendError> {
        self.reply()?
            .map_err(|error| self.error(format!("{name}: {error}")))
    }

    /// The next reply, events skipped: its value or QEMU's error.
    fn reply(&mut self) -> Result<Result<Value, Value>, BackendError> {
        loop {
            let message = self.read_message()?;
            if message.get("event").is_some() {
                continue;
            }
            if let Some(value) = message.get("return") {
                return Ok(Ok(value.clone()));
            }
            if let Some(error) = message.get("error") {
                return Ok(Err(error.clone()));
            }
        }
    }

    fn read_message(&mut self) -> Result<Value, BackendError> {
        let mut line = String::new();
        let read = self
            .reader
            .read_line(&mut line)
            .map_err(|e| self.error(format!("read: {e}")))?;
        if read == 0 {
            return Err(self.error("connection closed".into()));
        }
        serde_json::from_str(&line).map_err(|e| self.error(format!("bad JSON {line:?}: {e}")))
    }

    fn error(&self, detail: String) -> BackendError {
        BackendError::Qmp {
            socket: self.socket.clone(),
            detail,
        }
    }
}
