//! The fixture for `hangar bench image` (and the registry tests): an OCI
//! layout of a given size, a
//! throwaway docker-registry on 127.0.0.1 holding it (pushed with skopeo),
//! and the baseline — `skopeo copy` + `tar -x` + `mkfs.ext4 -d` of the same
//! image — timed with the same tools a user would use by hand.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::manager::ManagerError;

/// How long the registry may take to answer.
const REGISTRY_START: Duration = Duration::from_secs(20);

fn fail(what: &str, detail: impl std::fmt::Display) -> ManagerError {
    ManagerError::Config(format!("bench image: {what}: {detail}"))
}

/// Runs a tool, failing with its stderr.
fn run(program: &str, args: &[&std::ffi::OsStr]) -> Result<(), ManagerError> {
    let out = Command::new(program).args(args).output().map_err(|e| {
        fail(
            program,
            format!("{e} (install it: see scripts/install-deps.sh)"),
        )
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(fail(program, String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Writes an OCI layout at `dir`: one gzip layer holding `megabytes` of
/// incompressible bytes in 8 files (a worst case for unpacking speed is
/// not the point; moving bytes is).
pub fn write_layout(dir: &Path, megabytes: u64) -> Result<(), ManagerError> {
    let io = |e: std::io::Error| fail("writing the layout", e);
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    let per_file = megabytes * 1024 * 1024 / 8;
    for index in 0..8 {
        let data =
            crate::bench::incompressible_bytes(per_file as usize, 0x9e37_79b9_7f4a_7c15 + index);
        let mut header = tar::Header::new_gnu();
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(1_700_000_000);
        header.set_size(per_file);
        builder
            .append_data(&mut header, format!("data/blob-{index}"), data.as_slice())
            .map_err(io)?;
    }
    let layer = builder.into_inner().map_err(io)?.finish().map_err(io)?;
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).map_err(io)?;
    let put = |bytes: &[u8]| -> Result<(String, usize), ManagerError> {
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(bytes)));
        std::fs::write(blobs.join(&digest[7..]), bytes).map_err(io)?;
        Ok((digest, bytes.len()))
    };
    let (layer_digest, layer_size) = put(&layer)?;
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    });
    let (config_digest, config_size) = put(&serde_json::to_vec(&config).unwrap_or_default())?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": crate::image::oci::MEDIA_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": layer_size}],
    });
    let (manifest_digest, manifest_size) = put(&serde_json::to_vec(&manifest).unwrap_or_default())?;
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": crate::image::oci::MEDIA_MANIFEST, "digest": manifest_digest, "size": manifest_size,
        "platform": {"architecture": "amd64", "os": "linux"},
    }]});
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&index).unwrap_or_default(),
    )
    .map_err(io)?;
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(io)?;
    Ok(())
}

/// A docker-registry on 127.0.0.1, stopped when dropped.
#[derive(Debug)]
pub struct LocalRegistry {
    child: Child,
    pub port: u16,
    /// Where the registry keeps its blobs (tests tamper with them).
    pub storage: PathBuf,
}

impl Drop for LocalRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl LocalRegistry {
    pub fn start(dir: &Path) -> Result<Self, ManagerError> {
        let io = |e: std::io::Error| fail("starting docker-registry", e);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(io)?
            .port();
        let config = dir.join("registry.yml");
        let mut file = std::fs::File::create(&config).map_err(io)?;
        write!(
            file,
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.join("registry-data").display()
        )
        .map_err(io)?;
        let storage = dir.join("registry-data");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                fail(
                    "docker-registry",
                    format!("{e} (apt-get install docker-registry)"),
                )
            })?;
        let registry = Self {
            child,
            port,
            storage,
        };
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if started.elapsed() > REGISTRY_START {
                return Err(fail("docker-registry", "did not listen within 20 s"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(registry)
    }

    /// Pushes an OCI layout as `name` (`127.0.0.1:<port>/<name>`).
    pub fn push(&self, layout: &Path, name: &str) -> Result<String, ManagerError> {
        let target = format!("127.0.0.1:{}/{name}", self.port);
        run(
            "skopeo",
            &[
                "copy".as_ref(),
                "-q".as_ref(),
                "--dest-tls-verify=false".as_ref(),
                format!("oci:{}", layout.display()).as_ref(),
                format!("docker://{target}").as_ref(),
            ],
        )?;
        Ok(target)
    }
}

/// The baseline: `skopeo copy` into an OCI layout, `tar -x` of its layer,
/// `mkfs.ext4 -d` of the tree; returns the time of the three together.
pub fn by_hand(reference: &str, work: &Path, megabytes: u64) -> Result<Duration, ManagerError> {
    let io = |e: std::io::Error| fail("baseline", e);
    let layout = work.join("by-hand-layout");
    let tree = work.join("by-hand-tree");
    std::fs::create_dir_all(&tree).map_err(io)?;
    let started = Instant::now();
    run(
        "skopeo",
        &[
            "copy".as_ref(),
            "-q".as_ref(),
            "--src-tls-verify=false".as_ref(),
            format!("docker://{reference}").as_ref(),
            format!("oci:{}", layout.display()).as_ref(),
        ],
    )?;
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).map_err(io)?)
            .map_err(|e| fail("baseline index", e))?;
    let manifest_digest = index["manifests"][0]["digest"].as_str().unwrap_or_default();
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(layout.join("blobs/sha256").join(&manifest_digest[7..])).map_err(io)?,
    )
    .map_err(|e| fail("baseline manifest", e))?;
    for layer in manifest["layers"].as_array().into_iter().flatten() {
        let digest = layer["digest"].as_str().unwrap_or_default();
        let blob: PathBuf = layout.join("blobs/sha256").join(&digest[7..]);
        run(
            "tar",
            &[
                "-xzf".as_ref(),
                blob.as_os_str(),
                "-C".as_ref(),
                tree.as_os_str(),
            ],
        )?;
    }
    let size_kib = (megabytes * 1024) * 14 / 10 + 256 * 1024;
    let image = work.join("by-hand.ext4");
    run(
        "mkfs.ext4",
        &[
            "-q".as_ref(),
            "-F".as_ref(),
            "-d".as_ref(),
            tree.as_os_str(),
            image.as_os_str(),
            format!("{size_kib}k").as_ref(),
        ],
    )?;
    Ok(started.elapsed())
}
