//! What the command prints: reports and resolutions to stdout (as a table
//! or JSON), the run's timings and unresolved count to stderr.

use crate::report::Report;
use crate::resolve::Resolved;
use crate::run::Timings;

/// Writes to stdout; a closed pipe (`| head`) is not an error.
fn out(text: &str) -> Result<(), crate::Error> {
    use std::io::Write as _;
    let mut o = std::io::stdout().lock();
    match o.write_all(text.as_bytes()).and_then(|()| o.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// A run's report: JSON or the table.
pub(crate) fn report(report: &Report, json: bool) -> Result<(), crate::Error> {
    if json {
        out(&format!("{}\n", serde_json::to_string_pretty(report)?))
    } else {
        out(&report.table())
    }
}

/// The table of a run's report on stderr (`serve reconciler --once`).
pub(crate) fn report_to_stderr(report: &Report) {
    eprint!("{}", report.table());
}

/// After a run's report: how long it took and, if any, how many
/// discrepancies of the day are unresolved.
pub(crate) fn run_summary(report: &Report, t: &Timings) {
    eprintln!(
        "parsed in {:.3} s, reconciled in {:.3} s",
        t.parse.as_secs_f64(),
        t.total.as_secs_f64()
    );
    if report.unresolved > 0 {
        eprintln!(
            "{} unresolved discrepancies for {}",
            report.unresolved, report.settlement_date
        );
    }
}

/// What a resolution did: JSON or one line.
pub(crate) fn resolved(r: &Resolved, json: bool) -> Result<(), crate::Error> {
    if json {
        return out(&format!("{}\n", serde_json::to_string_pretty(r)?));
    }
    let adj = r
        .adjustment
        .as_ref()
        .map(|m| {
            format!(
                ", adjustment {} {} (psp_receivable)",
                m.amount_minor, m.currency
            )
        })
        .unwrap_or_default();
    out(&format!(
        "discrepancy {} ({}) -> {} by {}{adj}; event {}{}\n",
        r.discrepancy_id,
        r.class,
        r.state,
        r.action,
        r.event_id,
        if r.republished { " (re-published)" } else { "" }
    ))
}
