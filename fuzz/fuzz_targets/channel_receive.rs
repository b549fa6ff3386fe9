//! Fuzzes the client session's receive path: the input is split into frames (2-byte
//! length prefixes) that are fed to a `ClientSession` at advancing times, with its events
//! drained and timers fired. Nothing may panic, and the channel's buffers stay bounded.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ssm_wire_fuzz::channel_receive(data));
