//! Every `error.code` the handler's HTTP API answers with (issue 17 item
//! 4): one closed enum, so a code is a variant the compiler checks, not a
//! string each call site spells. `openapi.json` lists exactly these values
//! (`components.schemas.Error.properties.error.properties.code.enum`), and
//! a test keeps the two equal.

/// A stable, machine-readable error code of the HTTP API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorCode {
    // The request as a whole.
    InvalidJson,
    InvalidType,
    UnknownField,
    MissingField,
    PayloadTooLarge,
    NotFound,
    MethodNotAllowed,
    Unauthenticated,
    Unavailable,
    // Idempotency-Key.
    InvalidIdempotencyKey,
    IdempotencyKeyReused,
    IdempotencyKeyInUse,
    // Fields of a payment or refund.
    InvalidId,
    InvalidAmount,
    InvalidCurrency,
    MixedCurrencies,
    NoOrders,
    TooManyOrders,
    InvalidMetadata,
    TooManyEntries,
    TooLong,
    ControlCharacter,
    MissingPaymentMethod,
    InvalidPaymentMethod,
    InvalidReason,
    // Payments and refunds as they stand.
    PaymentNotFound,
    OrderNotInPayment,
    OrderNotCaptured,
    OrderNotRefundable,
    AmountExceedsRefundable,
}

impl ErrorCode {
    /// Every code, in declaration order.
    pub const ALL: &'static [ErrorCode] = &[
        ErrorCode::InvalidJson,
        ErrorCode::InvalidType,
        ErrorCode::UnknownField,
        ErrorCode::MissingField,
        ErrorCode::PayloadTooLarge,
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::Unauthenticated,
        ErrorCode::Unavailable,
        ErrorCode::InvalidIdempotencyKey,
        ErrorCode::IdempotencyKeyReused,
        ErrorCode::IdempotencyKeyInUse,
        ErrorCode::InvalidId,
        ErrorCode::InvalidAmount,
        ErrorCode::InvalidCurrency,
        ErrorCode::MixedCurrencies,
        ErrorCode::NoOrders,
        ErrorCode::TooManyOrders,
        ErrorCode::InvalidMetadata,
        ErrorCode::TooManyEntries,
        ErrorCode::TooLong,
        ErrorCode::ControlCharacter,
        ErrorCode::MissingPaymentMethod,
        ErrorCode::InvalidPaymentMethod,
        ErrorCode::InvalidReason,
        ErrorCode::PaymentNotFound,
        ErrorCode::OrderNotInPayment,
        ErrorCode::OrderNotCaptured,
        ErrorCode::OrderNotRefundable,
        ErrorCode::AmountExceedsRefundable,
    ];

    /// The code on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::InvalidType => "invalid_type",
            ErrorCode::UnknownField => "unknown_field",
            ErrorCode::MissingField => "missing_field",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::InvalidIdempotencyKey => "invalid_idempotency_key",
            ErrorCode::IdempotencyKeyReused => "idempotency_key_reused",
            ErrorCode::IdempotencyKeyInUse => "idempotency_key_in_use",
            ErrorCode::InvalidId => "invalid_id",
            ErrorCode::InvalidAmount => "invalid_amount",
            ErrorCode::InvalidCurrency => "invalid_currency",
            ErrorCode::MixedCurrencies => "mixed_currencies",
            ErrorCode::NoOrders => "no_orders",
            ErrorCode::TooManyOrders => "too_many_orders",
            ErrorCode::InvalidMetadata => "invalid_metadata",
            ErrorCode::TooManyEntries => "too_many_entries",
            ErrorCode::TooLong => "too_long",
            ErrorCode::ControlCharacter => "control_character",
            ErrorCode::MissingPaymentMethod => "missing_payment_method",
            ErrorCode::InvalidPaymentMethod => "invalid_payment_method",
            ErrorCode::InvalidReason => "invalid_reason",
            ErrorCode::PaymentNotFound => "payment_not_found",
            ErrorCode::OrderNotInPayment => "order_not_in_payment",
            ErrorCode::OrderNotCaptured => "order_not_captured",
            ErrorCode::OrderNotRefundable => "order_not_refundable",
            ErrorCode::AmountExceedsRefundable => "amount_exceeds_refundable",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for ErrorCode {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn openapi_lists_exactly_the_codes() {
        let doc: serde_json::Value =
            serde_json::from_str(crate::api::OPENAPI_JSON).expect("openapi.json is JSON");
        let listed: BTreeSet<String> = doc["components"]["schemas"]["Error"]["properties"]["error"]
            ["properties"]["code"]["enum"]
            .as_array()
            .expect("Error.error.code has an enum")
            .iter()
            .map(|v| v.as_str().expect("codes are strings").to_owned())
            .collect();
        let ours: BTreeSet<String> = ErrorCode::ALL
            .iter()
            .map(|c| c.as_str().to_owned())
            .collect();
        assert_eq!(listed, ours);
        assert_eq!(ours.len(), ErrorCode::ALL.len(), "a code spelled twice");
    }

    #[test]
    fn all_holds_every_variant_once() {
        // A variant missing from ALL would be missing from the document:
        // as_str's match names every variant, so count through it.
        let mut seen = BTreeSet::new();
        for c in ErrorCode::ALL {
            assert!(seen.insert(*c), "{c} twice");
            assert!(
                c.as_str()
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_')
            );
        }
        assert_eq!(seen.len(), 30);
    }
}
