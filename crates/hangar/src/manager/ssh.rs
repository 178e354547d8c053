//! VMs reached over SSH (disk images without the agent): readiness, exec
//! and cp, with the host key recorded on first contact and checked after.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use hangar_proto::{CopySummary, ExecRequest, ExitStatus};

use super::lifecycle::{vmm_alive_check, vmm_only_check};
use super::{Manager, ManagerError};
use crate::guest::ssh::{self, SshError, SshKey, SshPrivateKey, SshTarget};
use crate::guest::{ExecIo, OutputSink};
use crate::record::{Accel, VmRecord, VmState};
use crate::spec::{ImageSource, SshSpec, VmSpec};

/// How long a first boot may take to reach SSH: cloud-init under TCG
/// takes most of a minute.
pub const SSH_READY_TIMEOUT_TCG: Duration = Duration::from_secs(300);
pub const SSH_READY_TIMEOUT_KVM: Duration = Duration::from_secs(120);

/// True for VMs Hangar reaches over SSH rather than the agent.
pub(super) fn uses_ssh(record: &VmRecord) -> bool {
    record.spec.ssh.is_some() && matches!(record.spec.image, ImageSource::Disk { .. })
}

/// Create's part for a key given in memory: the spec says so and carries
/// the public half (what a key given again is checked against); a spec
/// that says so without a key is refused, before anything is recorded.
pub(super) fn mark_memory_key(
    spec: &mut VmSpec,
    key: Option<&SshPrivateKey>,
) -> Result<(), ManagerError> {
    let Some(key) = key else {
        if spec.ssh.as_ref().is_some_and(|s| s.private_key_in_memory) {
            return Err(ManagerError::Config(
                "ssh.private_key_in_memory is set but no key was given: pass the key to Manager::create_with_ssh_key, or give private_key_path".into(),
            ));
        }
        return Ok(());
    };
    if !matches!(spec.image, ImageSource::Disk { .. }) {
        return Err(crate::spec::SpecError::DiskOnly {
            field: "an SSH private key",
        }
        .into());
    }
    let ssh = spec.ssh.get_or_insert_with(SshSpec::default);
    ssh.private_key_in_memory = true;
    ssh.public_key = Some(
        key.public_key()
            .map_err(|err| ManagerError::Config(err.to_string()))?,
    );
    Ok(())
}

impl Manager {
    /// Gives this manager the in-memory SSH private key of a VM created
    /// with one ([`Self::create_with_ssh_key`]), e.g. in a later process.
    /// Refused for other VMs and for a key that is not the VM's.
    pub fn supply_ssh_key(
        &mut self,
        namespace: Option<&str>,
        key: &str,
        private_key: &str,
    ) -> Result<(), ManagerError> {
        let record = self.store.find(namespace, key)?;
        let Some(expected) = record
            .spec
            .ssh
            .as_ref()
            .filter(|s| s.private_key_in_memory)
            .map(|s| s.public_key.clone().unwrap_or_default())
        else {
            return Err(ManagerError::Config(format!(
                "VM {}: its SSH key is not one given in memory; nothing to supply",
                record.name
            )));
        };
        let private_key = SshPrivateKey::from_openssh(private_key)
            .map_err(|err| ManagerError::Config(format!("VM {}: {err}", record.name)))?;
        if !private_key.matches(&expected) {
            return Err(ManagerError::Config(format!(
                "VM {}: this SSH private key ({}) is not the one the VM was created with; give that one",
                record.name,
                private_key.fingerprint()
            )));
        }
        self.ssh_keys.insert(record.id, private_key);
        Ok(())
    }

    /// The private key for a VM's SSH server: its file, or the in-memory
    /// key this manager holds (else an error that says how to give it).
    fn ssh_key(&self, record: &VmRecord, ssh: &SshSpec) -> Result<SshKey, ManagerError> {
        if ssh.private_key_in_memory {
            return match self.ssh_keys.get(&record.id) {
                Some(key) => Ok(SshKey::Memory(key.clone())),
                None => Err(ManagerError::SshKeyNotHeld {
                    name: record.name.clone(),
                }),
            };
        }
        Ok(SshKey::File(
            ssh.private_key_path
                .clone()
                .unwrap_or_else(|| super::ssh_key_path(&record.work_dir)),
        ))
    }

    /// Start's check, before anything is launched: an SSH VM whose key
    /// was given in memory needs this manager to hold it.
    pub(super) fn check_ssh_key_held(&self, record: &VmRecord) -> Result<(), ManagerError> {
        match record.spec.ssh.as_ref().filter(|_| uses_ssh(record)) {
            Some(ssh) => self.ssh_key(record, ssh).map(drop),
            None => Ok(()),
        }
    }

    /// The address, user and key to reach a VM's SSH server.
    pub(super) fn ssh_target(&self, record: &VmRecord) -> Result<SshTarget, ManagerError> {
        let ssh = record.spec.ssh.as_ref().ok_or_else(|| {
            ManagerError::Config(format!("VM {} has no SSH settings", record.name))
        })?;
        let key = self.ssh_key(record, ssh)?;
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
            key,
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
        let SshKey::File(key_path) = &target.key else {
            return Err(ManagerError::Config(format!(
                "VM {}: its SSH private key is held in memory only, and the ssh client needs a key file; use exec and cp, or recreate the VM with a key file (--ssh-private-key FILE)",
                record.name
            )));
        };
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
        argv.push(key_path.clone().into_os_string());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manager::ManagerOptions;
    use crate::record::BackendKind;

    fn manager(dir: &Path) -> Manager {
        Manager::open(ManagerOptions {
            state_dir: Some(dir.to_path_buf()),
            accel: Some(Accel::Tcg),
        })
        .unwrap()
    }

    /// A manager with a small raw disk image `disk:d`, and a spec of it.
    fn with_disk_image(dir: &Path) -> (Manager, VmSpec) {
        let m = manager(&dir.join("state"));
        let raw = dir.join("d.raw");
        std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
        m.add_disk_image(raw.to_str().unwrap(), Some("d"), None, &mut |_| {})
            .unwrap();
        let mut spec = VmSpec::new("web");
        spec.image = ImageSource::Disk { name: "d".into() };
        (m, spec)
    }

    /// The secret lines of a PEM (the first is a header every unencrypted
    /// key shares).
    fn secret_lines(pem: &str) -> Vec<String> {
        pem.lines()
            .filter(|l| !l.starts_with("-----"))
            .skip(1)
            .map(str::to_owned)
            .collect()
    }

    /// Every file under `dir`, read whole (the store, its WAL, the seed).
    fn all_bytes(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                out.extend(all_bytes(&path));
            } else if let Ok(bytes) = std::fs::read(&path) {
                out.push((path, bytes));
            }
        }
        out
    }

    #[test]
    fn a_key_in_memory_is_held_not_recorded_and_can_be_given_again() {
        let dir = tempfile::tempdir().unwrap();
        let (mut m, spec) = with_disk_image(dir.path());
        let pair = ssh::generate_key("mine@host").unwrap();
        let vm = m
            .create_with_ssh_key(spec, BackendKind::Noop, &pair.private, None)
            .unwrap();
        let ssh = vm.spec.ssh.clone().unwrap();
        assert!(ssh.private_key_in_memory && ssh.private_key_path.is_none());
        assert_eq!(ssh.public_key.as_deref(), Some(pair.public.as_str()));
        assert_eq!(ssh.user, "hangar");
        assert!(!super::super::ssh_key_path(&vm.work_dir).exists());
        m.check_ssh_key_held(&vm).unwrap();
        // Nowhere on disk, in the record's JSON or in any Debug output;
        // the seed authorizes the public half.
        let json = serde_json::to_string(&m.inspect(None, "web").unwrap()).unwrap();
        assert!(json.contains(r#""private_key_in_memory":true"#), "{json}");
        let printed = format!("{vm:?} {m:?} {json}");
        let files = all_bytes(&dir.path().join("state"));
        for line in secret_lines(&pair.private) {
            assert!(!printed.contains(&line), "key material in {printed}");
            for (path, bytes) in &files {
                let found = bytes.windows(line.len()).any(|w| w == line.as_bytes());
                assert!(!found, "key material in {}", path.display());
            }
        }
        let seed = std::fs::read(super::super::seed_path(&vm.work_dir)).unwrap();
        let public_b64 = pair.public.split_whitespace().nth(1).unwrap();
        assert!(seed
            .windows(public_b64.len())
            .any(|w| w == public_b64.as_bytes()));

        // A later process does not hold the key: start says how to give
        // it, before anything is launched.
        let mut later = manager(&dir.path().join("state"));
        let err = later.start(None, "web").unwrap_err().to_string();
        assert!(
            err.contains("VM web") && err.contains("Manager::supply_ssh_key"),
            "{err}"
        );
        assert_eq!(later.inspect(None, "web").unwrap().state, VmState::Created);
        let err = later.ssh_target(&vm).unwrap_err().to_string();
        assert!(err.contains("does not hold it"), "{err}");
        let other = ssh::generate_key("other").unwrap();
        let err = later
            .supply_ssh_key(None, "web", &other.private)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not the one the VM was created with"), "{err}");
        let err = later
            .supply_ssh_key(None, "web", "not a key")
            .unwrap_err()
            .to_string();
        assert!(err.contains("without a passphrase"), "{err}");
        later.supply_ssh_key(None, "web", &pair.private).unwrap();
        later.check_ssh_key_held(&vm).unwrap();
        assert_eq!(later.start(None, "web").unwrap().state, VmState::Running);
        later.remove(None, "web", true).unwrap();
        assert!(later.ssh_keys.is_empty());
    }

    #[test]
    fn a_bad_key_in_memory_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (mut m, spec) = with_disk_image(dir.path());
        let err = m
            .create_with_ssh_key(
                spec.clone(),
                BackendKind::Noop,
                "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n",
                None,
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("SSH private key given in memory"), "{err}");
        // A spec that says "in memory" without the key.
        let mut marked = spec.clone();
        marked.ssh = Some(SshSpec {
            private_key_in_memory: true,
            ..SshSpec::default()
        });
        let err = m.create(marked.clone(), BackendKind::Noop).unwrap_err();
        assert!(err.to_string().contains("create_with_ssh_key"), "{err}");
        // A file and a key in memory at once.
        let pair = ssh::generate_key("x").unwrap();
        marked.ssh.as_mut().unwrap().private_key_path = Some("/keys/id".into());
        let err = m
            .create_with_ssh_key(marked, BackendKind::Noop, &pair.private, None)
            .unwrap_err();
        assert!(err.to_string().contains("not both"), "{err}");
        // A VM without SSH has no use for one.
        let err = m
            .create_with_ssh_key(VmSpec::new("x"), BackendKind::Noop, &pair.private, None)
            .unwrap_err();
        assert!(err.to_string().contains("disk images only"), "{err}");
        assert!(m.list().unwrap().is_empty());
        assert_eq!(std::fs::read_dir(m.layout().vms_dir()).unwrap().count(), 0);
        assert!(m.ssh_keys.is_empty());
    }
}
