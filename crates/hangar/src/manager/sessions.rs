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
    /// Keeps the session a start or restore of `record`'s VM ended with.
    /// A new VMM is when sessions to VMMs that have ended meanwhile (a stop
    /// or rm by another process) go, not at every exec; stops, kills and
    /// removals by this manager drop theirs.
    pub(super) fn keep_started_session(&mut self, record: &VmRecord, client: Option<AgentClient>) {
        self.sessions.retain(|_, kept| {
            kept.pid
                .is_some_and(|pid| process::is_alive(pid, kept.pid_start_time))
        });
        if let Some(client) = client {
            self.keep_session(record, client);
        }
    }

    /// Keeps `client` for the next agent call on `record`'s VM, unless the
    /// VM has a vsock endpoint and this is not a vsock session (execs
    /// prefer vsock there).
    pub(super) fn keep_session(&mut self, record: &VmRecord, client: AgentClient) {
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
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use hangar_proto::{ExitStatus, FrameReader, GuestMessage, HostMessage, PROTOCOL_VERSION};

    use super::*;
    use crate::guest::CollectSink;
    use crate::{BackendKind, ExecRequest, ManagerError, VmSpec};

    /// An agent socket that answers hellos and execs (each exits 0) on
    /// every connection, and counts the connections.
    fn fake_agent(dir: &Path) -> (PathBuf, Arc<AtomicUsize>) {
        let path = dir.join("agent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&connections);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                counted.fetch_add(1, Ordering::SeqCst);
                let conn = conn.unwrap();
                std::thread::spawn(move || serve(conn));
            }
        });
        (path, connections)
    }

    fn serve(conn: UnixStream) {
        let mut reader = FrameReader::new(conn.try_clone().unwrap());
        while let Ok(frame) = reader.read_frame() {
            let answer = match HostMessage::from_frame(&frame) {
                Ok(HostMessage::Hello { nonce, .. }) => GuestMessage::Hello {
                    version: PROTOCOL_VERSION,
                    nonce: Some(nonce),
                    facts: Default::default(),
                },
                Ok(HostMessage::Exec { id, .. }) => GuestMessage::ExecExited {
                    id,
                    status: ExitStatus::Code(0),
                },
                _ => continue,
            };
            if answer.to_frame().write_to(&mut &conn).is_err() {
                return;
            }
        }
    }

    fn session(socket: &Path) -> AgentClient {
        AgentClient::connect(socket, Duration::from_secs(10), &mut || Ok(())).unwrap()
    }

    fn manager(dir: &Path) -> Manager {
        crate::manager::tests::manager(&dir.join("state"))
    }

    #[test]
    fn a_kept_session_serves_only_the_vmm_it_was_opened_to() {
        let dir = tempfile::tempdir().unwrap();
        let mut manager = manager(dir.path());
        let (socket, _) = fake_agent(dir.path());
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

    #[test]
    fn execs_go_through_the_kept_session_and_an_end_drops_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut manager = manager(dir.path());
        let (socket, connections) = fake_agent(dir.path());
        let vm = manager
            .create(VmSpec::new("web"), BackendKind::Noop)
            .unwrap();
        // A VMM that runs: this test process stands in for it.
        let me = std::process::id();
        let vm = manager
            .store
            .update(&vm.id, |r| {
                r.state = VmState::Running;
                r.pid = Some(me);
                r.pid_start_time = process::start_time(me);
                r.sockets.agent = Some(socket.clone());
                Ok::<_, ManagerError>(())
            })
            .unwrap();
        manager.keep_session(&vm, session(&socket));
        let request = || ExecRequest {
            argv: vec!["true".into()],
            ..Default::default()
        };
        for _ in 0..3 {
            let status = manager
                .exec(
                    None,
                    "web",
                    request(),
                    Default::default(),
                    &mut CollectSink::default(),
                )
                .unwrap();
            assert_eq!(status, ExitStatus::Code(0));
        }
        assert_eq!(connections.load(Ordering::SeqCst), 1, "one session for all");

        // The VM ends (recorded by this manager): its session goes with it.
        manager
            .mark_ended(&vm.id, VmState::Stopped, "test".into())
            .unwrap();
        assert!(manager.sessions.is_empty());
    }
}
