//! OCI distribution: a cache's versions as image manifests in a registry, its layers as
//! `tar+zstd` blobs in OCI layer form.
//!
//! Everything read from a registry is untrusted: manifests are size-limited and validated,
//! blobs are digest-checked while streamed, layer tars are unpacked only into a fresh
//! temporary directory under the limits in [`archive::Limits`].

pub mod archive;
pub mod auth;
pub mod client;
pub mod manifest;

pub use client::{Registry, RegistryConfig};
pub use manifest::{Blob, RemoteLayer, RemoteVersion};
