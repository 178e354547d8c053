use super::*;

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHangarTestKeyOnlyForTests0000000000000 me@host";

fn input<'a>(spec: &'a CloudInitSpec, password: Option<&'a str>) -> SeedInput<'a> {
    SeedInput {
        spec,
        vm_id: "0a1b2c3d4e5f",
        vm_name: "web-1",
        mac: Some("02:1b:2c:3d:4e:5f"),
        extra_keys: &[],
        password,
    }
}

fn file(files: &[(&str, Vec<u8>)], name: &str) -> serde_yaml::Value {
    let (_, data) = files.iter().find(|(n, _)| *n == name).unwrap();
    serde_yaml::from_slice(data).unwrap()
}

#[test]
fn a_generated_seed_creates_the_user_with_the_keys() {
    let spec = CloudInitSpec {
        user: Some("alice".into()),
        ssh_authorized_keys: vec![KEY.into()],
        ..Default::default()
    };
    let files = seed_files(&input(&spec, None)).unwrap();
    let names: Vec<&str> = files.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, ["meta-data", "user-data"]);
    let meta = file(&files, "meta-data");
    assert_eq!(meta["instance-id"], "0a1b2c3d4e5f");
    assert_eq!(meta["local-hostname"], "web-1");
    let user_data = &files[1].1;
    assert!(user_data.starts_with(b"#cloud-config\n"));
    let config = file(&files, "user-data");
    assert_eq!(config["users"][0]["name"], "alice");
    assert_eq!(config["users"][0]["ssh_authorized_keys"][0], KEY);
    assert_eq!(config["users"][0]["lock_passwd"], true);
    assert_eq!(config["ssh_pwauth"], false);
    assert_eq!(config["manage_etc_hosts"], true);
    assert_eq!(
        config["write_files"][0]["content"],
        "manual_cache_clean: true\n"
    );
    assert!(config.get("chpasswd").is_none());
}

#[test]
fn a_password_goes_into_the_seed_only() {
    let spec = CloudInitSpec::default();
    let files = seed_files(&input(&spec, Some("s3cret: {x}"))).unwrap();
    let config = file(&files, "user-data");
    assert_eq!(config["users"][0]["name"], DEFAULT_USER);
    assert_eq!(config["chpasswd"]["users"][0]["password"], "s3cret: {x}");
    assert_eq!(config["users"][0]["lock_passwd"], false);
    assert_eq!(config["ssh_pwauth"], true);
    // The spec (which goes into the VM record) never held it.
    assert!(!serde_json::to_string(&spec).unwrap().contains("s3cret"));
}

#[test]
fn own_user_data_is_kept_and_keys_go_to_the_default_user() {
    let spec = CloudInitSpec {
        user_data: Some("#cloud-config\nruncmd: [touch, /ran]\n".into()),
        hostname: Some("db.internal".into()),
        ..Default::default()
    };
    let extra = vec![KEY.to_owned()];
    let mut seed = input(&spec, None);
    seed.extra_keys = &extra;
    let files = seed_files(&seed).unwrap();
    assert_eq!(files[1].1, b"#cloud-config\nruncmd: [touch, /ran]\n");
    let meta = file(&files, "meta-data");
    assert_eq!(meta["local-hostname"], "db.internal");
    assert_eq!(meta["public-keys"][0], KEY);
    let err = seed_files(&input(&spec, Some("pw"))).unwrap_err();
    assert!(err.to_string().contains("cannot be merged"), "{err}");
}

#[test]
fn a_static_address_writes_network_config_v2() {
    let spec = CloudInitSpec {
        network: Some(StaticNetwork {
            address: "10.0.2.50/24".into(),
            gateway: Some("10.0.2.2".into()),
            dns: vec!["10.0.2.3".into()],
        }),
        ..Default::default()
    };
    let files = seed_files(&input(&spec, None)).unwrap();
    let net = file(&files, "network-config");
    assert_eq!(net["version"], 2);
    let eth = &net["ethernets"]["eth0"];
    assert_eq!(eth["match"]["macaddress"], "02:1b:2c:3d:4e:5f");
    assert_eq!(eth["addresses"][0], "10.0.2.50/24");
    assert_eq!(eth["routes"][0]["via"], "10.0.2.2");
    assert_eq!(eth["routes"][0]["to"], "0.0.0.0/0");
    assert_eq!(eth["nameservers"]["addresses"][0], "10.0.2.3");
}

#[test]
fn every_bad_value_names_its_field() {
    let cases: Vec<(CloudInitSpec, &str)> = vec![
        (
            CloudInitSpec {
                hostname: Some("bad_host".into()),
                ..Default::default()
            },
            "hostname",
        ),
        (
            CloudInitSpec {
                hostname: Some("a\nb".into()),
                ..Default::default()
            },
            "hostname",
        ),
        (
            CloudInitSpec {
                instance_id: Some("i d".into()),
                ..Default::default()
            },
            "instance-id",
        ),
        (
            CloudInitSpec {
                user: Some("Root".into()),
                ..Default::default()
            },
            "user",
        ),
        (
            CloudInitSpec {
                ssh_authorized_keys: vec!["not a key".into()],
                ..Default::default()
            },
            "ssh key",
        ),
        (
            CloudInitSpec {
                ssh_authorized_keys: vec![format!("{KEY}\nssh-rsa injected")],
                ..Default::default()
            },
            "ssh key",
        ),
        (
            CloudInitSpec {
                user_data: Some("hello".into()),
                ..Default::default()
            },
            "user-data starts with",
        ),
        (
            CloudInitSpec {
                network: Some(StaticNetwork {
                    address: "10.0.2.50".into(),
                    gateway: None,
                    dns: vec![],
                }),
                ..Default::default()
            },
            "address",
        ),
        (
            CloudInitSpec {
                network: Some(StaticNetwork {
                    address: "10.0.2.50/33".into(),
                    gateway: None,
                    dns: vec![],
                }),
                ..Default::default()
            },
            "prefix /33",
        ),
    ];
    for (spec, expected) in cases {
        let err = seed_files(&input(&spec, None)).unwrap_err().to_string();
        assert!(err.contains(expected), "{err} lacks {expected}");
    }
    let err = seed_files(&input(&CloudInitSpec::default(), Some("a\nb"))).unwrap_err();
    assert!(err.to_string().contains("password"), "{err}");
}

#[test]
fn the_seed_image_is_labelled_cidata() {
    let image = seed_image(&input(&CloudInitSpec::default(), None)).unwrap();
    assert_eq!(&image[16 * 2048 + 40..16 * 2048 + 46], b"cidata");
}
