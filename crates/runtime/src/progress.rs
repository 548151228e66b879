//! Progress of long work on stderr: a line redrawn in place on a terminal,
//! plain periodic lines otherwise (logs, CI), so data on stdout stays clean.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often a line is printed when stderr is not a terminal.
pub const PLAIN_INTERVAL: Duration = Duration::from_secs(2);
/// How often the line is redrawn on a terminal.
pub const TTY_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub struct Progress {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    what: String,
    total: u64,
    done: AtomicU64,
    started: Instant,
    last: Mutex<Instant>,
    tty: bool,
}

impl Progress {
    /// `total` 0 means unknown.
    pub fn new(what: &str, total: u64) -> Progress {
        let now = Instant::now();
        Progress {
            inner: Arc::new(Inner {
                what: what.to_owned(),
                total,
                done: AtomicU64::new(0),
                started: now,
                last: Mutex::new(now),
                tty: std::io::stderr().is_terminal(),
            }),
        }
    }

    pub fn inc(&self, n: u64) {
        self.inner.done.fetch_add(n, Ordering::Relaxed);
        let interval = if self.inner.tty {
            TTY_INTERVAL
        } else {
            PLAIN_INTERVAL
        };
        let mut last = self.inner.last.lock().expect("progress lock");
        if last.elapsed() >= interval {
            *last = Instant::now();
            drop(last);
            self.print(false);
        }
    }

    pub fn finish(&self) {
        self.print(true);
    }

    fn line(&self) -> String {
        let done = self.inner.done.load(Ordering::Relaxed);
        let secs = self.inner.started.elapsed().as_millis().max(1);
        let rate = u128::from(done) * 1000 / secs;
        let total = self.inner.total;
        if total == 0 {
            return format!("{}: {done} ({rate}/s)", self.inner.what);
        }
        let pct = u128::from(done) * 100 / u128::from(total);
        let eta = u128::from(total.saturating_sub(done))
            .checked_div(rate)
            .unwrap_or(0);
        let width = 30u128;
        let filled = usize::try_from((pct * width / 100).min(width)).unwrap_or(0);
        let bar = format!("{}{}", "#".repeat(filled), "-".repeat(30 - filled));
        format!(
            "{}: [{bar}] {done}/{total} {pct}% {rate}/s ETA {eta}s",
            self.inner.what
        )
    }

    fn print(&self, last: bool) {
        let line = self.line();
        let mut err = std::io::stderr().lock();
        let _ = if self.inner.tty {
            write!(err, "\r\x1b[2K{line}{}", if last { "\n" } else { "" })
        } else {
            writeln!(err, "{line}")
        };
        let _ = err.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_shows_counts_percent_and_rate() {
        let p = Progress::new("events", 200);
        p.inner.done.store(50, Ordering::Relaxed);
        let l = p.line();
        assert!(l.starts_with("events: ["), "{l}");
        assert!(l.contains("50/200 25%"), "{l}");
        let unknown = Progress::new("events", 0);
        assert!(unknown.line().starts_with("events: 0 ("));
    }
}
