//! KMS session encryption (PROTOCOL.md §7): the data key, the per-direction AES-256-GCM
//! ciphers, and the encryption-challenge round trip.
//!
//! When a shell session uses KMS, the client asks KMS for a 64-byte data key `P`:
//!
//! | bytes     | client uses it to       | agent uses it to |
//! | --------- | ----------------------- | ---------------- |
//! | `P[0:32]` | open agent→client data  | seal             |
//! | `P[32:64]`| seal client→agent data  | open             |
//!
//! Every encrypted payload is `nonce(12) ‖ ciphertext ‖ tag(16)`, AES-256-GCM without
//! associated data. [`SessionCipher`] hides the split: build it for a [`Role`] and it seals
//! with that role's outbound key and opens with the peer's, so the same type serves the
//! plugin and the simulated agent.
//!
//! The challenge round trip (§7.4) proves both ends hold the same key: the agent seals 64
//! random bytes with its key, the client opens them and seals them again with its own key,
//! and the agent checks the answer. See [`SessionCipher::answer_challenge`],
//! [`SessionCipher::make_challenge`] and [`SessionCipher::verify_challenge`].
//!
//! Key material is wiped on drop (the key bytes here, and the AES key schedule and GHASH key
//! inside `aes-gcm`), and no type in this module prints key bytes through `Debug`.
//! Nothing here panics on hostile input: short, truncated or forged ciphertexts and bad
//! base64 are errors.

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Key, Nonce, Tag};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use rand::RngCore;
use std::sync::Arc;

use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// Length of the KMS data key plaintext (`NumberOfBytes: 64`).
pub const DATA_KEY_LEN: usize = 64;
/// Length of one direction's AES-256 key.
pub const KEY_LEN: usize = 32;
/// AES-GCM nonce length; the nonce is the first bytes of every encrypted payload.
pub const NONCE_LEN: usize = 12;
/// AES-GCM tag length; the tag is the last bytes of every encrypted payload.
pub const TAG_LEN: usize = 16;
/// Bytes the sealing adds to a plaintext.
pub const OVERHEAD: usize = NONCE_LEN + TAG_LEN;
/// Length of the random plaintext the agent encrypts as its challenge.
pub const CHALLENGE_LEN: usize = 64;

/// AES-GCM cannot seal more than 2^36 - 32 bytes under one nonce.
const MAX_PLAINTEXT: u64 = (1 << 36) - 32;

/// Why encryption, decryption or the challenge failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("data key is {len} bytes, expected {DATA_KEY_LEN}")]
    InvalidKeyLength { len: usize },
    #[error("encrypted payload is {len} bytes, shorter than nonce and tag ({OVERHEAD} bytes)")]
    CiphertextTooShort { len: usize },
    #[error(
        "decryption failed: the payload was not sealed with this session's key or was altered"
    )]
    Authentication,
    #[error("plaintext of {len} bytes is too long for one AES-GCM message")]
    PlaintextTooLong { len: usize },
    #[error("challenge is not valid base64: {0}")]
    ChallengeBase64(String),
    #[error("encryption challenge does not match")]
    ChallengeMismatch,
}

/// Which end of the channel a [`SessionCipher`] belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The plugin: seals with `P[32:64]`, opens with `P[0:32]`.
    Client,
    /// The agent (the simulator): seals with `P[0:32]`, opens with `P[32:64]`.
    Agent,
}

/// The 64-byte KMS data key plaintext. Wiped on drop; `Debug` prints no key bytes.
#[derive(Clone)]
pub struct DataKey {
    bytes: [u8; DATA_KEY_LEN],
}

impl Drop for DataKey {
    fn drop(&mut self) {
        self.bytes.zeroize();
    }
}

impl ZeroizeOnDrop for DataKey {}

impl DataKey {
    /// Wraps a key that is already the right size.
    pub fn new(bytes: [u8; DATA_KEY_LEN]) -> DataKey {
        DataKey { bytes }
    }

    /// Copies a key from a slice (e.g. KMS `Plaintext`); anything but 64 bytes is an error.
    /// The caller should wipe its own copy.
    pub fn from_slice(bytes: &[u8]) -> Result<DataKey, CryptoError> {
        let bytes: [u8; DATA_KEY_LEN] = bytes
            .try_into()
            .map_err(|_| CryptoError::InvalidKeyLength { len: bytes.len() })?;
        Ok(DataKey { bytes })
    }

    /// `P[0:32]`: the agent seals with it, the client opens with it.
    pub fn agent_to_client(&self) -> &[u8] {
        &self.bytes[..KEY_LEN]
    }

    /// `P[32:64]`: the client seals with it, the agent opens with it.
    pub fn client_to_agent(&self) -> &[u8] {
        &self.bytes[KEY_LEN..]
    }
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(<redacted>)")
    }
}

/// The random plaintext of a challenge the agent sent, kept to check the answer. Wiped on
/// drop.
#[derive(Clone)]
pub struct ChallengeSecret {
    bytes: Vec<u8>,
}

impl Drop for ChallengeSecret {
    fn drop(&mut self) {
        self.bytes.zeroize();
    }
}

impl ZeroizeOnDrop for ChallengeSecret {}

impl ChallengeSecret {
    /// The plaintext bytes (for tests and the simulator).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

impl std::fmt::Debug for ChallengeSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChallengeSecret(<{} bytes redacted>)", self.bytes.len())
    }
}

/// Where a [`SessionCipher`] takes its nonces from. The default, [`RandomNonces`], asks
/// the OS for each one; tests inject a deterministic source ([`CounterNonces`]) so that an
/// encrypted session replays byte for byte. A source must never repeat a nonce under one
/// key.
pub trait NonceSource: Send + Sync {
    fn fill(&self, nonce: &mut [u8; NONCE_LEN]);
}

/// Nonces from the operating system's random number generator.
#[derive(Clone, Copy, Debug, Default)]
pub struct RandomNonces;

impl NonceSource for RandomNonces {
    fn fill(&self, nonce: &mut [u8; NONCE_LEN]) {
        rand::thread_rng().fill_bytes(nonce);
    }
}

/// Nonces `prefix(4) ‖ counter(8, big-endian)`, the counter starting at 0: unique for
/// 2^64 messages, and the same sequence on every run.
#[derive(Debug)]
pub struct CounterNonces {
    prefix: [u8; 4],
    next: std::sync::atomic::AtomicU64,
}

impl CounterNonces {
    pub fn new(prefix: [u8; 4]) -> CounterNonces {
        CounterNonces {
            prefix,
            next: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl NonceSource for CounterNonces {
    fn fill(&self, nonce: &mut [u8; NONCE_LEN]) {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        nonce[..4].copy_from_slice(&self.prefix);
        nonce[4..].copy_from_slice(&n.to_be_bytes());
    }
}

/// Both directions' AES-256-GCM ciphers for one end of a session.
#[derive(Clone)]
pub struct SessionCipher {
    role: Role,
    seal_key: Aes256Gcm,
    open_key: Aes256Gcm,
    nonces: Arc<dyn NonceSource>,
}

impl std::fmt::Debug for SessionCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionCipher")
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

fn cipher(key: &[u8]) -> Aes256Gcm {
    Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(key))
}

impl SessionCipher {
    /// The ciphers of `role` for `key`.
    pub fn new(key: &DataKey, role: Role) -> SessionCipher {
        let (seal, open) = match role {
            Role::Client => (key.client_to_agent(), key.agent_to_client()),
            Role::Agent => (key.agent_to_client(), key.client_to_agent()),
        };
        SessionCipher {
            role,
            seal_key: cipher(seal),
            open_key: cipher(open),
            nonces: Arc::new(RandomNonces),
        }
    }

    /// The same ciphers, sealing with nonces from `source`.
    pub fn with_nonce_source(mut self, source: Arc<dyn NonceSource>) -> SessionCipher {
        self.nonces = source;
        self
    }

    /// The plugin's ciphers.
    pub fn client(key: &DataKey) -> SessionCipher {
        SessionCipher::new(key, Role::Client)
    }

    /// The agent's ciphers.
    pub fn agent(key: &DataKey) -> SessionCipher {
        SessionCipher::new(key, Role::Agent)
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// Seals `plaintext` for the peer under a fresh random nonce:
    /// `nonce ‖ ciphertext ‖ tag`, [`OVERHEAD`] bytes longer than the input. The nonce
    /// comes from the cipher's [`NonceSource`].
    pub fn seal(&self, plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.nonces.fill(&mut nonce);
        self.seal_with_nonce(&nonce, plaintext)
    }

    /// Seals under a caller-chosen nonce. Only for known-answer tests and deterministic
    /// simulations: reusing a nonce under one key breaks AES-GCM.
    pub fn seal_with_nonce(
        &self,
        nonce: &[u8; NONCE_LEN],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        if plaintext.len() as u64 > MAX_PLAINTEXT {
            return Err(CryptoError::PlaintextTooLong {
                len: plaintext.len(),
            });
        }
        let mut out = Vec::with_capacity(OVERHEAD + plaintext.len());
        out.extend_from_slice(nonce);
        out.extend_from_slice(plaintext);
        // `out` starts with the 12 nonce bytes, so this range always exists.
        let tag = self
            .seal_key
            .encrypt_in_place_detached(Nonce::from_slice(nonce), b"", &mut out[NONCE_LEN..])
            .map_err(|_| CryptoError::PlaintextTooLong {
                len: plaintext.len(),
            })?;
        out.extend_from_slice(&tag);
        Ok(out)
    }

    /// Opens a payload the peer sealed. Errors when it is shorter than nonce and tag, or
    /// when authentication fails (wrong key, altered bytes, or a payload this end sealed).
    pub fn open(&self, wire: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let len = wire.len();
        let body_len = len
            .checked_sub(OVERHEAD)
            .ok_or(CryptoError::CiphertextTooShort { len })?;
        let (nonce, rest) = wire.split_at(NONCE_LEN);
        let (ciphertext, tag) = rest.split_at(body_len);
        let mut out = ciphertext.to_vec();
        match self.open_key.decrypt_in_place_detached(
            Nonce::from_slice(nonce),
            b"",
            &mut out,
            Tag::from_slice(tag),
        ) {
            Ok(()) => Ok(out),
            Err(_) => {
                out.zeroize();
                Err(CryptoError::Authentication)
            }
        }
    }

    /// Client side of §7.4: decodes the EncChallengeRequest `Challenge` (standard base64),
    /// opens it with the peer's key, seals the same bytes with this end's key under a random
    /// nonce, and returns the EncChallengeResponse `Challenge` (standard base64, padded).
    pub fn answer_challenge(&self, challenge_b64: &str) -> Result<String, CryptoError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.nonces.fill(&mut nonce);
        self.answer_challenge_with_nonce(challenge_b64, &nonce)
    }

    /// [`answer_challenge`](Self::answer_challenge) with a caller-chosen nonce, for
    /// known-answer tests.
    pub fn answer_challenge_with_nonce(
        &self,
        challenge_b64: &str,
        nonce: &[u8; NONCE_LEN],
    ) -> Result<String, CryptoError> {
        let sealed = decode_b64(challenge_b64)?;
        let plain = Zeroizing::new(self.open(&sealed)?);
        let answer = self.seal_with_nonce(nonce, &plain)?;
        Ok(BASE64.encode(answer))
    }

    /// Agent side of §7.4: 64 random bytes sealed with this end's key. Returns the
    /// EncChallengeRequest `Challenge` string and the secret to check the answer with.
    pub fn make_challenge(&self) -> Result<(String, ChallengeSecret), CryptoError> {
        let mut bytes = vec![0u8; CHALLENGE_LEN];
        rand::thread_rng().fill_bytes(&mut bytes);
        let secret = ChallengeSecret { bytes };
        let sealed = self.seal(&secret.bytes)?;
        Ok((BASE64.encode(sealed), secret))
    }

    /// [`make_challenge`](Self::make_challenge) with given plaintext and nonce, for
    /// known-answer tests and deterministic simulations.
    pub fn make_challenge_with(
        &self,
        plaintext: &[u8],
        nonce: &[u8; NONCE_LEN],
    ) -> Result<(String, ChallengeSecret), CryptoError> {
        let secret = ChallengeSecret {
            bytes: plaintext.to_vec(),
        };
        let sealed = self.seal_with_nonce(nonce, &secret.bytes)?;
        Ok((BASE64.encode(sealed), secret))
    }

    /// Agent side of §7.4: opens the EncChallengeResponse `Challenge` with the peer's key and
    /// compares it with the secret, in time independent of where the bytes differ.
    pub fn verify_challenge(
        &self,
        secret: &ChallengeSecret,
        response_b64: &str,
    ) -> Result<(), CryptoError> {
        let sealed = decode_b64(response_b64)?;
        let plain = Zeroizing::new(self.open(&sealed)?);
        if constant_time_eq(&plain, &secret.bytes) {
            Ok(())
        } else {
            Err(CryptoError::ChallengeMismatch)
        }
    }
}

fn decode_b64(s: &str) -> Result<Vec<u8>, CryptoError> {
    BASE64
        .decode(s)
        .map_err(|e| CryptoError::ChallengeBase64(e.to_string()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_key() -> DataKey {
        let mut b = [0u8; DATA_KEY_LEN];
        for (i, v) in b.iter_mut().enumerate() {
            *v = i as u8;
        }
        DataKey::new(b)
    }

    #[test]
    fn directions_are_mirrored() {
        let key = test_key();
        let client = SessionCipher::client(&key);
        let agent = SessionCipher::agent(&key);
        let up = client.seal(b"keys").unwrap();
        assert_eq!(up.len(), 4 + OVERHEAD);
        assert_eq!(agent.open(&up).unwrap(), b"keys");
        // A sealed payload does not open with its own direction's opener.
        assert_eq!(client.open(&up), Err(CryptoError::Authentication));
        let down = agent.seal(b"").unwrap();
        assert_eq!(client.open(&down).unwrap(), b"");
        assert_eq!(agent.open(&down), Err(CryptoError::Authentication));
    }

    #[test]
    fn bad_inputs_are_errors() {
        let c = SessionCipher::client(&test_key());
        for len in 0..OVERHEAD {
            assert_eq!(
                c.open(&vec![0u8; len]),
                Err(CryptoError::CiphertextTooShort { len })
            );
        }
        assert_eq!(c.open(&[0u8; OVERHEAD]), Err(CryptoError::Authentication));
        assert_eq!(
            DataKey::from_slice(&[0u8; 32]).unwrap_err(),
            CryptoError::InvalidKeyLength { len: 32 }
        );
        assert!(matches!(
            c.answer_challenge("not base64!"),
            Err(CryptoError::ChallengeBase64(_))
        ));
        assert_eq!(
            c.answer_challenge("AAAA"),
            Err(CryptoError::CiphertextTooShort { len: 3 })
        );
    }

    #[test]
    fn tampering_is_detected() {
        let key = test_key();
        let sealed = SessionCipher::client(&key).seal(b"secret").unwrap();
        let agent = SessionCipher::agent(&key);
        for i in 0..sealed.len() {
            let mut t = sealed.clone();
            t[i] ^= 1;
            assert_eq!(agent.open(&t), Err(CryptoError::Authentication), "byte {i}");
        }
    }

    #[test]
    fn challenge_round_trip() {
        let key = test_key();
        let client = SessionCipher::client(&key);
        let agent = SessionCipher::agent(&key);
        let (challenge, secret) = agent.make_challenge().unwrap();
        assert_eq!(secret.as_bytes().len(), CHALLENGE_LEN);
        let answer = client.answer_challenge(&challenge).unwrap();
        agent.verify_challenge(&secret, &answer).unwrap();
        // Echoing the challenge back is not an answer.
        assert_eq!(
            agent.verify_challenge(&secret, &challenge),
            Err(CryptoError::Authentication)
        );
        // A client with another key cannot answer.
        let other = SessionCipher::client(&DataKey::new([7u8; DATA_KEY_LEN]));
        assert_eq!(
            other.answer_challenge(&challenge),
            Err(CryptoError::Authentication)
        );
        // A well-formed answer for other bytes is a mismatch.
        let (_, other_secret) = agent.make_challenge().unwrap();
        assert_eq!(
            agent.verify_challenge(&other_secret, &answer),
            Err(CryptoError::ChallengeMismatch)
        );
    }

    #[test]
    fn debug_never_shows_key_bytes() {
        let key = DataKey::new([0xAB; DATA_KEY_LEN]);
        let s = format!("{key:?} {:?}", SessionCipher::client(&key));
        assert!(!s.to_lowercase().contains("ab, "), "{s}");
        assert!(!s.contains("171"), "{s}");
    }
}
