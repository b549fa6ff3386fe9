//! EC2 Instance Connect Endpoint (EICE) and the EC2 query calls that find one.
//!
//! - `GET /openTunnel?…` upgraded to a WebSocket: the presigned URL's SigV4 query
//!   signature is recomputed here, independently of any client library, with the
//!   simulator's known test credentials ([`crate::Simulator::add_eice_credentials`];
//!   `test`/`test` by default). Unsigned, expired (`X-Amz-Date` more than
//!   `X-Amz-Expires`, at most 60, seconds old on the simulator's clock, which a test can
//!   move with [`crate::Simulator::set_eice_clock_offset`]), wrong-service, wrong-host and
//!   bad-signature requests get 403 with the service's JSON body
//!   `{"ErrorCode":…,"Message":…}` and an `x-amzn-requestid` header; a `remotePort` other
//!   than 22 or 3389 gets 400. Once upgraded, binary frames (at most 65 000 bytes) are
//!   bridged to the instance's port; the tunnel is closed with 1000 at
//!   `maxTunnelDuration` and with 1011 "Unable to connect to target" when the target
//!   refuses.
//! - EC2 query protocol (form-encoded POST, `Action=…`): `DescribeInstances` over the
//!   instances the test registered ([`crate::Simulator::add_ec2_instance`]; filters
//!   `instance-id`, `tag:Name`, `private-ip-address`, `private-dns-name`,
//!   `instance-state-name`, `vpc-id`) and `DescribeInstanceConnectEndpoints` (filters
//!   `state`, `vpc-id`, `instance-connect-endpoint-id`), which moto does not emulate.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use ring::hmac;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::http::{Conn, RequestHead};
use crate::session::lock;
use crate::Inner;

/// Largest frame either side may send.
pub const EICE_MAX_FRAME: usize = 65_000;
/// Longest validity a presigned URL may claim (`X-Amz-Expires`).
pub const EICE_MAX_EXPIRES: i64 = 60;
const SERVICE: &str = "ec2-instance-connect";
const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// An EC2 instance as the simulator's DescribeInstances reports it, and where the
/// endpoint's tunnels to it go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ec2InstanceSim {
    pub instance_id: String,
    /// The `Name` tag (empty: none).
    pub name: String,
    pub private_ip: String,
    pub private_dns: String,
    pub vpc_id: String,
    pub subnet_id: String,
    /// `running`, `stopped`, …
    pub state: String,
    /// Remote port → the local address a tunnel to it connects to.
    pub ports: BTreeMap<u16, SocketAddr>,
}

impl Ec2InstanceSim {
    /// A running instance in `vpc-sim`/`subnet-a` whose port 22 is `ssh` on loopback.
    pub fn running(instance_id: &str, name: &str, private_ip: &str, ssh: SocketAddr) -> Self {
        Ec2InstanceSim {
            instance_id: instance_id.to_owned(),
            name: name.to_owned(),
            private_ip: private_ip.to_owned(),
            private_dns: format!("ip-{}.ec2.internal", private_ip.replace('.', "-")),
            vpc_id: "vpc-0sim".to_owned(),
            subnet_id: "subnet-0a".to_owned(),
            state: "running".to_owned(),
            ports: BTreeMap::from([(22, ssh)]),
        }
    }
}

/// An Instance Connect Endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceConnectEndpoint {
    pub id: String,
    pub vpc_id: String,
    pub subnet_id: String,
    /// `create-complete`, `create-in-progress`, `delete-complete`, …
    pub state: String,
    /// The host (with `:port`) clients connect to and sign.
    pub dns_name: String,
    pub fips_dns_name: String,
}

/// What happened to one `openTunnel` request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TunnelRecord {
    /// The request target as received (path and query).
    pub target: String,
    /// The `Host` header.
    pub host: String,
    /// 101 when upgraded, else the refusal's status.
    pub status: u16,
    /// The refusal's `ErrorCode` (empty when upgraded).
    pub error_code: String,
    pub endpoint_id: String,
    pub private_ip: String,
    pub remote_port: u16,
    /// The close code the simulator sent (`None`: the client closed first, or refused).
    pub close_code: Option<u16>,
    pub close_reason: String,
    /// Bytes from the client to the target, and back.
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Largest binary frame received from the client.
    pub max_client_frame: usize,
    /// Whether the tunnel has ended.
    pub ended: bool,
}

/// The endpoint's state inside the simulator.
pub(crate) struct EiceState {
    pub instances: Mutex<Vec<Ec2InstanceSim>>,
    pub endpoints: Mutex<Vec<InstanceConnectEndpoint>>,
    /// Access key id → secret key.
    pub credentials: Mutex<BTreeMap<String, String>>,
    /// Seconds added to the system clock when checking `X-Amz-Date`.
    pub clock_offset: AtomicI64,
    pub tunnels: Mutex<Vec<TunnelRecord>>,
    pub active: AtomicUsize,
    pub max_active: AtomicUsize,
}

impl Default for EiceState {
    fn default() -> Self {
        EiceState {
            instances: Mutex::default(),
            endpoints: Mutex::default(),
            credentials: Mutex::new(BTreeMap::from([("test".to_owned(), "test".to_owned())])),
            clock_offset: AtomicI64::new(0),
            tunnels: Mutex::default(),
            active: AtomicUsize::new(0),
            max_active: AtomicUsize::new(0),
        }
    }
}

// ---- SigV4 query-signature verification ------------------------------------------------

/// Why a request is refused before the upgrade.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

fn refuse(status: u16, code: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        code,
        message: message.into(),
    }
}

fn forbidden(message: impl Into<String>) -> Refusal {
    refuse(403, "AccessDeniedException", message)
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// SigV4's URI encoding (unreserved kept, everything else `%XX`, upper case).
fn uri_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decoded query parameters, in order.
pub(crate) fn parse_query(query: &str) -> Option<Vec<(String, String)>> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Some((percent_decode(k)?, percent_decode(v)?))
        })
        .collect()
}

/// Seconds since the epoch of an `X-Amz-Date` (`YYYYMMDDTHHMMSSZ`).
pub(crate) fn parse_amz_date(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let (y, m, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (hh, mm, ss) = (num(9..11)?, num(11..13)?, num(13..15)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss)
}

fn hmac_sha256(key: &[u8], data: &str) -> Vec<u8> {
    let k = hmac::Key::new(hmac::HMAC_SHA256, key);
    hmac::sign(&k, data.as_bytes()).as_ref().to_vec()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Verifies a presigned `GET path?query` for `service` at `host`, `now` seconds since the
/// epoch; returns the decoded parameters.
pub(crate) fn verify_presigned(
    path: &str,
    query: &str,
    host: &str,
    now: i64,
    secret_for: impl Fn(&str) -> Option<String>,
) -> Result<Vec<(String, String)>, Refusal> {
    let params = parse_query(query)
        .ok_or_else(|| refuse(400, "InvalidParameter", "the query string is malformed"))?;
    let get = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let (Some(algorithm), Some(credential), Some(date), Some(signed_headers), Some(signature)) = (
        get("X-Amz-Algorithm"),
        get("X-Amz-Credential"),
        get("X-Amz-Date"),
        get("X-Amz-SignedHeaders"),
        get("X-Amz-Signature"),
    ) else {
        return Err(forbidden(
            "the request is not signed (no SigV4 query authentication)",
        ));
    };
    if algorithm != "AWS4-HMAC-SHA256" {
        return Err(forbidden(format!("unsupported algorithm {algorithm}")));
    }
    let parts: Vec<&str> = credential.split('/').collect();
    let [access_key, day, region, service, "aws4_request"] = parts.as_slice() else {
        return Err(forbidden("malformed X-Amz-Credential"));
    };
    if *service != SERVICE {
        return Err(forbidden(format!(
            "the credential is scoped to service {service}, not {SERVICE}"
        )));
    }
    let signed_at = parse_amz_date(date).ok_or_else(|| forbidden("malformed X-Amz-Date"))?;
    if !date.starts_with(day) {
        return Err(forbidden("the credential scope's date is not X-Amz-Date's"));
    }
    let expires: i64 = get("X-Amz-Expires")
        .and_then(|e| e.parse().ok())
        .filter(|e| (1..=EICE_MAX_EXPIRES).contains(e))
        .ok_or_else(|| forbidden("X-Amz-Expires must be between 1 and 60"))?;
    if now - signed_at > expires {
        return Err(forbidden(format!(
            "the presigned URL has expired: signed at {date}, valid for {expires} s"
        )));
    }
    if signed_at - now > 5 * 60 {
        return Err(forbidden("X-Amz-Date is in the future"));
    }
    let headers: Vec<&str> = signed_headers.split(';').collect();
    if !headers.contains(&"host") {
        return Err(forbidden("the host header is not signed"));
    }
    let secret = secret_for(access_key)
        .ok_or_else(|| forbidden(format!("unknown access key {access_key}")))?;
    // Canonical request: every parameter but the signature, encoded and sorted.
    let mut canon: Vec<(String, String)> = params
        .iter()
        .filter(|(k, _)| k != "X-Amz-Signature")
        .map(|(k, v)| (uri_encode(k), uri_encode(v)))
        .collect();
    canon.sort();
    let canonical_query = canon
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let mut canonical_headers = String::new();
    for h in &headers {
        match *h {
            "host" => canonical_headers.push_str(&format!("host:{host}\n")),
            other => {
                return Err(forbidden(format!(
                    "signed header {other} is not expected on openTunnel"
                )))
            }
        }
    }
    let canonical_request = format!(
        "GET\n{path}\n{canonical_query}\n{canonical_headers}\n{signed_headers}\n{EMPTY_SHA256}"
    );
    let scope = format!("{day}/{region}/{service}/aws4_request");
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{date}\n{scope}\n{}",
        hex(&Sha256::digest(canonical_request.as_bytes()))
    );
    let k_date = hmac_sha256(format!("AWS4{secret}").as_bytes(), day);
    let k_region = hmac_sha256(&k_date, region);
    let k_service = hmac_sha256(&k_region, service);
    let k_signing = hmac_sha256(&k_service, "aws4_request");
    let expected = hex(&hmac_sha256(&k_signing, &string_to_sign));
    if expected != signature {
        return Err(forbidden(
            "the request signature we calculated does not match the signature you provided",
        ));
    }
    Ok(params)
}

// ---- the tunnel endpoint -----------------------------------------------------------------

fn now_secs(inner: &Inner) -> i64 {
    let sys = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    sys + inner.eice.clock_offset.load(Ordering::SeqCst)
}

/// What an accepted request asked for.
struct Accepted {
    endpoint_id: String,
    private_ip: String,
    remote_port: u16,
    max_duration: Duration,
    target: Option<SocketAddr>,
}

fn check_request(inner: &Inner, head: &RequestHead) -> Result<Accepted, Refusal> {
    if head.method != "GET" {
        return Err(refuse(405, "InvalidRequest", "openTunnel is a GET"));
    }
    let query = head.target.split_once('?').map(|(_, q)| q).unwrap_or("");
    let host = head.header("host").unwrap_or("");
    let params = parse_query(query)
        .ok_or_else(|| refuse(400, "InvalidParameter", "the query string is malformed"))?;
    let get = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let endpoint_id = get("instanceConnectEndpointId").unwrap_or_default();
    let endpoint = lock(&inner.eice.endpoints)
        .iter()
        .find(|e| e.id == endpoint_id)
        .cloned();
    let endpoint = endpoint.ok_or_else(|| {
        refuse(
            400,
            "InvalidParameter",
            format!("the instance connect endpoint {endpoint_id:?} does not exist"),
        )
    })?;
    if !host.eq_ignore_ascii_case(&endpoint.dns_name)
        && !host.eq_ignore_ascii_case(&endpoint.fips_dns_name)
    {
        return Err(forbidden(format!(
            "host {host} is not the endpoint {endpoint_id}'s DNS name"
        )));
    }
    let credentials = lock(&inner.eice.credentials).clone();
    verify_presigned(head.path(), query, host, now_secs(inner), |ak| {
        credentials.get(ak).cloned()
    })?;
    if endpoint.state != "create-complete" && endpoint.state != "update-complete" {
        return Err(refuse(
            400,
            "InvalidParameter",
            format!("the endpoint is {}", endpoint.state),
        ));
    }
    let remote_port: u16 = get("remotePort")
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| refuse(400, "InvalidParameter", "remotePort is required"))?;
    if remote_port != 22 && remote_port != 3389 {
        return Err(refuse(
            400,
            "InvalidParameter",
            format!("remotePort {remote_port} is not allowed: only ports 22 and 3389 are allowed"),
        ));
    }
    let private_ip = get("privateIpAddress")
        .filter(|p| !p.is_empty())
        .ok_or_else(|| refuse(400, "InvalidParameter", "privateIpAddress is required"))?;
    let max_duration = match get("maxTunnelDuration") {
        None => 3600,
        Some(d) => d
            .parse::<u64>()
            .ok()
            .filter(|d| (1..=3600).contains(d))
            .ok_or_else(|| {
                refuse(
                    400,
                    "InvalidParameter",
                    "maxTunnelDuration must be between 1 and 3600",
                )
            })?,
    };
    let target = lock(&inner.eice.instances)
        .iter()
        .find(|i| i.private_ip == private_ip && i.vpc_id == endpoint.vpc_id && i.state == "running")
        .and_then(|i| i.ports.get(&remote_port).copied());
    Ok(Accepted {
        endpoint_id,
        private_ip,
        remote_port,
        max_duration: Duration::from_secs(max_duration),
        target,
    })
}

fn record(inner: &Inner, r: TunnelRecord) -> usize {
    let mut t = lock(&inner.eice.tunnels);
    t.push(r);
    t.len() - 1
}

fn update(inner: &Inner, i: usize, f: impl FnOnce(&mut TunnelRecord)) {
    if let Some(r) = lock(&inner.eice.tunnels).get_mut(i) {
        f(r);
    }
}

/// Serves one `/openTunnel` request.
pub(crate) async fn serve<S>(mut conn: Conn<S>, head: RequestHead, inner: Arc<Inner>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let request_id = uuid::Uuid::new_v4().hyphenated().to_string();
    let mut rec = TunnelRecord {
        target: head.target.clone(),
        host: head.header("host").unwrap_or("").to_owned(),
        ..Default::default()
    };
    let checked =
        check_request(&inner, &head).and_then(|a| match head.header("sec-websocket-key") {
            Some(k) if head.is_websocket_upgrade() => Ok((a, k.to_owned())),
            _ => Err(refuse(
                400,
                "InvalidRequest",
                "openTunnel needs a WebSocket upgrade",
            )),
        });
    let (accepted, key) = match checked {
        Ok(a) => a,
        Err(r) => {
            rec.status = r.status;
            rec.error_code = r.code.to_owned();
            rec.ended = true;
            record(&inner, rec);
            let body = serde_json::json!({ "ErrorCode": r.code, "Message": r.message });
            let _ = conn
                .respond(
                    r.status,
                    "application/json",
                    &[("x-amzn-requestid", request_id)],
                    body.to_string().as_bytes(),
                    true,
                )
                .await;
            return;
        }
    };
    rec.status = 101;
    rec.endpoint_id = accepted.endpoint_id.clone();
    rec.private_ip = accepted.private_ip.clone();
    rec.remote_port = accepted.remote_port;
    let index = record(&inner, rec);
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\nx-amzn-requestid: {request_id}\r\n\r\n",
        derive_accept_key(key.as_bytes())
    );
    if conn.stream.write_all(response.as_bytes()).await.is_err()
        || conn.stream.flush().await.is_err()
    {
        update(&inner, index, |r| r.ended = true);
        return;
    }
    let config = WebSocketConfig::default()
        .max_message_size(Some(EICE_MAX_FRAME))
        .max_frame_size(Some(EICE_MAX_FRAME));
    let ws =
        WebSocketStream::from_partially_read(conn.stream, conn.buf, Role::Server, Some(config))
            .await;
    let active = inner.eice.active.fetch_add(1, Ordering::SeqCst) + 1;
    inner.eice.max_active.fetch_max(active, Ordering::SeqCst);
    let (code, reason) = tunnel(ws, &accepted, &inner, index).await;
    inner.eice.active.fetch_sub(1, Ordering::SeqCst);
    update(&inner, index, |r| {
        r.close_code = code;
        r.close_reason = reason.to_owned();
        r.ended = true;
    });
}

fn close(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.to_owned().into(),
    }))
}

/// Bridges the WebSocket and the target; returns the close frame the simulator sent.
async fn tunnel<S>(
    mut ws: WebSocketStream<S>,
    a: &Accepted,
    inner: &Inner,
    index: usize,
) -> (Option<u16>, &'static str)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    const UNREACHABLE: &str = "Unable to connect to target";
    let deadline = tokio::time::Instant::now() + a.max_duration;
    let tcp = match a.target {
        Some(addr) => tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr)).await,
        None => Ok(Err(std::io::ErrorKind::ConnectionRefused.into())),
    };
    let Ok(Ok(tcp)) = tcp else {
        let _ = ws.send(close(1011, UNREACHABLE)).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while ws.next().await.is_some() {}
        })
        .await;
        return (Some(1011), UNREACHABLE);
    };
    let _ = tcp.set_nodelay(true);
    let (mut rd, mut wr) = tcp.into_split();
    let mut buf = vec![0u8; EICE_MAX_FRAME];
    let mut shutdown = inner.shutdown.clone();
    let sent: (Option<u16>, &'static str) = loop {
        tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(Message::Binary(b))) => {
                    let len = b.len();
                    update(inner, index, |r| {
                        r.bytes_up += len as u64;
                        r.max_client_frame = r.max_client_frame.max(len);
                    });
                    if wr.write_all(&b).await.is_err() {
                        break (Some(1011), "the target closed the connection");
                    }
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Text(_))) => {
                    break (Some(1003), "binary frames only");
                }
                // The client closed (tungstenite answers the close frame) or went away.
                Some(Ok(Message::Close(_))) => {
                    // Sends tungstenite's queued reply to the client's close frame.
                    let _ = ws.close(None).await;
                    let _ = wr.shutdown().await;
                    return (None, "");
                }
                Some(Err(tokio_tungstenite::tungstenite::Error::Capacity(_))) => {
                    break (Some(1009), "frames are limited to 65000 bytes");
                }
                None | Some(Err(_)) => {
                    let _ = wr.shutdown().await;
                    return (None, "");
                }
            },
            n = rd.read(&mut buf) => match n {
                Ok(0) | Err(_) => break (Some(1000), "the target closed the connection"),
                Ok(n) => {
                    update(inner, index, |r| r.bytes_down += n as u64);
                    if ws.send(Message::binary(buf[..n].to_vec())).await.is_err() {
                        return (None, "");
                    }
                }
            },
            _ = tokio::time::sleep_until(deadline) => {
                break (Some(1000), "the maximum tunnel duration was reached");
            }
            _ = shutdown.changed() => break (Some(1001), "the simulator is shutting down"),
        }
    };
    let _ = ws.send(close(sent.0.unwrap_or(1000), sent.1)).await;
    // Wait for the client's close (bounded), then drop the target.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(m)) = ws.next().await {
            if m.is_close() {
                break;
            }
        }
    })
    .await;
    sent
}

// ---- EC2 query protocol ------------------------------------------------------------------

/// Whether a request is an EC2 query-protocol call.
pub(crate) fn is_ec2_query(head: &RequestHead, body: &[u8]) -> bool {
    head.method == "POST"
        && head.header("x-amz-target").is_none()
        && head
            .header("content-type")
            .is_some_and(|c| c.starts_with("application/x-www-form-urlencoded"))
        && body.starts_with(b"Action=")
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn ec2_error(code: &str, message: &str) -> (u16, String) {
    (
        400,
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{}</Code>\
             <Message>{}</Message></Error></Errors><RequestID>{}</RequestID></Response>",
            xml_escape(code),
            xml_escape(message),
            uuid::Uuid::new_v4()
        ),
    )
}

/// Filters (`Filter.N.Name`, `Filter.N.Value.M`) and id lists (`<list>.N`) of a call.
fn filters(params: &[(String, String)], id_list: &str) -> Vec<(String, Vec<String>)> {
    let mut by_index: BTreeMap<u32, (String, Vec<String>)> = BTreeMap::new();
    let mut ids = Vec::new();
    for (k, v) in params {
        let parts: Vec<&str> = k.split('.').collect();
        match parts.as_slice() {
            ["Filter", n, "Name"] => {
                if let Ok(n) = n.parse() {
                    by_index.entry(n).or_default().0 = v.clone();
                }
            }
            ["Filter", n, "Value", _] => {
                if let Ok(n) = n.parse() {
                    by_index.entry(n).or_default().1.push(v.clone());
                }
            }
            [name, _] if *name == id_list => ids.push(v.clone()),
            _ => {}
        }
    }
    let mut out: Vec<(String, Vec<String>)> = by_index.into_values().collect();
    if !ids.is_empty() {
        out.push((format!("{id_list}-list"), ids));
    }
    out
}

/// Serves one EC2 query call: (status, XML body).
pub(crate) fn ec2_query(inner: &Inner, body: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(body);
    let Some(params) = parse_query(&text) else {
        return ec2_error("InvalidParameterValue", "the form body is malformed");
    };
    let action = params
        .iter()
        .find(|(k, _)| k == "Action")
        .map(|(_, v)| v.as_str())
        .unwrap_or("");
    match action {
        "DescribeInstances" => describe_instances(&lock(&inner.eice.instances), &params),
        "DescribeInstanceConnectEndpoints" => {
            describe_endpoints(&lock(&inner.eice.endpoints), &params)
        }
        other => ec2_error(
            "InvalidAction",
            &format!("the action {other} is not simulated"),
        ),
    }
}

fn describe_instances(instances: &[Ec2InstanceSim], params: &[(String, String)]) -> (u16, String) {
    let filters = filters(params, "InstanceId");
    for (name, _) in &filters {
        if !matches!(
            name.as_str(),
            "instance-id"
                | "InstanceId-list"
                | "tag:Name"
                | "private-ip-address"
                | "private-dns-name"
                | "instance-state-name"
                | "vpc-id"
        ) {
            return ec2_error(
                "InvalidParameterValue",
                &format!("the filter {name} is not simulated"),
            );
        }
    }
    let mut items = String::new();
    for i in instances.iter().filter(|i| {
        filters.iter().all(|(name, values)| {
            let field = match name.as_str() {
                "instance-id" | "InstanceId-list" => &i.instance_id,
                "tag:Name" => &i.name,
                "private-ip-address" => &i.private_ip,
                "private-dns-name" => &i.private_dns,
                "instance-state-name" => &i.state,
                _ => &i.vpc_id,
            };
            values.iter().any(|v| v == field)
        })
    }) {
        let tags = if i.name.is_empty() {
            String::new()
        } else {
            format!(
                "<tagSet><item><key>Name</key><value>{}</value></item></tagSet>",
                xml_escape(&i.name)
            )
        };
        items.push_str(&format!(
            "<item><reservationId>r-{id}</reservationId><instancesSet><item>\
             <instanceId>{id}</instanceId><instanceState><name>{state}</name></instanceState>\
             <privateDnsName>{dns}</privateDnsName><privateIpAddress>{ip}</privateIpAddress>\
             <vpcId>{vpc}</vpcId><subnetId>{subnet}</subnetId>{tags}\
             <platformDetails>Linux/UNIX</platformDetails></item></instancesSet></item>",
            id = xml_escape(&i.instance_id),
            state = xml_escape(&i.state),
            dns = xml_escape(&i.private_dns),
            ip = xml_escape(&i.private_ip),
            vpc = xml_escape(&i.vpc_id),
            subnet = xml_escape(&i.subnet_id),
        ));
    }
    (
        200,
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<DescribeInstancesResponse \
             xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\"><requestId>{}</requestId>\
             <reservationSet>{items}</reservationSet></DescribeInstancesResponse>",
            uuid::Uuid::new_v4()
        ),
    )
}

fn describe_endpoints(
    endpoints: &[InstanceConnectEndpoint],
    params: &[(String, String)],
) -> (u16, String) {
    let filters = filters(params, "InstanceConnectEndpointId");
    for (name, values) in &filters {
        if !matches!(
            name.as_str(),
            "state" | "vpc-id" | "instance-connect-endpoint-id" | "InstanceConnectEndpointId-list"
        ) {
            return ec2_error(
                "InvalidParameterValue",
                &format!("the filter {name} is not simulated"),
            );
        }
        if values.is_empty() {
            return ec2_error("InvalidParameterValue", "a filter needs a value");
        }
    }
    let mut items = String::new();
    for e in endpoints.iter().filter(|e| {
        filters.iter().all(|(name, values)| {
            let field = match name.as_str() {
                "state" => &e.state,
                "vpc-id" => &e.vpc_id,
                _ => &e.id,
            };
            values.iter().any(|v| v == field)
        })
    }) {
        items.push_str(&format!(
            "<item><ownerId>111122223333</ownerId><instanceConnectEndpointId>{id}</instanceConnectEndpointId>\
             <instanceConnectEndpointArn>arn:aws:ec2:us-east-1:111122223333:instance-connect-endpoint/{id}</instanceConnectEndpointArn>\
             <state>{state}</state><dnsName>{dns}</dnsName><fipsDnsName>{fips}</fipsDnsName>\
             <subnetId>{subnet}</subnetId><vpcId>{vpc}</vpcId><preserveClientIp>false</preserveClientIp></item>",
            id = xml_escape(&e.id),
            state = xml_escape(&e.state),
            dns = xml_escape(&e.dns_name),
            fips = xml_escape(&e.fips_dns_name),
            subnet = xml_escape(&e.subnet_id),
            vpc = xml_escape(&e.vpc_id),
        ));
    }
    (
        200,
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<DescribeInstanceConnectEndpointsResponse \
             xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\"><requestId>{}</requestId>\
             <instanceConnectEndpointSet>{items}</instanceConnectEndpointSet>\
             </DescribeInstanceConnectEndpointsResponse>",
            uuid::Uuid::new_v4()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amz_dates() {
        assert_eq!(parse_amz_date("19700101T000000Z"), Some(0));
        assert_eq!(parse_amz_date("20150830T123600Z"), Some(1_440_938_160));
        assert_eq!(parse_amz_date("20240229T235959Z"), Some(1_709_251_199));
        assert_eq!(parse_amz_date("2015-08-30T12:36Z"), None);
    }

    /// Signs like a client would (a second, test-only implementation of the algorithm).
    fn sign(query_without_sig: &str, host: &str, secret: &str) -> String {
        let params = parse_query(query_without_sig).unwrap();
        let mut canon: Vec<(String, String)> = params
            .iter()
            .map(|(k, v)| (uri_encode(k), uri_encode(v)))
            .collect();
        canon.sort();
        let cq = canon
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&");
        let get = |n: &str| params.iter().find(|(k, _)| k == n).unwrap().1.clone();
        let cred = get("X-Amz-Credential");
        let parts: Vec<&str> = cred.split('/').collect();
        let cr = format!("GET\n/openTunnel\n{cq}\nhost:{host}\n\nhost\n{EMPTY_SHA256}");
        let sts = format!(
            "AWS4-HMAC-SHA256\n{}\n{}/{}/{}/aws4_request\n{}",
            get("X-Amz-Date"),
            parts[1],
            parts[2],
            parts[3],
            hex(&Sha256::digest(cr.as_bytes()))
        );
        let k = hmac_sha256(format!("AWS4{secret}").as_bytes(), parts[1]);
        let k = hmac_sha256(&k, parts[2]);
        let k = hmac_sha256(&k, parts[3]);
        let k = hmac_sha256(&k, "aws4_request");
        format!(
            "{query_without_sig}&X-Amz-Signature={}",
            hex(&hmac_sha256(&k, &sts))
        )
    }

    #[test]
    fn verifies_and_refuses() {
        let base = "instanceConnectEndpointId=eice-1&remotePort=22&privateIpAddress=10.0.0.5\
                    &X-Amz-Algorithm=AWS4-HMAC-SHA256\
                    &X-Amz-Credential=AK%2F20240101%2Fus-east-1%2Fec2-instance-connect%2Faws4_request\
                    &X-Amz-Date=20240101T000000Z&X-Amz-Expires=60&X-Amz-SignedHeaders=host";
        let t0 = parse_amz_date("20240101T000000Z").unwrap();
        let secret = |ak: &str| (ak == "AK").then(|| "SECRET".to_owned());
        let q = sign(base, "eice.test:443", "SECRET");
        assert!(verify_presigned("/openTunnel", &q, "eice.test:443", t0 + 60, secret).is_ok());
        let err = |q: &str, host: &str, now: i64| {
            verify_presigned("/openTunnel", q, host, now, secret).unwrap_err()
        };
        assert!(err(&q, "eice.test:443", t0 + 61)
            .message
            .contains("expired"));
        assert!(err(&q, "other.test:443", t0)
            .message
            .contains("does not match"));
        assert!(err(base, "eice.test:443", t0)
            .message
            .contains("not signed"));
        let tampered = q.replace("remotePort=22", "remotePort=23");
        assert!(err(&tampered, "eice.test:443", t0)
            .message
            .contains("does not match"));
        let wrong = sign(
            &base.replace("ec2-instance-connect", "ssmmessages"),
            "eice.test:443",
            "SECRET",
        );
        assert!(err(&wrong, "eice.test:443", t0)
            .message
            .contains("service ssmmessages"));
        let bad_key = sign(base, "eice.test:443", "OTHER");
        assert_eq!(err(&bad_key, "eice.test:443", t0).status, 403);
    }

    #[test]
    fn describe_endpoint_filters() {
        let e = InstanceConnectEndpoint {
            id: "eice-1".into(),
            vpc_id: "vpc-1".into(),
            subnet_id: "subnet-1".into(),
            state: "create-complete".into(),
            dns_name: "a.test".into(),
            fips_dns_name: "a.fips.test".into(),
        };
        let p = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let (s, body) = describe_endpoints(
            std::slice::from_ref(&e),
            &p(&[("Filter.1.Name", "vpc-id"), ("Filter.1.Value.1", "vpc-1")]),
        );
        assert_eq!(s, 200);
        assert!(body.contains("<dnsName>a.test</dnsName>"), "{body}");
        let (_, body) = describe_endpoints(
            &[e],
            &p(&[("Filter.1.Name", "vpc-id"), ("Filter.1.Value.1", "vpc-2")]),
        );
        assert!(!body.contains("eice-1"), "{body}");
    }
}
