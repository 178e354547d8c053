//! Hangar: a virtual-machine manager. Boots, runs commands in and destroys
//! real VMs; see `ARCHITECTURE.md` for the map of modules.
//!
//! Start at [`Manager`]: `Manager::open`, then `create`/`start`/`exec`/
//! `stop`/`remove`, or `run` for the whole `docker run` cycle.

pub mod backend;
pub mod bench;
pub mod bench_image;
pub mod cloudinit;
pub mod console;
pub mod fsutil;
pub mod guest;
pub mod image;
pub mod interrupt;
pub mod layout;
pub mod manager;
pub mod net;
pub mod record;
pub mod size;
pub mod snapshot;
pub mod spec;
pub mod spec_file;
pub mod store;
pub mod trace;
pub mod up_file;

pub use hangar_proto::{
    CopySummary, ExecRequest, ExitStatus, GuestFacts, TtySize, PROTOCOL_VERSION,
};
pub use manager::{Manager, ManagerError, ManagerOptions, RunOutcome};
pub use record::{Accel, BackendKind, VmRecord, VmState};
pub use size::ByteSize;
pub use spec::VmSpec;
