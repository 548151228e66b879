//! Parsing and validating a payment request body. Parse, don't validate:
//! what comes out is a [`PaymentRequest`] whose every field is known good,
//! or a [`FieldError`] naming the offending field.

use crate::error_code::ErrorCode;
use crate::limits::{
    CARD_TOKEN_LEN_MAX, METADATA_ENTRIES_MAX, METADATA_KEY_LEN_MAX, METADATA_VALUE_LEN_MAX,
    ORDERS_PER_PAYMENT_MAX, REFUND_REASON_LEN_MAX,
};
use events::{BuyerId, Currency, Money, SellerId};
use serde_json::Value;
use std::collections::BTreeMap;

/// The metadata key naming the payment method the executor charges.
pub const CARD_TOKEN_KEY: &str = "card_token";

/// Free text (metadata keys and values, refund reasons) must be printable:
/// no control characters (C0 including NUL, DEL, C1), which databases,
/// terminals and CSV readers downstream refuse or misinterpret.
pub fn check_text(path: &str, s: &str, max_chars: usize) -> Result<(), FieldError> {
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        return Err(FieldError::new(
            path,
            ErrorCode::ControlCharacter,
            format!(
                "{path} must not contain control characters (found U+{:04X})",
                u32::from(c)
            ),
        ));
    }
    if s.chars().count() > max_chars {
        return Err(FieldError::new(
            path,
            ErrorCode::TooLong,
            format!("{path} is limited to {max_chars} characters"),
        ));
    }
    Ok(())
}

/// A validated payment request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentRequest {
    pub buyer_id: BuyerId,
    pub orders: Vec<OrderRequest>,
    pub metadata: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderRequest {
    pub seller_id: SellerId,
    pub amount: Money,
}

impl PaymentRequest {
    /// All orders share one currency (checked at parse time).
    pub fn currency(&self) -> Currency {
        self.orders[0].amount.currency()
    }

    /// Sum of the orders, checked.
    pub fn total(&self) -> Result<Money, FieldError> {
        Money::checked_sum(self.currency(), self.orders.iter().map(|o| o.amount)).map_err(|_| {
            FieldError::new(
                "orders",
                ErrorCode::InvalidAmount,
                "the orders' total overflows 64-bit minor units",
            )
        })
    }
}

/// What is wrong with a request, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub code: ErrorCode,
    pub message: String,
}

impl FieldError {
    pub fn new(
        field: impl Into<String>,
        code: ErrorCode,
        message: impl Into<String>,
    ) -> FieldError {
        FieldError {
            field: field.into(),
            code,
            message: message.into(),
        }
    }
}

fn require<'a>(
    obj: &'a serde_json::Map<String, Value>,
    field: &str,
    path: &str,
) -> Result<&'a Value, FieldError> {
    obj.get(field).ok_or_else(|| {
        FieldError::new(path, ErrorCode::MissingField, format!("{path} is required"))
    })
}

fn string<'a>(v: &'a Value, path: &str) -> Result<&'a str, FieldError> {
    v.as_str().ok_or_else(|| {
        FieldError::new(
            path,
            ErrorCode::InvalidType,
            format!("{path} must be a string"),
        )
    })
}

fn reject_unknown(
    obj: &serde_json::Map<String, Value>,
    allowed: &[&str],
    prefix: &str,
) -> Result<(), FieldError> {
    if let Some(k) = obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        return Err(FieldError::new(
            path.clone(),
            ErrorCode::UnknownField,
            format!("unknown field {path}"),
        ));
    }
    Ok(())
}

/// A request body: valid JSON, an object, no field but `allowed`.
fn body_object(
    body: &[u8],
    allowed: &[&str],
) -> Result<serde_json::Map<String, Value>, FieldError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        FieldError::new(
            "",
            ErrorCode::InvalidJson,
            format!("body is not valid JSON: {e}"),
        )
    })?;
    let Value::Object(obj) = v else {
        return Err(FieldError::new(
            "",
            ErrorCode::InvalidType,
            "body must be a JSON object",
        ));
    };
    reject_unknown(&obj, allowed, "")?;
    Ok(obj)
}

/// Parses `{"buyer_id", "orders": [{"seller_id", "amount_minor", "currency"}], "metadata"?}`.
pub fn parse(body: &[u8]) -> Result<PaymentRequest, FieldError> {
    let obj = &body_object(body, &["buyer_id", "orders", "metadata"])?;

    let buyer = string(require(obj, "buyer_id", "buyer_id")?, "buyer_id")?;
    let buyer_id = BuyerId::parse(buyer)
        .map_err(|e| FieldError::new("buyer_id", ErrorCode::InvalidId, e.to_string()))?;

    let orders_v = require(obj, "orders", "orders")?
        .as_array()
        .ok_or_else(|| {
            FieldError::new("orders", ErrorCode::InvalidType, "orders must be an array")
        })?;
    if orders_v.is_empty() {
        return Err(FieldError::new(
            "orders",
            ErrorCode::NoOrders,
            "a payment needs at least one order",
        ));
    }
    if orders_v.len() > ORDERS_PER_PAYMENT_MAX {
        return Err(FieldError::new(
            "orders",
            ErrorCode::TooManyOrders,
            format!("at most {ORDERS_PER_PAYMENT_MAX} orders per payment"),
        ));
    }
    let mut orders = Vec::with_capacity(orders_v.len());
    for (i, o) in orders_v.iter().enumerate() {
        let p = format!("orders[{i}]");
        let o = o.as_object().ok_or_else(|| {
            FieldError::new(&p, ErrorCode::InvalidType, format!("{p} must be an object"))
        })?;
        reject_unknown(o, &["seller_id", "amount_minor", "currency"], &p)?;
        let fp = format!("{p}.seller_id");
        let seller_id = SellerId::parse(string(require(o, "seller_id", &fp)?, &fp)?)
            .map_err(|e| FieldError::new(&fp, ErrorCode::InvalidId, e.to_string()))?;
        let cp = format!("{p}.currency");
        let currency = Currency::from_code(string(require(o, "currency", &cp)?, &cp)?)
            .map_err(|e| FieldError::new(&cp, ErrorCode::InvalidCurrency, e.to_string()))?;
        let ap = format!("{p}.amount_minor");
        let amount_v = require(o, "amount_minor", &ap)?;
        // JSON numbers with a fraction or exponent are not minor units.
        let amount_minor = amount_v.as_i64().filter(|_| amount_v.is_i64() || amount_v.is_u64()).ok_or_else(|| {
            FieldError::new(
                &ap,
                ErrorCode::InvalidAmount,
                format!("{ap} must be an integer number of minor units (e.g. 1050 for 10.50 EUR), got {amount_v}"),
            )
        })?;
        let amount = Money::payable(amount_minor, currency)
            .map_err(|e| FieldError::new(&ap, ErrorCode::InvalidAmount, e.to_string()))?;
        if let Some(first) = orders.first().map(|o: &OrderRequest| o.amount.currency())
            && first != currency
        {
            return Err(FieldError::new(
                &cp,
                ErrorCode::MixedCurrencies,
                format!(
                    "all orders of a payment must share one currency; orders[0] is {first}, {p} is {currency}"
                ),
            ));
        }
        orders.push(OrderRequest { seller_id, amount });
    }

    let mut metadata = BTreeMap::new();
    if let Some(m) = obj.get("metadata") {
        let m = m.as_object().ok_or_else(|| {
            FieldError::new(
                "metadata",
                ErrorCode::InvalidType,
                "metadata must be an object of strings",
            )
        })?;
        if m.len() > METADATA_ENTRIES_MAX {
            return Err(FieldError::new(
                "metadata",
                ErrorCode::TooManyEntries,
                format!("at most {METADATA_ENTRIES_MAX} metadata entries"),
            ));
        }
        for (k, v) in m {
            // The key is named by its position until it is known printable.
            let p = format!("metadata.{}", k.escape_debug());
            if k.is_empty() || k.chars().count() > METADATA_KEY_LEN_MAX {
                return Err(FieldError::new(
                    &p,
                    ErrorCode::InvalidMetadata,
                    format!("metadata keys must be 1 to {METADATA_KEY_LEN_MAX} characters"),
                ));
            }
            check_text(&p, k, METADATA_KEY_LEN_MAX)?;
            let s = string(v, &p)?;
            if s.chars().count() > METADATA_VALUE_LEN_MAX {
                return Err(FieldError::new(
                    &p,
                    ErrorCode::InvalidMetadata,
                    format!("metadata values must be at most {METADATA_VALUE_LEN_MAX} characters"),
                ));
            }
            check_text(&p, s, METADATA_VALUE_LEN_MAX)?;
            metadata.insert(k.clone(), s.to_owned());
        }
    }
    // The payment method: required, never defaulted downstream.
    let card_path = format!("metadata.{CARD_TOKEN_KEY}");
    match metadata.get(CARD_TOKEN_KEY) {
        None => {
            return Err(FieldError::new(
                &card_path,
                ErrorCode::MissingPaymentMethod,
                format!("{card_path} is required: the payment method to charge"),
            ));
        }
        Some(t) if t.is_empty() || t.len() > CARD_TOKEN_LEN_MAX => {
            return Err(FieldError::new(
                &card_path,
                ErrorCode::InvalidPaymentMethod,
                format!("{card_path} must be 1 to {CARD_TOKEN_LEN_MAX} bytes"),
            ));
        }
        Some(_) => {}
    }
    let req = PaymentRequest {
        buyer_id,
        orders,
        metadata,
    };
    let total = req.total()?;
    if !total.within_bound() {
        return Err(FieldError::new(
            "orders",
            ErrorCode::InvalidAmount,
            format!(
                "the orders' total {} is above the bound of {} minor units",
                total.amount_minor(),
                Money::MAX_MINOR
            ),
        ));
    }
    Ok(req)
}

/// A validated refund request: which order, how much (all that is left when
/// omitted), and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundRequest {
    pub order_id: events::OrderId,
    pub amount_minor: Option<i64>,
    pub reason: String,
}

/// Parses `{"order_id", "amount_minor"?, "reason"?}`.
pub fn parse_refund(body: &[u8]) -> Result<RefundRequest, FieldError> {
    let obj = &body_object(body, &["order_id", "amount_minor", "reason"])?;
    let order_id = string(require(obj, "order_id", "order_id")?, "order_id")?
        .parse()
        .map_err(|_| {
            FieldError::new(
                "order_id",
                ErrorCode::InvalidId,
                "order_id must be an order id (UUID)",
            )
        })?;
    let amount_minor = match obj.get("amount_minor") {
        None | Some(Value::Null) => None,
        Some(a) => Some(
            a.as_i64()
                .filter(|n| *n > 0 && *n <= Money::MAX_MINOR && (a.is_i64() || a.is_u64()))
                .ok_or_else(|| {
                    FieldError::new(
                        "amount_minor",
                        ErrorCode::InvalidAmount,
                        format!(
                            "amount_minor must be a positive integer number of minor units, at most {}",
                            Money::MAX_MINOR
                        ),
                    )
                })?,
        ),
    };
    let reason = match obj.get("reason") {
        None | Some(Value::Null) => String::new(),
        Some(r) => string(r, "reason")?.to_owned(),
    };
    if reason.chars().count() > REFUND_REASON_LEN_MAX {
        return Err(FieldError::new(
            "reason",
            ErrorCode::InvalidReason,
            format!("reason is limited to {REFUND_REASON_LEN_MAX} characters"),
        ));
    }
    check_text("reason", &reason, REFUND_REASON_LEN_MAX)?;
    Ok(RefundRequest {
        order_id,
        amount_minor,
        reason,
    })
}

/// A fingerprint of the request that ignores formatting and key order, so
/// a client re-serialising the same request is not told it changed it.
pub fn fingerprint(body: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let canonical = match serde_json::from_slice::<Value>(body) {
        // serde_json's Map is a BTreeMap (no preserve_order): keys sorted.
        Ok(v) => serde_json::to_vec(&v).unwrap_or_else(|_| body.to_vec()),
        Err(_) => body.to_vec(),
    };
    hex::encode(Sha256::digest(&canonical))
}

/// The fingerprint of a request to `route`: the route and the body's
/// fingerprint, so the same key on two endpoints never matches and a
/// reformatted body still does.
pub fn fingerprint_with(route: &str, body: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(
        format!("{route}\n{}", fingerprint(body)).as_bytes(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(body: &str) -> FieldError {
        parse(body.as_bytes()).unwrap_err()
    }

    #[test]
    fn parses_a_valid_request() {
        let r = parse(br#"{"buyer_id":"b1","orders":[{"seller_id":"s1","amount_minor":1050,"currency":"EUR"},{"seller_id":"s2","amount_minor":1,"currency":"EUR"}],"metadata":{"cart":"c1","card_token":"tok_visa"}}"#).unwrap();
        assert_eq!(r.orders.len(), 2);
        assert_eq!(r.total().unwrap(), Money::new(1051, Currency::EUR));
        assert_eq!(r.metadata["cart"], "c1");
    }

    #[test]
    fn names_the_bad_field() {
        assert_eq!(err("{").code, "invalid_json");
        assert_eq!(err("[]").code, "invalid_type");
        assert_eq!(err(r#"{"orders":[]}"#).field, "buyer_id");
        assert_eq!(err(r#"{"buyer_id":"b","orders":[]}"#).code, "no_orders");
        assert_eq!(err(r#"{"buyer_id":"b c","orders":[]}"#).field, "buyer_id");
        let e = err(
            r#"{"buyer_id":"b","orders":[{"seller_id":"s","amount_minor":10.5,"currency":"EUR"}]}"#,
        );
        assert_eq!(
            (e.field.as_str(), e.code.as_str()),
            ("orders[0].amount_minor", "invalid_amount")
        );
        let e = err(
            r#"{"buyer_id":"b","orders":[{"seller_id":"s","amount_minor":0,"currency":"EUR"}]}"#,
        );
        assert_eq!(e.field, "orders[0].amount_minor");
        let e = err(
            r#"{"buyer_id":"b","orders":[{"seller_id":"s","amount_minor":"5","currency":"EUR"}]}"#,
        );
        assert_eq!(e.code, "invalid_amount");
        let e = err(
            r#"{"buyer_id":"b","orders":[{"seller_id":"s","amount_minor":5,"currency":"eur"}]}"#,
        );
        assert_eq!(
            (e.field.as_str(), e.code.as_str()),
            ("orders[0].currency", "invalid_currency")
        );
        let e = err(
            r#"{"buyer_id":"b","orders":[{"seller_id":"s","amount_minor":5,"currency":"EUR"},{"seller_id":"s","amount_minor":5,"currency":"USD"}]}"#,
        );
        assert_eq!(
            (e.field.as_str(), e.code.as_str()),
            ("orders[1].currency", "mixed_currencies")
        );
        let e = err(
            r#"{"buyer_id":"b","orders":[{"seller_id":"s","amount_minor":5,"currency":"EUR","tip":1}]}"#,
        );
        assert_eq!(
            (e.field.as_str(), e.code.as_str()),
            ("orders[0].tip", "unknown_field")
        );
        let e = err(
            r#"{"buyer_id":"b","orders":[{"seller_id":"s","amount_minor":9223372036854775807,"currency":"EUR"},{"seller_id":"s","amount_minor":1,"currency":"EUR"}]}"#,
        );
        assert_eq!(e.code, "invalid_amount");
        let e = err(
            r#"{"buyer_id":"b","orders":[{"seller_id":"s","amount_minor":5,"currency":"EUR"}],"metadata":{"k":1}}"#,
        );
        assert_eq!(e.field, "metadata.k");
    }

    fn body(metadata: serde_json::Value, amounts: &[i64]) -> String {
        let orders: Vec<_> = amounts
            .iter()
            .map(|a| serde_json::json!({"seller_id": "s", "amount_minor": a, "currency": "EUR"}))
            .collect();
        serde_json::json!({"buyer_id": "b", "orders": orders, "metadata": metadata}).to_string()
    }

    #[test]
    fn control_characters_are_refused_in_every_free_text_field() {
        for bad in ["\u{0}", "\u{7}", "\n", "\u{7f}", "\u{85}", "\u{9f}"] {
            let e = err(&body(
                serde_json::json!({"card_token": format!("tok{bad}visa")}),
                &[5],
            ));
            assert_eq!(
                (e.field.as_str(), e.code.as_str()),
                ("metadata.card_token", "control_character"),
                "{bad:?}"
            );
            let e = err(&body(
                serde_json::json!({"card_token": "t", "note": format!("a{bad}")}),
                &[5],
            ));
            assert_eq!(
                (e.field.as_str(), e.code.as_str()),
                ("metadata.note", "control_character")
            );
            let e = err(&body(
                serde_json::json!({"card_token": "t", format!("k{bad}"): "v"}),
                &[5],
            ));
            assert_eq!(e.code, "control_character");
            let e = parse_refund(
                serde_json::json!({"order_id": uuid::Uuid::nil().to_string(), "reason": format!("r{bad}")})
                    .to_string()
                    .as_bytes(),
            )
            .unwrap_err();
            assert_eq!(
                (e.field.as_str(), e.code.as_str()),
                ("reason", "control_character")
            );
        }
        // Printable non-ASCII text is fine.
        assert!(
            parse(
                body(
                    serde_json::json!({"card_token": "t", "note": "ünïcode ✓"}),
                    &[5]
                )
                .as_bytes()
            )
            .is_ok()
        );
    }

    #[test]
    fn amounts_above_the_shared_bound_are_refused() {
        let max = Money::MAX_MINOR;
        let card = || serde_json::json!({"card_token": "t"});
        assert!(parse(body(card(), &[max]).as_bytes()).is_ok());
        let e = err(&body(card(), &[max + 1]));
        assert_eq!(
            (e.field.as_str(), e.code.as_str()),
            ("orders[0].amount_minor", "invalid_amount")
        );
        let e = err(&body(card(), &[max, 1]));
        assert_eq!(
            (e.field.as_str(), e.code.as_str()),
            ("orders", "invalid_amount")
        );
        let e = parse_refund(
            serde_json::json!({"order_id": uuid::Uuid::nil().to_string(), "amount_minor": max + 1})
                .to_string()
                .as_bytes(),
        )
        .unwrap_err();
        assert_eq!(e.field, "amount_minor");
    }

    #[test]
    fn a_payment_without_a_payment_method_is_refused_naming_the_field() {
        let e = err(
            r#"{"buyer_id":"b","orders":[{"seller_id":"s","amount_minor":5,"currency":"EUR"}]}"#,
        );
        assert_eq!(
            (e.field.as_str(), e.code.as_str()),
            ("metadata.card_token", "missing_payment_method")
        );
        let e = err(&body(serde_json::json!({"cart": "c"}), &[5]));
        assert_eq!(e.field, "metadata.card_token");
        let e = err(&body(serde_json::json!({"card_token": ""}), &[5]));
        assert_eq!(
            (e.field.as_str(), e.code.as_str()),
            ("metadata.card_token", "invalid_payment_method")
        );
    }

    #[test]
    fn fingerprint_ignores_formatting_and_key_order() {
        assert_eq!(
            fingerprint(br#"{"a":1,"b":[1,2]}"#),
            fingerprint(b"{ \"b\": [1, 2],\n \"a\": 1 }")
        );
        assert_ne!(fingerprint(br#"{"a":1}"#), fingerprint(br#"{"a":2}"#));
    }
}
