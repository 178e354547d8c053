//! VMs reached over SSH (disk images without the agent): readiness, exec
//! and cp, with the host key recorded on first contact and checked after.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use hangar_proto::{CopySummary, ExecRequest, ExitStatus};

use super::lifecycle::{vmm_alive_check, vmm_only_check};
use super::{Manager, ManagerError};
use crate::guest::ssh::{self, SshError, SshTarget};
use crate::guest::{ExecIo, OutputSink};
use crate::record::{Accel, VmRecord, VmState};
use crate::spec::ImageSource;

/// How long a first boot may take to reach SSH: cloud-init under TCG
/// takes most of a minute.
pub const SSH_READY_TIMEOUT_TCG: Duration = Duration::from_secs(300);
pub const SSH_READY_TIMEOUT_KVM: Duration = Duration::from_secs(120);

/// True for VMs Hangar reaches over SSH rather than the agent.
pub(super) fn uses_ssh(record: &VmRecord) -> bool {
    record.spec.ssh.is_some() && matches!(record.spec.image, ImageSource::Disk { .. })
}

impl Manager {
    /// The address, user and key to reach a VM's SSH server.
    pub(super) fn ssh_target(&self, record: &VmRecord) -> Result<SshTarget, ManagerError> {
        let ssh = record.spec.ssh.as_ref().ok_or_else(|| {
            ManagerError::Config(format!("VM {} has no SSH settings", record.name))
        })?;
        let port = record
            .ports
            .iter()
            .find(|forward| forward.guest == super::disks::SSH_PORT)
            .map(|forward| forward.host)
            .ok_or_else(|| {
                ManagerError::Config(format!(
                    "VM {} has no host port forwarded to its SSH server (guest port 22)",
                    record.name
                ))
            })?;
        Ok(SshTarget {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            user: ssh.user.clone(),
            key_path: ssh
                .private_key_path
                .clone()
                .unwrap_or_else(|| super::ssh_key_path(&record.work_dir)),
            host_key: record.ssh_host_key.clone(),
        })
    }

    /// Start's readiness for an SSH VM: its SSH server takes the key.
    /// The host key seen first is recorded.
    pub(super) fn wait_ssh_ready(
        &mut self,
        record: VmRecord,
        accel: Accel,
    ) -> Result<VmRecord, ManagerError> {
        let timeout = match accel {
            Accel::Kvm => SSH_READY_TIMEOUT_KVM,
            Accel::Tcg => SSH_READY_TIMEOUT_TCG,
        };
        let started = Instant::now();
        let (pid, pid_start) = (record.pid.unwrap_or(0), record.pid_start_time);
        let mut check = || vmm_alive_check(pid, pid_start);
        let ready = self.ssh_target(&record).and_then(|target| {
            let host_key = ssh::wait_ready(&target, timeout, &mut check)
                .map_err(|err| ManagerError::Config(err.to_string()))?;
            let target = SshTarget {
                host_key: Some(host_key.clone()),
                ..target
            };
            let left = timeout.saturating_sub(started.elapsed());
            wait_cloud_init(&target, left, &mut check)
                .map_err(|err| ManagerError::Config(err.to_string()))?;
            Ok(host_key)
        });
        match ready {
            Ok(host_key) => {
                let id = record.id.clone();
                self.store.update(&id, |r| {
                    r.ssh_host_key.get_or_insert(host_key);
                    Ok::<_, ManagerError>(())
                })?;
                self.mark_running(&id, None)
            }
            Err(err) => {
                let console = self.console_tail(&record);
                let _ = self.kill_now(&record);
                let reason = match err {
                    ManagerError::Config(text) => text,
                    other => other.to_string(),
                };
                self.mark_ended(&record.id, VmState::Failed, format!("not ready: {reason}"))?;
                if crate::interrupt::requested() {
                    return Err(ManagerError::Interrupted);
                }
                Err(ManagerError::NotReady {
                    name: record.name,
                    waited: started.elapsed(),
                    reason,
                    console,
                })
            }
        }
    }

    /// The system ssh client's argv for an interactive shell in a running
    /// SSH VM: its key, its port, and a known_hosts file holding only the
    /// host key Hangar recorded (strict checking).
    pub fn ssh_client_argv(
        &mut self,
        namespace: Option<&str>,
        key: &str,
    ) -> Result<Vec<std::ffi::OsString>, ManagerError> {
        let record = self.inspect(namespace, key)?;
        if record.state != VmState::Running || !uses_ssh(&record) {
            return Err(ManagerError::InvalidState {
                name: record.name,
                state: record.state,
                action: "ssh into it",
                hint:
                    "; it must be a running VM of a disk image (use `hangar exec` for the others)",
            });
        }
        let target = self.ssh_target(&record)?;
        let host_key = target.host_key.clone().ok_or_else(|| {
            ManagerError::Config(format!("VM {} has no recorded host key yet", record.name))
        })?;
        let known_hosts = record.work_dir.join("known_hosts");
        let line = format!("[127.0.0.1]:{} {}\n", target.addr.port(), host_key);
        crate::fsutil::write_private(&known_hosts, line.as_bytes()).map_err(|source| {
            ManagerError::Io {
                path: known_hosts.clone(),
                source,
            }
        })?;
        let mut argv: Vec<std::ffi::OsString> = vec!["ssh".into(), "-i".into()];
        argv.push(target.key_path.into_os_string());
        argv.extend(["-p".into(), target.addr.port().to_string().into()]);
        argv.extend(["-o".into(), "IdentitiesOnly=yes".into()]);
        argv.extend(["-o".into(), "StrictHostKeyChecking=yes".into()]);
        let mut known = std::ffi::OsString::from("UserKnownHostsFile=");
        known.push(&known_hosts);
        argv.extend(["-o".into(), known]);
        argv.extend(["-l".into(), target.user.into(), "127.0.0.1".into()]);
        Ok(argv)
    }

    fn ssh_error(&self, record: &VmRecord, err: SshError) -> ManagerError {
        if crate::interrupt::requested() {
            return ManagerError::Interrupted;
        }
        ManagerError::Ssh {
            name: record.name.clone(),
            source: err,
        }
    }

    /// Runs a command over SSH (for a VM without the agent).
    pub(super) fn exec_ssh(
        &mut self,
        record: &VmRecord,
        request: ExecRequest,
        io: ExecIo,
        sink: &mut dyn OutputSink,
    ) -> Result<ExitStatus, ManagerError> {
        if request.user.is_some() || request.tty.is_some() {
            return Err(ManagerError::Config(format!(
                "VM {} is reached over SSH as {}: -u and -t need the agent (use `sudo -u` in the command, or put the agent in the image)",
                record.name,
                record.spec.ssh.as_ref().map_or("?", |s| s.user.as_str())
            )));
        }
        let target = self.ssh_target(record)?;
        let command = ssh::command_line(&request.argv, &request.env, request.cwd.as_deref());
        let (pid, start) = (record.pid.unwrap_or(0), record.pid_start_time);
        let deadline = io.timeout.map(|t| Instant::now() + t);
        let mut check = || {
            if crate::interrupt::requested() {
                return Err("interrupted".into());
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err("timeout".into());
            }
            vmm_only_check(pid, start)
        };
        match ssh::exec(&target, &command, io.stdin, sink, &mut check) {
            // `--timeout` ends the command like the agent path does.
            Err(SshError::Stopped(reason)) if reason == "timeout" => Ok(ExitStatus::Code(124)),
            other => other.map_err(|err| self.ssh_error(record, err)),
        }
    }

    /// `cp` into a VM over SSH: a tar stream into the guest's `tar`, with
    /// docker cp's rules (into an existing directory, else as the new
    /// name).
    pub(super) fn copy_into_ssh(
        &mut self,
        record: &VmRecord,
        source: &Path,
        dest: &str,
    ) -> Result<CopySummary, ManagerError> {
        let target = self.ssh_target(record)?;
        let (pid, start) = (record.pid.unwrap_or(0), record.pid_start_time);
        let mut check = || vmm_only_check(pid, start);
        let run = |argv: &[&str],
                   stdin: Option<Box<dyn std::io::Read + Send>>,
                   check: &mut dyn FnMut() -> Result<(), String>| {
            let argv: Vec<String> = argv.iter().map(|a| (*a).to_owned()).collect();
            let mut sink = crate::guest::CollectSink::default();
            let status = ssh::exec(
                &target,
                &ssh::command_line(&argv, &[], None),
                stdin,
                &mut sink,
                check,
            )?;
            Ok::<_, SshError>((status, sink))
        };
        let (is_dir, _) = run(&["test", "-d", dest], None, &mut check)
            .map_err(|err| self.ssh_error(record, err))?;
        let (dir, name) = if is_dir == ExitStatus::Code(0) {
            let name = hangar_proto::transfer::expected_root_name(&source.to_string_lossy());
            (dest.to_owned(), name)
        } else {
            let path = Path::new(dest);
            let parent = path
                .parent()
                .map(|p| p.to_string_lossy().into_owned())
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| ".".into());
            (parent, hangar_proto::transfer::expected_root_name(dest))
        };
        let (reader, writer) = std::io::pipe().map_err(|err| ManagerError::Io {
            path: source.to_path_buf(),
            source: err,
        })?;
        let source_owned = source.to_path_buf();
        let packer = std::thread::spawn(move || {
            hangar_proto::transfer::pack_as(&source_owned, &name, writer)
        });
        let (status, sink) = run(
            &["tar", "-x", "-f", "-", "-C", &dir],
            Some(Box::new(reader)),
            &mut check,
        )
        .map_err(|err| self.ssh_error(record, err))?;
        let summary = packer
            .join()
            .map_err(|_| ManagerError::Config("the tar writer panicked".into()))?
            .map_err(|err| ManagerError::Config(format!("cp {}: {err}", source.display())))?;
        if status != ExitStatus::Code(0) {
            return Err(ManagerError::Config(format!(
                "cp into {}:{dest}: the guest's tar ended with {status}: {}",
                record.name,
                String::from_utf8_lossy(&sink.stderr).trim()
            )));
        }
        Ok(summary)
    }

    /// `cp` out of a VM over SSH: the guest's `tar -c`, unpacked like any
    /// untrusted archive (no setuid bits, the host names the copy).
    pub(super) fn copy_from_ssh(
        &mut self,
        record: &VmRecord,
        source: &str,
        dest: &Path,
    ) -> Result<CopySummary, ManagerError> {
        let target = self.ssh_target(record)?;
        let (pid, start) = (record.pid.unwrap_or(0), record.pid_start_time);
        let mut check = || vmm_only_check(pid, start);
        let path = Path::new(source);
        let parent = path
            .parent()
            .map(|p| p.to_string_lossy().into_owned())
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| ".".into());
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| ".".into());
        let argv: Vec<String> = ["tar", "-c", "-f", "-", "-C", &parent, "--", &name]
            .iter()
            .map(|a| (*a).to_owned())
            .collect();
        let (reader, writer) = std::io::pipe().map_err(|source| ManagerError::Io {
            path: dest.to_path_buf(),
            source,
        })?;
        let options = hangar_proto::transfer::UnpackOptions {
            keep_setid_bits: false,
            root_name: Some(hangar_proto::transfer::expected_root_name(source)),
        };
        let dest_owned = dest.to_path_buf();
        let unpacker = std::thread::spawn(move || {
            hangar_proto::transfer::unpack(reader, &dest_owned, options)
        });
        let mut sink = PipeSink {
            out: Some(writer),
            stderr: Vec::new(),
        };
        let status = ssh::exec(
            &target,
            &ssh::command_line(&argv, &[], None),
            None,
            &mut sink,
            &mut check,
        );
        drop(sink.out.take());
        let unpacked = unpacker
            .join()
            .map_err(|_| ManagerError::Config("the tar reader panicked".into()))?;
        let status = status.map_err(|err| self.ssh_error(record, err))?;
        if status != ExitStatus::Code(0) {
            return Err(ManagerError::Config(format!(
                "cp {}:{source}: the guest's tar ended with {status}: {}",
                record.name,
                String::from_utf8_lossy(&sink.stderr).trim()
            )));
        }
        unpacked.map_err(|err| ManagerError::Config(format!("cp {}:{source}: {err}", record.name)))
    }
}

/// Waits until cloud-init (if the guest has it) has finished: until then
/// it may still create users or restart sshd under a session. Sessions
/// cut by such a restart are retried until `timeout`.
fn wait_cloud_init(
    target: &SshTarget,
    timeout: Duration,
    check: &mut dyn FnMut() -> Result<(), String>,
) -> Result<(), SshError> {
    let command = "if command -v cloud-init >/dev/null 2>&1; then cloud-init status --wait >/dev/null 2>&1; fi; true";
    let started = Instant::now();
    loop {
        let mut sink = crate::guest::CollectSink::default();
        match ssh::exec(target, command, None, &mut sink, check) {
            Ok(_) => return Ok(()),
            Err(err @ (SshError::HostKeyChanged { .. } | SshError::Stopped(_))) => return Err(err),
            Err(err) if started.elapsed() >= timeout => {
                return Err(SshError::NotReady {
                    addr: target.addr,
                    waited: started.elapsed(),
                    last: format!("waiting for cloud-init to finish: {err}"),
                })
            }
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// Guest stdout into a pipe (the unpacker reads the other end); stderr
/// kept for the error message.
struct PipeSink {
    out: Option<std::io::PipeWriter>,
    stderr: Vec<u8>,
}

impl OutputSink for PipeSink {
    fn on_stdout(&mut self, chunk: &[u8]) {
        use std::io::Write;
        // A reader that stopped (bad archive) ends the copy with its error.
        if let Some(out) = &mut self.out {
            if out.write_all(chunk).is_err() {
                self.out = None;
            }
        }
    }

    fn on_stderr(&mut self, chunk: &[u8]) {
        if self.stderr.len() < 64 * 1024 {
            self.stderr.extend_from_slice(chunk);
        }
    }
}
