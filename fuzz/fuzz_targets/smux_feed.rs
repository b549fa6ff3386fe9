//! Fuzzes the smux v1 receiver: the input is fed to a client and a server `Mux` whole and
//! in pieces whose sizes come from the first bytes. Nothing may panic; both feedings must
//! produce the same events and the same first protocol error; buffering stays bounded.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ssm_wire_fuzz::smux_feed(data));
