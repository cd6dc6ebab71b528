//! jobcachefs: a persistent, copy-on-write build cache mounted with overlayfs.
// Errors carry their context (cache, volume, path) by design and sit on the cold path.
#![allow(clippy::result_large_err)]

pub mod cli;
pub mod cluster;
pub mod csi;
pub mod failpoint;
pub mod lock;
pub mod metrics;
pub mod mount;
pub mod ops;
pub mod registry;
pub mod store;
