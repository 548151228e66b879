//! The HTTP servers hold under abuse: a saturated server sheds load with
//! 503 + Retry-After, slow heads and slow bodies are cut off. Real TCP,
//! requests written by hand so the test controls every byte and pause.

use axum::routing::{get, post};
use runtime::http::{HttpLimits, spawn_server_with};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Writes `head` (and `body`), reads the whole answer (the server closes:
/// `Connection: close`), returns it as text.
async fn exchange(addr: SocketAddr, request: impl AsRef<str>) -> String {
    let request = request.as_ref();
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out))
        .await
        .expect("an answer")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

fn get_req(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
}

fn limits() -> HttpLimits {
    HttpLimits {
        header_read_timeout: Duration::from_millis(500),
        body_read_timeout: Duration::from_millis(500),
        max_body_bytes: 1024,
        max_concurrent_requests: 2,
        retry_after_secs: 3,
    }
}

async fn server() -> (SocketAddr, Arc<Semaphore>, CancellationToken) {
    // `/slow` holds its request until the test adds a permit.
    let gate = Arc::new(Semaphore::new(0));
    let g = gate.clone();
    let router = axum::Router::new()
        .route(
            "/slow",
            get(move || {
                let g = g.clone();
                async move {
                    g.acquire().await.unwrap().forget();
                    "done"
                }
            }),
        )
        .route("/fast", get(|| async { "fast" }))
        .route("/echo", post(|body: String| async move { body }));
    let stop = CancellationToken::new();
    let (addr, _task) = spawn_server_with(
        "127.0.0.1:0".parse().unwrap(),
        router,
        "test",
        limits(),
        stop.clone(),
    )
    .await
    .unwrap();
    (addr, gate, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_server_answers_503_with_retry_after() {
    let (addr, gate, stop) = server().await;
    let slow: Vec<_> = (0..2)
        .map(|_| tokio::spawn(exchange(addr, get_req("/slow"))))
        .collect();
    // Wait until both hold their permits (a third request is refused).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let refused = loop {
        let r = exchange(addr, &get_req("/fast")).await;
        if r.starts_with("HTTP/1.1 503") {
            break r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never saturated: {r}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        refused.to_ascii_lowercase().contains("retry-after: 3"),
        "{refused}"
    );
    assert!(refused.contains("overloaded"), "{refused}");
    // Freed, it serves again.
    gate.add_permits(2);
    for s in slow {
        assert!(s.await.unwrap().starts_with("HTTP/1.1 200"));
    }
    let ok = exchange(addr, &get_req("/fast")).await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_heads_are_disconnected_and_slow_bodies_get_408() {
    let (addr, _gate, stop) = server().await;
    // A head that never ends: the server closes the connection.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /fast HTTP/1.1\r\nHost: t\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("the server hangs up on a slow head")
        .ok();
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"), "{buf:?}");

    // A body that stops half-way: 408.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nonly ten b")
        .await
        .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("an answer to a slow body")
        .unwrap();
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");

    // Too large: 413; within the limits: served.
    let big = "x".repeat(2000);
    let r = exchange(
        addr,
        &format!(
            "POST /echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{big}",
            big.len()
        ),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 413"), "{r}");
    let r = exchange(
        addr,
        "POST /echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200") && r.ends_with("hello"), "{r}");
    stop.cancel();
}
