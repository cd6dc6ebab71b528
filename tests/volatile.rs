//! Volume overlays are mounted `volatile`: nothing a job writes is synced until its commit
//! makes exactly the upper's tree durable, so neither the job's fsyncs nor the unmount flush
//! the node. A volume mounted again in the same boot keeps and publishes its change; a volume
//! whose node went down while it was mounted (its record names an earlier boot) is released
//! without publishing what the crash may have cut short.

mod common;

use std::fs;
use std::path::Path;

use common::*;
use jobcachefs::mount::{info, Mounter, SysMounter};
use jobcachefs::ops::Released;
use jobcachefs::store::commit::NotPublished;
use jobcachefs::store::VolumeId;

fn super_options(at: &Path) -> String {
    info::read_mountinfo()
        .expect("mountinfo")
        .into_iter()
        .find(|m| m.mount_point == at)
        .map(|m| m.super_options)
        .unwrap_or_else(|| panic!("nothing mounted at {}", at.display()))
}

#[test]
fn a_volume_mounted_again_in_the_same_boot_publishes_its_change() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let rt = rt();
    let engine = sb.engine();
    let target = sb.path("job");
    let req = volume("v1", &key("c"), publishing(), &target);
    rt.block_on(engine.restore(req.clone())).expect("restore");
    // Kernels since 6.x show the option as `fsync=volatile`.
    let volatile = |o: &str| o == "volatile" || o == "fsync=volatile";
    assert!(super_options(&target).split(',').any(volatile), "{}", super_options(&target));
    fs::write(target.join("before"), vec![7u8; 1 << 20]).expect("write");

    // The mount vanishes (a kubelet or host restart without a reboot); the same volume is
    // mounted again: the kernel's marker must not stop it, and nothing written is lost.
    SysMounter.unmount(&target).expect("unmount");
    let work = sb.layout().work_dir(&VolumeId::new("v1").unwrap(), None);
    assert!(work.join("work/incompat/volatile").is_dir(), "the kernel leaves its marker");
    rt.block_on(engine.restore(req)).expect("mounted again");
    assert_eq!(fs::read(target.join("before")).expect("kept"), vec![7u8; 1 << 20]);
    fs::write(target.join("after"), b"second mount").expect("write");

    let released = rt.block_on(engine.release(&VolumeId::new("v1").unwrap(), true)).expect("release");
    assert!(matches!(released, Some(Released::Committed { version: 1, files: 2, .. })), "{released:?}");
    let next = sb.path("next");
    rt.block_on(engine.restore(volume("v2", &key("c"), publishing(), &next))).expect("restore v1");
    assert_eq!(fs::read(next.join("before")).expect("before").len(), 1 << 20);
    assert_eq!(fs::read_to_string(next.join("after")).expect("after"), "second mount");
}

#[test]
fn a_volume_the_node_went_down_under_is_never_published() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let rt = rt();
    let engine = sb.engine();
    // v1 of the cache, then two jobs on it when the node goes down.
    let seed = sb.cli(&["run", "--cache", "c", "--", "sh", "-c", "echo good > $JOBCACHE_DIR/f"]);
    assert!(stderr(&seed).contains("published v1"), "{}", stderr(&seed));
    let (a, b) = (sb.path("a"), sb.path("b"));
    for (id, at) in [("a", &a), ("b", &b)] {
        rt.block_on(engine.restore(volume(id, &key("c"), publishing(), at))).expect("restore");
        fs::write(at.join("f"), b"cut sh").expect("write");
    }
    // What a reboot leaves: no mounts, and records naming the boot they were mounted in.
    for (id, at) in [("a", &a), ("b", &b)] {
        SysMounter.unmount(at).expect("unmount");
        let path = sb.layout().volume_record(&VolumeId::new(id).unwrap());
        let text = fs::read_to_string(&path).expect("record");
        let mut record: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert!(record["boot"].as_str().is_some_and(|b| b.len() == 36), "the mount recorded its boot: {text}");
        record["boot"] = "00000000-0000-4000-8000-000000000000".into();
        fs::write(&path, record.to_string()).expect("rewrite");
    }

    // Released as it is (kubelet cleaning up after the reboot): not published, said why.
    let released = rt.block_on(engine.release(&VolumeId::new("a").unwrap(), true)).expect("release");
    assert!(matches!(released, Some(Released::NotPublished { why: NotPublished::NodeRestarted })), "{released:?}");
    assert!(released.unwrap().to_string().contains("the node went down while the volume was mounted"));

    // Mounted again first (the pod restarted on the node): the job sees its files, but the
    // volume stays marked and still never publishes.
    rt.block_on(engine.restore(volume("b", &key("c"), publishing(), &b))).expect("mounted again");
    assert_eq!(fs::read_to_string(b.join("f")).expect("read"), "cut sh");
    let released = rt.block_on(engine.release(&VolumeId::new("b").unwrap(), true)).expect("release");
    assert!(matches!(released, Some(Released::NotPublished { why: NotPublished::NodeRestarted })), "{released:?}");

    let head = sb.store().head(&key("c")).unwrap().expect("v1");
    assert_eq!(head.version, 1, "HEAD never moved");
    let seen = sb.cli(&["run", "--cache", "c", "--", "cat", "/dev/null"]);
    assert!(seen.status.success());
    let read = sb.cli(&["run", "--cache", "c", "--no-publish", "--", "sh", "-c", "cat $JOBCACHE_DIR/f"]);
    assert_eq!(stdout(&read), "good\n");
    assert!(sb.mounts().is_empty(), "{:?}", sb.mounts());
}
