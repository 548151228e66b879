//! A component is alive only while all of its parts are.
//!
//! A process runs several long-lived parts (HTTP server, consumers,
//! dispatchers, sweepers). If one of them ends before shutdown was asked for
//! (an error, a panic, or a loop that just returned), the process must not
//! go on serving HTTP and answering "ready" while, say, no payment is
//! executed any more. The [`Supervisor`] owns the parts: the first one to
//! end early marks the component not ready ([`Health`]), cancels the
//! component's shutdown token so the other parts finish their in-flight work
//! and stop, and makes [`Supervisor::wait`] return that part's error, so the
//! process exits non-zero and an orchestrator restarts it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::task::{Id, JoinSet};
use tokio_util::sync::CancellationToken;

/// Whether every part of the component is still running. Readiness checks
/// answer "not ready" once it turns false; it never turns true again.
#[derive(Debug, Clone)]
pub struct Health(Arc<AtomicBool>);

impl Health {
    /// A health flag that is alive until [`Health::fail`].
    pub fn new() -> Health {
        Health(Arc::new(AtomicBool::new(true)))
    }

    pub fn is_alive(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    pub fn fail(&self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

impl Default for Health {
    fn default() -> Health {
        Health::new()
    }
}

/// The long-lived parts of one component.
#[derive(Debug)]
pub struct Supervisor {
    parts: JoinSet<anyhow::Result<()>>,
    names: HashMap<Id, &'static str>,
    shutdown: CancellationToken,
    health: Health,
}

impl Supervisor {
    /// Parts watch `shutdown`; the supervisor cancels it when a part ends
    /// early.
    pub fn new(shutdown: CancellationToken, health: Health) -> Supervisor {
        Supervisor {
            parts: JoinSet::new(),
            names: HashMap::new(),
            shutdown,
            health,
        }
    }

    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// Runs `part` until it ends; it must end only after `shutdown`.
    pub fn spawn<F, E>(&mut self, name: &'static str, part: F)
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<anyhow::Error> + Send + 'static,
    {
        let handle = self
            .parts
            .spawn(async move { part.await.map_err(Into::into) });
        self.names.insert(handle.id(), name);
    }

    /// Waits for every part. `Ok` when all ended after shutdown was asked
    /// for; otherwise the first early end as an error (after the others
    /// have stopped).
    pub async fn wait(mut self) -> anyhow::Result<()> {
        let mut failure: Option<anyhow::Error> = None;
        while let Some(joined) = self.parts.join_next_with_id().await {
            let (id, result) = match joined {
                Ok((id, result)) => (id, result),
                Err(e) => (
                    e.id(),
                    Err(anyhow::anyhow!(if e.is_panic() {
                        "panicked"
                    } else {
                        "was cancelled"
                    })),
                ),
            };
            let name = self.names.get(&id).copied().unwrap_or("a part");
            let early = !self.shutdown.is_cancelled();
            let error = match result {
                Ok(()) if !early => continue,
                Ok(()) => anyhow::anyhow!("{name} stopped before shutdown was requested"),
                Err(e) => e.context(format!("{name} failed")),
            };
            if failure.is_none() {
                tracing::error!(part = name, error = %format!("{error:#}"), "a part of this component ended; marking it not ready and stopping the rest");
                self.health.fail();
                self.shutdown.cancel();
                failure = Some(error);
            } else {
                tracing::warn!(part = name, error = %format!("{error:#}"), "another part ended while stopping");
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_part_ending_early_fails_the_component_and_stops_the_others() {
        let shutdown = CancellationToken::new();
        let mut sup = Supervisor::new(shutdown.clone(), Health::new());
        let health = sup.health();
        let stopped_cleanly = Arc::new(AtomicBool::new(false));
        let (s, flag) = (shutdown.clone(), stopped_cleanly.clone());
        sup.spawn("server", async move {
            s.cancelled().await;
            flag.store(true, Ordering::SeqCst);
            anyhow::Ok(())
        });
        sup.spawn("consumer", async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Err(anyhow::anyhow!("subscribe failed"))
        });
        let err = tokio::time::timeout(Duration::from_secs(5), sup.wait())
            .await
            .expect("wait returns once the other parts stop")
            .expect_err("an early end is an error");
        let msg = format!("{err:#}");
        assert!(
            msg.contains("consumer failed") && msg.contains("subscribe failed"),
            "{msg}"
        );
        assert!(!health.is_alive());
        assert!(shutdown.is_cancelled());
        assert!(stopped_cleanly.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_loop_that_returns_ok_early_is_a_failure_too() {
        let shutdown = CancellationToken::new();
        let mut sup = Supervisor::new(shutdown.clone(), Health::new());
        let s = shutdown.clone();
        sup.spawn("sweeper", async { anyhow::Ok(()) });
        sup.spawn("server", async move {
            s.cancelled().await;
            anyhow::Ok(())
        });
        let err = sup.wait().await.expect_err("early Ok is a failure");
        assert!(format!("{err:#}").contains("sweeper stopped before shutdown"));
    }

    #[tokio::test]
    async fn a_panic_is_reported_with_the_part_name() {
        let shutdown = CancellationToken::new();
        let mut sup = Supervisor::new(shutdown.clone(), Health::new());
        sup.spawn("dispatcher", async {
            if shutdown_never() {
                return anyhow::Ok(());
            }
            panic!("boom")
        });
        let err = sup.wait().await.expect_err("a panic is a failure");
        assert!(format!("{err:#}").contains("dispatcher failed: panicked"));
    }

    fn shutdown_never() -> bool {
        false
    }

    #[tokio::test]
    async fn parts_ending_after_shutdown_are_a_clean_stop() {
        let shutdown = CancellationToken::new();
        let mut sup = Supervisor::new(shutdown.clone(), Health::new());
        let health = sup.health();
        for name in ["a", "b"] {
            let s = shutdown.clone();
            sup.spawn(name, async move {
                s.cancelled().await;
                anyhow::Ok(())
            });
        }
        shutdown.cancel();
        sup.wait().await.expect("clean stop");
        assert!(health.is_alive());
    }
}
