//! The simulated SSM agent's data channel: reliability, handshake, encryption, and the
//! session plugin it drives. One task per session; it outlives WebSocket reconnects.
//!
//! Behaviour follows the real agent (PROTOCOL.md §5, §6, §7):
//!
//! - Receiving: expected sequence number `E` from 0. `seq == E`: process, then ack, E+1,
//!   then deliver buffered successors in order; a busy plugin means *no ack* (the client
//!   retransmits). `seq > E`: ack at once and buffer (≤ 100 000). `seq < E`: re-ack and
//!   drop. Frames that fail to decode or validate (digest included) are dropped unacked.
//!   HandshakeResponse / EncChallengeResponse are acked *before* the agent answers them
//!   (the real agent's receive loop only hands them to its handshake goroutine and acks;
//!   HandshakeComplete comes from that goroutine afterwards).
//! - Sending: sequence numbers from 0, SYN on seq 0; every message is kept until acked;
//!   every 100 ms the oldest unacked message is resent when its RTO expired (RFC 6298-like
//!   estimator: RTT 100 ms, RTTVAR 0, RTO = RTT + max(10 ms, 4·RTTVAR) ≤ 1 s). A new
//!   WebSocket gets the unacked messages again, oldest first, paced like new output
//!   ([`crate::config::ReconnectResend`]).
//! - Nothing is dropped while a WebSocket is attached: frames that do not fit the link
//!   queue wait in order in a backlog, and plugin output is not read meanwhile.
//! - `pause_publication` stops sending, resending and reading the plugin's output;
//!   `start_publication` or any stream message or ack from the client resumes.
//! - Handshake for Port and NonInteractiveCommands always, for the shell types only with
//!   KMS; until it completes, other client stream messages are acked and discarded.
//! - Backpressure: plugin output is read only while the unacked window (messages and
//!   bytes) has room and the WebSocket link has room.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, RngCore};
use serde::Serialize;
use serde_json::Value;
use ssm_wire::crypto::{ChallengeSecret, DataKey, SessionCipher};
use ssm_wire::frame::FLAG_SYN;
use ssm_wire::payload::{
    AcknowledgeContent, ChannelClosed, HandshakeComplete, KmsEncryptionRequest, SizeData,
    ACTION_KMS_ENCRYPTION, ACTION_SESSION_TYPE, ACTION_SUCCESS,
};
use ssm_wire::{ClientMessage, MessageType, PayloadType};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use uuid::Uuid;

use crate::config::{ReconnectResend, RetransmitPolicy};
use crate::gateway::{WsOut, LINK_CAPACITY};
use crate::kms::KmsStore;
use crate::plugins::{self, AbortOnDrop, PluginContext, PluginEvent, PluginInput};
use crate::session::SessionShared;

/// Reorder buffer capacity of the real agent.
const REORDER_CAPACITY: usize = 100_000;
/// Period of the resend scheduler.
const RESEND_TICK: Duration = Duration::from_millis(100);
/// Capacity of the plugin's input queue (in-order client payloads).
const PLUGIN_INPUT_CAPACITY: usize = 64;
/// Capacity of the plugin's output queue.
const PLUGIN_OUTPUT_CAPACITY: usize = 8;
/// Plugin output is not read while the link has this many free slots or fewer (the rest
/// is kept for acks and retransmissions) ...
const LINK_LOW_WATER: usize = 256;
/// ... and reading resumes once this many slots are free again.
const LINK_HIGH_WATER: usize = 1024;
/// Most unacked messages resent per loop iteration after a reconnect when unpaced.
const RESEND_BATCH: usize = 64;
/// How long a spawned sender may wait to hand the link the last frames of a session.
const FINAL_SEND_TIMEOUT: Duration = Duration::from_secs(5);

const _: () = assert!(LINK_LOW_WATER < LINK_HIGH_WATER && LINK_HIGH_WATER < LINK_CAPACITY);

type Link = mpsc::Sender<(WsOut, bool)>;

/// Events from the gateway and the API to a session's agent.
#[derive(Clone, Debug)]
pub(crate) enum AgentEvent {
    /// A client WebSocket was accepted; agent frames go into `link` (the network
    /// emulation's input; the flag says whether a frame may be impaired).
    Attach {
        conn: u32,
        link: mpsc::Sender<(WsOut, bool)>,
    },
    /// That WebSocket is gone.
    Detach { conn: u32 },
    /// One binary frame from the client, after the network emulation.
    Frame { conn: u32, data: Bytes },
    /// TerminateSession was called.
    Terminate,
}

struct Outgoing {
    frame: Bytes,
    payload_len: usize,
    last_sent: Instant,
}

enum Handshake {
    NotStarted,
    AwaitResponse {
        started: Instant,
        deadline: Instant,
    },
    AwaitChallenge {
        started: Instant,
        deadline: Instant,
        secret: ChallengeSecret,
    },
    Done,
    Skipped,
}

enum Processed {
    Ok,
    /// The plugin queue is full: leave the message unacked.
    NotReady,
    /// The message cannot be used (undecryptable): leave it unacked.
    Rejected,
}

struct Agent {
    /// Output messages taken from the client (for `SimConfig::stall_input_after`).
    outputs_taken: u64,
    session: Arc<SessionShared>,
    kms: Arc<KmsStore>,
    rng: StdRng,
    link: Option<(u32, Link)>,
    /// Frames for the current link that did not fit its queue yet, in order.
    backlog: VecDeque<(WsOut, bool)>,
    /// Plugin output is not read until the link has `LINK_HIGH_WATER` free slots.
    link_blocked: bool,
    /// After a reconnect: the next unacked sequence number to resend, and when.
    resend_next: Option<i64>,
    resend_at: Instant,
    frames_to_client: u64,
    malformed_kind: u32,

    next_seq: i64,
    unacked: BTreeMap<i64, Outgoing>,
    unacked_bytes: usize,
    rtt: f64,
    rttvar: f64,
    rto: Duration,
    paused: bool,

    expected: i64,
    reorder: BTreeMap<i64, ClientMessage>,

    handshake: Handshake,
    cipher: Option<SessionCipher>,
    client_version: Option<String>,

    plugin_in: Option<mpsc::Sender<PluginInput>>,
    plugin_out: Option<mpsc::Receiver<PluginEvent>>,
    plugin_task: Option<AbortOnDrop<()>>,
    drain_blocked: bool,

    started: bool,
    closing: Option<(String, Instant)>,
    finished: bool,
}

/// Starts the agent task of a session.
pub(crate) fn spawn(
    session: Arc<SessionShared>,
    kms: Arc<KmsStore>,
    events: mpsc::Receiver<AgentEvent>,
    shutdown: watch::Receiver<bool>,
) {
    let rng = session.rng(1);
    let agent = Agent {
        session,
        kms,
        rng,
        link: None,
        backlog: VecDeque::new(),
        link_blocked: false,
        resend_next: None,
        resend_at: Instant::now(),
        frames_to_client: 0,
        malformed_kind: 0,
        next_seq: 0,
        unacked: BTreeMap::new(),
        unacked_bytes: 0,
        rtt: 0.1,
        rttvar: 0.0,
        rto: Duration::from_millis(200),
        paused: false,
        outputs_taken: 0,
        expected: 0,
        reorder: BTreeMap::new(),
        handshake: Handshake::NotStarted,
        cipher: None,
        client_version: None,
        plugin_in: None,
        plugin_out: None,
        plugin_task: None,
        drain_blocked: false,
        started: false,
        closing: None,
        finished: false,
    };
    tokio::spawn(agent.run(events, shutdown));
}

async fn recv_opt(rx: &mut Option<mpsc::Receiver<PluginEvent>>) -> Option<PluginEvent> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn wait_capacity(tx: &Option<mpsc::Sender<PluginInput>>) {
    match tx {
        Some(tx) => {
            // Dropping the permit right away is fine: only the agent sends to this queue.
            let _ = tx.reserve().await;
        }
        None => std::future::pending().await,
    }
}

/// Waits until `link` has `n` free slots (never, without a link).
async fn link_room(link: &Option<(u32, Link)>, n: usize) {
    match link {
        Some((_, l)) => {
            // Only the agent sends on its link: dropping the permits at once is fine. A
            // closed link waits for the Detach that follows.
            if l.reserve_many(n.clamp(1, l.max_capacity())).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Instant) {
    tokio::time::sleep_until(at).await
}

pub(crate) fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(1)
}

/// `2023-11-14T22:13:20.000Z` for a Unix time in milliseconds.
pub(crate) fn rfc3339_millis(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60,
        ms % 1000
    )
}

#[derive(Serialize)]
struct HandshakeRequestOut<'a> {
    #[serde(rename = "AgentVersion")]
    agent_version: &'a str,
    #[serde(rename = "RequestedClientActions")]
    requested_client_actions: Vec<RequestedActionOut<'a>>,
}

#[derive(Serialize)]
struct RequestedActionOut<'a> {
    #[serde(rename = "ActionType")]
    action_type: &'a str,
    #[serde(rename = "ActionParameters")]
    action_parameters: ActionParametersOut<'a>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum ActionParametersOut<'a> {
    SessionType {
        #[serde(rename = "SessionType")]
        session_type: &'a str,
        #[serde(rename = "Properties")]
        properties: Value,
    },
    Kms(KmsEncryptionRequest),
}

#[derive(Serialize)]
struct ChallengeOut {
    #[serde(rename = "Challenge")]
    challenge: String,
}

impl Agent {
    async fn run(
        mut self,
        mut events: mpsc::Receiver<AgentEvent>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(RESEND_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !self.finished {
            if !self.link_blocked
                && self
                    .link
                    .as_ref()
                    .is_some_and(|(_, l)| l.capacity() <= LINK_LOW_WATER)
            {
                self.link_blocked = true;
            }
            let link_ready = self.backlog.is_empty() && !self.link_blocked;
            let read_plugin = self.plugin_out.is_some()
                && self.closing.is_none()
                && !self.paused
                && self.window_open()
                && link_ready
                && self.resend_next.is_none();
            let resend =
                self.resend_next.is_some() && self.link.is_some() && !self.paused && link_ready;
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(ev) => self.on_event(ev),
                    None => break,
                },
                out = recv_opt(&mut self.plugin_out), if read_plugin => self.on_plugin(out),
                _ = link_room(&self.link, 1), if !self.backlog.is_empty() => self.flush_backlog(),
                _ = link_room(&self.link, LINK_HIGH_WATER),
                    if self.backlog.is_empty() && self.link_blocked =>
                {
                    self.link_blocked = false;
                }
                _ = sleep_until(self.resend_at), if resend => self.resend_step(),
                _ = wait_capacity(&self.plugin_in), if self.drain_blocked => {
                    self.drain_blocked = false;
                    self.drain_buffer();
                }
                _ = tick.tick() => self.on_tick(),
                _ = shutdown.changed() => break,
            }
        }
        // Simulator shut down or session over: the plugin (and its processes) die here.
        self.plugin_task = None;
        if !self.session.is_closed() {
            self.session.mark_closed("");
        }
    }

    fn window_open(&self) -> bool {
        let cfg = &self.session.config;
        self.unacked.len() < cfg.max_unacked_messages.max(1)
            && self.unacked_bytes < cfg.max_unacked_bytes.max(1)
    }

    fn new_uuid(&mut self) -> Uuid {
        let mut b = [0u8; 16];
        self.rng.fill_bytes(&mut b);
        uuid::Builder::from_random_bytes(b).into_uuid()
    }

    // ---- events ---------------------------------------------------------------------

    fn on_event(&mut self, ev: AgentEvent) {
        match ev {
            AgentEvent::Attach { conn, link } => {
                // Frames queued for the old socket are moot: unacked ones are resent.
                self.backlog.clear();
                self.link_blocked = false;
                if let Some((_, old)) = self.link.replace((conn, link)) {
                    send_later(old, Vec::new(), (WsOut::Close, false));
                }
                if !self.started {
                    self.start();
                } else if self.session.config.reconnect_resend == ReconnectResend::Paced {
                    self.resend_next = self.unacked.keys().next().copied();
                    self.resend_at = Instant::now();
                }
            }
            AgentEvent::Detach { conn } => {
                if self.link.as_ref().is_some_and(|(c, _)| *c == conn) {
                    self.link = None;
                    self.backlog.clear();
                    self.link_blocked = false;
                }
            }
            AgentEvent::Frame { conn, data } => {
                if self.link.as_ref().is_some_and(|(c, _)| *c == conn) {
                    self.on_frame(data);
                }
            }
            AgentEvent::Terminate => self.finish(String::new()),
        }
    }

    fn on_plugin(&mut self, ev: Option<PluginEvent>) {
        match ev {
            Some(PluginEvent::Data(pt, data)) => {
                let len = data.len() as u64;
                self.session.update_stats(|s| s.output_payload_bytes += len);
                self.send_stream(pt, data);
            }
            Some(PluginEvent::Exit(output)) => self.begin_closing(output),
            None => {
                // The plugin ended without saying why: treat as a normal end.
                self.begin_closing(String::new());
            }
        }
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        if !self.paused {
            let expired: Vec<i64> = match self.session.config.retransmit {
                RetransmitPolicy::HeadOnly => self
                    .unacked
                    .iter()
                    .next()
                    .filter(|(_, o)| now.duration_since(o.last_sent) > self.rto)
                    .map(|(seq, _)| *seq)
                    .into_iter()
                    .collect(),
                RetransmitPolicy::AllExpired => self
                    .unacked
                    .iter()
                    .filter(|(_, o)| now.duration_since(o.last_sent) > self.rto)
                    .map(|(seq, _)| *seq)
                    .collect(),
            };
            for seq in expired {
                if let Some(o) = self.unacked.get_mut(&seq) {
                    o.last_sent = now;
                    let frame = o.frame.clone();
                    self.session.update_stats(|s| s.retransmissions += 1);
                    self.transmit(frame, true);
                }
            }
        }
        match &self.handshake {
            Handshake::AwaitResponse { deadline, .. } if now >= *deadline => {
                self.fail("Handshake timed out. Please ensure that you have the latest version of the session manager plugin.".to_owned());
            }
            Handshake::AwaitChallenge { deadline, .. } if now >= *deadline => {
                self.fail("Timed out waiting for encryption challenge.".to_owned());
            }
            _ => {}
        }
        self.check_closing();
    }

    // ---- sending --------------------------------------------------------------------

    /// Puts one frame on the current WebSocket (through the network emulation), and a
    /// corrupted one after it when `malformed_every` says so.
    fn transmit(&mut self, frame: Bytes, impairable: bool) {
        if !self.enqueue((WsOut::Frame(frame.clone()), impairable)) {
            self.session.update_stats(|s| s.agent_frames_unsent += 1);
            return;
        }
        self.frames_to_client += 1;
        if let Some(n) = self.session.config.malformed_every.filter(|n| *n > 0) {
            if self.frames_to_client.is_multiple_of(u64::from(n)) {
                let bad = self.corrupt(&frame);
                if self.enqueue((WsOut::Frame(bad), false)) {
                    self.session.update_stats(|s| s.malformed_injected += 1);
                }
            }
        }
    }

    /// Hands one item to the current link, or queues it behind the items already waiting
    /// for room. `false` only without a (live) link: the frame is lost like a frame sent to
    /// a client that is not connected.
    fn enqueue(&mut self, item: (WsOut, bool)) -> bool {
        let Some((_, link)) = &self.link else {
            return false;
        };
        if !self.backlog.is_empty() {
            self.backlog.push_back(item);
            return true;
        }
        match link.try_send(item) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(item)) => {
                self.backlog.push_back(item);
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Moves waiting frames onto the link while it has room.
    fn flush_backlog(&mut self) {
        let Some((_, link)) = &self.link else {
            self.backlog.clear();
            return;
        };
        while let Some(item) = self.backlog.pop_front() {
            match link.try_send(item) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(item)) => {
                    self.backlog.push_front(item);
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    let n = self.backlog.len() as u64 + 1;
                    self.session.update_stats(|s| s.agent_frames_unsent += n);
                    self.backlog.clear();
                    return;
                }
            }
        }
    }

    /// After a reconnect: resends the next unacked message(s), oldest first, one per
    /// `agent_chunk_delay` (a batch while the link has room when that is zero).
    fn resend_step(&mut self) {
        let delay = self.session.config.agent_chunk_delay;
        let batch = if delay.is_zero() { RESEND_BATCH } else { 1 };
        let now = Instant::now();
        for _ in 0..batch {
            let Some(from) = self.resend_next else { break };
            let Some((&seq, o)) = self.unacked.range_mut(from..).next() else {
                self.resend_next = None;
                break;
            };
            o.last_sent = now;
            let frame = o.frame.clone();
            self.resend_next = Some(seq + 1);
            self.session.update_stats(|s| s.retransmissions += 1);
            self.transmit(frame, true);
            let room = self
                .link
                .as_ref()
                .is_some_and(|(_, l)| l.capacity() > LINK_LOW_WATER);
            if !self.backlog.is_empty() || !room {
                break;
            }
        }
        if self
            .resend_next
            .is_some_and(|n| self.unacked.range(n..).next().is_none())
        {
            self.resend_next = None;
        }
        self.resend_at = now + delay;
    }

    fn corrupt(&mut self, frame: &Bytes) -> Bytes {
        self.malformed_kind = self.malformed_kind.wrapping_add(1);
        let mut f = frame.to_vec();
        match self.malformed_kind % 4 {
            // Bad digest: same header, one payload bit flipped.
            0 => {
                if f.len() > 120 {
                    let i = self.rng.gen_range(120..f.len());
                    f[i] ^= 0x40;
                } else if f.len() > 80 {
                    f[80] ^= 0xff;
                }
            }
            // Truncated inside the header.
            1 => f.truncate(self.rng.gen_range(1..116)),
            // Garbage.
            2 => {
                let n = self.rng.gen_range(1..300);
                f = (0..n).map(|_| self.rng.gen()).collect();
            }
            // HeaderLength pointing past the end of the frame.
            _ => {
                if f.len() >= 4 {
                    let lie = (f.len() as u32).saturating_add(1000);
                    f[..4].copy_from_slice(&lie.to_be_bytes());
                }
            }
        }
        Bytes::from(f)
    }

    fn send_stream(&mut self, pt: PayloadType, data: Bytes) {
        if data.is_empty() {
            return;
        }
        let payload = match (&self.cipher, pt) {
            (Some(c), PayloadType::Output | PayloadType::StdErr | PayloadType::ExitCode) => {
                match c.seal(&data) {
                    Ok(sealed) => Bytes::from(sealed),
                    Err(_) => return,
                }
            }
            _ => data,
        };
        let seq = self.next_seq;
        let flags = if seq == 0 { FLAG_SYN } else { 0 };
        let id = self.new_uuid();
        let msg = ClientMessage::new(
            MessageType::OutputStreamData,
            seq,
            flags,
            pt,
            payload,
            now_millis(),
            id,
        );
        let Ok(frame) = msg.encode() else { return };
        let frame = Bytes::from(frame);
        let payload_len = msg.payload.len();
        if !self.paused {
            self.transmit(frame.clone(), true);
        }
        self.unacked.insert(
            seq,
            Outgoing {
                frame,
                payload_len,
                last_sent: Instant::now(),
            },
        );
        self.unacked_bytes += payload_len;
        self.next_seq += 1;
        self.session.update_stats(|s| s.stream_messages_sent += 1);
    }

    fn send_json(&mut self, pt: PayloadType, value: &impl Serialize) {
        if let Ok(body) = serde_json::to_vec(value) {
            self.send_stream(pt, Bytes::from(body));
        }
    }

    fn send_ack(&mut self, msg: &ClientMessage) {
        let content = AcknowledgeContent {
            acknowledged_message_type: msg.message_type.as_str().to_owned(),
            acknowledged_message_id: msg.message_id.hyphenated().to_string(),
            acknowledged_message_sequence_number: msg.sequence_number,
            is_sequential_message: true,
        };
        let Ok(body) = serde_json::to_vec(&content) else {
            return;
        };
        let id = self.new_uuid();
        let ack = ClientMessage::new(
            MessageType::Acknowledge,
            0,
            3,
            PayloadType::Undefined,
            Bytes::from(body),
            now_millis(),
            id,
        );
        if let Ok(frame) = ack.encode() {
            self.session.update_stats(|s| s.acks_sent += 1);
            self.transmit(Bytes::from(frame), true);
        }
    }

    // ---- receiving ------------------------------------------------------------------

    fn on_frame(&mut self, data: Bytes) {
        let msg = match ClientMessage::decode(data) {
            Ok(m) => m,
            Err(_) => {
                self.session
                    .update_stats(|s| s.invalid_frames_received += 1);
                return;
            }
        };
        if msg.validate().is_err() {
            self.session
                .update_stats(|s| s.invalid_frames_received += 1);
            return;
        }
        match msg.message_type {
            MessageType::InputStreamData if msg.payload_type == PayloadType::Output => {
                if let Some(n) = self.session.config.stall_input_after {
                    if self.outputs_taken >= n {
                        self.session.update_stats(|s| s.stalled_frames_ignored += 1);
                        return;
                    }
                    if msg.sequence_number == self.expected {
                        self.outputs_taken += 1;
                    }
                }
                self.on_stream(msg)
            }
            MessageType::InputStreamData => self.on_stream(msg),
            MessageType::Acknowledge => self.on_ack(&msg),
            MessageType::StartPublication => self.paused = false,
            MessageType::PausePublication => self.paused = true,
            _ => {}
        }
    }

    fn on_ack(&mut self, msg: &ClientMessage) {
        self.paused = false;
        let Ok(ack) = serde_json::from_slice::<AcknowledgeContent>(&msg.payload) else {
            self.session
                .update_stats(|s| s.invalid_frames_received += 1);
            return;
        };
        self.session.update_stats(|s| s.acks_received += 1);
        if let Some(o) = self
            .unacked
            .remove(&ack.acknowledged_message_sequence_number)
        {
            self.unacked_bytes = self.unacked_bytes.saturating_sub(o.payload_len);
            let sample = Instant::now().duration_since(o.last_sent).as_secs_f64();
            self.rttvar = 0.75 * self.rttvar + 0.25 * (self.rtt - sample).abs();
            self.rtt = 0.875 * self.rtt + 0.125 * sample;
            let rto = self.rtt + (4.0 * self.rttvar).max(0.010);
            self.rto = Duration::from_secs_f64(rto.min(1.0));
        }
        self.check_closing();
    }

    fn on_stream(&mut self, msg: ClientMessage) {
        self.paused = false;
        let seq = msg.sequence_number;
        if seq == self.expected && !self.reorder.contains_key(&seq) {
            // The real agent processes, then acks; but "processing" a handshake answer
            // there is a hand-off to the handshake goroutine, so its ack normally goes out
            // before the HandshakeComplete / EncChallengeRequest that goroutine then sends.
            let ack_first = matches!(
                msg.payload_type,
                PayloadType::HandshakeResponse | PayloadType::EncChallengeResponse
            ) && !self.session.config.ack_handshake_after_complete;
            if ack_first {
                self.send_ack(&msg);
            }
            match self.process(&msg) {
                Processed::Ok => {}
                Processed::NotReady => {
                    self.session.update_stats(|s| s.handler_not_ready += 1);
                    return;
                }
                Processed::Rejected => return,
            }
            self.session
                .update_stats(|s| s.stream_messages_received += 1);
            if !ack_first {
                self.send_ack(&msg);
            }
            self.expected += 1;
            self.drain_buffer();
        } else if seq > self.expected {
            if self.reorder.contains_key(&seq) {
                self.session.update_stats(|s| s.duplicates_received += 1);
                self.send_ack(&msg);
            } else if self.reorder.len() < REORDER_CAPACITY {
                self.session.update_stats(|s| s.out_of_order_received += 1);
                self.send_ack(&msg);
                self.reorder.insert(seq, msg);
            }
        } else {
            self.session.update_stats(|s| s.duplicates_received += 1);
            self.send_ack(&msg);
        }
    }

    /// Delivers buffered messages that have become in-order.
    fn drain_buffer(&mut self) {
        while let Some(msg) = self.reorder.get(&self.expected).cloned() {
            match self.process(&msg) {
                Processed::NotReady => {
                    self.drain_blocked = true;
                    return;
                }
                Processed::Ok | Processed::Rejected => {}
            }
            self.reorder.remove(&self.expected);
            self.expected += 1;
            self.session
                .update_stats(|s| s.stream_messages_received += 1);
        }
    }

    fn process(&mut self, msg: &ClientMessage) -> Processed {
        let mut payload = msg.payload.clone();
        if msg.payload_type == PayloadType::Output {
            if let Some(c) = &self.cipher {
                match c.open(&payload) {
                    Ok(p) => payload = Bytes::from(p),
                    Err(_) => return Processed::Rejected,
                }
            }
        }
        match msg.payload_type {
            PayloadType::HandshakeResponse => {
                self.on_handshake_response(&payload);
                return Processed::Ok;
            }
            PayloadType::EncChallengeResponse => {
                self.on_challenge_response(&payload);
                return Processed::Ok;
            }
            _ => {}
        }
        if !matches!(self.handshake, Handshake::Done | Handshake::Skipped) {
            return Processed::Ok;
        }
        let Some(tx) = &self.plugin_in else {
            return Processed::Ok;
        };
        let pt = msg.payload_type;
        let len = payload.len() as u64;
        let record = payload.clone();
        match tx.try_send(PluginInput {
            payload_type: pt,
            data: payload,
        }) {
            Ok(()) => {
                self.session.update_stats(|s| {
                    s.input_payload_bytes += len;
                    match pt {
                        PayloadType::Flag => {
                            if let Ok(b) = <[u8; 4]>::try_from(&record[..]) {
                                s.flags_received.push(u32::from_be_bytes(b));
                            }
                        }
                        PayloadType::Size => {
                            if let Ok(sz) = serde_json::from_slice::<SizeData>(&record) {
                                s.sizes_received.push((sz.cols, sz.rows));
                            }
                        }
                        _ => {}
                    }
                });
                Processed::Ok
            }
            Err(mpsc::error::TrySendError::Full(_)) => Processed::NotReady,
            Err(mpsc::error::TrySendError::Closed(_)) => Processed::Ok,
        }
    }

    // ---- handshake ------------------------------------------------------------------

    fn kms_key(&self) -> Option<String> {
        self.session
            .config
            .kms_key_id
            .clone()
            .filter(|_| self.session.kind.kms_capable())
    }

    fn start(&mut self) {
        self.started = true;
        let kms = self.kms_key();
        if !self.session.kind.needs_handshake(kms.is_some()) {
            self.handshake = Handshake::Skipped;
            self.session.update_stats(|s| s.handshake_complete = true);
            self.start_plugin();
            return;
        }
        let mut actions = vec![RequestedActionOut {
            action_type: ACTION_SESSION_TYPE,
            action_parameters: ActionParametersOut::SessionType {
                session_type: self.session.kind.session_type(),
                properties: self.session.kind.properties(),
            },
        }];
        if let Some(key_id) = kms {
            let mut challenge = [0u8; 16];
            self.rng.fill_bytes(&mut challenge);
            actions.push(RequestedActionOut {
                action_type: ACTION_KMS_ENCRYPTION,
                action_parameters: ActionParametersOut::Kms(KmsEncryptionRequest {
                    kms_key_id: key_id,
                    challenge: Some(base64::engine::general_purpose::STANDARD.encode(challenge)),
                }),
            });
        }
        let session = self.session.clone();
        let request = HandshakeRequestOut {
            agent_version: &session.config.agent_version,
            requested_client_actions: actions,
        };
        self.send_json(PayloadType::HandshakeRequest, &request);
        let now = Instant::now();
        self.handshake = Handshake::AwaitResponse {
            started: now,
            deadline: now + self.session.config.handshake_timeout,
        };
    }

    fn on_handshake_response(&mut self, payload: &[u8]) {
        let Handshake::AwaitResponse { started, .. } = self.handshake else {
            return;
        };
        let Ok(resp) = serde_json::from_slice::<Value>(payload) else {
            self.fail("Unmarshalling of HandshakeResponse message failed".to_owned());
            return;
        };
        let client_version = resp
            .get("ClientVersion")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let raw = String::from_utf8_lossy(payload).into_owned();
        self.client_version = client_version.clone();
        self.session.update_stats(|s| {
            s.client_version = client_version;
            s.handshake_response = Some(raw);
        });
        let empty = Vec::new();
        let actions = resp
            .get("ProcessedClientActions")
            .and_then(Value::as_array)
            .unwrap_or(&empty);
        let mut kms_done = false;
        for action in actions {
            let action_type = action
                .get("ActionType")
                .and_then(Value::as_str)
                .unwrap_or("");
            let status = action
                .get("ActionStatus")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            if status != i64::from(ACTION_SUCCESS) {
                let error = action.get("Error").and_then(Value::as_str).unwrap_or("");
                self.fail(format!(
                    "{action_type} failed on client with status {status} error: {error}"
                ));
                return;
            }
            if action_type == ACTION_KMS_ENCRYPTION {
                match self.finalize_kms(action.get("ActionResult")) {
                    Ok(()) => kms_done = true,
                    Err(e) => {
                        self.fail(format!("Fetching data key failed: {e}"));
                        return;
                    }
                }
            }
        }
        if self.kms_key().is_some() && !kms_done {
            self.fail("KMSEncryption failed on client: no KMSEncryption result".to_owned());
            return;
        }
        if let Some(cipher) = &self.cipher {
            let mut plain = [0u8; 64];
            self.rng.fill_bytes(&mut plain);
            let mut nonce = [0u8; 12];
            self.rng.fill_bytes(&mut nonce);
            match cipher.make_challenge_with(&plain, &nonce) {
                Ok((challenge, secret)) => {
                    self.send_json(
                        PayloadType::EncChallengeRequest,
                        &ChallengeOut { challenge },
                    );
                    self.handshake = Handshake::AwaitChallenge {
                        started,
                        deadline: Instant::now() + self.session.config.handshake_timeout,
                        secret,
                    };
                }
                Err(e) => self.fail(format!("Encryption challenge failed: {e}")),
            }
        } else {
            self.complete_handshake(started);
        }
    }

    fn finalize_kms(&mut self, result: Option<&Value>) -> Result<(), String> {
        let key_b64 = result
            .and_then(|r| r.get("KMSCipherTextKey"))
            .and_then(Value::as_str)
            .ok_or("no KMSCipherTextKey")?;
        let blob = base64::engine::general_purpose::STANDARD
            .decode(key_b64)
            .map_err(|e| format!("KMSCipherTextKey is not base64: {e}"))?;
        let key = self
            .kms
            .decrypt(&blob)
            .ok_or("InvalidCiphertextException: the ciphertext was not issued by this KMS")?;
        let key = DataKey::from_slice(&key).map_err(|e| e.to_string())?;
        self.cipher = Some(SessionCipher::agent(&key));
        self.session.update_stats(|s| s.encrypted = true);
        Ok(())
    }

    fn on_challenge_response(&mut self, payload: &[u8]) {
        let Handshake::AwaitChallenge {
            started,
            ref secret,
            ..
        } = self.handshake
        else {
            return;
        };
        let answer = serde_json::from_slice::<Value>(payload).ok().and_then(|v| {
            v.get("Challenge")
                .and_then(Value::as_str)
                .map(str::to_owned)
        });
        let ok = match (&self.cipher, answer) {
            (Some(c), Some(a)) => c.verify_challenge(secret, &a).is_ok(),
            _ => false,
        };
        if ok {
            self.complete_handshake(started);
        } else {
            self.fail("Encryption challenge does not match!".to_owned());
        }
    }

    fn complete_handshake(&mut self, started: Instant) {
        let nanos =
            i64::try_from(Instant::now().duration_since(started).as_nanos()).unwrap_or(i64::MAX);
        let customer_message = if self.cipher.is_some() {
            "This session is encrypted using AWS KMS.".to_owned()
        } else {
            String::new()
        };
        self.send_json(
            PayloadType::HandshakeComplete,
            &HandshakeComplete {
                handshake_time_to_complete: nanos,
                customer_message,
            },
        );
        self.handshake = Handshake::Done;
        self.session.update_stats(|s| s.handshake_complete = true);
        self.start_plugin();
    }

    fn start_plugin(&mut self) {
        let (in_tx, in_rx) = mpsc::channel(PLUGIN_INPUT_CAPACITY);
        let (out_tx, out_rx) = mpsc::channel(PLUGIN_OUTPUT_CAPACITY);
        let task = plugins::spawn(PluginContext {
            session: self.session.clone(),
            client_version: self.client_version.clone(),
            input: in_rx,
            output: out_tx,
        });
        self.plugin_in = Some(in_tx);
        self.plugin_out = Some(out_rx);
        self.plugin_task = Some(AbortOnDrop(task));
        // Client messages that were buffered during the handshake go to the plugin now.
        self.drain_buffer();
    }

    // ---- ending ---------------------------------------------------------------------

    fn fail(&mut self, reason: String) {
        self.handshake = Handshake::Done;
        self.begin_closing(reason);
    }

    /// Stops the plugin and waits (bounded) for the client to ack everything sent.
    fn begin_closing(&mut self, output: String) {
        if self.closing.is_some() {
            return;
        }
        self.plugin_in = None;
        self.plugin_out = None;
        self.plugin_task = None;
        self.drain_blocked = false;
        if self.session.config.abrupt_exit {
            // The agent is gone: nothing it sent will be resent, nothing more is acked.
            self.unacked.clear();
            self.finish(output);
            return;
        }
        let deadline = Instant::now() + self.session.config.close_drain_timeout;
        self.closing = Some((output, deadline));
        self.check_closing();
    }

    fn check_closing(&mut self) {
        let due = match &self.closing {
            Some((_, deadline)) => self.unacked.is_empty() || Instant::now() >= *deadline,
            None => false,
        };
        if due {
            let output = self
                .closing
                .as_ref()
                .map(|(o, _)| o.clone())
                .unwrap_or_default();
            self.finish(output);
        }
    }

    /// Sends `channel_closed` (as the gateway does when the agent reports the session
    /// terminated) and ends the session.
    fn finish(&mut self, output: String) {
        if self.finished {
            return;
        }
        self.plugin_task = None;
        let created = now_millis();
        let id = self.new_uuid();
        let body = ChannelClosed {
            message_id: id.hyphenated().to_string(),
            created_date: rfc3339_millis(created),
            destination_id: self.session.target.clone(),
            session_id: self.session.id.clone(),
            message_type: "channel_closed".to_owned(),
            schema_version: 1,
            output: output.clone(),
        };
        if let Ok(payload) = serde_json::to_vec(&body) {
            let msg = ClientMessage::new(
                MessageType::ChannelClosed,
                0,
                3,
                PayloadType::Undefined,
                Bytes::from(payload),
                created,
                id,
            );
            if let Ok(frame) = msg.encode() {
                if let Some((_, link)) = self.link.take() {
                    let waiting: Vec<_> = self.backlog.drain(..).collect();
                    send_later(link, waiting, (WsOut::Frame(Bytes::from(frame)), false));
                }
            }
        }
        self.session.mark_closed(&output);
        self.finished = true;
    }
}

/// Puts `waiting` and then `last` on `link` without blocking the agent: at once when they
/// fit, else from a helper task (bounded by [`FINAL_SEND_TIMEOUT`]).
fn send_later(link: Link, waiting: Vec<(WsOut, bool)>, last: (WsOut, bool)) {
    if waiting.is_empty() {
        match link.try_send(last) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(last)) => send_later_task(link, Vec::new(), last),
        }
    } else {
        send_later_task(link, waiting, last);
    }
}

fn send_later_task(link: Link, waiting: Vec<(WsOut, bool)>, last: (WsOut, bool)) {
    tokio::spawn(async move {
        let _ = tokio::time::timeout(FINAL_SEND_TIMEOUT, async move {
            for item in waiting.into_iter().chain(std::iter::once(last)) {
                if link.send(item).await.is_err() {
                    return;
                }
            }
        })
        .await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_fixture_date() {
        assert_eq!(
            rfc3339_millis(1_700_000_000_000),
            "2023-11-14T22:13:20.000Z"
        );
        assert_eq!(rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
    }
}
