//! Two channel ends (client and agent) over a simulated network with a simulated clock:
//! latency, loss, duplication and reordering, all seeded and deterministic. Every test
//! asserts on every byte delivered.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use ssm_wire::channel::{
    AckPacing, Channel, ChannelConfig, ChannelEvent, ReceiveError, Role, SendError,
};
use ssm_wire::frame::{ClientMessage, MessageType, PayloadType};

#[derive(Clone, Copy, Default)]
struct LinkProfile {
    latency: Duration,
    loss: f64,
    duplicate: f64,
    reorder: f64,
}

/// One direction of the network: frames in flight with their arrival times.
struct Link {
    profile: LinkProfile,
    in_flight: Vec<(Instant, u64, Bytes)>,
    order: u64,
}

impl Link {
    fn new(profile: LinkProfile) -> Link {
        Link {
            profile,
            in_flight: Vec::new(),
            order: 0,
        }
    }

    fn push(&mut self, now: Instant, frame: Bytes, rng: &mut StdRng) {
        if rng.gen_bool(self.profile.loss) {
            return;
        }
        let copies = if rng.gen_bool(self.profile.duplicate) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let mut at = now + self.profile.latency;
            if rng.gen_bool(self.profile.reorder) {
                at += Duration::from_millis(rng.gen_range(1..30));
            }
            self.order += 1;
            self.in_flight.push((at, self.order, frame.clone()));
        }
    }

    fn next_arrival(&self) -> Option<Instant> {
        self.in_flight.iter().map(|(t, _, _)| *t).min()
    }

    fn pop_due(&mut self, now: Instant) -> Vec<Bytes> {
        let mut due: Vec<_> = Vec::new();
        let mut i = 0;
        while i < self.in_flight.len() {
            if self.in_flight[i].0 <= now {
                due.push(self.in_flight.swap_remove(i));
            } else {
                i += 1;
            }
        }
        due.sort_by_key(|(t, o, _)| (*t, *o));
        due.into_iter().map(|(_, _, f)| f).collect()
    }
}

struct Peer {
    ch: Channel,
    to_send: VecDeque<u8>,
    received: Vec<u8>,
    sent_times: Vec<Instant>,
    closed: bool,
    errors: Vec<ReceiveError>,
}

impl Peer {
    fn new(role: Role, config: ChannelConfig, now: Instant, data: Vec<u8>) -> Peer {
        Peer {
            ch: Channel::new(role, config, now, 1_700_000_000_000),
            to_send: data.into(),
            received: Vec::new(),
            sent_times: Vec::new(),
            closed: false,
            errors: Vec::new(),
        }
    }

    /// Queues as much local data as the window allows, then writes what pacing allows.
    fn pump(&mut self, now: Instant, link: &mut Link, rng: &mut StdRng) {
        let max = self.ch.config().max_payload;
        while !self.to_send.is_empty() {
            let n = self.to_send.len().min(max);
            let chunk: Vec<u8> = self.to_send.iter().take(n).copied().collect();
            match self.ch.send(now, PayloadType::Output, Bytes::from(chunk)) {
                Ok(_) => {
                    self.to_send.drain(..n);
                }
                Err(SendError::WindowFull) => break,
                Err(e) => panic!("send failed: {e}"),
            }
        }
        while let Some(frame) = self.ch.poll_transmit(now) {
            self.sent_times.push(now);
            link.push(now, frame, rng);
        }
        while let Some(ev) = self.ch.poll_event() {
            match ev {
                ChannelEvent::Data {
                    payload_type,
                    payload,
                } => {
                    assert_eq!(payload_type, PayloadType::Output);
                    self.received.extend_from_slice(&payload);
                }
                ChannelEvent::Closed(_) => self.closed = true,
                ChannelEvent::RetransmitTimeout { sequence_number } => {
                    panic!("gave up on {sequence_number}")
                }
                ChannelEvent::Paused | ChannelEvent::Resumed => {}
            }
        }
    }

    fn receive(&mut self, now: Instant, frames: Vec<Bytes>) {
        for f in frames {
            if let Err(e) = self.ch.handle_frame(now, f) {
                self.errors.push(e);
            }
        }
    }
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

struct Outcome {
    client: Peer,
    agent: Peer,
    elapsed: Duration,
}

/// Runs both peers until all data is delivered and acknowledged (or the deadline).
fn run(
    profile: LinkProfile,
    config: ChannelConfig,
    up: usize,
    down: usize,
    seed: u64,
    limit: Duration,
) -> Outcome {
    let start = Instant::now();
    let mut now = start;
    let mut rng = StdRng::seed_from_u64(seed);
    let up_data = pattern(up, seed ^ 1);
    let down_data = pattern(down, seed ^ 2);
    let mut client = Peer::new(Role::Client, config.clone(), now, up_data.clone());
    let mut agent = Peer::new(Role::Agent, config, now, down_data.clone());
    let mut c2a = Link::new(profile);
    let mut a2c = Link::new(profile);
    loop {
        client.pump(now, &mut c2a, &mut rng);
        agent.pump(now, &mut a2c, &mut rng);
        let done = client.received.len() == down
            && agent.received.len() == up
            && client.ch.is_flushed()
            && agent.ch.is_flushed()
            && c2a.in_flight.is_empty()
            && a2c.in_flight.is_empty();
        if done {
            break;
        }
        let next = [
            c2a.next_arrival(),
            a2c.next_arrival(),
            client.ch.poll_timeout(),
            agent.ch.poll_timeout(),
        ]
        .into_iter()
        .flatten()
        .min()
        .expect("stalled: nothing in flight and no timer armed");
        assert!(next >= now, "time went backwards");
        now = next.max(now);
        assert!(now - start < limit, "did not finish within {limit:?}");
        let frames = c2a.pop_due(now);
        agent.receive(now, frames);
        let frames = a2c.pop_due(now);
        client.receive(now, frames);
        client.ch.handle_timeout(now);
        agent.ch.handle_timeout(now);
    }
    assert_eq!(agent.received, up_data, "upload corrupted");
    assert_eq!(client.received, down_data, "download corrupted");
    Outcome {
        client,
        agent,
        elapsed: now - start,
    }
}

fn max_in_window(times: &[Instant], window: Duration) -> usize {
    let mut best = 0;
    let mut lo = 0;
    for hi in 0..times.len() {
        while times[hi] - times[lo] >= window {
            lo += 1;
        }
        best = best.max(hi - lo + 1);
    }
    best
}

#[test]
fn clean_link_delivers_both_directions() {
    let o = run(
        LinkProfile {
            latency: Duration::from_millis(20),
            ..Default::default()
        },
        ChannelConfig::default(),
        300_000,
        300_000,
        1,
        Duration::from_secs(60),
    );
    assert_eq!(o.client.ch.stats().retransmits, 0);
    assert_eq!(o.agent.ch.stats().retransmits, 0);
    assert!(o.client.errors.is_empty());
}

#[test]
fn lossy_reordering_duplicating_link_delivers_every_byte() {
    let profile = LinkProfile {
        latency: Duration::from_millis(10),
        loss: 0.02,
        duplicate: 0.02,
        reorder: 0.05,
    };
    for seed in 0..4 {
        let o = run(
            profile,
            ChannelConfig {
                seed,
                ..Default::default()
            },
            200_000,
            200_000,
            seed,
            Duration::from_secs(120),
        );
        assert!(
            o.client.ch.stats().retransmits > 0,
            "loss must cause resends"
        );
        assert!(o.agent.ch.stats().duplicates_received > 0);
    }
}

#[test]
fn pacing_never_exceeds_the_packet_budget() {
    // The strict policy: acks wait for tokens too (the default charges them instead,
    // tests/ack_pacing.rs).
    let config = ChannelConfig {
        packets_per_second: Some(500.0),
        pacing_burst: 10,
        ack_pacing: AckPacing::Paced,
        ..Default::default()
    };
    let o = run(
        LinkProfile {
            latency: Duration::from_millis(5),
            ..Default::default()
        },
        config,
        2_000_000,
        500_000,
        7,
        Duration::from_secs(120),
    );
    // Every frame the client wrote (data and acks) counts against the budget.
    let peak = max_in_window(&o.client.sent_times, Duration::from_secs(1));
    assert!(peak <= 510, "client peaked at {peak} frames/s");
    assert!(
        peak >= 450,
        "pacing left the budget unused: {peak} frames/s"
    );
    // 2 MB at ~500 frames of 1 KiB per second takes about four seconds.
    assert!(o.elapsed >= Duration::from_secs(3), "{:?}", o.elapsed);
}

#[test]
fn window_bounds_in_flight_data_and_reports_backpressure() {
    let start = Instant::now();
    let mut ch = Channel::new(
        Role::Client,
        ChannelConfig {
            window_packets: 4,
            ..Default::default()
        },
        start,
        1,
    );
    for _ in 0..4 {
        ch.send(start, PayloadType::Output, Bytes::from_static(b"x"))
            .unwrap();
    }
    assert!(!ch.can_send());
    assert_eq!(
        ch.send(start, PayloadType::Output, Bytes::from_static(b"x")),
        Err(SendError::WindowFull)
    );
    assert_eq!(
        ch.send(start, PayloadType::Output, Bytes::new()),
        Err(SendError::Empty)
    );
    // A control message goes past the full window, numbered after the data.
    let seq = ch
        .send_control(start, PayloadType::Flag, Bytes::from_static(&[0, 0, 0, 2]))
        .unwrap();
    assert_eq!(seq, 4);
    assert_eq!(ch.in_flight(), 5);
    assert_eq!(
        ch.send_control(start, PayloadType::Flag, Bytes::new()),
        Err(SendError::Empty)
    );
}

#[test]
fn lost_message_resent_with_backoff_until_acknowledged() {
    let start = Instant::now();
    let mut ch = Channel::new(Role::Client, ChannelConfig::default(), start, 1);
    ch.send(start, PayloadType::Output, Bytes::from_static(b"hello"))
        .unwrap();
    let first = ch.poll_transmit(start).expect("sent");
    // No ack: the timer fires at the initial RTO, then backs off.
    let mut t = start;
    let mut gaps = Vec::new();
    for _ in 0..4 {
        let deadline = ch.poll_timeout().expect("timer armed");
        gaps.push(deadline - t);
        t = deadline;
        ch.handle_timeout(t);
        let again = ch.poll_transmit(t).expect("resent");
        assert_eq!(again, first, "a resend carries the same bytes");
    }
    assert!(
        gaps[1] > gaps[0] && gaps[2] > gaps[1],
        "no back-off: {gaps:?}"
    );
    // The agent acknowledges: nothing more is sent and no timer stays armed.
    let msg = ClientMessage::decode(first).unwrap();
    let mut agent = Channel::new(Role::Agent, ChannelConfig::default(), start, 1);
    agent.handle_frame(t, msg.encode().unwrap().into()).unwrap();
    let ack = agent.poll_transmit(t).unwrap();
    ch.handle_frame(t, ack).unwrap();
    assert!(ch.is_flushed());
    assert_eq!(ch.poll_timeout(), None);
    assert_eq!(
        ch.stats().rtt_samples,
        0,
        "Karn: no sample from a resent message"
    );
}

#[test]
fn every_unacked_message_has_its_own_timer() {
    // Three messages lost at once are all resent on their own timers, not one per RTO.
    let start = Instant::now();
    let mut ch = Channel::new(Role::Client, ChannelConfig::default(), start, 1);
    for _ in 0..3 {
        ch.send(start, PayloadType::Output, Bytes::from_static(b"x"))
            .unwrap();
        ch.poll_transmit(start).unwrap();
    }
    let t = ch.poll_timeout().unwrap();
    ch.handle_timeout(t);
    let mut resent = 0;
    while ch.poll_transmit(t).is_some() {
        resent += 1;
    }
    assert_eq!(resent, 3);
}

#[test]
fn duplicates_are_reacknowledged_and_delivered_once() {
    let start = Instant::now();
    let mut client = Channel::new(Role::Client, ChannelConfig::default(), start, 1);
    let mut agent = Channel::new(Role::Agent, ChannelConfig::default(), start, 1);
    agent
        .send(start, PayloadType::Output, Bytes::from_static(b"once"))
        .unwrap();
    let frame = agent.poll_transmit(start).unwrap();
    client.handle_frame(start, frame.clone()).unwrap();
    let ack = client.poll_transmit(start).expect("acknowledged");
    assert_eq!(
        ClientMessage::decode(ack).unwrap().message_type,
        MessageType::Acknowledge
    );
    // The peer did not get the ack and resends twice: acknowledged again, but while that
    // ack still waits for the pacer a second resend does not queue another.
    client.handle_frame(start, frame.clone()).unwrap();
    client.handle_frame(start, frame).unwrap();
    let mut acks = 0;
    while let Some(f) = client.poll_transmit(start) {
        let m = ClientMessage::decode(f).unwrap();
        assert_eq!(m.message_type, MessageType::Acknowledge);
        acks += 1;
    }
    assert_eq!(acks, 1, "the duplicate must be acknowledged again, once");
    assert_eq!(
        client.poll_event(),
        Some(ChannelEvent::Data {
            payload_type: PayloadType::Output,
            payload: Bytes::from_static(b"once")
        })
    );
    assert_eq!(client.poll_event(), None);
    assert_eq!(client.stats().duplicates_received, 2);
}

#[test]
fn out_of_order_messages_are_delivered_in_order() {
    let start = Instant::now();
    let mut client = Channel::new(Role::Client, ChannelConfig::default(), start, 1);
    let mut agent = Channel::new(Role::Agent, ChannelConfig::default(), start, 1);
    let mut frames = Vec::new();
    for i in 0..5u8 {
        agent
            .send(start, PayloadType::Output, Bytes::from(vec![b'0' + i]))
            .unwrap();
        frames.push(agent.poll_transmit(start).unwrap());
    }
    for i in [4, 2, 3, 0, 1] {
        client.handle_frame(start, frames[i].clone()).unwrap();
    }
    let mut got = Vec::new();
    while let Some(ChannelEvent::Data { payload, .. }) = client.poll_event() {
        got.extend_from_slice(&payload);
    }
    assert_eq!(got, b"01234");
}

#[test]
fn pause_stops_stream_sending_but_not_acks_and_peer_traffic_resumes() {
    let start = Instant::now();
    let mut client = Channel::new(Role::Client, ChannelConfig::default(), start, 1);
    let mut agent = Channel::new(Role::Agent, ChannelConfig::default(), start, 1);
    let pause = ClientMessage::new(
        MessageType::PausePublication,
        0,
        0,
        PayloadType::Undefined,
        Bytes::new(),
        1,
        uuid::Uuid::nil(),
    );
    client
        .handle_frame(start, pause.encode().unwrap().into())
        .unwrap();
    assert_eq!(client.poll_event(), Some(ChannelEvent::Paused));
    client
        .send(start, PayloadType::Output, Bytes::from_static(b"held"))
        .unwrap();
    assert_eq!(client.poll_transmit(start), None, "paused: nothing sent");
    // Stream data from the agent resumes sending (and is acknowledged first).
    agent
        .send(start, PayloadType::Output, Bytes::from_static(b"hi"))
        .unwrap();
    client
        .handle_frame(start, agent.poll_transmit(start).unwrap())
        .unwrap();
    assert_eq!(client.poll_event(), Some(ChannelEvent::Resumed));
    let ack = ClientMessage::decode(client.poll_transmit(start).unwrap()).unwrap();
    assert_eq!(ack.message_type, MessageType::Acknowledge);
    let data = ClientMessage::decode(client.poll_transmit(start).unwrap()).unwrap();
    assert_eq!(&data.payload[..], b"held");
}

#[test]
fn malformed_frames_are_rejected_without_harm() {
    let start = Instant::now();
    let mut client = Channel::new(Role::Client, ChannelConfig::default(), start, 1);
    let mut agent = Channel::new(Role::Agent, ChannelConfig::default(), start, 1);
    agent
        .send(start, PayloadType::Output, Bytes::from_static(b"good"))
        .unwrap();
    let good = agent.poll_transmit(start).unwrap();
    let mut corrupt = good.to_vec();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0xff;
    assert!(matches!(
        client.handle_frame(start, corrupt.into()),
        Err(ReceiveError::Invalid(_))
    ));
    assert!(matches!(
        client.handle_frame(start, good.slice(..100)),
        Err(ReceiveError::Decode(_))
    ));
    assert_eq!(client.poll_event(), None, "nothing reaches the user");
    assert_eq!(client.poll_transmit(start), None, "nothing acknowledged");
    client.handle_frame(start, good).unwrap();
    assert!(matches!(
        client.poll_event(),
        Some(ChannelEvent::Data { .. })
    ));
    assert_eq!(client.stats().dropped_frames, 2);
}

#[test]
fn transport_loss_and_restore_resends_everything_unacknowledged() {
    let start = Instant::now();
    let mut ch = Channel::new(Role::Client, ChannelConfig::default(), start, 1);
    for _ in 0..3 {
        ch.send(start, PayloadType::Output, Bytes::from_static(b"x"))
            .unwrap();
    }
    while ch.poll_transmit(start).is_some() {}
    ch.transport_lost();
    ch.send(start, PayloadType::Output, Bytes::from_static(b"y"))
        .unwrap();
    let later = start + Duration::from_secs(2);
    ch.handle_timeout(later);
    assert_eq!(ch.poll_transmit(later), None, "no socket, nothing written");
    ch.transport_restored(later);
    let mut seqs = Vec::new();
    while let Some(f) = ch.poll_transmit(later) {
        seqs.push(ClientMessage::decode(f).unwrap().sequence_number);
    }
    assert_eq!(seqs, vec![0, 1, 2, 3]);
}

#[test]
fn gives_up_after_the_configured_time() {
    let start = Instant::now();
    let mut ch = Channel::new(
        Role::Client,
        ChannelConfig {
            give_up_after: Duration::from_secs(10),
            ..Default::default()
        },
        start,
        1,
    );
    ch.send(start, PayloadType::Output, Bytes::from_static(b"x"))
        .unwrap();
    let mut now = start;
    loop {
        ch.poll_transmit(now);
        now = ch.poll_timeout().unwrap();
        ch.handle_timeout(now);
        if let Some(ev) = ch.poll_event() {
            assert_eq!(ev, ChannelEvent::RetransmitTimeout { sequence_number: 0 });
            break;
        }
        assert!(now - start < Duration::from_secs(20));
    }
    assert!(now - start >= Duration::from_secs(10));
}

#[test]
fn a_missing_message_is_accepted_however_much_waits_behind_it() {
    // The receive limit gates reading, never the message the stream is waiting for:
    // rejecting it would stall the stream for good behind a full reorder buffer.
    let start = Instant::now();
    let config = ChannelConfig {
        max_undelivered_bytes: 4000,
        ..Default::default()
    };
    let mut client = Channel::new(Role::Client, config, start, 1);
    let mut agent = Channel::new(Role::Agent, ChannelConfig::default(), start, 1);
    let mut frames = Vec::new();
    for i in 0..10u8 {
        agent
            .send(start, PayloadType::Output, Bytes::from(vec![i; 1000]))
            .unwrap();
        frames.push(agent.poll_transmit(start).unwrap());
    }
    for f in &frames[1..] {
        client.handle_frame(start, f.clone()).unwrap();
    }
    assert_eq!(client.poll_event(), None, "held until seq 0 arrives");
    client.handle_frame(start, frames[0].clone()).unwrap();
    assert!(!client.wants_input(), "10 000 bytes delivered, limit 4000");
    let mut got = Vec::new();
    while let Some(ChannelEvent::Data { payload, .. }) = client.poll_event() {
        got.push(payload[0]);
    }
    assert_eq!(got, (0..10).collect::<Vec<u8>>());
    assert!(client.wants_input());
}

#[test]
fn later_acknowledgements_resend_a_lost_message_before_its_timer() {
    let start = Instant::now();
    let mut client = Channel::new(Role::Client, ChannelConfig::default(), start, 1);
    let mut agent = Channel::new(Role::Agent, ChannelConfig::default(), start, 1);
    let mut frames = Vec::new();
    for _ in 0..6 {
        client
            .send(start, PayloadType::Output, Bytes::from_static(b"data"))
            .unwrap();
        frames.push(client.poll_transmit(start).unwrap());
    }
    // Seq 0 is lost; the agent acknowledges 1..=5 a few milliseconds later.
    let t = start + Duration::from_millis(5);
    for f in &frames[1..] {
        agent.handle_frame(t, f.clone()).unwrap();
    }
    while let Some(ack) = agent.poll_transmit(t) {
        client.handle_frame(t, ack).unwrap();
    }
    assert!(
        t - start < client.rto(),
        "well before the retransmission timer"
    );
    let resent = client.poll_transmit(t).expect("resent at once");
    assert_eq!(ClientMessage::decode(resent).unwrap().sequence_number, 0);
    assert_eq!(client.stats().fast_retransmits, 1);
    assert_eq!(client.poll_transmit(t), None, "only the lost one");
}

/// `next_send_at` says when the pacer will let the next message out: nothing while a
/// token is there, the token's instant once the bucket is empty, nothing unpaced.
#[test]
fn next_send_at_follows_the_pacer() {
    let start = Instant::now();
    let mut ch = Channel::new(
        Role::Client,
        ChannelConfig {
            packets_per_second: Some(1000.0),
            pacing_burst: 1,
            ..Default::default()
        },
        start,
        1,
    );
    assert_eq!(ch.next_send_at(start), None);
    ch.send(start, PayloadType::Output, Bytes::from_static(b"x"))
        .unwrap();
    assert!(ch.poll_transmit(start).is_some());
    let at = ch.next_send_at(start).expect("bucket empty");
    let wait = at - start;
    assert!(
        wait > Duration::from_micros(900) && wait <= Duration::from_micros(1001),
        "{wait:?}"
    );
    assert_eq!(
        ch.next_send_at(at),
        None,
        "the token is there at its instant"
    );
    let mut unpaced = Channel::new(
        Role::Client,
        ChannelConfig {
            packets_per_second: None,
            ..Default::default()
        },
        start,
        1,
    );
    unpaced
        .send(start, PayloadType::Output, Bytes::from_static(b"x"))
        .unwrap();
    assert!(unpaced.poll_transmit(start).is_some());
    assert_eq!(unpaced.next_send_at(start), None);
}
