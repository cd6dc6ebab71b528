//! Volume records: which cache a volume uses, the version it started from, and its policy.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::layout::{CacheKey, LayerId, VolumeId};

/// What to do when HEAD moved while the volume was in use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnStale {
    /// Drop the delta (the default: never overwrite a newer version's choices).
    #[default]
    Skip,
    /// Put the delta on top of the newer HEAD.
    Stack,
}

/// When a volume that may publish does publish.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PublishWhen {
    /// Not set: `on-success` where the driver knows the volume's pods, `always` elsewhere.
    #[default]
    Auto,
    /// Whenever it changed something.
    Always,
    /// Only if every pod that used it succeeded (no answer from the API: no publish).
    OnSuccess,
    /// Only if it changed something (what `always` does too: an unchanged volume never publishes).
    OnChange,
}

impl PublishWhen {
    /// Reads the `publishWhen` parameter; the error is the rule it breaks.
    pub fn parse(value: Option<&str>) -> Result<Self, &'static str> {
        match value {
            None => Ok(Self::Auto),
            Some("always") => Ok(Self::Always),
            Some("on-success") => Ok(Self::OnSuccess),
            Some("on-change") => Ok(Self::OnChange),
            Some(_) => Err("must be \"always\", \"on-success\" or \"on-change\""),
        }
    }

    /// Whether the pods' outcomes let the volume publish. `known` are the recorded pods.
    pub fn allows(&self, pods: &[PodUse]) -> bool {
        let succeeded = |p: &PodUse| p.outcome.as_deref() == Some("succeeded");
        match self {
            Self::Always | Self::OnChange => true,
            Self::Auto if pods.is_empty() => true,
            Self::Auto | Self::OnSuccess => !pods.is_empty() && pods.iter().all(succeeded),
        }
    }
}

/// Whether and how a volume may become the next version.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// May this volume publish at all.
    pub publish: bool,
    /// Started from an empty lower; a publish replaces the layers.
    pub fresh: bool,
    /// Stale handling.
    pub on_stale: OnStale,
    /// Largest delta that may be published.
    pub max_bytes: Option<u64>,
    /// Mounted read-only: nothing can be written, so nothing is ever published.
    #[serde(default)]
    pub read_only: bool,
    /// When it publishes, judged by its pods' outcomes.
    #[serde(default)]
    pub publish_when: PublishWhen,
    /// Versions the cache keeps once this volume publishes, when fewer than the driver's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_versions: Option<usize>,
}

/// The version a volume was restored from, pinned for as long as the volume lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Base {
    /// The cache's HEAD version at restore (0: it had none).
    pub version: u64,
    /// The lower layers mounted, bottom to top (a fallback's when `from` differs).
    pub layers: Vec<LayerId>,
    /// The cache whose layers were mounted: the volume's own, or a fallback.
    pub from: CacheKey,
    /// The version of `from` that was mounted (differs from `version` for a fallback).
    #[serde(default)]
    pub from_version: u64,
    /// The lineage of the cache's HEAD at restore ("" when it had none): a publish needs both
    /// the version and the lineage to still match.
    #[serde(default)]
    pub lineage: String,
    /// Set when the content came from a snapshot or another volume, not from HEAD (`snapshot
    /// ID` or `volume ID`): its publish replaces HEAD's layers with this content plus the
    /// change, if HEAD is still `version`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// What a release decided, written to the record before it is acted on, so a retry or a
/// restart after a crash finishes the same decision instead of making another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "kebab-case")]
pub enum Decision {
    /// HEAD names the pending layer at `version`.
    Committed { version: u64, depth: usize },
    /// HEAD moved past the base (or the cache was removed and began again since, when
    /// `other_lifetime`); the pending layer is dropped.
    Stale {
        base: u64,
        current: u64,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        other_lifetime: bool,
    },
    /// The change is dropped, and why.
    Abandoned { why: super::commit::NotPublished },
}

/// A pod that used a volume (from the pod info kubelet passes on NodePublish) and, once it
/// let the volume go, how it ended: what `publishWhen=on-success` decides on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodUse {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub name: String,
    /// Where it was published.
    pub target: PathBuf,
    /// `succeeded`, `failed`, `running`, `gone` or `unknown` once read at unpublish; `None` before.
    #[serde(default)]
    pub outcome: Option<String>,
}

/// The process that owns a volume made by `jobcachefs run`; when it is gone the volume is an orphan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// Process id.
    pub pid: i32,
    /// Start time in clock ticks since boot, so a reused pid is not mistaken for the owner.
    pub start_ticks: u64,
}

/// `volumes/<id>/volume.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// The volume's id.
    pub id: VolumeId,
    /// The cache it publishes to.
    pub cache: CacheKey,
    /// What it was restored from.
    pub base: Base,
    /// Whether it may publish.
    pub policy: Policy,
    /// Where its overlay is mounted, once known.
    #[serde(default)]
    pub mount_path: Option<PathBuf>,
    /// Set by `run`; absent for volumes whose lifetime an outside caller manages.
    #[serde(default)]
    pub owner: Option<Owner>,
    /// A layer already promoted from the upper and waiting for HEAD (a resumed release).
    #[serde(default)]
    pub pending: Option<LayerId>,
    /// Seconds since the epoch.
    pub created_unix: u64,
    /// What an orchestrator asked for, so a repeated create can be recognised (CSI).
    #[serde(default)]
    pub request: Option<VolumeRequest>,
    /// A release's decision, once made (see [`Decision`]).
    #[serde(default)]
    pub decision: Option<Decision>,
    /// Pods that used the volume and how they ended.
    #[serde(default)]
    pub pods: Vec<PodUse>,
    /// The flags its overlay is mounted with.
    #[serde(default)]
    pub flags: crate::mount::MountOptions,
    /// Owner and mode its root was given over the version's (owner parameters).
    #[serde(default)]
    pub root: super::RootSpec,
    /// The fsGroup its root was given (CSI `volume_mount_group`).
    #[serde(default)]
    pub mount_group: Option<u32>,
    /// The image its upper and work directories live in: its cache's, when the cache has a size.
    #[serde(default)]
    pub image: Option<super::layout::ImageTag>,
    /// Every image it needs mounted: its own and those its base's layers live in.
    #[serde(default)]
    pub images: Vec<super::layout::ImageTag>,
    /// The boot (the kernel's boot id) in which its overlay was last mounted writable. Overlays
    /// are mounted `volatile`: nothing the job writes is synced until the commit syncs it, so
    /// an upper mounted in an earlier boot may hold writes cut short by the crash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<String>,
    /// Its upper was mounted when the node went down (seen when it was mounted again in a
    /// later boot): it is never published.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub torn: bool,
}

/// The orchestrator's request behind a volume: a repeat with the same values is the same volume.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRequest {
    /// The orchestrator's name for it (CSI CreateVolume name; empty for inline volumes).
    pub name: String,
    /// Capacity granted, in bytes (0: unspecified).
    pub capacity_bytes: u64,
    /// The parameters it was created with.
    pub parameters: BTreeMap<String, String>,
    /// Lives and dies with one pod (CSI inline ephemeral volume): its unpublish commits.
    pub ephemeral: bool,
    /// The pod an inline volume belongs to, as (namespace, name), for `publishWhen=on-success`.
    #[serde(default)]
    pub pod: Option<(String, String)>,
    /// The PVC a persistent volume was made for, as (namespace, name): where its Events go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<(String, String)>,
    /// Where its content came from instead of HEAD (`snapshot ID`, `volume ID`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

impl VolumeRecord {
    /// Every layer this record keeps alive.
    pub fn pinned(&self) -> impl Iterator<Item = &LayerId> {
        self.base.layers.iter().chain(self.pending.iter())
    }
}

impl Owner {
    /// This process.
    pub fn current() -> Option<Self> {
        let pid = std::process::id() as i32;
        start_ticks(pid).map(|start_ticks| Self { pid, start_ticks })
    }

    /// Whether the owning process still runs.
    pub fn is_alive(&self) -> bool {
        start_ticks(self.pid) == Some(self.start_ticks)
    }
}

/// Field 22 of /proc/<pid>/stat; the command name before it may hold spaces and parentheses.
fn start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // After ") " come state (field 3) onwards; start time is field 22.
    after_comm.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_when_decides_by_the_pods() {
        let pod = |outcome: Option<&str>| PodUse {
            namespace: "ci".into(),
            name: "p".into(),
            target: "/t".into(),
            outcome: outcome.map(String::from),
        };
        let ok = pod(Some("succeeded"));
        let cases: &[(PublishWhen, Vec<PodUse>, bool)] = &[
            (PublishWhen::Auto, vec![], true),
            (PublishWhen::Auto, vec![ok.clone()], true),
            (PublishWhen::Auto, vec![pod(Some("failed"))], false),
            (PublishWhen::Auto, vec![pod(None)], false),
            (PublishWhen::Auto, vec![ok.clone(), pod(Some("gone"))], false),
            (PublishWhen::OnSuccess, vec![], false),
            (PublishWhen::OnSuccess, vec![ok.clone()], true),
            (PublishWhen::OnSuccess, vec![pod(Some("unknown"))], false),
            (PublishWhen::Always, vec![pod(Some("failed"))], true),
            (PublishWhen::OnChange, vec![pod(Some("failed"))], true),
        ];
        for (when, pods, want) in cases {
            assert_eq!(when.allows(pods), *want, "{when:?} with {pods:?}");
        }
        assert_eq!(PublishWhen::parse(None), Ok(PublishWhen::Auto));
        assert_eq!(PublishWhen::parse(Some("on-success")), Ok(PublishWhen::OnSuccess));
        assert!(PublishWhen::parse(Some("sometimes")).is_err());
    }

    #[test]
    fn this_process_is_alive_and_a_made_up_one_is_not() {
        let me = Owner::current().expect("own /proc entry");
        assert!(me.is_alive());
        let other = Owner { start_ticks: me.start_ticks + 1, ..me };
        assert!(!other.is_alive(), "a reused pid with another start time is not the owner");
    }
}
