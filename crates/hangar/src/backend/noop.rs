//! A backend that runs nothing: VMs move through their states without a
//! process. For tests of the store and lifecycle, and dry runs.

use super::{
    Backend, BackendError, LaunchPlan, Launched, Pausable, StopOutcome, StopRequest, VmmStatus,
};
use crate::record::{BackendKind, VmRecord, VmState};
use crate::spec::VmSpec;

#[derive(Debug, Default)]
pub struct NoopBackend;

impl Backend for NoopBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Noop
    }

    fn check(&self, _spec: &VmSpec) -> Result<(), BackendError> {
        Ok(())
    }

    fn launch(&self, _vm: &VmRecord, _plan: &LaunchPlan) -> Result<Launched, BackendError> {
        Ok(Launched {
            pid: None,
            pid_start_time: None,
            sockets: Default::default(),
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
