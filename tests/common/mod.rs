//! Shared set-up for tests on real mounts: a temp state dir, an unmount guard, the binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use jobcachefs::lock::FileLock;
use jobcachefs::mount::{info, Mounter, SysMounter};
use jobcachefs::ops::Engine;
use jobcachefs::store::{CacheKey, Layout, NewVolume, Policy, Store, VolumeId};

pub mod fault_proxy;
pub mod registry;

/// Whether this process may mount. Outside CI a test that cannot mount says so and returns;
/// in CI (`CI` set) it fails, so a missing privilege never passes silently.
pub fn can_mount() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "CI must run the mount tests as root");
    eprintln!("skipping: mounting overlayfs needs root");
    false
}

/// A temp dir holding a state dir; unmounts everything below it when dropped.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
    pub state: PathBuf,
}

impl Sandbox {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new().prefix("jcfs").tempdir_in("/var/tmp").expect("temp dir");
        let state = dir.path().join("state");
        Self { dir, state }
    }

    pub fn layout(&self) -> Layout {
        Layout::new(&self.state).expect("state dir")
    }

    pub fn store(&self) -> Store {
        Store::open(self.layout()).expect("open store")
    }

    pub fn engine(&self) -> Engine {
        self.engine_with_timeout(Duration::from_secs(10))
    }

    pub fn engine_with_timeout(&self, timeout: Duration) -> Engine {
        let layout = self.layout();
        Engine::new(
            Store::open(layout.clone()).expect("open store"),
            Arc::new(SysMounter),
            Arc::new(FileLock::new(layout)),
            timeout,
        )
    }

    /// A fresh directory inside the sandbox.
    pub fn path(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::create_dir_all(&p).expect("mkdir");
        p
    }

    /// Runs the jobcachefs binary on this state dir.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_env(args, &[])
    }

    pub fn cli_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_jobcachefs"));
        cmd.arg("--state-dir").arg(&self.state).args(args).env_remove("RUST_LOG");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().expect("run jobcachefs")
    }

    /// Mount points below the sandbox, per this process's mountinfo.
    pub fn mounts(&self) -> Vec<PathBuf> {
        let root = self.dir.path().to_path_buf();
        info::read_mountinfo()
            .expect("mountinfo")
            .into_iter()
            .map(|m| m.mount_point)
            .filter(|p| p.starts_with(&root))
            .collect()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Deepest first; a test that failed mid-way must not leave mounts behind.
        let mut mounts = self.mounts();
        mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for m in mounts {
            let _ = SysMounter.unmount(&m);
        }
    }
}

/// Layers a store keeps for its caches: every HEAD's and every kept version's, sorted.
pub fn named_layers(store: &Store) -> Vec<String> {
    let mut named = std::collections::BTreeSet::new();
    for c in store.caches().expect("caches") {
        if let Some(h) = store.head(&c).expect("head") {
            named.extend(h.layers.iter().map(|l| l.to_string()));
        }
        for v in store.versions(&c).expect("versions") {
            named.extend(v.layers.iter().map(|l| l.to_string()));
        }
    }
    named.into_iter().collect()
}

pub fn key(name: &str) -> CacheKey {
    CacheKey::new("default", name).expect("key")
}

pub fn publishing() -> Policy {
    Policy { publish: true, ..Policy::default() }
}

pub fn volume(id: &str, cache: &CacheKey, policy: Policy, target: &Path) -> NewVolume {
    NewVolume::new(VolumeId::new(id).expect("volume id"), cache.clone(), policy, Some(target.to_path_buf()))
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A runtime for driving the async engine from plain tests.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}
