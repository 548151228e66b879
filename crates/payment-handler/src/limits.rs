//! Every limit of the payment handler in one place (issue 17 item 4):
//! the sizes and counts a request may have, and the defaults of the
//! flags that bound the handler's work. Each is named `*_MAX` (or
//! `*_DEFAULT` for a flag's default) with its unit, and the relations
//! between them are checked at compile time at the end of this file.
//!
//! `openapi.json` states the request limits too (`maxItems`,
//! `maxProperties`, `maxLength`).

use events::{EXTERNAL_ID_LEN_MAX, Money};

/// Most orders in one payment (one per seller in a cart).
pub const ORDERS_PER_PAYMENT_MAX: usize = 100;
/// Most entries in a payment's `metadata`.
pub const METADATA_ENTRIES_MAX: usize = 20;
/// Longest metadata key, in characters.
pub const METADATA_KEY_LEN_MAX: usize = 40;
/// Longest metadata value, in characters.
pub const METADATA_VALUE_LEN_MAX: usize = 500;
/// Longest card token (`metadata.card_token`), in bytes: the PSP's limit
/// for `card_token`.
pub const CARD_TOKEN_LEN_MAX: usize = 255;
/// Longest refund reason, in characters.
pub const REFUND_REASON_LEN_MAX: usize = 500;
/// Longest accepted Idempotency-Key, in bytes (visible ASCII; the IETF
/// draft and Stripe use 255).
pub const IDEMPOTENCY_KEY_LEN_MAX: usize = 255;
/// Largest `velocity.max_count` of a risk rule set. The velocity sum is
/// taken over at most this many payments of at most `Money::MAX_MINOR`
/// each, so it always fits in 64 bits: a buyer's window can never
/// overflow (checked below).
pub const VELOCITY_COUNT_MAX: u32 = 9_000;

/// Default of `--body-limit-bytes`: the largest accepted request body.
/// It holds the largest valid payment and refund (checked below).
pub const BODY_LIMIT_BYTES_DEFAULT: usize = 65_536;
/// Default of `--group-commit-max`: most `POST /v1/payments` requests in
/// one group-commit batch.
pub const GROUP_COMMIT_MAX_DEFAULT: usize = 256;
/// Default of `--group-commit-wait-ms`: longest a batch waits for more
/// requests once its first one arrived.
pub const GROUP_COMMIT_WAIT_MS_DEFAULT: u64 = 2;
/// Default of `--group-commit-batches`: most batches in progress at once.
pub const GROUP_COMMIT_BATCHES_DEFAULT: usize = 4;
/// Default of `--idempotency-lease-secs`: how long a request may hold its
/// Idempotency-Key before a retry may take it over (the holder is
/// presumed crashed). Longer than any request takes (checked below
/// against the producer's delivery timeout, the longest step).
pub const IDEMPOTENCY_LEASE_SECS_DEFAULT: u64 = 120;

/// Most bytes one character takes in UTF-8 (free text is counted in
/// characters; JSON needs no escapes for printable text but `"` and `\`,
/// which take 2 bytes).
const UTF8_CHAR_BYTES_MAX: usize = 4;
/// An ISO 4217 currency code is three letters.
const CURRENCY_CODE_LEN: usize = 3;
/// Most digits of a valid amount (`Money::MAX_MINOR`).
const AMOUNT_DIGITS_MAX: usize = decimal_digits(Money::MAX_MINOR as u64);

const fn decimal_digits(mut n: u64) -> usize {
    let mut d = 1;
    while n >= 10 {
        n /= 10;
        d += 1;
    }
    d
}

/// The longest valid `POST /v1/payments` body, in bytes, written
/// compactly: every id, amount, key and value at its maximum.
pub const PAYMENT_BODY_BYTES_MAX: usize = {
    let payment = r#"{"buyer_id":"","orders":[],"metadata":{}}"#.len() + EXTERNAL_ID_LEN_MAX;
    let order = r#"{"seller_id":"","amount_minor":,"currency":""},"#.len()
        + EXTERNAL_ID_LEN_MAX
        + AMOUNT_DIGITS_MAX
        + CURRENCY_CODE_LEN;
    let entry =
        r#""":"","#.len() + (METADATA_KEY_LEN_MAX + METADATA_VALUE_LEN_MAX) * UTF8_CHAR_BYTES_MAX;
    payment + ORDERS_PER_PAYMENT_MAX * order + METADATA_ENTRIES_MAX * entry
};

/// The longest valid refund body, in bytes, written compactly.
pub const REFUND_BODY_BYTES_MAX: usize =
    r#"{"order_id":"00000000-0000-0000-0000-000000000000","amount_minor":,"reason":""}"#.len()
        + AMOUNT_DIGITS_MAX
        + REFUND_REASON_LEN_MAX * UTF8_CHAR_BYTES_MAX;

// The default body limit holds every valid request.
const _: () = assert!(PAYMENT_BODY_BYTES_MAX <= BODY_LIMIT_BYTES_DEFAULT);
const _: () = assert!(REFUND_BODY_BYTES_MAX <= BODY_LIMIT_BYTES_DEFAULT);
// A card token is a metadata value, so the longest one must be one.
const _: () = assert!(CARD_TOKEN_LEN_MAX <= METADATA_VALUE_LEN_MAX);
// The velocity window's sum cannot overflow.
const _: () = assert!(VELOCITY_COUNT_MAX as i128 * Money::MAX_MINOR as i128 <= i64::MAX as i128);
// Nor can the sum of a payment's orders (before the total's own bound).
const _: () =
    assert!(ORDERS_PER_PAYMENT_MAX as i128 * Money::MAX_MINOR as i128 <= i64::MAX as i128);
// A request holds its key for at most an append's delivery timeout plus
// a group-commit wait and some database work: the lease outlasts that.
const _: () = assert!(
    IDEMPOTENCY_LEASE_SECS_DEFAULT as u128 * 1000
        > streaming::producer::DELIVERY_TIMEOUT.as_millis() + GROUP_COMMIT_WAIT_MS_DEFAULT as u128
);

#[cfg(test)]
mod tests {
    use super::*;

    /// A valid payment with every count and length at its maximum (4-byte
    /// characters in the free text) fits in `PAYMENT_BODY_BYTES_MAX`, so
    /// that bound, and the compile-time check on it, are real.
    #[test]
    fn the_largest_valid_payment_fits_the_bound() {
        let id = |c: char| c.to_string().repeat(EXTERNAL_ID_LEN_MAX);
        let orders: Vec<_> = (0..ORDERS_PER_PAYMENT_MAX)
            .map(|_| {
                serde_json::json!({"seller_id": id('s'), "amount_minor": Money::MAX_MINOR / ORDERS_PER_PAYMENT_MAX as i64, "currency": "EUR"})
            })
            .collect();
        let mut metadata = serde_json::Map::new();
        metadata.insert(
            crate::request::CARD_TOKEN_KEY.into(),
            "t".repeat(CARD_TOKEN_LEN_MAX).into(),
        );
        for i in 1..METADATA_ENTRIES_MAX {
            let key = format!("{i:02}{}", "😀".repeat(METADATA_KEY_LEN_MAX - 2));
            metadata.insert(key, "😀".repeat(METADATA_VALUE_LEN_MAX).into());
        }
        let body = serde_json::to_vec(
            &serde_json::json!({"buyer_id": id('b'), "orders": orders, "metadata": metadata}),
        )
        .expect("serialises");
        let parsed = crate::request::parse(&body);
        assert!(parsed.is_ok(), "{parsed:?}");
        assert!(
            body.len() <= PAYMENT_BODY_BYTES_MAX,
            "{} > {PAYMENT_BODY_BYTES_MAX}",
            body.len()
        );
    }

    /// `openapi.json` states the request limits; they are these.
    #[test]
    fn openapi_states_these_limits() {
        let doc: serde_json::Value =
            serde_json::from_str(crate::api::OPENAPI_JSON).expect("openapi.json is JSON");
        let schemas = &doc["components"]["schemas"];
        let payment = &schemas["PaymentRequest"]["properties"];
        let metadata = &payment["metadata"];
        let stated = |v: &serde_json::Value| v.as_u64().and_then(|n| usize::try_from(n).ok());
        assert_eq!(
            stated(&payment["orders"]["maxItems"]),
            Some(ORDERS_PER_PAYMENT_MAX)
        );
        assert_eq!(
            stated(&metadata["maxProperties"]),
            Some(METADATA_ENTRIES_MAX)
        );
        assert_eq!(
            stated(&metadata["propertyNames"]["maxLength"]),
            Some(METADATA_KEY_LEN_MAX)
        );
        assert_eq!(
            stated(&metadata["additionalProperties"]["maxLength"]),
            Some(METADATA_VALUE_LEN_MAX)
        );
        assert_eq!(
            stated(&metadata["properties"]["card_token"]["maxLength"]),
            Some(CARD_TOKEN_LEN_MAX)
        );
        assert_eq!(
            stated(&schemas["RefundRequest"]["properties"]["reason"]["maxLength"]),
            Some(REFUND_REASON_LEN_MAX)
        );
        for (path, at) in [
            ("/v1/payments", 0),
            ("/v1/payments/{payment_id}/refunds", 1),
        ] {
            let key = &doc["paths"][path]["post"]["parameters"][at];
            assert_eq!(key["name"], "Idempotency-Key", "{path}");
            assert_eq!(
                stated(&key["schema"]["maxLength"]),
                Some(IDEMPOTENCY_KEY_LEN_MAX),
                "{path}"
            );
        }
    }

    #[test]
    fn the_largest_valid_refund_fits_the_bound() {
        let body = serde_json::to_vec(&serde_json::json!({
            "order_id": uuid::Uuid::nil().to_string(),
            "amount_minor": Money::MAX_MINOR,
            "reason": "😀".repeat(REFUND_REASON_LEN_MAX),
        }))
        .expect("serialises");
        assert!(crate::request::parse_refund(&body).is_ok());
        assert!(body.len() <= REFUND_BODY_BYTES_MAX);
    }
}
