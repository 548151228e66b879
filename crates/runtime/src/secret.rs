//! Secrets from flags, environment or configuration files (PSP API keys,
//! webhook signing secrets): a [`Secret`] never shows its value through
//! `Debug` or `Display`, and [`Secret::check`] refuses values an attacker
//! could guess: empty, shorter than [`SECRET_LEN_MIN`] characters, a well-known
//! default or placeholder (`sk_test_default`, `whsec_default`, `change-me`,
//! ...), or one character repeated.
//!
//! There is no built-in default anywhere: a component that needs a secret
//! refuses to start without a good one and says how to make one
//! ([`GENERATE_HINT`]).

use std::fmt;
use std::sync::Arc;

pub use crate::limits::{SECRET_LEN_MAX, SECRET_LEN_MIN};

/// How to make a good secret, for error messages and docs.
pub const GENERATE_HINT: &str = "generate one with `openssl rand -hex 32`";

/// Values (or parts of values, compared ignoring case) that are published
/// defaults or placeholders: the simulator's old built-in secrets and the
/// usual "fill me in" words.
const WELL_KNOWN: &[&str] = &[
    "sk_test_default",
    "whsec_default",
    "change-me",
    "changeme",
    "change_me",
    "replace-me",
    "replaceme",
    "replace_me",
    "your-secret",
    "your_secret",
    "secret-here",
    "password",
    "example",
];

/// A secret value. `Debug` and `Display` print `***`; the value is only
/// reachable through [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    /// Wraps a value as is (not checked; see [`Secret::check`]).
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(Arc::from(value.into()))
    }

    /// A fresh random secret: 64 hex characters (256 bits from the
    /// operating system's CSPRNG), optionally after a prefix such as
    /// `sk_test_`.
    pub fn generate(prefix: &str) -> Secret {
        let a = uuid::Uuid::new_v4();
        let b = uuid::Uuid::new_v4();
        let c = uuid::Uuid::new_v4();
        // Version/variant bits are fixed in a v4 UUID (6 of 128); three
        // give 366 random bits, of which the first 64 hex characters keep
        // more than 240.
        let mut hex = String::with_capacity(prefix.len() + 96);
        hex.push_str(prefix);
        for u in [a, b, c] {
            for byte in u.as_bytes() {
                use fmt::Write as _;
                let _ = write!(hex, "{byte:02x}");
            }
        }
        hex.truncate(prefix.len() + 64);
        Secret::new(hex)
    }

    /// The value itself, for the one place that must use it (a header, an
    /// HMAC key).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the value is usable as a secret: see the module docs.
    pub fn check(&self) -> Result<(), Weakness> {
        let v = self.expose();
        if v.is_empty() {
            return Err(Weakness::Empty);
        }
        if v.chars().any(|c| !c.is_ascii_graphic()) {
            return Err(Weakness::NotVisibleAscii);
        }
        let len = v.len();
        if len > SECRET_LEN_MAX {
            return Err(Weakness::TooLong { len });
        }
        let lower = v.to_ascii_lowercase();
        if WELL_KNOWN.iter().any(|w| lower.contains(w)) {
            return Err(Weakness::WellKnown);
        }
        if len < SECRET_LEN_MIN {
            return Err(Weakness::TooShort { len });
        }
        let mut distinct: Vec<u8> = v.bytes().collect();
        distinct.sort_unstable();
        distinct.dedup();
        if distinct.len() < 8 {
            return Err(Weakness::Repetitive);
        }
        Ok(())
    }

    /// Compares with a candidate in time that does not depend on where they
    /// differ (the length of the candidate may show).
    pub fn matches(&self, candidate: &[u8]) -> bool {
        constant_time_eq(self.expose().as_bytes(), candidate)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// clap parses flags and environment variables through this: never fails,
/// so clap never echoes a rejected value; [`require`] checks it.
impl From<String> for Secret {
    fn from(value: String) -> Secret {
        Secret::new(value)
    }
}

impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Secret, D::Error> {
        String::deserialize(d).map(Secret::new)
    }
}

/// Why a value is not good enough as a secret (never containing the value).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Weakness {
    #[error("is empty")]
    Empty,
    #[error("has characters other than visible ASCII (no spaces or control characters)")]
    NotVisibleAscii,
    #[error("is {len} characters long; at least {SECRET_LEN_MIN} are required")]
    TooShort { len: usize },
    #[error("is {len} characters long; at most {SECRET_LEN_MAX} are accepted")]
    TooLong { len: usize },
    #[error("is (or contains) a well-known default or placeholder")]
    WellKnown,
    #[error("repeats too few different characters to be random")]
    Repetitive,
}

/// A missing or weak secret setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("{setting} is required (there is no default); {GENERATE_HINT}")]
    Missing { setting: String },
    #[error("{setting} {weakness}; {GENERATE_HINT}")]
    Weak { setting: String, weakness: Weakness },
}

/// The checked secret of a setting, named in errors as `setting` (e.g.
/// "--psp-api-key / PAYSTREAM_PSP_API_KEY").
pub fn require(value: Option<&Secret>, setting: &str) -> Result<Secret, SecretError> {
    let v = value.ok_or_else(|| SecretError::Missing {
        setting: setting.to_owned(),
    })?;
    v.check().map_err(|weakness| SecretError::Weak {
        setting: setting.to_owned(),
        weakness,
    })?;
    Ok(v.clone())
}

/// Byte-wise equality whose time depends only on the lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= std::hint::black_box(x ^ y);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_value() {
        let s = Secret::new("a-very-secret-value-nobody-should-see-0123");
        assert_eq!(format!("{s}"), "***");
        assert_eq!(format!("{s:?}"), "Secret(***)");
        assert_eq!(format!("{:?}", Some(s.clone())), "Some(Secret(***))");
        assert!(!format!("{s:#?}").contains("secret-value"));
        let e = require(Some(&Secret::new("short-secret")), "--x").unwrap_err();
        assert!(!e.to_string().contains("short-secret"), "{e}");
    }

    #[test]
    fn weak_values_are_refused_with_a_hint() {
        let weak = |v: &str| Secret::new(v).check().unwrap_err();
        assert_eq!(weak(""), Weakness::Empty);
        assert_eq!(weak("sk_test_default"), Weakness::WellKnown);
        assert_eq!(weak("whsec_default"), Weakness::WellKnown);
        assert_eq!(weak("change-me"), Weakness::WellKnown);
        assert_eq!(
            weak("CHANGE-ME-change-me-change-me-change-me"),
            Weakness::WellKnown
        );
        assert_eq!(weak("0123456789abcdef"), Weakness::TooShort { len: 16 });
        assert_eq!(
            weak("0123456789abcdef 123456789abcdef0"),
            Weakness::NotVisibleAscii
        );
        assert_eq!(weak(&"ab".repeat(20)), Weakness::Repetitive);
        assert_eq!(
            weak(&"x1".repeat(SECRET_LEN_MAX)),
            Weakness::TooLong {
                len: 2 * SECRET_LEN_MAX
            }
        );
        let e = require(None, "--psp-api-key / PAYSTREAM_PSP_API_KEY").unwrap_err();
        assert!(e.to_string().contains("openssl rand -hex 32"), "{e}");
        assert!(e.to_string().contains("PAYSTREAM_PSP_API_KEY"), "{e}");
        let e = require(Some(&Secret::new("whsec_default")), "--s").unwrap_err();
        assert!(e.to_string().contains("well-known"), "{e}");
        // What `openssl rand -hex 32` prints is fine.
        let good = Secret::new("4f1c2a9be07d35e8a6b1c9d0e2f3a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5");
        assert_eq!(require(Some(&good), "--s").unwrap(), good);
    }

    #[test]
    fn generated_secrets_are_strong_and_distinct() {
        let a = Secret::generate("sk_test_");
        let b = Secret::generate("sk_test_");
        assert!(a.expose().starts_with("sk_test_"));
        assert_eq!(a.expose().len(), "sk_test_".len() + 64);
        assert_ne!(a, b);
        a.check().unwrap();
        Secret::generate("").check().unwrap();
    }

    #[test]
    fn comparison_is_exact() {
        let s = Secret::new("abc");
        assert!(s.matches(b"abc"));
        assert!(!s.matches(b"abd"));
        assert!(!s.matches(b"ab"));
        assert!(!s.matches(b"abc\0"));
        assert!(!s.matches(b""));
        assert!(constant_time_eq(b"", b""));
    }
}
