//! The acknowledgement queue is bounded (issue 14, item 3): a peer that floods stream
//! messages faster than the pacer lets the client acknowledge them cannot grow it; the
//! driver is told to stop reading, the excess is refused unacknowledged, and nothing is
//! lost once the peer resends it.

use std::time::{Duration, Instant};

use bytes::Bytes;
use ssm_wire::channel::{
    AckPacing, Channel, ChannelConfig, ChannelEvent, ReceiveError, Role, MAX_QUEUED_ACKS,
};
use ssm_wire::frame::PayloadType;

#[test]
fn a_flood_of_frames_cannot_grow_the_ack_queue() {
    const N: usize = 3 * MAX_QUEUED_ACKS;
    let start = Instant::now();
    // One frame per second: the acknowledgements of a burst can only queue up.
    let config = ChannelConfig {
        packets_per_second: Some(1.0),
        pacing_burst: 1,
        // Only acks that wait for the pacer can queue up (the default policy writes
        // them at once).
        ack_pacing: AckPacing::Paced,
        ..ChannelConfig::default()
    };
    let mut client = Channel::new(Role::Client, config, start, 1);
    let agent_config = ChannelConfig {
        packets_per_second: None,
        window_packets: N,
        window_bytes: N * 16,
        max_queued: N,
        ..ChannelConfig::default()
    };
    let mut agent = Channel::new(Role::Agent, agent_config, start, 2);
    let mut frames = Vec::new();
    for i in 0..N {
        agent
            .send(start, PayloadType::Output, Bytes::from(format!("{i:08}")))
            .unwrap();
        frames.push(agent.poll_transmit(start).unwrap());
    }

    let mut refused = Vec::new();
    let mut got = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        match client.handle_frame(start, f.clone()) {
            Ok(()) => {}
            Err(ReceiveError::AcksFull(seq)) => refused.push((i, seq)),
            Err(e) => panic!("frame {i}: {e}"),
        }
        // The session takes its data at once: only the acknowledgements hold it back.
        while let Some(ev) = client.poll_event() {
            if let ChannelEvent::Data { payload, .. } = ev {
                got.push(payload);
            }
        }
    }
    assert_eq!(got.len(), MAX_QUEUED_ACKS, "accepted up to the bound");
    assert_eq!(refused.len(), N - MAX_QUEUED_ACKS);
    assert!(!client.wants_input(), "the driver must stop reading");
    // A duplicate of an accepted message adds no acknowledgement either.
    client.handle_frame(start, frames[0].clone()).unwrap();

    // Drain: one acknowledgement per second of pacing, exactly one per accepted message.
    let mut now = start;
    let mut acks = 0;
    while acks < MAX_QUEUED_ACKS {
        now += Duration::from_secs(1);
        while client.poll_transmit(now).is_some() {
            acks += 1;
        }
        assert!(acks <= MAX_QUEUED_ACKS, "more acknowledgements than queued");
    }
    assert!(client.poll_transmit(now + Duration::from_secs(1)).is_none());
    assert!(client.wants_input());

    // The peer resends what was refused: all of it is delivered, in order.
    for (i, _) in &refused {
        now += Duration::from_secs(1);
        client.handle_frame(now, frames[*i].clone()).unwrap();
        while client.poll_transmit(now).is_some() {}
        while let Some(ev) = client.poll_event() {
            if let ChannelEvent::Data { payload, .. } = ev {
                got.push(payload);
            }
        }
    }
    let want: Vec<Bytes> = (0..N).map(|i| Bytes::from(format!("{i:08}"))).collect();
    assert_eq!(got, want);
}
