//! Crash safety: the CLI is killed (SIGKILL, via test-only crash points) at each step of
//! restore, commit, squash, gc and eviction. Afterwards HEAD is the old or the new version,
//! never torn; every layer it names is there; the next `cache gc` collects the orphans.
//! Needs `--features failpoints` (Cargo.toml marks this test so).

mod common;

use std::fs;
use std::os::unix::process::ExitStatusExt;

use common::*;
use jobcachefs::store::Head;

fn killed(out: &std::process::Output) -> bool {
    out.status.signal() == Some(9)
}

/// HEAD parses and every layer it names is on disk; returns its version.
fn head_is_whole(sb: &Sandbox, name: &str) -> u64 {
    let head: Head =
        serde_json::from_slice(&fs::read(sb.layout().head_path(&key(name))).unwrap()).expect("HEAD parses");
    for l in &head.layers {
        assert!(sb.layout().layer_dir(l).is_dir(), "HEAD names missing layer {l}");
    }
    head.version
}

/// After gc: no volumes, no mounts, empty scratch, and only layers some HEAD names.
fn assert_clean(sb: &Sandbox) {
    let gc = sb.cli(&["cache", "gc", "--json"]);
    assert!(gc.status.success(), "{}", stderr(&gc));
    let layout = sb.layout();
    assert_eq!(fs::read_dir(layout.volumes_dir()).unwrap().count(), 0, "volumes left after gc");
    assert_eq!(fs::read_dir(layout.tmp_dir()).unwrap().count(), 0, "scratch left after gc");
    assert!(sb.mounts().iter().all(|m| !m.starts_with(&sb.state)), "mounts left: {:?}", sb.mounts());
    let store = sb.store();
    let mut named = std::collections::HashSet::new();
    for c in store.caches().unwrap() {
        if let Some(h) = store.head(&c).unwrap() {
            named.extend(h.layers.into_iter().map(|l| l.to_string()));
        }
        // The versions a cache keeps (for rollback) name layers too.
        for v in store.versions(&c).unwrap() {
            named.extend(v.layers.into_iter().map(|l| l.to_string()));
        }
    }
    for e in fs::read_dir(layout.layers_dir()).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        let id = name.trim_end_matches(".json");
        assert!(named.contains(id), "orphan {name} survived gc");
    }
}

fn seed(sb: &Sandbox, name: &str, versions: usize) {
    for i in 0..versions {
        let script = format!("echo {i} > $JOBCACHE_DIR/v{i}");
        let out = sb.cli(&["run", "--cache", name, "--no-maintenance", "--", "sh", "-c", &script]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
}

#[test]
fn killed_at_each_step_of_restore_and_commit() {
    if !can_mount() {
        return;
    }
    for step in [
        "atomic.before-rename",
        "commit.after-pending",
        "commit.after-rename",
        "commit.after-layer-record",
        "commit.before-head",
        "commit.after-head",
    ] {
        let sb = Sandbox::new();
        seed(&sb, "c", 1);
        let out = sb.cli_env(
            &["run", "--cache", "c", "--", "sh", "-c", "echo new > $JOBCACHE_DIR/new"],
            &[("JOBCACHEFS_CRASH_AT", step)],
        );
        assert!(killed(&out), "{step}: not killed: {:?} {}", out.status, stderr(&out));
        let version = head_is_whole(&sb, "c");
        let want = if step == "commit.after-head" { 2 } else { 1 };
        assert_eq!(version, want, "{step}: HEAD is the old version before the HEAD write, the new one after");
        assert_clean(&sb);
        // The cache keeps working, and holds what its HEAD says.
        let out = sb.cli(&[
            "run",
            "--cache",
            "c",
            "--",
            "sh",
            "-c",
            "cat $JOBCACHE_DIR/v0; cat $JOBCACHE_DIR/new 2>/dev/null || true",
        ]);
        assert!(out.status.success(), "{step}: {}", stderr(&out));
        let expect = if want == 2 { "0\nnew\n" } else { "0\n" };
        assert_eq!(stdout(&out), expect, "{step}");
        assert_clean(&sb);
    }
}

#[test]
fn a_two_step_release_killed_mid_commit_resumes() {
    if !can_mount() {
        return;
    }
    for step in ["commit.after-pending", "commit.after-rename", "commit.after-layer-record", "commit.before-head"] {
        let sb = Sandbox::new();
        let path = sb.path("ci");
        let p = path.to_str().unwrap();
        assert!(sb.cli(&["mount", "--cache", "c", p]).status.success());
        fs::write(path.join("obj"), "o").unwrap();
        let out = sb.cli_env(&["release", p], &[("JOBCACHEFS_CRASH_AT", step)]);
        assert!(killed(&out), "{step}: {}", stderr(&out));
        assert!(!sb.layout().head_path(&key("c")).exists(), "{step}: no HEAD yet");
        // gc must not take the promoted layer of a volume that still exists.
        assert!(sb.cli(&["cache", "gc"]).status.success());
        let out = sb.cli(&["release", p]);
        assert!(out.status.success(), "{step}: {}", stderr(&out));
        assert!(stdout(&out).contains("published v1"), "{step}: {}", stdout(&out));
        let out = sb.cli(&["run", "--cache", "c", "--", "cat", "/dev/null"]);
        assert!(out.status.success());
        let read = sb.cli(&["run", "--cache", "c", "--", "sh", "-c", "cat $JOBCACHE_DIR/obj"]);
        assert_eq!(stdout(&read), "o", "{step}: the change survived the crash");
        assert_clean(&sb);
    }
}

#[test]
fn killed_at_each_step_of_squash() {
    if !can_mount() {
        return;
    }
    for step in ["squash.after-copy", "squash.after-layer", "squash.before-head"] {
        let sb = Sandbox::new();
        seed(&sb, "c", 3);
        let out = sb.cli_env(&["cache", "squash", "c", "--max-depth", "1"], &[("JOBCACHEFS_CRASH_AT", step)]);
        assert!(killed(&out), "{step}: {}", stderr(&out));
        assert_eq!(head_is_whole(&sb, "c"), 3, "{step}: squash never changes the version");
        assert_clean(&sb);
        let out = sb.cli(&["run", "--cache", "c", "--", "sh", "-c", "cat $JOBCACHE_DIR/v0 $JOBCACHE_DIR/v2"]);
        assert_eq!(stdout(&out), "0\n2\n", "{step}");
        let out = sb.cli(&["cache", "squash", "c", "--max-depth", "1", "--json"]);
        assert!(stdout(&out).contains("\"squashed\""), "{step}: a later squash completes: {}", stdout(&out));
        assert_clean(&sb);
    }
}

#[test]
fn killed_during_gc_and_eviction() {
    if !can_mount() {
        return;
    }
    for step in ["gc.after-scan", "gc.after-trash", "evict.before-remove"] {
        let sb = Sandbox::new();
        seed(&sb, "keep", 2);
        seed(&sb, "old", 1);
        fs::create_dir_all(sb.layout().layers_dir().join("orphan01")).unwrap();
        let out = sb.cli_env(&["cache", "gc", "--budget", "1B"], &[("JOBCACHEFS_CRASH_AT", step)]);
        assert!(killed(&out), "{step}: {}", stderr(&out));
        for name in ["keep", "old"] {
            if sb.layout().head_path(&key(name)).exists() {
                head_is_whole(&sb, name);
            }
        }
        assert_clean(&sb);
        assert!(!sb.layout().layers_dir().join("orphan01").exists(), "{step}");
    }
}

#[test]
fn a_release_retried_after_a_crash_past_the_head_write_keeps_the_commit() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let path = sb.path("ci");
    let p = path.to_str().unwrap();
    assert!(sb.cli(&["mount", "--cache", "c", p]).status.success());
    fs::write(path.join("obj"), "o").unwrap();
    let out = sb.cli_env(&["release", p], &[("JOBCACHEFS_CRASH_AT", "commit.after-head")]);
    assert!(killed(&out), "{}", stderr(&out));
    assert_eq!(head_is_whole(&sb, "c"), 1, "the HEAD write landed before the crash");
    // The volume (no owner process) is still there; releasing it again must not undo v1.
    let out = sb.cli(&["release", p]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("published v1"), "{}", stdout(&out));
    assert_eq!(head_is_whole(&sb, "c"), 1, "applied once, and its layer kept");
    let read = sb.cli(&["run", "--cache", "c", "--", "sh", "-c", "cat $JOBCACHE_DIR/obj"]);
    assert_eq!(stdout(&read), "o");
    assert_clean(&sb);
}
