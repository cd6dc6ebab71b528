//! A squash that merges the layers above a big bottom layer: seen through a real overlay mount,
//! the merged stack shows exactly what the original stack showed, for deletions, re-creations,
//! opaque and replaced directories, symlinks, hard links, xattrs, owners, modes and times; and
//! the merged layer replaces its run in the middle of HEAD only while HEAD still holds it.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::{chown, symlink, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use common::*;
use jobcachefs::lock::FileLock;
use jobcachefs::mount::{MountOptions, Mounter, OverlaySpec, SysMounter};
use jobcachefs::ops::{Engine, Released};
use jobcachefs::store::squash::{SquashMode, SquashOutcome};
use jobcachefs::store::{CacheKey, Policy, Store, VolumeId};

fn publish(engine: &Engine, sb: &Sandbox, cache: &CacheKey, id: &str, policy: Policy, job: impl FnOnce(&Path)) {
    let rt = rt();
    let target = sb.path(&format!("mnt-{id}"));
    rt.block_on(engine.restore(volume(id, cache, policy, &target))).expect("restore");
    job(&target);
    let released = rt.block_on(engine.release(&VolumeId::new(id).unwrap(), true)).expect("release");
    assert!(matches!(released, Some(Released::Committed { .. })), "{id}: {released:?}");
}

/// An engine whose caches keep one version: what a squash replaces is then garbage at once.
fn engine_keeping_one(sb: &Sandbox) -> Engine {
    let layout = sb.layout();
    Engine::new(
        Store::open(layout.clone()).unwrap().with_keep_versions(1),
        Arc::new(SysMounter),
        Arc::new(FileLock::new(layout)),
        Duration::from_secs(10),
    )
}

fn set_mtime(path: &Path, secs: u64) {
    let when = UNIX_EPOCH + Duration::from_secs(secs);
    fs::File::options().write(true).open(path).unwrap().set_modified(when).unwrap();
}

/// What a user sees of one entry through the mount.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    kind: &'static str,
    mode: u32,
    owner: (u32, u32),
    mtime: (i64, i64),
    content: Vec<u8>,
    xattrs: BTreeMap<String, Vec<u8>>,
}

/// Every entry below `root` (the root included), and the groups of names that share an inode.
fn view(root: &Path) -> (BTreeMap<String, Seen>, BTreeSet<Vec<String>>) {
    let mut seen = BTreeMap::new();
    let mut inodes: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    let mut todo = vec![PathBuf::new()];
    while let Some(rel) = todo.pop() {
        let path = root.join(&rel);
        let m = fs::symlink_metadata(&path).unwrap();
        let ft = m.file_type();
        let (kind, content) = if ft.is_dir() {
            for e in fs::read_dir(&path).unwrap() {
                todo.push(rel.join(e.unwrap().file_name()));
            }
            ("dir", Vec::new())
        } else if ft.is_symlink() {
            ("symlink", fs::read_link(&path).unwrap().into_os_string().into_encoded_bytes())
        } else if ft.is_file() {
            ("file", fs::read(&path).unwrap())
        } else if ft.is_char_device() {
            ("char", m.rdev().to_le_bytes().to_vec())
        } else {
            ("other", Vec::new())
        };
        let name = rel.to_string_lossy().into_owned();
        if !ft.is_dir() {
            inodes.entry(m.ino()).or_default().push(name.clone());
        }
        let xattrs = xattr::list(&path)
            .unwrap()
            .filter(|n| n.to_string_lossy().starts_with("user."))
            .map(|n| (n.to_string_lossy().into_owned(), xattr::get(&path, &n).unwrap().unwrap()))
            .collect();
        let entry = Seen {
            kind,
            mode: m.mode() & 0o7777,
            owner: (m.uid(), m.gid()),
            mtime: (m.mtime(), m.mtime_nsec()),
            content,
            xattrs,
        };
        seen.insert(name, entry);
    }
    let links = inodes
        .into_values()
        .filter(|names| names.len() > 1)
        .map(|mut names| {
            names.sort();
            names
        })
        .collect();
    (seen, links)
}

/// The cache's HEAD as a read-only overlay of its layers, seen and unmounted again.
fn head_view(sb: &Sandbox, cache: &CacheKey, tag: &str) -> (BTreeMap<String, Seen>, BTreeSet<Vec<String>>) {
    let head = sb.store().head(cache).unwrap().unwrap();
    let mut lower: Vec<PathBuf> = head.layers.iter().rev().map(|l| sb.layout().layer_dir(l)).collect();
    // A mount without an upper needs two lower layers.
    let empty = sb.path(&format!("empty-{tag}"));
    lower.push(empty);
    let target = sb.path(&format!("view-{tag}"));
    let spec = OverlaySpec { readonly: true, lower, upper: None, flags: MountOptions::NONE };
    SysMounter.overlay(&spec, &target).expect("mount the view");
    let seen = view(&target);
    SysMounter.unmount(&target).expect("unmount the view");
    seen
}

fn assert_same_view(
    before: &(BTreeMap<String, Seen>, BTreeSet<Vec<String>>),
    after: &(BTreeMap<String, Seen>, BTreeSet<Vec<String>>),
    what: &str,
) {
    let names = |v: &BTreeMap<String, Seen>| v.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(&after.0), names(&before.0), "{what}: the same names");
    for (name, seen) in &before.0 {
        assert_eq!(&after.0[name], seen, "{what}: {name:?}");
    }
    assert_eq!(after.1, before.1, "{what}: the same hard links");
}

fn is_whiteout(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_char_device() && m.rdev() == 0)
}

fn opaque(path: &Path) -> bool {
    xattr::get(path, "trusted.overlay.opaque").unwrap().as_deref() == Some(&b"y"[..])
}

/// Six versions over a 2 MiB first one, each changing the tree the way builds do.
fn seed(engine: &Engine, sb: &Sandbox, c: &CacheKey) {
    publish(engine, sb, c, "v1", publishing(), |d| {
        fs::write(d.join("big.bin"), vec![7u8; 2 << 20]).unwrap();
        fs::write(d.join("del3.txt"), "bottom").unwrap();
        fs::write(d.join("gone.txt"), "gone").unwrap();
        fs::create_dir_all(d.join("opq/sub")).unwrap();
        fs::write(d.join("opq/a"), "a").unwrap();
        fs::write(d.join("opq/sub/b"), "b").unwrap();
        fs::create_dir_all(d.join("dir2file/y")).unwrap();
        fs::write(d.join("dir2file/y/z"), "z").unwrap();
        fs::write(d.join("file2dir"), "f").unwrap();
        fs::create_dir_all(d.join("keep/deep")).unwrap();
        fs::write(d.join("keep/deep/file"), "k").unwrap();
        xattr::set(d.join("keep/deep/file"), "user.tag", b"one").unwrap();
        chown(d.join("keep/deep/file"), Some(1234), Some(5678)).unwrap();
        fs::set_permissions(d.join("keep/deep/file"), fs::Permissions::from_mode(0o640)).unwrap();
        set_mtime(&d.join("keep/deep/file"), 1_500_000_000);
        symlink("keep/deep/file", d.join("link")).unwrap();
        fs::write(d.join("h1"), "shared").unwrap();
        fs::hard_link(d.join("h1"), d.join("keep/h2")).unwrap();
        fs::create_dir(d.join("merged")).unwrap();
        fs::write(d.join("merged/one"), "1").unwrap();
    });
    publish(engine, sb, c, "v2", publishing(), |d| {
        fs::write(d.join("merged/two"), "2").unwrap();
        fs::set_permissions(d.join("merged"), fs::Permissions::from_mode(0o750)).unwrap();
        fs::write(d.join("n2"), "n2").unwrap();
    });
    publish(engine, sb, c, "v3", publishing(), |d| {
        fs::remove_file(d.join("del3.txt")).unwrap();
        fs::remove_file(d.join("gone.txt")).unwrap();
        fs::remove_dir_all(d.join("opq")).unwrap();
        fs::create_dir(d.join("opq")).unwrap();
        fs::write(d.join("opq/new"), "n").unwrap();
        xattr::set(d.join("keep/deep/file"), "user.more", b"two").unwrap();
    });
    publish(engine, sb, c, "v4", publishing(), |d| {
        fs::remove_dir_all(d.join("dir2file")).unwrap();
        fs::write(d.join("dir2file"), "now a file").unwrap();
        fs::remove_file(d.join("file2dir")).unwrap();
        fs::create_dir(d.join("file2dir")).unwrap();
        fs::write(d.join("file2dir/inner"), "i").unwrap();
        fs::remove_file(d.join("link")).unwrap();
        symlink("../elsewhere", d.join("link")).unwrap();
    });
    publish(engine, sb, c, "v5", publishing(), |d| {
        fs::write(d.join("del3.txt"), "again").unwrap();
        fs::write(d.join("h3"), "pair").unwrap();
        fs::hard_link(d.join("h3"), d.join("keep/h4")).unwrap();
        set_mtime(&d.join("merged/two"), 1_400_000_000);
        chown(d.join("n2"), Some(1000), Some(1000)).unwrap();
        fs::set_permissions(d.join("n2"), fs::Permissions::from_mode(0o600)).unwrap();
    });
    publish(engine, sb, c, "v6", publishing(), |d| {
        fs::write(d.join("merged/three"), "3").unwrap();
        fs::remove_file(d.join("merged/one")).unwrap();
    });
}

#[test]
fn a_merged_run_shows_through_overlay_exactly_what_the_stack_showed() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let engine = engine_keeping_one(&sb);
    let c = key("merge");
    seed(&engine, &sb, &c);
    let before = head_view(&sb, &c, "before");
    let original = sb.store().head(&c).unwrap().unwrap();
    assert_eq!(original.layers.len(), 6);

    let out = rt().block_on(engine.squash(&c, 3, Box::new(|_| {}))).unwrap();
    assert_eq!(out, SquashOutcome::Squashed { version: 6, replaced: 5, depth: 2 }, "the five small layers merged");
    let head = sb.store().head(&c).unwrap().unwrap();
    assert_eq!(head.layers[0], original.layers[0], "the big bottom layer is kept as it is");
    let merged = sb.layout().layer_dir(&head.layers[1]);
    assert!(is_whiteout(&merged.join("gone.txt")), "a deletion of a bottom file stays a whiteout");
    assert!(!is_whiteout(&merged.join("del3.txt")), "re-created above its whiteout");
    assert!(opaque(&merged.join("opq")), "an opaque directory stays opaque");
    assert!(opaque(&merged.join("file2dir")), "a directory over a deleted file hides the bottom's file");
    assert!(!opaque(&merged.join("merged")) && !opaque(&merged.join("keep")), "merged directories stay open");
    assert!(!merged.join("big.bin").exists(), "the bottom layer's bytes are not copied");
    assert_same_view(&before, &head_view(&sb, &c, "after"), "after the merge");

    // Once gc has taken the replaced layers, the merged layer still holds every inode it needs.
    rt().block_on(engine.collect(None, None)).unwrap();
    for layer in &original.layers[1..] {
        assert!(!sb.layout().layer_dir(layer).exists(), "{layer} collected");
    }
    assert_same_view(&before, &head_view(&sb, &c, "after-gc"), "after gc");

    // A second round merges the merged layer (whiteouts, opaque directories) with newer ones.
    publish(&engine, &sb, &c, "v7", publishing(), |d| {
        fs::remove_file(d.join("del3.txt")).unwrap();
        fs::create_dir(d.join("opq/x")).unwrap();
        fs::remove_dir_all(d.join("file2dir")).unwrap();
    });
    publish(&engine, &sb, &c, "v8", publishing(), |d| {
        fs::write(d.join("file2dir"), "a file again").unwrap();
        fs::write(d.join("keep/h2"), "unshared").unwrap();
    });
    let before = head_view(&sb, &c, "before-2");
    let out = rt().block_on(engine.squash(&c, 3, Box::new(|_| {}))).unwrap();
    assert_eq!(out, SquashOutcome::Squashed { version: 8, replaced: 3, depth: 2 });
    rt().block_on(engine.collect(None, None)).unwrap();
    assert_same_view(&before, &head_view(&sb, &c, "after-2"), "after the second merge");
    let merged = sb.layout().layer_dir(&sb.store().head(&c).unwrap().unwrap().layers[1]);
    assert!(is_whiteout(&merged.join("del3.txt")) && is_whiteout(&merged.join("gone.txt")));

    // A flatten of the same stack shows the same, in one layer without overlay markers.
    let out = rt().block_on(engine.squash_with(&c, 1, SquashMode::Flatten, Box::new(|_| {}))).unwrap();
    assert_eq!(out, SquashOutcome::Squashed { version: 8, replaced: 2, depth: 1 });
    assert_same_view(&before, &head_view(&sb, &c, "flat"), "after a flatten");
}

#[test]
fn a_stack_that_hides_much_of_its_bottom_layer_is_flattened() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let engine = sb.engine();
    let c = key("hidden");
    publish(&engine, &sb, &c, "v1", publishing(), |d| {
        fs::write(d.join("old.bin"), vec![1u8; 1 << 20]).unwrap();
        fs::write(d.join("kept.bin"), vec![2u8; 2 << 20]).unwrap();
    });
    // A third of the bottom layer's bytes deleted: a merge would keep them on disk.
    publish(&engine, &sb, &c, "v2", publishing(), |d| fs::remove_file(d.join("old.bin")).unwrap());
    for i in 3..=4 {
        publish(&engine, &sb, &c, &format!("v{i}"), publishing(), |d| fs::write(d.join(format!("f{i}")), "x").unwrap());
    }
    let before = head_view(&sb, &c, "before");
    let out = rt().block_on(engine.squash(&c, 3, Box::new(|_| {}))).unwrap();
    assert_eq!(out, SquashOutcome::Squashed { version: 4, replaced: 4, depth: 1 });
    assert_same_view(&before, &head_view(&sb, &c, "after"), "after the flatten");
}

#[test]
fn a_merged_run_replaces_its_place_in_head_only_while_head_holds_it() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let engine = sb.engine();
    let c = key("moving");
    publish(&engine, &sb, &c, "v1", publishing(), |d| fs::write(d.join("big"), vec![0u8; 1 << 20]).unwrap());
    for i in 2..=4 {
        publish(&engine, &sb, &c, &format!("v{i}"), publishing(), |d| fs::write(d.join(format!("f{i}")), "x").unwrap());
    }
    let store = sb.store();
    let build = |run: usize| {
        let plan = store.squash_plan(&c, 2, SquashMode::Auto).unwrap().expect("a plan");
        assert!(plan.view.is_none(), "a merge: {plan:?}");
        assert_eq!((plan.at, plan.run.len()), (1, run));
        let stats = store.squash_copy(&plan, &mut |_| {}).unwrap();
        store.squash_record(plan, stats).unwrap()
    };

    // A publish lands while the merge is built: the merge replaces its run below the new layer.
    let squashed = build(3);
    publish(&engine, &sb, &c, "v5", publishing(), |d| fs::write(d.join("f5"), "x").unwrap());
    let before = sb.store().head(&c).unwrap().unwrap();
    let new = squashed.layer.clone();
    assert_eq!(store.squash_finish(squashed).unwrap(), SquashOutcome::Squashed { version: 5, replaced: 3, depth: 3 });
    let head = sb.store().head(&c).unwrap().unwrap();
    assert_eq!(head.layers, vec![before.layers[0].clone(), new, before.layers[4].clone()]);
    assert_eq!(sb.store().versions(&c).unwrap()[0].layers, head.layers, "the kept version follows HEAD");

    // A fresh start replaces the layers while the merge is built: it is dropped.
    for i in 6..=7 {
        publish(&engine, &sb, &c, &format!("v{i}"), publishing(), |d| fs::write(d.join(format!("f{i}")), "x").unwrap());
    }
    let squashed = build(4);
    let dropped = sb.layout().layer_dir(&squashed.layer);
    let fresh = Policy { publish: true, fresh: true, ..Policy::default() };
    publish(&engine, &sb, &c, "v8", fresh, |d| fs::write(d.join("only"), "x").unwrap());
    assert_eq!(store.squash_finish(squashed).unwrap(), SquashOutcome::Lost);
    assert!(!dropped.exists(), "the lost merge's layer is removed");
    assert_eq!(sb.store().head(&c).unwrap().unwrap().layers.len(), 1);
}
