//! Agent sessions a manager keeps open between its own calls.
//!
//! A start or restore ends with an agent session (the hello, the new
//! identity). Keeping it lets this manager's next exec on that VM skip a
//! second connection and hello round trip: about 10 ms of a restored
//! guest's still cold translation caches under TCG, and a port open in the
//! guest. Separate processes (two CLI commands) cannot share it; a library
//! user or a long-lived daemon does. A kept session holds one of the VM's
//! agent ports for as long as it is kept.

use std::collections::HashMap;

use crate::backend::process;
use crate::guest::{AgentClient, AgentEndpoint};
use crate::record::{VmRecord, VmState};

use super::Manager;

/// One session, with the VMM process it was opened to.
#[derive(Debug)]
pub(super) struct KeptSession {
    pid: Option<u32>,
    pid_start_time: Option<u64>,
    client: AgentClient,
}

/// Sessions by VM id.
pub(super) type Sessions = HashMap<String, KeptSession>;

impl Manager {
    /// Keeps `client` for the next agent call on `record`'s VM, unless the
    /// VM has a vsock endpoint and this is not a vsock session (execs
    /// prefer vsock there). Sessions to VMMs that have ended meanwhile (a
    /// stop or rm by another process) go.
    pub(super) fn keep_session(&mut self, record: &VmRecord, client: AgentClient) {
        self.sessions.retain(|_, kept| {
            kept.pid
                .is_some_and(|pid| process::is_alive(pid, kept.pid_start_time))
        });
        let serial = matches!(client.endpoint(), AgentEndpoint::Serial { .. });
        if serial && record.sockets.agent_vsock.is_some() {
            return;
        }
        self.sessions.insert(
            record.id.clone(),
            KeptSession {
                pid: record.pid,
                pid_start_time: record.pid_start_time,
                client,
            },
        );
    }

    /// The kept session for `record`'s VM, if it was opened to the VMM
    /// process that runs it now (not one since stopped or restarted by
    /// another command) and the VM still runs.
    pub(super) fn take_session(&mut self, record: &VmRecord) -> Option<AgentClient> {
        let kept = self.sessions.remove(&record.id)?;
        let same_vmm = record.pid.is_some()
            && kept.pid == record.pid
            && kept.pid_start_time == record.pid_start_time;
        (same_vmm && record.state == VmState::Running).then_some(kept.client)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use hangar_proto::{FrameReader, GuestMessage, HostMessage, PROTOCOL_VERSION};

    use super::*;
    use crate::{Accel, BackendKind, ManagerOptions, VmSpec};

    /// An agent socket that answers every connection's hello, then idles.
    fn fake_agent(dir: &Path) -> PathBuf {
        let path = dir.join("agent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let conn = conn.unwrap();
                let mut reader = FrameReader::new(conn.try_clone().unwrap());
                let frame = reader.read_frame().unwrap();
                let Ok(HostMessage::Hello { nonce, .. }) = HostMessage::from_frame(&frame) else {
                    panic!("the first frame is not a hello");
                };
                let hello = GuestMessage::Hello {
                    version: PROTOCOL_VERSION,
                    nonce: Some(nonce),
                    facts: Default::default(),
                };
                hello.to_frame().write_to(&mut &conn).unwrap();
                std::thread::spawn(move || std::thread::sleep(Duration::from_secs(30)));
                std::mem::forget(conn);
            }
        });
        path
    }

    fn session(socket: &Path) -> AgentClient {
        AgentClient::connect(socket, Duration::from_secs(10), &mut || Ok(())).unwrap()
    }

    #[test]
    fn a_kept_session_serves_only_the_vmm_it_was_opened_to() {
        let dir = tempfile::tempdir().unwrap();
        let mut manager = Manager::open(ManagerOptions {
            state_dir: Some(dir.path().join("state")),
            accel: Some(Accel::Tcg),
        })
        .unwrap();
        let socket = fake_agent(dir.path());
        let mut vm = manager
            .create(VmSpec::new("web"), BackendKind::Noop)
            .unwrap();
        vm.state = VmState::Running;
        vm.pid = Some(4242);
        vm.pid_start_time = Some(7);

        manager.keep_session(&vm, session(&socket));
        assert!(manager.take_session(&vm).is_some());
        assert!(
            manager.take_session(&vm).is_none(),
            "a session is handed out once, until it is kept again"
        );

        // Stopped and started again by another command: a new VMM process.
        manager.keep_session(&vm, session(&socket));
        let restarted = VmRecord {
            pid_start_time: Some(8),
            ..vm.clone()
        };
        assert!(manager.take_session(&restarted).is_none());
        assert!(
            manager.take_session(&vm).is_none(),
            "the stale one is dropped"
        );

        // Paused meanwhile: the session is not used for it.
        manager.keep_session(&vm, session(&socket));
        let paused = VmRecord {
            state: VmState::Paused,
            ..vm.clone()
        };
        assert!(manager.take_session(&paused).is_none());
    }
}
