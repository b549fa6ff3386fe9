//! The bodies of the fuzz targets, shared by the libFuzzer binaries in `fuzz_targets/`
//! (`cargo +nightly fuzz run <target>`) and by `tests/corpus.rs`, which replays the
//! committed corpora on the stable toolchain.

use std::time::{Duration, Instant};

use bytes::Bytes;
use ssm_wire::channel::{Channel, ChannelConfig, Role as ChannelRole};
use ssm_wire::frame::{ClientMessage, MessageType, PayloadType};
use ssm_wire::payload::{
    parse_exit_code, AcknowledgeContent, ChannelClosed, EncryptionChallenge, Flag,
    HandshakeComplete, HandshakeRequest, HandshakeResponse, KmsEncryptionRequest,
    SessionTypeRequest, SizeData, StartSessionResponse,
};
use ssm_wire::session::ClientSession;
use ssm_wire::smux::{Mux, MuxConfig, MuxEvent, Role, HEADER_LEN};

/// Fuzzes the `ClientMessage` decoder, `validate`, the re-encoder and the JSON payload
/// parsers with whatever decodes. Nothing may panic; a decoded frame with the standard
/// HeaderLength and an unchanged MessageType must re-encode to the input.
pub fn frame_decode(data: &[u8]) {
    let Ok(m) = ClientMessage::decode(Bytes::copy_from_slice(data)) else {
        return;
    };
    let _ = m.validate();
    if data.get(..4) == Some(&[0, 0, 0, 116]) {
        if let Ok(again) = m.encode() {
            if again.get(4..36) == data.get(4..36) {
                assert_eq!(again, data, "re-encode differs");
            }
        }
    }

    let p = &m.payload[..];
    match (&m.message_type, m.payload_type) {
        (MessageType::Acknowledge, _) => {
            let _ = serde_json::from_slice::<AcknowledgeContent>(p);
        }
        (MessageType::ChannelClosed, _) => {
            let _ = serde_json::from_slice::<ChannelClosed>(p);
        }
        (_, PayloadType::Size) => {
            let _ = serde_json::from_slice::<SizeData>(p);
        }
        (_, PayloadType::HandshakeRequest) => {
            if let Ok(req) = serde_json::from_slice::<HandshakeRequest>(p) {
                for a in req.requested_client_actions {
                    let _ =
                        serde_json::from_value::<SessionTypeRequest>(a.action_parameters.clone());
                    let _ = serde_json::from_value::<KmsEncryptionRequest>(a.action_parameters);
                }
            }
        }
        (_, PayloadType::HandshakeResponse) => {
            let _ = serde_json::from_slice::<HandshakeResponse>(p);
        }
        (_, PayloadType::HandshakeComplete) => {
            let _ = serde_json::from_slice::<HandshakeComplete>(p);
        }
        (_, PayloadType::EncChallengeRequest | PayloadType::EncChallengeResponse) => {
            let _ = serde_json::from_slice::<EncryptionChallenge>(p);
        }
        (_, PayloadType::Flag) => {
            let _ = Flag::decode(p);
        }
        (_, PayloadType::ExitCode) => {
            let _ = parse_exit_code(p);
        }
        _ => {}
    }
    if let Ok(s) = std::str::from_utf8(p) {
        let _ = StartSessionResponse::parse(s);
    }
}

fn smux_run(
    role: Role,
    pieces: &mut dyn Iterator<Item = &[u8]>,
) -> (Vec<MuxEvent>, Option<String>) {
    let mut m = Mux::new(
        role,
        MuxConfig {
            max_streams: 64,
            ..MuxConfig::default()
        },
    );
    let mut events = Vec::new();
    for piece in pieces {
        let _ = m.feed(piece);
        assert!(m.buffered_input_len() <= HEADER_LEN + usize::from(u16::MAX));
        while let Some(ev) = m.poll_event() {
            // Echo data, to exercise the outbound side too. (Closing here would make the
            // events depend on where the input was cut, so streams are closed at the end.)
            if let MuxEvent::Data(sid, d) = &ev {
                let _ = m.write(*sid, d);
            }
            events.push(ev);
        }
        let _ = m.poll_output_max(1024);
    }
    let ids: Vec<_> = m.stream_ids().collect();
    for sid in ids {
        let _ = m.close(sid);
    }
    if role == Role::Client {
        let _ = m.open_stream();
    }
    let _ = m.poll_output();
    (events, m.error().map(|e| e.to_string()))
}

/// Fuzzes the smux v1 receiver: the input is fed to a client and a server `Mux` whole and
/// in pieces whose sizes come from the first bytes. Nothing may panic; both feedings must
/// produce the same events and the same first protocol error; buffering stays bounded.
pub fn smux_feed(data: &[u8]) {
    let (sizes, body) = data.split_at(data.len().min(8));
    for role in [Role::Client, Role::Server] {
        let whole = smux_run(role, &mut std::iter::once(body));
        let mut rest = body;
        let mut chunks = Vec::new();
        for (i, s) in sizes.iter().cycle().enumerate() {
            if rest.is_empty() || i > body.len() {
                break;
            }
            let n = (usize::from(*s) % 64 + 1).min(rest.len());
            let (a, b) = rest.split_at(n);
            chunks.push(a);
            rest = b;
        }
        if !rest.is_empty() {
            chunks.push(rest);
        }
        let split = smux_run(role, &mut chunks.into_iter());
        assert_eq!(whole, split);
    }
}

/// Fuzzes the client session's receive path: the input is split into frames (2-byte
/// length prefixes) that are fed to a `ClientSession` at advancing times, with its events
/// drained and timers fired. Nothing may panic, and the channel's buffers stay bounded.
pub fn channel_receive(data: &[u8]) {
    let start = Instant::now();
    let config = ChannelConfig {
        reorder_capacity: 64,
        max_undelivered_bytes: 64 * 1024,
        ..ChannelConfig::default()
    };
    let channel = Channel::new(ChannelRole::Client, config, start, 1);
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
}
