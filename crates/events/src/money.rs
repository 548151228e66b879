//! Money: integer minor units of an ISO-4217 currency. No floats, ever.
//!
//! Arithmetic is checked: overflow and mixing currencies are errors
//! ([`MoneyError`]), never a panic or a silent wrap.

use std::fmt;
use std::str::FromStr;

/// Why a money value or operation was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("unknown currency code {0:?} (expected an ISO-4217 alphabetic code such as EUR)")]
    UnknownCurrency(String),
    #[error("currency mismatch: {left} and {right} cannot be combined")]
    CurrencyMismatch { left: Currency, right: Currency },
    #[error("amount overflow: the result does not fit in 64-bit minor units")]
    Overflow,
    #[error("amount must be positive, got {0} minor units")]
    NotPositive(i64),
    #[error("amount {0} is above the bound of {max} minor units", max = Money::MAX_MINOR)]
    AboveBound(i64),
}

/// An ISO-4217 currency this system accepts, with its minor-unit exponent.
///
/// The table is closed on purpose: a currency we do not know the exponent of
/// is a currency we would display and settle wrongly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Currency {
    code: [u8; 3],
    exponent: u8,
}

/// (code, exponent) per ISO-4217. Sorted by code for binary search.
const CURRENCIES: &[(&str, u8)] = &[
    ("AED", 2),
    ("AUD", 2),
    ("BHD", 3),
    ("BRL", 2),
    ("CAD", 2),
    ("CHF", 2),
    ("CLP", 0),
    ("CNY", 2),
    ("CZK", 2),
    ("DKK", 2),
    ("EUR", 2),
    ("GBP", 2),
    ("HKD", 2),
    ("HUF", 2),
    ("IDR", 2),
    ("ILS", 2),
    ("INR", 2),
    ("ISK", 0),
    ("JOD", 3),
    ("JPY", 0),
    ("KRW", 0),
    ("KWD", 3),
    ("MXN", 2),
    ("NOK", 2),
    ("NZD", 2),
    ("OMR", 3),
    ("PHP", 2),
    ("PLN", 2),
    ("RON", 2),
    ("SAR", 2),
    ("SEK", 2),
    ("SGD", 2),
    ("THB", 2),
    ("TND", 3),
    ("TRY", 2),
    ("TWD", 2),
    ("UGX", 0),
    ("USD", 2),
    ("VND", 0),
    ("ZAR", 2),
];

impl Currency {
    pub const EUR: Currency = Currency {
        code: *b"EUR",
        exponent: 2,
    };
    pub const USD: Currency = Currency {
        code: *b"USD",
        exponent: 2,
    };
    pub const JPY: Currency = Currency {
        code: *b"JPY",
        exponent: 0,
    };
    pub const KRW: Currency = Currency {
        code: *b"KRW",
        exponent: 0,
    };
    pub const KWD: Currency = Currency {
        code: *b"KWD",
        exponent: 3,
    };

    /// Parses an upper-case ISO-4217 alphabetic code from the supported table.
    pub fn from_code(code: &str) -> Result<Currency, MoneyError> {
        let idx = CURRENCIES
            .binary_search_by(|(c, _)| (*c).cmp(code))
            .map_err(|_| MoneyError::UnknownCurrency(code.to_owned()))?;
        let (c, exponent) = CURRENCIES[idx];
        let b = c.as_bytes();
        Ok(Currency {
            code: [b[0], b[1], b[2]],
            exponent,
        })
    }

    pub fn code(&self) -> &str {
        // The table holds ASCII only.
        std::str::from_utf8(&self.code).expect("currency codes are ASCII")
    }

    /// Number of decimal places of the minor unit (EUR 2, JPY 0, KWD 3).
    pub fn exponent(&self) -> u8 {
        self.exponent
    }

    /// Every supported currency.
    pub fn all() -> impl Iterator<Item = Currency> {
        CURRENCIES
            .iter()
            .map(|(c, _)| Currency::from_code(c).expect("table entries parse"))
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

impl FromStr for Currency {
    type Err = MoneyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Currency::from_code(s)
    }
}

/// An amount in integer minor units of one currency. May be negative
/// (ledger entries are signed); payment amounts are checked positive where
/// they enter the system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Money {
    amount_minor: i64,
    currency: Currency,
}

impl Money {
    /// Largest amount (in minor units, either sign) one payment, order,
    /// refund or ledger event may carry: 10^15, ten trillion in a
    /// two-decimal currency. Far above any real payment, and far enough
    /// below `i64::MAX` (~9.2 * 10^18) that running totals (wallets, buyer
    /// totals, ledger sums, velocity windows) of thousands of maximal
    /// amounts still fit. The handler, the executor's intake and the ledger
    /// all enforce this one bound, so nothing is accepted at the edge that
    /// a later stage refuses.
    pub const MAX_MINOR: i64 = 1_000_000_000_000_000;

    pub fn new(amount_minor: i64, currency: Currency) -> Money {
        Money {
            amount_minor,
            currency,
        }
    }

    /// A strictly positive amount, as every charge and refund must be.
    pub fn positive(amount_minor: i64, currency: Currency) -> Result<Money, MoneyError> {
        if amount_minor <= 0 {
            return Err(MoneyError::NotPositive(amount_minor));
        }
        Ok(Money::new(amount_minor, currency))
    }

    /// A strictly positive amount no larger than [`Money::MAX_MINOR`]: what
    /// a payment order, a payment total or a refund may be.
    pub fn payable(amount_minor: i64, currency: Currency) -> Result<Money, MoneyError> {
        let m = Money::positive(amount_minor, currency)?;
        if !m.within_bound() {
            return Err(MoneyError::AboveBound(amount_minor));
        }
        Ok(m)
    }

    /// Whether `|amount| <= MAX_MINOR`.
    pub fn within_bound(&self) -> bool {
        self.amount_minor
            .checked_abs()
            .is_some_and(|a| a <= Money::MAX_MINOR)
    }

    pub fn zero(currency: Currency) -> Money {
        Money::new(0, currency)
    }

    pub fn amount_minor(&self) -> i64 {
        self.amount_minor
    }

    pub fn currency(&self) -> Currency {
        self.currency
    }

    pub fn is_zero(&self) -> bool {
        self.amount_minor == 0
    }

    fn same_currency(&self, other: &Money) -> Result<(), MoneyError> {
        if self.currency != other.currency {
            return Err(MoneyError::CurrencyMismatch {
                left: self.currency,
                right: other.currency,
            });
        }
        Ok(())
    }

    pub fn checked_add(self, other: Money) -> Result<Money, MoneyError> {
        self.same_currency(&other)?;
        let sum = self
            .amount_minor
            .checked_add(other.amount_minor)
            .ok_or(MoneyError::Overflow)?;
        Ok(Money::new(sum, self.currency))
    }

    pub fn checked_sub(self, other: Money) -> Result<Money, MoneyError> {
        self.same_currency(&other)?;
        let diff = self
            .amount_minor
            .checked_sub(other.amount_minor)
            .ok_or(MoneyError::Overflow)?;
        Ok(Money::new(diff, self.currency))
    }

    pub fn checked_neg(self) -> Result<Money, MoneyError> {
        let neg = self
            .amount_minor
            .checked_neg()
            .ok_or(MoneyError::Overflow)?;
        Ok(Money::new(neg, self.currency))
    }

    /// Sums amounts of one currency; an empty input is an error only if no
    /// currency can be known, so the caller passes it.
    pub fn checked_sum<I: IntoIterator<Item = Money>>(
        currency: Currency,
        items: I,
    ) -> Result<Money, MoneyError> {
        items
            .into_iter()
            .try_fold(Money::zero(currency), Money::checked_add)
    }
}

/// Formats in major units with exactly the currency's decimals, using only
/// integer arithmetic: `10.50 EUR`, `-0.07 USD`, `1000 JPY`.
impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let exp = u32::from(self.currency.exponent);
        let sign = if self.amount_minor < 0 { "-" } else { "" };
        let abs = self.amount_minor.unsigned_abs();
        if exp == 0 {
            return write!(f, "{sign}{abs} {}", self.currency);
        }
        let scale = 10u64.pow(exp);
        let width = exp as usize;
        write!(
            f,
            "{sign}{}.{:0width$} {}",
            abs / scale,
            abs % scale,
            self.currency
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn currency_table_is_sorted_and_unique() {
        assert!(CURRENCIES.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(
            CURRENCIES
                .iter()
                .all(|(c, _)| c.len() == 3 && c.bytes().all(|b| b.is_ascii_uppercase()))
        );
    }

    #[test]
    fn parses_known_codes_with_exponents() {
        assert_eq!(Currency::from_code("EUR").unwrap().exponent(), 2);
        assert_eq!(Currency::from_code("JPY").unwrap().exponent(), 0);
        assert_eq!(Currency::from_code("KWD").unwrap().exponent(), 3);
        assert_eq!(Currency::from_code("KWD").unwrap(), Currency::KWD);
    }

    #[test]
    fn rejects_unknown_or_lowercase_codes() {
        for bad in ["eur", "XXX", "", "EURO", "E"] {
            assert_eq!(
                Currency::from_code(bad),
                Err(MoneyError::UnknownCurrency(bad.into()))
            );
        }
    }

    #[test]
    fn add_and_sub_are_checked() {
        let a = Money::new(i64::MAX, Currency::EUR);
        assert_eq!(
            a.checked_add(Money::new(1, Currency::EUR)),
            Err(MoneyError::Overflow)
        );
        let b = Money::new(i64::MIN, Currency::EUR);
        assert_eq!(
            b.checked_sub(Money::new(1, Currency::EUR)),
            Err(MoneyError::Overflow)
        );
        assert_eq!(b.checked_neg(), Err(MoneyError::Overflow));
        assert_eq!(
            Money::new(5, Currency::EUR).checked_add(Money::new(7, Currency::EUR)),
            Ok(Money::new(12, Currency::EUR))
        );
    }

    #[test]
    fn mixing_currencies_is_an_error() {
        let r = Money::new(1, Currency::EUR).checked_add(Money::new(1, Currency::USD));
        assert_eq!(
            r,
            Err(MoneyError::CurrencyMismatch {
                left: Currency::EUR,
                right: Currency::USD
            })
        );
    }

    #[test]
    fn positive_rejects_zero_and_negative() {
        assert_eq!(
            Money::positive(0, Currency::EUR),
            Err(MoneyError::NotPositive(0))
        );
        assert_eq!(
            Money::positive(-3, Currency::EUR),
            Err(MoneyError::NotPositive(-3))
        );
        assert!(Money::positive(1, Currency::EUR).is_ok());
    }

    #[test]
    fn payable_is_positive_and_within_the_bound() {
        let m = Money::MAX_MINOR;
        assert!(Money::payable(m, Currency::EUR).is_ok());
        assert_eq!(
            Money::payable(m + 1, Currency::EUR),
            Err(MoneyError::AboveBound(m + 1))
        );
        assert_eq!(
            Money::payable(0, Currency::EUR),
            Err(MoneyError::NotPositive(0))
        );
        assert!(Money::new(-m, Currency::EUR).within_bound());
        assert!(!Money::new(i64::MIN, Currency::EUR).within_bound());
    }

    #[test]
    fn displays_in_major_units_without_floats() {
        assert_eq!(Money::new(1050, Currency::EUR).to_string(), "10.50 EUR");
        assert_eq!(Money::new(-7, Currency::USD).to_string(), "-0.07 USD");
        assert_eq!(Money::new(1000, Currency::JPY).to_string(), "1000 JPY");
        assert_eq!(Money::new(1, Currency::KWD).to_string(), "0.001 KWD");
        assert_eq!(
            Money::new(i64::MIN, Currency::EUR).to_string(),
            "-92233720368547758.08 EUR"
        );
    }

    proptest::proptest! {
        #[test]
        fn add_then_sub_round_trips(a in -1_000_000_000_000i64..1_000_000_000_000, b in -1_000_000_000_000i64..1_000_000_000_000) {
            let x = Money::new(a, Currency::EUR);
            let y = Money::new(b, Currency::EUR);
            proptest::prop_assert_eq!(x.checked_add(y).unwrap().checked_sub(y).unwrap(), x);
        }

        #[test]
        fn checked_add_never_panics(a: i64, b: i64) {
            let r = Money::new(a, Currency::EUR).checked_add(Money::new(b, Currency::EUR));
            proptest::prop_assert_eq!(r.is_ok(), a.checked_add(b).is_some());
        }
    }
}
