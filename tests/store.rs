//! The store and the commit protocol on real overlay mounts (root).

mod common;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use common::*;
use jobcachefs::lock::{FileLock, PublishLock};
use jobcachefs::mount::SysMounter;
use jobcachefs::ops::{Engine, OpsError, Released};
use jobcachefs::store::commit::NotPublished;
use jobcachefs::store::{CacheKey, OnStale, Policy, VolumeId};

/// Restores `cache` as volume `id`, lets `job` change it, releases it.
fn publish(
    engine: &Engine,
    sb: &Sandbox,
    cache: &CacheKey,
    id: &str,
    policy: Policy,
    job: impl FnOnce(&Path),
) -> Released {
    let rt = rt();
    let target = sb.path(&format!("mnt-{id}"));
    rt.block_on(engine.restore(volume(id, cache, policy, &target))).expect("restore");
    job(&target);
    rt.block_on(engine.release(&VolumeId::new(id).unwrap(), true)).expect("release").expect("volume existed")
}

fn read(sb: &Sandbox, engine: &Engine, cache: &CacheKey, id: &str, file: &str) -> Option<String> {
    let rt = rt();
    let target = sb.path(&format!("mnt-{id}"));
    rt.block_on(engine.restore(volume(id, cache, Policy::default(), &target))).expect("restore");
    let text = fs::read_to_string(target.join(file)).ok();
    rt.block_on(engine.release(&VolumeId::new(id).unwrap(), true)).expect("release");
    text
}

fn layer_dirs(sb: &Sandbox) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(sb.layout().layers_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".json"))
        .collect();
    v.sort();
    v
}

#[test]
fn content_carries_across_versions() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let engine = sb.engine();
    let c = key("m2");
    let r = publish(&engine, &sb, &c, "v1", publishing(), |d| {
        fs::create_dir_all(d.join("repo/org")).unwrap();
        fs::write(d.join("repo/org/a.jar"), "a1").unwrap();
    });
    assert!(matches!(r, Released::Committed { version: 1, depth: 1, .. }), "{r:?}");
    let r = publish(&engine, &sb, &c, "v2", publishing(), |d| {
        assert_eq!(fs::read_to_string(d.join("repo/org/a.jar")).unwrap(), "a1");
        fs::write(d.join("repo/org/b.jar"), "b2").unwrap();
    });
    assert!(matches!(r, Released::Committed { version: 2, depth: 2, .. }), "{r:?}");
    let head = sb.store().head(&c).unwrap().unwrap();
    assert_eq!((head.version, head.layers.len()), (2, 2));
    assert_eq!(read(&sb, &engine, &c, "r", "repo/org/a.jar").as_deref(), Some("a1"));
    assert_eq!(read(&sb, &engine, &c, "r2", "repo/org/b.jar").as_deref(), Some("b2"));
    // A new store on the same dir sees the same HEAD: nothing lived only in memory.
    let reopened = jobcachefs::store::Store::open(sb.layout()).unwrap();
    assert_eq!(reopened.head(&c).unwrap().unwrap(), head);
    assert!(sb.store().volumes().unwrap().is_empty(), "released volumes are dropped");
    assert!(sb.mounts().is_empty(), "nothing left mounted");
}

#[test]
fn deletions_and_replaced_directories_survive_commit_and_squash() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let engine = sb.engine();
    let c = key("node");
    publish(&engine, &sb, &c, "v1", publishing(), |d| {
        fs::write(d.join("gone.txt"), "x").unwrap();
        fs::create_dir_all(d.join("dir/sub")).unwrap();
        fs::write(d.join("dir/old1"), "1").unwrap();
        fs::write(d.join("dir/sub/old2"), "2").unwrap();
        fs::write(d.join("keep"), "k").unwrap();
    });
    publish(&engine, &sb, &c, "v2", publishing(), |d| {
        fs::remove_file(d.join("gone.txt")).unwrap();
        fs::remove_dir_all(d.join("dir")).unwrap();
        fs::create_dir(d.join("dir")).unwrap();
        fs::write(d.join("dir/new"), "n").unwrap();
    });
    // The v2 layer is in overlay format: a whiteout and an opaque directory.
    let head = sb.store().head(&c).unwrap().unwrap();
    let top = sb.layout().layer_dir(&head.layers[1]);
    let wh = fs::symlink_metadata(top.join("gone.txt")).unwrap();
    assert!(wh.file_type().is_char_device() && wh.rdev() == 0, "whiteout is a 0/0 char device");
    assert_eq!(xattr::get(top.join("dir"), "trusted.overlay.opaque").unwrap().as_deref(), Some(&b"y"[..]));

    let check = |id: &str| {
        let rt = rt();
        let t = sb.path(id);
        rt.block_on(engine.restore(volume(id, &c, Policy::default(), &t))).unwrap();
        assert!(!t.join("gone.txt").exists(), "deleted file stays deleted");
        let mut names: Vec<_> = fs::read_dir(t.join("dir")).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, vec![std::ffi::OsString::from("new")], "replaced directory shows only new content");
        assert_eq!(fs::read_to_string(t.join("keep")).unwrap(), "k");
        rt.block_on(engine.release(&VolumeId::new(id).unwrap(), true)).unwrap();
    };
    check("after-commit");
    publish(&engine, &sb, &c, "v3", publishing(), |d| fs::write(d.join("third"), "3").unwrap());

    let out = rt().block_on(engine.squash(&c, 1, Box::new(|_| {}))).unwrap();
    assert!(
        matches!(out, jobcachefs::store::squash::SquashOutcome::Squashed { version: 3, replaced: 3, depth: 1 }),
        "{out:?}"
    );
    let head = sb.store().head(&c).unwrap().unwrap();
    assert_eq!((head.version, head.layers.len()), (3, 1), "squash keeps the version");
    let flat = sb.layout().layer_dir(&head.layers[0]);
    assert!(!flat.join("gone.txt").exists(), "no whiteouts in a flat layer");
    assert!(xattr::get(flat.join("dir"), "trusted.overlay.opaque").unwrap().is_none(), "overlay xattrs dropped");
    check("after-squash");
    rt().block_on(engine.collect(None, None)).unwrap();
    assert_eq!(layer_dirs(&sb), named_layers(&sb.store()), "replaced layers collected, kept versions' kept");
    assert!(layer_dirs(&sb).contains(&head.layers[0].to_string()));
}

#[test]
fn two_volumes_from_one_base_first_wins_second_is_stale() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let engine = sb.engine();
    let c = key("go");
    publish(&engine, &sb, &c, "v1", publishing(), |d| fs::write(d.join("base"), "1").unwrap());
    let rt = rt();
    let (ta, tb) = (sb.path("a"), sb.path("b"));
    rt.block_on(engine.restore(volume("a", &c, publishing(), &ta))).unwrap();
    rt.block_on(engine.restore(volume("b", &c, publishing(), &tb))).unwrap();
    fs::write(ta.join("from-a"), "a").unwrap();
    fs::write(tb.join("from-b"), "b").unwrap();
    let first = rt.block_on(engine.release(&VolumeId::new("a").unwrap(), true)).unwrap().unwrap();
    assert!(matches!(first, Released::Committed { version: 2, .. }), "{first:?}");
    let layers_before = layer_dirs(&sb);
    let second = rt.block_on(engine.release(&VolumeId::new("b").unwrap(), true)).unwrap().unwrap();
    assert_eq!(second, Released::Stale { base: 1, current: 2, other_lifetime: false });
    assert_eq!(second.to_string(), "not published: skipped: base 1 is stale, current is 2");
    let head = sb.store().head(&c).unwrap().unwrap();
    assert_eq!(head.version, 2, "the stale volume did not roll HEAD back");
    assert_eq!(layer_dirs(&sb), layers_before, "the stale delta was dropped");
    assert_eq!(read(&sb, &engine, &c, "r1", "from-a").as_deref(), Some("a"));
    assert_eq!(read(&sb, &engine, &c, "r2", "from-b"), None);
}

#[test]
fn on_stale_stack_puts_the_delta_on_the_newer_head() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let engine = sb.engine();
    let c = key("cargo");
    publish(&engine, &sb, &c, "v1", publishing(), |d| fs::write(d.join("base"), "1").unwrap());
    let rt = rt();
    let (ta, tb) = (sb.path("a"), sb.path("b"));
    let stack = Policy { on_stale: OnStale::Stack, ..publishing() };
    rt.block_on(engine.restore(volume("a", &c, publishing(), &ta))).unwrap();
    rt.block_on(engine.restore(volume("b", &c, stack, &tb))).unwrap();
    fs::write(ta.join("from-a"), "a").unwrap();
    fs::write(tb.join("from-b"), "b").unwrap();
    rt.block_on(engine.release(&VolumeId::new("a").unwrap(), true)).unwrap();
    let second = rt.block_on(engine.release(&VolumeId::new("b").unwrap(), true)).unwrap().unwrap();
    assert!(matches!(second, Released::Committed { version: 3, depth: 3, .. }), "{second:?}");
    assert_eq!(read(&sb, &engine, &c, "r1", "from-a").as_deref(), Some("a"));
    assert_eq!(read(&sb, &engine, &c, "r2", "from-b").as_deref(), Some("b"));
    assert_eq!(read(&sb, &engine, &c, "r3", "base").as_deref(), Some("1"));
}

#[test]
fn fresh_start_mounts_empty_and_replaces_the_layers() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let engine = sb.engine();
    let c = key("ccache");
    publish(&engine, &sb, &c, "v1", publishing(), |d| fs::write(d.join("old"), "o").unwrap());
    publish(&engine, &sb, &c, "v2", publishing(), |d| fs::write(d.join("old2"), "o").unwrap());
    let fresh = Policy { fresh: true, ..publishing() };
    let r = publish(&engine, &sb, &c, "f", fresh, |d| {
        assert_eq!(fs::read_dir(d).unwrap().count(), 0, "a fresh start sees an empty cache");
        fs::write(d.join("new"), "n").unwrap();
    });
    assert!(matches!(r, Released::Committed { version: 3, depth: 1, .. }), "{r:?}");
    assert_eq!(read(&sb, &engine, &c, "r1", "old"), None);
    assert_eq!(read(&sb, &engine, &c, "r2", "new").as_deref(), Some("n"));
}

#[test]
fn fallback_caches_restore_while_the_cache_has_no_version() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let engine = sb.engine();
    let main = key("main");
    let pr = key("pr-17");
    publish(&engine, &sb, &main, "m1", publishing(), |d| fs::write(d.join("dep"), "main").unwrap());
    let rt = rt();
    let t = sb.path("pr");
    let mut req = volume("pr", &pr, publishing(), &t);
    req.fallbacks = vec![key("missing"), main.clone()];
    let restored = rt.block_on(engine.restore(req)).unwrap();
    assert_eq!(restored.volume.base.from, main, "restored from the first fallback that has a version");
    assert_eq!(restored.volume.base.version, 0);
    assert_eq!(fs::read_to_string(t.join("dep")).unwrap(), "main");
    fs::write(t.join("pr-dep"), "pr").unwrap();
    let r = rt.block_on(engine.release(&VolumeId::new("pr").unwrap(), true)).unwrap().unwrap();
    assert!(matches!(r, Released::Committed { version: 1, depth: 2, .. }), "{r:?}");
    assert_eq!(read(&sb, &engine, &pr, "r1", "dep").as_deref(), Some("main"), "pr v1 stacks on main's layers");
    assert_eq!(read(&sb, &engine, &main, "r2", "pr-dep"), None, "main is untouched");
    assert_eq!(sb.store().head(&main).unwrap().unwrap().version, 1);
}

#[test]
fn over_max_bytes_is_not_published_and_reported() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let engine = sb.engine();
    let c = key("npm");
    let limited = Policy { max_bytes: Some(1000), ..publishing() };
    let r = publish(&engine, &sb, &c, "big", limited.clone(), |d| fs::write(d.join("blob"), vec![7u8; 5000]).unwrap());
    assert_eq!(r, Released::NotPublished { why: NotPublished::TooBig { bytes: 5000, max_bytes: 1000 } });
    assert!(r.to_string().contains("over maxBytes"), "{r}");
    assert!(sb.store().head(&c).unwrap().is_none());
    let r = publish(&engine, &sb, &c, "small", limited, |d| fs::write(d.join("blob"), vec![7u8; 500]).unwrap());
    assert!(matches!(r, Released::Committed { version: 1, .. }), "{r:?}");
}

#[test]
fn read_only_and_unchanged_volumes_publish_nothing() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let engine = sb.engine();
    let c = key("pr");
    let r = publish(&engine, &sb, &c, "ro", Policy::default(), |d| fs::write(d.join("poison"), "x").unwrap());
    assert_eq!(r, Released::NotPublished { why: NotPublished::NotAllowed });
    let r = publish(&engine, &sb, &c, "idle", publishing(), |_| {});
    assert_eq!(r, Released::NotPublished { why: NotPublished::Unchanged });
    assert!(sb.store().head(&c).unwrap().is_none(), "HEAD never advanced");
    assert!(layer_dirs(&sb).is_empty(), "no layer was made");
}

#[test]
fn restore_is_idempotent_and_conflicting_reuse_is_refused() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let engine = sb.engine();
    let rt = rt();
    let c = key("idem");
    let t = sb.path("t");
    rt.block_on(engine.restore(volume("v", &c, publishing(), &t))).unwrap();
    rt.block_on(engine.restore(volume("v", &c, publishing(), &t))).unwrap();
    assert_eq!(sb.mounts().iter().filter(|m| **m == t).count(), 1, "mounted once");
    let err = rt.block_on(engine.restore(volume("v", &key("other"), publishing(), &t))).unwrap_err();
    assert!(err.to_string().contains("already exists for cache default/idem"), "{err}");
    rt.block_on(engine.release(&VolumeId::new("v").unwrap(), true)).unwrap();
    assert_eq!(
        rt.block_on(engine.release(&VolumeId::new("v").unwrap(), true)).unwrap(),
        None,
        "second release finds nothing"
    );
}

#[test]
fn busy_release_is_an_error_that_keeps_the_data_and_can_be_retried() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let engine = sb.engine();
    let rt = rt();
    let c = key("busy");
    let t = sb.path("t");
    rt.block_on(engine.restore(volume("v", &c, publishing(), &t))).unwrap();
    fs::write(t.join("work"), "w").unwrap();
    let open = fs::File::open(t.join("work")).unwrap();
    let err = rt.block_on(engine.release(&VolumeId::new("v").unwrap(), true)).unwrap_err();
    assert!(matches!(err, OpsError::Mount { .. }), "{err}");
    assert!(err.to_string().contains("busy"), "{err}");
    assert_eq!(fs::read_to_string(t.join("work")).unwrap(), "w", "still mounted, data intact");
    drop(open);
    let r = rt.block_on(engine.release(&VolumeId::new("v").unwrap(), true)).unwrap().unwrap();
    assert!(matches!(r, Released::Committed { version: 1, .. }), "{r:?}");
}

#[test]
fn lock_timeout_keeps_the_change_and_a_retry_publishes_it() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let engine = sb.engine_with_timeout(Duration::from_millis(100));
    let rt = rt();
    let c = key("locked");
    let t = sb.path("t");
    rt.block_on(engine.restore(volume("v", &c, publishing(), &t))).unwrap();
    fs::write(t.join("f"), "x").unwrap();
    let other = FileLock::new(sb.layout());
    let held = rt.block_on(other.acquire(&c, Duration::from_secs(1))).unwrap();
    let err = rt.block_on(engine.release(&VolumeId::new("v").unwrap(), true)).unwrap_err();
    assert!(matches!(err, OpsError::Lock { .. }), "{err}");
    assert!(err.to_string().contains("retry"), "{err}");
    assert!(sb.store().head(&c).unwrap().is_none());
    assert!(sb.store().volume(&VolumeId::new("v").unwrap()).unwrap().unwrap().pending.is_some(), "promoted layer kept");
    rt.block_on(held.release()).unwrap();
    let r = rt.block_on(engine.release(&VolumeId::new("v").unwrap(), true)).unwrap().unwrap();
    assert!(matches!(r, Released::Committed { version: 1, .. }), "{r:?}");
    assert_eq!(read(&sb, &engine, &c, "r", "f").as_deref(), Some("x"));
}

#[test]
fn corrupt_head_is_reported_and_left_alone() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let engine = sb.engine();
    let c = key("broken");
    publish(&engine, &sb, &c, "v1", publishing(), |d| fs::write(d.join("f"), "x").unwrap());
    let head = sb.layout().head_path(&c);
    fs::write(&head, b"{\"version\": 3, \"layers\": [\"../../etc\"]}").unwrap();
    let before = fs::read(&head).unwrap();
    let layers = layer_dirs(&sb);
    let t = sb.path("t");
    let err = rt().block_on(engine.restore(volume("x", &c, publishing(), &t))).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("head.json is corrupt") && msg.contains("layer id"), "{msg}");
    assert_eq!(fs::read(&head).unwrap(), before, "nothing rewritten");
    // gc must not treat a cache it cannot read as empty and delete its layers.
    let (_, report) = rt().block_on(engine.collect(None, None)).unwrap();
    assert!(report.deferred.iter().any(|d| d.contains("broken")), "{report:?}");
    assert_eq!(layer_dirs(&sb), layers);
}

#[test]
fn gc_collects_orphans_and_keeps_what_is_referenced() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let engine = sb.engine();
    let c = key("gc");
    publish(&engine, &sb, &c, "v1", publishing(), |d| fs::write(d.join("f"), "x").unwrap());
    let layout = sb.layout();
    let live = layer_dirs(&sb);
    // Debris of crashes: a layer nobody names, a record without a tree, scratch, a half-made volume,
    // a stray temp file next to a HEAD, and a volume whose `run` process is gone.
    fs::create_dir_all(layout.layers_dir().join("orphan1/x")).unwrap();
    fs::write(layout.layers_dir().join("orphan2.json"), "{}").unwrap();
    fs::create_dir_all(layout.tmp_dir().join("squash-zzz/flat")).unwrap();
    fs::create_dir_all(layout.volumes_dir().join("half")).unwrap();
    fs::write(layout.cache_dir(&c).join(".head.json.abc.tmp"), "{").unwrap();
    let t = sb.path("dead");
    let rt = rt();
    let mut req = volume("dead", &c, publishing(), &t);
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id() as i32;
    child.wait().unwrap();
    req.owner = Some(jobcachefs::store::Owner { pid, start_ticks: 1 });
    rt.block_on(engine.restore(req)).unwrap();
    assert!(sb.mounts().contains(&t));

    let (_, report) = rt.block_on(engine.collect(None, None)).unwrap();
    assert_eq!(report.volumes_reclaimed, vec![VolumeId::new("dead").unwrap()]);
    assert_eq!(report.layers_removed.iter().map(|l| l.to_string()).collect::<Vec<_>>(), vec!["orphan1"]);
    assert!(!sb.mounts().contains(&t), "the dead owner's mount is gone");
    assert_eq!(layer_dirs(&sb), live, "referenced layers kept");
    assert!(!layout.layers_dir().join("orphan2.json").exists());
    assert!(!layout.volumes_dir().join("half").exists());
    assert!(!layout.cache_dir(&c).join(".head.json.abc.tmp").exists());
    assert_eq!(fs::read_dir(layout.tmp_dir()).unwrap().count(), 0, "scratch cleared");
    assert_eq!(read(&sb, &engine, &c, "r", "f").as_deref(), Some("x"));
}

#[test]
fn eviction_removes_idle_and_least_recently_used_caches_first() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let engine = sb.engine();
    let store = sb.store();
    for (i, name) in ["old", "mid", "new"].iter().enumerate() {
        let c = key(name);
        publish(&engine, &sb, &c, name, publishing(), |d| fs::write(d.join("f"), vec![1u8; 1000]).unwrap());
        let age = Duration::from_secs(3600 * (3 - i as u64) * 24);
        let f = fs::File::options().write(true).open(sb.layout().used_path(&c)).unwrap();
        f.set_modified(std::time::SystemTime::now() - age).unwrap();
    }
    // "old" is 3 days idle, "mid" 2, "new" 1; a live volume keeps "mid" whatever its age.
    let t = sb.path("live");
    rt().block_on(engine.restore(volume("live", &key("mid"), Policy::default(), &t))).unwrap();
    let f = fs::File::options().write(true).open(sb.layout().used_path(&key("mid"))).unwrap();
    f.set_modified(std::time::SystemTime::now() - Duration::from_secs(3600 * 48)).unwrap();

    let (evicted, _) = rt().block_on(engine.collect(Some(Duration::from_secs(3600 * 60)), None)).unwrap();
    assert_eq!(evicted, vec![key("old")], "only the cache idle past the limit");
    let (evicted, _) = rt().block_on(engine.collect(Some(Duration::from_secs(3600 * 30)), None)).unwrap();
    assert!(evicted.is_empty(), "mid is idle but in use, new is recent: {evicted:?}");
    rt().block_on(engine.release(&VolumeId::new("live").unwrap(), true)).unwrap();
    let (evicted, report) = rt().block_on(engine.collect(None, Some(1500))).unwrap();
    assert_eq!(evicted, vec![key("mid")], "least recently used first, until the rest fit");
    assert!(store.head(&key("new")).unwrap().is_some());
    assert!(store.head(&key("mid")).unwrap().is_none());
    assert_eq!(report.layers_removed.len(), 1);
    assert_eq!(layer_dirs(&sb).len(), 1);
}

#[test]
fn squash_keeps_modes_owners_times_xattrs_links_and_devices() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let engine = sb.engine();
    let c = key("meta");
    let mtime = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000);
    publish(&engine, &sb, &c, "v1", publishing(), |d| {
        fs::write(d.join("suid"), "s").unwrap();
        std::os::unix::fs::chown(d.join("suid"), Some(1234), Some(5678)).unwrap();
        fs::set_permissions(d.join("suid"), fs::Permissions::from_mode(0o4755)).unwrap();
        fs::File::options().write(true).open(d.join("suid")).unwrap().set_modified(mtime).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.join("link")).unwrap();
        fs::write(d.join("hard1"), "h").unwrap();
        fs::hard_link(d.join("hard1"), d.join("hard2")).unwrap();
        xattr::set(d.join("hard1"), "user.origin", b"build").unwrap();
        nix::sys::stat::mknod(
            &d.join("null"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(1, 3),
        )
        .unwrap();
    });
    publish(&engine, &sb, &c, "v2", publishing(), |d| fs::write(d.join("two"), "2").unwrap());
    let out = rt().block_on(engine.squash(&c, 1, Box::new(|_| {}))).unwrap();
    assert!(matches!(out, jobcachefs::store::squash::SquashOutcome::Squashed { .. }), "{out:?}");
    let flat = sb.layout().layer_dir(&sb.store().head(&c).unwrap().unwrap().layers[0]);
    let m = fs::symlink_metadata(flat.join("suid")).unwrap();
    assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o4755, 1234, 5678));
    assert_eq!(m.modified().unwrap(), mtime);
    assert_eq!(fs::read_link(flat.join("link")).unwrap(), Path::new("/etc/passwd"), "symlink copied, not followed");
    let (h1, h2) = (fs::metadata(flat.join("hard1")).unwrap(), fs::metadata(flat.join("hard2")).unwrap());
    assert_eq!(h1.ino(), h2.ino(), "hard link kept");
    assert_eq!(xattr::get(flat.join("hard1"), "user.origin").unwrap().as_deref(), Some(&b"build"[..]));
    let dev = fs::symlink_metadata(flat.join("null")).unwrap();
    assert!(dev.file_type().is_char_device() && dev.rdev() == nix::sys::stat::makedev(1, 3));
    assert_eq!(fs::read_to_string(flat.join("two")).unwrap(), "2");
}

#[test]
fn pinning_and_gc_in_parallel_never_lose_a_mounted_layer() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let c = key("stress");
    {
        let engine = sb.engine();
        publish(&engine, &sb, &c, "seed", publishing(), |d| fs::write(d.join("n"), "0").unwrap());
    }
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        // A publisher that keeps advancing and squashing, so old layers keep becoming garbage.
        s.spawn(|| {
            let engine = sb.engine();
            for i in 1..=12 {
                publish(&engine, &sb, &c, &format!("p{i}"), publishing(), |d| {
                    fs::write(d.join("n"), i.to_string()).unwrap()
                });
                if i % 3 == 0 {
                    rt().block_on(engine.squash(&c, 1, Box::new(|_| {}))).unwrap();
                }
            }
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        // Collectors in this process and as separate processes sharing the state dir.
        s.spawn(|| {
            let engine = sb.engine();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                rt().block_on(engine.collect(None, None)).unwrap();
                let out = sb.cli(&["cache", "gc", "--json"]);
                assert!(out.status.success(), "{}", stderr(&out));
            }
        });
        for r in 0..2 {
            let sb = &sb;
            let c = &c;
            let stop = &stop;
            s.spawn(move || {
                let engine = sb.engine();
                let rt = rt();
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) || n < 5 {
                    let id = format!("r{r}-{n}");
                    let t = sb.path(&id);
                    rt.block_on(engine.restore(volume(&id, c, Policy::default(), &t))).unwrap();
                    // Every file of the pinned version must stay readable while gc runs.
                    let text = fs::read_to_string(t.join("n")).expect("pinned content readable");
                    assert!(text.parse::<u32>().is_ok(), "{text}");
                    std::thread::sleep(Duration::from_millis(5));
                    assert_eq!(fs::read_to_string(t.join("n")).unwrap(), text);
                    rt.block_on(engine.release(&VolumeId::new(&id).unwrap(), true)).unwrap();
                    n += 1;
                }
            });
        }
    });
    let engine = sb.engine();
    assert_eq!(read(&sb, &engine, &c, "final", "n").as_deref(), Some("12"));
    rt().block_on(engine.collect(None, None)).unwrap();
    assert_eq!(
        layer_dirs(&sb),
        named_layers(&sb.store()),
        "only the layers of HEAD and the kept versions remain once nothing is mounted"
    );
    assert!(sb.mounts().is_empty());
}

#[test]
fn releases_of_one_cache_from_many_threads_advance_once_per_base() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let c = key("race");
    let engine = sb.engine();
    let rt = rt();
    let n = 8;
    for i in 0..n {
        let t = sb.path(&format!("v{i}"));
        rt.block_on(engine.restore(volume(&format!("v{i}"), &c, publishing(), &t))).unwrap();
        fs::write(t.join(format!("f{i}")), "x").unwrap();
    }
    let results: Vec<Released> = rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..n {
            let engine = engine.clone();
            tasks.push(tokio::spawn(
                async move { engine.release(&VolumeId::new(format!("v{i}")).unwrap(), true).await },
            ));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap().unwrap().unwrap());
        }
        out
    });
    let committed = results.iter().filter(|r| matches!(r, Released::Committed { .. })).count();
    let stale = results.iter().filter(|r| matches!(r, Released::Stale { base: 0, current: 1, .. })).count();
    assert_eq!((committed, stale), (1, n - 1), "{results:?}");
    assert_eq!(sb.store().head(&c).unwrap().unwrap().version, 1);
    assert_eq!(layer_dirs(&sb).len(), 1, "stale deltas dropped");
    let _ = SysMounter;
}

#[test]
fn restore_onto_a_foreign_mount_is_refused_and_leaves_nothing_pinned() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let engine = sb.engine();
    let src = sb.path("elsewhere");
    let t = sb.path("t");
    jobcachefs::mount::Mounter::bind(&SysMounter, &src, &t, false).unwrap();
    let err = rt().block_on(engine.restore(volume("v", &key("c"), publishing(), &t))).unwrap_err();
    assert!(err.to_string().contains("already has ext4"), "{err}");
    assert!(sb.store().volume(&VolumeId::new("v").unwrap()).unwrap().is_none(), "no volume left behind");
}

#[test]
fn past_the_publish_deadline_a_release_drops_its_change_and_succeeds() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let engine = sb.engine_with_timeout(Duration::from_millis(50)).with_publish_deadline(Duration::ZERO);
    let rt = rt();
    let c = key("deadline");
    let t = sb.path("t");
    rt.block_on(engine.restore(volume("v", &c, publishing(), &t))).unwrap();
    fs::write(t.join("f"), "x").unwrap();
    let held = rt.block_on(FileLock::new(sb.layout()).acquire(&c, Duration::from_secs(1))).unwrap();
    let r = rt.block_on(engine.release(&VolumeId::new("v").unwrap(), true)).expect("a cache never fails a job");
    let r = r.expect("volume existed");
    assert_eq!(r, Released::NotPublished { why: NotPublished::DeadlinePassed { after_secs: 0 } });
    assert!(r.to_string().contains("publish deadline"), "{r}");
    assert!(sb.store().volume(&VolumeId::new("v").unwrap()).unwrap().is_none(), "volume dropped");
    assert!(layer_dirs(&sb).is_empty(), "the promoted layer was dropped too");
    rt.block_on(held.release()).unwrap();
    assert!(sb.store().head(&c).unwrap().is_none());
}

#[test]
fn a_commit_retried_after_head_moved_on_is_still_a_commit_and_its_layer_stays() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let engine = sb.engine();
    let rt = rt();
    let c = key("moved");
    publish(&engine, &sb, &c, "v1", publishing(), |d| fs::write(d.join("a"), "a").unwrap());

    // Volume x writes HEAD v2 and then its process dies before recording the decision.
    let id = VolumeId::new("x").unwrap();
    let tx = sb.path("mnt-x");
    rt.block_on(engine.restore(volume("x", &c, publishing(), &tx))).expect("restore x");
    fs::write(tx.join("x"), "x").unwrap();
    rt.block_on(engine.unstage(&id, &tx)).expect("unmount");
    let record = engine.store().volume(&id).unwrap().unwrap();
    let jobcachefs::store::commit::Prepared::Publish(promoted) = engine.store().promote(&id, true).unwrap() else {
        panic!("a changed volume promotes")
    };
    let guard = rt.block_on(FileLock::new(sb.layout()).acquire(&c, Duration::from_secs(5))).unwrap();
    engine.store().advance_head(&record, &promoted).expect("HEAD v2");
    rt.block_on(guard.release()).unwrap();

    // Meanwhile HEAD moves on and is squashed: it no longer names x's layer, v2 still does.
    publish(&engine, &sb, &c, "w", publishing(), |d| fs::write(d.join("w"), "w").unwrap());
    rt.block_on(engine.squash(&c, 1, Box::new(|_| {}))).expect("squash");
    assert!(!sb.store().head(&c).unwrap().unwrap().layers.contains(&promoted.layer));

    // x's retry finds its commit, not a stale base, and drops nothing anyone names.
    let released = rt.block_on(engine.release(&id, true)).expect("retry").expect("volume kept");
    assert!(matches!(released, Released::Committed { version: 2, .. }), "{released:?}");
    assert!(sb.layout().layer_dir(&promoted.layer).is_dir(), "v2's layer is still there");
    rt.block_on(engine.collect(None, None)).unwrap();
    let rolled = rt.block_on(engine.rollback(&c, 2)).expect("rollback to v2");
    assert_eq!(rolled.version, 4);
    assert_eq!(read(&sb, &engine, &c, "check", "x").as_deref(), Some("x"), "v2's content is whole");
}

#[test]
fn a_stacking_volume_never_revives_a_removed_cache_with_a_bare_delta() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let engine = sb.engine();
    let rt = rt();
    let c = key("gone");
    publish(&engine, &sb, &c, "v1", publishing(), |d| fs::write(d.join("base"), "b").unwrap());
    let stack = Policy { on_stale: OnStale::Stack, ..publishing() };
    let t = sb.path("mnt-s");
    rt.block_on(engine.restore(volume("s", &c, stack, &t))).expect("restore");
    fs::write(t.join("delta"), "d").unwrap();
    assert!(rt.block_on(engine.remove_cache(&c)).unwrap(), "the cache is removed while s runs");
    let released = rt.block_on(engine.release(&VolumeId::new("s").unwrap(), true)).unwrap().unwrap();
    assert!(matches!(released, Released::Stale { base: 1, current: 0, other_lifetime: true }), "{released:?}");
    assert!(sb.store().head(&c).unwrap().is_none(), "no version made of a delta without its base");
}
