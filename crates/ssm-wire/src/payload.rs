//! JSON bodies carried on the data channel, and the small binary payloads (Flag).
//!
//! Field names and declaration order follow the official peers: serde serializes structs
//! in declaration order, which reproduces the official bytes exactly (see the golden
//! frames in `fixtures/frames`).

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The first (text) frame on every WebSocket open.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct OpenDataChannelInput {
    pub message_schema_version: String,
    pub request_id: String,
    pub token_value: String,
    pub client_id: String,
    pub client_version: String,
}

/// Body of an `acknowledge` message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct AcknowledgeContent {
    pub acknowledged_message_type: String,
    pub acknowledged_message_id: String,
    pub acknowledged_message_sequence_number: i64,
    pub is_sequential_message: bool,
}

/// PayloadType 5, agent to client.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct HandshakeRequest {
    #[serde(default)]
    pub agent_version: String,
    #[serde(default)]
    pub requested_client_actions: Vec<RequestedClientAction>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RequestedClientAction {
    pub action_type: String,
    #[serde(default)]
    pub action_parameters: Value,
}

/// Action type names.
pub const ACTION_SESSION_TYPE: &str = "SessionType";
pub const ACTION_KMS_ENCRYPTION: &str = "KMSEncryption";

/// ActionParameters of a `SessionType` action.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct SessionTypeRequest {
    pub session_type: String,
    #[serde(default)]
    pub properties: Value,
}

/// ActionParameters of a `KMSEncryption` action.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KmsEncryptionRequest {
    #[serde(rename = "KMSKeyId")]
    pub kms_key_id: String,
    #[serde(rename = "Challenge", default)]
    pub challenge: Option<String>,
}

/// ActionResult of a successful `KMSEncryption` action.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KmsEncryptionResponse {
    /// Base64 of the KMS CiphertextBlob.
    #[serde(rename = "KMSCipherTextKey")]
    pub kms_cipher_text_key: String,
    #[serde(rename = "KMSCipherTextHash")]
    pub kms_cipher_text_hash: Option<String>,
}

/// PayloadType 6, client to agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct HandshakeResponse {
    pub client_version: String,
    pub processed_client_actions: Vec<ProcessedClientAction>,
    pub errors: Option<Vec<String>>,
}

/// `ActionStatus` values.
pub const ACTION_SUCCESS: i32 = 1;
pub const ACTION_FAILED: i32 = 2;
pub const ACTION_UNSUPPORTED: i32 = 3;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ProcessedClientAction {
    pub action_type: String,
    pub action_status: i32,
    pub action_result: Value,
    pub error: String,
}

/// PayloadType 7, agent to client. `HandshakeTimeToComplete` is nanoseconds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct HandshakeComplete {
    #[serde(default)]
    pub handshake_time_to_complete: i64,
    #[serde(default)]
    pub customer_message: String,
}

/// PayloadTypes 8 and 9: base64 of an encrypted 64-byte challenge.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct EncryptionChallenge {
    pub challenge: String,
}

/// PayloadType 3: the terminal size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SizeData {
    pub cols: u32,
    pub rows: u32,
}

/// Body of a `channel_closed` message. Only `Output` matters to the client.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ChannelClosed {
    #[serde(default)]
    pub message_id: String,
    #[serde(default)]
    pub created_date: String,
    #[serde(default)]
    pub destination_id: String,
    #[serde(default)]
    pub session_id: String,
    #[serde(default)]
    pub message_type: String,
    #[serde(default)]
    pub schema_version: i64,
    #[serde(default)]
    pub output: String,
}

/// PayloadType 10 values (u32 big-endian on the wire).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flag {
    DisconnectToPort,
    TerminateSession,
    ConnectToPortError,
    Unknown(u32),
}

impl Flag {
    pub fn to_u32(self) -> u32 {
        match self {
            Flag::DisconnectToPort => 1,
            Flag::TerminateSession => 2,
            Flag::ConnectToPortError => 3,
            Flag::Unknown(v) => v,
        }
    }

    pub fn from_u32(v: u32) -> Flag {
        match v {
            1 => Flag::DisconnectToPort,
            2 => Flag::TerminateSession,
            3 => Flag::ConnectToPortError,
            v => Flag::Unknown(v),
        }
    }

    pub fn encode(self) -> [u8; 4] {
        self.to_u32().to_be_bytes()
    }

    /// `None` unless the payload is exactly four bytes.
    pub fn decode(payload: &[u8]) -> Option<Flag> {
        let b: [u8; 4] = payload.try_into().ok()?;
        Some(Flag::from_u32(u32::from_be_bytes(b)))
    }
}

/// Parses an `ExitCode` payload (`EXIT_CODE: <n>`).
pub fn parse_exit_code(payload: &[u8]) -> Option<i32> {
    let s = std::str::from_utf8(payload).ok()?;
    s.trim().strip_prefix("EXIT_CODE:")?.trim().parse().ok()
}

/// The three StartSession response fields the plugin needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StartSessionResponse {
    pub session_id: String,
    pub token_value: String,
    pub stream_url: String,
}

/// Why a StartSession response could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StartSessionResponseError {
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    #[error("the session response is not a JSON object")]
    NotAnObject,
    #[error("the session response has no {0}")]
    Missing(&'static str),
}

impl StartSessionResponse {
    /// Parses SSM's `{"SessionId","TokenValue","StreamUrl"}` or ECS's camelCase spelling:
    /// keys match case-insensitively, as Go's encoding/json does.
    pub fn parse(json: &str) -> Result<StartSessionResponse, StartSessionResponseError> {
        let v: Value = serde_json::from_str(json)?;
        let obj = v
            .as_object()
            .ok_or(StartSessionResponseError::NotAnObject)?;
        let get = |name: &'static str| -> Result<String, StartSessionResponseError> {
            obj.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .and_then(|(_, v)| v.as_str())
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .ok_or(StartSessionResponseError::Missing(name))
        };
        Ok(StartSessionResponse {
            session_id: get("SessionId")?,
            token_value: get("TokenValue")?,
            stream_url: get("StreamUrl")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_session_response_accepts_both_spellings() {
        let ssm = r#"{"SessionId": "s-1", "TokenValue": "t", "StreamUrl": "wss://x/y"}"#;
        let ecs = r#"{"sessionId":"s-1","streamUrl":"wss://x/y","tokenValue":"t"}"#;
        assert_eq!(
            StartSessionResponse::parse(ssm).unwrap(),
            StartSessionResponse::parse(ecs).unwrap()
        );
        assert!(matches!(
            StartSessionResponse::parse(r#"{"SessionId":"s"}"#),
            Err(StartSessionResponseError::Missing("TokenValue"))
        ));
        assert!(StartSessionResponse::parse("[1]").is_err());
        assert!(StartSessionResponse::parse("{").is_err());
    }

    #[test]
    fn exit_code_and_flags() {
        assert_eq!(parse_exit_code(b"EXIT_CODE: 2"), Some(2));
        assert_eq!(parse_exit_code(b"EXIT_CODE: x"), None);
        assert_eq!(Flag::decode(&[0, 0, 0, 2]), Some(Flag::TerminateSession));
        assert_eq!(Flag::decode(&[0, 0, 2]), None);
    }
}
