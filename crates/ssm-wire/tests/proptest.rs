//! Property tests for the codecs: `ClientMessage` encode/decode round trips and hostile
//! input, smux frame streams split at arbitrary points, and the session cipher. Case counts
//! are kept small so the whole file runs in a few seconds.

use std::collections::hash_map::Entry;
use std::collections::HashMap;

use bytes::Bytes;
use proptest::collection::vec;
use proptest::prelude::*;
use ssm_wire::crypto::{DataKey, SessionCipher, OVERHEAD};
use ssm_wire::frame::{ClientMessage, MessageType, PayloadType, PAYLOAD_OFFSET};
use ssm_wire::smux::{Cmd, Frame, Mux, MuxConfig, MuxEvent, Role, StreamId, HEADER_LEN};
use uuid::Uuid;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---- ClientMessage ------------------------------------------------------------------------

fn message_type() -> impl Strategy<Value = MessageType> {
    prop_oneof![
        Just("input_stream_data".to_owned()),
        Just("output_stream_data".to_owned()),
        Just("acknowledge".to_owned()),
        Just("channel_closed".to_owned()),
        Just("start_publication".to_owned()),
        Just("pause_publication".to_owned()),
        // Any other name: printable ASCII without surrounding whitespace (decode trims it).
        "[a-z_][ -~]{0,30}[a-z_]",
    ]
    .prop_map(|s| MessageType::parse(&s))
}

prop_compose! {
    fn message()(
        mt in message_type(),
        schema_version in any::<u32>(),
        created_date in 1..=u64::MAX,
        sequence_number in any::<i64>(),
        flags in any::<u64>(),
        id in any::<u128>(),
        payload_type in any::<u32>(),
        payload in vec(any::<u8>(), 0..600),
    ) -> ClientMessage {
        let mut m = ClientMessage::new(
            mt,
            sequence_number,
            flags,
            PayloadType::from_u32(payload_type),
            Bytes::from(payload),
            created_date,
            Uuid::from_u128(id),
        );
        m.schema_version = schema_version;
        m
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn client_message_round_trips(m in message()) {
        prop_assert_eq!(m.validate(), Ok(()));
        let wire = m.encode().unwrap();
        prop_assert_eq!(wire.len(), m.encoded_len());
        prop_assert_eq!(wire.len(), PAYLOAD_OFFSET + m.payload.len());
        let back = ClientMessage::decode(Bytes::from(wire.clone())).unwrap();
        prop_assert_eq!(&back, &m);
        prop_assert_eq!(back.validate(), Ok(()));
        prop_assert_eq!(back.encode().unwrap(), wire);
    }

    #[test]
    fn decode_never_panics_on_arbitrary_bytes(bytes in vec(any::<u8>(), 0..400)) {
        check_decode(&bytes);
    }

    #[test]
    fn decode_never_panics_on_mutated_frames(
        m in message(),
        edits in vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut wire = m.encode().unwrap();
        for (at, byte) in edits {
            let i = at.index(wire.len());
            wire[i] = byte;
        }
        if truncate {
            wire.truncate(cut.index(wire.len() + 1));
        }
        check_decode(&wire);
    }
}

fn check_decode(bytes: &[u8]) {
    if let Ok(m) = ClientMessage::decode_slice(bytes) {
        let _ = m.validate();
        // With the standard HeaderLength nothing is skipped, so the frame re-encodes exactly
        // (when its MessageType survives trimming unchanged).
        if bytes[..4] == [0, 0, 0, 116] {
            if let Ok(again) = m.encode() {
                if again[4..36] == bytes[4..36] {
                    assert_eq!(again, bytes);
                }
            }
        }
    }
}

// ---- smux ---------------------------------------------------------------------------------

fn smux_frame() -> impl Strategy<Value = Frame> {
    // A handful of ids, so SYN/FIN/PSH hit open, closed and unknown streams.
    let sid = 1u32..8;
    prop_oneof![
        sid.clone().prop_map(Frame::syn),
        sid.clone().prop_map(Frame::fin),
        Just(Frame::nop()),
        (sid, vec(any::<u8>(), 0..300)).prop_map(|(s, d)| Frame::psh(s, Bytes::from(d))),
    ]
}

/// The events the smux receiver rules predict for a frame sequence.
fn model(frames: &[Frame]) -> Vec<MuxEvent> {
    // sid -> peer closed
    let mut open: HashMap<StreamId, bool> = HashMap::new();
    let mut out = Vec::new();
    for f in frames {
        let sid = f.stream_id;
        match f.cmd {
            Cmd::Syn => {
                if let Entry::Vacant(e) = open.entry(sid) {
                    e.insert(false);
                    out.push(MuxEvent::Opened(sid));
                }
            }
            Cmd::Fin if open.get(&sid) == Some(&false) => {
                open.insert(sid, true);
                out.push(MuxEvent::Closed(sid));
            }
            Cmd::Psh if open.get(&sid) == Some(&false) && !f.data.is_empty() => {
                out.push(MuxEvent::Data(sid, f.data.clone()));
            }
            _ => {}
        }
    }
    out
}

fn drain(m: &mut Mux) -> Vec<MuxEvent> {
    std::iter::from_fn(|| m.poll_event()).collect()
}

/// Cuts `wire` at the given (sorted, deduplicated) points.
fn pieces(wire: &[u8], cuts: &[prop::sample::Index]) -> Vec<Vec<u8>> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c.index(wire.len() + 1)).collect();
    points.push(0);
    points.push(wire.len());
    points.sort_unstable();
    points.dedup();
    points
        .windows(2)
        .map(|w| wire[w[0]..w[1]].to_vec())
        .collect()
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn smux_frames_split_anywhere_give_the_same_events(
        frames in vec(smux_frame(), 0..40),
        cuts in vec(any::<prop::sample::Index>(), 0..30),
        zero_copy in any::<bool>(),
    ) {
        let mut wire = Vec::new();
        for f in &frames {
            f.encode_into(&mut wire).unwrap();
        }
        let expected = model(&frames);

        let mut whole = Mux::new(Role::Server, MuxConfig::default());
        whole.feed(&wire).unwrap();
        prop_assert_eq!(drain(&mut whole), expected.clone());

        let mut split = Mux::new(Role::Server, MuxConfig::default());
        let mut got = Vec::new();
        for piece in pieces(&wire, &cuts) {
            if zero_copy {
                split.feed_bytes(Bytes::from(piece)).unwrap();
            } else {
                split.feed(&piece).unwrap();
            }
            prop_assert!(split.buffered_input_len() < HEADER_LEN + 300);
            got.extend(drain(&mut split));
        }
        prop_assert_eq!(got, expected);
        prop_assert_eq!(split.buffered_input_len(), 0);
    }

    #[test]
    fn smux_feed_never_panics_on_arbitrary_bytes(
        bytes in vec(any::<u8>(), 0..600),
        cuts in vec(any::<prop::sample::Index>(), 0..10),
    ) {
        let mut m = Mux::new(Role::Client, MuxConfig::default());
        let mut failed = None;
        for piece in pieces(&bytes, &cuts) {
            match m.feed(&piece) {
                Ok(()) => prop_assert!(failed.is_none()),
                Err(e) => {
                    if let Some(first) = &failed {
                        prop_assert_eq!(first, &e, "errors are sticky");
                    }
                    failed = Some(e);
                }
            }
        }
        let _ = drain(&mut m);
        prop_assert!(m.buffered_input_len() <= HEADER_LEN + usize::from(u16::MAX));
    }

    #[test]
    fn smux_feed_never_panics_on_near_frames(
        parts in vec(
            (
                prop_oneof![4 => Just(1u8), 1 => any::<u8>()],
                0u8..7,
                0u16..64,
                0u32..6,
                vec(any::<u8>(), 0..64),
            ),
            0..20,
        ),
        cuts in vec(any::<prop::sample::Index>(), 0..10),
    ) {
        // Headers that are mostly valid but may lie about their length or carry data where
        // none is allowed, so the decoder gets past the first header.
        let mut bytes = Vec::new();
        for (version, cmd, length, sid, data) in parts {
            bytes.push(version);
            bytes.push(cmd);
            bytes.extend_from_slice(&length.to_le_bytes());
            bytes.extend_from_slice(&sid.to_le_bytes());
            bytes.extend_from_slice(&data);
        }
        let mut m = Mux::new(Role::Server, MuxConfig { max_streams: 3, ..MuxConfig::default() });
        for piece in pieces(&bytes, &cuts) {
            if m.feed(&piece).is_err() {
                prop_assert!(m.error().is_some());
            }
            let _ = drain(&mut m);
        }
    }

    #[test]
    fn smux_client_writes_reach_the_server(
        msgs in vec((0usize..4, vec(any::<u8>(), 0..3000)), 1..20),
        max_frame_size in 1usize..2000,
        chunk in 1usize..1500,
    ) {
        let cfg = MuxConfig { max_frame_size, ..MuxConfig::default() };
        let mut client = Mux::new(Role::Client, cfg.clone());
        let mut server = Mux::new(Role::Server, cfg);
        let sids: Vec<StreamId> = (0..4).map(|_| client.open_stream().unwrap()).collect();
        let mut sent: HashMap<StreamId, Vec<u8>> = HashMap::new();
        for (which, data) in &msgs {
            let sid = sids[*which];
            prop_assert_eq!(client.write(sid, data).unwrap(), data.len());
            sent.entry(sid).or_default().extend_from_slice(data);
        }
        for sid in &sids {
            client.close(*sid).unwrap();
        }
        let mut received: HashMap<StreamId, Vec<u8>> = HashMap::new();
        let mut closed = 0;
        while let Some(piece) = client.poll_output_max(chunk) {
            server.feed_bytes(piece).unwrap();
            while let Some(ev) = server.poll_event() {
                match ev {
                    MuxEvent::Opened(sid) => prop_assert!(sids.contains(&sid)),
                    MuxEvent::Data(sid, d) => {
                        prop_assert!(!d.is_empty() && d.len() <= max_frame_size);
                        received.entry(sid).or_default().extend_from_slice(&d);
                    }
                    MuxEvent::Closed(_) => closed += 1,
                }
            }
        }
        prop_assert_eq!(closed, sids.len());
        sent.retain(|_, v| !v.is_empty());
        prop_assert_eq!(received, sent);
    }
}

// ---- crypto -------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn cipher_round_trips_and_rejects_garbage(
        key in vec(any::<u8>(), 64),
        plaintext in vec(any::<u8>(), 0..2000),
        garbage in vec(any::<u8>(), 0..100),
    ) {
        let key = DataKey::from_slice(&key).unwrap();
        let client = SessionCipher::client(&key);
        let agent = SessionCipher::agent(&key);
        let sealed = client.seal(&plaintext).unwrap();
        prop_assert_eq!(sealed.len(), plaintext.len() + OVERHEAD);
        prop_assert_eq!(agent.open(&sealed).unwrap(), plaintext.clone());
        let sealed = agent.seal(&plaintext).unwrap();
        prop_assert_eq!(client.open(&sealed).unwrap(), plaintext);
        prop_assert!(client.open(&garbage).is_err());
        prop_assert!(agent.open(&garbage).is_err());
        let text = String::from_utf8_lossy(&garbage);
        prop_assert!(client.answer_challenge(&text).is_err());
    }
}
