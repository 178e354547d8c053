use super::*;
use crate::record::VmState;

pub(super) fn manager(dir: &Path) -> Manager {
    Manager::open(ManagerOptions {
        state_dir: Some(dir.to_path_buf()),
        accel: Some(Accel::Tcg),
    })
    .unwrap()
}

#[test]
fn noop_vm_goes_through_its_whole_life() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = manager(dir.path());
    let vm = m.create(VmSpec::new("web"), BackendKind::Noop).unwrap();
    assert_eq!(vm.state, VmState::Created);
    assert!(vm.work_dir.is_dir());
    assert_eq!(m.start(None, "web").unwrap().state, VmState::Running);
    let stopped = m.stop(None, "web", None).unwrap();
    assert_eq!(stopped.state, VmState::Stopped);
    assert!(stopped.exit_reason.unwrap().contains("stopped on request"));
    assert!(stopped.stopped_at.is_some());
    assert_eq!(m.start(None, &vm.id).unwrap().state, VmState::Running);
    let err = m.remove(None, "web", false).unwrap_err();
    assert!(err.to_string().contains("hangar rm -f"), "{err}");
    m.remove(None, "web", true).unwrap();
    assert!(!vm.work_dir.exists());
    assert!(m.list().unwrap().is_empty());
}

#[test]
fn invalid_spec_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = manager(dir.path());
    let mut spec = VmSpec::new("web");
    spec.cpus = 0;
    assert!(m.create(spec, BackendKind::Noop).is_err());
    assert!(m.list().unwrap().is_empty());
    let entries = std::fs::read_dir(m.layout().vms_dir()).unwrap().count();
    assert_eq!(entries, 0);
}

#[test]
fn names_are_unique_per_namespace_only() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = manager(dir.path());
    m.create(VmSpec::new("web"), BackendKind::Noop).unwrap();
    let mut other = VmSpec::new("web");
    other.namespace = "staging".into();
    m.create(other, BackendKind::Noop).unwrap();
    let err = m.create(VmSpec::new("web"), BackendKind::Noop).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    // The bare name is ambiguous across namespaces; a namespace settles it.
    assert!(m.inspect(None, "web").is_err());
    assert_eq!(
        m.inspect(Some("staging"), "web").unwrap().namespace,
        "staging"
    );
    assert_eq!(m.list().unwrap().len(), 2);
    // The refused create left no work dir behind.
    assert_eq!(std::fs::read_dir(m.layout().vms_dir()).unwrap().count(), 2);
}

#[test]
fn image_references_are_default_or_oci_and_must_be_imported() {
    assert_eq!(parse_image("default").unwrap(), ImageSource::Default);
    assert_eq!(
        parse_image("alpine:3.20").unwrap(),
        ImageSource::Oci {
            reference: "alpine:3.20".into()
        }
    );
    let err = parse_image("bad ref").unwrap_err();
    assert!(err.to_string().contains("is not valid"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let mut m = manager(dir.path());
    let mut spec = VmSpec::new("web");
    spec.image = parse_image("alpine:3.20").unwrap();
    let err = m.create(spec, BackendKind::Noop).unwrap_err();
    assert!(
        err.to_string().contains("is not in the image store"),
        "{err}"
    );
    assert!(m.list().unwrap().is_empty());
}

#[test]
fn a_vm_still_loading_a_snapshot_pins_it_until_it_runs() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = manager(dir.path());
    let vm = m.create(VmSpec::new("web"), BackendKind::Noop).unwrap();
    let snapshot = "0a0000000001";
    let set = |m: &mut Manager, state: VmState| {
        m.store
            .update(&vm.id, |r| {
                r.restored_from = Some(snapshot.into());
                r.state = state;
                Ok::<_, ManagerError>(())
            })
            .unwrap();
    };
    assert!(m.snapshot_users(snapshot).unwrap().is_empty());
    for loading in [VmState::Created, VmState::Starting] {
        set(&mut m, loading);
        assert_eq!(
            m.snapshot_users(snapshot).unwrap(),
            vec!["VM web (starting from it)".to_owned()]
        );
    }
    set(&mut m, VmState::Running);
    assert!(m.snapshot_users(snapshot).unwrap().is_empty());
    // A cold start later boots from the VM's own files.
    m.store
        .update(&vm.id, |r| {
            r.stopped_at = Some(chrono::Utc::now());
            r.state = VmState::Starting;
            Ok::<_, ManagerError>(())
        })
        .unwrap();
    assert!(m.snapshot_users(snapshot).unwrap().is_empty());
}

#[test]
fn a_start_follows_a_freeze_whose_record_update_was_lost() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = manager(dir.path());
    let vm = m.create(VmSpec::new("web"), BackendKind::Noop).unwrap();
    // A snapshot told the record it froze the disks, QEMU went on in the
    // new layer, and the write that should have followed never happened.
    let next = VmRecord::next_root_layer("0a0000000002");
    std::fs::write(vm.work_dir.join(&next), b"qcow2").unwrap();
    m.store
        .update(&vm.id, |r| {
            r.freezing = Some("0a0000000002".into());
            Ok::<_, ManagerError>(())
        })
        .unwrap();
    let started = m.start(None, "web").unwrap();
    assert_eq!(started.root_layer.as_deref(), Some(next.as_str()));
    assert_eq!(started.freezing, None);
    assert_eq!(
        m.inspect(None, "web").unwrap().root_layer_path(),
        vm.work_dir.join(next)
    );
}

#[test]
fn a_listing_skips_a_vm_removed_while_it_was_reconciled() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = manager(dir.path());
    let vm = m.create(VmSpec::new("web"), BackendKind::Noop).unwrap();
    // A start whose hangar process died: reconciling it writes the record.
    let listed = m
        .store
        .update(&vm.id, |r| {
            r.state = VmState::Starting;
            r.owner = Some(crate::record::ProcessRef {
                pid: u32::MAX - 1,
                start_time: 1,
            });
            Ok::<_, ManagerError>(())
        })
        .unwrap();
    // Removed by another command after `ps` listed it.
    assert!(m.store.delete(&listed.id).unwrap());
    assert!(m.reconcile(listed.clone()).is_err(), "the race this covers");
    assert_eq!(m.reconcile_listed(listed).unwrap(), None);
}

#[test]
fn a_start_refused_for_a_running_vm_leaves_a_freeze_under_way_alone() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = manager(dir.path());
    let vm = m.create(VmSpec::new("web"), BackendKind::Noop).unwrap();
    m.start(None, "web").unwrap();
    // Another process's snapshot told the record and has not frozen yet.
    m.store
        .update(&vm.id, |r| {
            r.freezing = Some("0a0000000003".into());
            Ok::<_, ManagerError>(())
        })
        .unwrap();
    assert!(m.start(None, "web").is_err());
    let record = m.inspect(None, "web").unwrap();
    assert_eq!(record.freezing.as_deref(), Some("0a0000000003"));
}
