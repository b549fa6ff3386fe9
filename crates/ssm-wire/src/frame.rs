//! The data-channel `ClientMessage`: one binary WebSocket message.
//!
//! Layout (every integer big-endian, PROTOCOL.md §3):
//!
//! ```text
//!   0  HeaderLength    u32   116: the offset of PayloadLength
//!   4  MessageType     [32]  ASCII, right-padded with spaces
//!  36  SchemaVersion   u32
//!  40  CreatedDate     u64   Unix epoch milliseconds
//!  48  SequenceNumber  i64
//!  56  Flags           u64
//!  64  MessageId       [16]  UUID with its two 8-byte halves swapped
//!  80  PayloadDigest   [32]  SHA-256 of the payload as carried
//! 112  PayloadType     u32
//! 116  PayloadLength   u32
//! 120  Payload         ...   starts at HeaderLength + 4
//! ```
//!
//! Decoding only checks that the frame is well formed (every field present, the payload
//! offset inside the frame); whether a frame may be *used* is [`ClientMessage::validate`]'s
//! call, because the service sends `start_publication` / `pause_publication` frames whose
//! PayloadLength and digest are known to be wrong.

use bytes::{BufMut, Bytes};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Value of the HeaderLength field in every frame the official peers write.
pub const HEADER_LENGTH: u32 = 116;
/// Offset of the first payload byte in a frame with the standard header.
pub const PAYLOAD_OFFSET: usize = HEADER_LENGTH as usize + 4;
/// Width of the space-padded MessageType field.
pub const MESSAGE_TYPE_LEN: usize = 32;
/// Schema version written by both official peers.
pub const SCHEMA_VERSION: u32 = 1;
/// Header flag bits (PROTOCOL.md §4.3). Acknowledgements carry both.
pub const FLAG_SYN: u64 = 1;
pub const FLAG_FIN: u64 = 2;

/// The `MessageType` header field.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum MessageType {
    /// Client to agent stream data.
    InputStreamData,
    /// Agent to client stream data.
    OutputStreamData,
    Acknowledge,
    ChannelClosed,
    StartPublication,
    PausePublication,
    /// Any other name (agent- or gateway-internal types the client ignores).
    Other(String),
}

impl MessageType {
    pub fn as_str(&self) -> &str {
        match self {
            MessageType::InputStreamData => "input_stream_data",
            MessageType::OutputStreamData => "output_stream_data",
            MessageType::Acknowledge => "acknowledge",
            MessageType::ChannelClosed => "channel_closed",
            MessageType::StartPublication => "start_publication",
            MessageType::PausePublication => "pause_publication",
            MessageType::Other(s) => s,
        }
    }

    pub fn parse(s: &str) -> MessageType {
        match s {
            "input_stream_data" => MessageType::InputStreamData,
            "output_stream_data" => MessageType::OutputStreamData,
            "acknowledge" => MessageType::Acknowledge,
            "channel_closed" => MessageType::ChannelClosed,
            "start_publication" => MessageType::StartPublication,
            "pause_publication" => MessageType::PausePublication,
            other => MessageType::Other(other.to_owned()),
        }
    }

    /// Stream data in either direction: the types that carry sequence numbers.
    pub fn is_stream_data(&self) -> bool {
        matches!(
            self,
            MessageType::InputStreamData | MessageType::OutputStreamData
        )
    }
}

impl std::fmt::Display for MessageType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `PayloadType` header field (PROTOCOL.md §4.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PayloadType {
    /// 0: acknowledgements and service messages.
    Undefined,
    Output,
    Error,
    Size,
    Parameter,
    HandshakeRequest,
    HandshakeResponse,
    HandshakeComplete,
    EncChallengeRequest,
    EncChallengeResponse,
    Flag,
    StdErr,
    ExitCode,
    Unknown(u32),
}

impl PayloadType {
    pub fn from_u32(v: u32) -> PayloadType {
        match v {
            0 => PayloadType::Undefined,
            1 => PayloadType::Output,
            2 => PayloadType::Error,
            3 => PayloadType::Size,
            4 => PayloadType::Parameter,
            5 => PayloadType::HandshakeRequest,
            6 => PayloadType::HandshakeResponse,
            7 => PayloadType::HandshakeComplete,
            8 => PayloadType::EncChallengeRequest,
            9 => PayloadType::EncChallengeResponse,
            10 => PayloadType::Flag,
            11 => PayloadType::StdErr,
            12 => PayloadType::ExitCode,
            other => PayloadType::Unknown(other),
        }
    }

    pub fn to_u32(self) -> u32 {
        match self {
            PayloadType::Undefined => 0,
            PayloadType::Output => 1,
            PayloadType::Error => 2,
            PayloadType::Size => 3,
            PayloadType::Parameter => 4,
            PayloadType::HandshakeRequest => 5,
            PayloadType::HandshakeResponse => 6,
            PayloadType::HandshakeComplete => 7,
            PayloadType::EncChallengeRequest => 8,
            PayloadType::EncChallengeResponse => 9,
            PayloadType::Flag => 10,
            PayloadType::StdErr => 11,
            PayloadType::ExitCode => 12,
            PayloadType::Unknown(v) => v,
        }
    }
}

/// Why a byte string is not a frame at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame is {len} bytes, shorter than the {PAYLOAD_OFFSET}-byte header")]
    TooShort { len: usize },
    #[error("HeaderLength {header_length} is invalid for a {len}-byte frame")]
    BadHeaderLength { header_length: u32, len: usize },
    #[error("MessageType field is not ASCII")]
    MessageTypeNotAscii,
}

/// Why a well-formed frame must not be used (the official `Validate`, made stricter where
/// the official one lets corruption through).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error("MessageType is empty")]
    EmptyMessageType,
    #[error("CreatedDate is 0")]
    ZeroCreatedDate,
    #[error("payload Hash is not valid")]
    DigestMismatch,
}

/// Why a message cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("MessageType {0:?} is longer than 32 bytes or not ASCII")]
    MessageType(String),
    #[error("payload of {0} bytes does not fit a u32 PayloadLength")]
    PayloadTooLarge(usize),
}

/// One decoded frame. Raw header values (`payload_length`, `payload_digest`) are kept as
/// they arrived, so a decoded frame re-encodes byte for byte.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientMessage {
    pub message_type: MessageType,
    pub schema_version: u32,
    pub created_date: u64,
    pub sequence_number: i64,
    pub flags: u64,
    pub message_id: Uuid,
    pub payload_digest: [u8; 32],
    pub payload_type: PayloadType,
    pub payload_length: u32,
    pub payload: Bytes,
}

/// SHA-256 of a payload, as carried in PayloadDigest.
pub fn digest(payload: &[u8]) -> [u8; 32] {
    Sha256::digest(payload).into()
}

/// Writes a UUID in the wire's half-swapped order.
pub fn uuid_to_wire(id: &Uuid) -> [u8; 16] {
    let b = id.as_bytes();
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&b[8..]);
    out[8..].copy_from_slice(&b[..8]);
    out
}

/// Reads a UUID from the wire's half-swapped order.
pub fn uuid_from_wire(w: &[u8; 16]) -> Uuid {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&w[8..]);
    b[8..].copy_from_slice(&w[..8]);
    Uuid::from_bytes(b)
}

fn be_u32(f: &[u8], off: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&f[off..off + 4]);
    u32::from_be_bytes(b)
}

fn be_u64(f: &[u8], off: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&f[off..off + 8]);
    u64::from_be_bytes(b)
}

impl ClientMessage {
    /// A new message with PayloadLength and PayloadDigest computed from `payload`.
    pub fn new(
        message_type: MessageType,
        sequence_number: i64,
        flags: u64,
        payload_type: PayloadType,
        payload: Bytes,
        created_date: u64,
        message_id: Uuid,
    ) -> ClientMessage {
        ClientMessage {
            message_type,
            schema_version: SCHEMA_VERSION,
            created_date,
            sequence_number,
            flags,
            message_id,
            payload_digest: digest(&payload),
            payload_type,
            payload_length: payload.len() as u32,
            payload,
        }
    }

    /// Parses one frame. Never panics; the payload is a zero-copy slice of `frame`.
    pub fn decode(frame: Bytes) -> Result<ClientMessage, DecodeError> {
        let len = frame.len();
        if len < PAYLOAD_OFFSET {
            return Err(DecodeError::TooShort { len });
        }
        let header_length = be_u32(&frame, 0);
        // The payload starts at HeaderLength + 4 (PayloadLength is not used for framing).
        // A HeaderLength below 116 would make the payload overlap the fixed fields; one past
        // the end of the frame is what crashes the official reader.
        let start = header_length as usize + 4;
        if header_length < HEADER_LENGTH || start > len {
            return Err(DecodeError::BadHeaderLength { header_length, len });
        }
        let mt = &frame[4..4 + MESSAGE_TYPE_LEN];
        if !mt.is_ascii() {
            return Err(DecodeError::MessageTypeNotAscii);
        }
        let mt_str = std::str::from_utf8(mt)
            .map_err(|_| DecodeError::MessageTypeNotAscii)?
            .trim_matches('\0')
            .trim();
        let mut id = [0u8; 16];
        id.copy_from_slice(&frame[64..80]);
        let mut payload_digest = [0u8; 32];
        payload_digest.copy_from_slice(&frame[80..112]);
        Ok(ClientMessage {
            message_type: MessageType::parse(mt_str),
            schema_version: be_u32(&frame, 36),
            created_date: be_u64(&frame, 40),
            sequence_number: be_u64(&frame, 48) as i64,
            flags: be_u64(&frame, 56),
            message_id: uuid_from_wire(&id),
            payload_digest,
            payload_type: PayloadType::from_u32(be_u32(&frame, 112)),
            payload_length: be_u32(&frame, 116),
            payload: frame.slice(start..),
        })
    }

    /// Copies `frame` and decodes it.
    pub fn decode_slice(frame: &[u8]) -> Result<ClientMessage, DecodeError> {
        ClientMessage::decode(Bytes::copy_from_slice(frame))
    }

    /// Whether this frame may be used. Publication messages are accepted unchecked, as the
    /// real service fills their PayloadLength and digest with other things. Unlike the
    /// official parser, the digest is checked even when PayloadLength claims 0.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if matches!(
            self.message_type,
            MessageType::StartPublication | MessageType::PausePublication
        ) {
            return Ok(());
        }
        if self.message_type.as_str().is_empty() {
            return Err(ValidationError::EmptyMessageType);
        }
        if self.created_date == 0 {
            return Err(ValidationError::ZeroCreatedDate);
        }
        if (!self.payload.is_empty() || self.payload_length != 0)
            && digest(&self.payload) != self.payload_digest
        {
            return Err(ValidationError::DigestMismatch);
        }
        Ok(())
    }

    /// Encoded size in bytes.
    pub fn encoded_len(&self) -> usize {
        PAYLOAD_OFFSET + self.payload.len()
    }

    /// Appends the encoded frame to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let mt = self.message_type.as_str();
        if mt.len() > MESSAGE_TYPE_LEN || !mt.is_ascii() {
            return Err(EncodeError::MessageType(mt.to_owned()));
        }
        if u32::try_from(self.payload.len()).is_err() {
            return Err(EncodeError::PayloadTooLarge(self.payload.len()));
        }
        out.reserve(self.encoded_len());
        out.put_u32(HEADER_LENGTH);
        out.put_slice(mt.as_bytes());
        out.put_bytes(b' ', MESSAGE_TYPE_LEN - mt.len());
        out.put_u32(self.schema_version);
        out.put_u64(self.created_date);
        out.put_i64(self.sequence_number);
        out.put_u64(self.flags);
        out.put_slice(&uuid_to_wire(&self.message_id));
        out.put_slice(&self.payload_digest);
        out.put_u32(self.payload_type.to_u32());
        out.put_u32(self.payload_length);
        out.put_slice(&self.payload);
        Ok(())
    }

    /// The encoded frame.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode_into(&mut out)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_wire_order_matches_protocol_example() {
        let id = Uuid::parse_str("00112233-4455-6677-8899-aabbccddeeff").unwrap();
        let wire = uuid_to_wire(&id);
        assert_eq!(
            wire,
            [
                0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff, 0x00, 0x11, 0x22, 0x33, 0x44, 0x55,
                0x66, 0x77
            ]
        );
        assert_eq!(uuid_from_wire(&wire), id);
    }

    #[test]
    fn short_and_lying_frames_are_errors() {
        for len in [0, 1, 115, 116, 119] {
            assert!(matches!(
                ClientMessage::decode_slice(&vec![0u8; len]),
                Err(DecodeError::TooShort { .. })
            ));
        }
        let msg = ClientMessage::new(
            MessageType::InputStreamData,
            0,
            0,
            PayloadType::Output,
            Bytes::from_static(b"abc"),
            1,
            Uuid::nil(),
        );
        let mut f = msg.encode().unwrap();
        f[0..4].copy_from_slice(&1000u32.to_be_bytes());
        assert!(matches!(
            ClientMessage::decode_slice(&f),
            Err(DecodeError::BadHeaderLength { .. })
        ));
        f[0..4].copy_from_slice(&0u32.to_be_bytes());
        assert!(ClientMessage::decode_slice(&f).is_err());
    }

    #[test]
    fn digest_checked_even_when_payload_length_claims_zero() {
        let mut msg = ClientMessage::new(
            MessageType::OutputStreamData,
            0,
            0,
            PayloadType::Output,
            Bytes::from_static(b"abc"),
            1,
            Uuid::nil(),
        );
        assert_eq!(msg.validate(), Ok(()));
        msg.payload_length = 0;
        msg.payload_digest = [0; 32];
        assert_eq!(msg.validate(), Err(ValidationError::DigestMismatch));
    }
}
