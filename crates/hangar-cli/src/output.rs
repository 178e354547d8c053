//! Printing: error chains, tables, streamed guest output, progress.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use hangar::guest::OutputSink;
use hangar::record::VmSummary;

/// `outer: cause: root cause`, each message once.
pub fn error_chain(err: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ")
}

/// Writes guest output straight to our stdout/stderr, flushing every chunk
/// so output appears as the guest produces it.
#[derive(Debug, Default)]
pub struct StdioSink;

impl OutputSink for StdioSink {
    fn on_stdout(&mut self, chunk: &[u8]) {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(chunk).and_then(|()| out.flush());
    }
    fn on_stderr(&mut self, chunk: &[u8]) {
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(chunk).and_then(|()| err.flush());
    }
}

/// A spinner on stderr while a long step runs; nothing when stderr is not a
/// terminal or `--json` was given.
pub struct Spinner(Option<indicatif::ProgressBar>);

impl Spinner {
    pub fn start(message: &str, json: bool) -> Self {
        if json || !std::io::stderr().is_terminal() {
            return Self(None);
        }
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_message(message.to_owned());
        bar.enable_steady_tick(Duration::from_millis(100));
        Self(Some(bar))
    }

    pub fn finish(self) {
        if let Some(bar) = self.0 {
            bar.finish_and_clear();
        }
    }
}

/// Pretty JSON on stdout, written through one buffer (stdout is
/// line-buffered: a flush per line costs more than the formatting).
pub fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    out.flush()?;
    Ok(())
}

/// The `ps` table, written through one buffer.
pub fn print_table(records: &[VmSummary]) -> anyhow::Result<()> {
    let rows: Vec<[String; 7]> = records
        .iter()
        .map(|r| {
            [
                r.id.clone(),
                r.name.clone(),
                r.namespace.clone(),
                r.state.to_string(),
                r.backend.to_string(),
                format!("{}/{}", r.cpus, r.memory),
                r.exit_reason.clone().unwrap_or_default(),
            ]
        })
        .collect();
    let header = [
        "ID",
        "NAME",
        "NAMESPACE",
        "STATE",
        "BACKEND",
        "CPU/MEM",
        "REASON",
    ];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut line = |cells: &[String]| -> std::io::Result<()> {
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        writeln!(out, "{}", text.trim_end())
    };
    line(&header.map(str::to_owned))?;
    for row in &rows {
        line(row)?;
    }
    out.flush()?;
    Ok(())
}
