//! Fuzzes the `ClientMessage` decoder, `validate`, the re-encoder and the JSON payload
//! parsers with whatever decodes. Nothing may panic; a decoded frame with the standard
//! HeaderLength and an unchanged MessageType must re-encode to the input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ssm_wire_fuzz::frame_decode(data));
