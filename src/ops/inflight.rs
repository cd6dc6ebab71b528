//! The per-volume in-flight guard: a second operation on a volume already being worked on is
//! refused. The guard lives inside the task that does the work, never in a request, so a
//! caller that gives up cannot release it while the work goes on.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The volume ids (or CreateVolume names) with an operation under way, and which operation.
#[derive(Debug, Default, Clone)]
pub struct Inflight {
    busy: Arc<Mutex<HashMap<String, &'static str>>>,
}

/// Removes its key when the operation ends, however it ends.
#[derive(Debug)]
pub struct InflightGuard {
    busy: Arc<Mutex<HashMap<String, &'static str>>>,
    key: String,
}

impl Inflight {
    /// Claims `key` for `op`, or names the operation that holds it.
    pub fn begin(&self, key: &str, op: &'static str) -> Result<InflightGuard, &'static str> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(running) = busy.get(key) {
            return Err(running);
        }
        busy.insert(key.to_string(), op);
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
    fn second_claim_is_refused_until_the_first_ends() {
        let inflight = Inflight::default();
        let first = inflight.begin("vol-1", "release").unwrap();
        assert_eq!(inflight.begin("vol-1", "stage").unwrap_err(), "release");
        assert!(inflight.begin("vol-2", "stage").is_ok(), "other volumes are independent");
        drop(first);
        assert!(inflight.begin("vol-1", "stage").is_ok());
    }
}
