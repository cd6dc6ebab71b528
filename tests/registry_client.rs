//! The registry client against a real registry (the CNCF distribution registry on
//! 127.0.0.1): blobs in, across and out with their digests checked, versions as manifests
//! under tags, foreign manifests refused, TLS with basic auth, a registry that is down or
//! silent, and what skopeo and umoci make of our manifests.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::registry::TestRegistry;
use jobcachefs::registry::client::{BlobPush, ClientError};
use jobcachefs::registry::manifest::{Blob, ARTIFACT_TYPE};
use jobcachefs::registry::{Registry, RegistryConfig};
use jobcachefs::registry::{RemoteLayer, RemoteVersion};
use jobcachefs::store::layout::LayerId;
use jobcachefs::store::CacheKey;
use sha2::{Digest as _, Sha256};

fn key(name: &str) -> CacheKey {
    CacheKey::new("ci", name).expect("key")
}

/// A client for a plain-HTTP test registry under the prefix `caches`.
fn plain(reg: &TestRegistry, timeout: Duration) -> Registry {
    let mut config = RegistryConfig::parse(&format!("{}/caches", reg.url())).expect("spec");
    config.insecure = true;
    config.timeout = timeout;
    Registry::new(config).expect("client")
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

/// A zstd-compressed layer tar holding `files`, written to `dir/name`, and its descriptor.
fn layer(dir: &Path, name: &str, files: &[(&str, &[u8])]) -> (PathBuf, Blob) {
    let mut tar = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1);
        tar.append_data(&mut h, path, *data).expect("tar entry");
    }
    let tar = tar.into_inner().expect("tar");
    let blob = zstd::encode_all(&tar[..], 3).expect("zstd");
    let path = dir.join(name);
    std::fs::write(&path, &blob).expect("write blob");
    (path, Blob { digest: sha256(&blob), size: blob.len() as u64, diff_id: sha256(&tar) })
}

fn version(n: u64, blobs: &[(&str, &Blob)]) -> RemoteVersion {
    RemoteVersion {
        version: n,
        lineage: "lin3age".into(),
        layers: blobs
            .iter()
            .map(|(id, b)| RemoteLayer { id: LayerId::new(*id).expect("layer id"), blob: (*b).clone() })
            .collect(),
    }
}

fn tags(list: &[&str]) -> Vec<String> {
    list.iter().map(|t| t.to_string()).collect()
}

/// Reads a whole blob the way the importer does: from a blocking thread.
async fn read_blob(client: &Registry, key: &CacheKey, blob: &Blob) -> Result<Vec<u8>, std::io::Error> {
    let mut reader = client.open_blob(key, blob).await.expect("open blob");
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        reader.read_to_end(&mut out).map(|_| out)
    })
    .await
    .expect("reader thread")
}

#[test]
fn blobs_upload_once_mount_across_caches_and_read_back_exactly() {
    let Some(reg) = TestRegistry::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (path, blob) = layer(dir.path(), "l1", &[("a.txt", b"hello"), ("sub/b.txt", &[7u8; 100_000])]);
    let rt = common::rt();
    rt.block_on(async {
        let c = plain(&reg, Duration::from_secs(5));
        let (a, b) = (key("maven"), key("gradle"));
        assert_eq!(c.push_blob(&a, &path, &blob, &[]).await.unwrap(), BlobPush::Uploaded);
        assert_eq!(c.push_blob(&a, &path, &blob, &[]).await.unwrap(), BlobPush::Present);
        assert_eq!(c.push_blob(&b, &path, &blob, &[b.clone(), a.clone()]).await.unwrap(), BlobPush::Mounted);
        let want = std::fs::read(&path).unwrap();
        assert_eq!(read_blob(&c, &b, &blob).await.unwrap(), want);
        // Read from a plain thread, outside the runtime, too.
        let mut reader = c.open_blob(&b, &blob).await.unwrap();
        let plain_read = std::thread::spawn(move || {
            let mut got = Vec::new();
            std::io::Read::read_to_end(&mut reader, &mut got).map(|_| got)
        });
        assert_eq!(tokio::task::spawn_blocking(move || plain_read.join().unwrap()).await.unwrap().unwrap(), want);

        // A file that is not the size its descriptor says is never sent.
        let wrong = Blob { size: blob.size + 1, ..blob.clone() };
        let err = c.push_blob(&key("other"), &path, &wrong, &[]).await.unwrap_err();
        assert!(matches!(err, ClientError::BlobSize { .. }), "{err}");
        assert!(err.to_string().contains(&blob.digest), "{err}");
        // Nor is content that does not hash to its digest: the registry refuses it.
        let (other_path, _) = layer(dir.path(), "l2", &[("c.txt", b"other")]);
        let liar = Blob { size: std::fs::metadata(&other_path).unwrap().len(), ..blob.clone() };
        let err = c.push_blob(&key("other"), &other_path, &liar, &[]).await.unwrap_err();
        assert!(!err.is_transient(), "{err}");
        assert!(err.to_string().contains("caches/ci/other"), "{err}");
        // A blob the repository lacks is not found, by name.
        let err = c.open_blob(&key("other"), &blob).await.err().expect("missing blob");
        assert!(matches!(err, ClientError::NotFound { .. }), "{err}");
        assert!(err.to_string().contains(&blob.digest), "{err}");
    });
}

#[test]
fn versions_live_under_tags_and_deleting_one_leaves_the_others() {
    let Some(reg) = TestRegistry::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (p1, b1) = layer(dir.path(), "l1", &[("a.txt", b"one")]);
    let (p2, b2) = layer(dir.path(), "l2", &[("b.txt", b"two")]);
    common::rt().block_on(async {
        let c = plain(&reg, Duration::from_secs(5));
        let k = key("maven");
        assert_eq!(c.read_version(&k, "head").await.unwrap(), None, "no repository yet");
        assert_eq!(c.tag_digest(&k, "head").await.unwrap(), None);
        assert_eq!(c.tags(&k).await.unwrap(), Vec::<String>::new());

        c.push_blob(&k, &p1, &b1, &[]).await.unwrap();
        let v1 = version(1, &[("layer0001", &b1)]);
        let d1 = c.put_version(&k, &v1, &tags(&["v1", "head"])).await.unwrap();
        assert_eq!(c.read_version(&k, "head").await.unwrap(), Some((v1.clone(), d1.clone())));
        assert_eq!(c.tag_digest(&k, "head").await.unwrap(), Some(d1.clone()));
        assert_eq!(c.tag_digest(&k, "v1").await.unwrap(), Some(d1.clone()));
        assert_eq!(c.read_version(&k, "v9").await.unwrap(), None);

        c.push_blob(&k, &p2, &b2, &[]).await.unwrap();
        let v2 = version(2, &[("layer0001", &b1), ("layer0002", &b2)]);
        let d2 = c.put_version(&k, &v2, &tags(&["v2", "head"])).await.unwrap();
        assert_ne!(d1, d2);
        let mut all = c.tags(&k).await.unwrap();
        all.sort();
        assert_eq!(all, tags(&["head", "v1", "v2"]));

        c.delete_tag(&k, "v1").await.unwrap();
        c.delete_tag(&k, "v1").await.unwrap(); // already gone: nothing to do
        let mut all = c.tags(&k).await.unwrap();
        all.sort();
        assert_eq!(all, tags(&["head", "v2"]));
        assert_eq!(c.read_version(&k, "head").await.unwrap(), Some((v2, d2)));
        assert_eq!(c.read_version(&k, "v1").await.unwrap(), None);

        let err = c.put_version(&k, &v1, &tags(&["ok", "not/a/tag"])).await.unwrap_err();
        assert!(err.to_string().contains("\"not/a/tag\" is not a valid tag"), "{err}");
        assert_eq!(c.tag_digest(&k, "ok").await.unwrap(), None, "nothing is put when a tag is bad");
    });
}

#[test]
fn a_corrupted_blob_fails_the_read_naming_the_digests() {
    let Some(reg) = TestRegistry::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (path, blob) = layer(dir.path(), "l1", &[("a.txt", &[1u8; 50_000])]);
    common::rt().block_on(async {
        let c = plain(&reg, Duration::from_secs(5));
        let k = key("maven");
        c.push_blob(&k, &path, &blob, &[]).await.unwrap();
        // Same size, other bytes: only the digest can tell.
        let on_disk = reg.blob_path(&blob.digest);
        let mut data = std::fs::read(&on_disk).unwrap();
        let mid = data.len() / 2;
        data[mid] ^= 0xff;
        std::fs::write(&on_disk, &data).unwrap();

        let err = read_blob(&c, &k, &blob).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");
        let msg = err.to_string();
        assert!(msg.contains(&format!("expected {}, got {}", blob.digest, sha256(&data))), "{msg}");
        assert!(msg.contains("caches/ci/maven"), "{msg}");

        // A descriptor that undersells the blob is refused before any byte is trusted.
        let short = Blob { size: blob.size - 1, ..blob.clone() };
        let err = c.open_blob(&k, &short).await.err().expect("size mismatch");
        assert!(err.to_string().contains(&format!("the blob is {}", blob.size - 1)), "{err}");
    });
}

#[test]
fn a_manifest_that_is_not_a_cache_version_is_refused() {
    let Some(reg) = TestRegistry::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (path, blob) = layer(dir.path(), "l1", &[("a.txt", b"x")]);
    common::rt().block_on(async {
        let c = plain(&reg, Duration::from_secs(5));
        let k = key("maven");
        c.push_blob(&k, &path, &blob, &[]).await.unwrap();
        let v = version(1, &[("layer0001", &blob)]);
        c.put_version(&k, &v, &tags(&["v1"])).await.unwrap();

        // Someone else's artifact under our tag, pushed with plain oci-client.
        let mut m = serde_json::to_value(v.to_manifest()).unwrap();
        m["artifactType"] = "application/vnd.example.other".into();
        let oci = oci_client::Client::new(oci_client::client::ClientConfig {
            protocol: oci_client::client::ClientProtocol::Http,
            ..Default::default()
        });
        let reference: oci_client::Reference = format!("{}/caches/ci/maven:head", reg.url()).parse().unwrap();
        oci.push_manifest_raw(
            &reference,
            serde_json::to_vec(&m).unwrap(),
            reqwest::header::HeaderValue::from_static(oci_client::manifest::OCI_IMAGE_MEDIA_TYPE),
        )
        .await
        .expect("push a foreign manifest");

        let err = c.read_version(&k, "head").await.unwrap_err();
        assert!(matches!(err, ClientError::Manifest { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("caches/ci/maven:head") && msg.contains(&format!("must be {ARTIFACT_TYPE}")), "{msg}");
        assert!(!err.is_transient());
    });
}

#[test]
fn tls_with_basic_auth_needs_both_the_credentials_and_the_ca() {
    let Some(reg) = TestRegistry::start_tls_basic("ci-bot", "pa55:word") else { return };
    let dir = tempfile::tempdir().unwrap();
    let (path, blob) = layer(dir.path(), "l1", &[("a.txt", b"secure")]);
    let docker_config = reg.docker_config(dir.path());
    let client = |auth: bool, ca: bool| {
        let mut config = RegistryConfig::parse(&reg.url()).unwrap();
        config.auth_file = auth.then(|| docker_config.clone());
        config.ca_file = ca.then(|| reg.ca_path());
        config.timeout = Duration::from_secs(5);
        Registry::new(config).expect("client")
    };
    common::rt().block_on(async {
        let k = key("maven");
        let c = client(true, true);
        assert_eq!(c.push_blob(&k, &path, &blob, &[]).await.unwrap(), BlobPush::Uploaded);
        let v = version(1, &[("layer0001", &blob)]);
        let d = c.put_version(&k, &v, &tags(&["v1", "head"])).await.unwrap();
        assert_eq!(c.read_version(&k, "head").await.unwrap(), Some((v.clone(), d)));
        assert_eq!(read_blob(&c, &k, &blob).await.unwrap(), std::fs::read(&path).unwrap());
        // Our own DELETE answers the registry's Basic challenge.
        c.put_version(&k, &version(2, &[("layer0001", &blob)]), &tags(&["v2"])).await.unwrap();
        c.delete_tag(&k, "v2").await.unwrap();
        assert_eq!(c.tag_digest(&k, "v2").await.unwrap(), None);

        let err = client(false, true).read_version(&k, "head").await.unwrap_err();
        assert!(matches!(err, ClientError::Denied { .. }), "{err}");
        assert!(err.to_string().contains("check --registry-auth"), "{err}");
        assert!(!err.is_transient());

        let err = client(true, false).read_version(&k, "head").await.unwrap_err();
        assert!(matches!(err, ClientError::Tls { .. }), "{err}");
        assert!(err.to_string().contains("certificate"), "{err}");
        assert!(!err.is_transient(), "{err}");
    });
    let err = Registry::new(RegistryConfig {
        ca_file: Some(docker_config.clone()),
        ..RegistryConfig::parse(&reg.url()).unwrap()
    })
    .err()
    .expect("a CA file without certificates");
    assert!(err.to_string().contains("holds no PEM certificate"), "{err}");
}

#[test]
fn a_stopped_registry_is_transient_and_fails_fast_then_works_again() {
    let Some(mut reg) = TestRegistry::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (path, blob) = layer(dir.path(), "l1", &[("a.txt", b"x")]);
    let rt = common::rt();
    let c = plain(&reg, Duration::from_secs(2));
    let k = key("maven");
    let d = rt.block_on(async {
        c.push_blob(&k, &path, &blob, &[]).await.unwrap();
        c.put_version(&k, &version(1, &[("layer0001", &blob)]), &tags(&["head"])).await.unwrap()
    });
    reg.stop();
    rt.block_on(async {
        let started = Instant::now();
        let err = c.tag_digest(&k, "head").await.unwrap_err();
        assert!(err.is_transient(), "{err}");
        assert!(matches!(err, ClientError::Unreachable { .. }), "{err}");
        assert!(err.to_string().contains(&format!("{}/caches/ci/maven", reg.url())), "{err}");
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
        let err = c.push_blob(&key("gradle"), &path, &blob, &[]).await.unwrap_err();
        assert!(err.is_transient(), "{err}");
    });
    reg.restart();
    rt.block_on(async {
        assert_eq!(c.tag_digest(&k, "head").await.unwrap(), Some(d));
    });
}

/// A server that accepts connections and then says nothing, or sends `head` and stalls.
fn silent_server(head: &'static [u8]) -> (u16, std::thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let t = std::thread::spawn(move || {
        let mut held = Vec::new();
        l.set_nonblocking(true).unwrap();
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            match l.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
                    let mut req = [0u8; 4096];
                    let n = s.read(&mut req).unwrap_or(0);
                    if req[..n].starts_with(b"GET /v2/ ") {
                        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}");
                    } else {
                        let _ = s.write_all(head);
                        held.push(s);
                    }
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    });
    (port, t)
}

#[test]
fn a_registry_that_stops_answering_times_out_within_the_bound() {
    let (port, _t) = silent_server(b"");
    let mut config = RegistryConfig::parse(&format!("127.0.0.1:{port}")).unwrap();
    config.insecure = true;
    config.timeout = Duration::from_millis(300);
    let c = Registry::new(config).unwrap();
    common::rt().block_on(async {
        let started = Instant::now();
        let err = c.tag_digest(&key("maven"), "head").await.unwrap_err();
        assert!(matches!(err, ClientError::Timeout { .. }), "{err}");
        assert!(err.is_transient());
        assert!(err.to_string().contains("no answer within 300ms"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    });

    // A download whose data stops coming fails the read after the bound, not at the end.
    let (port, _t) = silent_server(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789");
    let mut config = RegistryConfig::parse(&format!("127.0.0.1:{port}")).unwrap();
    config.insecure = true;
    config.timeout = Duration::from_millis(300);
    let c = Registry::new(config).unwrap();
    let blob = Blob { digest: sha256(b"whatever"), size: 100, diff_id: String::new() };
    common::rt().block_on(async {
        let started = Instant::now();
        let err = read_blob(&c, &key("maven"), &blob).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
        assert!(err.to_string().contains(&blob.digest), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    });
}

/// A TCP proxy to `upstream` passing about `rate` bytes a second each way, and nothing at
/// all while the returned flag is set. Its sockets' receive buffers are small, so the kernel
/// cannot swallow a whole test blob ahead of the pace.
fn throttle(upstream: u16, rate: usize) -> (u16, Arc<AtomicBool>) {
    use std::os::fd::AsRawFd;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let small: libc::c_int = 16 << 10;
    // SAFETY: a valid socket and a c_int option value of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &small as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_RCVBUF");
    let port = listener.local_addr().unwrap().port();
    let stalled = Arc::new(AtomicBool::new(false));
    let flag = stalled.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let server = std::net::TcpStream::connect(("127.0.0.1", upstream)).unwrap();
            for (mut from, mut to) in [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)] {
                let stalled = flag.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; (rate / 50).max(1)];
                    loop {
                        if stalled.load(Ordering::Relaxed) {
                            std::thread::sleep(Duration::from_millis(20));
                            continue;
                        }
                        let n = match from.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        std::thread::sleep(Duration::from_secs_f64(n as f64 / rate as f64));
                    }
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    (port, stalled)
}

/// Bytes zstd cannot shrink.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

#[test]
fn a_slow_transfer_may_outlast_the_timeout_but_a_stalled_one_may_not() {
    let Some(reg) = TestRegistry::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    // Larger than what the kernel buffers on loopback, so the pace shows while sending.
    let (path, blob) = layer(dir.path(), "l1", &[("a.bin", &noise(6 << 20, 1))]);
    let (stall_path, stall_blob) = layer(dir.path(), "l2", &[("b.bin", &noise(6 << 20, 2))]);
    let (port, stalled) = throttle(reg.url().rsplit_once(':').unwrap().1.parse().unwrap(), 4 << 20);
    let mut config = RegistryConfig::parse(&format!("127.0.0.1:{port}/caches")).unwrap();
    config.insecure = true;
    config.timeout = Duration::from_millis(400);
    let c = Registry::new(config).unwrap();
    let k = key("maven");
    common::rt().block_on(async {
        let started = Instant::now();
        assert_eq!(c.push_blob(&k, &path, &blob, &[]).await.unwrap(), BlobPush::Uploaded);
        assert!(started.elapsed() > Duration::from_secs(1), "not throttled: {:?}", started.elapsed());

        let started = Instant::now();
        assert_eq!(read_blob(&c, &k, &blob).await.unwrap(), std::fs::read(&path).unwrap());
        assert!(started.elapsed() > Duration::from_secs(1), "not throttled: {:?}", started.elapsed());

        let push = tokio::spawn({
            let (c, k, p, b) = (c.clone(), k.clone(), stall_path.clone(), stall_blob.clone());
            async move { c.push_blob(&k, &p, &b, &[]).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        stalled.store(true, Ordering::Relaxed);
        let stalled_at = Instant::now();
        let err = push.await.unwrap().unwrap_err();
        assert!(matches!(err, ClientError::Timeout { .. }), "{err}");
        assert!(err.is_transient());
        assert!(
            err.to_string().contains(&format!("uploading blob {}: no answer within 400ms", stall_blob.digest)),
            "{err}"
        );
        assert!(stalled_at.elapsed() < Duration::from_secs(2), "{:?}", stalled_at.elapsed());
    });
}

#[test]
fn deleting_on_a_registry_that_keeps_everything_says_what_to_enable() {
    let Some(reg) = TestRegistry::start_without_delete() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (path, blob) = layer(dir.path(), "l1", &[("a.txt", b"x")]);
    common::rt().block_on(async {
        let c = plain(&reg, Duration::from_secs(5));
        let k = key("maven");
        c.push_blob(&k, &path, &blob, &[]).await.unwrap();
        c.put_version(&k, &version(1, &[("layer0001", &blob)]), &tags(&["v1"])).await.unwrap();
        let err = c.delete_tag(&k, "v1").await.unwrap_err();
        assert!(matches!(err, ClientError::Unsupported { .. }), "{err}");
        assert!(err.to_string().contains("must allow deletes"), "{err}");
        assert!(c.tag_digest(&k, "v1").await.unwrap().is_some());
    });
}

/// Whether a tool is installed; outside CI says why the test is skipped, in CI fails.
fn tool(path: &str) -> bool {
    if Path::new(path).exists() {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "CI must have {path}");
    eprintln!("skipping: {path} is not installed");
    false
}

/// skopeo reads, inspects and copies our versions; umoci 0.4.7 knows no zstd layers, so it
/// unpacks one only after skopeo recompresses it to gzip. Pinned here, so a change of the
/// manifest format (or of the tools) shows in this test.
#[test]
fn skopeo_copies_our_versions_and_umoci_unpacks_them_once_gzipped() {
    if !tool("/usr/bin/skopeo") || !tool("/usr/bin/umoci") {
        return;
    }
    let Some(reg) = TestRegistry::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (path, blob) = layer(dir.path(), "l1", &[("a.txt", b"hello\n"), ("sub/b.txt", b"world\n")]);
    let v = version(1, &[("layer0001", &blob)]);
    common::rt().block_on(async {
        let c = plain(&reg, Duration::from_secs(5));
        let k = key("maven");
        c.push_blob(&k, &path, &blob, &[]).await.unwrap();
        c.put_version(&k, &v, &tags(&["head"])).await.unwrap();
    });
    let image = format!("docker://{}/caches/ci/maven:head", reg.url());
    let run = |cmd: &str, args: &[&str]| {
        let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("run {cmd}: {e}"));
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    let raw = Command::new("skopeo").args(["inspect", "--raw", "--tls-verify=false", &image]).output().unwrap();
    assert!(raw.status.success(), "{}", String::from_utf8_lossy(&raw.stderr));
    assert_eq!(RemoteVersion::from_manifest(&raw.stdout).unwrap(), v);

    let (ok, stdout, stderr) = run("skopeo", &["inspect", "--tls-verify=false", &image]);
    assert!(ok, "{stderr}");
    let inspected: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(inspected["Layers"], serde_json::json!([blob.digest]), "{stdout}");
    assert_eq!(inspected["Os"], "linux", "{stdout}");

    let unpack = |layout: &Path, bundle: &Path| {
        let mut args = vec!["unpack"];
        if !nix::unistd::geteuid().is_root() {
            args.push("--rootless");
        }
        let image = format!("{}:head", layout.display());
        let bundle = bundle.display().to_string();
        args.extend(["--image", &image, &bundle]);
        run("umoci", &args)
    };
    let as_is = dir.path().join("oci");
    let (ok, _, stderr) =
        run("skopeo", &["copy", "--src-tls-verify=false", &image, &format!("oci:{}:head", as_is.display())]);
    assert!(ok, "{stderr}");
    let (ok, _, stderr) = unpack(&as_is, &dir.path().join("bundle0"));
    assert!(!ok, "umoci now unpacks zstd layers; say so in the docs");
    assert!(stderr.contains("blob is not correct mediatype: application/vnd.oci.image.layer.v1.tar+zstd"), "{stderr}");

    let gzipped = dir.path().join("oci-gzip");
    let dest = format!("oci:{}:head", gzipped.display());
    let (ok, _, stderr) = run(
        "skopeo",
        &["copy", "--src-tls-verify=false", "--dest-compress", "--dest-compress-format", "gzip", &image, &dest],
    );
    assert!(ok, "{stderr}");
    let bundle = dir.path().join("bundle");
    let (ok, _, stderr) = unpack(&gzipped, &bundle);
    assert!(ok, "{stderr}");
    assert_eq!(std::fs::read_to_string(bundle.join("rootfs/a.txt")).unwrap(), "hello\n");
    assert_eq!(std::fs::read_to_string(bundle.join("rootfs/sub/b.txt")).unwrap(), "world\n");
}
