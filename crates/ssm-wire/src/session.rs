//! The client's view of a session: the handshake (PROTOCOL.md §6), KMS encryption (§7)
//! and payload routing on top of a [`Channel`].
//!
//! [`ClientSession`] answers the agent's HandshakeRequest, asks its driver for a KMS data
//! key when encryption is requested ([`SessionEvent::DataKeyRequired`], answered with
//! [`ClientSession::provide_data_key`]), runs the challenge round trip, and reports
//! [`SessionEvent::Ready`] once the agent completes the handshake — or when the first
//! Output arrives without one (a shell without KMS). Afterwards it turns received payloads
//! into typed events (decrypting them) and user data into stream messages (encrypting).
//! Nothing but handshake messages is sent before `Ready`: the agent would drop it, so
//! `send_output`, `send_size` and `send_flag` return [`SendError::NotReady`] until then.
//!
//! The states are typed (see `State`): each holds only its own data, and a handshake
//! message is handled only by the state that expects it. A HandshakeRequest after the
//! first, a HandshakeComplete or challenge out of turn, or a data key nobody asked for is
//! logged and ignored ([`ClientSession::rejected_handshake_messages`] counts them), so a
//! mid-session HandshakeRequest cannot change the session info, request a new KMS key or
//! swap the cipher. [`ClientSession::with_nonce_source`] injects the cipher's nonces for
//! deterministic replays of encrypted sessions.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use base64::Engine;
use bytes::Bytes;
use serde_json::Value;

use crate::channel::{Channel, ChannelEvent, ReceiveError, SendError};
use crate::crypto::{DataKey, NonceSource, SessionCipher, NONCE_LEN, TAG_LEN};
use crate::frame::PayloadType;
use crate::payload::{
    parse_exit_code, ChannelClosed, EncryptionChallenge, Flag, HandshakeComplete, HandshakeRequest,
    HandshakeResponse, KmsEncryptionRequest, KmsEncryptionResponse, ProcessedClientAction,
    SessionTypeRequest, SizeData, ACTION_FAILED, ACTION_KMS_ENCRYPTION, ACTION_SESSION_TYPE,
    ACTION_SUCCESS, ACTION_UNSUPPORTED,
};

/// How the client runs the session (PROTOCOL.md §6.3 rule 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionKind {
    /// `Standard_Stream`, `InteractiveCommands`, `NonInteractiveCommands`.
    Stream,
    /// `Port`.
    Port,
}

/// What the handshake established.
#[derive(Clone, Debug, PartialEq)]
pub struct SessionInfo {
    /// The document's session type as the agent named it.
    pub session_type: String,
    pub kind: SessionKind,
    /// Document properties (Port sessions); `Value::Null` otherwise.
    pub properties: Value,
    /// Empty when there was no handshake.
    pub agent_version: String,
    pub encrypted: bool,
}

impl SessionInfo {
    /// A string property (`portNumber`, `type`, `localPortNumber`, ...).
    pub fn property(&self, key: &str) -> Option<&str> {
        self.properties.get(key).and_then(Value::as_str)
    }
}

/// Events for the driver, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum SessionEvent {
    /// Encryption requested: call KMS GenerateDataKey (64 bytes, the session's context)
    /// and pass the result to [`ClientSession::provide_data_key`].
    DataKeyRequired {
        key_id: String,
        challenge: Option<String>,
    },
    /// The session can start; print `customer_message` when present.
    Ready {
        info: SessionInfo,
        customer_message: Option<String>,
    },
    Output(Bytes),
    StdErr(Bytes),
    ExitCode(i32),
    Flag(Flag),
    Closed(ChannelClosed),
    Paused,
    Resumed,
    RetransmitTimeout,
    /// The session cannot go on (handshake failure, undecryptable data).
    Failed(String),
}

/// A data key from KMS: the 64 plaintext bytes and the ciphertext blob for the agent.
/// The plaintext is wiped when this is dropped.
pub struct GeneratedDataKey {
    pub plaintext: Vec<u8>,
    pub ciphertext_blob: Vec<u8>,
}

impl Drop for GeneratedDataKey {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.plaintext);
    }
}

/// The handshake states, in the style of rustls: each holds only what it needs, and a
/// message is handled only by the state that expects it (PROTOCOL.md §6). Everything
/// else is rejected and logged: a HandshakeRequest after the first, a HandshakeComplete
/// before the handshake response, a challenge without a data key.
enum State {
    /// No handshake message yet.
    Start,
    /// HandshakeRequest taken; waiting for the driver's data key.
    AwaitingKey(AwaitingKey),
    /// HandshakeResponse sent; waiting for the challenge and HandshakeComplete.
    Negotiating(Negotiating),
    /// Handshake complete (or none: a shell streaming at once).
    Ready(Ready),
    Failed,
}

struct AwaitingKey {
    info: Option<SessionInfo>,
    /// Response entries before the KMSEncryption action.
    before_kms: Vec<ProcessedClientAction>,
    /// Response entries after it (the official order).
    after_kms: Vec<ProcessedClientAction>,
}

struct Negotiating {
    info: Option<SessionInfo>,
    cipher: Option<SessionCipher>,
}

struct Ready {
    info: SessionInfo,
    cipher: Option<SessionCipher>,
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::Start => "start",
            State::AwaitingKey(_) => "awaiting the data key",
            State::Negotiating(_) => "negotiating",
            State::Ready(_) => "ready",
            State::Failed => "failed",
        }
    }

    fn info(&self) -> Option<&SessionInfo> {
        match self {
            State::AwaitingKey(s) => s.info.as_ref(),
            State::Negotiating(s) => s.info.as_ref(),
            State::Ready(s) => Some(&s.info),
            State::Start | State::Failed => None,
        }
    }

    fn cipher(&self) -> Option<&SessionCipher> {
        match self {
            State::Negotiating(s) => s.cipher.as_ref(),
            State::Ready(s) => s.cipher.as_ref(),
            _ => None,
        }
    }
}

/// Refusal text for the 4-argument CLI form (PROTOCOL.md §7.6).
pub const LEGACY_CLI_KMS_ERROR: &str = "Installed version of CLI does not support Session Manager encryption feature. Please upgrade to the latest version of your CLI (e.g., AWS CLI).";

/// The client end of a session. See the module docs.
pub struct ClientSession {
    channel: Channel,
    client_version: String,
    legacy_cli: bool,
    state: State,
    nonces: Option<Arc<dyn NonceSource>>,
    rejected: u64,
    events: VecDeque<SessionEvent>,
}

fn action(kind: &str, status: i32, result: Value, error: String) -> ProcessedClientAction {
    ProcessedClientAction {
        action_type: kind.to_owned(),
        action_status: status,
        action_result: result,
        error,
    }
}

impl ClientSession {
    pub fn new(channel: Channel, client_version: String, legacy_cli: bool) -> ClientSession {
        ClientSession {
            channel,
            client_version,
            legacy_cli,
            state: State::Start,
            nonces: None,
            rejected: 0,
            events: VecDeque::new(),
        }
    }

    /// Seals with nonces from `source` instead of the OS's random numbers, so that an
    /// encrypted session replays byte for byte in tests. Set before the data key arrives.
    pub fn with_nonce_source(mut self, source: Arc<dyn NonceSource>) -> ClientSession {
        self.nonces = Some(source);
        self
    }

    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    pub fn channel_mut(&mut self) -> &mut Channel {
        &mut self.channel
    }

    /// What the handshake established so far (the session type is known once the
    /// HandshakeRequest is taken; `encrypted` once the data key is in place).
    pub fn info(&self) -> Option<&SessionInfo> {
        self.state.info()
    }

    pub fn is_ready(&self) -> bool {
        matches!(self.state, State::Ready(_))
    }

    /// Handshake messages rejected because they came outside the state that expects them.
    pub fn rejected_handshake_messages(&self) -> u64 {
        self.rejected
    }

    /// The next event. Channel events are pulled only as the driver asks for them, so a
    /// driver that stops polling (its user side is slow) leaves received data in the
    /// channel, whose receive limit then holds back the peer.
    pub fn poll_event(&mut self, now: Instant) -> Option<SessionEvent> {
        loop {
            if let Some(ev) = self.events.pop_front() {
                return Some(ev);
            }
            let ev = self.channel.poll_event()?;
            self.on_channel_event(now, ev);
        }
    }

    /// Whether [`ClientSession::poll_event`] has something to return.
    pub fn has_pending_events(&self) -> bool {
        !self.events.is_empty() || self.channel.pending_events() > 0
    }

    /// Feeds one WebSocket message.
    pub fn handle_frame(&mut self, now: Instant, frame: Bytes) -> Result<(), ReceiveError> {
        self.channel.handle_frame(now, frame)
    }

    /// Fires timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.channel.handle_timeout(now);
    }

    fn fail(&mut self, why: String) {
        self.state = State::Failed;
        self.events.push_back(SessionEvent::Failed(why));
    }

    fn reject(&mut self, what: &str) {
        self.rejected += 1;
        tracing::warn!(
            "ignoring {what} received while the session is {}",
            self.state.name()
        );
    }

    fn on_channel_event(&mut self, now: Instant, ev: ChannelEvent) {
        match ev {
            ChannelEvent::Data {
                payload_type,
                payload,
            } => self.on_data(now, payload_type, payload),
            ChannelEvent::Closed(c) => self.events.push_back(SessionEvent::Closed(c)),
            ChannelEvent::Paused => self.events.push_back(SessionEvent::Paused),
            ChannelEvent::Resumed => self.events.push_back(SessionEvent::Resumed),
            ChannelEvent::RetransmitTimeout { .. } => {
                self.events.push_back(SessionEvent::RetransmitTimeout)
            }
        }
    }

    fn on_data(&mut self, now: Instant, payload_type: PayloadType, payload: Bytes) {
        if matches!(self.state, State::Failed) {
            return;
        }
        match payload_type {
            PayloadType::HandshakeRequest => match self.state {
                State::Start => self.on_handshake_request(now, &payload),
                _ => self.reject("a HandshakeRequest"),
            },
            PayloadType::EncChallengeRequest => match &self.state {
                State::Negotiating(_) => self.on_challenge(now, &payload),
                _ => self.reject("an encryption challenge"),
            },
            PayloadType::HandshakeComplete => match &self.state {
                State::Negotiating(_) => self.on_complete(&payload),
                // A HandshakeComplete with no handshake at all: the session type is unknown.
                State::Start => self.fail("unable to determine SessionType".to_owned()),
                _ => self.reject("a HandshakeComplete"),
            },
            PayloadType::Output | PayloadType::StdErr | PayloadType::ExitCode => {
                if matches!(self.state, State::Start) {
                    // No handshake: a shell without KMS starts streaming at once (§6.6).
                    let info = SessionInfo {
                        session_type: "Standard_Stream".to_owned(),
                        kind: SessionKind::Stream,
                        properties: Value::Null,
                        agent_version: String::new(),
                        encrypted: false,
                    };
                    self.state = State::Ready(Ready {
                        info: info.clone(),
                        cipher: None,
                    });
                    self.events.push_back(SessionEvent::Ready {
                        info,
                        customer_message: None,
                    });
                }
                let plain = match self.state.cipher() {
                    Some(c) => match c.open(&payload) {
                        Ok(p) => Bytes::from(p),
                        Err(e) => {
                            self.fail(format!("cannot decrypt data from the agent: {e}"));
                            return;
                        }
                    },
                    None => payload,
                };
                let ev = match payload_type {
                    PayloadType::Output => SessionEvent::Output(plain),
                    PayloadType::StdErr => SessionEvent::StdErr(plain),
                    _ => match parse_exit_code(&plain) {
                        Some(code) => SessionEvent::ExitCode(code),
                        None => SessionEvent::StdErr(plain),
                    },
                };
                self.events.push_back(ev);
            }
            PayloadType::Flag => {
                if let Some(f) = Flag::decode(&payload) {
                    self.events.push_back(SessionEvent::Flag(f));
                }
            }
            _ => {}
        }
    }

    fn on_handshake_request(&mut self, now: Instant, payload: &[u8]) {
        let req: HandshakeRequest = match serde_json::from_slice(payload) {
            Ok(r) => r,
            Err(e) => return self.fail(format!("unreadable handshake request: {e}")),
        };
        let mut processed = Vec::new();
        let mut after = Vec::new();
        let mut info: Option<SessionInfo> = None;
        let mut kms: Option<KmsEncryptionRequest> = None;
        let mut after_kms = false;
        for a in &req.requested_client_actions {
            let entry = match a.action_type.as_str() {
                ACTION_SESSION_TYPE => {
                    match serde_json::from_value::<SessionTypeRequest>(a.action_parameters.clone())
                    {
                        Ok(st) => {
                            let kind = match st.session_type.as_str() {
                                "Standard_Stream"
                                | "InteractiveCommands"
                                | "NonInteractiveCommands" => Some(SessionKind::Stream),
                                "Port" => Some(SessionKind::Port),
                                _ => None,
                            };
                            match kind {
                                Some(kind) => {
                                    info = Some(SessionInfo {
                                        session_type: st.session_type,
                                        kind,
                                        properties: st.properties,
                                        agent_version: req.agent_version.clone(),
                                        encrypted: false,
                                    });
                                    action(ACTION_SESSION_TYPE, ACTION_SUCCESS, Value::Null, String::new())
                                }
                                None => action(
                                    ACTION_SESSION_TYPE,
                                    ACTION_FAILED,
                                    Value::Null,
                                    format!(
                                        "Failed to process action SessionType: Unknown session type {}",
                                        st.session_type
                                    ),
                                ),
                            }
                        }
                        Err(e) => action(
                            ACTION_SESSION_TYPE,
                            ACTION_FAILED,
                            Value::Null,
                            format!("Failed to process action SessionType: {e}"),
                        ),
                    }
                }
                ACTION_KMS_ENCRYPTION => {
                    let parsed =
                        serde_json::from_value::<KmsEncryptionRequest>(a.action_parameters.clone());
                    match parsed {
                        Ok(_) if self.legacy_cli => action(
                            ACTION_KMS_ENCRYPTION,
                            ACTION_FAILED,
                            Value::Null,
                            format!(
                                "Failed to process action KMSEncryption: {LEGACY_CLI_KMS_ERROR}"
                            ),
                        ),
                        Ok(k) if kms.is_none() => {
                            kms = Some(k);
                            after_kms = true;
                            continue;
                        }
                        Ok(_) => action(
                            ACTION_KMS_ENCRYPTION,
                            ACTION_FAILED,
                            Value::Null,
                            "Failed to process action KMSEncryption: requested twice".to_owned(),
                        ),
                        Err(e) => action(
                            ACTION_KMS_ENCRYPTION,
                            ACTION_FAILED,
                            Value::Null,
                            format!("Failed to process action KMSEncryption: {e}"),
                        ),
                    }
                }
                other => action(
                    other,
                    ACTION_UNSUPPORTED,
                    Value::Null,
                    format!("Unsupported action {other}"),
                ),
            };
            if after_kms {
                after.push(entry);
            } else {
                processed.push(entry);
            }
        }
        if let Some(info) = &mut info {
            info.agent_version = req.agent_version.clone();
        }
        match kms {
            Some(k) => {
                self.state = State::AwaitingKey(AwaitingKey {
                    info,
                    before_kms: processed,
                    after_kms: after,
                });
                self.events.push_back(SessionEvent::DataKeyRequired {
                    key_id: k.kms_key_id,
                    challenge: k.challenge,
                });
            }
            None => {
                processed.extend(after);
                self.send_response(now, info, None, processed);
            }
        }
    }

    /// The driver's answer to [`SessionEvent::DataKeyRequired`]. Ignored in any other
    /// state than waiting for it.
    pub fn provide_data_key(&mut self, now: Instant, key: Result<GeneratedDataKey, String>) {
        if !matches!(self.state, State::AwaitingKey(_)) {
            return self.reject("a data key");
        }
        let State::AwaitingKey(waiting) = std::mem::replace(&mut self.state, State::Failed) else {
            return;
        };
        let AwaitingKey {
            mut info,
            mut before_kms,
            after_kms,
        } = waiting;
        let mut cipher = None;
        let entry = match key.and_then(|mut k| {
            DataKey::from_slice(&k.plaintext)
                .map(|dk| (dk, std::mem::take(&mut k.ciphertext_blob)))
                .map_err(|e| e.to_string())
        }) {
            Ok((dk, blob)) => {
                let mut c = SessionCipher::client(&dk);
                if let Some(n) = &self.nonces {
                    c = c.with_nonce_source(n.clone());
                }
                cipher = Some(c);
                if let Some(info) = &mut info {
                    info.encrypted = true;
                }
                let result = KmsEncryptionResponse {
                    kms_cipher_text_key: base64::engine::general_purpose::STANDARD.encode(blob),
                    kms_cipher_text_hash: None,
                };
                match serde_json::to_value(result) {
                    Ok(v) => action(ACTION_KMS_ENCRYPTION, ACTION_SUCCESS, v, String::new()),
                    Err(e) => action(
                        ACTION_KMS_ENCRYPTION,
                        ACTION_FAILED,
                        Value::Null,
                        format!("Failed to process action KMSEncryption: {e}"),
                    ),
                }
            }
            Err(e) => action(
                ACTION_KMS_ENCRYPTION,
                ACTION_FAILED,
                Value::Null,
                format!("Failed to process action KMSEncryption: {e}"),
            ),
        };
        before_kms.push(entry);
        before_kms.extend(after_kms);
        self.send_response(now, info, cipher, before_kms);
    }

    fn send_response(
        &mut self,
        now: Instant,
        info: Option<SessionInfo>,
        cipher: Option<SessionCipher>,
        actions: Vec<ProcessedClientAction>,
    ) {
        let errors: Vec<String> = actions
            .iter()
            .filter(|a| !a.error.is_empty())
            .map(|a| a.error.clone())
            .collect();
        let failed = actions.iter().any(|a| a.action_status != ACTION_SUCCESS);
        let resp = HandshakeResponse {
            client_version: self.client_version.clone(),
            processed_client_actions: actions,
            errors: (!errors.is_empty()).then_some(errors.clone()),
        };
        let body = match serde_json::to_vec(&resp) {
            Ok(b) => b,
            Err(e) => return self.fail(format!("cannot encode the handshake response: {e}")),
        };
        self.state = State::Negotiating(Negotiating { info, cipher });
        if let Err(e) = self
            .channel
            .send(now, PayloadType::HandshakeResponse, Bytes::from(body))
        {
            return self.fail(format!("cannot send the handshake response: {e}"));
        }
        if failed {
            // The agent cancels the session when any action failed; say why locally too.
            self.fail(errors.join("; "));
        }
    }

    fn on_challenge(&mut self, now: Instant, payload: &[u8]) {
        let Some(cipher) = self.state.cipher() else {
            return self.fail("encryption challenge without a data key".to_owned());
        };
        let req: EncryptionChallenge = match serde_json::from_slice(payload) {
            Ok(r) => r,
            Err(e) => return self.fail(format!("unreadable encryption challenge: {e}")),
        };
        let answer = match cipher.answer_challenge(&req.challenge) {
            Ok(a) => a,
            Err(e) => return self.fail(format!("cannot answer the encryption challenge: {e}")),
        };
        let body = match serde_json::to_vec(&EncryptionChallenge { challenge: answer }) {
            Ok(b) => b,
            Err(e) => return self.fail(format!("cannot encode the challenge response: {e}")),
        };
        if let Err(e) = self
            .channel
            .send(now, PayloadType::EncChallengeResponse, Bytes::from(body))
        {
            self.fail(format!("cannot send the challenge response: {e}"));
        }
    }

    fn on_complete(&mut self, payload: &[u8]) {
        let done: HandshakeComplete =
            serde_json::from_slice(payload).unwrap_or(HandshakeComplete {
                handshake_time_to_complete: 0,
                customer_message: String::new(),
            });
        let State::Negotiating(n) = std::mem::replace(&mut self.state, State::Failed) else {
            return self.fail("HandshakeComplete outside the handshake".to_owned());
        };
        let Some(info) = n.info else {
            return self.fail("unable to determine SessionType".to_owned());
        };
        self.state = State::Ready(Ready {
            info: info.clone(),
            cipher: n.cipher,
        });
        self.events.push_back(SessionEvent::Ready {
            info,
            customer_message: (!done.customer_message.is_empty()).then_some(done.customer_message),
        });
    }

    /// Largest plaintext chunk one Output message carries.
    pub fn max_data_chunk(&self) -> usize {
        let max = self.channel.config().max_payload;
        if self.state.cipher().is_some() {
            max.saturating_sub(NONCE_LEN + TAG_LEN).max(1)
        } else {
            max
        }
    }

    /// [`SendError::NotReady`] unless the handshake is complete: the agent would drop
    /// anything else, and with KMS requested it would arrive unencrypted.
    fn check_ready(&self) -> Result<(), SendError> {
        if self.is_ready() {
            Ok(())
        } else {
            Err(SendError::NotReady)
        }
    }

    /// Sends up to one chunk of user data as Output; returns how many bytes were taken.
    pub fn send_output(&mut self, now: Instant, data: &[u8]) -> Result<usize, SendError> {
        self.check_ready()?;
        if data.is_empty() {
            return Err(SendError::Empty);
        }
        let n = data.len().min(self.max_data_chunk());
        let chunk = &data[..n];
        let payload = match self.state.cipher() {
            Some(c) => Bytes::from(c.seal(chunk).map_err(|_| SendError::Encrypt)?),
            None => Bytes::copy_from_slice(chunk),
        };
        self.channel.send(now, PayloadType::Output, payload)?;
        Ok(n)
    }

    /// Sends the terminal size.
    pub fn send_size(&mut self, now: Instant, size: SizeData) -> Result<i64, SendError> {
        self.check_ready()?;
        let body = serde_json::to_vec(&size).map_err(|_| SendError::Empty)?;
        self.channel.send(now, PayloadType::Size, Bytes::from(body))
    }

    /// Sends a Flag message (DisconnectToPort, TerminateSession), past the send window
    /// ([`crate::channel::Channel::send_control`]): callers order it after data themselves.
    pub fn send_flag(&mut self, now: Instant, flag: Flag) -> Result<i64, SendError> {
        self.check_ready()?;
        self.channel.send_control(
            now,
            PayloadType::Flag,
            Bytes::copy_from_slice(&flag.encode()),
        )
    }
}
