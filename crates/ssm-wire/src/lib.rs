//! `ssm-wire`: the AWS Session Manager data-channel protocol without I/O.
//!
//! - [`frame`]: the binary `ClientMessage` codec (PROTOCOL.md §3).
//! - [`payload`]: the JSON bodies and small binary payloads carried in frames.
//! - [`smux`]: the smux v1 frame codec and a sans-I/O multiplexer session (§9).
//! - [`channel`]: the reliable, paced, flow-controlled data channel state machine.
//! - [`mode`]: which session mode a handshake selects (pure functions).
//! - [`eice`]: EC2 Instance Connect Endpoint tunnels (URL, frame size, close codes).
//! - [`port`]: multiplexed port forwarding (connections, turn order, bounds) over [`smux`].
//!
//! Nothing here reads a clock, sleeps, spawns or touches a socket: callers feed bytes and
//! time in, and take frames, timers and events out. That keeps every protocol rule
//! testable under a simulated network and clock, and fuzzable.

#![forbid(unsafe_code)]

pub mod channel;
pub mod crypto;
pub mod eice;
pub mod frame;
pub mod mode;
pub mod payload;
pub mod port;
pub mod session;
pub mod smux;
pub mod socks;

pub use frame::{ClientMessage, DecodeError, MessageType, PayloadType, ValidationError};
