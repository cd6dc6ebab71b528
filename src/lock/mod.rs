//! The publish lock: serialises the few small writes that advance a cache's HEAD.
//! A file lock on one node; a Kubernetes Lease across a cluster, behind one trait.

mod file;
pub mod lease;

use std::path::PathBuf;
use std::time::Duration;

pub use file::FileLock;
pub use lease::{LeaseLock, LeaseTiming};

use crate::store::CacheKey;

/// Lock errors, naming the cache.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Someone else held the lock for the whole wait; the caller should retry.
    #[error("cache {cache}: publish lock still held by another publisher after {waited:?}")]
    Timeout { cache: CacheKey, waited: Duration },
    /// The lock was lost while held (an expired Lease); HEAD must not be written.
    #[error("cache {cache}: publish lock was lost while held")]
    Lost { cache: CacheKey },
    /// The Kubernetes API refused, failed or did not answer in time.
    #[error("cache {cache}: {op}: {message}")]
    Api { cache: CacheKey, op: &'static str, message: String },
    /// The lock file could not be opened or locked.
    #[error("cache {cache}: {op} {path}: {source}")]
    Io { cache: CacheKey, op: &'static str, path: PathBuf, source: std::io::Error },
}

/// A lock that one publisher of a cache holds at a time.
#[async_trait::async_trait]
pub trait PublishLock: Send + Sync {
    /// Waits up to `timeout` for the cache's lock.
    async fn acquire(&self, cache: &CacheKey, timeout: Duration) -> Result<Box<dyn LockGuard>, LockError>;
}

/// A held publish lock; released explicitly so a failed release is seen.
#[async_trait::async_trait]
pub trait LockGuard: Send + Sync {
    /// Errors if the lock was lost since it was taken (never for a file lock).
    fn ensure_held(&self) -> Result<(), LockError>;
    /// Gives the lock up.
    async fn release(self: Box<Self>) -> Result<(), LockError>;
}

/// Backoff between attempts: grows from 5 ms to 100 ms, with jitter so waiters spread out.
pub(crate) fn backoff(attempt: u32) -> Duration {
    let base = 5u64.saturating_mul(1 << attempt.min(5)).min(100);
    let mut jitter = [0u8; 1];
    let _ = getrandom::fill(&mut jitter);
    Duration::from_millis(base + u64::from(jitter[0]) % (base / 2 + 1))
}
