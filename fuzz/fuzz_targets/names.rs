//! Names → validation → paths. Accepted names obey the rule and build only paths inside the
//! state dir with the expected depth; rejected ones give an error naming the field.
#![no_main]

use std::path::Path;

use jobcachefs::store::{CacheKey, LayerId, Layout, Name, VolumeId};
use jobcachefs_fuzz::*;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else { return };
    let whole = String::from_utf8_lossy(rest);
    let at = split as usize % (rest.len() + 1);
    let (a, b) = rest.split_at(at);
    let (ns, name) = (String::from_utf8_lossy(a), String::from_utf8_lossy(b));

    let local = Layout::new("/s").unwrap();
    let shared = Layout::new("/s").unwrap().with_shared("/shared").unwrap();
    let layouts = [(&local, Path::new("/s")), (&shared, Path::new("/shared"))];

    // Name and LayerId: the lower-case rule.
    for s in [&*whole, &*ns, &*name] {
        match Name::new(s) {
            Ok(n) => {
                assert!(is_valid_name(s), "Name accepted {s:?}");
                assert_eq!(n.as_str(), s);
                assert_eq!(n.to_string(), s);
                let json = serde_json::to_string(&n).unwrap();
                assert_eq!(serde_json::from_str::<Name>(&json).unwrap(), n);
            }
            Err(e) => {
                assert!(!is_valid_name(s), "Name rejected valid {s:?}: {e}");
                check_error(&e, "name");
                // Deserialising goes through the same check.
                assert!(serde_json::from_str::<Name>(&serde_json::to_string(s).unwrap()).is_err());
            }
        }
        match LayerId::new(s) {
            Ok(id) => {
                assert!(is_valid_name(s), "LayerId accepted {s:?}");
                for (layout, store_root) in layouts {
                    check_layer_paths(layout, store_root, &id);
                }
            }
            Err(e) => {
                assert!(!is_valid_name(s), "LayerId rejected valid {s:?}: {e}");
                check_error(&e, "layer id");
            }
        }
        match VolumeId::new(s) {
            Ok(id) => {
                assert!(is_valid_volume_id(s), "VolumeId accepted {s:?}");
                let json = serde_json::to_string(&id).unwrap();
                assert_eq!(serde_json::from_str::<VolumeId>(&json).unwrap(), id);
                for (layout, store_root) in layouts {
                    check_volume_paths(layout, store_root, &id);
                }
            }
            Err(e) => {
                assert!(!is_valid_volume_id(s), "VolumeId rejected valid {s:?}: {e}");
                check_error(&e, "volume id");
                assert!(serde_json::from_str::<VolumeId>(&serde_json::to_string(s).unwrap()).is_err());
            }
        }
    }

    // CacheKey: the namespace is checked first, and the error says which part is wrong.
    match CacheKey::new(&ns, &name) {
        Ok(key) => {
            assert!(is_valid_name(&ns) && is_valid_name(&name), "CacheKey accepted {ns:?}/{name:?}");
            check_key(&key);
            assert_eq!(key.to_string(), format!("{ns}/{name}"));
            let json = serde_json::to_vec(&key).unwrap();
            assert_eq!(serde_json::from_slice::<CacheKey>(&json).unwrap(), key);
            for (layout, store_root) in layouts {
                check_cache_paths(layout, store_root, &key);
            }
        }
        Err(e) if !is_valid_name(&ns) => check_error(&e, "namespace"),
        Err(e) => {
            assert!(!is_valid_name(&name), "CacheKey rejected valid {ns:?}/{name:?}: {e}");
            check_error(&e, "cache name");
        }
    }

    // The state dir itself: whatever is accepted is absolute, short and safe in mount options.
    if let Ok(layout) = Layout::new(&*whole) {
        let text = whole.as_bytes();
        assert!(layout.root().is_absolute() && text.len() <= 96, "{whole:?}");
        assert!(!text.iter().any(|b| matches!(b, b',' | b':' | b'\\') || b.is_ascii_control()), "{whole:?}");
    }
});
