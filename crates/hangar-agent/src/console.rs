//! A shell on the serial console, for `hangar console`: like a getty with
//! automatic root login, respawned whenever it exits. The console socket
//! is private to the VM's owner on the host (mode 0600 in a 0700 dir).

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use crate::reaper::Reaper;

const CONSOLE: &str = "/dev/ttyS0";
const SHELL: &str = "/bin/sh";
/// Pause between respawns, so a shell that dies at once cannot spin.
const RESPAWN_DELAY: Duration = Duration::from_secs(1);

/// Starts the respawning console shell if the image has a shell.
pub fn spawn_shell(reaper: Reaper) {
    if !std::path::Path::new(SHELL).exists() {
        return;
    }
    std::thread::spawn(move || loop {
        if let Err(err) = run_once(&reaper) {
            crate::log(&format!("console shell: {err}"));
        }
        std::thread::sleep(RESPAWN_DELAY);
    });
}

fn run_once(reaper: &Reaper) -> std::io::Result<()> {
    let tty = OpenOptions::new().read(true).write(true).open(CONSOLE)?;
    let mut command = Command::new(SHELL);
    command
        .arg("-l")
        .env("TERM", "linux")
        .env("HOME", "/root")
        .env("PATH", crate::init::DEFAULT_PATH)
        .current_dir(if std::path::Path::new("/root").is_dir() {
            "/root"
        } else {
            "/"
        })
        .stdin(tty.try_clone()?)
        .stdout(tty.try_clone()?)
        .stderr(tty);
    // SAFETY: between fork and exec only async-signal-safe calls are made:
    // setsid and ioctl(TIOCSCTTY) on stdin, so the shell owns the terminal
    // and gets job control and Ctrl-C.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::ioctl(0, libc::TIOCSCTTY, 1) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut guard = reaper.lock();
    let child = command.spawn()?;
    let exit = reaper.register(&mut guard, child.id());
    drop(guard);
    let _ = exit.recv();
    Ok(())
}
