//! Fuzzes the `ClientMessage` decoder, `validate`, the re-encoder and the JSON payload
//! parsers with whatever decodes. Nothing may panic; a decoded frame with the standard
//! HeaderLength and an unchanged MessageType must re-encode to the input.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use ssm_wire::frame::{ClientMessage, MessageType, PayloadType};
use ssm_wire::payload::{
    parse_exit_code, AcknowledgeContent, ChannelClosed, EncryptionChallenge, Flag,
    HandshakeComplete, HandshakeRequest, HandshakeResponse, KmsEncryptionRequest,
    SessionTypeRequest, SizeData, StartSessionResponse,
};

fuzz_target!(|data: &[u8]| {
    let Ok(m) = ClientMessage::decode(Bytes::copy_from_slice(data)) else {
        return;
    };
    let _ = m.validate();
    if data.get(..4) == Some(&[0, 0, 0, 116]) {
        if let Ok(again) = m.encode() {
            if again.get(4..36) == data.get(4..36) {
                assert_eq!(again, data, "re-encode differs");
            }
        }
    }

    let p = &m.payload[..];
    match (&m.message_type, m.payload_type) {
        (MessageType::Acknowledge, _) => {
            let _ = serde_json::from_slice::<AcknowledgeContent>(p);
        }
        (MessageType::ChannelClosed, _) => {
            let _ = serde_json::from_slice::<ChannelClosed>(p);
        }
        (_, PayloadType::Size) => {
            let _ = serde_json::from_slice::<SizeData>(p);
        }
        (_, PayloadType::HandshakeRequest) => {
            if let Ok(req) = serde_json::from_slice::<HandshakeRequest>(p) {
                for a in req.requested_client_actions {
                    let _ =
                        serde_json::from_value::<SessionTypeRequest>(a.action_parameters.clone());
                    let _ = serde_json::from_value::<KmsEncryptionRequest>(a.action_parameters);
                }
            }
        }
        (_, PayloadType::HandshakeResponse) => {
            let _ = serde_json::from_slice::<HandshakeResponse>(p);
        }
        (_, PayloadType::HandshakeComplete) => {
            let _ = serde_json::from_slice::<HandshakeComplete>(p);
        }
        (_, PayloadType::EncChallengeRequest | PayloadType::EncChallengeResponse) => {
            let _ = serde_json::from_slice::<EncryptionChallenge>(p);
        }
        (_, PayloadType::Flag) => {
            let _ = Flag::decode(p);
        }
        (_, PayloadType::ExitCode) => {
            let _ = parse_exit_code(p);
        }
        _ => {}
    }
    if let Ok(s) = std::str::from_utf8(p) {
        let _ = StartSessionResponse::parse(s);
    }
});
