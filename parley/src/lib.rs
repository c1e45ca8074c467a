//! The `parley` binary's library half: configuration and the composition of core, edge and bus
//! into one server. `main.rs` only parses the command line and calls in here.

pub mod config;
pub mod health;
pub mod server;
pub mod sfu_role;
pub mod telemetry;
pub mod web;
