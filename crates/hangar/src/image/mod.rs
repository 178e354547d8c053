//! Images: what a VM boots from. Today the embedded default image (Debian
//! cloud kernel + Hangar's own initramfs); OCI and cloud disk images come
//! through the same module later.

pub mod agent;
pub mod blobs;
pub mod catalog;
pub mod cpio;
pub mod default_image;
pub mod import;
pub mod kernel;
pub mod layer;
pub mod modules;
pub mod oci;
pub mod pull;
pub mod rootfs;

pub use default_image::{ensure_default_image, DefaultImage, DefaultImageError};
