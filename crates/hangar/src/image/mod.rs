//! Images: what a VM boots from: the embedded default image (Debian cloud
//! kernel + Hangar's own initramfs), OCI images, and base-image bundles
//! (a kernel and a root file system from a manifest).

pub mod agent;
pub mod blobs;
pub mod bundle;
pub mod bundle_store;
pub mod catalog;
pub mod cpio;
pub mod default_image;
pub mod disk;
pub mod fetch;
pub mod import;
pub mod kernel;
pub mod layer;
pub mod modules;
pub mod oci;
pub mod pull;
pub mod rootfs;

pub use default_image::{ensure_default_image, DefaultImage, DefaultImageError};
