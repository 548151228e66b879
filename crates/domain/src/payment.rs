//! The payment state machine (being written).
