//! Every `error.code` the query API answers with (issue 17 item 4): one
//! closed enum, so a code is a variant the compiler checks, not a string
//! each call site spells. Each code has exactly one HTTP status. The
//! crate's README lists exactly these codes (the table under "Error
//! codes" in its Queries section), and a test keeps the two equal.

use axum::http::StatusCode;

streaming::error_codes! {
    /// A stable, machine-readable error code of the query API.
    pub enum ErrorCode {
        /// 400: a path or query parameter is malformed (`field` names it).
        InvalidParameter = "invalid_parameter",
        /// 401: no, a malformed, an unknown or a revoked API key.
        Unauthenticated = "unauthenticated",
        /// 403: a client key reading what needs an operator key.
        Forbidden = "forbidden",
        /// 404: no such payment (or not the caller's), or no such route.
        NotFound = "not_found",
        /// 503: the projection database could not be read.
        DatabaseUnavailable = "database_unavailable",
        /// 503: the API key table is missing, so no key can be checked.
        AuthUnavailable = "auth_unavailable",
        /// 503: too many requests in flight; `Retry-After`.
        Overloaded = "overloaded",
        /// 503: a ledger verification is already running; `Retry-After`.
        VerifyInProgress = "verify_in_progress",
    }
}

impl ErrorCode {
    /// The HTTP status every answer with this code has.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::InvalidParameter => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthenticated => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::DatabaseUnavailable
            | ErrorCode::AuthUnavailable
            | ErrorCode::Overloaded
            | ErrorCode::VerifyInProgress => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// The README's error-code table: (status, code) per row.
    fn readme_codes() -> Vec<(u16, String)> {
        testkit::documented_codes(include_str!("../README.md"), "### Error codes")
            .into_iter()
            .map(|(statuses, code)| {
                assert_eq!(statuses.len(), 1, "{code}: one status per code");
                (statuses[0], code)
            })
            .collect()
    }

    #[test]
    fn readme_lists_exactly_the_codes_with_their_statuses() {
        let listed = readme_codes();
        let ours: Vec<(u16, String)> = ErrorCode::ALL
            .iter()
            .map(|c| (c.status().as_u16(), c.as_str().to_owned()))
            .collect();
        assert_eq!(
            listed.iter().collect::<BTreeSet<_>>(),
            ours.iter().collect::<BTreeSet<_>>()
        );
        assert_eq!(listed.len(), ours.len(), "a code listed twice");
    }

    #[test]
    fn all_holds_every_variant_once() {
        let mut seen = BTreeSet::new();
        for c in ErrorCode::ALL {
            assert!(seen.insert(*c), "{c} twice");
            assert!(
                c.as_str()
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_')
            );
        }
    }
}
