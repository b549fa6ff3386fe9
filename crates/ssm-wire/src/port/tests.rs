use super::*;
use crate::smux::Frame;

fn session() -> PortSession {
    PortSession::new(PortConfig {
        chunk: 1024,
        read_size: 4096,
        max_conn_buffered: 10_000,
        max_total_buffered: 25_000,
    })
}

fn events(s: &mut PortSession) -> Vec<PortEvent> {
    std::iter::from_fn(|| s.poll_event()).collect()
}

/// The agent's side: decodes what the session transmitted.
struct Agent {
    mux: Mux,
}

impl Agent {
    fn new() -> Agent {
        Agent {
            mux: Mux::new(Role::Server, MuxConfig::default()),
        }
    }

    /// Everything the session has to send, one payload at a time, as (stream, data) per
    /// PSH frame and `Closed` per FIN.
    fn drain(&mut self, s: &mut PortSession) -> Vec<MuxEvent> {
        let mut got = Vec::new();
        while let Some(out) = s.poll_transmit() {
            assert!(out.len() <= s.config().chunk, "payload over the chunk size");
            self.mux.feed_bytes(out).expect("valid smux");
            got.extend(std::iter::from_fn(|| self.mux.poll_event()));
        }
        got
    }

    /// One payload only.
    fn step(&mut self, s: &mut PortSession) -> Vec<MuxEvent> {
        let mut got = Vec::new();
        if let Some(out) = s.poll_transmit() {
            self.mux.feed_bytes(out).expect("valid smux");
            got.extend(std::iter::from_fn(|| self.mux.poll_event()));
        }
        got
    }
}

fn psh(id: ConnId, data: &[u8]) -> Bytes {
    let mut out = Vec::new();
    Frame::psh(id, Bytes::copy_from_slice(data))
        .encode_into(&mut out)
        .unwrap();
    Bytes::from(out)
}

fn fin(id: ConnId) -> Bytes {
    let mut out = Vec::new();
    Frame::fin(id).encode_into(&mut out).unwrap();
    Bytes::from(out)
}

#[test]
fn open_grants_one_read_and_sends_syn() {
    let mut s = session();
    let mut agent = Agent::new();
    let a = s.open().unwrap();
    assert_eq!(events(&mut s), vec![PortEvent::Read(a)]);
    assert_eq!(agent.drain(&mut s), vec![MuxEvent::Opened(a)]);
}

#[test]
fn pieces_are_joined_across_reads() {
    let mut s = session();
    let mut agent = Agent::new();
    let a = s.open().unwrap();
    agent.drain(&mut s);
    events(&mut s);
    s.handle_read(a, Bytes::from(vec![1u8; 700])).unwrap();
    s.handle_read(a, Bytes::from(vec![2u8; 700])).unwrap();
    let got = agent.drain(&mut s);
    let sizes: Vec<usize> = got
        .iter()
        .map(|e| match e {
            MuxEvent::Data(_, d) => d.len(),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(sizes, vec![1016, 384], "frames stay full across reads");
}

#[test]
fn reads_are_granted_one_at_a_time_while_little_is_pending() {
    let mut s = session();
    let a = s.open().unwrap();
    assert_eq!(events(&mut s), vec![PortEvent::Read(a)]);
    s.handle_read(a, Bytes::from(vec![0u8; 4096])).unwrap();
    assert_eq!(events(&mut s), vec![], "a full read is still pending");
    // One turn takes SYN, the next a piece: now less than a read waits.
    s.poll_transmit();
    s.poll_transmit();
    assert_eq!(events(&mut s), vec![PortEvent::Read(a)]);
    s.poll_transmit();
    assert_eq!(events(&mut s), vec![], "exactly one read outstanding");
}

/// A connection that was idle goes before connections that have been busy, so a keystroke
/// waits behind at most one piece of a bulk upload however many bulk uploads run.
#[test]
fn fresh_connection_goes_before_busy_ones() {
    let mut s = session();
    let mut agent = Agent::new();
    let bulk: Vec<ConnId> = (0..3).map(|_| s.open().unwrap()).collect();
    agent.drain(&mut s);
    for &id in &bulk {
        s.handle_read(id, Bytes::from(vec![0xb0u8; 8192])).unwrap();
    }
    // Each bulk connection takes its first turn (from the fresh line), then they rotate.
    let mut order = Vec::new();
    for _ in 0..5 {
        for ev in agent.step(&mut s) {
            if let MuxEvent::Data(id, _) = ev {
                order.push(id);
            }
        }
    }
    assert_eq!(order, vec![bulk[0], bulk[1], bulk[2], bulk[0], bulk[1]]);
    let key = s.open().unwrap();
    s.handle_read(key, Bytes::from_static(b"k")).unwrap();
    let mut next = Vec::new();
    while next.len() < 2 {
        for ev in agent.step(&mut s) {
            if let MuxEvent::Data(id, d) = ev {
                next.push((id, d));
            }
        }
    }
    assert_eq!(
        next[0],
        (key, Bytes::from_static(b"k")),
        "the keystroke goes next"
    );
    assert_eq!(next[1].0, bulk[2], "then the rotation goes on where it was");
}

#[test]
fn eof_sends_fin_after_pending_data_and_ends_the_connection() {
    let mut s = session();
    let mut agent = Agent::new();
    let a = s.open().unwrap();
    events(&mut s);
    s.handle_read(a, Bytes::from(vec![7u8; 1500])).unwrap();
    assert_eq!(events(&mut s), vec![PortEvent::Read(a)], "the next read");
    s.handle_remote(psh(a, b"reply")).unwrap();
    assert_eq!(
        events(&mut s),
        vec![PortEvent::Write(a, Bytes::from_static(b"reply"))]
    );
    s.handle_read_eof(a).unwrap();
    let got = agent.drain(&mut s);
    let mut data = Vec::new();
    let mut closed = false;
    for ev in got {
        match ev {
            MuxEvent::Data(_, d) => {
                assert!(!closed, "data after FIN");
                data.extend_from_slice(&d);
            }
            MuxEvent::Closed(_) => closed = true,
            MuxEvent::Opened(_) => {}
        }
    }
    assert_eq!(data, vec![7u8; 1500]);
    assert!(closed);
    // smux has no half-close: the write half is shut down after the reply is written.
    assert_eq!(events(&mut s), vec![PortEvent::Shutdown(a)]);
    assert_eq!(s.connections(), 1, "the reply is not written yet");
    s.handle_written(a, 5).unwrap();
    assert_eq!(events(&mut s), vec![PortEvent::Finished(a)]);
    assert_eq!(s.connections(), 0);
    // What the agent still sends for the stream is dropped.
    s.handle_remote(psh(a, b"late")).unwrap();
    assert_eq!(events(&mut s), vec![]);
}

/// A local reader that stops reading holds back no other connection until its own bound.
#[test]
fn stalled_reader_holds_back_nobody_until_its_bound() {
    let mut s = session();
    let stalled = s.open().unwrap();
    let other = s.open().unwrap();
    events(&mut s);
    let chunk = vec![0u8; 1000];
    // 9 000 bytes for the stalled connection: under its bound of 10 000.
    for _ in 0..9 {
        s.handle_remote(psh(stalled, &chunk)).unwrap();
    }
    assert!(s.wants_remote());
    // The other connection keeps flowing.
    for _ in 0..20 {
        s.handle_remote(psh(other, &chunk)).unwrap();
        for ev in events(&mut s) {
            if let PortEvent::Write(id, d) = ev {
                if id == other {
                    s.handle_written(id, d.len()).unwrap();
                }
            }
        }
        assert!(s.wants_remote());
    }
    assert_eq!(s.conn_buffered_down(other), Some(0));
    // The stalled connection reaches its bound: the session stops taking Output.
    s.handle_remote(psh(stalled, &chunk)).unwrap();
    assert_eq!(s.conn_buffered_down(stalled), Some(10_000));
    assert!(!s.wants_remote());
    // Once it drains a little, Output flows again.
    s.handle_written(stalled, 1).unwrap();
    assert!(s.wants_remote());
}

#[test]
fn total_bound_over_all_connections() {
    let mut s = session();
    let ids: Vec<ConnId> = (0..3).map(|_| s.open().unwrap()).collect();
    let chunk = vec![0u8; 1000];
    // 3 × 8 000 = 24 000, each under its own bound, the total just under 25 000.
    for &id in &ids {
        for _ in 0..8 {
            s.handle_remote(psh(id, &chunk)).unwrap();
        }
    }
    assert!(s.wants_remote());
    s.handle_remote(psh(ids[0], &chunk)).unwrap();
    assert_eq!(s.buffered_down(), 25_000);
    assert!(!s.wants_remote());
    s.handle_written(ids[1], 1000).unwrap();
    assert!(s.wants_remote());
}

/// A local client that vanishes mid-transfer: its stream is closed, what it had not sent
/// is dropped, its downloads are released and later data for it is discarded.
#[test]
fn vanished_local_client_closes_its_stream_and_releases_its_bytes() {
    let mut s = session();
    let mut agent = Agent::new();
    let a = s.open().unwrap();
    let b = s.open().unwrap();
    agent.drain(&mut s);
    events(&mut s);
    s.handle_read(a, Bytes::from(vec![1u8; 3000])).unwrap();
    let chunk = vec![0u8; 1000];
    for _ in 0..10 {
        s.handle_remote(psh(a, &chunk)).unwrap();
    }
    assert!(!s.wants_remote(), "a is at its bound");
    s.handle_local_gone(a).unwrap();
    assert!(s.wants_remote(), "a's bytes are released");
    assert_eq!(s.buffered_down(), 0);
    let evs = events(&mut s);
    assert_eq!(evs.last(), Some(&PortEvent::Finished(a)));
    assert_eq!(
        agent.drain(&mut s),
        vec![MuxEvent::Closed(a)],
        "FIN, no data"
    );
    s.handle_remote(psh(a, b"late")).unwrap();
    s.handle_remote(psh(b, b"live")).unwrap();
    assert_eq!(
        events(&mut s),
        vec![PortEvent::Write(b, Bytes::from_static(b"live"))]
    );
    assert_eq!(
        s.handle_read(a, Bytes::from_static(b"x")),
        Err(PortError::UnknownConnection(a))
    );
}

#[test]
fn remote_fin_shuts_down_after_its_writes_and_upload_goes_on() {
    let mut s = session();
    let mut agent = Agent::new();
    let a = s.open().unwrap();
    agent.drain(&mut s);
    events(&mut s);
    s.handle_remote(psh(a, b"bye")).unwrap();
    s.handle_remote(fin(a)).unwrap();
    assert_eq!(
        events(&mut s),
        vec![
            PortEvent::Write(a, Bytes::from_static(b"bye")),
            PortEvent::Shutdown(a)
        ]
    );
    s.handle_read(a, Bytes::from_static(b"still here")).unwrap();
    let got = agent.drain(&mut s);
    assert_eq!(
        got,
        vec![MuxEvent::Data(a, Bytes::from_static(b"still here"))]
    );
}

#[test]
fn protocol_error_is_reported_after_the_frames_before_it() {
    let mut s = session();
    let a = s.open().unwrap();
    events(&mut s);
    let mut bytes = psh(a, b"ok").to_vec();
    bytes.extend_from_slice(&[9, 9, 0, 0, 0, 0, 0, 0]);
    let r = s.handle_remote(Bytes::from(bytes));
    assert!(matches!(r, Err(PortError::Mux(_))), "{r:?}");
    assert_eq!(
        events(&mut s),
        vec![PortEvent::Write(a, Bytes::from_static(b"ok"))]
    );
}

#[test]
fn unknown_connection_calls_are_errors_not_panics() {
    let mut s = session();
    assert!(s.handle_read(99, Bytes::from_static(b"x")).is_err());
    assert!(s.handle_read_eof(99).is_err());
    assert!(s.handle_local_gone(99).is_err());
    assert!(s.handle_written(99, 5).is_err());
    // Data for a stream the agent never had is dropped.
    s.handle_remote(psh(99, b"x")).unwrap();
    assert_eq!(events(&mut s), vec![]);
}

#[test]
fn basic_reads_one_at_a_time_and_disconnects_after_the_data() {
    let mut b = BasicPortSession::new(100);
    assert!(!b.take_read_grant(), "no connection, no read");
    b.handle_accept();
    assert!(b.take_read_grant());
    assert!(!b.take_read_grant(), "one grant per read");
    b.handle_read(Bytes::from_static(b"one"));
    assert!(
        !b.take_read_grant(),
        "the next read waits until this one went up"
    );
    assert_eq!(
        b.poll_transmit(),
        Some(BasicTransmit::Data(Bytes::from_static(b"one")))
    );
    assert!(b.take_read_grant());
    b.handle_read(Bytes::from_static(b"two"));
    b.handle_local_closed();
    assert!(b.take_disconnected());
    assert!(!b.is_connected());
    assert_eq!(
        b.poll_transmit(),
        Some(BasicTransmit::Data(Bytes::from_static(b"two")))
    );
    assert_eq!(b.poll_transmit(), Some(BasicTransmit::DisconnectToPort));
    assert_eq!(b.poll_transmit(), None);
    assert!(!b.take_read_grant());
}

#[test]
fn basic_stops_taking_output_while_the_local_reader_stalls() {
    let mut b = BasicPortSession::new(100);
    b.handle_accept();
    b.handle_remote(60);
    assert!(b.wants_remote());
    b.handle_remote(60);
    assert!(!b.wants_remote());
    b.handle_written(30);
    assert!(b.wants_remote());
    // A new connection starts with nothing unwritten.
    b.handle_remote(500);
    b.handle_local_closed();
    b.handle_accept();
    assert!(b.wants_remote());
}

/// After the agent broke the smux protocol, pending uploads are not silently dropped: the
/// session stops sending and reports why.
#[test]
fn upload_after_a_dead_mux_is_an_error_not_a_silent_drop() {
    let mut s = session();
    let a = s.open().unwrap();
    s.poll_transmit();
    events(&mut s);
    s.handle_read(a, Bytes::from_static(b"pending")).unwrap();
    assert!(s
        .handle_remote(Bytes::from_static(&[9, 9, 0, 0, 0, 0, 0, 0]))
        .is_err());
    assert_eq!(s.poll_transmit(), None);
    assert!(
        matches!(s.error(), Some(PortError::Mux(_))),
        "{:?}",
        s.error()
    );
    assert!(!s.has_transmit());
    assert_eq!(s.buffered_up(), 7, "the data is kept, not dropped");
}
