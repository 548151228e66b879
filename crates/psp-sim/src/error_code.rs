//! Every `error.code` the simulator's HTTP API answers with (issue 17
//! item 4): one closed enum, so a code is a variant the compiler checks,
//! not a string each call site spells. The PSP contract in the crate's
//! README ("HTTP contract", the table of codes) lists exactly these codes
//! with their statuses, and a unit test keeps the two equal.

use axum::http::StatusCode;

runtime::error_codes! {
    /// A stable, machine-readable error code of the simulator's API.
    pub enum ErrorCode {
        /// 400: malformed JSON, unknown field, missing or invalid field.
        InvalidRequest = "invalid_request",
        /// 400: no `Idempotency-Key` header.
        IdempotencyKeyMissing = "idempotency_key_missing",
        /// 401: missing or unknown API key.
        Unauthorized = "unauthorized",
        /// 404: unknown charge (or route).
        NotFound = "not_found",
        /// 409: another request with this key is being processed.
        IdempotencyKeyInUse = "idempotency_key_in_use",
        /// 422: the key was used before with a different request.
        IdempotencyKeyReused = "idempotency_key_reused",
        /// 422: refunds would exceed the captured amount.
        AmountExceedsRefundable = "amount_exceeds_refundable",
        /// 422: the charge is not `succeeded`.
        ChargeNotRefundable = "charge_not_refundable",
        /// 429 or 503 (the behaviour file chooses): simulated rate limit.
        RateLimited = "rate_limited",
        /// 500, 502 or 503 (the behaviour file chooses): simulated transient
        /// failure, no charge was made.
        PspUnavailable = "psp_unavailable",
        /// 500: a bug or a database failure in the simulator.
        InternalError = "internal_error",
    }
}

impl ErrorCode {
    /// The HTTP statuses an answer with this code may have: one, except
    /// for the simulated failures, whose status the behaviour file picks
    /// from these (and `Behaviour` validation checks against them).
    pub fn statuses(self) -> &'static [u16] {
        match self {
            ErrorCode::InvalidRequest | ErrorCode::IdempotencyKeyMissing => &[400],
            ErrorCode::Unauthorized => &[401],
            ErrorCode::NotFound => &[404],
            ErrorCode::IdempotencyKeyInUse => &[409],
            ErrorCode::IdempotencyKeyReused
            | ErrorCode::AmountExceedsRefundable
            | ErrorCode::ChargeNotRefundable => &[422],
            ErrorCode::RateLimited => &[429, 503],
            ErrorCode::PspUnavailable => &[500, 502, 503],
            ErrorCode::InternalError => &[500],
        }
    }

    /// The status of a code that has one; the first listed otherwise.
    pub fn status(self) -> StatusCode {
        StatusCode::from_u16(self.statuses()[0]).expect("listed statuses are valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_contract_lists_exactly_the_codes_with_their_statuses() {
        let listed = testkit::documented_codes(include_str!("../README.md"), "## HTTP contract");
        let ours: Vec<(Vec<u16>, String)> = ErrorCode::ALL
            .iter()
            .map(|c| (c.statuses().to_vec(), c.as_str().to_owned()))
            .collect();
        testkit::assert_documented_codes(&listed, &ours);
    }
}
