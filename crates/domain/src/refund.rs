//! The refund state machine (being written).
