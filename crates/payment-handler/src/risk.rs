//! The risk check: a trait, and the default rule set loaded from a TOML
//! file (`config/risk-rules.toml` is the built-in default). Real risk
//! engines are third parties; they implement [`RiskCheck`].

use crate::limits::VELOCITY_COUNT_MAX;
use crate::request::PaymentRequest;
use events::{Currency, Money};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The built-in rule set.
pub const DEFAULT_RULES_TOML: &str = include_str!("../../../config/risk-rules.toml");

/// A buyer's recent payments (this one excluded), in the payment's currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecentActivity {
    pub count: u32,
    pub amount: Money,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RiskDecision {
    Approved,
    Rejected { rule: &'static str, reason: String },
}

/// Decides whether a payment may go on. Must be deterministic for the same
/// request and activity: a retried request must get the same decision.
pub trait RiskCheck: Send + Sync + std::fmt::Debug {
    /// Identifier and version recorded in the risk event.
    fn rule_set(&self) -> &str;
    /// The velocity window this check needs activity for, if any.
    fn velocity_window_ms(&self) -> Option<i64>;
    fn assess(&self, req: &PaymentRequest, recent: &RecentActivity) -> RiskDecision;
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Velocity {
    pub window_secs: u64,
    pub max_count: u32,
    #[serde(default)]
    pub max_amount_minor: BTreeMap<String, i64>,
}

/// The default rule set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RiskRules {
    pub name: String,
    #[serde(default)]
    pub allowed_currencies: Option<BTreeSet<String>>,
    #[serde(default)]
    pub blocked_buyers: BTreeSet<String>,
    #[serde(default)]
    pub blocked_sellers: BTreeSet<String>,
    #[serde(default)]
    pub max_order_minor: BTreeMap<String, i64>,
    #[serde(default)]
    pub max_payment_minor: BTreeMap<String, i64>,
    #[serde(default)]
    pub velocity: Option<Velocity>,
}

#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("cannot read risk rules {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid risk rules {path}: {detail}")]
    Invalid { path: String, detail: String },
}

impl RiskRules {
    pub fn default_rules() -> RiskRules {
        RiskRules::parse(DEFAULT_RULES_TOML, "built-in config/risk-rules.toml")
            .expect("the built-in rules are valid")
    }

    pub fn load(path: &Path) -> Result<RiskRules, RulesError> {
        let text = std::fs::read_to_string(path).map_err(|source| RulesError::Read {
            path: path.display().to_string(),
            source,
        })?;
        RiskRules::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, origin: &str) -> Result<RiskRules, RulesError> {
        let invalid = |detail: String| RulesError::Invalid {
            path: origin.to_owned(),
            detail,
        };
        let rules: RiskRules = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let currencies = rules
            .allowed_currencies
            .iter()
            .flatten()
            .chain(rules.max_order_minor.keys())
            .chain(rules.max_payment_minor.keys())
            .chain(
                rules
                    .velocity
                    .iter()
                    .flat_map(|v| v.max_amount_minor.keys()),
            );
        for c in currencies {
            Currency::from_code(c).map_err(|e| invalid(e.to_string()))?;
        }
        let limits = rules
            .max_order_minor
            .values()
            .chain(rules.max_payment_minor.values())
            .chain(
                rules
                    .velocity
                    .iter()
                    .flat_map(|v| v.max_amount_minor.values()),
            );
        if limits.into_iter().any(|l| *l <= 0 || *l > Money::MAX_MINOR) {
            return Err(invalid(format!(
                "limits must be positive and at most {} minor units (the amount bound)",
                Money::MAX_MINOR
            )));
        }
        // Every currency the rules accept has a per-order and a per-payment
        // limit: a currency without one would be limited only by the
        // amount bound.
        let accepted: Vec<String> = match &rules.allowed_currencies {
            Some(a) => a.iter().cloned().collect(),
            None => Currency::all().map(|c| c.code().to_owned()).collect(),
        };
        let unlimited: Vec<&str> = accepted
            .iter()
            .filter(|c| {
                !rules.max_order_minor.contains_key(*c) || !rules.max_payment_minor.contains_key(*c)
            })
            .map(String::as_str)
            .collect();
        if !unlimited.is_empty() {
            return Err(invalid(format!(
                "every accepted currency needs max_order_minor and max_payment_minor; missing for {} \
                 (list the currencies you accept in allowed_currencies and give each a limit)",
                unlimited.join(", ")
            )));
        }
        if let Some(v) = &rules.velocity {
            if v.window_secs == 0 {
                return Err(invalid("velocity.window_secs must be positive".into()));
            }
            if v.max_count > VELOCITY_COUNT_MAX {
                return Err(invalid(format!(
                    "velocity.max_count must be at most {VELOCITY_COUNT_MAX}"
                )));
            }
        }
        Ok(rules)
    }
}

impl RiskCheck for RiskRules {
    fn rule_set(&self) -> &str {
        &self.name
    }

    fn velocity_window_ms(&self) -> Option<i64> {
        self.velocity
            .as_ref()
            .map(|v| i64::try_from(v.window_secs.saturating_mul(1000)).unwrap_or(i64::MAX))
    }

    fn assess(&self, req: &PaymentRequest, recent: &RecentActivity) -> RiskDecision {
        let reject = |rule, reason: String| RiskDecision::Rejected { rule, reason };
        if self.blocked_buyers.contains(req.buyer_id.as_str()) {
            return reject(
                "blocked_buyer",
                format!("buyer {} is blocked", req.buyer_id),
            );
        }
        if let Some(o) = req
            .orders
            .iter()
            .find(|o| self.blocked_sellers.contains(o.seller_id.as_str()))
        {
            return reject(
                "blocked_seller",
                format!("seller {} is blocked", o.seller_id),
            );
        }
        let currency = req.currency();
        let code = currency.code();
        if let Some(allowed) = &self.allowed_currencies
            && !allowed.contains(code)
        {
            return reject(
                "currency_not_allowed",
                format!("currency {code} is not accepted"),
            );
        }
        if let Some(max) = self.max_order_minor.get(code)
            && let Some(o) = req.orders.iter().find(|o| o.amount.amount_minor() > *max)
        {
            return reject(
                "amount_limit_per_order",
                format!(
                    "order to {} of {} exceeds the limit of {}",
                    o.seller_id,
                    o.amount,
                    Money::new(*max, currency)
                ),
            );
        }
        // parse() guarantees the total fits.
        let total = req.total().expect("validated request total");
        if let Some(max) = self.max_payment_minor.get(code)
            && total.amount_minor() > *max
        {
            return reject(
                "amount_limit_per_payment",
                format!(
                    "payment total {total} exceeds the limit of {}",
                    Money::new(*max, currency)
                ),
            );
        }
        if let Some(v) = &self.velocity {
            if recent.count.saturating_add(1) > v.max_count {
                return reject(
                    "velocity_count",
                    format!(
                        "buyer {} already made {} payments in the last {} s (limit {})",
                        req.buyer_id, recent.count, v.window_secs, v.max_count
                    ),
                );
            }
            if let Some(max) = v.max_amount_minor.get(code) {
                let sum = recent
                    .amount
                    .checked_add(total)
                    .map(|m| m.amount_minor())
                    .unwrap_or(i64::MAX);
                if sum > *max {
                    return reject(
                        "velocity_amount",
                        format!(
                            "buyer {} would pay {} in {} s (limit {})",
                            req.buyer_id,
                            Money::new(sum, currency),
                            v.window_secs,
                            Money::new(*max, currency)
                        ),
                    );
                }
            }
        }
        RiskDecision::Approved
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::parse;

    fn req(buyer: &str, orders: &[(&str, i64, &str)]) -> PaymentRequest {
        let orders: Vec<_> = orders
            .iter()
            .map(|(s, a, c)| serde_json::json!({"seller_id": s, "amount_minor": a, "currency": c}))
            .collect();
        parse(
            serde_json::json!({"buyer_id": buyer, "orders": orders, "metadata": {"card_token": "tok_visa"}})
                .to_string()
                .as_bytes(),
        )
        .unwrap()
    }

    fn none(c: Currency) -> RecentActivity {
        RecentActivity {
            count: 0,
            amount: Money::zero(c),
        }
    }

    fn rules(extra: &str) -> RiskRules {
        RiskRules::parse(&format!("name = \"t@1\"\n{extra}"), "test").unwrap()
    }

    #[test]
    fn every_accepted_currency_needs_limits() {
        let e = RiskRules::parse(
            "name = \"x\"\nallowed_currencies = [\"EUR\", \"CHF\"]\n[max_order_minor]\nEUR = 1\nCHF = 1\n[max_payment_minor]\nEUR = 1\n",
            "f",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("missing for CHF"), "{e}");
        // Accepting every currency means limiting every currency.
        let e = RiskRules::parse("name = \"x\"\n[max_order_minor]\nEUR = 1\n", "f")
            .unwrap_err()
            .to_string();
        assert!(e.contains("USD"), "{e}");
        // A limit above the amount bound is no limit.
        assert!(
            RiskRules::parse(
                &format!(
                    "name = \"x\"\nallowed_currencies = [\"EUR\"]\n[max_order_minor]\nEUR = {}\n[max_payment_minor]\nEUR = 1\n",
                    Money::MAX_MINOR + 1
                ),
                "f"
            )
            .is_err()
        );
        assert!(
            RiskRules::parse(
                "name = \"x\"\nallowed_currencies = [\"EUR\"]\n[max_order_minor]\nEUR = 1\n[max_payment_minor]\nEUR = 1\n[velocity]\nwindow_secs = 1\nmax_count = 9001\n",
                "f"
            )
            .is_err()
        );
    }

    fn rule_of(d: RiskDecision) -> &'static str {
        match d {
            RiskDecision::Rejected { rule, .. } => rule,
            RiskDecision::Approved => "approved",
        }
    }

    #[test]
    fn default_rules_load_and_approve_an_ordinary_payment() {
        let r = RiskRules::default_rules();
        assert_eq!(r.rule_set(), "default@1");
        assert_eq!(
            r.assess(&req("b", &[("s", 1050, "EUR")]), &none(Currency::EUR)),
            RiskDecision::Approved
        );
    }

    #[test]
    fn each_rule_rejects_with_its_name() {
        let r = rules(
            "blocked_buyers = [\"bad-b\"]\nblocked_sellers = [\"bad-s\"]\nallowed_currencies = [\"EUR\"]\n\
             [max_order_minor]\nEUR = 100\n[max_payment_minor]\nEUR = 150\n\
             [velocity]\nwindow_secs = 60\nmax_count = 2\n[velocity.max_amount_minor]\nEUR = 200\n",
        );
        let e = none(Currency::EUR);
        assert_eq!(
            rule_of(r.assess(&req("bad-b", &[("s", 1, "EUR")]), &e)),
            "blocked_buyer"
        );
        assert_eq!(
            rule_of(r.assess(&req("b", &[("s", 1, "EUR"), ("bad-s", 1, "EUR")]), &e)),
            "blocked_seller"
        );
        assert_eq!(
            rule_of(r.assess(&req("b", &[("s", 1, "USD")]), &none(Currency::USD))),
            "currency_not_allowed"
        );
        assert_eq!(
            rule_of(r.assess(&req("b", &[("s", 101, "EUR")]), &e)),
            "amount_limit_per_order"
        );
        assert_eq!(
            rule_of(r.assess(&req("b", &[("s", 100, "EUR"), ("t", 51, "EUR")]), &e)),
            "amount_limit_per_payment"
        );
        assert_eq!(
            rule_of(r.assess(&req("b", &[("s", 100, "EUR"), ("t", 50, "EUR")]), &e)),
            "approved"
        );
        let busy = RecentActivity {
            count: 2,
            amount: Money::new(0, Currency::EUR),
        };
        assert_eq!(
            rule_of(r.assess(&req("b", &[("s", 1, "EUR")]), &busy)),
            "velocity_count"
        );
        let spent = RecentActivity {
            count: 1,
            amount: Money::new(150, Currency::EUR),
        };
        assert_eq!(
            rule_of(r.assess(&req("b", &[("s", 51, "EUR")]), &spent)),
            "velocity_amount"
        );
        assert_eq!(
            rule_of(r.assess(&req("b", &[("s", 50, "EUR")]), &spent)),
            "approved"
        );
    }

    #[test]
    fn invalid_rule_files_are_rejected_with_the_reason() {
        assert!(
            RiskRules::parse("name = \"x\"\nallowed_currencies = [\"EURO\"]", "f")
                .unwrap_err()
                .to_string()
                .contains("EURO")
        );
        assert!(
            RiskRules::parse(
                "name = \"x\"\nallowed_currencies = [\"EUR\"]\n[max_order_minor]\nEUR = 0\n[max_payment_minor]\nEUR = 1",
                "f"
            )
            .unwrap_err()
            .to_string()
            .contains("positive")
        );
        assert!(RiskRules::parse("name = \"x\"\nunknown = 1", "f").is_err());
    }
}
