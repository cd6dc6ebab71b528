//! Entry names: a tar path checked and split into names, and OCI's whiteout names mapped to
//! overlay's. Pure functions, so the rules are tested as a table.

/// Marks a whiteout in an OCI layer: `.wh.<name>` hides `<name>` of the layers below.
pub(super) const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// An OCI opaque marker: the directory holding it hides everything the layers below put there.
pub(super) const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
/// aufs's own metadata names (`.wh..wh.plnk`, ...), which no OCI layer may carry.
const AUFS_PREFIX: &[u8] = b".wh..wh.";
/// The longest name one directory entry may have on Linux.
const NAME_MAX: usize = 255;

/// What the last name of a tar entry means in overlay form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Marker<'a> {
    /// An ordinary entry.
    Plain,
    /// `.wh.<name>`: a whiteout (a character device 0/0) named `<name>`.
    Whiteout(&'a [u8]),
    /// `.wh..wh..opq`: the parent directory is opaque.
    Opaque,
}

/// Classifies the last name of an entry.
pub(super) fn marker(name: &[u8]) -> Result<Marker<'_>, &'static str> {
    if name == OPAQUE_MARKER {
        return Ok(Marker::Opaque);
    }
    if name.starts_with(AUFS_PREFIX) {
        return Err("aufs metadata names (.wh..wh.*) are not supported");
    }
    match name.strip_prefix(WHITEOUT_PREFIX) {
        // `.wh.`, `.wh..` and `.wh...` would hide the directory itself or its parent.
        Some(b"" | b"." | b"..") => Err("a whiteout must name an entry of its directory"),
        Some(hidden) => Ok(Marker::Whiteout(hidden)),
        None => Ok(Marker::Plain),
    }
}

/// The OCI name of the whiteout that hides `name`.
pub(super) fn whiteout_name(name: &[u8]) -> Vec<u8> {
    [WHITEOUT_PREFIX, name].concat()
}

/// A checked relative path inside a layer.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct EntryPath<'a> {
    /// Its names, root first; empty for the layer's root (`./`).
    pub names: Vec<&'a [u8]>,
    /// Whether the tar spelled it with a trailing `/` (only directories may).
    pub slash: bool,
}

/// Checks a path as a tar names it and splits it into names: relative, no `..`, no NUL, at
/// most `max` bytes; `.` and empty names (`./a`, `a//b`) are dropped.
pub(super) fn parse_path(raw: &[u8], max: usize) -> Result<EntryPath<'_>, String> {
    if raw.is_empty() {
        return Err("the path is empty".into());
    }
    if raw.len() > max {
        return Err(format!("the path is longer than {max} bytes"));
    }
    if raw.contains(&0) {
        return Err("the path must not contain a NUL byte".into());
    }
    if raw[0] == b'/' {
        return Err("the path must be relative (not start with '/')".into());
    }
    let mut names = Vec::new();
    for name in raw.split(|&b| b == b'/') {
        match name {
            b"" | b"." => {}
            b".." => return Err("the path must not contain '..'".into()),
            _ if name.len() > NAME_MAX => return Err(format!("a name in the path is longer than {NAME_MAX} bytes")),
            _ => names.push(name),
        }
    }
    Ok(EntryPath { names, slash: raw.ends_with(b"/") })
}

/// Joins names with `/`: the key an entry is known by inside one layer.
pub(super) fn join(names: &[&[u8]]) -> Vec<u8> {
    names.join(&b'/')
}

/// One PAX extended-header record, `"<len> <key>=<value>\n"`, where `<len>` counts itself.
pub(super) fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let rest = key.len() + value.len() + 3;
    let mut len = rest + digits(rest);
    // Adding the length's own digits can carry it into one more digit (e.g. 98 -> 100).
    if digits(len) != digits(rest) {
        len = rest + digits(len);
    }
    let mut record = format!("{len} {key}=").into_bytes();
    record.extend_from_slice(value);
    record.push(b'\n');
    record
}

fn digits(n: usize) -> usize {
    n.to_string().len()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A raw path, the names it splits into, and whether it ends with `/`.
    type Case<'a> = (&'a [u8], &'a [&'a [u8]], bool);

    #[test]
    fn paths_are_checked_and_split() {
        let ok: &[Case<'_>] = &[
            (b"a", &[b"a"], false),
            (b"a/b", &[b"a", b"b"], false),
            (b"a/b/", &[b"a", b"b"], true),
            (b"./a", &[b"a"], false),
            (b"././a/./b", &[b"a", b"b"], false),
            (b"a//b", &[b"a", b"b"], false),
            (b"./", &[], true),
            (b".", &[], false),
            (b"..a/b..", &[b"..a", b"b.."], false),
            (b".wh.x", &[b".wh.x"], false),
        ];
        for (raw, names, slash) in ok {
            let got = parse_path(raw, 4096).unwrap_or_else(|e| panic!("{:?}: {e}", String::from_utf8_lossy(raw)));
            assert_eq!(got, EntryPath { names: names.to_vec(), slash: *slash }, "{:?}", String::from_utf8_lossy(raw));
        }
        let long_name = vec![b'n'; 256];
        let bad: &[(&[u8], &str)] = &[
            (b"", "empty"),
            (b"/abs", "relative"),
            (b"//abs", "relative"),
            (b"..", "'..'"),
            (b"../escape", "'..'"),
            (b"a/../../x", "'..'"),
            (b"a/..", "'..'"),
            (b"a\0b", "NUL"),
            (&long_name, "longer than 255"),
        ];
        for (raw, rule) in bad {
            let err = parse_path(raw, 4096).expect_err(&String::from_utf8_lossy(raw));
            assert!(err.contains(rule), "{:?}: {err}", String::from_utf8_lossy(raw));
        }
        assert!(parse_path(b"abcd", 3).unwrap_err().contains("longer than 3 bytes"));
        assert!(parse_path(b"abc", 3).is_ok());
    }

    #[test]
    fn whiteout_names_map_both_ways() {
        assert_eq!(marker(b"file"), Ok(Marker::Plain));
        assert_eq!(marker(b".whx"), Ok(Marker::Plain));
        assert_eq!(marker(b".wh.file"), Ok(Marker::Whiteout(b"file")));
        assert_eq!(marker(b".wh..hidden"), Ok(Marker::Whiteout(b".hidden")));
        assert_eq!(marker(b".wh..wh..opq"), Ok(Marker::Opaque));
        for bad in [&b".wh."[..], b".wh..", b".wh...", b".wh..wh.plnk", b".wh..wh..opqx"] {
            assert!(marker(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(whiteout_name(b"file"), b".wh.file");
        assert_eq!(marker(&whiteout_name(b".x")), Ok(Marker::Whiteout(b".x")));
    }

    #[test]
    fn pax_records_count_their_own_length() {
        assert_eq!(pax_record("path", b"a"), b"9 path=a\n");
        assert_eq!(pax_record("path", b"ab"), b"11 path=ab\n");
        for n in 0..300 {
            let value = vec![b'v'; n];
            let record = pax_record("SCHILY.xattr.user.x", &value);
            let space = record.iter().position(|&b| b == b' ').unwrap();
            let len: usize = std::str::from_utf8(&record[..space]).unwrap().parse().unwrap();
            assert_eq!(len, record.len(), "value of {n} bytes");
        }
    }

    #[test]
    fn names_join_with_slashes() {
        assert_eq!(join(&[b"a", b"b"]), b"a/b");
        assert_eq!(join(&[]), b"");
    }
}
