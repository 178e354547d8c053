//! SSH to guests without an agent (cloud images), through russh: a
//! per-VM Ed25519 key, the guest's host key recorded on first contact and
//! required after, readiness that backs off and says what it saw, exec
//! with stdin/stdout/stderr and exit status, and `cp` as tar streams.
//!
//! SSH runs a command through the guest's shell: each argument is quoted
//! for that shell (single quotes), so an argument is never split or
//! expanded. Nothing here passes a string to a shell on the host.

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hangar_proto::ExitStatus;
use russh::keys::ssh_key::{self, private::Ed25519Keypair, LineEnding, PrivateKey, PublicKey};
use russh::keys::PrivateKeyWithHashAlg;
use russh::{client, ChannelMsg};

use super::OutputSink;

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("SSH key {path}: {detail}")]
    Key { path: PathBuf, detail: String },
    /// The message never quotes the key text.
    #[error("SSH private key given in memory: {detail}; give an OpenSSH private key without a passphrase (the text of a file that starts with -----BEGIN OPENSSH PRIVATE KEY-----)")]
    MemoryKey { detail: String },
    #[error("SSH to {addr}: the guest's host key changed (recorded {expected}, now {got}); if the guest was rebuilt on purpose, recreate the VM")]
    HostKeyChanged {
        addr: SocketAddr,
        expected: String,
        got: String,
    },
    #[error("SSH to {addr}: the guest refused the key for user {user:?}")]
    AuthRefused { addr: SocketAddr, user: String },
    #[error("SSH to {addr}: {detail}")]
    Session { addr: SocketAddr, detail: String },
    #[error("SSH to {addr} not ready after {waited:?}; last seen: {last}")]
    NotReady {
        addr: SocketAddr,
        waited: Duration,
        last: String,
    },
    #[error("SSH to {addr}: the command ended without an exit status (the connection dropped)")]
    NoExitStatus { addr: SocketAddr },
    #[error("{0}")]
    Stopped(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// Where and as whom to reach a guest.
#[derive(Clone, Debug)]
pub struct SshTarget {
    pub addr: SocketAddr,
    pub user: String,
    pub key: SshKey,
    /// The host key recorded on first contact (OpenSSH format); required
    /// from then on.
    pub host_key: Option<String>,
}

/// The private key a target logs in with.
#[derive(Clone, Debug)]
pub enum SshKey {
    /// A private key file (Hangar's per-VM key, or the user's own).
    File(PathBuf),
    /// A key given in memory, held only by this process.
    Memory(SshPrivateKey),
}

impl SshKey {
    fn load(&self) -> Result<PrivateKey, SshError> {
        match self {
            Self::File(path) => load_key(path),
            Self::Memory(key) => Ok(PrivateKey::clone(&key.key)),
        }
    }
}

/// A private key given in memory (OpenSSH text): parsed once, never
/// written anywhere, its secret parts wiped when the last copy drops
/// (ssh-key zeroizes them), and never printed: `Debug` shows the public
/// half's fingerprint.
#[derive(Clone)]
pub struct SshPrivateKey {
    key: Arc<PrivateKey>,
}

impl SshPrivateKey {
    /// Parses and checks a private key: OpenSSH (or PEM/PKCS#8) text
    /// without a passphrase, the formats a key file may have.
    pub fn from_openssh(text: &str) -> Result<Self, SshError> {
        let detail = |detail: &str| SshError::MemoryKey {
            detail: detail.to_owned(),
        };
        if !text.trim_start().starts_with("-----BEGIN ") {
            return Err(detail("this is not a PEM private key"));
        }
        let key = russh::keys::decode_secret_key(text, None).map_err(|err| match err {
            russh::keys::Error::KeyIsEncrypted => detail("the key is protected by a passphrase"),
            // Decoding errors name what failed, never the bytes.
            other => SshError::MemoryKey {
                detail: other.to_string(),
            },
        })?;
        Ok(Self { key: Arc::new(key) })
    }

    /// The authorized_keys line of the public half.
    pub fn public_key(&self) -> Result<String, SshError> {
        self.key
            .public_key()
            .to_openssh()
            .map_err(|err| SshError::MemoryKey {
                detail: err.to_string(),
            })
    }

    /// Whether `public` (an authorized_keys line) is this key's public half.
    pub fn matches(&self, public: &str) -> bool {
        PublicKey::from_openssh(public.trim())
            .is_ok_and(|public| public.key_data() == self.key.public_key().key_data())
    }

    /// The public half's SHA256 fingerprint, as `ssh-keygen -l` prints it.
    pub fn fingerprint(&self) -> String {
        self.key
            .public_key()
            .fingerprint(ssh_key::HashAlg::Sha256)
            .to_string()
    }
}

impl std::fmt::Debug for SshPrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshPrivateKey")
            .field("public", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

/// A new Ed25519 key pair, both halves in OpenSSH format: the private key
/// (to write 0600, see [`write_key`]) and an authorized_keys line.
pub struct KeyPair {
    pub private: zeroize::Zeroizing<String>,
    pub public: String,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the private half.
        f.debug_struct("KeyPair")
            .field("public", &self.public)
            .finish()
    }
}

pub fn generate_key(comment: &str) -> Result<KeyPair, SshError> {
    let err = |detail: String| SshError::Key {
        path: PathBuf::from("(new key)"),
        detail,
    };
    let mut seed = zeroize::Zeroizing::new([0u8; 32]);
    getrandom::getrandom(seed.as_mut()).map_err(|e| err(e.to_string()))?;
    let mut key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    key.set_comment(comment);
    Ok(KeyPair {
        private: key
            .to_openssh(LineEnding::LF)
            .map_err(|e| err(e.to_string()))?,
        public: key
            .public_key()
            .to_openssh()
            .map_err(|e| err(e.to_string()))?,
    })
}

/// Writes a private key, 0600.
pub fn write_key(path: &Path, pair: &KeyPair) -> Result<(), SshError> {
    crate::fsutil::write_private(path, pair.private.as_bytes()).map_err(|e| SshError::Key {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}

/// The authorized_keys line of the private key at `path` (checked to load).
pub fn public_key_of(path: &Path) -> Result<String, SshError> {
    load_key(path)?
        .public_key()
        .to_openssh()
        .map_err(|e| SshError::Key {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })
}

fn load_key(path: &Path) -> Result<PrivateKey, SshError> {
    russh::keys::load_secret_key(path, None).map_err(|e| SshError::Key {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}

/// Quotes one argument for a POSIX shell.
pub fn shell_quote(arg: &str) -> String {
    format!("'{}'", arg.replace('\'', r"'\''"))
}

/// The command line SSH sends for `argv`, with `env` and `cwd` applied.
pub fn command_line(argv: &[String], env: &[(String, String)], cwd: Option<&str>) -> String {
    let mut line = String::new();
    if let Some(cwd) = cwd {
        line.push_str(&format!("cd {} && ", shell_quote(cwd)));
    }
    line.push_str("exec");
    if !env.is_empty() {
        line.push_str(" env");
        for (key, value) in env {
            line.push(' ');
            line.push_str(&shell_quote(&format!("{key}={value}")));
        }
    }
    for arg in argv {
        line.push(' ');
        line.push_str(&shell_quote(arg));
    }
    line
}

/// Checks the host key and keeps what it saw.
struct Handler {
    expected: Option<PublicKey>,
    seen: Arc<Mutex<Option<PublicKey>>>,
}

impl client::Handler for Handler {
    type Error = russh::Error;

    async fn check_server_key(&mut self, key: &PublicKey) -> Result<bool, Self::Error> {
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Some(key.clone());
        }
        Ok(self
            .expected
            .as_ref()
            .is_none_or(|expected| expected.key_data() == key.key_data()))
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, SshError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| SshError::Io {
            what: "starting the SSH runtime".into(),
            source,
        })
}

/// An authenticated session and the host key the guest showed.
async fn connect(
    target: &SshTarget,
    key: &PrivateKey,
) -> Result<(client::Handle<Handler>, PublicKey), SshError> {
    let addr = target.addr;
    let session = |detail: String| SshError::Session { addr, detail };
    let expected = match &target.host_key {
        Some(text) => Some(
            PublicKey::from_openssh(text)
                .map_err(|e| session(format!("recorded host key: {e}")))?,
        ),
        None => None,
    };
    let seen = Arc::new(Mutex::new(None));
    let handler = Handler {
        expected: expected.clone(),
        seen: seen.clone(),
    };
    let config = Arc::new(client::Config {
        inactivity_timeout: Some(Duration::from_secs(60)),
        ..Default::default()
    });
    let connected = tokio::time::timeout(
        Duration::from_secs(20),
        client::connect(config, addr, handler),
    )
    .await;
    let mut handle = match connected {
        Err(_) => return Err(session("no SSH banner within 20 s".into())),
        Ok(Ok(handle)) => handle,
        Ok(Err(err)) => {
            let got = seen.lock().ok().and_then(|s| s.clone());
            if let (Some(expected), Some(got)) = (&expected, got) {
                if expected.key_data() != got.key_data() {
                    return Err(SshError::HostKeyChanged {
                        addr,
                        expected: expected.fingerprint(ssh_key::HashAlg::Sha256).to_string(),
                        got: got.fingerprint(ssh_key::HashAlg::Sha256).to_string(),
                    });
                }
            }
            return Err(session(describe(&err)));
        }
    };
    let hash = handle
        .best_supported_rsa_hash()
        .await
        .map_err(|e| session(describe(&e)))?
        .flatten();
    let auth = handle
        .authenticate_publickey(
            target.user.clone(),
            PrivateKeyWithHashAlg::new(Arc::new(key.clone()), hash),
        )
        .await
        .map_err(|e| session(describe(&e)))?;
    if !auth.success() {
        return Err(SshError::AuthRefused {
            addr,
            user: target.user.clone(),
        });
    }
    let host_key = seen
        .lock()
        .ok()
        .and_then(|s| s.clone())
        .ok_or_else(|| session("the guest showed no host key".into()))?;
    Ok((handle, host_key))
}

fn describe(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Waits until the guest accepts the key (backing off from 0.25 s to
/// 2 s) and returns its host key (OpenSSH format). On timeout the error
/// says what the last attempt saw: nothing listening, no banner, key
/// refused (cloud-init not done yet), ...
pub fn wait_ready(
    target: &SshTarget,
    timeout: Duration,
    check: &mut dyn FnMut() -> Result<(), String>,
) -> Result<String, SshError> {
    let key = target.key.load()?;
    let runtime = runtime()?;
    let started = Instant::now();
    let mut delay = Duration::from_millis(250);
    let mut last;
    loop {
        check().map_err(SshError::Stopped)?;
        let attempt = runtime.block_on(async {
            let (handle, host_key) = connect(target, &key).await?;
            let _ = handle
                .disconnect(russh::Disconnect::ByApplication, "", "en")
                .await;
            Ok::<_, SshError>(host_key)
        });
        match attempt {
            Ok(host_key) => {
                return host_key.to_openssh().map_err(|e| SshError::Session {
                    addr: target.addr,
                    detail: e.to_string(),
                })
            }
            Err(err @ SshError::HostKeyChanged { .. }) => return Err(err),
            Err(err) => last = err.to_string(),
        }
        if started.elapsed() >= timeout {
            return Err(SshError::NotReady {
                addr: target.addr,
                waited: started.elapsed(),
                last,
            });
        }
        std::thread::sleep(delay.min(timeout.saturating_sub(started.elapsed())));
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// Runs `command` (a shell command line, see [`command_line`]), feeding it
/// `stdin` (then EOF), streaming its output to `sink`. `check` runs every
/// 100 ms; an error from it ends the wait.
pub fn exec(
    target: &SshTarget,
    command: &str,
    stdin: Option<Box<dyn Read + Send>>,
    sink: &mut dyn OutputSink,
    check: &mut dyn FnMut() -> Result<(), String>,
) -> Result<ExitStatus, SshError> {
    let key = target.key.load()?;
    let addr = target.addr;
    let session = |detail: String| SshError::Session { addr, detail };
    // Host stdin is read on a thread (blocking reads) and handed over in
    // chunks; a full queue slows the reader down.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    if let Some(mut input) = stdin {
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match input.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if tx.blocking_send(buf[..n].to_vec()).is_err() {
                            break;
                        }
                    }
                }
            }
        });
    } else {
        drop(tx);
    }
    let runtime = runtime()?;
    runtime.block_on(async {
        // An sshd restarting (cloud-init does that) refuses or resets a
        // new connection for a moment; nothing ran yet, so try again.
        let mut attempt = 0;
        let (handle, _) = loop {
            match connect(target, &key).await {
                Err(SshError::Session { .. }) if attempt < CONNECT_RETRIES => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                other => break other?,
            }
        };
        let mut channel = handle
            .channel_open_session()
            .await
            .map_err(|e| session(describe(&e)))?;
        channel
            .exec(true, command)
            .await
            .map_err(|e| session(describe(&e)))?;
        let mut status = None;
        let mut stdin_open = true;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                message = channel.wait() => match message {
                    Some(ChannelMsg::Data { data }) => sink.on_stdout(&data),
                    Some(ChannelMsg::ExtendedData { data, ext: 1 }) => sink.on_stderr(&data),
                    Some(ChannelMsg::ExitStatus { exit_status }) => {
                        status = Some(ExitStatus::Code(exit_status as i32));
                    }
                    Some(ChannelMsg::ExitSignal { signal_name, .. }) => {
                        status = Some(ExitStatus::Signal(signal_number(&signal_name)));
                    }
                    Some(_) => {}
                    None => break,
                },
                chunk = rx.recv(), if stdin_open => match chunk {
                    Some(chunk) => channel
                        .data(&chunk[..])
                        .await
                        .map_err(|e| session(describe(&e)))?,
                    None => {
                        stdin_open = false;
                        let _ = channel.eof().await;
                    }
                },
                _ = tick.tick() => check().map_err(SshError::Stopped)?,
            }
        }
        let _ = handle
            .disconnect(russh::Disconnect::ByApplication, "", "en")
            .await;
        status.ok_or(SshError::NoExitStatus { addr })
    })
}

/// How often [`exec`] tries a connection again before giving up.
const CONNECT_RETRIES: u32 = 3;

fn signal_number(signal: &russh::Sig) -> i32 {
    use russh::Sig;
    match signal {
        Sig::ABRT => 6,
        Sig::ALRM => 14,
        Sig::FPE => 8,
        Sig::HUP => 1,
        Sig::ILL => 4,
        Sig::INT => 2,
        Sig::KILL => 9,
        Sig::PIPE => 13,
        Sig::QUIT => 3,
        Sig::SEGV => 11,
        Sig::TERM => 15,
        Sig::USR1 => 10,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_are_quoted_for_the_guest_shell() {
        let argv = vec![
            "sh".to_owned(),
            "-c".into(),
            "echo 'a b' $HOME; rm -rf /".into(),
        ];
        let line = command_line(&argv, &[("K".into(), "v w".into())], Some("/tmp/it's"));
        assert_eq!(
            line,
            r#"cd '/tmp/it'\''s' && exec env 'K=v w' 'sh' '-c' 'echo '\''a b'\'' $HOME; rm -rf /'"#
        );
        assert_eq!(shell_quote(""), "''");
    }

    /// A throwaway Ed25519 key protected by the passphrase "secret pass".
    const ENCRYPTED_KEY: &str = "-----BEGIN OPENSSH PRIVATE KEY-----
b3BlbnNzaC1rZXktdjEAAAAACmFlczI1Ni1jdHIAAAAGYmNyeXB0AAAAGAAAABD4NH8ABJ
IRsi/+W7WdedLuAAAAEAAAAAEAAAAzAAAAC3NzaC1lZDI1NTE5AAAAIDBYSGBz0yd43IO/
am+ugVKIHqoRwN0R9w2HITeQdc+uAAAAkMxx3go5D8PinKUL+t51yqdcGOAkcerxOLGixZ
CYFNqnn/hPStDqBELJiJMaQz1fBCoVJvxDShb6TgL+bTXsYKAj4gY4WsF7wgIKY1MwpCUi
Wij+3Jixh7CtfxHJFzXsz7coP5BcOBkXNsmKk4eW5Uwyuy+kaWdjjptAfljkVSK6rPy9PC
j4mi3iL0Q8ibbsQA==
-----END OPENSSH PRIVATE KEY-----
";

    /// The base64 lines of a PEM: what must never be printed.
    fn body_lines(pem: &str) -> Vec<&str> {
        pem.lines().filter(|l| !l.starts_with("-----")).collect()
    }

    #[test]
    fn a_key_in_memory_loads_and_never_prints() {
        let pair = generate_key("mem@vm").unwrap();
        let key = SshPrivateKey::from_openssh(&pair.private).unwrap();
        assert_eq!(key.public_key().unwrap(), pair.public);
        assert!(key.matches(&pair.public));
        assert!(!key.matches(&generate_key("other").unwrap().public));
        let target = SshTarget {
            addr: "127.0.0.1:22".parse().unwrap(),
            user: "u".into(),
            key: SshKey::Memory(key.clone()),
            host_key: None,
        };
        let loaded = target.key.load().unwrap();
        assert_eq!(loaded.public_key().to_openssh().unwrap(), pair.public);
        let printed = format!("{target:?} {key:?} {key:#?}");
        assert!(printed.contains(&key.fingerprint()), "{printed}");
        for line in body_lines(&pair.private) {
            assert!(!printed.contains(line), "key material in {printed}");
        }
    }

    #[test]
    fn a_wrong_key_in_memory_is_refused_without_quoting_it() {
        let pair = generate_key("x").unwrap();
        let cut = &pair.private[..pair.private.len() / 2];
        for (text, expect) in [
            (
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA pub",
                "not a PEM private key",
            ),
            ("", "not a PEM private key"),
            (ENCRYPTED_KEY, "protected by a passphrase"),
            (cut, "OpenSSH private key without a passphrase"),
        ] {
            let err = SshPrivateKey::from_openssh(text).unwrap_err().to_string();
            assert!(err.contains(expect), "{err}");
            assert!(err.contains("without a passphrase"), "{err}");
            for line in body_lines(text).into_iter().chain(body_lines(cut)) {
                assert!(line.is_empty() || !err.contains(line), "{err}");
            }
        }
    }

    #[test]
    fn a_generated_key_loads_and_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id");
        let pair = generate_key("hangar@vm").unwrap();
        write_key(&path, &pair).unwrap();
        let public = pair.public;
        assert!(
            public.starts_with("ssh-ed25519 AAAA") && public.ends_with("hangar@vm"),
            "{public}"
        );
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let key = load_key(&path).unwrap();
        assert_eq!(key.public_key().to_openssh().unwrap(), public);
    }
}
