//! The system under test as separate operating-system processes, the way it
//! runs in production: each can be killed with SIGKILL and restarted on the
//! same state, or stopped with SIGTERM.

use anyhow::{Context, bail};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// One process of the system: how to start it, and its current child.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    cwd: PathBuf,
    log: PathBuf,
    /// A TCP port it listens on once ready (none: ready when started).
    pub port: Option<u16>,
    child: Option<Child>,
    pub kills: u32,
    pub restarts: u32,
    /// When it was last (re)started.
    pub started_at: Option<Instant>,
}

impl Proc {
    pub fn new(
        name: &str,
        program: &Path,
        args: &[&str],
        env: &[(String, String)],
        cwd: &Path,
        port: Option<u16>,
    ) -> Proc {
        Proc {
            name: name.to_owned(),
            program: program.to_path_buf(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            env: env.to_vec(),
            cwd: cwd.to_path_buf(),
            log: cwd.join(format!("{name}.log")),
            port,
            child: None,
            kills: 0,
            restarts: 0,
            started_at: None,
        }
    }

    /// Starts the process (output appended to `<name>.log`) and waits until
    /// its port accepts connections.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let child = Command::new(&self.program)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .current_dir(&self.cwd)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} ({})", self.name, self.program.display()))?;
        self.child = Some(child);
        self.started_at = Some(Instant::now());
        if let Some(port) = self.port {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
                {
                    break;
                }
                if let Some(status) = self
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten())
                {
                    bail!(
                        "{} exited with {status} while starting:\n{}",
                        self.name,
                        self.log_tail(30)
                    );
                }
                if Instant::now() > deadline {
                    bail!(
                        "{} did not listen on port {port} within 60 s:\n{}",
                        self.name,
                        self.log_tail(30)
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// SIGKILL: no clean shutdown, no leave-group, nothing flushed.
    pub async fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
            let _ = c.wait().await;
            self.kills += 1;
        }
    }

    /// Kill -9, then start again on the same state after `pause`.
    pub async fn crash_and_restart(&mut self, pause: Duration) -> anyhow::Result<()> {
        self.kill9().await;
        tokio::time::sleep(pause).await;
        self.start().await?;
        self.restarts += 1;
        Ok(())
    }

    /// SIGTERM and wait (SIGKILL after `grace`); true if it exited cleanly.
    pub async fn terminate(&mut self, grace: Duration) -> bool {
        let Some(mut c) = self.child.take() else {
            return true;
        };
        if let Some(pid) = c.id() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        match tokio::time::timeout(grace, c.wait()).await {
            Ok(Ok(status)) => status.success(),
            _ => {
                let _ = c.start_kill();
                let _ = c.wait().await;
                false
            }
        }
    }

    /// Whether the process is still running (an exit is logged by the
    /// caller with [`Proc::log_tail`]).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Lines of its log that contain `needle` (e.g. " ERROR ").
    pub fn log_lines_with(&self, needle: &str) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_owned)
            .collect()
    }
}

/// A port that was free a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}
