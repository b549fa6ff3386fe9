//! Fuzzes the smux v1 receiver: the input is fed to a client and a server `Mux` whole and
//! in pieces whose sizes come from the first bytes. Nothing may panic; both feedings must
//! produce the same events and the same first protocol error; buffering stays bounded.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ssm_wire::smux::{Mux, MuxConfig, MuxEvent, Role, HEADER_LEN};

fn run(role: Role, pieces: &mut dyn Iterator<Item = &[u8]>) -> (Vec<MuxEvent>, Option<String>) {
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

fuzz_target!(|data: &[u8]| {
    let (sizes, body) = data.split_at(data.len().min(8));
    for role in [Role::Client, Role::Server] {
        let whole = run(role, &mut std::iter::once(body));
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
        let split = run(role, &mut chunks.into_iter());
        assert_eq!(whole, split);
    }
});
