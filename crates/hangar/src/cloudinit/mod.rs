//! cloud-init: NoCloud seeds written natively (an ISO 9660 volume
//! `cidata`), attached to a VM's first boot.

pub mod iso9660;
pub mod nocloud;

pub use nocloud::{seed_image, SeedError, SeedInput};
