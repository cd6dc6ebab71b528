//! The command line on the embedded default (local state dir, file lock), as a user runs it.

mod common;

use std::fs;

use common::*;

#[test]
fn run_twice_sees_what_the_first_run_wrote() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let first = sb.cli(&[
        "run",
        "--cache",
        "m2",
        "--",
        "sh",
        "-c",
        "mkdir -p $JOBCACHE_DIR/repo && echo dep-1.0 > $JOBCACHE_DIR/repo/dep.jar",
    ]);
    assert!(first.status.success(), "{}", stderr(&first));
    let line = stderr(&first);
    assert!(line.contains("restored default/m2 empty (no version yet)"), "{line}");
    assert!(line.contains("published v1 ("), "{line}");
    assert_eq!(line.lines().count(), 1, "one line: {line}");

    let second = sb.cli(&["run", "--cache", "m2", "--", "sh", "-c", "cat $JOBCACHE_DIR/repo/dep.jar"]);
    assert!(second.status.success(), "{}", stderr(&second));
    assert_eq!(stdout(&second), "dep-1.0\n", "the second run sees the first run's file");
    let line = stderr(&second);
    assert!(line.contains("restored default/m2 v1 (1 layer, 2 files"), "{line}");
    assert!(line.contains("not published: nothing changed"), "{line}");
    assert!(sb.mounts().is_empty(), "run leaves nothing mounted");
}

#[test]
fn run_exits_with_the_commands_status_and_publishes_failures_only_when_asked() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let failed = sb.cli(&["run", "--cache", "c", "--", "sh", "-c", "echo x > $JOBCACHE_DIR/f; exit 3"]);
    assert_eq!(failed.status.code(), Some(3));
    assert!(stderr(&failed).contains("not published: the command failed (exit status 3)"), "{}", stderr(&failed));
    let forced =
        sb.cli(&["run", "--cache", "c", "--publish-on-failure", "--", "sh", "-c", "echo x > $JOBCACHE_DIR/f; exit 4"]);
    assert_eq!(forced.status.code(), Some(4));
    assert!(stderr(&forced).contains("published v1"), "{}", stderr(&forced));
    let ro = sb.cli(&["run", "--cache", "c", "--no-publish", "--", "sh", "-c", "echo y > $JOBCACHE_DIR/g"]);
    assert!(ro.status.success());
    assert!(stderr(&ro).contains("not published: --no-publish"), "{}", stderr(&ro));
    let missing = sb.cli(&["run", "--cache", "c", "--", "/no/such/tool"]);
    assert_eq!(missing.status.code(), Some(127));
    assert!(sb.mounts().is_empty());
}

#[test]
fn fresh_and_fallback_from_the_command_line() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    assert!(sb.cli(&["run", "--cache", "main", "--", "sh", "-c", "echo m > $JOBCACHE_DIR/m"]).status.success());
    let pr = sb.cli(&[
        "run",
        "--cache",
        "pr-1",
        "--fallback",
        "main",
        "--",
        "sh",
        "-c",
        "cat $JOBCACHE_DIR/m && echo p > $JOBCACHE_DIR/p",
    ]);
    assert_eq!(stdout(&pr), "m\n");
    assert!(
        stderr(&pr).contains("restored default/main v1") && stderr(&pr).contains("as fallback for default/pr-1"),
        "{}",
        stderr(&pr)
    );
    let fresh = sb.cli(&["run", "--cache", "main", "--fresh", "--", "sh", "-c", "ls -A $JOBCACHE_DIR | wc -l"]);
    assert_eq!(stdout(&fresh).trim(), "0", "fresh start is empty");
}

#[test]
fn mount_and_release_in_two_steps() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let path = sb.dir.path().join("work/cache");
    let p = path.to_str().unwrap();
    let out = sb.cli(&["mount", "--cache", "ci", p]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("restored default/ci empty"), "{}", stdout(&out));
    let again = sb.cli(&["mount", "--cache", "ci", p]);
    assert!(!again.status.success());
    assert!(stderr(&again).contains("already holds volume"), "{}", stderr(&again));
    fs::write(path.join("obj.o"), "o").unwrap();
    let out = sb.cli(&["release", p]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("published v1"), "{}", stdout(&out));
    let out = sb.cli(&["release", p]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no jobcachefs volume is mounted at"), "{}", stderr(&out));
    let out = sb.cli(&["mount", "--cache", "ci", p]);
    assert!(stdout(&out).contains("restored default/ci v1"), "{}", stdout(&out));
    assert_eq!(fs::read_to_string(path.join("obj.o")).unwrap(), "o");
    let out = sb.cli(&["release", "--no-publish", p]);
    assert!(stdout(&out).contains("not published: --no-publish"), "{}", stdout(&out));
}

#[test]
fn cache_ls_show_squash_gc_rm() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    for i in 0..10 {
        let script = format!("echo {i} > $JOBCACHE_DIR/f{i}");
        let out = sb.cli(&["run", "--cache", "deep", "--no-maintenance", "--", "sh", "-c", &script]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let ls = sb.cli(&["cache", "ls", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&ls.stdout).unwrap();
    assert_eq!(v[0]["cache"]["name"], "deep");
    assert_eq!(v[0]["version"], 10);
    assert_eq!(v[0]["layers"].as_array().unwrap().len(), 10);
    let table = stdout(&sb.cli(&["cache", "ls"]));
    assert!(table.starts_with("CACHE") && table.contains("default/deep"), "{table}");

    let sq = sb.cli(&["cache", "squash", "deep", "--json"]);
    assert!(sq.status.success(), "{}", stderr(&sq));
    let v: serde_json::Value = serde_json::from_slice(&sq.stdout).unwrap();
    assert_eq!(v["outcome"], "squashed");
    assert_eq!(v["depth"], 1);
    let show = sb.cli(&["cache", "show", "deep", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!((v["version"].as_u64(), v["layers"].as_array().unwrap().len()), (Some(10), 1));
    assert_eq!(v["layer_records"][0]["kind"], "squash");
    let all = sb.cli(&["run", "--cache", "deep", "--", "sh", "-c", "cat $JOBCACHE_DIR/f0 $JOBCACHE_DIR/f9"]);
    assert_eq!(stdout(&all), "0\n9\n", "squash kept every version's content");

    let gc = sb.cli(&["cache", "gc", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&gc.stdout).unwrap();
    assert!(v["layers_removed"].as_array().unwrap().is_empty(), "squash already collected: {v}");

    let rm = sb.cli(&["cache", "rm", "deep"]);
    assert!(stdout(&rm).contains("cache default/deep: removed"), "{}", stdout(&rm));
    let ls = sb.cli(&["cache", "ls", "--json"]);
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&ls.stdout).unwrap(), serde_json::json!([]));
    assert_eq!(fs::read_dir(sb.layout().layers_dir()).unwrap().count(), 0, "layers freed");
}

#[test]
fn deep_caches_are_squashed_in_the_background_after_a_run() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    for i in 0..9 {
        let script = format!("echo {i} > $JOBCACHE_DIR/f{i}");
        assert!(sb.cli(&["run", "--cache", "auto", "--", "sh", "-c", &script]).status.success());
    }
    // The ninth publish made it 9 deep (over 8) and started a detached squash.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let head = sb.store().head(&key("auto")).unwrap().unwrap();
        if head.layers.len() == 1 {
            assert_eq!(head.version, 9);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "background squash did not finish: {head:?}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let sb = Sandbox::new();
    let long = "a".repeat(64);
    let cases: &[(&[&str], &str)] = &[
        (&["run", "--cache", "../etc", "--", "true"], "cache name \"../etc\" is invalid"),
        (&["run", "--cache", "a/b", "--", "true"], "must match [a-z0-9]"),
        (&["run", "--cache", &long, "--", "true"], "at most 63 characters"),
        (&["run", "--cache", "ok", "--namespace", "..", "--", "true"], "namespace \"..\" is invalid"),
        (&["run", "--cache", "ok", "--fallback", "x/../y", "--", "true"], "is invalid"),
        (&["cache", "show", "Upper"], "lower case"),
        (&["cache", "rm", "a\nb"], "is invalid"),
    ];
    for (args, want) in cases {
        let out = sb.cli(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    let caches = sb.layout().caches_dir();
    let n = fs::read_dir(&caches).map(|d| d.count()).unwrap_or(0);
    assert_eq!(n, 0, "no cache directory was created for bad input");
    // A NUL cannot pass through argv; the same rule refuses it inside the library.
    let err = jobcachefs::store::CacheKey::new("default", "a\0b").unwrap_err();
    assert!(err.to_string().contains("must match"), "{err}");
    let rel = std::process::Command::new(env!("CARGO_BIN_EXE_jobcachefs"))
        .args(["--state-dir", "relative/dir", "cache", "ls"])
        .output()
        .unwrap();
    assert!(stderr(&rel).contains("must be an absolute path"), "{}", stderr(&rel));
}

#[test]
fn corrupt_head_is_named_and_kept() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    assert!(sb.cli(&["run", "--cache", "c", "--", "sh", "-c", "echo x > $JOBCACHE_DIR/f"]).status.success());
    let head = sb.layout().head_path(&key("c"));
    fs::write(&head, "{\"version\":").unwrap();
    for args in [&["run", "--cache", "c", "--", "true"][..], &["cache", "show", "c"], &["cache", "ls"]] {
        let out = sb.cli(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(stderr(&out).contains("head.json is corrupt"), "{args:?}: {}", stderr(&out));
    }
    let gc = sb.cli(&["cache", "gc"]);
    assert!(stdout(&gc).contains("deferred: cache default/c"), "{}", stdout(&gc));
    assert_eq!(fs::read_to_string(&head).unwrap(), "{\"version\":", "left for a person to look at");
    assert_eq!(fs::read_dir(sb.layout().layers_dir()).unwrap().count(), 2, "layer and record kept");
    assert!(sb.mounts().is_empty());
}

#[test]
fn a_volume_from_before_cache_rm_never_publishes_onto_the_new_lifetime() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    let run = |script: &str| sb.cli(&["run", "--cache", "life", "--no-maintenance", "--", "sh", "-c", script]);
    assert!(run("echo old > $JOBCACHE_DIR/old").status.success());
    let path = sb.dir.path().join("work/cache");
    let p = path.to_str().unwrap();
    let out = sb.cli(&["mount", "--cache", "life", p]);
    assert!(stdout(&out).contains("restored default/life v1"), "{}", stdout(&out));

    // The cache is removed while that job runs, and a new lifetime reaches v1 again.
    let rm = sb.cli(&["cache", "rm", "life"]);
    assert!(rm.status.success(), "{}", stderr(&rm));
    let out = run("echo new > $JOBCACHE_DIR/new");
    assert!(stderr(&out).contains("published v1"), "{}", stderr(&out));

    // The old job started from the other lifetime's v1: same number, different lineage. Stale.
    fs::write(path.join("late"), "late").unwrap();
    let out = sb.cli(&["release", p]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("base 1 is from before the cache was removed"), "{}", stdout(&out));
    let out = run("ls $JOBCACHE_DIR");
    assert_eq!(stdout(&out), "new\n", "only the new lifetime's files: nothing of the old job stacked on it");
}
