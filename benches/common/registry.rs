//! A real OCI registry for the benches: the Debian `docker-registry` (distribution 2.8) on
//! 127.0.0.1, on a free port, with its storage and log under a directory of the bench's. Its
//! log tells what it served: every response is logged with the bytes it wrote, which is how
//! a bench counts what a step moved without a proxy in the data path. Included with `#[path]`.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The registry binary (`apt-get install docker-registry`).
pub const BINARY: &str = "/usr/bin/docker-registry";

/// A running registry; stopped (SIGKILL, its storage is scratch) when dropped.
pub struct LocalRegistry {
    /// `127.0.0.1:<port>`.
    pub addr: String,
    child: Option<Child>,
    log: PathBuf,
}

/// What the registry answered in a window of its log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Served {
    /// Responses (any method, any status).
    pub requests: u64,
    /// Response body bytes sent (`http.response.written`, but none for a HEAD, whose body
    /// the registry counts and Go's server drops): blobs, manifests, errors.
    pub bytes: u64,
    /// `GET` responses of blobs.
    pub blob_gets: u64,
    /// Each response as `METHOD what status` (`what`: `/v2/`, `manifest`, `blob`, `tags`,
    /// `upload`), in order.
    pub calls: Vec<String>,
}

impl LocalRegistry {
    /// Starts a registry with its storage in `dir/storage` and its log in `dir/registry.log`;
    /// returns once `GET /v2/` answers 200. Panics, with the log, if it does not within 30 s.
    pub fn start(dir: &Path) -> Self {
        if !Path::new(BINARY).exists() {
            panic!("{BINARY} is missing: apt-get install docker-registry");
        }
        fs::create_dir_all(dir.join("storage")).expect("registry storage dir");
        let log = dir.join("registry.log");
        let mut last = String::new();
        // A port found free can be taken before the registry binds it: try a few.
        for _ in 0..3 {
            let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
            let addr = format!("127.0.0.1:{port}");
            let config = dir.join("config.yml");
            let yaml = format!(
                "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n  \
                 delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
                dir.join("storage").display()
            );
            fs::write(&config, yaml).expect("registry config");
            let out = File::create(&log).expect("registry log");
            let err = out.try_clone().expect("registry log");
            let child = Command::new(BINARY)
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .spawn()
                .unwrap_or_else(|e| panic!("start {BINARY}: {e}"));
            let mut reg = LocalRegistry { addr, child: Some(child), log: log.clone() };
            match reg.wait_ready() {
                Ok(()) => return reg,
                Err(why) => {
                    reg.stop();
                    last = format!("{why}; its log:\n{}", fs::read_to_string(&log).unwrap_or_default());
                }
            }
        }
        panic!("the registry did not start: {last}");
    }

    /// Its process id, for a signal handler to kill it.
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// Where the log ends once it is quiet: the start of a window for [`Self::served_since`].
    pub fn mark(&self) -> u64 {
        self.wait_quiet();
        self.log_len()
    }

    fn log_len(&self) -> u64 {
        fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0)
    }

    /// Waits until the log has not grown for 150 ms (a response is logged just after its last
    /// byte is sent, and background work of the nodes may still be talking to the registry).
    pub fn wait_quiet(&self) {
        let mut len = self.log_len();
        let mut since = Instant::now();
        while since.elapsed() < Duration::from_millis(150) {
            std::thread::sleep(Duration::from_millis(25));
            let now = self.log_len();
            if now != len {
                (len, since) = (now, Instant::now());
            }
        }
    }

    /// Everything answered from `mark` to now, once the log is quiet.
    pub fn served_since(&self, mark: u64) -> Served {
        self.wait_quiet();
        let mut text = String::new();
        let mut file = File::open(&self.log).expect("registry log");
        std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(mark)).expect("seek registry log");
        file.read_to_string(&mut text).expect("read registry log");
        let mut served = Served::default();
        for line in text.lines() {
            // `msg="response completed"` (or `... with error`) carries the written bytes.
            let Some(written) = field(line, "http.response.written") else { continue };
            let n = written.parse::<u64>().unwrap_or_else(|_| panic!("registry log line without a size: {line}"));
            let method = field(line, "http.request.method").unwrap_or("?");
            let uri = field(line, "http.request.uri").unwrap_or("?");
            let what = match uri {
                "/v2/" => "/v2/",
                u if u.contains("/manifests/") => "manifest",
                u if u.contains("/blobs/uploads") => "upload",
                u if u.contains("/blobs/") => "blob",
                u if u.ends_with("/tags/list") || u.contains("/tags/list?") => "tags",
                _ => "other",
            };
            served.requests += 1;
            if method != "HEAD" {
                served.bytes += n;
            }
            if method == "GET" && what == "blob" {
                served.blob_gets += 1;
            }
            served.calls.push(format!("{method} {what} {}", field(line, "http.response.status").unwrap_or("?")));
        }
        served
    }

    /// The last lines of its log, for a failure message.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(lines).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait().map_err(|e| format!("poll the registry: {e}"))? {
                    return Err(format!("the registry exited at start with {status}"));
                }
            }
            if self.get_v2().is_ok_and(|status| status.contains(" 200 ")) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("the registry did not answer GET /v2/ on {} within 30 s", self.addr));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The status line of `GET /v2/`.
    fn get_v2(&self) -> std::io::Result<String> {
        let mut conn = TcpStream::connect(&self.addr)?;
        conn.set_read_timeout(Some(Duration::from_secs(2)))?;
        write!(conn, "GET /v2/ HTTP/1.0\r\nHost: {}\r\n\r\n", self.addr)?;
        let mut answer = String::new();
        conn.read_to_string(&mut answer)?;
        Ok(answer.lines().next().unwrap_or("").to_string())
    }
}

impl Drop for LocalRegistry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The value of `name=` in a logrus line, without its quotes.
fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let start = line.find(&format!(" {name}="))? + name.len() + 2;
    let rest = &line[start..];
    match rest.strip_prefix('"') {
        Some(quoted) => quoted.split('"').next(),
        None => rest.split(' ').next(),
    }
}
