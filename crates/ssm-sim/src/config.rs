//! Simulator configuration: every knob of the simulated gateway, agent and network.
//!
//! One [`SimConfig`] is given to [`crate::Simulator::start`]; it applies to every session
//! created through the HTTP API. In-process callers can override the per-session knobs
//! for a single session with [`crate::Simulator::start_session_with`].

use std::net::SocketAddr;
use std::time::Duration;

/// Default agent version announced in the HandshakeRequest (a mainline 3.3 agent).
pub const DEFAULT_AGENT_VERSION: &str = "3.3.987.0";

/// All simulator knobs. `Default` gives a perfect, zero-latency network, a current agent,
/// plain HTTP/WebSocket and `/bin/sh` as the shell.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Serve HTTPS/WSS with a freshly generated self-signed CA (see
    /// [`crate::Simulator::ca_pem_path`]) instead of plain HTTP/WS.
    pub tls: bool,
    /// Address to listen on. Default `127.0.0.1:0` (an ephemeral port).
    pub listen: SocketAddr,
    /// One-way delay added to every frame in both directions. Frames stay pipelined: a
    /// delay queue releases each frame `latency` after it entered, independent of others.
    pub latency: Duration,
    /// Gateway packet cap: client→gateway frames (acks included) allowed in any sliding
    /// 1-second window. Exceeding it records a violation and closes the WebSocket, as the
    /// real gateway tears down a socket that floods it. The session survives (resume).
    pub pps_cap: Option<u32>,
    /// Probability that a stream frame or ack is lost (each direction, independently).
    pub loss: f64,
    /// Probability that a stream frame or ack is delivered twice.
    pub duplicate: f64,
    /// Probability that a stream frame or ack is held back so that later frames overtake it.
    pub reorder: f64,
    /// Send two quirky `start_publication` frames (fixture 22's shape: PayloadLength =
    /// frame length little-endian, zero digest, empty payload) on every new WebSocket,
    /// before anything else.
    pub start_publication_quirk: bool,
    /// Abruptly close the WebSocket (no close frame) after some client frames or some time.
    pub drop_websocket_after: Option<DropWebSocket>,
    /// Inject one corrupted frame (bad digest, truncated, garbage, lying HeaderLength; in
    /// rotation) after every N-th agent frame. The real frames are still delivered.
    pub malformed_every: Option<u32>,
    /// AgentVersion sent in the HandshakeRequest. "2.3.0.0" or "3.0.100.0" make port
    /// sessions use basic mode (the agent itself then also stays in basic mode).
    pub agent_version: String,
    /// Pause after each chunk the agent reads from a pty, pipe or target socket.
    /// `Duration::from_millis(1)` mimics the real agent's 1 ms sleep per read.
    pub agent_chunk_delay: Duration,
    /// When set, shell-type sessions (Standard_Stream, InteractiveCommands) perform the KMS
    /// handshake with this key id and encrypt Output/StdErr/ExitCode. Never for Port.
    pub kms_key_id: Option<String>,
    /// Command run in a pty for Standard_Stream sessions.
    pub shell: Vec<String>,
    /// Seed of every random decision (impairments, tokens, message ids). Each session
    /// derives its own generator from this seed and its creation index. Session ids also
    /// mix in a per-simulator random value, so they differ across instances and processes.
    pub seed: u64,
    /// Agent send window in messages (the real agent's buffer holds 100 000).
    pub max_unacked_messages: usize,
    /// Agent send window in payload bytes. Reading from the pty/pipe/target stops while
    /// either bound is reached. The real agent has no byte bound (its buffer is counted
    /// in messages of at most 1 KiB), so the default is 100 000 KiB: a download longer
    /// than that is bound by the message count, as with the real agent. (The default used to be 8
    /// MiB, which let an 8 MiB download finish before its acks mattered.)
    pub max_unacked_bytes: usize,
    /// ResumeSession answers with a StreamUrl whose `cell-number` differs from the
    /// previous one, to exercise clients that switch to the returned URL.
    pub resume_changes_cell: bool,
    /// How long the agent waits for HandshakeResponse / EncChallengeResponse (15 s real).
    pub handshake_timeout: Duration,
    /// When the session ends, how long the agent waits for its unacked messages to be
    /// acknowledged before the gateway sends `channel_closed` (the real agent waits 2 s;
    /// the default here is 10 s so lossy, slow test networks do not lose the tail).
    pub close_drain_timeout: Duration,
    /// Which unacked messages the agent retransmits on its 100 ms tick.
    pub retransmit: RetransmitPolicy,
    /// What the agent does with its unacked messages when the client opens a new
    /// WebSocket (reconnect after ResumeSession).
    pub reconnect_resend: ReconnectResend,
    /// Ack a HandshakeResponse / EncChallengeResponse only *after* sending the next
    /// handshake message (HandshakeComplete or EncChallengeRequest). `false` (default) acks
    /// first, which is what the real agent almost always does: its receive loop acks right
    /// after handing the response to the handshake goroutine. `true` reproduces the other
    /// side of that race (and this simulator's order before 1.3.1).
    pub ack_handshake_after_complete: bool,
    /// After this many Output messages from the client, the agent ignores every further
    /// one (no ack, no delivery), as an agent that hung would: for tests of what the
    /// plugin can still do when its send window stays full.
    pub stall_input_after: Option<u64>,
    /// End sessions the way the real agent ends a command session: once the plugin has
    /// exited (ExitCode sent), the agent's own WebSocket to the gateway dies (1006), so it
    /// acknowledges and resends nothing more, and the gateway sends `channel_closed` at
    /// once instead of after the drain. The client's WebSocket stays open, as with the
    /// real gateway, until the client closes it.
    pub abrupt_exit: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            tls: false,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            latency: Duration::ZERO,
            pps_cap: None,
            loss: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            start_publication_quirk: false,
            drop_websocket_after: None,
            malformed_every: None,
            agent_version: DEFAULT_AGENT_VERSION.to_owned(),
            agent_chunk_delay: Duration::ZERO,
            kms_key_id: None,
            shell: vec!["/bin/sh".to_owned()],
            seed: 0x005e_ed0f_556d,
            max_unacked_messages: 100_000,
            max_unacked_bytes: 100_000 << 10,
            resume_changes_cell: false,
            handshake_timeout: Duration::from_secs(15),
            close_drain_timeout: Duration::from_secs(10),
            retransmit: RetransmitPolicy::HeadOnly,
            reconnect_resend: ReconnectResend::Paced,
            ack_handshake_after_complete: false,
            stall_input_after: None,
            abrupt_exit: false,
        }
    }
}

impl SimConfig {
    /// Whether any frame impairment (latency aside) is configured.
    pub(crate) fn impaired(&self) -> bool {
        self.loss > 0.0 || self.duplicate > 0.0 || self.reorder > 0.0
    }
}

/// When the gateway drops the WebSocket under the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropWebSocket {
    pub trigger: DropTrigger,
    /// `false`: only the session's first WebSocket is dropped. `true`: every WebSocket of
    /// the session is dropped when its own trigger fires.
    pub repeat: bool,
}

impl DropWebSocket {
    /// Drop the first WebSocket after `n` client frames (stream data and acks).
    pub fn after_frames(n: u64) -> Self {
        DropWebSocket {
            trigger: DropTrigger::ClientFrames(n),
            repeat: false,
        }
    }

    /// Drop the first WebSocket `d` after it was accepted.
    pub fn after(d: Duration) -> Self {
        DropWebSocket {
            trigger: DropTrigger::Elapsed(d),
            repeat: false,
        }
    }

    /// Apply the trigger to every WebSocket of the session, not just the first.
    pub fn repeatedly(mut self) -> Self {
        self.repeat = true;
        self
    }
}

/// What fires a [`DropWebSocket`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropTrigger {
    /// After this many binary client frames on that WebSocket.
    ClientFrames(u64),
    /// After this long since that WebSocket was accepted.
    Elapsed(Duration),
}

/// Retransmission strategy of the simulated agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetransmitPolicy {
    /// Like the real agent: every 100 ms, resend only the oldest unacked message if its
    /// RTO has expired.
    HeadOnly,
    /// Every 100 ms, resend every unacked message whose RTO has expired.
    AllExpired,
}

/// How the simulated agent treats its unacked messages when the client reconnects.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReconnectResend {
    /// Resend every unacked message once, oldest first, at the agent's normal pace: one
    /// per `agent_chunk_delay` (when non-zero) and only as fast as the new WebSocket takes
    /// them (backpressure, nothing is dropped). Reading new output waits until this is done.
    #[default]
    Paced,
    /// Resend nothing extra: the 100 ms head-only scheduler carries on, which is all the
    /// real agent does (it never learns that the client reconnected; its own socket to
    /// the gateway stays up). Recovery of a large unacked backlog is then slow (about one
    /// message per tick).
    HeadOnly,
}
