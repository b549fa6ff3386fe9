//! Fuzzes the client session's receive path: the input is split into frames (2-byte
//! length prefixes) that are fed to a `ClientSession` at advancing times, with its events
//! drained and timers fired. Nothing may panic, and the channel's buffers stay bounded.
#![no_main]

use std::time::{Duration, Instant};

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use ssm_wire::channel::{Channel, ChannelConfig, Role};
use ssm_wire::session::ClientSession;

fuzz_target!(|data: &[u8]| {
    let start = Instant::now();
    let config = ChannelConfig {
        reorder_capacity: 64,
        max_undelivered_bytes: 64 * 1024,
        ..ChannelConfig::default()
    };
    let channel = Channel::new(Role::Client, config, start, 1);
    let mut session = ClientSession::new(channel, "1.3.0.0".to_owned(), false);
    let mut rest = data;
    let mut now = start;
    while rest.len() >= 2 {
        let len = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
        rest = &rest[2..];
        let take = len.min(rest.len());
        let frame = Bytes::copy_from_slice(&rest[..take]);
        rest = &rest[take..];
        let _ = session.handle_frame(now, frame);
        while session.poll_event(now).is_some() {}
        now += Duration::from_millis(7);
        session.handle_timeout(now);
        while session.channel_mut().poll_transmit(now).is_some() {}
        let _ = session.send_output(now, b"x");
    }
    assert!(session.channel().in_flight() <= session.channel().config().window_packets);
});
