//! Per-session counters and records, for assertions in tests and benchmarks.
//!
//! The gateway and the agent update a [`SessionStats`] behind a mutex; callers get a
//! snapshot from [`crate::Simulator::stats`].

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use ssm_wire::payload::OpenDataChannelInput;

/// A snapshot of everything the simulator observed about one session.
#[derive(Clone, Debug, Default)]
pub struct SessionStats {
    pub session_id: String,
    pub target: String,
    pub document_name: String,
    /// `Standard_Stream`, `InteractiveCommands`, `NonInteractiveCommands` or `Port`.
    pub session_type: String,

    /// WebSocket data messages received from the client (text + binary), all sockets.
    pub client_frames: u64,
    pub client_bytes: u64,
    /// WebSocket data messages written to the client (including injected malformed ones).
    pub agent_frames: u64,
    pub agent_bytes: u64,
    /// Highest number of client data frames seen in any sliding 1-second window.
    pub max_client_frames_per_sec: u32,
    /// How often the pps cap was exceeded (each one closed a WebSocket).
    pub pps_cap_violations: u32,

    /// WebSockets accepted (token valid) and rejected (bad token, closed session, ...).
    pub ws_connections: u32,
    pub ws_rejected: u32,
    /// WebSockets the gateway dropped on purpose (`drop_websocket_after`).
    pub ws_dropped: u32,
    /// Headers of every WebSocket upgrade request, in arrival order (names lowercase).
    pub upgrade_headers: Vec<Vec<(String, String)>>,
    /// Every OpenDataChannelInput text frame received, valid token or not.
    pub open_inputs: Vec<OpenDataChannelInput>,

    /// Acks the agent sent / received.
    pub acks_sent: u64,
    pub acks_received: u64,
    /// Client stream messages the agent accepted in order (delivered or handshake).
    pub stream_messages_received: u64,
    /// Client stream messages that arrived ahead of the expected sequence number.
    pub out_of_order_received: u64,
    /// Client stream messages received again (seq already processed or buffered).
    pub duplicates_received: u64,
    /// Client frames that failed to decode or validate (dropped, not acked).
    pub invalid_frames_received: u64,
    /// Client frames ignored by a stalled agent (`SimConfig::stall_input_after`).
    pub stalled_frames_ignored: u64,
    /// In-order messages not acked because the session handler was busy (the client must
    /// retransmit them).
    pub handler_not_ready: u64,
    /// Agent stream messages sent (first transmissions) and retransmitted.
    pub stream_messages_sent: u64,
    pub retransmissions: u64,
    /// Frames removed / duplicated / held back by the network emulation (both directions).
    pub netem_lost: u64,
    pub netem_duplicated: u64,
    pub netem_reordered: u64,
    /// Corrupted frames injected by `malformed_every`.
    pub malformed_injected: u64,
    /// Agent frames discarded because no WebSocket was attached (or it had just closed).
    /// A full link queue never discards: the agent waits and stops reading its plugin.
    pub agent_frames_unsent: u64,

    /// Payload bytes delivered to the session handler / produced by it (plaintext).
    pub input_payload_bytes: u64,
    pub output_payload_bytes: u64,
    /// Flag payload values received from the client, in order.
    pub flags_received: Vec<u32>,
    /// Size payloads received from the client, in order.
    pub sizes_received: Vec<(u32, u32)>,

    /// ClientVersion from the HandshakeResponse, when there was a handshake.
    pub client_version: Option<String>,
    /// The raw HandshakeResponse JSON.
    pub handshake_response: Option<String>,
    /// Whether the handshake completed (or was skipped, for shells without KMS).
    pub handshake_complete: bool,
    /// Whether KMS encryption is active on this session.
    pub encrypted: bool,
    /// `Some("mux")`/`Some("basic")` for LocalPortForwarding sessions, `Some("stdio")` for
    /// port sessions without a type.
    pub port_mode: Option<String>,
    /// EncryptionContexts of GenerateDataKey calls naming this session.
    pub kms_encryption_contexts: Vec<BTreeMap<String, String>>,

    /// ResumeSession calls for this session and whether TerminateSession was called.
    pub resume_calls: u32,
    pub terminate_called: bool,
    /// The session has ended (channel_closed sent or due).
    pub closed: bool,
    /// The Output of the channel_closed message ("" for a normal end).
    pub close_output: Option<String>,
}

/// Sliding 1-second frame counter of the gateway.
#[derive(Debug, Default)]
pub(crate) struct RateWindow {
    arrivals: VecDeque<Instant>,
}

impl RateWindow {
    /// Records one arrival at `now` and returns the number of arrivals in `(now-1s, now]`.
    pub(crate) fn record(&mut self, now: Instant) -> u32 {
        while let Some(&front) = self.arrivals.front() {
            if now.duration_since(front) >= Duration::from_secs(1) {
                self.arrivals.pop_front();
            } else {
                break;
            }
        }
        self.arrivals.push_back(now);
        u32::try_from(self.arrivals.len()).unwrap_or(u32::MAX)
    }
}
