//! `ClientSession`'s typed handshake states (issue 14, item 5): handshake messages outside
//! the handshake are rejected (a mid-session HandshakeRequest cannot change the session
//! info or the key), sending before the session is ready is an error, and an encrypted
//! session replays byte for byte with an injected nonce source.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ssm_wire::channel::{Channel, ChannelConfig, ChannelEvent, Role, SendError};
use ssm_wire::crypto::{CounterNonces, DataKey, SessionCipher};
use ssm_wire::frame::{ClientMessage, PayloadType};
use ssm_wire::payload::{EncryptionChallenge, Flag, SizeData};
use ssm_wire::session::{ClientSession, GeneratedDataKey, SessionEvent, SessionKind};

const PORT_REQUEST: &str = r#"{"AgentVersion":"3.3.0.0","RequestedClientActions":[{"ActionType":"SessionType","ActionParameters":{"SessionType":"Port","Properties":{"portNumber":"22"}}}]}"#;
const SHELL_KMS_REQUEST: &str = r#"{"AgentVersion":"3.3.0.0","RequestedClientActions":[{"ActionType":"SessionType","ActionParameters":{"SessionType":"Standard_Stream","Properties":null}},{"ActionType":"KMSEncryption","ActionParameters":{"KMSKeyId":"arn:aws:kms:us-east-1:111122223333:key/k"}}]}"#;
const COMPLETE: &str = r#"{"HandshakeTimeToComplete":1000000,"CustomerMessage":"hello"}"#;

/// A client session and a simulated agent channel wired back to back.
struct Pair {
    now: Instant,
    client: ClientSession,
    agent: Channel,
    /// Every frame the client wrote, in order.
    client_frames: Vec<Bytes>,
    /// Payloads the agent received (type, bytes).
    agent_got: Vec<(PayloadType, Bytes)>,
    events: Vec<SessionEvent>,
}

fn unpaced() -> ChannelConfig {
    ChannelConfig {
        packets_per_second: None,
        ..ChannelConfig::default()
    }
}

impl Pair {
    fn new(nonces: Option<Arc<CounterNonces>>) -> Pair {
        let now = Instant::now();
        let channel = Channel::new(Role::Client, unpaced(), now, 1_700_000_000_000);
        let mut client = ClientSession::new(channel, "1.3.0.0".to_owned(), false);
        if let Some(n) = nonces {
            client = client.with_nonce_source(n);
        }
        Pair {
            now,
            client,
            agent: Channel::new(Role::Agent, unpaced(), now, 1_700_000_000_000),
            client_frames: Vec::new(),
            agent_got: Vec::new(),
            events: Vec::new(),
        }
    }

    /// The agent sends one payload; frames flow both ways until quiet.
    fn agent_sends(&mut self, t: PayloadType, body: &[u8]) {
        self.agent
            .send(self.now, t, Bytes::copy_from_slice(body))
            .expect("agent send");
        self.pump();
    }

    fn pump(&mut self) {
        loop {
            self.now += Duration::from_millis(1);
            let mut moved = false;
            while let Some(f) = self.agent.poll_transmit(self.now) {
                let _ = self.client.handle_frame(self.now, f);
                moved = true;
            }
            while let Some(ev) = self.client.poll_event(self.now) {
                self.events.push(ev);
            }
            while let Some(f) = self.client.channel_mut().poll_transmit(self.now) {
                self.client_frames.push(f.clone());
                let _ = self.agent.handle_frame(self.now, f);
                moved = true;
            }
            while let Some(ev) = self.agent.poll_event() {
                if let ChannelEvent::Data {
                    payload_type,
                    payload,
                } = ev
                {
                    self.agent_got.push((payload_type, payload));
                }
            }
            if !moved {
                return;
            }
        }
    }

    fn count(&self, t: PayloadType) -> usize {
        self.agent_got.iter().filter(|(pt, _)| *pt == t).count()
    }

    fn ready_events(&self) -> usize {
        self.events
            .iter()
            .filter(|e| matches!(e, SessionEvent::Ready { .. }))
            .count()
    }
}

fn all_sends_refused(p: &mut Pair) {
    let now = p.now;
    assert_eq!(
        p.client.send_output(now, b"early"),
        Err(SendError::NotReady)
    );
    assert_eq!(
        p.client.send_size(now, SizeData { cols: 80, rows: 24 }),
        Err(SendError::NotReady)
    );
    assert_eq!(
        p.client.send_flag(now, Flag::TerminateSession),
        Err(SendError::NotReady)
    );
}

#[test]
fn sending_before_ready_is_an_error() {
    let mut p = Pair::new(None);
    all_sends_refused(&mut p);
    p.agent_sends(PayloadType::HandshakeRequest, PORT_REQUEST.as_bytes());
    assert_eq!(p.count(PayloadType::HandshakeResponse), 1);
    assert!(!p.client.is_ready());
    all_sends_refused(&mut p);
    p.pump();
    assert_eq!(p.count(PayloadType::Output), 0, "nothing left before Ready");
    p.agent_sends(PayloadType::HandshakeComplete, COMPLETE.as_bytes());
    assert!(p.client.is_ready());
    let now = p.now;
    assert_eq!(p.client.send_output(now, b"after"), Ok(5));
    p.pump();
    assert_eq!(p.count(PayloadType::Output), 1);
}

#[test]
fn a_mid_session_handshake_request_changes_nothing() {
    let mut p = Pair::new(None);
    p.agent_sends(PayloadType::HandshakeRequest, PORT_REQUEST.as_bytes());
    p.agent_sends(PayloadType::HandshakeComplete, COMPLETE.as_bytes());
    assert!(p.client.is_ready());
    let info = p.client.info().cloned().expect("info");
    assert_eq!(info.kind, SessionKind::Port);
    assert!(!info.encrypted);

    // A second request, now asking for a shell with KMS: rejected and ignored.
    p.agent_sends(PayloadType::HandshakeRequest, SHELL_KMS_REQUEST.as_bytes());
    assert_eq!(p.client.rejected_handshake_messages(), 1);
    assert_eq!(p.client.info(), Some(&info), "session info unchanged");
    assert!(p.client.is_ready());
    assert_eq!(
        p.count(PayloadType::HandshakeResponse),
        1,
        "no second response"
    );
    assert!(
        !p.events
            .iter()
            .any(|e| matches!(e, SessionEvent::DataKeyRequired { .. })),
        "no KMS key requested"
    );
    // A key offered now is not taken: data still goes out in the clear.
    let now = p.now;
    p.client.provide_data_key(
        now,
        Ok(GeneratedDataKey {
            plaintext: vec![7; 64],
            ciphertext_blob: vec![1, 2, 3],
        }),
    );
    assert_eq!(p.client.rejected_handshake_messages(), 2);
    assert_eq!(p.client.send_output(now, b"plain"), Ok(5));
    p.pump();
    let out: Vec<&Bytes> = p
        .agent_got
        .iter()
        .filter(|(t, _)| *t == PayloadType::Output)
        .map(|(_, b)| b)
        .collect();
    assert_eq!(out, vec![&Bytes::from_static(b"plain")]);

    // A second HandshakeComplete: no second Ready.
    p.agent_sends(PayloadType::HandshakeComplete, COMPLETE.as_bytes());
    assert_eq!(p.ready_events(), 1);
    assert_eq!(p.client.rejected_handshake_messages(), 3);
    assert!(!p
        .events
        .iter()
        .any(|e| matches!(e, SessionEvent::Failed(_))));
}

#[test]
fn handshake_complete_before_the_response_is_rejected() {
    let mut p = Pair::new(None);
    p.agent_sends(PayloadType::HandshakeRequest, SHELL_KMS_REQUEST.as_bytes());
    // Waiting for the data key: a HandshakeComplete now must not make the session
    // ready (it would then send user data unencrypted).
    p.agent_sends(PayloadType::HandshakeComplete, COMPLETE.as_bytes());
    assert!(!p.client.is_ready());
    assert_eq!(p.client.rejected_handshake_messages(), 1);
    assert_eq!(p.client.send_output(p.now, b"x"), Err(SendError::NotReady));
}

const KEY: [u8; 64] = {
    let mut k = [0u8; 64];
    let mut i = 0;
    while i < 64 {
        k[i] = i as u8 * 3 + 1;
        i += 1;
    }
    k
};

/// An encrypted shell session: handshake with KMS and the challenge, then output both
/// ways. Returns every frame the client wrote.
fn encrypted_session(nonces: Option<Arc<CounterNonces>>) -> (Vec<Bytes>, Vec<Bytes>) {
    let mut p = Pair::new(nonces);
    let agent_cipher = SessionCipher::agent(&DataKey::new(KEY));
    p.agent_sends(PayloadType::HandshakeRequest, SHELL_KMS_REQUEST.as_bytes());
    assert!(p
        .events
        .iter()
        .any(|e| matches!(e, SessionEvent::DataKeyRequired { .. })));
    let now = p.now;
    p.client.provide_data_key(
        now,
        Ok(GeneratedDataKey {
            plaintext: KEY.to_vec(),
            ciphertext_blob: b"blob".to_vec(),
        }),
    );
    p.pump();
    let (challenge, secret) = agent_cipher
        .make_challenge_with(&[9u8; 64], &[5u8; 12])
        .unwrap();
    let body = serde_json::to_vec(&EncryptionChallenge { challenge }).unwrap();
    p.agent_sends(PayloadType::EncChallengeRequest, &body);
    let (_, answer) = p
        .agent_got
        .iter()
        .find(|(t, _)| *t == PayloadType::EncChallengeResponse)
        .expect("challenge answered")
        .clone();
    let answer: EncryptionChallenge = serde_json::from_slice(&answer).unwrap();
    agent_cipher
        .verify_challenge(&secret, &answer.challenge)
        .expect("the agent accepts the answer");
    p.agent_sends(PayloadType::HandshakeComplete, COMPLETE.as_bytes());
    assert!(p.client.is_ready());
    assert!(p.client.info().expect("info").encrypted);
    let sealed = agent_cipher.seal_with_nonce(&[1u8; 12], b"$ ").unwrap();
    p.agent_sends(PayloadType::Output, &sealed);
    assert!(p
        .events
        .contains(&SessionEvent::Output(Bytes::from_static(b"$ "))));
    for line in [&b"ls\r"[..], b"exit\r"] {
        let now = p.now;
        p.client.send_output(now, line).unwrap();
        p.pump();
    }
    let outputs: Vec<Bytes> = p
        .agent_got
        .iter()
        .filter(|(t, _)| *t == PayloadType::Output)
        .map(|(_, b)| b.clone())
        .collect();
    let plain: Vec<Vec<u8>> = outputs
        .iter()
        .map(|b| agent_cipher.open(b).expect("agent opens"))
        .collect();
    assert_eq!(plain, vec![b"ls\r".to_vec(), b"exit\r".to_vec()]);
    // Only the sealed payloads, for the comparison below.
    let payloads = p
        .client_frames
        .iter()
        .filter_map(|f| ClientMessage::decode(f.clone()).ok())
        .filter(|m| m.payload_type == PayloadType::Output)
        .map(|m| m.payload)
        .collect();
    (p.client_frames, payloads)
}

#[test]
fn an_encrypted_session_replays_byte_for_byte_with_injected_nonces() {
    let (a, a_out) = encrypted_session(Some(Arc::new(CounterNonces::new(*b"test"))));
    let (b, b_out) = encrypted_session(Some(Arc::new(CounterNonces::new(*b"test"))));
    assert_eq!(a_out.len(), 2);
    assert_eq!(a_out, b_out, "sealed output differs between runs");
    assert_eq!(a, b, "the client's frames differ between runs");
    // The counter nonces are what the payloads carry.
    assert_eq!(&a_out[0][..4], b"test");
    // Control: with the OS's nonces the sealed bytes differ.
    let (_, r1) = encrypted_session(None);
    let (_, r2) = encrypted_session(None);
    assert_ne!(r1, r2);
}
