//! The user's terminal: raw mode while attached, and its size.

use std::io::IsTerminal;

use hangar::TtySize;
use nix::sys::termios::{self, SetArg, Termios};

/// The terminal in raw mode while alive; the saved mode comes back on drop,
/// whatever path leaves the command.
pub struct RawMode {
    saved: Termios,
}

impl RawMode {
    /// Raw mode on stdin, or None when stdin is not a terminal.
    pub fn enter_if_terminal() -> anyhow::Result<Option<Self>> {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return Ok(None);
        }
        let saved = termios::tcgetattr(&stdin)?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(&stdin, SetArg::TCSANOW, &raw)?;
        Ok(Some(Self { saved }))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin(), SetArg::TCSANOW, &self.saved);
    }
}

/// The size of the terminal on stdout (else stdin), if there is one.
pub fn size() -> Option<TtySize> {
    let (width, height) = terminal_size::terminal_size_of(std::io::stdout())
        .or_else(|| terminal_size::terminal_size_of(std::io::stdin()))?;
    Some(TtySize {
        rows: height.0,
        cols: width.0,
    })
}
