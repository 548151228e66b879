//! Every `error.code` the handler's HTTP API answers with (issue 17 item
//! 4): one closed enum, so a code is a variant the compiler checks, not a
//! string each call site spells. `openapi.json` lists exactly these values
//! (`components.schemas.Error.properties.error.properties.code.enum`), and
//! a test keeps the two equal.

runtime::error_codes! {
    /// A stable, machine-readable error code of the HTTP API.
    pub enum ErrorCode {
        // The request as a whole.
        InvalidJson = "invalid_json",
        InvalidType = "invalid_type",
        UnknownField = "unknown_field",
        MissingField = "missing_field",
        PayloadTooLarge = "payload_too_large",
        NotFound = "not_found",
        MethodNotAllowed = "method_not_allowed",
        Unauthenticated = "unauthenticated",
        Unavailable = "unavailable",
        // Idempotency-Key.
        InvalidIdempotencyKey = "invalid_idempotency_key",
        IdempotencyKeyReused = "idempotency_key_reused",
        IdempotencyKeyInUse = "idempotency_key_in_use",
        // Fields of a payment or refund.
        InvalidId = "invalid_id",
        InvalidAmount = "invalid_amount",
        InvalidCurrency = "invalid_currency",
        MixedCurrencies = "mixed_currencies",
        NoOrders = "no_orders",
        TooManyOrders = "too_many_orders",
        InvalidMetadata = "invalid_metadata",
        TooManyEntries = "too_many_entries",
        TooLong = "too_long",
        ControlCharacter = "control_character",
        MissingPaymentMethod = "missing_payment_method",
        InvalidPaymentMethod = "invalid_payment_method",
        InvalidReason = "invalid_reason",
        // Payments and refunds as they stand.
        PaymentNotFound = "payment_not_found",
        OrderNotInPayment = "order_not_in_payment",
        OrderNotCaptured = "order_not_captured",
        OrderNotRefundable = "order_not_refundable",
        AmountExceedsRefundable = "amount_exceeds_refundable",
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
}
