//! The SSM and KMS APIs over AWS JSON 1.1 (`X-Amz-Target` dispatch, POST `/`).
//!
//! Served operations: `AmazonSSM.StartSession`, `AmazonSSM.ResumeSession`,
//! `AmazonSSM.TerminateSession`, `AmazonSSM.DescribeInstanceInformation`,
//! `TrentService.GenerateDataKey`, `AWSEC2InstanceConnectService.SendSSHPublicKey`, and
//! `GET /ec2-instance-connect/keys` (see `nodes`). Errors use the AWS shape
//! `{"__type": "...", "message": "..."}` with status 400. Signatures are not checked, but
//! every call is recorded with its headers ([`ApiCall`]) for SigV4 assertions.

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine;
use serde_json::{json, Value};

use crate::http::{Conn, ReadError, RequestHead};
use crate::session::lock;
use crate::{gateway, Inner, Io, SimError, StartSessionRequest, StartSessionResponse};

const JSON_11: &str = "application/x-amz-json-1.1";

/// One API request as received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiCall {
    /// `X-Amz-Target`, e.g. `AmazonSSM.StartSession`.
    pub target: String,
    /// Request headers, names lowercased (Authorization, X-Amz-Date, X-Amz-Security-Token…).
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// HTTP status of the answer.
    pub status: u16,
}

impl ApiCall {
    /// The first header of this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The StartSession response as the AWS CLI hands it to the plugin (Python `json.dumps`
/// spacing).
pub fn cli_response_json(resp: &StartSessionResponse) -> String {
    let q = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned());
    format!(
        "{{\"SessionId\": {}, \"TokenValue\": {}, \"StreamUrl\": {}}}",
        q(&resp.session_id),
        q(&resp.token_value),
        q(&resp.stream_url)
    )
}

/// Serves HTTP requests on one connection until it closes or upgrades to a WebSocket.
pub(crate) async fn serve_connection(stream: Box<dyn Io>, inner: Arc<Inner>) {
    let mut conn = Conn::new(stream);
    let mut shutdown = inner.shutdown.clone();
    loop {
        let head = tokio::select! {
            h = conn.read_head() => h,
            _ = shutdown.changed() => return,
        };
        let head = match head {
            Ok(h) => h,
            Err(ReadError::Eof) | Err(ReadError::Io) => return,
            Err(ReadError::Bad(status, msg)) => {
                let _ = conn
                    .respond(status, "text/plain", &[], msg.as_bytes(), true)
                    .await;
                return;
            }
        };
        if head.path() == "/openTunnel" {
            crate::eice::serve(conn, head, inner).await;
            return;
        }
        if head.is_websocket_upgrade() {
            gateway::serve(conn, head, inner).await;
            return;
        }
        let body = match conn.read_body(&head).await {
            Ok(b) => b,
            Err(ReadError::Eof) | Err(ReadError::Io) => return,
            Err(ReadError::Bad(status, msg)) => {
                let _ = conn
                    .respond(status, "text/plain", &[], msg.as_bytes(), true)
                    .await;
                return;
            }
        };
        let close = head.wants_close();
        if head.method == "GET" && head.path() == "/ec2-instance-connect/keys" {
            let query = head.target.split_once('?').map(|(_, q)| q).unwrap_or("");
            let keys = crate::nodes::valid_keys(&inner, query);
            if conn
                .respond(200, "text/plain", &[], keys.as_bytes(), close)
                .await
                .is_err()
                || close
            {
                return;
            }
            continue;
        }
        if crate::eice::is_ec2_query(&head, &body) {
            let (status, xml) = crate::eice::ec2_query(&inner, &body);
            let request_id = uuid::Uuid::new_v4().hyphenated().to_string();
            if conn
                .respond(
                    status,
                    "text/xml;charset=UTF-8",
                    &[("x-amzn-RequestId", request_id)],
                    xml.as_bytes(),
                    close,
                )
                .await
                .is_err()
                || close
            {
                return;
            }
            continue;
        }
        let (status, body) = handle(&inner, &head, &body);
        let request_id = uuid::Uuid::new_v4().hyphenated().to_string();
        if conn
            .respond(
                status,
                JSON_11,
                &[("x-amzn-RequestId", request_id)],
                &body,
                close,
            )
            .await
            .is_err()
            || close
        {
            return;
        }
    }
}

fn error(status: u16, code: &str, message: &str) -> (u16, Vec<u8>) {
    let body = json!({ "__type": code, "message": message });
    (status, body.to_string().into_bytes())
}

fn ok(v: Value) -> (u16, Vec<u8>) {
    (200, v.to_string().into_bytes())
}

fn handle(inner: &Inner, head: &RequestHead, body: &[u8]) -> (u16, Vec<u8>) {
    let target = head.header("x-amz-target").unwrap_or("").to_owned();
    let (status, out) = if head.method != "POST" {
        error(405, "UnknownOperationException", "only POST is supported")
    } else {
        match serde_json::from_slice::<Value>(if body.is_empty() { b"{}" } else { body }) {
            Err(e) => error(400, "SerializationException", &e.to_string()),
            Ok(v) if !v.is_object() => {
                error(400, "SerializationException", "body is not a JSON object")
            }
            Ok(v) => dispatch(inner, &target, &v),
        }
    };
    lock(&inner.api_calls).push(ApiCall {
        target,
        headers: head.headers.clone(),
        body: String::from_utf8_lossy(body).into_owned(),
        status,
    });
    (status, out)
}

fn str_field<'a>(v: &'a Value, name: &str) -> Option<&'a str> {
    v.get(name).and_then(Value::as_str)
}

fn dispatch(inner: &Inner, target: &str, v: &Value) -> (u16, Vec<u8>) {
    match target {
        "AmazonSSM.StartSession" => start_session(inner, v),
        "AmazonSSM.ResumeSession" => {
            let Some(id) = str_field(v, "SessionId") else {
                return error(400, "ValidationException", "SessionId is required");
            };
            match inner.resume_session(id) {
                Some(r) => ok(json!({
                    "SessionId": r.session_id,
                    "TokenValue": r.token_value,
                    "StreamUrl": r.stream_url,
                })),
                None => ok(json!({ "SessionId": id, "TokenValue": null, "StreamUrl": null })),
            }
        }
        "AmazonSSM.TerminateSession" => {
            let Some(id) = str_field(v, "SessionId") else {
                return error(400, "ValidationException", "SessionId is required");
            };
            inner.terminate_session(id);
            ok(json!({ "SessionId": id }))
        }
        "TrentService.GenerateDataKey" => generate_data_key(inner, v),
        "AmazonSSM.DescribeInstanceInformation" => {
            crate::nodes::describe_instance_information(inner, v)
        }
        "AWSEC2InstanceConnectService.SendSSHPublicKey" => {
            crate::nodes::send_ssh_public_key(inner, v)
        }
        "" => error(400, "MissingAction", "X-Amz-Target header is missing"),
        other => error(
            400,
            "UnknownOperationException",
            &format!("operation {other} is not simulated"),
        ),
    }
}

fn start_session(inner: &Inner, v: &Value) -> (u16, Vec<u8>) {
    let Some(target) = str_field(v, "Target").filter(|t| !t.is_empty()) else {
        return error(
            400,
            "ValidationException",
            "1 validation error detected: Value null at 'target' failed to satisfy constraint: Member must not be null",
        );
    };
    let mut parameters = BTreeMap::new();
    if let Some(params) = v.get("Parameters") {
        let Some(obj) = params.as_object() else {
            return error(400, "SerializationException", "Parameters must be a map");
        };
        for (k, val) in obj {
            let list = match val {
                Value::String(s) => vec![s.clone()],
                Value::Array(items) => {
                    let mut l = Vec::new();
                    for i in items {
                        match i.as_str() {
                            Some(s) => l.push(s.to_owned()),
                            None => {
                                return error(
                                    400,
                                    "SerializationException",
                                    &format!("parameter {k} must be a list of strings"),
                                )
                            }
                        }
                    }
                    l
                }
                _ => {
                    return error(
                        400,
                        "SerializationException",
                        &format!("parameter {k} must be a list of strings"),
                    )
                }
            };
            parameters.insert(k.clone(), list);
        }
    }
    let req = StartSessionRequest {
        target: target.to_owned(),
        document_name: str_field(v, "DocumentName").map(str::to_owned),
        parameters,
    };
    match inner.create_session(&req, inner.config.clone()) {
        Ok(r) => ok(json!({
            "SessionId": r.session_id,
            "TokenValue": r.token_value,
            "StreamUrl": r.stream_url,
        })),
        Err(SimError::InvalidRequest { code, message }) => error(400, code, &message),
        Err(e) => error(500, "InternalServerError", &e.to_string()),
    }
}

fn generate_data_key(inner: &Inner, v: &Value) -> (u16, Vec<u8>) {
    let Some(key_id) = str_field(v, "KeyId").filter(|k| !k.is_empty()) else {
        return error(400, "ValidationException", "KeyId is required");
    };
    let n = match (
        v.get("NumberOfBytes").and_then(Value::as_u64),
        str_field(v, "KeySpec"),
    ) {
        (Some(n), None) if (1..=1024).contains(&n) => n as u32,
        (None, Some("AES_256")) => 32,
        (None, Some("AES_128")) => 16,
        _ => {
            return error(
                400,
                "ValidationException",
                "exactly one of NumberOfBytes (1..1024) or KeySpec is required",
            )
        }
    };
    let mut context = BTreeMap::new();
    if let Some(obj) = v.get("EncryptionContext").and_then(Value::as_object) {
        for (k, val) in obj {
            if let Some(s) = val.as_str() {
                context.insert(k.clone(), s.to_owned());
            }
        }
    }
    if let Some(session) = context
        .get("aws:ssm:SessionId")
        .and_then(|id| inner.session(id))
    {
        let ctx = context.clone();
        session.update_stats(|s| s.kms_encryption_contexts.push(ctx));
    }
    let (plaintext, blob) = {
        let mut rng = lock(&inner.rng);
        inner.kms.generate(key_id, n, context, &mut *rng)
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    let arn = if key_id.starts_with("arn:") {
        key_id.to_owned()
    } else {
        format!("arn:aws:kms:us-east-1:111122223333:key/{key_id}")
    };
    ok(json!({
        "CiphertextBlob": b64.encode(blob),
        "Plaintext": b64.encode(plaintext),
        "KeyId": arn,
    }))
}
