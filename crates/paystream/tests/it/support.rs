//! Helpers shared by the tests that run `paystream` as child processes.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A child process killed (SIGKILL) and reaped when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub use testkit::free_port;

/// `paystream serve handler` on `port` with `env`; with `fault`, it aborts
/// right after appending a payment's events (before answering).
pub fn handler(env: &[(&str, String)], port: u16, fault: bool) -> Proc {
    let mut c = Command::new(env!("CARGO_BIN_EXE_paystream"));
    c.args(["serve", "handler", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    if fault {
        c.env("PAYSTREAM_FAULT_INJECT", "crash_after_append");
    }
    Proc(c.spawn().unwrap())
}

/// Waits until the handler at `base` answers `/healthz`.
pub async fn wait_healthy(http: &reqwest::Client, base: &str) {
    for _ in 0..300 {
        if http
            .get(format!("{base}/healthz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("handler did not come up at {base}");
}
