//! The order state machine (being written).
