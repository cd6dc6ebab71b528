//! Which boot of the node this is: the kernel's random boot id, new at every boot. A volume
//! records it when its overlay is mounted, so a later boot can tell that the node went down
//! under it.

use std::sync::OnceLock;

const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// This boot's id, or None where the kernel does not offer one (then no upper is ever taken
/// for torn).
pub fn boot_id() -> Option<String> {
    static ID: OnceLock<Option<String>> = OnceLock::new();
    ID.get_or_init(|| std::fs::read_to_string(BOOT_ID).ok().map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()))
        .clone()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_boot_id_is_stable_within_a_boot() {
        let first = super::boot_id();
        assert!(first.as_ref().is_some_and(|id| id.len() == 36), "{first:?}");
        assert_eq!(super::boot_id(), first);
    }
}
