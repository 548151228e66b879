//! Every `error.code` the query API answers with (issue 17 item 4): one
//! closed enum, so a code is a variant the compiler checks, not a string
//! each call site spells. Each code has exactly one HTTP status. The
//! crate's README lists exactly these codes (the table under "Error
//! codes" in its Queries section), and a test keeps the two equal.

use axum::http::StatusCode;

runtime::error_codes! {
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

    #[test]
    fn readme_lists_exactly_the_codes_with_their_statuses() {
        // One status per code: a row listing several cannot match.
        let listed = testkit::documented_codes(include_str!("../README.md"), "### Error codes");
        let ours: Vec<(Vec<u16>, String)> = ErrorCode::ALL
            .iter()
            .map(|c| (vec![c.status().as_u16()], c.as_str().to_owned()))
            .collect();
        testkit::assert_documented_codes(&listed, &ours);
    }
}
