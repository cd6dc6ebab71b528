//! Parsing of `/proc/self/mountinfo`, the kernel's own record of what is mounted where.
//!
//! Idempotent publish and teardown are decided from this table rather than from our own
//! bookkeeping, because only the kernel knows what survived a crash or a restart.

use std::ffi::OsString;
use std::fs;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use super::MountError;

/// Where the kernel lists this process's mounts.
pub const MOUNTINFO_PATH: &str = "/proc/self/mountinfo";

/// One line of `/proc/self/mountinfo` (see proc(5)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Unique id of the mount.
    pub mount_id: u32,
    /// Id of the mount this one sits on.
    pub parent_id: u32,
    /// `major:minor` of the filesystem's device; equal for binds of one filesystem.
    pub major_minor: String,
    /// The directory of the filesystem that is mounted here (not `/` for a bind of a subtree).
    pub root: PathBuf,
    /// Where it is mounted, relative to the process's root.
    pub mount_point: PathBuf,
    /// Per-mount options (`ro`/`rw`, `nosuid`, ...).
    pub mount_options: String,
    /// Filesystem type, e.g. `overlay` or `ext4`.
    pub fstype: String,
    /// Filesystem-specific source, e.g. a device or `overlay`.
    pub source: String,
    /// Per-superblock options, e.g. an overlay's `lowerdir=`.
    pub super_options: String,
}

impl MountEntry {
    /// Whether this mount is read-only (its per-mount options hold `ro`).
    pub fn is_readonly(&self) -> bool {
        self.mount_options.split(',').any(|opt| opt == "ro")
    }
}

/// Parses the text of `/proc/self/mountinfo`, skipping lines it cannot make sense of.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    parse_mountinfo_bytes(text.as_bytes())
}

/// Parses mountinfo as bytes, so paths that are not UTF-8 survive intact.
fn parse_mountinfo_bytes(bytes: &[u8]) -> Vec<MountEntry> {
    bytes.split(|&b| b == b'\n').filter_map(parse_line).collect()
}

fn parse_line(line: &[u8]) -> Option<MountEntry> {
    // Fields are separated by single spaces; spaces inside paths are escaped as \040, so a
    // plain split is safe.
    let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
    // The optional fields (shared:N, master:N, ...) come in any number before a lone "-".
    let sep = fields.iter().skip(6).position(|f| *f == b"-")? + 6;
    let [mount_id, parent_id, major_minor, root, mount_point, mount_options, ..] = fields[..] else {
        return None;
    };
    let post = &fields[sep + 1..];
    // Very old kernels omitted super options; fstype and source are always there.
    let (fstype, source) = (post.first()?, post.get(1)?);
    let super_options = post.get(2).copied().unwrap_or_default();
    let major_minor = std::str::from_utf8(major_minor).ok()?;
    if !major_minor.contains(':') || fstype.is_empty() {
        return None;
    }
    Some(MountEntry {
        mount_id: std::str::from_utf8(mount_id).ok()?.parse().ok()?,
        parent_id: std::str::from_utf8(parent_id).ok()?.parse().ok()?,
        major_minor: major_minor.to_owned(),
        root: unescape_path(root),
        mount_point: unescape_path(mount_point),
        mount_options: String::from_utf8_lossy(mount_options).into_owned(),
        fstype: String::from_utf8_lossy(&unescape(fstype)).into_owned(),
        source: String::from_utf8_lossy(&unescape(source)).into_owned(),
        super_options: String::from_utf8_lossy(&unescape(super_options)).into_owned(),
    })
}

fn unescape_path(field: &[u8]) -> PathBuf {
    PathBuf::from(OsString::from_vec(unescape(field)))
}

/// Undoes the kernel's `\ooo` octal escapes (it escapes space, tab, newline and backslash).
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\' {
            if let Some(byte) = field.get(i + 1..i + 4).and_then(octal_byte) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(field[i]);
        i += 1;
    }
    out
}

fn octal_byte(digits: &[u8]) -> Option<u8> {
    digits.iter().try_fold(0u8, |acc, &d| {
        if (b'0'..=b'7').contains(&d) {
            acc.checked_mul(8)?.checked_add(d - b'0')
        } else {
            None
        }
    })
}

/// Reads and parses this process's mount table.
pub fn read_mountinfo() -> Result<Vec<MountEntry>, MountError> {
    let bytes = fs::read(MOUNTINFO_PATH)
        .map_err(|source| MountError::MountInfo { path: PathBuf::from(MOUNTINFO_PATH), source })?;
    Ok(parse_mountinfo_bytes(&bytes))
}

/// The topmost mount whose mount point is exactly `path`, if any.
///
/// `path` must already be canonical, as the kernel lists resolved paths.
pub fn mount_at<'a>(entries: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    let here: Vec<&MountEntry> = entries.iter().filter(|e| e.mount_point == path).collect();
    // Later lines are normally mounted later, so the last is on top; but a mount stacked
    // on one of these is a child of it, so follow children up in case the order lies.
    let mut top = *here.last()?;
    for _ in 0..here.len() {
        match here.iter().find(|e| e.parent_id == top.mount_id && e.mount_id != top.mount_id) {
            Some(child) => top = child,
            None => break,
        }
    }
    Some(top)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        ids: (u32, u32),
        root: &str,
        mount_point: &str,
        mount_options: &str,
        fstype: &str,
        source: &str,
        super_options: &str,
    ) -> MountEntry {
        MountEntry {
            mount_id: ids.0,
            parent_id: ids.1,
            major_minor: "0:39".to_owned(),
            root: PathBuf::from(root),
            mount_point: PathBuf::from(mount_point),
            mount_options: mount_options.to_owned(),
            fstype: fstype.to_owned(),
            source: source.to_owned(),
            super_options: super_options.to_owned(),
        }
    }

    #[test]
    fn parses_lines() {
        let cases: Vec<(&str, &str, Option<MountEntry>)> = vec![
            (
                "no optional fields",
                "44 27 0:39 / /tmp/ovt/m rw,relatime - overlay overlay ro,lowerdir=l1:l2",
                Some(entry((44, 27), "/", "/tmp/ovt/m", "rw,relatime", "overlay", "overlay", "ro,lowerdir=l1:l2")),
            ),
            (
                "one optional field",
                "36 35 0:39 / /mnt rw,nosuid shared:1 - tmpfs tmpfs rw,size=1024k",
                Some(entry((36, 35), "/", "/mnt", "rw,nosuid", "tmpfs", "tmpfs", "rw,size=1024k")),
            ),
            (
                "several optional fields",
                "36 35 0:39 /sub /mnt/x ro shared:7 master:3 propagate_from:2 unbindable - ext4 /dev/vda rw",
                Some(entry((36, 35), "/sub", "/mnt/x", "ro", "ext4", "/dev/vda", "rw")),
            ),
            (
                "escaped space, tab, newline and backslash",
                r"50 27 0:39 /a\040b /mnt/c\011d\012e\134f rw - ext4 /dev/my\040disk rw",
                Some(entry((50, 27), "/a b", "/mnt/c\td\ne\\f", "rw", "ext4", "/dev/my disk", "rw")),
            ),
            (
                "backslash not followed by an octal escape stays",
                r"50 27 0:39 / /mnt/a\9b\04 rw - ext4 /dev/vda rw",
                Some(entry((50, 27), "/", r"/mnt/a\9b\04", "rw", "ext4", "/dev/vda", "rw")),
            ),
            (
                "a directory named '-' is not the separator",
                "51 27 0:39 / /- rw - ext4 /dev/vda rw",
                Some(entry((51, 27), "/", "/-", "rw", "ext4", "/dev/vda", "rw")),
            ),
            (
                "missing super options",
                "52 27 0:39 / /mnt rw - ext4 /dev/vda",
                Some(entry((52, 27), "/", "/mnt", "rw", "ext4", "/dev/vda", "")),
            ),
            ("empty line", "", None),
            ("no separator", "44 27 0:39 / /mnt rw overlay overlay rw", None),
            ("too few fields before the separator", "44 27 0:39 / - overlay overlay rw", None),
            ("no source after the separator", "44 27 0:39 / /mnt rw - overlay", None),
            ("non-numeric id", "x 27 0:39 / /mnt rw - ext4 /dev/vda rw", None),
            ("negative id", "-1 27 0:39 / /mnt rw - ext4 /dev/vda rw", None),
            ("bad device", "44 27 039 / /mnt rw - ext4 /dev/vda rw", None),
        ];
        for (name, line, want) in cases {
            let got = parse_mountinfo(line);
            assert_eq!(got, want.into_iter().collect::<Vec<_>>(), "case {name:?}: {line:?}");
        }
    }

    #[test]
    fn skips_malformed_lines_between_good_ones() {
        let text = "1 0 0:1 / / rw - ext4 /dev/vda rw\n\
                    garbage\n\
                    2 1 0:2 / /proc rw,nosuid - proc proc rw\n";
        let got = parse_mountinfo(text);
        let points: Vec<&Path> = got.iter().map(|e| e.mount_point.as_path()).collect();
        assert_eq!(points, [Path::new("/"), Path::new("/proc")]);
    }

    #[test]
    fn non_utf8_paths_survive() {
        let got = parse_mountinfo_bytes(b"1 0 0:1 / /mnt/\xff rw - ext4 /dev/vda rw");
        assert_eq!(got[0].mount_point, PathBuf::from(OsString::from_vec(b"/mnt/\xff".to_vec())));
    }

    #[test]
    fn readonly_is_a_whole_option() {
        let cases = [
            ("ro", true),
            ("ro,relatime", true),
            ("nosuid,ro", true),
            ("rw,relatime", false),
            ("rw,errors=remount-ro", false),
            ("rootcontext=x", false),
            ("", false),
        ];
        for (options, want) in cases {
            let e = entry((1, 0), "/", "/", options, "ext4", "/dev/vda", "rw");
            assert_eq!(e.is_readonly(), want, "{options:?}");
        }
    }

    #[test]
    fn mount_at_takes_the_topmost() {
        let entries = vec![
            entry((10, 1), "/", "/mnt", "rw", "ext4", "first", ""),
            entry((11, 1), "/", "/other", "rw", "ext4", "other", ""),
            entry((12, 10), "/", "/mnt", "ro", "overlay", "second", ""),
            entry((13, 1), "/", "/mnt/sub", "rw", "tmpfs", "sub", ""),
        ];
        assert_eq!(mount_at(&entries, Path::new("/mnt")).map(|e| e.source.as_str()), Some("second"));
        assert_eq!(mount_at(&entries, Path::new("/other")).map(|e| e.mount_id), Some(11));
        assert_eq!(mount_at(&entries, Path::new("/mnt/")).map(|e| e.mount_id), Some(12));
        assert!(mount_at(&entries, Path::new("/nothing")).is_none());
        assert!(mount_at(&entries, Path::new("/mn")).is_none());

        // A child listed before its parent is still the one on top.
        let reordered = vec![entries[2].clone(), entries[0].clone()];
        assert_eq!(mount_at(&reordered, Path::new("/mnt")).map(|e| e.mount_id), Some(12));
    }

    #[test]
    fn reads_this_process_mounts() {
        let entries = read_mountinfo().expect("read mountinfo");
        assert!(mount_at(&entries, Path::new("/")).is_some(), "no root mount in {entries:?}");
    }
}
