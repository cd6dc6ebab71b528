//! StorageClass parameters and inline volume attributes → `VolumeParams::parse`. Never panics;
//! what it accepts names a valid cache, and an inline volume can neither reach into another
//! namespace nor grant itself the right to publish.
#![no_main]

use std::collections::{HashMap, HashSet};

use arbitrary::Arbitrary;
use jobcachefs::csi::params::{Kind, VolumeParams, EPHEMERAL_KEY, METADATA_PREFIX};
use jobcachefs_fuzz::*;
use libfuzzer_sys::fuzz_target;

const PVC_NAMESPACE: &str = "csi.storage.k8s.io/pvc/namespace";
const POD_NAMESPACE: &str = "csi.storage.k8s.io/pod.namespace";

/// Keys: the known ones often, anything else too.
#[derive(Debug, Arbitrary)]
enum Key {
    CacheName,
    Publish,
    PublishWhen,
    IgnoreCache,
    OnStale,
    FallbackCaches,
    MaxBytes,
    Namespace,
    PvcNamespace,
    PodNamespace,
    Ephemeral,
    Metadata(String),
    Any(String),
}

impl Key {
    fn text(&self) -> String {
        match self {
            Key::CacheName => "cacheName".into(),
            Key::Publish => "publish".into(),
            Key::PublishWhen => "publishWhen".into(),
            Key::IgnoreCache => "ignoreCache".into(),
            Key::OnStale => "onStale".into(),
            Key::FallbackCaches => "fallbackCaches".into(),
            Key::MaxBytes => "maxBytes".into(),
            Key::Namespace => "namespace".into(),
            Key::PvcNamespace => PVC_NAMESPACE.into(),
            Key::PodNamespace => POD_NAMESPACE.into(),
            Key::Ephemeral => EPHEMERAL_KEY.into(),
            Key::Metadata(s) => format!("{METADATA_PREFIX}{s}"),
            Key::Any(s) => s.clone(),
        }
    }
}

#[derive(Debug, Arbitrary)]
struct Input {
    ephemeral: bool,
    /// Also allow the namespace the volume claims (else only `allowed`, which rarely matches).
    allow_own_namespace: bool,
    pairs: Vec<(Key, String)>,
    /// Namespaces whose inline volumes may publish.
    allowed: Vec<String>,
}

fuzz_target!(|input: Input| {
    let map: HashMap<String, String> = input.pairs.iter().map(|(k, v)| (k.text(), v.clone())).collect();
    let mut allowed: HashSet<String> = input.allowed.iter().cloned().collect();
    if input.allow_own_namespace {
        let own = map.get(POD_NAMESPACE).or(map.get(PVC_NAMESPACE)).or(map.get("namespace"));
        allowed.insert(own.cloned().unwrap_or_else(|| "default".into()));
    }
    let kind = if input.ephemeral { Kind::Ephemeral } else { Kind::Persistent };

    let params = match VolumeParams::parse(&map, kind, &allowed) {
        Ok(p) => p,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };

    check_key(&params.cache);
    params.fallbacks.iter().for_each(check_key);
    assert_eq!(Some(params.cache.name.as_str()), map.get("cacheName").map(String::as_str));
    for key in map.keys() {
        assert!(key.starts_with(METADATA_PREFIX) || params.given.contains_key(key), "{key:?} dropped");
    }
    assert!(params.given.keys().all(|k| !k.starts_with(METADATA_PREFIX)), "metadata leaked into {params:?}");
    assert!(!params.policy.read_only);
    let ctx = params.context();
    assert_eq!(ctx.get("namespace").map(String::as_str), Some(params.cache.namespace.as_str()));

    let ns = params.cache.namespace.as_str();
    match kind {
        Kind::Persistent => {
            let want = map.get(PVC_NAMESPACE).or(map.get("namespace")).map_or("default", String::as_str);
            assert_eq!(ns, want);
            assert_eq!(params.policy.publish, map.get("publish").map(String::as_str) != Some("false"));
        }
        Kind::Ephemeral => {
            // The namespace is kubelet's, never the pod author's `namespace` attribute.
            assert_eq!(ns, map.get(POD_NAMESPACE).map_or("default", String::as_str));
            if params.policy.publish {
                assert!(allowed.contains(ns), "inline volume in {ns:?} publishes; allowed: {allowed:?}");
                assert_ne!(map.get("publish").map(String::as_str), Some("false"));
            }
            for f in &params.fallbacks {
                assert_eq!(f.namespace, params.cache.namespace, "inline volume falls back across namespaces: {f}");
            }
        }
    }
});
