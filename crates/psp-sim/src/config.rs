//! Behaviour configuration: merchant accounts, latency, outcome rules and
//! webhook delivery quirks. Loaded from a JSON file (`--behaviour`), every
//! field optional; the defaults make every charge succeed at once.

use crate::error_code::ErrorCode;
use crate::limits::{DELAY_MS_MAX, RULES_MAX};
use runtime::secret::Secret;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The account every simulator has; its API key and webhook secret come
/// from the flags (`--api-key`, `--webhook-secret`) or, in tests, from
/// [`crate::SimConfig`]: there are no built-in ones.
pub const DEFAULT_ACCOUNT: &str = "acct_default";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read behaviour file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("behaviour file {path} is not valid: {source}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
    #[error("invalid behaviour: {0}")]
    Invalid(String),
}

/// Everything configurable per run.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Behaviour {
    /// Global latency, uniform in `[min, max]` ms; rules may override it.
    pub latency_ms: LatencyMs,
    /// Evaluated in order, first match wins; then the built-in magic card
    /// tokens; then `succeed`.
    pub rules: Vec<Rule>,
    /// Merchant accounts besides (or overriding) `acct_default`.
    pub accounts: Vec<Account>,
    pub webhooks: WebhookBehaviour,
    /// `"full"` (default), `"batched"` or `"relaxed"` (benchmarks);
    /// `--durability` sets it too.
    pub durability: Durability,
}

/// How the simulator's commits reach the disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// `synchronous=FULL`: each commit (two per new charge) is an fsync, so
    /// a committed charge survives a power cut. The default.
    #[default]
    Full,
    /// `synchronous=NORMAL` in WAL mode: a commit is a write to the WAL
    /// without an fsync; the WAL is fsynced when it is checkpointed, so
    /// many commits share one fsync. The same SQL, the same unique
    /// (account, key) constraint and the same answers: idempotency and
    /// behaviour are unchanged, and a killed process loses nothing (the
    /// WAL is in the OS's cache). Only a power cut or kernel crash may
    /// lose the last commits. For benchmarks, where the simulator's fsyncs
    /// would otherwise be what is measured.
    Relaxed,
    /// `Relaxed`'s `synchronous=NORMAL`, and a group commit (`writer.rs`):
    /// the writes of concurrent requests (key claims, charges with their
    /// stored answers, refunds, webhook bookkeeping) share one transaction
    /// of up to 256 writes, and each request is answered only after that
    /// transaction is committed. The SQL, the unique (account, key)
    /// constraint and the answers are the same (those of committing the
    /// writes one by one in arrival order); only the number of
    /// transactions changes (two per charge with `Relaxed`; at 64
    /// concurrent clients about 30 writes share one). Durable as
    /// `Relaxed`. For benchmarks, where the simulator should cost next to
    /// nothing.
    Batched,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatencyMs {
    pub min: u64,
    pub max: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(rename = "match", default)]
    pub matcher: Matcher,
    pub outcome: Outcome,
    /// Overrides the global latency for requests this rule matches.
    #[serde(default)]
    pub latency_ms: Option<LatencyMs>,
}

/// All given conditions must hold; an empty matcher matches everything.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Matcher {
    pub card_token: Option<String>,
    pub card_token_prefix: Option<String>,
    /// Inclusive bounds on `amount_minor`.
    pub amount_min: Option<i64>,
    pub amount_max: Option<i64>,
    pub currency: Option<String>,
}

impl Matcher {
    pub fn matches(&self, card_token: &str, amount_minor: i64, currency: &str) -> bool {
        self.card_token.as_deref().is_none_or(|t| t == card_token)
            && self
                .card_token_prefix
                .as_deref()
                .is_none_or(|p| card_token.starts_with(p))
            && self.amount_min.is_none_or(|m| amount_minor >= m)
            && self.amount_max.is_none_or(|m| amount_minor <= m)
            && self.currency.as_deref().is_none_or(|c| c == currency)
    }
}

/// What the simulator does with a matching charge request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Outcome {
    Succeed,
    /// A final answer: the charge is recorded with status `declined`.
    Decline {
        code: String,
    },
    /// Recorded as `pending`; resolves after `resolve_after_ms` of simulator
    /// clock time and is announced by webhook.
    Pending {
        resolve_after_ms: u64,
        then: Resolution,
    },
    /// The first `times` requests with one idempotency key get this status
    /// (500, 502 or 503) and no charge; later ones proceed normally.
    Error {
        status: u16,
        times: u32,
    },
    /// The first `times` requests get 429/503 with `Retry-After`.
    RateLimit {
        status: u16,
        retry_after_s: u64,
        times: u32,
    },
    /// The first `times` requests are held `hold_ms`, then the connection is
    /// dropped without an answer. With `charge_created` the charge was
    /// recorded (succeeded) before the answer was lost.
    Timeout {
        hold_ms: u64,
        charge_created: bool,
        times: u32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resolution {
    Succeed,
    Fail,
}

/// A merchant account at the PSP. Its key and secret never show in `Debug`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Account {
    pub id: String,
    pub api_key: Secret,
    pub webhook_secret: Secret,
    /// Where webhooks go; none means this account gets no webhooks.
    #[serde(default)]
    pub webhook_url: Option<String>,
    #[serde(default = "default_fee_bps")]
    pub fee_bps: u32,
    #[serde(default = "default_fee_fixed")]
    pub fee_fixed_minor: i64,
}

fn default_fee_bps() -> u32 {
    290
}

fn default_fee_fixed() -> i64 {
    30
}

impl Account {
    /// An account with the default fees and no webhooks.
    pub fn new(id: &str, api_key: Secret, webhook_secret: Secret) -> Account {
        Account {
            id: id.into(),
            api_key,
            webhook_secret,
            webhook_url: None,
            fee_bps: default_fee_bps(),
            fee_fixed_minor: default_fee_fixed(),
        }
    }

    /// `amount * fee_bps / 10000` rounded half up, plus the fixed part; in
    /// i128 so no amount can overflow the intermediate product.
    pub fn fee_for(&self, amount_minor: i64) -> Option<i64> {
        let variable = (i128::from(amount_minor) * i128::from(self.fee_bps) + 5_000) / 10_000;
        i64::try_from(variable)
            .ok()?
            .checked_add(self.fee_fixed_minor)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookBehaviour {
    /// First retry delay; doubles per failed attempt up to `max_backoff_ms`.
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// Per-attempt HTTP timeout.
    pub timeout_ms: u64,
    /// Chance (0..=100) that an event is delivered twice.
    pub duplicate_percent: u8,
    /// Chance (0..=100) that a delivery is held back by up to
    /// `delay_max_ms`, which reorders it behind later events.
    pub delay_percent: u8,
    pub delay_max_ms: u64,
}

impl Default for WebhookBehaviour {
    fn default() -> Self {
        WebhookBehaviour {
            initial_backoff_ms: 200,
            max_backoff_ms: 30_000,
            timeout_ms: 10_000,
            duplicate_percent: 0,
            delay_percent: 0,
            delay_max_ms: 0,
        }
    }
}

impl Behaviour {
    pub fn load(path: &Path) -> Result<Behaviour, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        let b: Behaviour = serde_json::from_str(&text).map_err(|source| ConfigError::Parse {
            path: shown,
            source,
        })?;
        b.validate()?;
        Ok(b)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        check_latency(self.latency_ms)?;
        if self.rules.len() > RULES_MAX {
            return bad(format!("at most {RULES_MAX} rules"));
        }
        for (i, r) in self.rules.iter().enumerate() {
            if let Some(l) = r.latency_ms {
                check_latency(l)?;
            }
            match &r.outcome {
                Outcome::Succeed => {}
                Outcome::Decline { code } if code.is_empty() => {
                    return bad(format!("rule {i}: decline code must not be empty"));
                }
                Outcome::Decline { .. } => {}
                Outcome::Pending {
                    resolve_after_ms, ..
                } if *resolve_after_ms > DELAY_MS_MAX => {
                    return bad(format!("rule {i}: resolve_after_ms above {DELAY_MS_MAX}"));
                }
                Outcome::Pending { .. } => {}
                Outcome::Error { status, .. }
                    if !ErrorCode::PspUnavailable.statuses().contains(status) =>
                {
                    return bad(format!("rule {i}: error status must be 500, 502 or 503"));
                }
                Outcome::Error { .. } => {}
                Outcome::RateLimit { status, .. }
                    if !ErrorCode::RateLimited.statuses().contains(status) =>
                {
                    return bad(format!("rule {i}: rate_limit status must be 429 or 503"));
                }
                Outcome::RateLimit { .. } => {}
                Outcome::Timeout { hold_ms, .. } if *hold_ms > DELAY_MS_MAX => {
                    return bad(format!("rule {i}: hold_ms above {DELAY_MS_MAX}"));
                }
                Outcome::Timeout { .. } => {}
            }
        }
        for a in &self.accounts {
            if a.id.is_empty()
                || a.api_key.expose().is_empty()
                || a.webhook_secret.expose().is_empty()
            {
                return bad("accounts need a non-empty id, api_key and webhook_secret".into());
            }
            if a.fee_fixed_minor < 0 || a.fee_bps > 10_000 {
                return bad(format!("account {}: fee out of range", a.id));
            }
        }
        let w = &self.webhooks;
        if w.initial_backoff_ms == 0 || w.max_backoff_ms < w.initial_backoff_ms {
            return bad("webhooks: need 0 < initial_backoff_ms <= max_backoff_ms".into());
        }
        if w.duplicate_percent > 100 || w.delay_percent > 100 {
            return bad("webhooks: percentages are 0..=100".into());
        }
        if w.timeout_ms == 0 || w.delay_max_ms > DELAY_MS_MAX {
            return bad("webhooks: timeout_ms must be > 0, delay_max_ms bounded".into());
        }
        Ok(())
    }

    /// The accounts in effect: the configured ones, plus `acct_default`
    /// with the given key and secret unless configured.
    pub fn effective_accounts(&self, api_key: &Secret, webhook_secret: &Secret) -> Vec<Account> {
        let mut accounts = self.accounts.clone();
        if !accounts.iter().any(|a| a.id == DEFAULT_ACCOUNT) {
            accounts.push(Account::new(
                DEFAULT_ACCOUNT,
                api_key.clone(),
                webhook_secret.clone(),
            ));
        }
        accounts
    }

    /// The outcome and latency for a charge request: configured rules, then
    /// the built-in magic tokens, then success.
    pub fn decide(
        &self,
        card_token: &str,
        amount_minor: i64,
        currency: &str,
    ) -> (Outcome, LatencyMs) {
        for r in &self.rules {
            if r.matcher.matches(card_token, amount_minor, currency) {
                return (r.outcome.clone(), r.latency_ms.unwrap_or(self.latency_ms));
            }
        }
        let outcome = magic_token(card_token).unwrap_or(Outcome::Succeed);
        (outcome, self.latency_ms)
    }
}

fn check_latency(l: LatencyMs) -> Result<(), ConfigError> {
    if l.min > l.max || l.max > DELAY_MS_MAX {
        return Err(ConfigError::Invalid(format!(
            "latency_ms needs min <= max <= {DELAY_MS_MAX}, got {l:?}"
        )));
    }
    Ok(())
}

/// The built-in card tokens (documented in the README).
pub fn magic_token(card_token: &str) -> Option<Outcome> {
    let o = match card_token {
        "tok_decline" => Outcome::Decline {
            code: "card_declined".into(),
        },
        "tok_insufficient_funds" => Outcome::Decline {
            code: "insufficient_funds".into(),
        },
        "tok_pending" => Outcome::Pending {
            resolve_after_ms: 60_000,
            then: Resolution::Succeed,
        },
        "tok_pending_fail" => Outcome::Pending {
            resolve_after_ms: 60_000,
            then: Resolution::Fail,
        },
        "tok_pending_days" => Outcome::Pending {
            resolve_after_ms: 3 * 24 * 3600 * 1000,
            then: Resolution::Succeed,
        },
        "tok_flaky_500" => Outcome::Error {
            status: 500,
            times: 2,
        },
        "tok_flaky_502" => Outcome::Error {
            status: 502,
            times: 2,
        },
        "tok_rate_limited" => Outcome::RateLimit {
            status: 429,
            retry_after_s: 1,
            times: 1,
        },
        "tok_unavailable" => Outcome::RateLimit {
            status: 503,
            retry_after_s: 1,
            times: 1,
        },
        "tok_timeout" => Outcome::Timeout {
            hold_ms: 1_000,
            charge_created: true,
            times: 1,
        },
        "tok_timeout_before" => Outcome::Timeout {
            hold_ms: 1_000,
            charge_created: false,
            times: 1,
        },
        _ => return None,
    };
    Some(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_account() -> Account {
        Account::new(
            DEFAULT_ACCOUNT,
            Secret::generate("sk_test_"),
            Secret::generate("whsec_"),
        )
    }

    #[test]
    fn fee_rounds_half_up() {
        let a = test_account();
        // 1050 * 290 / 10000 = 30.45 -> 30, + 30
        assert_eq!(a.fee_for(1050), Some(60));
        // 50 * 290 / 10000 = 1.45 -> 1; 1000 * 290 / 10000 = 29
        assert_eq!(a.fee_for(50), Some(31));
        let half = Account {
            fee_bps: 5_000,
            fee_fixed_minor: 0,
            ..test_account()
        };
        assert_eq!(half.fee_for(1), Some(1)); // 0.5 -> 1
        assert_eq!(half.fee_for(3), Some(2)); // 1.5 -> 2
        // i128 intermediate: no overflow for any amount.
        assert_eq!(a.fee_for(i64::MAX), Some(267_477_789_068_788_498 + 30));
        let greedy = Account {
            fee_fixed_minor: i64::MAX,
            ..test_account()
        };
        assert_eq!(greedy.fee_for(10_000), None);
    }

    #[test]
    fn first_rule_wins_then_magic_tokens() {
        let b: Behaviour = serde_json::from_str(
            r#"{"rules":[
                {"match":{"amount_min":1000,"amount_max":1999},"outcome":{"type":"decline","code":"do_not_honor"}},
                {"match":{"card_token_prefix":"tok_slow"},"outcome":{"type":"succeed"},"latency_ms":{"min":5,"max":9}},
                {"outcome":{"type":"error","status":503,"times":1}, "match":{"card_token":"tok_x"}}
            ]}"#,
        )
        .unwrap();
        b.validate().unwrap();
        assert_eq!(
            b.decide("tok_decline", 1500, "EUR").0,
            Outcome::Decline {
                code: "do_not_honor".into()
            }
        );
        assert_eq!(
            b.decide("tok_decline", 10, "EUR").0,
            Outcome::Decline {
                code: "card_declined".into()
            }
        );
        assert_eq!(
            b.decide("tok_slow_1", 10, "EUR"),
            (Outcome::Succeed, LatencyMs { min: 5, max: 9 })
        );
        assert_eq!(b.decide("tok_visa", 10, "EUR").0, Outcome::Succeed);
    }

    #[test]
    fn rejects_bad_statuses() {
        let b: Behaviour = serde_json::from_str(
            r#"{"rules":[{"outcome":{"type":"error","status":404,"times":1}}]}"#,
        )
        .unwrap();
        assert!(b.validate().is_err());
    }
}
