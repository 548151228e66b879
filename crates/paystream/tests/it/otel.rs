//! Optional OpenTelemetry export: with `PAYSTREAM_OTLP_ENDPOINT` set, a
//! component posts its spans to `{endpoint}/v1/traces` (OTLP/HTTP,
//! protobuf); without it, nothing is sent.

use crate::support::{Proc, free_port};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// (path, body) of every request the collector received.
type Received = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// A minimal OTLP/HTTP collector: answers 200 to every request and keeps
/// (path, body) of each.
fn collector() -> (String, Received) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let g = g.clone();
            std::thread::spawn(move || {
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                // Headers, then Content-Length bytes of body.
                let (path, body) = loop {
                    let n = match conn.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse().ok())?
                        })
                        .unwrap_or(0);
                    while buf.len() < end + 4 + len {
                        match conn.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
                    break (path, buf[end + 4..end + 4 + len].to_vec());
                };
                g.lock().unwrap().push((path, body));
                let _ = conn.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                );
            });
        }
    });
    (url, got)
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[test]
fn spans_are_exported_over_otlp_when_an_endpoint_is_set() {
    let (endpoint, got) = collector();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _sim = Proc(
        Command::new(env!("CARGO_BIN_EXE_paystream"))
            .args(["serve", "psp-sim", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--db")
            .arg(format!("sqlite://{}", dir.path().join("psp.db").display()))
            .env("PAYSTREAM_OTLP_ENDPOINT", &endpoint)
            .env(
                "PAYSTREAM_PSP_API_KEY",
                runtime::secret::Secret::generate("sk_test_").expose(),
            )
            .env(
                "PAYSTREAM_PSP_WEBHOOK_SECRET",
                runtime::secret::Secret::generate("whsec_").expose(),
            )
            // Export batches quickly (the SDK's standard setting).
            .env("OTEL_BSP_SCHEDULE_DELAY", "200")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let health = format!("127.0.0.1:{port}");
    loop {
        if let Ok(mut c) = std::net::TcpStream::connect(&health) {
            c.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                .unwrap();
            let mut s = String::new();
            let _ = c.read_to_string(&mut s);
            if s.starts_with("HTTP/1.1 200") {
                break;
            }
        }
        assert!(Instant::now() < deadline, "psp-sim did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
    loop {
        let found = got.lock().unwrap().iter().any(|(path, body)| {
            path == "/v1/traces" && contains(body, "paystream-psp-sim") && contains(body, "/health")
        });
        if found {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no span of GET /health reached the collector: {:?}",
            got.lock()
                .unwrap()
                .iter()
                .map(|(p, b)| (p.clone(), b.len()))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
