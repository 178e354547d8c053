//! A backend that runs nothing: VMs move through their states without a
//! process. For tests of the store and lifecycle, and dry runs.
//!
//! `HANGAR_NOOP_DELAY_MS` makes launch and stop take that long, so crash
//! tests can kill `hangar` in the middle of an operation (real backends are
//! slow enough by themselves).

use super::{
    Backend, BackendError, LaunchPlan, Launched, Pausable, StopOutcome, StopRequest, VmmStatus,
};
use crate::record::{BackendKind, VmRecord, VmState};
use crate::spec::VmSpec;

#[derive(Debug, Default)]
pub struct NoopBackend {
    delay: std::time::Duration,
}

impl NoopBackend {
    /// Reads the optional delay from `HANGAR_NOOP_DELAY_MS`.
    pub fn from_env() -> Self {
        let millis = std::env::var("HANGAR_NOOP_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        Self {
            delay: std::time::Duration::from_millis(millis),
        }
    }
}

impl Backend for NoopBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Noop
    }

    fn check(&self, _spec: &VmSpec) -> Result<(), BackendError> {
        Ok(())
    }

    fn launch(&self, _vm: &VmRecord, _plan: &LaunchPlan) -> Result<Launched, BackendError> {
        std::thread::sleep(self.delay);
        // Nothing listens, so no host ports are taken.
        Ok(Launched {
            pid: None,
            pid_start_time: None,
            sockets: Default::default(),
            ports: Vec::new(),
        })
    }

    fn status(&self, vm: &VmRecord) -> VmmStatus {
        match vm.state {
            VmState::Paused => VmmStatus::Paused,
            state if state.has_process() => VmmStatus::Running,
            _ => VmmStatus::Gone,
        }
    }

    fn stop(&self, _vm: &VmRecord, _request: StopRequest) -> Result<StopOutcome, BackendError> {
        std::thread::sleep(self.delay);
        Ok(StopOutcome::GuestPowerOff)
    }

    fn kill(&self, _vm: &VmRecord, _signal: nix::sys::signal::Signal) -> Result<(), BackendError> {
        Ok(())
    }

    fn as_pausable(&self) -> Option<&dyn Pausable> {
        Some(self)
    }
}

/// Pausing a VM without a process only changes its recorded state.
impl Pausable for NoopBackend {
    fn pause(&self, _vm: &VmRecord) -> Result<(), BackendError> {
        Ok(())
    }

    fn resume(&self, _vm: &VmRecord) -> Result<(), BackendError> {
        Ok(())
    }
}
