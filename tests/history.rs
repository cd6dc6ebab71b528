//! Versions you can name, through the command line: the last K versions are kept and shown,
//! a poisoned cache is rolled back in one command, a job that started from the poisoned
//! version cannot publish over the rollback, and squash and gc keep history consistent.

mod common;

use std::fs;

use common::*;

fn run(sb: &Sandbox, extra: &[&str], script: &str) -> String {
    let mut args = vec!["--keep-versions", "3", "run", "--cache", "m2", "--no-maintenance"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--", "sh", "-c", script]);
    let out = sb.cli(&args);
    assert!(out.status.success(), "{script}: {}", stderr(&out));
    format!("{}{}", stdout(&out), stderr(&out))
}

fn show(sb: &Sandbox) -> serde_json::Value {
    let out = sb.cli(&["--keep-versions", "3", "cache", "show", "m2", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).expect("cache show --json")
}

fn kept(v: &serde_json::Value) -> Vec<u64> {
    v["versions"].as_array().unwrap().iter().map(|r| r["version"].as_u64().unwrap()).collect()
}

#[test]
fn a_poisoned_cache_is_rolled_back_in_one_command() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    for i in 1..=4 {
        run(&sb, &[], &format!("echo good-{i} > $JOBCACHE_DIR/index; echo {i} > $JOBCACHE_DIR/f{i}"));
    }
    let v = show(&sb);
    assert_eq!(v["version"], 4);
    assert_eq!(kept(&v), [4, 3, 2], "the last 3 versions, newest first: {v}");
    let top = &v["versions"][0];
    assert_eq!(top["depth"], 4);
    assert!(top["bytes"].as_u64().unwrap() > 0);
    assert!(top["by"].as_str().unwrap().starts_with("volume run-"), "{top}");
    let text = stdout(&sb.cli(&["--keep-versions", "3", "cache", "show", "m2"]));
    assert!(text.contains("versions kept, newest first:") && text.contains("v3"), "{text}");

    // A job mounts v4, then a bad build publishes v5 (the poison).
    let job = sb.dir.path().join("work/job");
    let out = sb.cli(&["mount", "--cache", "m2", job.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    run(&sb, &[], "echo POISON > $JOBCACHE_DIR/index");
    assert_eq!(run(&sb, &["--no-publish"], "cat $JOBCACHE_DIR/index").lines().next(), Some("POISON"));

    // Roll back to v4: a new version (v6) whose content is v4's.
    let out = sb.cli(&["--keep-versions", "3", "cache", "rollback", "m2", "--to", "4", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let rolled: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((rolled["version"].as_u64(), rolled["to"].as_u64()), (Some(6), Some(4)));
    assert_eq!(run(&sb, &["--no-publish"], "cat $JOBCACHE_DIR/index").lines().next(), Some("good-4"));
    let v = show(&sb);
    assert_eq!(kept(&v), [6, 5, 4]);
    assert_eq!(v["versions"][0]["by"], "rollback to v4");

    // The job that started from v4 is stale now (HEAD moved to v5, then v6): no rollback of the rollback.
    fs::write(job.join("late"), "late").unwrap();
    let out = sb.cli(&["release", job.to_str().unwrap()]);
    assert!(stdout(&out).contains("base 4 is stale, current is 6"), "{}", stdout(&out));

    // Versions no longer kept, the current one, a cache without versions: clear errors.
    let out = sb.cli(&["--keep-versions", "3", "cache", "rollback", "m2", "--to", "1"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("does not keep version 1 (kept: [6, 5, 4])"), "{}", stderr(&out));
    let out = sb.cli(&["cache", "rollback", "m2", "--to", "6"]);
    assert!(stderr(&out).contains("already the current version"), "{}", stderr(&out));
    let out = sb.cli(&["cache", "rollback", "nothing-here", "--to", "1"]);
    assert!(stderr(&out).contains("has no version"), "{}", stderr(&out));
}

#[test]
fn gc_keeps_the_kept_versions_and_squash_shares_its_layer_with_them() {
    if !can_mount() {
        return;
    }
    let sb = Sandbox::new();
    for i in 1..=5 {
        run(&sb, &[], &format!("echo {i} > $JOBCACHE_DIR/f{i}"));
    }
    // Versions 3..5 kept: their layers (1..5, since each stacks) stay; nothing is collected.
    let gc = sb.cli(&["--keep-versions", "3", "cache", "gc", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&gc.stdout).unwrap();
    assert_eq!(report["layers_removed"], serde_json::json!([]), "{report}");

    // Squash: HEAD and every kept version that shares the prefix point at the flat layer.
    let sq = sb.cli(&["--keep-versions", "3", "cache", "squash", "m2", "--max-depth", "1"]);
    assert!(sq.status.success(), "{}", stderr(&sq));
    let v = show(&sb);
    let head: Vec<String> = v["layers"].as_array().unwrap().iter().map(|l| l.as_str().unwrap().into()).collect();
    assert_eq!(head.len(), 1);
    assert_eq!(v["versions"][0]["depth"], 1, "v5 shares the flat layer: {v}");
    assert_eq!(v["versions"][1]["depth"], 4, "v4 did not have v5's layer: its own layers stay: {v}");

    // Rolling back to v4 after the squash still brings v4's content.
    let out = sb.cli(&["--keep-versions", "3", "cache", "rollback", "m2", "--to", "4"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let files = run(&sb, &["--no-publish"], "ls $JOBCACHE_DIR | tr '\\n' ' '");
    assert!(files.starts_with("f1 f2 f3 f4 "), "{files}");

    // Two more versions push v4..v5 out; gc then collects what only they named.
    run(&sb, &[], "echo 7 > $JOBCACHE_DIR/f7");
    run(&sb, &[], "echo 8 > $JOBCACHE_DIR/f8");
    assert_eq!(kept(&show(&sb)), [8, 7, 6]);
    let gc = sb.cli(&["--keep-versions", "3", "cache", "gc", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&gc.stdout).unwrap();
    let removed: Vec<&str> = report["layers_removed"].as_array().unwrap().iter().map(|l| l.as_str().unwrap()).collect();
    assert_eq!(
        removed,
        [head[0].as_str()],
        "only v5 named the flat layer; it goes once v5 is no longer kept: {report}"
    );
    let files = run(&sb, &["--no-publish"], "ls $JOBCACHE_DIR | tr '\\n' ' '");
    assert!(files.starts_with("f1 f2 f3 f4 f7 f8 "), "the cache is whole after gc: {files}");
}
