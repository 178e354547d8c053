//! Cloud disk images for VMs: add, list, remove (refused while a VM uses
//! one), and what a VM of a disk image needs at create: a port forward to
//! its SSH server, a per-VM key pair, a cloud-init seed that authorizes it.

use super::{Manager, ManagerError};
use crate::image::disk::{DiskCatalog, DiskRecord};
use crate::image::pull::PullEvent;
use crate::spec::{CloudInitSpec, ImageSource, NetworkSpec, PortForward, SshSpec, VmSpec};

/// The guest port Hangar reaches SSH on.
pub const SSH_PORT: u16 = 22;

impl Manager {
    pub fn disk_catalog(&self) -> DiskCatalog {
        DiskCatalog::new(self.layout.root())
    }

    /// Adds a cloud disk image (qcow2 or raw) from a file or an http(s)
    /// URL; `sha256` is checked when given and always recorded.
    pub fn add_disk_image(
        &self,
        source: &str,
        name: Option<&str>,
        sha256: Option<&str>,
        progress: &mut dyn FnMut(PullEvent),
    ) -> Result<DiskRecord, ManagerError> {
        // Shared with other image work, so `image gc` leaves this add's
        // scratch files alone.
        let _in_use = self.image_work_lock(false)?;
        Ok(self.disk_catalog().add(source, name, sha256, progress)?)
    }

    pub fn disk_images(&self) -> Result<Vec<DiskRecord>, ManagerError> {
        Ok(self.disk_catalog().list()?)
    }

    pub fn disk_image(&self, name: &str) -> Result<DiskRecord, ManagerError> {
        Ok(self.disk_catalog().require(name)?)
    }

    /// Removes a disk image, refused while a VM boots from it (its overlay
    /// needs the image as its backing file).
    pub(super) fn remove_disk_image(&self, name: &str) -> Result<DiskRecord, ManagerError> {
        let users: Vec<String> = self
            .image_users()?
            .into_iter()
            .filter(|(_, image)| matches!(image, ImageSource::Disk { name: used } if used == name))
            .map(|(user, _)| user)
            .collect();
        if !users.is_empty() {
            return Err(ManagerError::ImageInUse {
                reference: format!("disk:{name}"),
                vms: users.join(", "),
            });
        }
        Ok(self.disk_catalog().remove(name)?)
    }
}

/// Fills in what a disk-image VM needs to be reached without an agent:
/// user-mode networking with a free 127.0.0.1 port forwarded to its SSH
/// server, a cloud-init seed (its user gets Hangar's key), and the SSH
/// user. Other images are left alone.
pub(super) fn disk_defaults(spec: &mut VmSpec) {
    if !matches!(spec.image, ImageSource::Disk { .. }) {
        return;
    }
    let ssh_forward = PortForward {
        host: 0,
        guest: SSH_PORT,
    };
    match &mut spec.network {
        NetworkSpec::None => {
            spec.network = NetworkSpec::User {
                forwards: vec![ssh_forward],
            }
        }
        NetworkSpec::User { forwards } => {
            if !forwards.iter().any(|f| f.guest == SSH_PORT) {
                forwards.insert(0, ssh_forward);
            }
        }
        NetworkSpec::Tap { .. } => {}
    }
    let cloud_init = spec.cloud_init.get_or_insert_with(CloudInitSpec::default);
    // An SSH user named alone is also the user the seed creates.
    if let Some(ssh) = spec.ssh.as_ref().filter(|s| !s.user.is_empty()) {
        if cloud_init.user.is_none() && cloud_init.user_data.is_none() {
            cloud_init.user = Some(ssh.user.clone());
        }
    }
    if spec.ssh.as_ref().is_none_or(|s| s.user.is_empty()) {
        // The key settings stay; only the user is filled in.
        let key = spec.ssh.take().unwrap_or_default();
        let user = match &cloud_init.user_data {
            // The user's own user-data: keys go to the image's default
            // user, whose name Hangar cannot know; the caller names it.
            Some(_) => cloud_init.user.clone().unwrap_or_else(|| "root".into()),
            None => cloud_init
                .user
                .clone()
                .unwrap_or_else(|| crate::cloudinit::nocloud::DEFAULT_USER.into()),
        };
        spec.ssh = Some(SshSpec { user, ..key });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk_spec() -> VmSpec {
        let mut spec = VmSpec::new("web");
        spec.image = ImageSource::Disk {
            name: "debian".into(),
        };
        spec
    }

    #[test]
    fn a_disk_vm_gets_an_ssh_forward_a_seed_and_a_user() {
        let mut spec = disk_spec();
        disk_defaults(&mut spec);
        assert_eq!(
            spec.network,
            NetworkSpec::User {
                forwards: vec![PortForward { host: 0, guest: 22 }]
            }
        );
        assert_eq!(spec.ssh.unwrap().user, "hangar");
        assert_eq!(spec.cloud_init, Some(CloudInitSpec::default()));
    }

    #[test]
    fn a_named_ssh_user_is_the_seeded_user_and_keeps_its_key() {
        let mut spec = disk_spec();
        spec.network = NetworkSpec::User {
            forwards: vec![PortForward {
                host: 8080,
                guest: 80,
            }],
        };
        spec.ssh = Some(SshSpec {
            user: "alice".into(),
            private_key_path: Some("/keys/id".into()),
            ..SshSpec::default()
        });
        disk_defaults(&mut spec);
        let NetworkSpec::User { forwards } = &spec.network else {
            panic!("{:?}", spec.network)
        };
        assert_eq!(forwards.len(), 2);
        assert_eq!(spec.cloud_init.unwrap().user.as_deref(), Some("alice"));
        let ssh = spec.ssh.unwrap();
        assert_eq!(
            (ssh.user.as_str(), ssh.private_key_path),
            ("alice", Some("/keys/id".into()))
        );
        // A key alone: the user comes from the seed's default.
        let mut spec = disk_spec();
        spec.ssh = Some(SshSpec {
            user: String::new(),
            private_key_path: Some("/keys/id".into()),
            ..SshSpec::default()
        });
        disk_defaults(&mut spec);
        let ssh = spec.ssh.unwrap();
        assert_eq!(
            (ssh.user.as_str(), ssh.private_key_path),
            ("hangar", Some("/keys/id".into()))
        );
    }
}
