//! The commands: each parses what the user asks, hands it to the daemon
//! (through `protocol`) or does it itself, and prints what comes back.

pub mod connect;
pub mod down;
pub mod env;
pub mod reroute;
pub mod run;
pub mod up;
