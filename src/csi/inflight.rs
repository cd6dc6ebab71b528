//! The per-volume in-flight guard: a second call for a volume already being worked on is ABORTED.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use super::status::CsiError;

/// The set of volume ids (or CreateVolume names) with an operation under way.
#[derive(Debug, Default, Clone)]
pub struct Inflight {
    busy: Arc<Mutex<HashSet<String>>>,
}

/// Removes its key when the operation ends, however it ends.
#[derive(Debug)]
pub struct InflightGuard {
    busy: Arc<Mutex<HashSet<String>>>,
    key: String,
}

impl Inflight {
    /// Claims `key`, or answers ABORTED if another operation holds it.
    pub fn begin(&self, key: &str) -> Result<InflightGuard, CsiError> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if !busy.insert(key.to_string()) {
            return Err(CsiError::Aborted(format!("an operation on {key} is already in progress")));
        }
        Ok(InflightGuard { busy: self.busy.clone(), key: key.to_string() })
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.busy.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_claim_is_aborted_until_the_first_ends() {
        let inflight = Inflight::default();
        let first = inflight.begin("vol-1").unwrap();
        let err = inflight.begin("vol-1").unwrap_err();
        assert_eq!(tonic::Status::from(err).code(), tonic::Code::Aborted);
        assert!(inflight.begin("vol-2").is_ok(), "other volumes are independent");
        drop(first);
        assert!(inflight.begin("vol-1").is_ok());
    }
}
