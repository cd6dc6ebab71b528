//! The generated cache shapes the benches share (a small tree, a Maven repository, a
//! node_modules tree), written deterministically from their index, and the job's choice of
//! which files a run touches. Included by `compare` and `squash` with `#[path]`.

// Each bench uses part of it.
#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

/// A regular file of a generated cache; its content is derived from its index in the spec.
pub struct Entry {
    pub path: String,
    pub size: usize,
    /// Incompressible content (jars are zip files), else source-like text.
    pub binary: bool,
}

/// A generated cache: files sorted by path (so directories are written together) and symlinks.
pub struct Spec {
    pub files: Vec<Entry>,
    pub links: Vec<(String, String)>,
}

impl Spec {
    pub fn new(mut files: Vec<Entry>, links: Vec<(String, String)>) -> Self {
        files.sort_by(|a, b| a.path.cmp(&b.path));
        Self { files, links }
    }

    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|e| e.size as u64).sum()
    }
}

/// splitmix64: deterministic, fast, and good enough for file sizes and content.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0xA24B_AED4_963E_E407))
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// 1,000 source files of up to 20 KiB: the quick run.
pub fn small_spec() -> Spec {
    let mut rng = Rng::new(1);
    let files = (0..1_000)
        .map(|i| Entry {
            path: format!("src/m{}/f{i}.txt", i % 10),
            size: 512 + rng.below(19_457) as usize,
            binary: false,
        })
        .collect();
    Spec::new(files, Vec::new())
}

/// A local Maven repository: 2,500 artifact versions of 8 files; one version in 33 has a big jar.
pub fn maven_spec() -> Spec {
    const SUFFIXES: [(&str, bool); 8] = [
        (".jar", true),
        (".jar.sha1", false),
        (".pom", false),
        (".pom.sha1", false),
        ("-sources.jar", true),
        ("-sources.jar.sha1", false),
        ("-javadoc.jar", true),
        ("._remote.repositories", false),
    ];
    let mut rng = Rng::new(2);
    let mut files = Vec::with_capacity(20_000);
    for d in 0..2_500 {
        let (group, artifact, version) = (d / 50, (d % 50) / 2, d % 2);
        let dir = format!("repository/org/g{group}/a{artifact}/1.{version}");
        for (k, (suffix, binary)) in SUFFIXES.iter().enumerate() {
            let size = if k == 0 && d % 33 == 0 {
                (1 << 20) + rng.below(4 << 20) as usize
            } else {
                // Skewed towards small files: most are 1–10 KiB, a few approach 64 KiB.
                1024 + (rng.unit().powi(4) * 63.0 * 1024.0) as usize
            };
            files.push(Entry { path: format!("{dir}/a{artifact}-1.{version}{suffix}"), size, binary: *binary });
        }
    }
    Spec::new(files, Vec::new())
}

/// 2,000 packages of 100 files, one in ten nested in another's node_modules, with `.bin` links.
pub fn node_spec() -> Spec {
    let mut rng = Rng::new(3);
    let mut files = Vec::with_capacity(200_000);
    let mut links = Vec::new();
    for p in 0..2_000 {
        let base = if p % 10 == 0 && p > 0 {
            format!("node_modules/p{}/node_modules/p{p}", p - 1)
        } else {
            format!("node_modules/p{p}")
        };
        for i in 0..100 {
            let rel = match (i, i % 4) {
                (0, _) => "index.js".to_string(),
                (1, _) => "package.json".to_string(),
                (_, 0) => format!("f{i}.js"),
                (_, 1) => format!("lib/f{i}.js"),
                (_, 2) => format!("lib/d{}/f{i}.js", i % 7),
                _ => format!("lib/d{}/s{}/f{i}.js", i % 7, i % 3),
            };
            let size = 200 + (rng.unit().powi(2) * 14_800.0) as usize;
            files.push(Entry { path: format!("{base}/{rel}"), size, binary: false });
        }
        if p % 10 == 1 {
            links.push((format!("node_modules/.bin/p{p}"), format!("../p{p}/index.js")));
        }
    }
    Spec::new(files, links)
}

/// Tokens of source-like text: compresses about as well as real caches do.
pub const WORDS: [&str; 32] = [
    "function",
    "return",
    "const",
    "require(",
    "module",
    "exports",
    "=>",
    "{",
    "}",
    "(",
    ")",
    ";\n",
    "this",
    "value",
    "if",
    "else",
    "import",
    "from",
    "async",
    "await",
    "null",
    "undefined",
    "0x1f",
    "\"use strict\"",
    "prototype",
    "length",
    "callback",
    "error",
    "options",
    "default",
    "new",
    "Object",
];

/// Fills `buf` with `size` bytes derived from `seed`.
pub fn fill(buf: &mut Vec<u8>, seed: u64, size: usize, binary: bool) {
    buf.clear();
    let mut rng = Rng::new(seed);
    while buf.len() < size {
        let r = rng.next();
        if binary {
            buf.extend_from_slice(&r.to_le_bytes());
            continue;
        }
        for shift in (0..60).step_by(5) {
            buf.extend_from_slice(WORDS[(r >> shift) as usize % WORDS.len()].as_bytes());
            buf.push(b' ');
        }
    }
    buf.truncate(size);
}

pub fn write_file(path: &Path, buf: &[u8]) {
    fs::write(path, buf).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Writes the cache's first version into `root`.
pub fn write_tree(root: &Path, spec: &Spec) {
    let mut buf = Vec::new();
    let mut last_dir = PathBuf::new();
    for (i, e) in spec.files.iter().enumerate() {
        let path = root.join(&e.path);
        let dir = path.parent().expect("file in a directory");
        if dir != last_dir {
            fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
            last_dir = dir.to_path_buf();
        }
        fill(&mut buf, i as u64, e.size, e.binary);
        write_file(&path, &buf);
    }
    for (link, target) in &spec.links {
        let path = root.join(link);
        fs::create_dir_all(path.parent().expect("link in a directory")).expect("mkdir for link");
        symlink(target, &path).unwrap_or_else(|e| panic!("symlink {}: {e}", path.display()));
    }
}

/// Where run `run` adds a file next to entry `e`.
pub fn added_path(e: &Entry, run: usize) -> String {
    let (dir, name) = e.path.rsplit_once('/').expect("file in a directory");
    format!("{dir}/new-{run}-{name}")
}

/// Which of the job's choices entry `i` falls in for run `run`: a different 1% each run.
pub fn job_slot(i: usize, run: usize) -> usize {
    (i + 7 * run) % 100
}
