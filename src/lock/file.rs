//! The embedded default: flock(2) on `caches/<ns>/<name>/lock`, shared by every process on the node.

use std::fs::File;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use super::{backoff, LockError, LockGuard, PublishLock};
use crate::store::{CacheKey, Layout};

/// A publish lock backed by a lock file in the cache's directory.
#[derive(Debug, Clone)]
pub struct FileLock {
    layout: Layout,
}

impl FileLock {
    /// A file lock over the given state dir.
    pub fn new(layout: Layout) -> Self {
        Self { layout }
    }
}

struct FileGuard {
    _lock: Flock<File>,
}

#[async_trait::async_trait]
impl PublishLock for FileLock {
    async fn acquire(&self, cache: &CacheKey, timeout: Duration) -> Result<Box<dyn LockGuard>, LockError> {
        let path = self.layout.lock_path(cache);
        let dir = self.layout.cache_dir(cache);
        let io_err = |op, path, source| LockError::Io { cache: cache.clone(), op, path, source };
        let open_path = path.clone();
        let file = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir).map_err(|e| ("create directory", dir.clone(), e))?;
            File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&open_path)
                .map_err(|e| ("open", open_path.clone(), e))
        })
        .await
        .map_err(|e| io_err("open", path.clone(), std::io::Error::other(e)))?
        .map_err(|(op, path, e)| io_err(op, path, e))?;

        let started = Instant::now();
        let mut file = file;
        let mut attempt = 0;
        loop {
            // Non-blocking attempts keep the wait cancellable and bounded by `timeout`.
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => return Ok(Box::new(FileGuard { _lock: lock })),
                Err((back, Errno::EWOULDBLOCK)) => file = back,
                Err((_, errno)) => return Err(io_err("flock", path, errno.into())),
            }
            let waited = started.elapsed();
            if waited >= timeout {
                return Err(LockError::Timeout { cache: cache.clone(), waited });
            }
            tokio::time::sleep(backoff(attempt).min(timeout - waited)).await;
            attempt += 1;
        }
    }
}

#[async_trait::async_trait]
impl LockGuard for FileGuard {
    fn ensure_held(&self) -> Result<(), LockError> {
        Ok(())
    }

    async fn release(self: Box<Self>) -> Result<(), LockError> {
        // Dropping the Flock unlocks; closing the file would too.
        drop(self);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, FileLock, CacheKey) {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path().join("s")).unwrap();
        (dir, FileLock::new(layout), CacheKey::new("ns", "c").unwrap())
    }

    #[tokio::test]
    async fn second_holder_times_out_then_gets_it_after_release() {
        let (_dir, lock, key) = setup();
        let held = lock.acquire(&key, Duration::from_secs(1)).await.unwrap();
        let err = lock.acquire(&key, Duration::from_millis(50)).await.err().expect("must time out");
        assert!(matches!(err, LockError::Timeout { .. }), "{err}");
        assert!(err.to_string().contains("ns/c"), "{err}");
        held.release().await.unwrap();
        let again = lock.acquire(&key, Duration::from_millis(50)).await.unwrap();
        again.ensure_held().unwrap();
    }

    #[tokio::test]
    async fn waiter_gets_lock_when_holder_releases() {
        let (_dir, lock, key) = setup();
        let held = lock.acquire(&key, Duration::from_secs(1)).await.unwrap();
        let lock2 = lock.clone();
        let key2 = key.clone();
        let waiter = tokio::spawn(async move { lock2.acquire(&key2, Duration::from_secs(5)).await.is_ok() });
        tokio::time::sleep(Duration::from_millis(30)).await;
        held.release().await.unwrap();
        assert!(waiter.await.unwrap());
    }

    #[tokio::test]
    async fn different_caches_do_not_contend() {
        let (_dir, lock, key) = setup();
        let other = CacheKey::new("ns", "d").unwrap();
        let _a = lock.acquire(&key, Duration::from_millis(10)).await.unwrap();
        let _b = lock.acquire(&other, Duration::from_millis(10)).await.unwrap();
    }
}
