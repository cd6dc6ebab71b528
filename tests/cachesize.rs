//! Cache sizes: a cache with a size lives in its own image file, so a job that writes past it
//! gets ENOSPC inside the job and the node's disk is untouched; the volume is still released
//! (not published), the next job restores, and crashes leave the image mountable.
//! Needs root and `--features failpoints` (the crash steps).

mod common;
#[path = "common/csi_server.rs"]
mod csi_server;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use csi_server::{inline_publish, inline_unpublish, serve};
use jobcachefs::csi::pb;
use jobcachefs::store::layout::ImageTag;

const MIB: u64 = 1 << 20;

/// Bytes allocated on the host filesystem under `dir`, not counting what is inside mounts
/// (the image's content is counted once, as the image file's blocks).
fn allocated(dir: &Path) -> u64 {
    let dev = fs::symlink_metadata(dir).expect("stat").dev();
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let Ok(m) = fs::symlink_metadata(e.path()) else { continue };
            if m.dev() != dev {
                continue;
            }
            total += m.blocks() * 512;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    total
}

/// A job that tries to write 64 MiB into the cache and reports how it ended.
const FILL: &str = "dd if=/dev/zero of=$JOBCACHE_DIR/big bs=1M count=64 2>&1; echo dd-exit=$?";

#[test]
fn a_job_stops_at_its_cache_size_through_the_cli() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let before = allocated(sb.dir.path());
    let full = sb.cli(&["run", "--cache", "c", "--cache-size", "20Mi", "--", "sh", "-c", FILL]);
    let out = stdout(&full);
    assert!(out.contains("No space left on device"), "the job sees ENOSPC: {out}");
    assert!(!out.contains("dd-exit=0"), "dd fails: {out}");
    assert!(stderr(&full).contains("not published: the job ran into the cache's size"), "{}", stderr(&full));
    assert!(full.status.success(), "the job's own status (the shell's) is what run returns");
    let grown = allocated(sb.dir.path()).saturating_sub(before);
    assert!(grown <= 21 * MIB, "the host grew by {grown} bytes for a 20 MiB cache");
    assert!(sb.mounts().is_empty(), "the released volume and its idle image are unmounted: {:?}", sb.mounts());
    assert!(sb.store().head(&key("c")).unwrap().is_none(), "nothing was published");

    // The next job restores and publishes; the one after sees it.
    let next = sb.cli(&["run", "--cache", "c", "--", "sh", "-c", "echo v1 > $JOBCACHE_DIR/kept"]);
    assert!(stderr(&next).contains("published v1"), "{}", stderr(&next));
    let seen = sb.cli(&["run", "--cache", "c", "--", "sh", "-c", "cat $JOBCACHE_DIR/kept"]);
    assert_eq!(stdout(&seen), "v1\n");
    // The layer lives inside the image: layers/<id> only links to it.
    let head = sb.store().head(&key("c")).unwrap().expect("v1");
    let link = fs::read_link(sb.layout().layer_dir(&head.layers[0])).expect("a link into the image");
    assert!(link.starts_with("../i/"), "{link:?}");
    assert!(sb.mounts().is_empty());
}

#[test]
fn a_bigger_size_grows_the_cache() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let first = sb.cli(&["run", "--cache", "c", "--cache-size", "20Mi", "--", "sh", "-c", "echo a > $JOBCACHE_DIR/a"]);
    assert!(stderr(&first).contains("published v1"), "{}", stderr(&first));
    let write30 = "dd if=/dev/zero of=$JOBCACHE_DIR/big bs=1M count=30 2>&1; echo dd-exit=$?";
    let grown = sb.cli(&["run", "--cache", "c", "--cache-size", "48Mi", "--", "sh", "-c", write30]);
    assert!(stdout(&grown).contains("dd-exit=0"), "30 MiB fit in 48 MiB: {}", stdout(&grown));
    assert!(stderr(&grown).contains("published v2"), "{}", stderr(&grown));
    let record = sb.store().image(&key("c")).unwrap().expect("image");
    assert_eq!(record.size_bytes, 48 * MIB);
    // A smaller size later never shrinks it (nor loses the content).
    let small = sb.cli(&["run", "--cache", "c", "--cache-size", "20Mi", "--", "sh", "-c", "ls $JOBCACHE_DIR"]);
    assert_eq!(stdout(&small), "a\nbig\n");
    assert_eq!(sb.store().image(&key("c")).unwrap().unwrap().size_bytes, 48 * MIB);
    assert!(sb.mounts().is_empty());
}

#[test]
fn bad_cache_sizes_are_refused_and_change_nothing() {
    let sb = Sandbox::new();
    for (size, rule) in [("1Mi", "at least 16Mi"), ("lots", "not a size")] {
        let out = sb.cli(&["run", "--cache", "c", "--cache-size", size, "--", "true"]);
        assert_eq!(out.status.code(), Some(2), "{size}: {}", stderr(&out));
        assert!(stderr(&out).contains("--cache-size") && stderr(&out).contains(rule), "{size}: {}", stderr(&out));
    }
    assert!(!sb.layout().images_dir().exists(), "no image was made");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_stops_at_its_cache_size_through_the_csi_socket() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let dir = sb.path("kubelet");
    let (_server, channel) = serve(&dir, &sb.state, "n1", &["--allow-inline-publish", "ci"], &[]).await;
    let mut node = pb::node_client::NodeClient::new(channel);
    let attrs = [("cacheName", "npm"), ("cacheSize", "20Mi")];
    let target = dir.join("pods/p1/volumes/cache");
    let before = allocated(sb.dir.path());
    inline_publish(&mut node, "csi-full", &target, "ci", "p1", &attrs).await;
    // The pod writes until the cache is full.
    let mut written = 0u64;
    let err = {
        use std::io::Write;
        let mut f = fs::File::create(target.join("big")).expect("create in the volume");
        let chunk = vec![7u8; MIB as usize];
        loop {
            match f.write_all(&chunk).and_then(|()| f.sync_data()) {
                Ok(()) => written += MIB,
                Err(e) => break e,
            }
            assert!(written < 64 * MIB, "a 20 MiB cache took {written} bytes");
        }
    };
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    assert!(written >= 12 * MIB, "the cache held only {written} bytes of its 20 MiB");
    let grown = allocated(sb.dir.path()).saturating_sub(before);
    assert!(grown <= 21 * MIB, "the host grew by {grown} bytes");
    inline_unpublish(&mut node, "csi-full", &target).await;
    let cache = jobcachefs::store::CacheKey::new("ci", "npm").unwrap();
    assert!(sb.store().head(&cache).unwrap().is_none(), "a full cache's change is not published");

    let target2 = dir.join("pods/p2/volumes/cache");
    inline_publish(&mut node, "csi-next", &target2, "ci", "p2", &attrs).await;
    assert!(!target2.join("big").exists(), "the dropped change is gone");
    fs::write(target2.join("package-lock.json"), "{}").unwrap();
    inline_unpublish(&mut node, "csi-next", &target2).await;
    let head = sb.store().head(&cache).unwrap().expect("the next job publishes");
    assert_eq!(head.version, 1);
    let tag = ImageTag::of(&cache);
    let deadline = Instant::now() + Duration::from_secs(5);
    while sb.mounts().iter().any(|m| m.ends_with(tag.as_str())) {
        assert!(Instant::now() < deadline, "the idle image stays mounted: {:?}", sb.mounts());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_crash_while_the_image_is_made_or_mounted_leaves_it_usable() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    for step in ["image.after-mkfs", "image.after-record"] {
        let cache = format!("c-{}", step.replace('.', "-"));
        let out = sb.cli_env(
            &["run", "--cache", &cache, "--cache-size", "20Mi", "--", "sh", "-c", "echo x > $JOBCACHE_DIR/f"],
            &[("JOBCACHEFS_CRASH_AT", step)],
        );
        assert_eq!(out.status.code(), None, "{step}: killed: {}", stderr(&out));
        let again =
            sb.cli(&["run", "--cache", &cache, "--cache-size", "20Mi", "--", "sh", "-c", "echo y > $JOBCACHE_DIR/f"]);
        assert!(stderr(&again).contains("published v1"), "{step}: {}", stderr(&again));
        let seen = sb.cli(&["run", "--cache", &cache, "--", "sh", "-c", "cat $JOBCACHE_DIR/f"]);
        assert_eq!(stdout(&seen), "y\n", "{step}");
    }
    let leftovers: Vec<_> = fs::read_dir(sb.layout().images_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "a retried creation reuses its scratch name: {leftovers:?}");

    // Killed mid-commit with the image's filesystem cut off (no journal flush), as a power cut
    // would: the image mounts again and the cache is whole.
    let mount_point = sb.layout().image_mount(&ImageTag::of(&key("c-image-after-mkfs")));
    let cut = sb.cli_env(
        &["run", "--cache", "c-image-after-mkfs", "--", "sh", "-c", "echo z > $JOBCACHE_DIR/f"],
        &[
            ("JOBCACHEFS_SHUTDOWN_AT", "commit.after-rename"),
            ("JOBCACHEFS_SHUTDOWN_PATH", mount_point.to_str().unwrap()),
        ],
    );
    assert_eq!(cut.status.code(), None, "killed: {}", stderr(&cut));
    // The reboot: everything the dead process left mounted goes.
    let mut mounts = sb.mounts();
    mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for m in mounts {
        nix::mount::umount(&m).unwrap_or_else(|e| panic!("unmount {}: {e}", m.display()));
    }
    let gc = sb.cli(&["cache", "gc"]);
    assert!(gc.status.success(), "{}", stderr(&gc));
    let after = sb.cli(&["run", "--cache", "c-image-after-mkfs", "--", "sh", "-c", "cat $JOBCACHE_DIR/f"]);
    assert!(after.status.success(), "{}", stderr(&after));
    assert_eq!(stdout(&after), "y\n", "the cut-off commit never reached HEAD; v1 is whole");
    assert!(sb.mounts().is_empty(), "{:?}", sb.mounts());
}

#[test]
fn a_fallback_cache_is_read_from_its_own_image() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let main =
        sb.cli(&["run", "--cache", "main", "--cache-size", "20Mi", "--", "sh", "-c", "echo m > $JOBCACHE_DIR/dep"]);
    assert!(stderr(&main).contains("published v1"), "{}", stderr(&main));
    // A pull-request cache with a size of its own starts from main's layers, which stay in
    // main's image; only its own change lands in its image.
    let pr = sb.cli(&[
        "run",
        "--cache",
        "pr-1",
        "--fallback",
        "main",
        "--cache-size",
        "20Mi",
        "--",
        "sh",
        "-c",
        "cat $JOBCACHE_DIR/dep && echo p > $JOBCACHE_DIR/own",
    ]);
    assert_eq!(stdout(&pr), "m\n", "{}", stderr(&pr));
    assert!(stderr(&pr).contains("published v1"), "{}", stderr(&pr));
    let store = sb.store();
    let head = store.head(&key("pr-1")).unwrap().expect("pr-1 v1");
    let images: Vec<_> = head.layers.iter().map(|l| store.layer_image(l)).collect();
    assert_eq!(
        images,
        vec![Some(ImageTag::of(&key("main"))), Some(ImageTag::of(&key("pr-1")))],
        "main's layer below, pr-1's own on top, each in its cache's image"
    );
    assert!(sb.mounts().is_empty(), "both images are unmounted once idle: {:?}", sb.mounts());
    let again = sb.cli(&["run", "--cache", "pr-1", "--", "sh", "-c", "cat $JOBCACHE_DIR/dep $JOBCACHE_DIR/own"]);
    assert_eq!(stdout(&again), "m\np\n", "{}", stderr(&again));
    // gc keeps both images' layers while a HEAD names them.
    let gc = sb.cli(&["cache", "gc", "--json"]);
    assert!(gc.status.success(), "{}", stderr(&gc));
    assert!(store.layer_present(&head.layers[0]) && store.layer_present(&head.layers[1]));
    assert!(sb.mounts().is_empty(), "gc unmounts the images it mounted: {:?}", sb.mounts());
}

#[test]
fn an_evicted_cache_gives_its_image_back() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let out = sb.cli(&["run", "--cache", "old", "--cache-size", "20Mi", "--", "sh", "-c", "echo x > $JOBCACHE_DIR/f"]);
    assert!(stderr(&out).contains("published v1"), "{}", stderr(&out));
    let image = sb.layout().image_file(&ImageTag::of(&key("old")));
    assert!(image.is_file());
    let rm = sb.cli(&["cache", "rm", "old"]);
    assert!(rm.status.success(), "{}", stderr(&rm));
    let gc = sb.cli(&["cache", "gc"]);
    assert!(gc.status.success(), "{}", stderr(&gc));
    assert!(!image.exists(), "the removed cache's image file is deleted");
    assert!(sb.store().image(&key("old")).unwrap().is_none(), "and its record");
    assert!(sb.mounts().is_empty(), "{:?}", sb.mounts());
}

#[test]
fn a_squash_of_a_sized_cache_stays_in_its_image() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let base = "dd if=/dev/urandom of=$JOBCACHE_DIR/base bs=1M count=4 2>/dev/null && echo 0 > $JOBCACHE_DIR/n";
    let first = sb.cli(&["run", "--cache", "c", "--cache-size", "32Mi", "--no-maintenance", "--", "sh", "-c", base]);
    assert!(stderr(&first).contains("published v1"), "{}", stderr(&first));
    for i in 1..=6 {
        let job = format!("echo {i} > $JOBCACHE_DIR/n && echo {i} > $JOBCACHE_DIR/f{i}");
        let out = sb.cli(&["run", "--cache", "c", "--no-maintenance", "--", "sh", "-c", &job]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let store = sb.store();
    let tag = ImageTag::of(&key("c"));
    let look = "cd $JOBCACHE_DIR && cksum < base && cat n && cat f1 f2 f3 f4 f5 f6 | xargs echo";
    let before = stdout(&sb.cli(&["run", "--cache", "c", "--no-maintenance", "--", "sh", "-c", look]));
    assert!(before.ends_with("\n6\n1 2 3 4 5 6\n") && before.lines().count() == 3, "{before}");

    // The merge of the six small layers above the 4 MiB one: hard links inside the image.
    // Bytes on the node's disk beside the image file, which is where a squash must not write.
    let image_file = sb.layout().image_file(&tag);
    let beside = || allocated(sb.dir.path()) - fs::metadata(&image_file).expect("image").blocks() * 512;
    let host = beside();
    let merge = sb.cli(&["cache", "squash", "--max-depth", "3", "c"]);
    assert!(stdout(&merge).contains("squashed 6 layers"), "{}{}", stdout(&merge), stderr(&merge));
    let head = store.head(&key("c")).unwrap().expect("head");
    assert_eq!(head.layers.len(), 2, "the base and the merged layer");
    for layer in &head.layers {
        assert_eq!(store.layer_image(layer), Some(tag.clone()), "every layer still lives in the image");
    }
    let after = stdout(&sb.cli(&["run", "--cache", "c", "--no-maintenance", "--", "sh", "-c", look]));
    assert_eq!(after, before, "the merged stack shows what the deep one did");

    // A flatten copies every byte: into the image, never onto the node's disk beside it.
    let flat = sb.cli(&["cache", "squash", "--flatten", "--max-depth", "1", "c"]);
    assert!(stdout(&flat).contains("squashed 2 layers"), "{}{}", stdout(&flat), stderr(&flat));
    let head = store.head(&key("c")).unwrap().expect("head");
    assert_eq!(head.layers.len(), 1);
    assert_eq!(store.layer_image(&head.layers[0]), Some(tag));
    let grown = beside().saturating_sub(host);
    assert!(grown < 2 * MIB, "the 4 MiB flatten went into the image, beside it the host grew by {grown} bytes");
    let flattened = stdout(&sb.cli(&["run", "--cache", "c", "--no-maintenance", "--", "sh", "-c", look]));
    assert_eq!(flattened, before);
    assert!(sb.mounts().is_empty(), "the squash unmounts the image it mounted: {:?}", sb.mounts());
}
