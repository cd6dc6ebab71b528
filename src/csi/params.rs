//! Typed volume parameters from a StorageClass's `parameters` or an inline volume's attributes.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::store::{CacheKey, Name, OnStale, Policy, PublishWhen, RootSpec};

use super::status::CsiError;

/// Prefix of the keys the provisioner and kubelet add (namespace, pod, PVC); not ours to validate.
pub const METADATA_PREFIX: &str = "csi.storage.k8s.io/";
/// Set by kubelet on inline ephemeral volumes.
pub const EPHEMERAL_KEY: &str = "csi.storage.k8s.io/ephemeral";
const PVC_NAMESPACE: &str = "csi.storage.k8s.io/pvc/namespace";
const POD_NAMESPACE: &str = "csi.storage.k8s.io/pod.namespace";
const KEYS: &[&str] = &[
    "cacheName",
    "publish",
    "publishWhen",
    "ignoreCache",
    "onStale",
    "fallbackCaches",
    "maxBytes",
    "namespace",
    "uid",
    "gid",
    "mode",
    "worldWritable",
    "keepVersions",
    "cacheSize",
];

/// Where a volume comes from, which decides who owns its publish right.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A PVC: the admin-owned StorageClass decides; publishes unless `publish: "false"`.
    Persistent,
    /// An inline volume: publishes only in namespaces the driver's config allows.
    Ephemeral,
}

/// Parsed, validated parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeParams {
    /// The cache.
    pub cache: CacheKey,
    /// Publish policy.
    pub policy: Policy,
    /// Restore sources while the cache has no version.
    pub fallbacks: Vec<CacheKey>,
    /// When to publish.
    pub publish_when: PublishWhen,
    /// Owner and mode of the volume's root.
    pub root: RootSpec,
    /// The cache's size (`cacheSize`): its layers and uppers live in an image of that size.
    pub cache_size: Option<u64>,
    /// Our parameters as given, for idempotency checks and the volume context.
    pub given: BTreeMap<String, String>,
}

fn invalid(key: &str, rule: &str) -> CsiError {
    CsiError::Invalid { field: format!("parameter {key}"), rule: rule.to_string() }
}

/// A user or group id: `u32::MAX` is chown's "leave unchanged", never an owner.
fn parse_id(map: &HashMap<String, String>, key: &str) -> Result<Option<u32>, CsiError> {
    let Some(v) = map.get(key) else { return Ok(None) };
    match v.parse::<u32>() {
        Ok(id) if id != u32::MAX && v.bytes().all(|b| b.is_ascii_digit()) => Ok(Some(id)),
        _ => Err(invalid(key, "must be a decimal id from 0 to 4294967294")),
    }
}

/// The root's owner and mode. A world-writable mode lets any user of the node's pods plant
/// files the next job trusts, so only a StorageClass may allow it, and only by saying so.
fn parse_root(map: &HashMap<String, String>, kind: Kind) -> Result<RootSpec, CsiError> {
    let mode = match map.get("mode") {
        None => None,
        Some(v) => {
            let digits = v.strip_prefix("0o").unwrap_or(v);
            match u32::from_str_radix(digits, 8) {
                Ok(m) if m <= 0o7777 && !digits.is_empty() && digits.len() <= 5 => Some(m),
                _ => return Err(invalid("mode", "must be octal permission bits such as 0775 (at most 07777)")),
            }
        }
    };
    let world_writable = parse_bool(map, "worldWritable")?;
    if world_writable.is_some() && kind == Kind::Ephemeral {
        return Err(invalid("worldWritable", "only a StorageClass may allow a world-writable mode"));
    }
    if mode.is_some_and(|m| m & 0o002 != 0) && world_writable != Some(true) {
        return Err(invalid(
            "mode",
            "must not be world-writable (o+w) unless the StorageClass also sets worldWritable: \"true\"",
        ));
    }
    Ok(RootSpec { uid: parse_id(map, "uid")?, gid: parse_id(map, "gid")?, mode })
}

fn parse_bool(map: &HashMap<String, String>, key: &str) -> Result<Option<bool>, CsiError> {
    match map.get(key).map(String::as_str) {
        None => Ok(None),
        Some("true") => Ok(Some(true)),
        Some("false") => Ok(Some(false)),
        Some(_) => Err(invalid(key, "must be \"true\" or \"false\"")),
    }
}

impl VolumeParams {
    /// Validates `map`; `inline_publish` lists the namespaces whose inline volumes may publish.
    pub fn parse(
        map: &HashMap<String, String>,
        kind: Kind,
        inline_publish: &HashSet<String>,
    ) -> Result<Self, CsiError> {
        for key in map.keys() {
            if !key.starts_with(METADATA_PREFIX) && !KEYS.contains(&key.as_str()) {
                return Err(invalid(key, &format!("is not a known parameter (known: {})", KEYS.join(", "))));
            }
        }
        let name = map.get("cacheName").ok_or(CsiError::Missing("parameter cacheName"))?;
        // The namespace comes from Kubernetes metadata, never from a pod author's attributes.
        let namespace = match kind {
            Kind::Persistent => map.get(PVC_NAMESPACE).or(map.get("namespace")),
            Kind::Ephemeral => map.get(POD_NAMESPACE),
        }
        .map_or("default", String::as_str);
        let cache = CacheKey::new(namespace, name).map_err(|e| CsiError::Invalid {
            field: if e.field == "namespace" { "namespace".into() } else { "parameter cacheName".into() },
            rule: e.to_string(),
        })?;
        let asked = parse_bool(map, "publish")?;
        let publish = match kind {
            Kind::Persistent => asked.unwrap_or(true),
            Kind::Ephemeral => inline_publish.contains(namespace) && asked.unwrap_or(true),
        };
        let fresh = parse_bool(map, "ignoreCache")?.unwrap_or(false);
        let on_stale = match map.get("onStale").map(String::as_str) {
            None | Some("skip") => OnStale::Skip,
            Some("stack") => OnStale::Stack,
            Some(_) => return Err(invalid("onStale", "must be \"skip\" or \"stack\"")),
        };
        let publish_when = PublishWhen::parse(map.get("publishWhen").map(String::as_str))
            .map_err(|rule| invalid("publishWhen", rule))?;
        let max_bytes = match map.get("maxBytes") {
            None => None,
            Some(v) => Some(
                v.parse::<bytesize::ByteSize>()
                    .map(|b| b.as_u64())
                    .map_err(|_| invalid("maxBytes", "must be a size in bytes such as 1073741824 or 1GiB"))?,
            ),
        };
        let cache_size = match map.get("cacheSize") {
            None => None,
            Some(v) => match crate::store::image::parse_size(v) {
                Some(bytes) if bytes >= crate::store::image::MIN_CACHE_SIZE => Some(bytes),
                Some(_) => return Err(invalid("cacheSize", "must be at least 16Mi (an ext4 image with a journal)")),
                None => return Err(invalid("cacheSize", crate::store::image::SIZE_RULE)),
            },
        };
        let mut fallbacks = Vec::new();
        for item in map.get("fallbackCaches").map(String::as_str).unwrap_or("").split(',') {
            let item = item.trim();
            if item.is_empty() {
                continue;
            }
            let bad = |e: crate::store::NameError| invalid("fallbackCaches", &e.to_string());
            let key = match (item.split_once('/'), kind) {
                // An admin-owned StorageClass may point a pull-request namespace at main's cache
                // in another namespace: read-only, since fallbacks are only ever restored.
                (Some((ns, name)), Kind::Persistent) => CacheKey::new(ns, name).map_err(bad)?,
                (Some(_), Kind::Ephemeral) => {
                    return Err(invalid(
                        "fallbackCaches",
                        "inline volumes may only fall back to caches of their own namespace (no NAMESPACE/NAME)",
                    ))
                }
                // Otherwise fallbacks stay inside the volume's namespace.
                (None, _) => CacheKey { namespace: cache.namespace.clone(), name: Name::new(item).map_err(bad)? },
            };
            fallbacks.push(key);
        }
        let given =
            map.iter().filter(|(k, _)| !k.starts_with(METADATA_PREFIX)).map(|(k, v)| (k.clone(), v.clone())).collect();
        let root = parse_root(map, kind)?;
        let keep_versions =
            match map.get("keepVersions") {
                None => None,
                Some(v) => match v.parse::<usize>() {
                    Ok(k @ 1..=1000) if v.bytes().all(|b| b.is_ascii_digit()) => Some(k),
                    _ => return Err(invalid(
                        "keepVersions",
                        "must be a number of versions from 1 to 1000 (it can only lower the driver's --keep-versions)",
                    )),
                },
            };
        let policy = Policy { publish, fresh, on_stale, max_bytes, read_only: false, publish_when, keep_versions };
        Ok(Self { cache, policy, fallbacks, publish_when, root, cache_size, given })
    }

    /// What CreateVolume returns as the volume context.
    pub fn context(&self) -> HashMap<String, String> {
        let mut ctx: HashMap<String, String> = self.given.clone().into_iter().collect();
        ctx.insert("namespace".into(), self.cache.namespace.to_string());
        ctx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// Parameters in, and the cache and mode out (or a piece of the error).
    type Case<'a> = (&'a [(&'a str, &'a str)], Result<&'a str, &'a str>);

    #[test]
    fn table() {
        let none = HashSet::new();
        let cases: &[Case] = &[
            (&[("cacheName", "m2")], Ok("default/m2 publish")),
            (&[("cacheName", "m2"), (PVC_NAMESPACE, "team")], Ok("team/m2 publish")),
            (&[("cacheName", "m2"), ("publish", "false")], Ok("default/m2 read-only")),
            (&[], Err("parameter cacheName is required")),
            (&[("cacheName", "../x")], Err("parameter cacheName")),
            (&[("cacheName", "m2"), ("publish", "yes")], Err("parameter publish")),
            (&[("cacheName", "m2"), ("onStale", "merge")], Err("parameter onStale")),
            (&[("cacheName", "m2"), ("publishWhen", "sometimes")], Err("parameter publishWhen")),
            (&[("cacheName", "m2"), ("maxBytes", "lots")], Err("parameter maxBytes")),
            (&[("cacheName", "m2"), ("cacheSize", "20MB")], Err("parameter cacheSize")),
            (&[("cacheName", "m2"), ("cacheSize", "1Mi")], Err("at least 16Mi")),
            (&[("cacheName", "m2"), ("fallbackCaches", "main,../etc")], Err("parameter fallbackCaches")),
            (&[("cacheName", "m2"), ("cachename", "typo")], Err("parameter cachename is invalid")),
            (&[("cacheName", "m2"), (PVC_NAMESPACE, "Bad_NS")], Err("namespace")),
        ];
        for (pairs, want) in cases {
            let got = VolumeParams::parse(&map(pairs), Kind::Persistent, &none);
            match (got, want) {
                (Ok(p), Ok(w)) => {
                    let mode = if p.policy.publish { "publish" } else { "read-only" };
                    assert_eq!(format!("{} {mode}", p.cache), *w, "{pairs:?}");
                }
                (Err(e), Err(w)) => assert!(e.to_string().contains(w), "{pairs:?}: {e}"),
                (got, want) => panic!("{pairs:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn owner_parameters() {
        let none = HashSet::new();
        let root = |pairs: &[(&str, &str)], kind| {
            let mut m = map(pairs);
            m.insert("cacheName".into(), "m2".into());
            VolumeParams::parse(&m, kind, &none).map(|p| p.root).map_err(|e| e.to_string())
        };
        let spec = |uid, gid, mode| RootSpec { uid, gid, mode };
        let ok: &[(&[(&str, &str)], RootSpec)] = &[
            (&[], spec(None, None, None)),
            (&[("uid", "1000"), ("gid", "1001")], spec(Some(1000), Some(1001), None)),
            (&[("uid", "0"), ("mode", "0775")], spec(Some(0), None, Some(0o775))),
            (&[("mode", "2770")], spec(None, None, Some(0o2770))),
            (&[("mode", "0o750")], spec(None, None, Some(0o750))),
            (&[("mode", "0777"), ("worldWritable", "true")], spec(None, None, Some(0o777))),
            (&[("uid", "4294967294")], spec(Some(u32::MAX - 1), None, None)),
        ];
        for (pairs, want) in ok {
            assert_eq!(root(pairs, Kind::Persistent).as_ref(), Ok(want), "{pairs:?}");
        }
        type Bad<'a> = (&'a [(&'a str, &'a str)], Kind, &'a str);
        let bad: &[Bad] = &[
            (&[("uid", "-1")], Kind::Persistent, "parameter uid is invalid: must be a decimal id"),
            (&[("uid", "4294967295")], Kind::Persistent, "parameter uid"),
            (&[("gid", "1e3")], Kind::Persistent, "parameter gid"),
            (&[("gid", "+5")], Kind::Persistent, "parameter gid"),
            (&[("uid", "")], Kind::Persistent, "parameter uid"),
            (&[("mode", "0778")], Kind::Persistent, "parameter mode is invalid: must be octal"),
            (&[("mode", "17777")], Kind::Persistent, "parameter mode"),
            (&[("mode", "")], Kind::Persistent, "parameter mode"),
            (&[("mode", "rwx")], Kind::Persistent, "parameter mode"),
            (&[("mode", "0777")], Kind::Persistent, "must not be world-writable"),
            (&[("mode", "0666"), ("worldWritable", "false")], Kind::Persistent, "must not be world-writable"),
            (&[("mode", "0777"), ("worldWritable", "true")], Kind::Ephemeral, "parameter worldWritable"),
            (&[("worldWritable", "yes")], Kind::Persistent, "parameter worldWritable"),
        ];
        for (pairs, kind, want) in bad {
            let err = root(pairs, *kind).expect_err("refused");
            assert!(err.contains(want), "{pairs:?}: {err}");
        }
    }

    #[test]
    fn keep_versions_lowers_only_within_its_range() {
        let none = HashSet::new();
        let parse = |v: &str| {
            VolumeParams::parse(&map(&[("cacheName", "m2"), ("keepVersions", v)]), Kind::Persistent, &none)
                .map(|p| p.policy.keep_versions)
        };
        assert_eq!(parse("2").unwrap(), Some(2));
        for bad in ["0", "1001", "-1", "two", ""] {
            let err = parse(bad).expect_err(bad).to_string();
            assert!(err.contains("parameter keepVersions"), "{bad}: {err}");
        }
    }

    #[test]
    fn inline_volumes_publish_only_where_the_driver_allows() {
        let allowed: HashSet<String> = ["ci".to_string()].into();
        let attrs = |ns: &str| map(&[("cacheName", "m2"), (POD_NAMESPACE, ns), (EPHEMERAL_KEY, "true")]);
        assert!(VolumeParams::parse(&attrs("ci"), Kind::Ephemeral, &allowed).unwrap().policy.publish);
        assert!(!VolumeParams::parse(&attrs("dev"), Kind::Ephemeral, &allowed).unwrap().policy.publish);
        // A pod author cannot grant themselves the right, nor pick another namespace.
        let mut sneaky = attrs("dev");
        sneaky.insert("publish".into(), "true".into());
        sneaky.insert("namespace".into(), "ci".into());
        let p = VolumeParams::parse(&sneaky, Kind::Ephemeral, &allowed).unwrap();
        assert!(!p.policy.publish);
        assert_eq!(p.cache.namespace.as_str(), "dev");
    }

    #[test]
    fn cross_namespace_fallbacks_only_from_storage_classes() {
        let pvc = map(&[("cacheName", "pr-1"), ("fallbackCaches", "builds/main"), (PVC_NAMESPACE, "prs")]);
        let p = VolumeParams::parse(&pvc, Kind::Persistent, &HashSet::new()).unwrap();
        assert_eq!(p.fallbacks[0].to_string(), "builds/main");
        assert_eq!(p.cache.to_string(), "prs/pr-1");
        let inline = map(&[("cacheName", "pr-1"), ("fallbackCaches", "builds/main"), (POD_NAMESPACE, "prs")]);
        let err = VolumeParams::parse(&inline, Kind::Ephemeral, &HashSet::new()).unwrap_err();
        assert!(err.to_string().contains("own namespace"), "{err}");
    }

    #[test]
    fn fallbacks_and_sizes() {
        let p = VolumeParams::parse(
            &map(&[("cacheName", "pr-1"), ("fallbackCaches", "main, release"), ("maxBytes", "1GiB")]),
            Kind::Persistent,
            &HashSet::new(),
        )
        .unwrap();
        assert_eq!(p.fallbacks.iter().map(|c| c.to_string()).collect::<Vec<_>>(), ["default/main", "default/release"]);
        assert_eq!(p.policy.max_bytes, Some(1 << 30));
        assert_eq!(p.cache_size, None);
        let sized =
            VolumeParams::parse(&map(&[("cacheName", "m2"), ("cacheSize", "20Gi")]), Kind::Persistent, &HashSet::new())
                .unwrap();
        assert_eq!(sized.cache_size, Some(20 << 30));
    }
}
