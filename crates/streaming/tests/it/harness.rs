use std::time::Duration;
use streaming::{BatchHandler, Delivered, HandlerError, Outcome};
use tokio::sync::mpsc;

pub use testkit::{TestKafka, read_topic};

/// A handler that forwards every event to a channel and applies it.
pub struct Forward(pub mpsc::UnboundedSender<Delivered>);

impl BatchHandler for Forward {
    async fn handle(&mut self, batch: &[Delivered]) -> Result<Vec<Outcome>, HandlerError> {
        for d in batch {
            let _ = self.0.send(d.clone());
        }
        Ok(vec![Outcome::Applied; batch.len()])
    }
}

/// Receives `n` items or panics after `timeout`.
pub async fn recv_n<T>(rx: &mut mpsc::UnboundedReceiver<T>, n: usize, timeout: Duration) -> Vec<T> {
    let mut out = Vec::with_capacity(n);
    let deadline = tokio::time::Instant::now() + timeout;
    while out.len() < n {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(x)) => out.push(x),
            Ok(None) => panic!("channel closed after {} of {n} items", out.len()),
            Err(_) => panic!("timed out after {} of {n} items", out.len()),
        }
    }
    out
}
