//! A TCP proxy in front of a test registry that misbehaves on demand: answers 503, answers
//! slowly, or cuts a connection after so many bytes (a registry dying mid-transfer).
#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How the proxy treats connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward everything.
    Pass,
    /// Answer every request `503 Service Unavailable`.
    Unavailable,
    /// Wait this long before forwarding each connection's first bytes.
    Slow(Duration),
    /// Forward, then cut the connection once this many bytes went through it.
    CutAfter(u64),
}

/// A running proxy; its address is `addr`.
pub struct FaultProxy {
    pub addr: String,
    mode: Arc<Mutex<Mode>>,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    accepted: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.drop_connections();
    }
}

impl FaultProxy {
    /// Starts a proxy to `upstream` (host:port) in `Pass` mode.
    pub async fn start(upstream: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address").to_string();
        let mode = Arc::new(Mutex::new(Mode::Pass));
        let conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let accepted = Arc::new(AtomicU64::new(0));
        let upstream = upstream.to_string();
        let (m, c, n) = (mode.clone(), conns.clone(), accepted.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                n.fetch_add(1, Ordering::SeqCst);
                let mode = *m.lock().unwrap();
                let upstream = upstream.clone();
                let handle = tokio::spawn(async move { serve(client, &upstream, mode).await });
                c.lock().unwrap().push(handle.abort_handle());
            }
        });
        FaultProxy { addr, mode, conns, accepted, task }
    }

    /// Switches the mode; open connections are cut so the next request sees it.
    pub fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
        self.drop_connections();
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    fn drop_connections(&self) {
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }
}

async fn serve(mut client: TcpStream, upstream: &str, mode: Mode) {
    match mode {
        Mode::Unavailable => {
            let mut buf = vec![0u8; 64 * 1024];
            // Answer the first request, then close: the client reconnects and meets 503 again.
            if let Ok(n) = client.read(&mut buf).await {
                if n == 0 {
                    return;
                }
                let body = r#"{"errors":[{"code":"UNAVAILABLE","message":"test proxy says 503"}]}"#;
                let reply = format!(
                    "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = client.write_all(reply.as_bytes()).await;
            }
        }
        Mode::Pass | Mode::Slow(_) | Mode::CutAfter(_) => {
            if let Mode::Slow(d) = mode {
                tokio::time::sleep(d).await;
            }
            let Ok(server) = TcpStream::connect(upstream).await else { return };
            let limit = match mode {
                Mode::CutAfter(n) => n,
                _ => u64::MAX,
            };
            let moved = Arc::new(AtomicU64::new(0));
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            let m1 = moved.clone();
            let up = async move {
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n) = cr.read(&mut buf).await {
                    if n == 0 || m1.fetch_add(n as u64, Ordering::SeqCst) + n as u64 > limit {
                        break;
                    }
                    if sw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            };
            let m2 = moved.clone();
            let down = async move {
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n) = sr.read(&mut buf).await {
                    if n == 0 || m2.fetch_add(n as u64, Ordering::SeqCst) + n as u64 > limit {
                        break;
                    }
                    if cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            };
            // Either side ending ends both: a cut is a cut in both directions.
            tokio::select! {
                _ = up => {}
                _ = down => {}
            }
        }
    }
}
