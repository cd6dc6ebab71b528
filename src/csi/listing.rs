//! What the controller lists and snapshots: pagination tokens, snapshot ids and the
//! conversion of records into CSI messages.

use super::pb;
use super::status::CsiError;
use crate::store::snapshot::SnapshotRecord;
use crate::store::VolumeId;

/// Every page token starts with this: anything else was not made by us and is refused
/// (ABORTED, as the spec asks), instead of silently starting over.
const TOKEN_PREFIX: &str = "after:";

/// The token for a page that ended at `last`: the next page starts after it, so a token
/// stays valid even when that entry is deleted meanwhile.
pub fn token_after(last: &str) -> String {
    format!("{TOKEN_PREFIX}{last}")
}

/// The id a page starts after; `None` for the first page.
pub fn parse_token(token: &str) -> Result<Option<String>, CsiError> {
    if token.is_empty() {
        return Ok(None);
    }
    match token.strip_prefix(TOKEN_PREFIX).map(VolumeId::new) {
        Some(Ok(id)) => Ok(Some(id.to_string())),
        _ => Err(CsiError::Aborted(format!(
            "starting_token {token:?} is not a token this driver gave out: start again with an empty one"
        ))),
    }
}

/// One page of `items` (sorted by id) after `start`, at most `max` (0: all), and the token
/// for the next page.
pub fn page<T>(
    items: Vec<T>,
    id: impl Fn(&T) -> String,
    start: Option<String>,
    max: i32,
) -> Result<(Vec<T>, String), CsiError> {
    if max < 0 {
        return Err(CsiError::Invalid { field: "max_entries".into(), rule: "must not be negative".into() });
    }
    let mut rest: Vec<T> = match &start {
        Some(after) => items.into_iter().filter(|i| id(i).as_str() > after.as_str()).collect(),
        None => items,
    };
    let max = max as usize;
    if max == 0 || rest.len() <= max {
        return Ok((rest, String::new()));
    }
    rest.truncate(max);
    let next = rest.last().map(|i| token_after(&id(i))).unwrap_or_default();
    Ok((rest, next))
}

/// A deterministic snapshot id for a CreateSnapshot name, so a repeat finds the same snapshot.
pub fn snapshot_id_for(name: &str) -> VolumeId {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(name.as_bytes());
    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    VolumeId::new(format!("snap-{hex}")).expect("hex is a valid id")
}

/// A snapshot record as CSI shows it (cut and ready once recorded). Its size is reported
/// as unknown (0): a restore mounts the snapshot's layers and copies nothing, so it needs
/// no PVC as large as the cache (the provisioner refuses a restore smaller than a size).
pub fn snapshot_message(s: &SnapshotRecord) -> pb::Snapshot {
    pb::Snapshot {
        size_bytes: 0,
        snapshot_id: s.id.to_string(),
        source_volume_id: s.source_volume.to_string(),
        creation_time: Some(prost_types::Timestamp { seconds: i64::try_from(s.created_unix).unwrap_or(0), nanos: 0 }),
        ready_to_use: true,
        group_snapshot_id: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_follow_tokens_and_survive_deletions() {
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (first, next) = page(ids(&["a", "b", "c", "d"]), |s| s.clone(), None, 2).unwrap();
        assert_eq!((first, next.as_str()), (ids(&["a", "b"]), "after:b"));
        // b is deleted before the next call: the token still works.
        let start = parse_token(&next).unwrap();
        let (second, next) = page(ids(&["a", "c", "d"]), |s| s.clone(), start, 2).unwrap();
        assert_eq!((second, next.as_str()), (ids(&["c", "d"]), ""));
        let (all, next) = page(ids(&["a", "b"]), |s| s.clone(), None, 0).unwrap();
        assert_eq!((all.len(), next.as_str()), (2, ""));
        for bad in ["invalid-token", "after:", "after:../x", "b"] {
            assert!(matches!(parse_token(bad), Err(CsiError::Aborted(_))), "{bad}");
        }
        assert!(matches!(page(ids(&["a"]), |s| s.clone(), None, -1), Err(CsiError::Invalid { .. })));
    }

    #[test]
    fn snapshot_ids_are_stable_and_valid() {
        assert_eq!(snapshot_id_for("s1"), snapshot_id_for("s1"));
        assert_ne!(snapshot_id_for("s1"), snapshot_id_for("s2"));
        assert!(snapshot_id_for(&"x".repeat(9000)).as_str().starts_with("snap-"));
    }
}
