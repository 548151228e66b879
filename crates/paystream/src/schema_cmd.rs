//! `paystream schema`: fingerprints and the backward-compatibility check
//! that CI runs against the previous committed version of each schema.

use anyhow::{Context, bail};
use clap::Subcommand;
use events::avro::{self, compat};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

#[derive(Debug, Subcommand)]
pub enum SchemaCommand {
    /// Print the fingerprint (and single-object header) of each schema.
    Fingerprint {
        #[arg(long, default_value = "schemas")]
        dir: PathBuf,
    },
    /// Check that every schema in DIR can read data written with its
    /// previous committed version (git history) and with every version in
    /// DIR/history. Exits non-zero on a breaking change.
    Check {
        #[arg(long, default_value = "schemas")]
        dir: PathBuf,
        /// Compare with the schema as of this git revision instead of the
        /// last committed version that differs from the working tree.
        #[arg(long)]
        against: Option<String>,
    },
}

pub fn run(cmd: SchemaCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        SchemaCommand::Fingerprint { dir } => {
            for path in avsc_files(&dir)? {
                let json = std::fs::read_to_string(&path)?;
                let fp = avro::fingerprint(&json)?;
                let header: Vec<String> = avro::header(fp)
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                println!(
                    "{}  fingerprint 0x{fp:016x}  header {}",
                    path.display(),
                    header.join(" ")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        SchemaCommand::Check { dir, against } => check(&dir, against.as_deref()),
    }
}

fn avsc_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "avsc"))
        .collect();
    files.sort();
    Ok(files)
}

fn git(args: &[&str], cwd: &Path) -> anyhow::Result<Option<String>> {
    let out = Command::new("git")
        .args(args)
        .current_dir(cwd)
        .output()
        .context("running git")?;
    if !out.status.success() {
        return Ok(None);
    }
    Ok(Some(
        String::from_utf8(out.stdout).context("git output is not UTF-8")?,
    ))
}

/// The schema's text in git: at `against` if given, else the most recent
/// committed version that differs from `current`. `None` for a new file.
fn previous_version(
    path: &Path,
    current: &str,
    against: Option<&str>,
) -> anyhow::Result<Option<(String, String)>> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .context("schema path has a file name")?
        .to_string_lossy()
        .into_owned();
    if let Some(rev) = against {
        return Ok(git(&["show", &format!("{rev}:./{name}")], dir)?.map(|t| (rev.to_owned(), t)));
    }
    let Some(log) = git(&["log", "--format=%H", "--", &name], dir)? else {
        return Ok(None);
    };
    for commit in log.lines() {
        if let Some(text) = git(&["show", &format!("{commit}:./{name}")], dir)?
            && text != current
        {
            return Ok(Some((commit[..12].to_owned(), text)));
        }
    }
    Ok(None)
}

fn check(dir: &Path, against: Option<&str>) -> anyhow::Result<ExitCode> {
    let mut failures = 0;
    let history_dir = dir.join("history");
    let history = if history_dir.is_dir() {
        avsc_files(&history_dir)?
    } else {
        Vec::new()
    };
    for path in avsc_files(dir)? {
        let current = std::fs::read_to_string(&path)?;
        avro::fingerprint(&current)
            .with_context(|| format!("{} is not a valid schema", path.display()))?;
        let mut olds: Vec<(String, String)> = Vec::new();
        match previous_version(&path, &current, against)? {
            Some(prev) => olds.push((format!("git {}", prev.0), prev.1)),
            None => println!("{}: no earlier committed version", path.display()),
        }
        for h in &history {
            olds.push((h.display().to_string(), std::fs::read_to_string(h)?));
        }
        for (label, old) in olds {
            match compat::check_backward(&old, &current) {
                Ok(()) => println!("ok    {} reads data written with {label}", path.display()),
                Err(e) => {
                    failures += 1;
                    println!(
                        "FAIL  {} cannot read data written with {label}: {e}",
                        path.display()
                    );
                }
            }
        }
    }
    if failures > 0 {
        bail!(
            "{failures} backward-compatibility failure(s); to change a schema, only add fields with defaults or append union branches"
        );
    }
    Ok(ExitCode::SUCCESS)
}
