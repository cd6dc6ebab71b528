//! A full disk (ENOSPC) under the state dir: a job that fills it, a HEAD write that cannot
//! land, a squash whose flat copy does not fit, and a driver that keeps serving through it.
//!
//! Each case runs on a size-limited tmpfs and, where `mkfs.ext4` and loop devices exist, on a
//! loop-mounted ext4 image (`-m 0`, so root gets no reserved blocks). What is asserted is what
//! a user sees: error text, HEAD versions and bytes, files in a later mount, and no debris.

mod common;

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use jobcachefs::csi::pb;
use jobcachefs::lock::{FileLock, PublishLock};
use jobcachefs::ops::Released;
use jobcachefs::store::commit::Prepared;
use jobcachefs::store::{CacheKey, Policy, VolumeId};
use pb::controller_client::ControllerClient;
use pb::identity_client::IdentityClient;
use pb::node_client::NodeClient;
use tonic::transport::Channel;

#[path = "common/csi_server.rs"]
mod csi_server;

/// What a release says when a full disk made it drop the change.
const FULL_DROPPED: &str = "not published: the cache's filesystem is full";
const MIB: u64 = 1024 * 1024;
const NO_SPACE: &str = "No space left on device";

#[derive(Debug, Clone, Copy)]
enum Fs {
    Tmpfs,
    Ext4,
}

/// The filesystems a case runs on: tmpfs always, ext4 when this machine can make one.
fn filesystems() -> Vec<Fs> {
    let mkfs = Command::new("mkfs.ext4").arg("-V").output().is_ok_and(|o| o.status.success());
    if mkfs && Path::new("/dev/loop-control").exists() {
        vec![Fs::Tmpfs, Fs::Ext4]
    } else {
        eprintln!("no mkfs.ext4 or loop devices: ext4 cases skipped, tmpfs only");
        vec![Fs::Tmpfs]
    }
}

/// A sandbox whose state dir is a `mib`-sized filesystem of kind `fs`. The sandbox's guard
/// unmounts it (a loop mount made by mount(8) frees its loop device on unmount).
fn small_sandbox(fs: Fs, mib: u64) -> Sandbox {
    let sb = Sandbox::new();
    fs::create_dir_all(&sb.state).expect("state dir");
    match fs {
        Fs::Tmpfs => {
            let size = format!("size={mib}m");
            nix::mount::mount(
                Some("tmpfs"),
                &sb.state,
                Some("tmpfs"),
                nix::mount::MsFlags::empty(),
                Some(size.as_str()),
            )
            .expect("mount tmpfs on the state dir");
        }
        Fs::Ext4 => {
            let image = sb.dir.path().join("state.img");
            File::create(&image).and_then(|f| f.set_len(mib * MIB)).expect("image file");
            let out = Command::new("mkfs.ext4").args(["-q", "-F", "-m", "0"]).arg(&image).output().expect("mkfs.ext4");
            assert!(out.status.success(), "mkfs.ext4: {}", String::from_utf8_lossy(&out.stderr));
            let out = Command::new("mount")
                .args(["-t", "ext4", "-o", "loop"])
                .arg(&image)
                .arg(&sb.state)
                .output()
                .expect("mount");
            assert!(out.status.success(), "mount -o loop: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    sb
}

/// Bytes an unprivileged writer could still put on the filesystem holding `path`.
fn free_bytes(path: &Path) -> u64 {
    let st = nix::sys::statvfs::statvfs(path).expect("statvfs");
    st.blocks_available() as u64 * st.fragment_size() as u64
}

/// Appends `chunk`-sized writes to `file` until the filesystem refuses with ENOSPC; returns
/// what was written.
fn write_until_full(file: &mut File, chunk: usize) -> u64 {
    let buf = vec![0xa5u8; chunk];
    let mut written = 0u64;
    loop {
        match file.write(&buf) {
            Ok(0) => return written,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return written,
            Err(e) => panic!("filling the disk: {e}"),
        }
    }
}

/// What a job does that writes more than fits: writes until a write fails with ENOSPC even
/// after a sync (ext4 hands back over-reserved blocks once data is on disk). Returns the bytes
/// written, all 0xa5.
fn job_fills_the_disk(file: &mut File) -> u64 {
    let mut written = 0;
    for _ in 0..8 {
        written += write_until_full(file, 256 * 1024);
        written += write_until_full(file, 512);
        let _ = file.sync_all();
        match file.write(&[0xa5u8; 512]) {
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return written,
            Err(e) => panic!("the job's write: {e}"),
            Ok(n) => written += n as u64,
        }
    }
    panic!("the disk never filled up: {written} bytes written");
}

/// Fills the filesystem under `path` completely with a filler file at `path`.
fn fill(path: &Path) {
    let mut f = File::create(path).expect("filler");
    for _ in 0..4 {
        write_until_full(&mut f, 64 * 1024);
        write_until_full(&mut f, 512);
        // ext4 gives back what delayed allocation over-reserved once the data is on disk.
        let _ = f.sync_all();
        if free_bytes(path.parent().expect("parent")) == 0 {
            break;
        }
    }
}

/// Makes a filler file that leaves about `leave` bytes free on the filesystem of `dir`.
fn fill_leaving(dir: &Path, leave: u64) -> PathBuf {
    let path = dir.join("filler");
    let free = free_bytes(dir);
    assert!(free > leave, "the filesystem has {free} bytes free, less than the {leave} to leave");
    let mut f = File::create(&path).expect("filler");
    let block = vec![0x5au8; MIB as usize];
    let mut left = free - leave;
    while left > 0 {
        let n = left.min(MIB) as usize;
        f.write_all(&block[..n]).expect("write filler");
        left -= n as u64;
    }
    f.sync_all().expect("sync filler");
    path
}

/// A deterministic, incompressible-looking payload for file `n`.
fn payload(n: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u32).wrapping_mul(2654435761).rotate_left(n as u32 % 31) as u8 ^ n).collect()
}

fn head_bytes(sb: &Sandbox, cache: &CacheKey) -> Option<Vec<u8>> {
    fs::read(sb.layout().head_path(cache)).ok()
}

fn head_version(sb: &Sandbox, cache: &CacheKey) -> u64 {
    sb.store().head(cache).expect("HEAD parses").map_or(0, |h| h.version)
}

/// Temp files of atomic writes left next to a cache's head.json.
fn head_temp_files(sb: &Sandbox, cache: &CacheKey) -> Vec<String> {
    fs::read_dir(sb.layout().cache_dir(cache))
        .map(|d| {
            d.map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(".head.json.") && n.ends_with(".tmp"))
                .collect()
        })
        .unwrap_or_default()
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// `jobcachefs mount --cache NAME PATH`, asserted to succeed.
fn cli_mount(sb: &Sandbox, cache: &str, path: &Path, extra: &[&str]) -> String {
    let mut args = vec!["mount", "--cache", cache];
    args.extend_from_slice(extra);
    args.push(path.to_str().expect("utf-8"));
    let out = sb.cli(&args);
    assert!(out.status.success(), "mount --cache {cache}: {}", stderr(&out));
    stdout(&out)
}

/// Reads every file of the cache's HEAD through a fresh, non-publishing mount.
fn files_in_later_mount(sb: &Sandbox, cache: &str, what: &str) -> Vec<(String, Vec<u8>)> {
    let path = sb.dir.path().join(format!("check-{what}"));
    fs::create_dir_all(&path).expect("mkdir");
    cli_mount(sb, cache, &path, &["--no-publish"]);
    let files = names_in(&path)
        .into_iter()
        .map(|n| {
            let body = fs::read(path.join(&n)).unwrap_or_else(|e| panic!("{what}: read {n}: {e}"));
            (n, body)
        })
        .collect();
    let out = sb.cli(&["release", path.to_str().expect("utf-8")]);
    assert!(out.status.success(), "{what}: release of the read-only check: {}", stderr(&out));
    files
}

// ---------------------------------------------------------------------------------------------
// (a) the job itself fills the disk, then commits
// ---------------------------------------------------------------------------------------------

#[test]
fn a_job_that_fills_the_disk_commits_what_fit_or_fails_clearly() {
    if !can_mount() {
        return;
    }
    for fs_kind in filesystems() {
        let sb = small_sandbox(fs_kind, 16);
        let c = key("fill");
        let seed = sb.dir.path().join("seed");
        fs::create_dir_all(&seed).unwrap();
        cli_mount(&sb, "fill", &seed, &[]);
        fs::write(seed.join("v1.txt"), "one").unwrap();
        let out = sb.cli(&["release", seed.to_str().unwrap()]);
        assert!(stdout(&out).contains("published v1"), "{fs_kind:?}: {}{}", stdout(&out), stderr(&out));
        let v1_head = head_bytes(&sb, &c).expect("v1 HEAD");

        // The job writes a few small files, then one that runs into the end of the disk.
        let job = sb.dir.path().join("job");
        fs::create_dir_all(&job).unwrap();
        cli_mount(&sb, "fill", &job, &[]);
        for i in 0..3 {
            fs::write(job.join(format!("small-{i}")), format!("small {i}")).unwrap();
        }
        let mut big = File::create(job.join("big.bin")).expect("create in the job's mount");
        let written = job_fills_the_disk(&mut big);
        drop(big);
        assert!(written > 4 * MIB, "{fs_kind:?}: the job wrote {written} bytes before the disk was full");

        let out = sb.cli(&["release", job.to_str().unwrap()]);
        let (so, se) = (stdout(&out), stderr(&out));
        eprintln!("{fs_kind:?}: release after the job filled the disk: ok={} {so}{se}", out.status.success());
        if out.status.success() {
            // Either what fit was published, or the change was dropped so the job can go.
            assert!(so.contains("published v2") || so.contains(FULL_DROPPED), "{fs_kind:?}: {so}");
            if so.contains(FULL_DROPPED) {
                assert_eq!(head_bytes(&sb, &c).as_deref(), Some(&v1_head[..]), "{fs_kind:?}: HEAD untouched");
                assert!(head_temp_files(&sb, &c).is_empty(), "{fs_kind:?}: {:?}", head_temp_files(&sb, &c));
            }
        } else {
            assert!(se.contains(NO_SPACE), "{fs_kind:?}: a failed commit says the disk is full: {se}");
            assert_eq!(head_bytes(&sb, &c).as_deref(), Some(&v1_head[..]), "{fs_kind:?}: HEAD untouched");
            assert!(head_temp_files(&sb, &c).is_empty(), "{fs_kind:?}: {:?}", head_temp_files(&sb, &c));
            // The user's way out: retry; if the disk is still full of this very job, drop it.
            let retry = sb.cli(&["release", job.to_str().unwrap()]);
            eprintln!(
                "{fs_kind:?}: retried release: ok={} {}{}",
                retry.status.success(),
                stdout(&retry),
                stderr(&retry)
            );
            if !retry.status.success() {
                assert!(stderr(&retry).contains(NO_SPACE), "{fs_kind:?}: {}", stderr(&retry));
                let drop = sb.cli(&["release", "--no-publish", job.to_str().unwrap()]);
                assert!(drop.status.success(), "{fs_kind:?}: --no-publish frees a full disk: {}", stderr(&drop));
            }
        }
        assert!(sb.mounts().iter().all(|m| m == &sb.state), "{fs_kind:?}: job unmounted: {:?}", sb.mounts());

        // HEAD is a whole version, old or new, and a later mount shows exactly that version.
        let version = head_version(&sb, &c);
        let files = files_in_later_mount(&sb, "fill", "after-full-job");
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        match version {
            1 => assert_eq!(names, ["v1.txt"], "{fs_kind:?}"),
            2 => {
                assert_eq!(names, ["big.bin", "small-0", "small-1", "small-2", "v1.txt"], "{fs_kind:?}");
                let big = &files[0].1;
                assert_eq!(big.len() as u64, written, "{fs_kind:?}: what fit is what was published");
                assert!(big.iter().all(|b| *b == 0xa5), "{fs_kind:?}: published bytes are the job's");
            }
            v => panic!("{fs_kind:?}: HEAD is v{v}, neither the old nor the new version"),
        }

        // With the space back, the cache works as ever.
        let gc = sb.cli(&["cache", "gc"]);
        assert!(gc.status.success(), "{fs_kind:?}: {}", stderr(&gc));
        let next = sb.dir.path().join("next");
        fs::create_dir_all(&next).unwrap();
        cli_mount(&sb, "fill", &next, &[]);
        fs::write(next.join("after.txt"), "after").unwrap();
        let out = sb.cli(&["release", next.to_str().unwrap()]);
        assert!(
            stdout(&out).contains(&format!("published v{}", version + 1)),
            "{fs_kind:?}: {}{}",
            stdout(&out),
            stderr(&out)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// (b) the HEAD write itself hits ENOSPC
// ---------------------------------------------------------------------------------------------

#[test]
fn enospc_at_the_head_write_leaves_head_whole_and_a_retry_publishes() {
    if !can_mount() {
        return;
    }
    for fs_kind in filesystems() {
        let sb = small_sandbox(fs_kind, 16);
        let engine = sb.engine();
        let rt = rt();
        let c = key("headfull");

        let t1 = sb.path("mnt-v1");
        rt.block_on(engine.restore(volume("v1", &c, publishing(), &t1))).expect("restore v1");
        fs::write(t1.join("one.txt"), "one").unwrap();
        let r = rt.block_on(engine.release(&VolumeId::new("v1").unwrap(), true)).unwrap().unwrap();
        assert!(matches!(r, Released::Committed { version: 1, .. }), "{r:?}");
        let before = head_bytes(&sb, &c).expect("v1 HEAD");

        // Step by step: the job's upper becomes a layer while there is room...
        let id = VolumeId::new("v2").unwrap();
        let t2 = sb.path("mnt-v2");
        rt.block_on(engine.restore(volume("v2", &c, publishing(), &t2))).expect("restore v2");
        fs::write(t2.join("two.txt"), "two").unwrap();
        rt.block_on(engine.unstage(&id, &t2)).expect("unmount");
        let record = engine.store().volume(&id).unwrap().expect("volume v2");
        let Prepared::Publish(promoted) = engine.store().promote(&id, true).expect("promote") else {
            panic!("{fs_kind:?}: a changed volume promotes");
        };
        // ...then the disk fills up before HEAD is written.
        let filler = sb.state.join("filler");
        fill(&filler);
        let lock = FileLock::new(sb.layout());
        let guard = rt.block_on(lock.acquire(&c, Duration::from_secs(5))).expect("lock");
        let err = engine.store().advance_head(&record, &promoted).expect_err("no room for the new HEAD");
        rt.block_on(guard.release()).expect("unlock");
        assert!(err.to_string().contains(NO_SPACE), "{fs_kind:?}: the error says the disk is full: {err}");
        // The version record goes down first (before HEAD names the version): the error names it.
        assert!(
            err.to_string().contains("caches/default/headfull/versions/"),
            "{fs_kind:?}: the error names the file: {err}"
        );
        assert_eq!(head_bytes(&sb, &c).as_deref(), Some(&before[..]), "{fs_kind:?}: HEAD untouched");
        assert!(head_temp_files(&sb, &c).is_empty(), "{fs_kind:?}: {:?}", head_temp_files(&sb, &c));

        // The whole release, retried on the full disk, fails the same way and keeps the change...
        let err = rt.block_on(engine.release(&id, true)).expect_err("still no room");
        assert!(err.to_string().contains(NO_SPACE), "{fs_kind:?}: {err}");
        assert_eq!(head_bytes(&sb, &c).as_deref(), Some(&before[..]), "{fs_kind:?}: HEAD untouched");
        assert!(head_temp_files(&sb, &c).is_empty(), "{fs_kind:?}: {:?}", head_temp_files(&sb, &c));
        // ...and, with space freed, publishes it.
        fs::remove_file(&filler).unwrap();
        let r = rt.block_on(engine.release(&id, true)).expect("retry with space").expect("volume kept");
        assert!(matches!(r, Released::Committed { version: 2, depth: 2, .. }), "{fs_kind:?}: {r:?}");
        let t3 = sb.path("mnt-check");
        rt.block_on(engine.restore(volume("check", &c, Policy::default(), &t3))).expect("restore v2");
        assert_eq!(names_in(&t3), ["one.txt", "two.txt"], "{fs_kind:?}");
        assert_eq!(fs::read_to_string(t3.join("two.txt")).unwrap(), "two");
        rt.block_on(engine.release(&VolumeId::new("check").unwrap(), true)).unwrap();

        // The same through the command line: a full disk at release time, then a retry.
        let job = sb.path("job");
        cli_mount(&sb, "headfull", &job, &[]);
        fs::write(job.join("three.txt"), "three").unwrap();
        let before = head_bytes(&sb, &c).expect("v2 HEAD");
        fill(&filler);
        let out = sb.cli(&["release", job.to_str().unwrap()]);
        // A full disk at promote time: the job is let go, its change dropped, and it says so.
        assert!(out.status.success(), "{fs_kind:?}: release on a full disk: {}", stderr(&out));
        assert!(stdout(&out).contains(FULL_DROPPED), "{fs_kind:?}: {}", stdout(&out));
        assert_eq!(head_bytes(&sb, &c).as_deref(), Some(&before[..]), "{fs_kind:?}: HEAD untouched");
        assert!(head_temp_files(&sb, &c).is_empty(), "{fs_kind:?}: {:?}", head_temp_files(&sb, &c));
        fs::remove_file(&filler).unwrap();
        // With space back, the next job publishes.
        cli_mount(&sb, "headfull", &job, &[]);
        fs::write(job.join("three.txt"), "three").unwrap();
        let out = sb.cli(&["release", job.to_str().unwrap()]);
        assert!(
            out.status.success() && stdout(&out).contains("published v3"),
            "{fs_kind:?}: the retried release publishes: {}{}",
            stdout(&out),
            stderr(&out)
        );
        let files = files_in_later_mount(&sb, "headfull", "after-retry");
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["one.txt", "three.txt", "two.txt"], "{fs_kind:?}");
        assert!(sb.mounts().iter().all(|m| m == &sb.state), "{fs_kind:?}: {:?}", sb.mounts());
    }
}

// ---------------------------------------------------------------------------------------------
// (c) the squash's flat copy does not fit
// ---------------------------------------------------------------------------------------------

#[test]
fn a_squash_that_does_not_fit_fails_clearly_and_leaves_the_cache_whole() {
    if !can_mount() {
        return;
    }
    const LAYER: usize = 3 * MIB as usize;
    for fs_kind in filesystems() {
        let sb = small_sandbox(fs_kind, 32);
        let c = key("deep");
        for n in 0..4u8 {
            let job = sb.dir.path().join(format!("job-{n}"));
            fs::create_dir_all(&job).unwrap();
            cli_mount(&sb, "deep", &job, &[]);
            fs::write(job.join(format!("part-{n}.bin")), payload(n, LAYER)).unwrap();
            let out = sb.cli(&["release", job.to_str().unwrap()]);
            assert!(stdout(&out).contains(&format!("published v{}", n + 1)), "{fs_kind:?}: {}", stderr(&out));
        }
        let before = head_bytes(&sb, &c).expect("HEAD");
        // Room for two of the four parts: the flat copy of 12 MiB cannot fit.
        let filler = fill_leaving(&sb.state, 2 * LAYER as u64);
        let free_before = free_bytes(&sb.state);

        let out = sb.cli(&["cache", "squash", "deep", "--max-depth", "1"]);
        assert!(!out.status.success(), "{fs_kind:?}: squash cannot fit: {}", stdout(&out));
        assert!(stderr(&out).contains(NO_SPACE), "{fs_kind:?}: the error says the disk is full: {}", stderr(&out));
        assert_eq!(head_bytes(&sb, &c).as_deref(), Some(&before[..]), "{fs_kind:?}: HEAD unchanged");
        assert!(head_temp_files(&sb, &c).is_empty(), "{fs_kind:?}");
        assert!(
            sb.mounts().iter().all(|m| m == &sb.state),
            "{fs_kind:?}: the squash view is unmounted: {:?}",
            sb.mounts()
        );

        let gc = sb.cli(&["cache", "gc"]);
        assert!(gc.status.success(), "{fs_kind:?}: gc on a full disk: {}", stderr(&gc));
        assert_eq!(names_in(&sb.layout().tmp_dir()), Vec::<String>::new(), "{fs_kind:?}: squash scratch reclaimed");
        let debris: Vec<String> =
            names_in(&sb.layout().layers_dir()).into_iter().filter(|n| n.starts_with('.')).collect();
        assert!(debris.is_empty(), "{fs_kind:?}: no partial flat copy left in layers/: {debris:?}");
        let free_after = free_bytes(&sb.state);
        assert!(
            free_after + 256 * 1024 >= free_before,
            "{fs_kind:?}: the space the squash took is back: {free_before} before, {free_after} after gc"
        );
        assert_eq!(head_bytes(&sb, &c).as_deref(), Some(&before[..]), "{fs_kind:?}: HEAD unchanged");

        // The cache still mounts with all its content.
        let files = files_in_later_mount(&sb, "deep", "after-failed-squash");
        assert_eq!(files.len(), 4, "{fs_kind:?}: {:?}", files.iter().map(|f| &f.0).collect::<Vec<_>>());
        for (n, (name, body)) in files.iter().enumerate() {
            assert_eq!(name, &format!("part-{n}.bin"));
            assert!(body == &payload(n as u8, LAYER), "{fs_kind:?}: {name} intact");
        }

        // With room, the squash goes through and keeps the content.
        fs::remove_file(&filler).unwrap();
        let out = sb.cli(&["cache", "squash", "deep", "--max-depth", "1"]);
        assert!(out.status.success(), "{fs_kind:?}: squash with room: {}", stderr(&out));
        let head = sb.store().head(&c).unwrap().unwrap();
        assert_eq!((head.version, head.layers.len()), (4, 1), "{fs_kind:?}");
        let files = files_in_later_mount(&sb, "deep", "after-squash");
        assert_eq!(files.len(), 4, "{fs_kind:?}");
        for (n, (_, body)) in files.iter().enumerate() {
            assert!(body == &payload(n as u8, LAYER), "{fs_kind:?}: part-{n} intact after the squash");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// (d) the driver keeps serving through a full disk
// ---------------------------------------------------------------------------------------------

struct Csi {
    identity: IdentityClient<Channel>,
    controller: ControllerClient<Channel>,
    node: NodeClient<Channel>,
}

impl Csi {
    async fn ready(&mut self, what: &str) {
        let probe = tokio::time::timeout(Duration::from_secs(10), self.identity.probe(pb::ProbeRequest {}))
            .await
            .unwrap_or_else(|_| panic!("{what}: Probe did not answer within 10s"))
            .unwrap_or_else(|s| panic!("{what}: Probe failed: {s:?}"))
            .into_inner();
        assert_eq!(probe.ready, Some(true), "{what}: the driver reports ready");
    }
}

/// One persistent volume's life, step by step, so a failed step can be retried from there.
struct Job {
    name: String,
    cache: &'static str,
    files: Vec<(String, Vec<u8>)>,
    staging: PathBuf,
    target: PathBuf,
    volume: Option<pb::Volume>,
    step: usize,
    /// What the job's writes ran into (ENOSPC), if anything.
    write_error: Option<std::io::Error>,
}

const STEPS: [&str; 7] =
    ["CreateVolume", "NodeStage", "NodePublish", "write", "NodeUnpublish", "NodeUnstage", "DeleteVolume"];

impl Job {
    fn new(dir: &Path, name: &str, cache: &'static str, files: Vec<(String, Vec<u8>)>) -> Self {
        Self {
            name: name.into(),
            cache,
            files,
            staging: dir.join(format!("staging/{name}")),
            target: dir.join(format!("pods/{name}/mount")),
            volume: None,
            step: 0,
            write_error: None,
        }
    }

    /// Runs the remaining steps; stops at the first failing call and says which it was.
    async fn run(&mut self, c: &mut Csi) -> Result<(), (&'static str, tonic::Status)> {
        while self.step < STEPS.len() {
            let step = STEPS[self.step];
            let call = tokio::time::timeout(Duration::from_secs(30), self.step(c))
                .await
                .unwrap_or_else(|_| panic!("{}: {step} did not answer within 30s", self.name));
            call.map_err(|s| (step, s))?;
            self.step += 1;
        }
        Ok(())
    }

    async fn step(&mut self, c: &mut Csi) -> Result<(), tonic::Status> {
        let cap = csi_server::mount_cap();
        let s = |p: &Path| p.to_string_lossy().into_owned();
        match self.step {
            0 => {
                let req = pb::CreateVolumeRequest {
                    name: self.name.clone(),
                    volume_capabilities: vec![cap],
                    parameters: [("cacheName".to_string(), self.cache.to_string())].into(),
                    ..Default::default()
                };
                self.volume = c.controller.create_volume(req).await?.into_inner().volume;
            }
            1 => {
                let vol = self.volume.clone().expect("created");
                c.node
                    .node_stage_volume(pb::NodeStageVolumeRequest {
                        volume_id: vol.volume_id,
                        staging_target_path: s(&self.staging),
                        volume_capability: Some(cap),
                        volume_context: vol.volume_context,
                        ..Default::default()
                    })
                    .await?;
            }
            2 => {
                let vol = self.volume.clone().expect("created");
                c.node
                    .node_publish_volume(pb::NodePublishVolumeRequest {
                        volume_id: vol.volume_id,
                        staging_target_path: s(&self.staging),
                        target_path: s(&self.target),
                        volume_capability: Some(cap),
                        volume_context: vol.volume_context,
                        ..Default::default()
                    })
                    .await?;
            }
            3 => {
                for (name, body) in &self.files {
                    if let Err(e) = fs::write(self.target.join(name), body) {
                        self.write_error = Some(e);
                        break;
                    }
                }
            }
            4 => {
                let id = self.volume.as_ref().expect("created").volume_id.clone();
                c.node
                    .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
                        volume_id: id,
                        target_path: s(&self.target),
                    })
                    .await?;
            }
            5 => {
                let id = self.volume.as_ref().expect("created").volume_id.clone();
                c.node
                    .node_unstage_volume(pb::NodeUnstageVolumeRequest {
                        volume_id: id,
                        staging_target_path: s(&self.staging),
                    })
                    .await?;
            }
            _ => {
                let id = self.volume.as_ref().expect("created").volume_id.clone();
                c.controller.delete_volume(pb::DeleteVolumeRequest { volume_id: id, ..Default::default() }).await?;
            }
        }
        Ok(())
    }
}

/// Publish-nothing job that lists the cache's HEAD content as a pod would see it.
async fn read_cache(c: &mut Csi, dir: &Path, name: &str, cache: &'static str) -> Vec<(String, Vec<u8>)> {
    let mut job = Job::new(dir, name, cache, Vec::new());
    while job.step < 3 {
        let step = STEPS[job.step];
        job.step(c).await.unwrap_or_else(|s| panic!("{name}: {step}: {s:?}"));
        job.step += 1;
    }
    let files =
        names_in(&job.target).into_iter().map(|n| (n.clone(), fs::read(job.target.join(&n)).unwrap())).collect();
    job.step = 4;
    job.run(c).await.unwrap_or_else(|(step, s)| panic!("{name}: {step}: {s:?}"));
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_driver_keeps_serving_through_a_full_disk() {
    if !can_mount() {
        return;
    }
    for fs_kind in filesystems() {
        let sb = small_sandbox(fs_kind, 16);
        let (server, channel) = csi_server::serve(sb.dir.path(), &sb.state, "node-a", &[], &[]).await;
        let mut c = Csi {
            identity: IdentityClient::new(channel.clone()),
            controller: ControllerClient::new(channel.clone()),
            node: NodeClient::new(channel),
        };
        let dir = sb.dir.path();
        let c_key = key("m2");
        c.ready("at start").await;

        let mut first = Job::new(dir, "pvc-first", "m2", vec![("first.txt".into(), b"first".to_vec())]);
        first.run(&mut c).await.unwrap_or_else(|(step, s)| panic!("{fs_kind:?}: first job: {step}: {s:?}"));
        assert_eq!(head_version(&sb, &c_key), 1, "{fs_kind:?}");
        let before = head_bytes(&sb, &c_key).expect("v1");

        // The disk fills up (someone else's file); a job runs anyway.
        let filler = sb.state.join("filler");
        fill(&filler);
        c.ready("on a full disk").await;
        let mut full = Job::new(dir, "pvc-full", "m2", vec![("full.txt".into(), payload(1, 256 * 1024))]);
        let failed = full.run(&mut c).await;
        eprintln!(
            "{fs_kind:?}: job on a full disk: {:?}; its writes: {:?}",
            failed.as_ref().map_err(|(step, s)| (step, s.code(), s.message().to_string())),
            full.write_error
        );
        if let Err((step, status)) = &failed {
            assert!(
                status.message().contains(NO_SPACE),
                "{fs_kind:?}: {step} on a full disk says why: {:?}: {}",
                status.code(),
                status.message()
            );
            assert_ne!(status.code(), tonic::Code::Unknown, "{fs_kind:?}: {step}: a CSI code, not UNKNOWN");
        }
        if let Some(e) = &full.write_error {
            assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{fs_kind:?}: the job's write: {e}");
        }
        assert_eq!(head_bytes(&sb, &c_key).as_deref(), Some(&before[..]), "{fs_kind:?}: HEAD untouched");
        assert!(head_temp_files(&sb, &c_key).is_empty(), "{fs_kind:?}");
        c.ready("after calls failed on a full disk").await;

        // Space comes back: the interrupted job finishes where it stopped, and new jobs work.
        fs::remove_file(&filler).unwrap();
        if failed.is_err() {
            if full.step <= 3 {
                // It never ran its job on a mounted volume: let it write now.
                full.write_error = None;
            }
            full.run(&mut c).await.unwrap_or_else(|(step, s)| panic!("{fs_kind:?}: retried {step}: {s:?}"));
        }
        // HEAD is whole: v1, or v2 holding what the full-disk job managed to write.
        let v = head_version(&sb, &c_key);
        assert!(v == 1 || v == 2, "{fs_kind:?}: HEAD v{v} after the full-disk job");
        let files = read_cache(&mut c, dir, "pvc-read-1", "m2").await;
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        if v == 1 {
            assert_eq!(names, ["first.txt"], "{fs_kind:?}");
        } else {
            assert_eq!(names, ["first.txt", "full.txt"], "{fs_kind:?}");
            if full.write_error.is_none() {
                assert!(files[1].1 == payload(1, 256 * 1024), "{fs_kind:?}: full.txt whole");
            }
        }
        let mut after = Job::new(dir, "pvc-after", "m2", vec![("after.txt".into(), b"after".to_vec())]);
        after.run(&mut c).await.unwrap_or_else(|(step, s)| panic!("{fs_kind:?}: job after: {step}: {s:?}"));
        assert_eq!(head_version(&sb, &c_key), v + 1, "{fs_kind:?}: the job after the full disk published");
        let files = read_cache(&mut c, dir, "pvc-read-2", "m2").await;
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        assert!(names.contains(&"first.txt") && names.contains(&"after.txt"), "{fs_kind:?}: {names:?}");
        c.ready("at the end").await;
        drop(server);
        assert!(sb.mounts().iter().all(|m| m == &sb.state), "{fs_kind:?}: {:?}", sb.mounts());
    }
}

/// Kubelet and the provisioner retry a failed call; a volume whose own job filled the disk must
/// still go away (published with what fit, or dropped) rather than fail every retry forever
/// while it keeps the disk full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_whose_job_filled_the_disk_is_still_deleted() {
    if !can_mount() {
        return;
    }
    for fs_kind in filesystems() {
        let sb = small_sandbox(fs_kind, 16);
        let (_server, channel) = csi_server::serve(sb.dir.path(), &sb.state, "node-a", &[], &[]).await;
        let mut c = Csi {
            identity: IdentityClient::new(channel.clone()),
            controller: ControllerClient::new(channel.clone()),
            node: NodeClient::new(channel),
        };
        let dir = sb.dir.path();
        let c_key = key("m2");
        let mut first = Job::new(dir, "pvc-first", "m2", vec![("first.txt".into(), b"first".to_vec())]);
        first.run(&mut c).await.unwrap_or_else(|(step, s)| panic!("{fs_kind:?}: first job: {step}: {s:?}"));
        let free_at_start = free_bytes(&sb.state);

        let mut hog = Job::new(dir, "pvc-hog", "m2", Vec::new());
        while hog.step < 3 {
            let step = STEPS[hog.step];
            hog.step(&mut c).await.unwrap_or_else(|s| panic!("{fs_kind:?}: {step}: {s:?}"));
            hog.step += 1;
        }
        fs::write(hog.target.join("small.txt"), "small").unwrap();
        let mut big = File::create(hog.target.join("big.bin")).expect("create in the job's mount");
        let written = job_fills_the_disk(&mut big);
        drop(big);
        hog.step = 4;

        let mut failures = Vec::new();
        for _ in 0..5 {
            match hog.run(&mut c).await {
                Ok(()) => break,
                Err((step, s)) => {
                    assert!(s.message().contains(NO_SPACE), "{fs_kind:?}: {step}: {:?}: {}", s.code(), s.message());
                    assert_ne!(s.code(), tonic::Code::Unknown, "{fs_kind:?}: {step}");
                    failures.push(format!("{step}: {:?}: {}", s.code(), s.message()));
                    c.ready("between retries").await;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        assert!(
            hog.step == STEPS.len(),
            "{fs_kind:?}: the volume whose job wrote {written} bytes and filled the disk is never deleted: \
             {} retries failed, the last with {}",
            failures.len(),
            failures.last().map_or("", String::as_str)
        );
        let v = head_version(&sb, &c_key);
        let files = read_cache(&mut c, dir, "pvc-read", "m2").await;
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        match v {
            1 => {
                assert_eq!(names, ["first.txt"], "{fs_kind:?}");
                assert!(
                    free_bytes(&sb.state) + 512 * 1024 >= free_at_start,
                    "{fs_kind:?}: a dropped change gives its space back"
                );
            }
            2 => assert_eq!(names, ["big.bin", "first.txt", "small.txt"], "{fs_kind:?}: what fit was published"),
            v => panic!("{fs_kind:?}: HEAD v{v}"),
        }
        assert!(sb.mounts().iter().all(|m| m == &sb.state), "{fs_kind:?}: {:?}", sb.mounts());
    }
}
