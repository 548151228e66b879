//! Business rules as values.
//!
//! Each state machine is a pair of pure functions:
//!
//! - `decide(&state, command) -> Result<Vec<Event>, Rejection>`: what a
//!   command means in a state, as the facts it produces or a closed reason
//!   it is refused;
//! - `apply(state, &event) -> state`: the state after a fact.
//!
//! Time and ids come in with the command; nothing here reads a clock, draws
//! a random number or does I/O. The components store the state in SQL and
//! guard each transition with a compare-and-set on its state or version,
//! so the rules live here once and the SQL only keeps them.

pub mod order;
pub mod payment;
pub mod refund;
