//! `run` and `exec`.

use hangar::guest::ExecIo;
use hangar::ExecRequest;

use super::{exit_code, open, parse_env, spec_from};

use crate::cli::{CommandArgs, ExecArgs, Global, RunArgs};
use crate::output::{print_json, Spinner, StdioSink};
use crate::terminal::{self, RawMode};

pub fn run(global: &Global, args: RunArgs) -> anyhow::Result<u8> {
    let id = hangar::manager::new_id()?;
    let name = args.name.clone().unwrap_or_else(|| format!("run-{id}"));
    let spec = spec_from(name, &args.resources)?;
    let (request, io) = exec_request(args.command)?;
    let mut manager = open(global)?;
    // A missing image is the user's first problem, before any probe talk.
    match &spec.image {
        hangar::spec::ImageSource::Oci { reference } => {
            manager.image(reference)?;
        }
        hangar::spec::ImageSource::Bundle { id } => {
            manager.bundle(id)?;
        }
        _ => {}
    }
    super::note_accelerator(&mut manager, global)?;
    let raw = raw_mode_for(&request, &io)?;
    let spinner = Spinner::start("booting VM", global.json);
    let mut sink = BootThenStream {
        spinner: Some(spinner),
        inner: StdioSink,
    };
    let outcome = manager.run(spec, request, io, &mut sink, args.keep);
    drop(raw);
    if let Some(spinner) = sink.spinner.take() {
        spinner.finish();
    }
    let outcome = outcome?;
    if let Some(vm) = &outcome.kept {
        if global.json {
            print_json(vm)?;
        } else {
            eprintln!("hangar: VM {} kept running (id {})", vm.name, vm.id);
        }
    }
    Ok(exit_code(outcome.status))
}

pub fn exec(global: &Global, args: ExecArgs) -> anyhow::Result<u8> {
    let (request, io) = exec_request(args.command)?;
    let mut manager = open(global)?;
    let raw = raw_mode_for(&request, &io)?;
    let status = manager.exec(
        args.vm.namespace.as_deref(),
        &args.vm.vm,
        request,
        io,
        &mut StdioSink,
    );
    drop(raw);
    Ok(exit_code(status?))
}

/// `hangar ssh VM [-- CMD]`: CMD over Hangar's SSH client; no CMD runs
/// the system's ssh client for an interactive shell (no shell involved:
/// the argv goes to execvp as it is).
pub fn ssh(global: &Global, args: crate::cli::SshArgs) -> anyhow::Result<u8> {
    let mut manager = open(global)?;
    if args.argv.is_empty() {
        use std::os::unix::process::CommandExt;
        let argv = manager.ssh_client_argv(args.vm.namespace.as_deref(), &args.vm.vm)?;
        let err = std::process::Command::new(&argv[0]).args(&argv[1..]).exec();
        anyhow::bail!(
            "running {}: {err} (install openssh-client, or give a command after --)",
            argv[0].to_string_lossy()
        );
    }
    let request = ExecRequest {
        argv: args.argv,
        env: Vec::new(),
        cwd: None,
        stdin: args.interactive,
        user: None,
        tty: None,
    };
    let io = ExecIo {
        stdin: args
            .interactive
            .then(|| Box::new(std::io::stdin()) as Box<dyn std::io::Read + Send>),
        timeout: None,
        tty_size: None,
    };
    let status = manager.exec(
        args.vm.namespace.as_deref(),
        &args.vm.vm,
        request,
        io,
        &mut StdioSink,
    );
    Ok(exit_code(status?))
}

/// `-it` on a terminal: keys go to the guest's terminal as typed (Ctrl-C
/// included, which the guest's terminal turns into SIGINT).
fn raw_mode_for(request: &ExecRequest, io: &ExecIo) -> anyhow::Result<Option<RawMode>> {
    if request.tty.is_some() && io.stdin.is_some() {
        RawMode::enter_if_terminal()
    } else {
        Ok(None)
    }
}

fn exec_request(command: CommandArgs) -> anyhow::Result<(ExecRequest, ExecIo)> {
    let request = ExecRequest {
        env: parse_env(&command.env)?,
        argv: command.argv,
        cwd: command.workdir,
        stdin: command.interactive,
        user: command.user,
        tty: command.tty.then(|| terminal::size().unwrap_or_default()),
    };
    let io = ExecIo {
        stdin: command
            .interactive
            .then(|| Box::new(std::io::stdin()) as Box<dyn std::io::Read + Send>),
        timeout: command.timeout.map(std::time::Duration::from_secs),
        tty_size: command
            .tty
            .then(|| Box::new(terminal::size) as hangar::guest::TtySizeSource),
    };
    Ok((request, io))
}

/// Clears the boot spinner when the first output arrives.
struct BootThenStream {
    spinner: Option<Spinner>,
    inner: StdioSink,
}

impl BootThenStream {
    fn clear(&mut self) {
        if let Some(spinner) = self.spinner.take() {
            spinner.finish();
        }
    }
}

impl hangar::guest::OutputSink for BootThenStream {
    fn on_stdout(&mut self, chunk: &[u8]) {
        self.clear();
        self.inner.on_stdout(chunk);
    }
    fn on_stderr(&mut self, chunk: &[u8]) {
        self.clear();
        self.inner.on_stderr(chunk);
    }
}
