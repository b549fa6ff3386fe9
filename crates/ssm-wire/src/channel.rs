//! The reliable data channel: sequence numbers, acknowledgements, in-order delivery,
//! retransmission, flow control and pacing, as a sans-I/O state machine.
//!
//! A [`Channel`] is one end of the stream of `input_stream_data` / `output_stream_data`
//! messages that rides on the WebSocket (PROTOCOL.md §5). It never reads a clock or touches
//! a socket: the driver feeds it
//!
//! - frames received from the WebSocket ([`Channel::handle_frame`]),
//! - payloads to send ([`Channel::send`], refused with [`SendError::WindowFull`] while the
//!   in-flight window is full: that is the backpressure signal to stop reading local input),
//! - the current time when a timer fires ([`Channel::handle_timeout`]),
//!
//! and drains frames to write ([`Channel::poll_transmit`]), the next deadline
//! ([`Channel::poll_timeout`]) and events for the session ([`Channel::poll_event`]).
//!
//! Fixes over the official implementation (PROTOCOL.md §10): every unacknowledged message
//! has its own retransmission timer with exponential back-off and Karn's rule; duplicates
//! are re-acknowledged; nothing unacknowledged is ever evicted (the window bounds the
//! producer instead); stream messages pass a token bucket so the channel stays under the
//! gateway's packets-per-second limit, and acknowledgements use that budget as
//! [`AckPacing`] says (by default they are never delayed but are charged to it);
//! `pause_publication` stops stream sending until the peer is heard from again.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use uuid::Uuid;

use crate::frame::{ClientMessage, DecodeError, MessageType, PayloadType, ValidationError};
use crate::payload::{AcknowledgeContent, ChannelClosed};

/// Which end of the channel this is: it decides the message types sent and accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The plugin: sends `input_stream_data`, receives `output_stream_data`.
    Client,
    /// The agent: sends `output_stream_data`, receives `input_stream_data`.
    Agent,
}

impl Role {
    fn outgoing(self) -> MessageType {
        match self {
            Role::Client => MessageType::InputStreamData,
            Role::Agent => MessageType::OutputStreamData,
        }
    }

    fn incoming(self) -> MessageType {
        match self {
            Role::Client => MessageType::OutputStreamData,
            Role::Agent => MessageType::InputStreamData,
        }
    }
}

/// Acknowledgements waiting to be written, at most. Each is one ~330-byte frame; beyond
/// this, [`Channel::wants_input`] turns false and new stream messages are refused
/// ([`ReceiveError::AcksFull`], left for the peer to resend), so a peer that sends
/// faster than the pacer lets this end acknowledge cannot grow the queue.
///
/// 16 384 (about 5 MiB of frames) is above what a well-behaved agent can have
/// unacknowledged in a burst of 1 KiB messages (16 MiB): at 1024 the queue bound, not the
/// agent's window, throttled a paced download to the pacer's rate after its first MiB
/// (1.06 MiB/s against 187 MiB/s before, for an 8 MiB download on loopback).
pub const MAX_QUEUED_ACKS: usize = 16_384;

/// How acknowledgements use the pacing budget (README, "Acknowledgement policy").
///
/// One acknowledgement is owed per received stream message, so a policy that makes acks
/// wait for pacer tokens caps a download at the pacing rate whatever the peer can send,
/// and the official plugin does not pace its acks at all. Acks mirror the peer's stream
/// messages, whose rate the agent (1 ms pause per chunk) and the gateway already bound.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AckPacing {
    /// Acks are written at once and each one is charged to the token bucket, which may
    /// go into debt down to `-pacing_burst`; stream messages wait until the debt is
    /// repaid. Frames of both kinds in any second stay within
    /// `packets_per_second + 2 × pacing_burst` unless the acks alone exceed the budget
    /// (then the peer's own rate bounds them).
    #[default]
    Charged,
    /// Acks are written at once and cost nothing: only stream messages are paced (what
    /// the official plugin does; the total is the budget plus the peer's rate).
    Exempt,
    /// Acks wait for a token like stream messages: every frame written stays within the
    /// budget, and a download is capped at about the budget in frames per second.
    Paced,
}

impl AckPacing {
    /// The knob's spelling in `SSM_PLUGIN_ACK_PACING`.
    pub fn as_str(self) -> &'static str {
        match self {
            AckPacing::Charged => "charged",
            AckPacing::Exempt => "exempt",
            AckPacing::Paced => "paced",
        }
    }

    /// Parses `charged`, `exempt` or `paced` (case-insensitive).
    pub fn parse(s: &str) -> Option<AckPacing> {
        match s.trim().to_ascii_lowercase().as_str() {
            "charged" => Some(AckPacing::Charged),
            "exempt" => Some(AckPacing::Exempt),
            "paced" => Some(AckPacing::Paced),
            _ => None,
        }
    }
}

/// Tuning knobs. The defaults suit the real service; see the README for each.
#[derive(Clone, Debug)]
pub struct ChannelConfig {
    /// Largest payload per stream message. The agent uses 1024.
    pub max_payload: usize,
    /// Most stream messages in flight (sent or queued, not yet acknowledged).
    pub window_packets: usize,
    /// Most payload bytes in flight.
    pub window_bytes: usize,
    /// Most messages accepted but not yet written (waiting for the pacer). Keeps the
    /// queue in front of an interactive byte short when a bulk transfer saturates the
    /// packet budget; data waits in the local socket buffers instead.
    pub max_queued: usize,
    /// Frames per second this end may write (acks as `ack_pacing` says); `None` for no
    /// limit.
    pub packets_per_second: Option<f64>,
    /// Token-bucket depth of the pacer, in frames (and the most debt acks may run up).
    pub pacing_burst: u32,
    /// How acknowledgements use the pacing budget.
    pub ack_pacing: AckPacing,
    /// Out-of-order messages buffered ahead of the next expected one.
    pub reorder_capacity: usize,
    /// Payload bytes the reorder buffer may hold ahead of a missing message; beyond it,
    /// out-of-order messages are left unacknowledged for the peer to resend.
    pub max_reorder_bytes: usize,
    /// Delivered payload bytes not yet taken by the session above which the driver should
    /// stop reading the transport ([`Channel::wants_input`]): receive backpressure that
    /// never drops an in-order message (the agent resends only its oldest message per
    /// 100 ms, so a dropped one stalls the stream).
    pub max_undelivered_bytes: usize,
    /// Later messages acknowledged past an unacknowledged one before it is resent without
    /// waiting for its timer (fast retransmit).
    pub fast_retransmit_threshold: i64,
    pub initial_rtt: Duration,
    pub min_rto: Duration,
    pub max_rto: Duration,
    /// A message still unacknowledged this long after its first transmission ends the
    /// channel with [`ChannelEvent::RetransmitTimeout`].
    pub give_up_after: Duration,
    /// Seed for message ids (tests use fixed seeds; the plugin seeds from the OS).
    pub seed: u64,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        ChannelConfig {
            max_payload: 1024,
            window_packets: 512,
            window_bytes: 512 * 1024,
            max_queued: 8,
            packets_per_second: Some(950.0),
            pacing_burst: 16,
            ack_pacing: AckPacing::Charged,
            reorder_capacity: 10_000,
            max_reorder_bytes: 8 * 1024 * 1024,
            max_undelivered_bytes: 1024 * 1024,
            fast_retransmit_threshold: 3,
            initial_rtt: Duration::from_millis(100),
            min_rto: Duration::from_millis(200),
            max_rto: Duration::from_secs(4),
            give_up_after: Duration::from_secs(300),
            seed: 0,
        }
    }
}

/// What the channel tells its session.
#[derive(Clone, Debug, PartialEq)]
pub enum ChannelEvent {
    /// A stream message's payload, in sequence order, each exactly once.
    Data {
        payload_type: PayloadType,
        payload: Bytes,
    },
    /// The service closed the channel.
    Closed(ChannelClosed),
    /// `pause_publication`: stream sending stopped.
    Paused,
    /// Sending resumed after a pause.
    Resumed,
    /// A message went unacknowledged for `give_up_after`.
    RetransmitTimeout { sequence_number: i64 },
}

/// Why an inbound frame was not used. The frame is dropped; the channel is unharmed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReceiveError {
    #[error("malformed frame: {0}")]
    Decode(#[from] DecodeError),
    #[error("invalid frame: {0}")]
    Invalid(#[from] ValidationError),
    #[error("acknowledge with unreadable body: {0}")]
    BadAck(String),
    #[error("stream message seq {0} is too far ahead of the reorder buffer")]
    ReorderFull(i64),
    #[error("reorder buffer full; seq {0} left for the peer to resend")]
    ReorderBytesFull(i64),
    #[error("negative sequence number {0}")]
    NegativeSequence(i64),
    #[error("{MAX_QUEUED_ACKS} acknowledgements waiting to be sent; seq {0} left for the peer to resend")]
    AcksFull(i64),
}

/// Why [`Channel::send`] refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("send window full")]
    WindowFull,
    #[error("empty payloads are never sent")]
    Empty,
    #[error("payload of {0} bytes exceeds the per-message maximum")]
    TooLarge(usize),
    #[error("the session cipher refused to encrypt the payload")]
    Encrypt,
    #[error("the message could not be encoded")]
    Encode,
    /// The session's handshake is not complete: the agent would drop the message, and
    /// with KMS requested it would go out unencrypted.
    #[error("the session is not ready (handshake not complete)")]
    NotReady,
}

/// Counters for logs, tests and benchmarks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChannelStats {
    pub data_sent: u64,
    pub retransmits: u64,
    /// Of `retransmits`, how many were triggered by later acknowledgements.
    pub fast_retransmits: u64,
    pub acks_sent: u64,
    pub data_received: u64,
    pub duplicates_received: u64,
    pub out_of_order_received: u64,
    pub acks_received: u64,
    pub dropped_frames: u64,
    pub rtt_samples: u64,
}

struct Outgoing {
    seq: i64,
    frame: Bytes,
    payload_len: usize,
    first_sent: Option<Instant>,
    transmissions: u32,
    acked: bool,
    /// Generation of the live retransmission timer; stale heap entries are skipped.
    timer_gen: u32,
}

/// RFC 6298-style estimator with PROTOCOL.md §5.4's constants.
struct RttEstimator {
    srtt: Duration,
    rttvar: Duration,
    min_rto: Duration,
    max_rto: Duration,
}

impl RttEstimator {
    fn sample(&mut self, rtt: Duration) {
        let diff = self.srtt.abs_diff(rtt);
        self.rttvar = (self.rttvar * 3 + diff) / 4;
        self.srtt = (self.srtt * 7 + rtt) / 8;
    }

    fn rto(&self) -> Duration {
        let v = (self.rttvar * 4).max(Duration::from_millis(10));
        (self.srtt + v).clamp(self.min_rto, self.max_rto)
    }
}

/// Token bucket over every frame written.
struct Pacer {
    rate: Option<f64>,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Pacer {
    fn refill(&mut self, now: Instant) {
        if let Some(rate) = self.rate {
            let dt = now.saturating_duration_since(self.last).as_secs_f64();
            self.tokens = (self.tokens + dt * rate).min(self.burst);
        }
        self.last = self.last.max(now);
    }

    fn ready(&mut self, now: Instant) -> bool {
        self.refill(now);
        // The epsilon absorbs float rounding at exactly the refill instant.
        self.rate.is_none() || self.tokens >= 1.0 - 1e-6
    }

    fn take(&mut self) {
        if self.rate.is_some() {
            self.tokens -= 1.0;
        }
    }

    /// Charges a frame sent without waiting for a token: the bucket may go into debt,
    /// down to `-burst` (older debt is forgiven so stream data never starves for long
    /// after a burst of acknowledgements).
    fn charge(&mut self, now: Instant) {
        self.refill(now);
        if self.rate.is_some() {
            self.tokens = (self.tokens - 1.0).max(-self.burst);
        }
    }

    fn next_token_at(&self) -> Option<Instant> {
        let rate = self.rate?;
        let missing = (1.0 - self.tokens).max(0.0);
        // Rounded up to the next microsecond so the token is there when the timer fires.
        let wait = Duration::from_micros((missing / rate * 1e6).ceil() as u64);
        Some(self.last + wait)
    }
}

/// One end of the data channel. See the module docs.
pub struct Channel {
    role: Role,
    config: ChannelConfig,
    rng: StdRng,
    epoch: Instant,
    epoch_unix_ms: u64,

    next_seq: i64,
    /// Unacknowledged messages in sequence order; the front has the lowest sequence number.
    unacked: VecDeque<Outgoing>,
    unacked_bytes: usize,
    /// Index in `unacked` of the first message not yet transmitted.
    next_unsent: usize,
    retransmit_queue: VecDeque<i64>,
    timers: BinaryHeap<Reverse<(Instant, i64, u32)>>,
    /// Acks waiting for the pacer, with the sequence numbers they acknowledge: a resend
    /// that arrives while its ack is still queued does not queue a second one.
    ack_queue: VecDeque<(i64, Bytes)>,
    queued_acks: HashSet<i64>,
    rtt: RttEstimator,
    pacer: Pacer,
    paused: bool,
    transport_up: bool,

    expected: i64,
    reorder: BTreeMap<i64, ClientMessage>,
    events: VecDeque<ChannelEvent>,
    /// Payload bytes in `events` (delivered, not yet polled).
    undelivered_bytes: usize,
    /// Payload bytes in `reorder`.
    reorder_bytes: usize,
    /// Highest sequence number the peer has acknowledged, and the next one the fast
    /// retransmit scan looks at.
    highest_acked: i64,
    fast_scan: i64,
    gave_up: bool,
    stats: ChannelStats,
}

impl Channel {
    /// A channel created at `now`, when the wall clock read `unix_ms` (for CreatedDate).
    pub fn new(role: Role, config: ChannelConfig, now: Instant, unix_ms: u64) -> Channel {
        let rtt = RttEstimator {
            srtt: config.initial_rtt,
            rttvar: Duration::ZERO,
            min_rto: config.min_rto,
            max_rto: config.max_rto,
        };
        let pacer = Pacer {
            rate: config.packets_per_second.filter(|r| *r > 0.0),
            burst: f64::from(config.pacing_burst.max(1)),
            tokens: f64::from(config.pacing_burst.max(1)),
            last: now,
        };
        Channel {
            role,
            rng: StdRng::seed_from_u64(config.seed),
            config,
            epoch: now,
            epoch_unix_ms: unix_ms,
            next_seq: 0,
            unacked: VecDeque::new(),
            unacked_bytes: 0,
            next_unsent: 0,
            retransmit_queue: VecDeque::new(),
            timers: BinaryHeap::new(),
            ack_queue: VecDeque::new(),
            queued_acks: HashSet::new(),
            rtt,
            pacer,
            paused: false,
            transport_up: true,
            expected: 0,
            reorder: BTreeMap::new(),
            events: VecDeque::new(),
            undelivered_bytes: 0,
            reorder_bytes: 0,
            highest_acked: -1,
            fast_scan: 0,
            gave_up: false,
            stats: ChannelStats::default(),
        }
    }

    pub fn config(&self) -> &ChannelConfig {
        &self.config
    }

    pub fn stats(&self) -> &ChannelStats {
        &self.stats
    }

    /// Current retransmission timeout.
    pub fn rto(&self) -> Duration {
        self.rtt.rto()
    }

    /// Whether the driver should read more frames from the transport: false while the
    /// session has not taken the data already delivered (see `max_undelivered_bytes`).
    /// Also false while [`MAX_QUEUED_ACKS`] acknowledgements wait for the pacer.
    pub fn wants_input(&self) -> bool {
        self.undelivered_bytes < self.config.max_undelivered_bytes
            && self.ack_queue.len() < MAX_QUEUED_ACKS
    }

    /// Events waiting for [`Channel::poll_event`].
    pub fn pending_events(&self) -> usize {
        self.events.len()
    }

    /// Delivered payload bytes the session has not taken yet.
    pub fn undelivered_bytes(&self) -> usize {
        self.undelivered_bytes
    }

    /// Whether `send` would accept another message now.
    pub fn can_send(&self) -> bool {
        self.unacked.len() < self.config.window_packets
            && self.unacked_bytes < self.config.window_bytes
            && self.unacked.len() - self.next_unsent < self.config.max_queued.max(1)
    }

    /// When a new message could go out: `None` if the pacer has a token now (or pacing is
    /// off), else the instant the next token comes. A driver that holds user data back
    /// until then keeps it out of the queue, where a later keystroke would wait behind it.
    pub fn next_send_at(&mut self, now: Instant) -> Option<Instant> {
        if self.pacer.ready(now) {
            None
        } else {
            self.pacer.next_token_at()
        }
    }

    /// Messages sent or queued and not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        self.unacked.len()
    }

    /// Everything sent has been acknowledged and no ack is waiting to go out.
    pub fn is_flushed(&self) -> bool {
        self.unacked.is_empty() && self.ack_queue.is_empty()
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Sequence number the next stream message will carry.
    pub fn next_sequence_number(&self) -> i64 {
        self.next_seq
    }

    fn created_date(&self, now: Instant) -> u64 {
        let ms = now.saturating_duration_since(self.epoch).as_millis();
        self.epoch_unix_ms
            .saturating_add(u64::try_from(ms).unwrap_or(u64::MAX))
            .max(1)
    }

    fn new_id(&mut self) -> Uuid {
        let mut b = [0u8; 16];
        self.rng.fill_bytes(&mut b);
        uuid::Builder::from_random_bytes(b).into_uuid()
    }

    /// The frame for `msg`; `None` instead of an empty frame if it cannot be encoded
    /// (every message built here has a short ASCII type and a bounded payload, so this is
    /// a guard, not a path).
    fn encode(msg: &ClientMessage) -> Option<Bytes> {
        msg.encode().ok().filter(|f| !f.is_empty()).map(Bytes::from)
    }

    /// Queues one stream message. `payload` must be 1..=`max_payload` bytes.
    pub fn send(
        &mut self,
        now: Instant,
        payload_type: PayloadType,
        payload: Bytes,
    ) -> Result<i64, SendError> {
        self.check_payload(&payload)?;
        if !self.can_send() {
            return Err(SendError::WindowFull);
        }
        self.enqueue(now, payload_type, payload)
    }

    /// Like [`Channel::send`], but past the send window and the queue limit: for a small
    /// control message that must not wait behind user data (TerminateSession when the
    /// user gives up on a stalled agent). The window is this end's own limit; the agent
    /// buffers thousands of messages, so one more costs nothing. Never for user data.
    pub fn send_control(
        &mut self,
        now: Instant,
        payload_type: PayloadType,
        payload: Bytes,
    ) -> Result<i64, SendError> {
        self.check_payload(&payload)?;
        self.enqueue(now, payload_type, payload)
    }

    fn check_payload(&self, payload: &[u8]) -> Result<(), SendError> {
        if payload.is_empty() {
            return Err(SendError::Empty);
        }
        if payload.len() > self.config.max_payload.max(1) {
            return Err(SendError::TooLarge(payload.len()));
        }
        Ok(())
    }

    /// Numbers, encodes and queues one message.
    fn enqueue(
        &mut self,
        now: Instant,
        payload_type: PayloadType,
        payload: Bytes,
    ) -> Result<i64, SendError> {
        let seq = self.next_seq;
        let payload_len = payload.len();
        let id = self.new_id();
        let msg = ClientMessage::new(
            self.role.outgoing(),
            seq,
            0,
            payload_type,
            payload,
            self.created_date(now),
            id,
        );
        let frame = Self::encode(&msg).ok_or(SendError::Encode)?;
        self.next_seq += 1;
        self.unacked.push_back(Outgoing {
            seq,
            frame,
            payload_len,
            first_sent: None,
            transmissions: 0,
            acked: false,
            timer_gen: 0,
        });
        self.unacked_bytes += payload_len;
        Ok(seq)
    }

    /// The WebSocket went away: stop transmitting (timers keep running for give-up).
    pub fn transport_lost(&mut self) {
        self.transport_up = false;
    }

    /// A new WebSocket is open: resend every transmitted, unacknowledged message (frames
    /// in flight on the old socket may be gone).
    pub fn transport_restored(&mut self, now: Instant) {
        self.transport_up = true;
        self.retransmit_queue.clear();
        for m in self.unacked.iter().take(self.next_unsent) {
            if !m.acked {
                self.retransmit_queue.push_back(m.seq);
            }
        }
        self.pacer.refill(now);
    }

    fn index_of(&self, seq: i64) -> Option<usize> {
        let front = self.unacked.front()?.seq;
        let idx = usize::try_from(seq.checked_sub(front)?).ok()?;
        (idx < self.unacked.len()).then_some(idx)
    }

    fn arm_timer(&mut self, idx: usize, now: Instant) {
        let rto = self.rtt.rto();
        let Some(m) = self.unacked.get_mut(idx) else {
            return;
        };
        let backoff = 1u32 << m.transmissions.saturating_sub(1).min(6);
        let timeout = (rto * backoff).min(self.config.max_rto);
        m.timer_gen = m.timer_gen.wrapping_add(1);
        self.timers
            .push(Reverse((now + timeout, m.seq, m.timer_gen)));
    }

    /// The next frame to write, if pacing and flow control allow one now.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Bytes> {
        if !self.transport_up {
            return None;
        }
        if !self.ack_queue.is_empty() {
            match self.config.ack_pacing {
                AckPacing::Paced if !self.pacer.ready(now) => return None,
                AckPacing::Paced => self.pacer.take(),
                AckPacing::Charged => self.pacer.charge(now),
                AckPacing::Exempt => {}
            }
            let (seq, ack) = self.ack_queue.pop_front()?;
            self.queued_acks.remove(&seq);
            self.stats.acks_sent += 1;
            return Some(ack);
        }
        if !self.pacer.ready(now) {
            return None;
        }
        if self.paused {
            return None;
        }
        while let Some(seq) = self.retransmit_queue.pop_front() {
            let Some(idx) = self.index_of(seq) else {
                continue;
            };
            if self.unacked[idx].acked {
                continue;
            }
            self.unacked[idx].transmissions += 1;
            let frame = self.unacked[idx].frame.clone();
            self.arm_timer(idx, now);
            self.pacer.take();
            self.stats.retransmits += 1;
            return Some(frame);
        }
        if self.next_unsent < self.unacked.len() {
            let idx = self.next_unsent;
            self.next_unsent += 1;
            let m = &mut self.unacked[idx];
            m.first_sent = Some(now);
            m.transmissions = 1;
            let frame = m.frame.clone();
            self.arm_timer(idx, now);
            self.pacer.take();
            self.stats.data_sent += 1;
            return Some(frame);
        }
        None
    }

    /// Whether a frame waits for a pacer token (acks that never wait do not count: the
    /// driver writes them whenever it polls, and waits for room in its writer instead).
    fn has_pending_transmit(&self) -> bool {
        self.transport_up
            && ((!self.ack_queue.is_empty() && self.config.ack_pacing == AckPacing::Paced)
                || (!self.paused
                    && (!self.retransmit_queue.is_empty()
                        || self.next_unsent < self.unacked.len())))
    }

    /// When the driver must call [`Channel::handle_timeout`] (or retry `poll_transmit`).
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        // Drop stale timer entries so the head is a live deadline.
        while let Some(Reverse((_, seq, gen))) = self.timers.peek().copied() {
            let live = self
                .index_of(seq)
                .map(|i| !self.unacked[i].acked && self.unacked[i].timer_gen == gen)
                .unwrap_or(false);
            if live {
                break;
            }
            self.timers.pop();
        }
        let timer = self.timers.peek().map(|Reverse((t, _, _))| *t);
        let pace = if self.has_pending_transmit() {
            self.pacer.next_token_at()
        } else {
            None
        };
        match (timer, pace) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Fires expired retransmission timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.pacer.refill(now);
        while let Some(Reverse((deadline, seq, gen))) = self.timers.peek().copied() {
            if deadline > now {
                break;
            }
            self.timers.pop();
            let Some(idx) = self.index_of(seq) else {
                continue;
            };
            let m = &self.unacked[idx];
            if m.acked || m.timer_gen != gen {
                continue;
            }
            if let Some(first) = m.first_sent {
                if now.saturating_duration_since(first) >= self.config.give_up_after
                    && !self.gave_up
                {
                    self.gave_up = true;
                    self.events.push_back(ChannelEvent::RetransmitTimeout {
                        sequence_number: seq,
                    });
                }
            }
            if self.transport_up && !self.paused {
                self.retransmit_queue.push_back(seq);
            } else {
                // Re-arm so the give-up check keeps running while we cannot send.
                self.arm_timer(idx, now);
            }
        }
    }

    /// Next event for the session, in order.
    pub fn poll_event(&mut self) -> Option<ChannelEvent> {
        let ev = self.events.pop_front()?;
        if let ChannelEvent::Data { payload, .. } = &ev {
            self.undelivered_bytes -= payload.len().min(self.undelivered_bytes);
        }
        Some(ev)
    }

    /// Handles one WebSocket message from the peer.
    pub fn handle_frame(&mut self, now: Instant, frame: Bytes) -> Result<(), ReceiveError> {
        let msg = match ClientMessage::decode(frame) {
            Ok(m) => m,
            Err(e) => {
                self.stats.dropped_frames += 1;
                return Err(e.into());
            }
        };
        if let Err(e) = msg.validate() {
            self.stats.dropped_frames += 1;
            return Err(e.into());
        }
        match &msg.message_type {
            MessageType::Acknowledge => self.handle_ack(now, &msg),
            MessageType::ChannelClosed => {
                let body = serde_json::from_slice(&msg.payload).unwrap_or_default();
                self.events.push_back(ChannelEvent::Closed(body));
                Ok(())
            }
            MessageType::PausePublication => {
                if !self.paused {
                    self.paused = true;
                    self.events.push_back(ChannelEvent::Paused);
                }
                Ok(())
            }
            MessageType::StartPublication => {
                self.resume();
                Ok(())
            }
            t if *t == self.role.incoming() => self.handle_stream(now, msg),
            _ => Ok(()),
        }
    }

    fn resume(&mut self) {
        if self.paused {
            self.paused = false;
            self.events.push_back(ChannelEvent::Resumed);
        }
    }

    fn handle_ack(&mut self, now: Instant, msg: &ClientMessage) -> Result<(), ReceiveError> {
        let ack: AcknowledgeContent = serde_json::from_slice(&msg.payload).map_err(|e| {
            self.stats.dropped_frames += 1;
            ReceiveError::BadAck(e.to_string())
        })?;
        self.stats.acks_received += 1;
        self.resume();
        let seq = ack.acknowledged_message_sequence_number;
        let Some(idx) = self.index_of(seq) else {
            return Ok(()); // unknown or already acknowledged
        };
        let m = &mut self.unacked[idx];
        if m.acked || m.first_sent.is_none() {
            return Ok(());
        }
        m.acked = true;
        // Karn: only messages sent once give an unambiguous sample.
        if m.transmissions == 1 {
            if let Some(first) = m.first_sent {
                self.rtt.sample(now.saturating_duration_since(first));
                self.stats.rtt_samples += 1;
            }
        }
        self.unacked_bytes -= m.payload_len.min(self.unacked_bytes);
        self.highest_acked = self.highest_acked.max(seq);
        self.fast_retransmit();
        while self.unacked.front().is_some_and(|m| m.acked) {
            self.unacked.pop_front();
            self.next_unsent = self.next_unsent.saturating_sub(1);
        }
        Ok(())
    }

    /// Resends, without waiting for their timers, messages sent once and still
    /// unacknowledged while at least `fast_retransmit_threshold` later ones were
    /// acknowledged: they were almost certainly lost. Each sequence number is looked at
    /// once.
    fn fast_retransmit(&mut self) {
        let threshold = self.config.fast_retransmit_threshold;
        if threshold <= 0 || !self.transport_up {
            return;
        }
        let Some(front) = self.unacked.front().map(|m| m.seq) else {
            return;
        };
        let upto = self.highest_acked - threshold;
        let mut seq = self.fast_scan.max(front);
        while seq <= upto {
            if let Some(idx) = self.index_of(seq) {
                let m = &self.unacked[idx];
                if !m.acked && m.transmissions == 1 {
                    self.retransmit_queue.push_back(seq);
                    self.stats.fast_retransmits += 1;
                }
            }
            seq += 1;
        }
        self.fast_scan = self.fast_scan.max(upto + 1);
    }

    fn queue_ack(&mut self, now: Instant, msg: &ClientMessage) {
        if self.ack_queue.len() >= MAX_QUEUED_ACKS || !self.queued_acks.insert(msg.sequence_number)
        {
            return;
        }
        let content = AcknowledgeContent {
            acknowledged_message_type: msg.message_type.as_str().to_owned(),
            acknowledged_message_id: msg.message_id.hyphenated().to_string(),
            acknowledged_message_sequence_number: msg.sequence_number,
            is_sequential_message: true,
        };
        let Ok(body) = serde_json::to_vec(&content) else {
            // Not acknowledged now: the peer resends and the next ack is tried again.
            self.queued_acks.remove(&msg.sequence_number);
            return;
        };
        let id = self.new_id();
        let ack = ClientMessage::new(
            MessageType::Acknowledge,
            0,
            crate::frame::FLAG_SYN | crate::frame::FLAG_FIN,
            PayloadType::Undefined,
            Bytes::from(body),
            self.created_date(now),
            id,
        );
        let Some(frame) = Self::encode(&ack) else {
            self.queued_acks.remove(&msg.sequence_number);
            return;
        };
        self.ack_queue.push_back((msg.sequence_number, frame));
    }

    fn handle_stream(&mut self, now: Instant, msg: ClientMessage) -> Result<(), ReceiveError> {
        let seq = msg.sequence_number;
        if seq < 0 {
            self.stats.dropped_frames += 1;
            return Err(ReceiveError::NegativeSequence(seq));
        }
        self.resume();
        let acks_full = self.ack_queue.len() >= MAX_QUEUED_ACKS;
        if seq < self.expected || self.reorder.contains_key(&seq) {
            // A resend of something we have: the ack was lost, so acknowledge again.
            self.stats.duplicates_received += 1;
            self.queue_ack(now, &msg);
            return Ok(());
        }
        if acks_full {
            // Taking it without an acknowledgement would make the peer resend it anyway.
            self.stats.dropped_frames += 1;
            return Err(ReceiveError::AcksFull(seq));
        }
        if seq > self.expected {
            let ahead = usize::try_from(seq - self.expected).unwrap_or(usize::MAX);
            if ahead > self.config.reorder_capacity
                || self.reorder.len() >= self.config.reorder_capacity
            {
                self.stats.dropped_frames += 1;
                return Err(ReceiveError::ReorderFull(seq));
            }
            if self.reorder_bytes + msg.payload.len() > self.config.max_reorder_bytes {
                self.stats.dropped_frames += 1;
                return Err(ReceiveError::ReorderBytesFull(seq));
            }
            self.stats.out_of_order_received += 1;
            self.queue_ack(now, &msg);
            self.reorder_bytes += msg.payload.len();
            self.reorder.insert(seq, msg);
            return Ok(());
        }
        self.queue_ack(now, &msg);
        self.deliver(msg);
        while let Some(next) = self.reorder.remove(&self.expected) {
            self.reorder_bytes -= next.payload.len().min(self.reorder_bytes);
            self.deliver(next);
        }
        Ok(())
    }

    fn deliver(&mut self, msg: ClientMessage) {
        self.expected += 1;
        self.stats.data_received += 1;
        self.undelivered_bytes += msg.payload.len();
        self.events.push_back(ChannelEvent::Data {
            payload_type: msg.payload_type,
            payload: msg.payload,
        });
    }
}
