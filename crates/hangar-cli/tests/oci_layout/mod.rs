//! Builds OCI image layouts for tests: a busybox-based image of two
//! layers (gzip and plain), a config with Env/Entrypoint/Cmd/WorkingDir/
//! User, and raw layers for hostile cases.

// Each test binary uses a different part of this module.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// One entry of a test layer.
pub enum Item<'a> {
    Dir(&'a str, u32),
    File(&'a str, u32, &'a [u8]),
    Link(&'a str, &'a str),
    /// A raw name the tar crate would refuse (`../x`, `/x`).
    RawFile(&'a [u8], &'a [u8]),
}

/// A tar stream of `items`.
pub fn layer(items: &[Item<'_>]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for item in items {
        let mut header = tar::Header::new_gnu();
        header.set_mtime(1_700_000_000);
        header.set_uid(0);
        header.set_gid(0);
        match item {
            Item::Dir(path, mode) => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(*mode);
                header.set_size(0);
                builder
                    .append_data(&mut header, path, std::io::empty())
                    .unwrap();
            }
            Item::File(path, mode, data) => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(*mode);
                header.set_size(data.len() as u64);
                builder.append_data(&mut header, path, *data).unwrap();
            }
            Item::Link(path, target) => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_mode(0o777);
                header.set_size(0);
                builder.append_link(&mut header, path, target).unwrap();
            }
            Item::RawFile(name, data) => {
                let mut raw = tar::Header::new_old();
                raw.as_old_mut().name[..name.len()].copy_from_slice(name);
                raw.set_entry_type(tar::EntryType::Regular);
                raw.set_mode(0o644);
                raw.set_size(data.len() as u64);
                raw.set_mtime(1_700_000_000);
                raw.set_uid(0);
                raw.set_gid(0);
                raw.set_cksum();
                builder.append(&raw, *data).unwrap();
            }
        }
    }
    builder.into_inner().unwrap()
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Writes an OCI layout at `dir` with `layers` (already encoded; gzip ones
/// flagged) and `config`; returns the layout's path.
pub fn write_layout(
    dir: &Path,
    layers: &[(Vec<u8>, bool)],
    config: serde_json::Value,
    ref_name: Option<&str>,
) -> PathBuf {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| {
        let digest = digest(bytes);
        std::fs::write(blobs.join(&digest[7..]), bytes).unwrap();
        (digest, bytes.len())
    };
    let mut layer_descriptors = Vec::new();
    let mut diff_ids = Vec::new();
    for (bytes, gzipped) in layers {
        let (digest, size) = put(bytes);
        let media = if *gzipped {
            "application/vnd.oci.image.layer.v1.tar+gzip"
        } else {
            "application/vnd.oci.image.layer.v1.tar"
        };
        layer_descriptors
            .push(serde_json::json!({"mediaType": media, "digest": digest, "size": size}));
        diff_ids.push(digest);
    }
    let mut config = config;
    config["rootfs"] = serde_json::json!({"type": "layers", "diff_ids": diff_ids});
    let config_bytes = serde_json::to_vec(&config).unwrap();
    let (config_digest, config_size) = put(&config_bytes);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
        "layers": layer_descriptors,
    });
    let manifest_bytes = serde_json::to_vec(&manifest).unwrap();
    let (manifest_digest, manifest_size) = put(&manifest_bytes);
    let mut descriptor = serde_json::json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": manifest_digest,
        "size": manifest_size,
        "platform": {"architecture": "amd64", "os": "linux"},
    });
    if let Some(name) = ref_name {
        descriptor["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": name});
    }
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [descriptor]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    dir.to_path_buf()
}

/// The test application image: static busybox with applet links, an
/// `app` user, and a second layer that adds a file and whites one out.
/// The base layer carries the layout's own path, so no two layouts share
/// a blob (the store would otherwise already hold it and not read it).
pub fn app_image(dir: &Path, ref_name: Option<&str>) -> PathBuf {
    let (base, top, config) = app_parts(dir);
    write_layout(dir, &[(gzip(&base), true), (top, false)], config, ref_name)
}

/// The app image as `docker save` writes it: a tar with manifest.json,
/// the config and one uncompressed tar per layer, named `repo_tag`.
pub fn app_docker_save(dir: &Path, repo_tag: &str) -> PathBuf {
    let (base, top, config) = app_parts(dir);
    let config = serde_json::to_vec(&config).unwrap();
    let manifest = serde_json::json!([{
        "Config": "config.json",
        "RepoTags": [repo_tag],
        "Layers": ["base/layer.tar", "top/layer.tar"],
    }]);
    let manifest = serde_json::to_vec(&manifest).unwrap();
    let mut builder = tar::Builder::new(Vec::new());
    for (name, data) in [
        ("manifest.json", manifest.as_slice()),
        ("config.json", config.as_slice()),
        ("base/layer.tar", base.as_slice()),
        ("top/layer.tar", top.as_slice()),
    ] {
        let mut header = tar::Header::new_gnu();
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_size(data.len() as u64);
        builder.append_data(&mut header, name, data).unwrap();
    }
    std::fs::create_dir_all(dir).unwrap();
    let archive = dir.join("saved.tar");
    std::fs::write(&archive, builder.into_inner().unwrap()).unwrap();
    archive
}

/// The app image's two layers (uncompressed) and its config.
fn app_parts(dir: &Path) -> (Vec<u8>, Vec<u8>, serde_json::Value) {
    let busybox = std::fs::read("/bin/busybox").unwrap();
    let marker = dir.display().to_string();
    let mut base = vec![
        Item::File("etc/hangar-test-layout", 0o644, marker.as_bytes()),
        Item::Dir("bin", 0o755),
        Item::File("bin/busybox", 0o755, &busybox),
        Item::Dir("etc", 0o755),
        Item::File(
            "etc/passwd",
            0o644,
            b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/app:/bin/sh\n",
        ),
        Item::File("etc/group", 0o644, b"root:x:0:\napp:x:1000:\n"),
        Item::File("etc/motd", 0o644, b"removed by layer 2\n"),
        Item::Dir("root", 0o700),
        Item::Dir("tmp", 0o1777),
        Item::Dir("app", 0o755),
    ];
    for applet in [
        "sh", "echo", "cat", "id", "pwd", "test", "ls", "env", "sleep",
    ] {
        base.push(Item::Link(
            Box::leak(format!("bin/{applet}").into_boxed_str()),
            "busybox",
        ));
    }
    let top = [
        Item::File("app/hello.txt", 0o644, b"hello from layer 2\n"),
        Item::File("etc/.wh.motd", 0o644, b""),
        Item::File("etc/os-release", 0o644, b"ID=hangar-test\n"),
    ];
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/bin", "GREETING=hi"],
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": ["echo $GREETING from $(cat /etc/os-release)"],
            "WorkingDir": "/app",
            "User": "app",
        },
    });
    (layer(&base), layer(&top), config)
}
