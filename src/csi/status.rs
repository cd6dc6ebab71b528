//! The one place an error becomes a `tonic::Status`. Every match is exhaustive, so a new
//! error variant cannot slip through as a vague INTERNAL.

use std::path::PathBuf;

use tonic::{Code, Status};

use crate::lock::LockError;
use crate::mount::MountError;
use crate::ops::OpsError;
use crate::store::StoreError;

/// Errors of the CSI services, before they become a Status.
#[derive(Debug, thiserror::Error)]
pub enum CsiError {
    /// A required field is empty.
    #[error("{0} is required")]
    Missing(&'static str),
    /// A field breaks a rule.
    #[error("{field} is invalid: {rule}")]
    Invalid { field: String, rule: String },
    /// The volume (or what was asked of it) does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Another operation on the volume is in flight.
    #[error("{0}")]
    Aborted(String),
    /// A capacity the node cannot give.
    #[error("{0}")]
    OutOfRange(String),
    /// A dependency (the API server) did not answer; the caller retries.
    #[error("{0}")]
    Unavailable(String),
    /// From the engine.
    #[error(transparent)]
    Ops(#[from] OpsError),
    /// A file operation of the services themselves.
    #[error("{op} {path}: {source}")]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
}

impl From<StoreError> for CsiError {
    fn from(e: StoreError) -> Self {
        CsiError::Ops(OpsError::Store(e))
    }
}

fn store_code(e: &StoreError) -> Code {
    if e.is_no_space() {
        return Code::ResourceExhausted;
    }
    match e {
        StoreError::Name(_) => Code::InvalidArgument,
        StoreError::VolumeNotFound(_) | StoreError::SnapshotNotFound(_) => Code::NotFound,
        StoreError::VolumeConflict { .. } => Code::AlreadyExists,
        StoreError::NoVersion(_) | StoreError::VersionNotKept { .. } => Code::NotFound,
        StoreError::AlreadyCurrent { .. } => Code::FailedPrecondition,
        StoreError::CacheSizeTooSmall { .. } => Code::InvalidArgument,
        StoreError::ImageTaken { .. } | StoreError::LayerMismatch { .. } => Code::FailedPrecondition,
        StoreError::ImageNotMounted { .. }
        | StoreError::StateDir(_)
        | StoreError::Io { .. }
        | StoreError::Corrupt { .. }
        | StoreError::MissingLayer { .. }
        | StoreError::Tree(_) => Code::Internal,
    }
}

fn mount_code(e: &MountError) -> Code {
    match e {
        // The caller retries once whatever holds the mount lets go.
        MountError::Busy { .. } => Code::Unavailable,
        MountError::Overlay { .. }
        | MountError::OptionsTooLong { .. }
        | MountError::UnsafePath { .. }
        | MountError::Bind { .. }
        | MountError::Unmount { .. }
        | MountError::MountInfo { .. }
        | MountError::Image { .. }
        | MountError::Resolve { .. } => Code::Internal,
    }
}

fn lock_code(e: &LockError) -> Code {
    match e {
        // The API server may be briefly away; the caller retries with the change kept.
        LockError::Timeout { .. } | LockError::Lost { .. } | LockError::Api { .. } => Code::Unavailable,
        // Retrying cannot help until an administrator fixes RBAC, the namespace or a policy.
        LockError::Config { .. } => Code::FailedPrecondition,
        LockError::Io { .. } => Code::Internal,
    }
}

fn ops_code(e: &OpsError) -> Code {
    match e {
        OpsError::Store(e) => store_code(e),
        OpsError::Mount { source, .. } | OpsError::Image { source, .. } => mount_code(source),
        OpsError::Lock { source, .. } | OpsError::CacheLock { source, .. } => lock_code(source),
        // Kept for a retry (a publish) or restored from the local version (a pull).
        OpsError::Remote { .. } => Code::Unavailable,
        OpsError::ForeignMount { .. }
        | OpsError::StagedElsewhere { .. }
        | OpsError::MountedOtherwise { .. }
        | OpsError::FlagsDiffer { .. }
        | OpsError::GroupDiffers { .. } => Code::AlreadyExists,
        OpsError::NoMountPath(_) => Code::InvalidArgument,
        OpsError::InFlight { .. } => Code::Aborted,
        // The caller must first take down what it left mounted (or stage before publishing).
        OpsError::StillMounted { .. } | OpsError::NotStaged { .. } | OpsError::MountedWritable { .. } => {
            Code::FailedPrecondition
        }
        OpsError::SnapshotNameTaken { .. } => Code::AlreadyExists,
        OpsError::NotMountedAt { .. } => Code::NotFound,
        OpsError::Io { .. } | OpsError::SquashMount { .. } | OpsError::Join(_) => Code::Internal,
    }
}

impl CsiError {
    /// The gRPC code this error answers with.
    pub fn code(&self) -> Code {
        match self {
            CsiError::Missing(_) | CsiError::Invalid { .. } => Code::InvalidArgument,
            CsiError::NotFound(_) => Code::NotFound,
            CsiError::Aborted(_) => Code::Aborted,
            CsiError::OutOfRange(_) => Code::OutOfRange,
            CsiError::Unavailable(_) => Code::Unavailable,
            CsiError::Ops(e) => ops_code(e),
            CsiError::Io { .. } => Code::Internal,
        }
    }
}

impl From<CsiError> for Status {
    fn from(e: CsiError) -> Self {
        Status::new(e.code(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::time::Duration;

    use super::*;
    use crate::store::{CacheKey, LayerId, Name, VolumeId};

    fn io_err() -> io::Error {
        io::Error::from(io::ErrorKind::PermissionDenied)
    }

    #[test]
    fn every_variant_has_its_code() {
        let vol = || VolumeId::new("v").unwrap();
        let cache = || CacheKey::new("ns", "c").unwrap();
        let p = || PathBuf::from("/p");
        let name_err = Name::new("..").unwrap_err();
        let corrupt = serde_json::from_str::<u32>("x").unwrap_err();
        let cases: Vec<(CsiError, Code)> = vec![
            (CsiError::Missing("volume_id"), Code::InvalidArgument),
            (CsiError::Invalid { field: "f".into(), rule: "r".into() }, Code::InvalidArgument),
            (CsiError::NotFound("x".into()), Code::NotFound),
            (CsiError::Aborted("x".into()), Code::Aborted),
            (CsiError::OutOfRange("x".into()), Code::OutOfRange),
            (CsiError::Unavailable("x".into()), Code::Unavailable),
            (CsiError::Io { op: "stat", path: p(), source: io_err() }, Code::Internal),
            (StoreError::Name(name_err).into(), Code::InvalidArgument),
            (StoreError::VolumeNotFound(vol()).into(), Code::NotFound),
            (StoreError::VolumeConflict { id: vol(), existing: cache() }.into(), Code::AlreadyExists),
            (StoreError::SnapshotNotFound(vol()).into(), Code::NotFound),
            (StoreError::NoVersion(cache()).into(), Code::NotFound),
            (StoreError::VersionNotKept { cache: cache(), version: 1, kept: vec![4, 5] }.into(), Code::NotFound),
            (StoreError::AlreadyCurrent { cache: cache(), version: 5 }.into(), Code::FailedPrecondition),
            (OpsError::MountedWritable { volume: vol(), at: p() }.into(), Code::FailedPrecondition),
            (OpsError::SnapshotNameTaken { name: "s".into(), volume: vol() }.into(), Code::AlreadyExists),
            (StoreError::io("read", p(), io_err()).into(), Code::Internal),
            (StoreError::io("write", p(), io::Error::from_raw_os_error(libc::ENOSPC)).into(), Code::ResourceExhausted),
            (StoreError::Corrupt { path: p(), source: corrupt }.into(), Code::Internal),
            (
                StoreError::MissingLayer { cache: cache(), layer: LayerId::new("abc").unwrap(), path: p() }.into(),
                Code::Internal,
            ),
            (OpsError::Mount { volume: vol(), source: MountError::Busy { target: p() } }.into(), Code::Unavailable),
            (
                OpsError::Mount { volume: vol(), source: MountError::Overlay { target: p(), source: io_err() } }.into(),
                Code::Internal,
            ),
            (
                OpsError::Lock {
                    volume: vol(),
                    source: LockError::Timeout { cache: cache(), waited: Duration::from_secs(1) },
                }
                .into(),
                Code::Unavailable,
            ),
            (OpsError::Lock { volume: vol(), source: LockError::Lost { cache: cache() } }.into(), Code::Unavailable),
            (
                OpsError::Lock {
                    volume: vol(),
                    source: LockError::Api { cache: cache(), op: "get lease", message: "500".into() },
                }
                .into(),
                Code::Unavailable,
            ),
            (
                OpsError::Lock {
                    volume: vol(),
                    source: LockError::Config { cache: cache(), op: "create lease", message: "403".into() },
                }
                .into(),
                Code::FailedPrecondition,
            ),
            (
                OpsError::CacheLock {
                    cache: cache(),
                    source: LockError::Io { cache: cache(), op: "open", path: p(), source: io_err() },
                }
                .into(),
                Code::Internal,
            ),
            (OpsError::ForeignMount { volume: vol(), target: p(), found: "ext4".into() }.into(), Code::AlreadyExists),
            (OpsError::NoMountPath(vol()).into(), Code::InvalidArgument),
            (OpsError::InFlight { volume: "v".into(), running: "delete" }.into(), Code::Aborted),
            (OpsError::StagedElsewhere { volume: vol(), at: p() }.into(), Code::AlreadyExists),
            (OpsError::MountedOtherwise { volume: vol(), target: p(), mode: "read-only" }.into(), Code::AlreadyExists),
            (
                OpsError::FlagsDiffer { volume: vol(), mounted: "rw".into(), asked: "nosuid".into() }.into(),
                Code::AlreadyExists,
            ),
            (OpsError::GroupDiffers { volume: vol(), has: 1000, asked: 2000 }.into(), Code::AlreadyExists),
            (OpsError::StillMounted { volume: vol(), at: p() }.into(), Code::FailedPrecondition),
            (OpsError::NotStaged { volume: vol(), staging: p() }.into(), Code::FailedPrecondition),
            (OpsError::NotMountedAt { volume: vol(), path: p() }.into(), Code::NotFound),
            (OpsError::Io { volume: vol(), op: "mkdir", path: p(), source: io_err() }.into(), Code::Internal),
            (OpsError::SquashMount { cache: cache(), source: MountError::Busy { target: p() } }.into(), Code::Internal),
            (OpsError::Join("panic".into()).into(), Code::Internal),
        ];
        for (err, code) in cases {
            let text = err.to_string();
            let status = Status::from(err);
            assert_eq!(status.code(), code, "{text}");
            assert_eq!(status.message(), text, "the message is the whole error chain");
        }
    }
}
