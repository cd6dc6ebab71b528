//! A real registry for tests: the CNCF distribution registry (`docker-registry`, Debian's
//! package) on 127.0.0.1, with its own storage, optionally behind TLS and htpasswd.
//!
//! Outside CI a missing binary skips the test with a message; with `CI` set it fails, so the
//! registry tests never pass by not running.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;

/// The registry binary.
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// Credentials and the CA of a TLS registry.
struct Tls {
    user: String,
    pass: String,
    ca: PathBuf,
}

/// A running registry; killed when dropped.
pub struct TestRegistry {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    tls: Option<Tls>,
    delete: bool,
}

/// Whether the registry binary is here; outside CI says why a test is skipped.
fn available() -> bool {
    if Path::new(REGISTRY_BIN).exists() {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "CI must have {REGISTRY_BIN} (apt-get install docker-registry)");
    eprintln!("skipping: {REGISTRY_BIN} is not installed (apt-get install docker-registry)");
    false
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl TestRegistry {
    /// A plain-HTTP registry without auth; `None` (after saying so) when not installed.
    pub fn start() -> Option<Self> {
        if !available() {
            return None;
        }
        let mut r = Self::new(true);
        r.launch();
        Some(r)
    }

    /// A registry on TLS (a fresh CA; a certificate for 127.0.0.1 and localhost) requiring
    /// `user`/`pass` (htpasswd, bcrypt); `None` (after saying so) when not installed.
    pub fn start_tls_basic(user: &str, pass: &str) -> Option<Self> {
        if !available() {
            return None;
        }
        let dir = tempfile::Builder::new().prefix("jcfs-registry").tempdir().expect("temp dir");
        let d = dir.path();
        let ext = d.join("server.ext");
        std::fs::write(
            &ext,
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .expect("write ext");
        // P-256 keys: made in milliseconds, unlike RSA.
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        run(Command::new("openssl").current_dir(d).args(["req", "-x509"]).args(ec).args([
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=jobcachefs test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]));
        run(Command::new("openssl").current_dir(d).arg("req").args(ec).args([
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ]));
        run(Command::new("openssl").current_dir(d).args([
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ]));
        // The registry takes only bcrypt hashes; perl's crypt() is libxcrypt's, which makes
        // them (perl-base is in every Debian), so no htpasswd binary or crate is needed.
        let salt: String = {
            const ALPHABET: &[u8] = b"./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
            let mut random = [0u8; 22];
            std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut random)).expect("urandom");
            // 22 characters carry 128 bits: the last one only 2, so it is one of ".Oeu".
            let mut salt: String = random[..21].iter().map(|b| ALPHABET[(*b % 64) as usize] as char).collect();
            salt.push(b".Oeu"[(random[21] % 4) as usize] as char);
            salt
        };
        let out = Command::new("perl")
            .args(["-e", "print crypt($ARGV[0], '$2b$05$' . $ARGV[1])", pass, &salt])
            .output()
            .expect("run perl for a bcrypt hash");
        let hash = String::from_utf8(out.stdout).expect("hash");
        assert!(hash.starts_with("$2b$05$"), "perl crypt() made no bcrypt hash: {hash:?}");
        std::fs::write(d.join("htpasswd"), format!("{user}:{hash}\n")).expect("write htpasswd");
        let tls = Tls { user: user.into(), pass: pass.into(), ca: d.join("ca.pem") };
        let mut r = TestRegistry { dir, port: free_port(), child: None, tls: Some(tls), delete: true };
        r.launch();
        Some(r)
    }

    /// A plain-HTTP registry that refuses to delete manifests (the distribution default).
    pub fn start_without_delete() -> Option<Self> {
        if !available() {
            return None;
        }
        let mut r = Self::new(false);
        r.launch();
        Some(r)
    }

    fn new(delete: bool) -> Self {
        let dir = tempfile::Builder::new().prefix("jcfs-registry").tempdir().expect("temp dir");
        TestRegistry { dir, port: free_port(), child: None, tls: None, delete }
    }

    fn launch(&mut self) {
        let d = self.dir.path();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: {}\n\
             \x20 maintenance:\n    uploadpurging:\n      enabled: false\n\
             http:\n  addr: 127.0.0.1:{}\n",
            self.storage().display(),
            self.delete,
            self.port
        );
        if self.tls.is_some() {
            config += &format!(
                "  tls:\n    certificate: {}\n    key: {}\nauth:\n  htpasswd:\n    realm: jobcachefs-test\n    path: {}\n",
                d.join("server.pem").display(),
                d.join("server.key").display(),
                d.join("htpasswd").display()
            );
        }
        std::fs::write(d.join("config.yml"), config).expect("write registry config");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(d.join("registry.log")).expect("log");
        let child = Command::new(REGISTRY_BIN)
            .args(["serve", &d.join("config.yml").to_string_lossy()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        self.child = Some(child);
        self.wait_ready();
    }

    /// Polls `GET /v2/` until the registry answers; a TLS port answers a plain request with
    /// a 400, which is an answer too.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                let mut head = [0u8; 5];
                if s.write_all(b"GET /v2/ HTTP/1.0\r\n\r\n").is_ok()
                    && s.read_exact(&mut head).is_ok()
                    && &head == b"HTTP/"
                {
                    return;
                }
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("docker-registry exited with {status}: {}", self.log());
            }
            assert!(Instant::now() < deadline, "docker-registry did not answer within 10 s: {}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the registry logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// `127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The CA that signed the TLS certificate.
    pub fn ca_path(&self) -> PathBuf {
        self.tls.as_ref().expect("a TLS registry").ca.clone()
    }

    /// Writes a Docker config file with this registry's credentials into `dir`.
    pub fn docker_config(&self, dir: &Path) -> PathBuf {
        let tls = self.tls.as_ref().expect("a registry with credentials");
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", tls.user, tls.pass));
        let path = dir.join("config.json");
        let doc = serde_json::json!({"auths": {self.url(): {"auth": auth}}});
        std::fs::write(&path, doc.to_string()).expect("write docker config");
        path
    }

    /// Where the registry keeps its data (blobs under `docker/registry/v2/blobs/sha256/`).
    pub fn storage(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// The file holding a blob's bytes.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
        self.storage().join("docker/registry/v2/blobs/sha256").join(&hex[..2]).join(hex).join("data")
    }

    /// Kills the registry; its port and storage stay for [`Self::restart`].
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the registry again on the same port and storage.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        self.stop();
    }
}
