//! A minimal data-channel client for driving the simulator in tests: OpenDataChannel,
//! sequence numbers, acks, an in-order receive buffer, retransmission of its own unacked
//! frames, and the handshake. Written against ssm-wire's codec only.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use ssm_wire::payload::{AcknowledgeContent, ChannelClosed, OpenDataChannelInput};
use ssm_wire::{ClientMessage, MessageType, PayloadType};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use uuid::Uuid;

pub const CLIENT_VERSION: &str = "1.2.677.0";

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Payload(PayloadType, Bytes),
    Closed(String),
    /// The WebSocket ended without channel_closed.
    Disconnected,
}

pub struct Client {
    ws: Option<Ws>,
    pub client_id: String,
    next_seq: i64,
    expected: i64,
    reorder: BTreeMap<i64, ClientMessage>,
    unacked: BTreeMap<i64, (Bytes, Instant)>,
    pub invalid_frames: u64,
    pub publication_frames: u64,
    pub duplicates: u64,
    pub first_frame_types: Vec<String>,
    root: Option<Vec<u8>>,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(1)
}

/// Options of [`Client::connect_opts`].
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnectOpts {
    pub ping_first: bool,
    pub recv_buffer: Option<u32>,
}

/// Opens a plain `ws://` WebSocket, optionally with a small SO_RCVBUF.
async fn open_plain(url: &str, recv_buffer: Option<u32>) -> Ws {
    let hostport = url
        .strip_prefix("ws://")
        .and_then(|r| r.split('/').next())
        .expect("a ws:// url");
    let addr: std::net::SocketAddr = hostport.parse().expect("ip:port");
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(n) = recv_buffer {
        socket.set_recv_buffer_size(n).unwrap();
    }
    let stream = socket.connect(addr).await.expect("tcp connect");
    let _ = stream.set_nodelay(true);
    let (ws, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream))
        .await
        .expect("websocket handshake");
    ws
}

async fn open(url: &str, root: Option<&[u8]>) -> Ws {
    let connector = root.map(|der| {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls::pki_types::CertificateDer::from(der.to_vec()))
            .expect("CA cert");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        tokio_tungstenite::Connector::Rustls(Arc::new(cfg))
    });
    let (ws, _) = tokio_tungstenite::connect_async_tls_with_config(url, None, false, connector)
        .await
        .expect("websocket connect");
    ws
}

impl Client {
    pub async fn connect(url: &str, token: &str) -> Client {
        Self::connect_with_root(url, token, None).await
    }

    pub async fn connect_with_root(url: &str, token: &str, root: Option<Vec<u8>>) -> Client {
        let mut c = Self::unconnected(root);
        c.reconnect(url, token).await;
        c
    }

    /// Like [`Client::connect`] over plain ws, with options: a WebSocket ping sent before
    /// the OpenDataChannelInput text frame (as the official plugin often does), and/or a
    /// small socket receive buffer (so a client that stops reading backs up quickly).
    pub async fn connect_opts(url: &str, token: &str, opts: ConnectOpts) -> Client {
        let mut c = Self::unconnected(None);
        let ws = open_plain(url, opts.recv_buffer).await;
        c.ws = Some(ws);
        if opts.ping_first {
            c.ws.as_mut()
                .unwrap()
                .send(Message::Ping(Bytes::from_static(b"keepalive")))
                .await
                .expect("send ping");
        }
        c.send_open(token).await;
        c
    }

    fn unconnected(root: Option<Vec<u8>>) -> Client {
        Client {
            ws: None,
            client_id: Uuid::new_v4().to_string(),
            next_seq: 0,
            expected: 0,
            reorder: BTreeMap::new(),
            unacked: BTreeMap::new(),
            invalid_frames: 0,
            publication_frames: 0,
            duplicates: 0,
            first_frame_types: Vec::new(),
            root,
        }
    }

    async fn send_open(&mut self, token: &str) {
        let input = OpenDataChannelInput {
            message_schema_version: "1.0".into(),
            request_id: Uuid::new_v4().to_string(),
            token_value: token.into(),
            client_id: self.client_id.clone(),
            client_version: CLIENT_VERSION.into(),
        };
        self.ws
            .as_mut()
            .expect("connected")
            .send(Message::Text(serde_json::to_string(&input).unwrap().into()))
            .await
            .expect("send open");
    }

    /// Opens a (new) WebSocket and sends OpenDataChannelInput; unacked frames are resent.
    pub async fn reconnect(&mut self, url: &str, token: &str) {
        self.ws = Some(open(url, self.root.as_deref()).await);
        self.send_open(token).await;
        let frames: Vec<Bytes> = self.unacked.values().map(|(f, _)| f.clone()).collect();
        for f in frames {
            self.send_raw(f).await;
        }
    }

    pub async fn send_raw(&mut self, frame: Bytes) -> bool {
        match self.ws.as_mut() {
            Some(ws) => ws.send(Message::Binary(frame)).await.is_ok(),
            None => false,
        }
    }

    pub async fn send(&mut self, pt: PayloadType, data: &[u8]) {
        let msg = ClientMessage::new(
            MessageType::InputStreamData,
            self.next_seq,
            0,
            pt,
            Bytes::copy_from_slice(data),
            now_ms(),
            Uuid::new_v4(),
        );
        let frame = Bytes::from(msg.encode().unwrap());
        self.unacked
            .insert(self.next_seq, (frame.clone(), Instant::now()));
        self.next_seq += 1;
        self.send_raw(frame).await;
    }

    pub async fn send_json(&mut self, pt: PayloadType, v: &Value) {
        self.send(pt, v.to_string().as_bytes()).await;
    }

    pub fn unacked(&self) -> usize {
        self.unacked.len()
    }

    async fn ack(&mut self, msg: &ClientMessage) {
        let content = AcknowledgeContent {
            acknowledged_message_type: msg.message_type.as_str().into(),
            acknowledged_message_id: msg.message_id.to_string(),
            acknowledged_message_sequence_number: msg.sequence_number,
            is_sequential_message: true,
        };
        let ack = ClientMessage::new(
            MessageType::Acknowledge,
            0,
            3,
            PayloadType::Undefined,
            Bytes::from(serde_json::to_vec(&content).unwrap()),
            now_ms(),
            Uuid::new_v4(),
        );
        let frame = Bytes::from(ack.encode().unwrap());
        self.send_raw(frame).await;
    }

    async fn retransmit(&mut self) {
        let now = Instant::now();
        let due: Vec<i64> = self
            .unacked
            .iter()
            .filter(|(_, (_, t))| now.duration_since(*t) > Duration::from_millis(150))
            .map(|(s, _)| *s)
            .collect();
        for seq in due {
            if let Some((f, t)) = self.unacked.get_mut(&seq) {
                *t = now;
                let f = f.clone();
                self.send_raw(f).await;
            }
        }
    }

    /// The next in-order payload, channel_closed, or disconnect; `None` on timeout.
    pub async fn next_event(&mut self, timeout: Duration) -> Option<Event> {
        let deadline = Instant::now() + timeout;
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            if let Some(msg) = self.reorder.remove(&self.expected) {
                self.expected += 1;
                return Some(Event::Payload(msg.payload_type, msg.payload));
            }
            let ws = self.ws.as_mut()?;
            let frame = tokio::select! {
                f = ws.next() => f,
                _ = tick.tick() => { self.retransmit().await; continue; }
                _ = tokio::time::sleep_until(deadline) => return None,
            };
            let data = match frame {
                Some(Ok(Message::Binary(b))) => b,
                Some(Ok(Message::Text(t))) => Bytes::copy_from_slice(t.as_bytes()),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => {
                    self.ws = None;
                    return Some(Event::Disconnected);
                }
            };
            let msg = match ClientMessage::decode(data) {
                Ok(m) if m.validate().is_ok() => m,
                _ => {
                    self.invalid_frames += 1;
                    continue;
                }
            };
            if self.first_frame_types.len() < 4 {
                self.first_frame_types
                    .push(msg.message_type.as_str().to_owned());
            }
            match msg.message_type {
                MessageType::OutputStreamData => {
                    let seq = msg.sequence_number;
                    if seq < self.expected || self.reorder.contains_key(&seq) {
                        self.duplicates += 1;
                        self.ack(&msg).await;
                    } else {
                        self.ack(&msg).await;
                        self.reorder.insert(seq, msg);
                    }
                }
                MessageType::Acknowledge => {
                    if let Ok(a) = serde_json::from_slice::<AcknowledgeContent>(&msg.payload) {
                        self.unacked.remove(&a.acknowledged_message_sequence_number);
                    }
                }
                MessageType::ChannelClosed => {
                    let cc: ChannelClosed =
                        serde_json::from_slice(&msg.payload).unwrap_or_default();
                    return Some(Event::Closed(cc.output));
                }
                MessageType::StartPublication | MessageType::PausePublication => {
                    self.publication_frames += 1;
                }
                _ => {}
            }
        }
    }

    /// Next payload; panics on anything else.
    pub async fn expect_payload(&mut self, timeout: Duration) -> (PayloadType, Bytes) {
        match self.next_event(timeout).await {
            Some(Event::Payload(pt, b)) => (pt, b),
            other => panic!("expected a payload, got {other:?}"),
        }
    }

    /// Answers the HandshakeRequest (all actions succeed, no KMS) and waits for
    /// HandshakeComplete. Returns the request JSON.
    pub async fn handshake(&mut self) -> Value {
        let (pt, body) = self.expect_payload(Duration::from_secs(5)).await;
        assert_eq!(pt, PayloadType::HandshakeRequest);
        let req: Value = serde_json::from_slice(&body).unwrap();
        let actions: Vec<Value> = req["RequestedClientActions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                json!({"ActionType": a["ActionType"], "ActionStatus": 1, "ActionResult": null, "Error": ""})
            })
            .collect();
        self.send_json(
            PayloadType::HandshakeResponse,
            &json!({"ClientVersion": CLIENT_VERSION, "ProcessedClientActions": actions, "Errors": null}),
        )
        .await;
        let (pt, body) = self.expect_payload(Duration::from_secs(5)).await;
        assert_eq!(pt, PayloadType::HandshakeComplete, "{body:?}");
        req
    }

    /// Collects payloads until channel_closed; returns them and the close Output.
    pub async fn collect_until_closed(
        &mut self,
        timeout: Duration,
    ) -> (Vec<(PayloadType, Bytes)>, String) {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_event(left).await {
                Some(Event::Payload(pt, b)) => out.push((pt, b)),
                Some(Event::Closed(o)) => return (out, o),
                other => panic!("expected channel_closed, got {other:?} after {out:?}"),
            }
        }
    }

    pub async fn close(mut self) {
        if let Some(ws) = self.ws.as_mut() {
            let _ = ws.close(None).await;
        }
    }
}

/// A TCP echo server; returns its port and a counter of accepted connections.
pub async fn echo_server() -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = count.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    (port, count)
}

/// A TCP server that writes `len` bytes of `pattern(i)` to every connection and closes it.
pub async fn bulk_server(len: usize) -> u16 {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let data = pattern(len);
                let _ = s.write_all(&data).await;
                let _ = s.shutdown().await;
            });
        }
    });
    port
}

/// Deterministic test bytes.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i.wrapping_mul(31) % 253) as u8).collect()
}

/// A port nobody listens on.
pub async fn closed_port() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let p = l.local_addr().unwrap().port();
    drop(l);
    p
}

/// Minimal HTTP/1.1 POST of an AWS JSON 1.1 call; returns (status, body JSON).
pub async fn api_call(endpoint: &str, target: &str, body: &Value) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = endpoint.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).await.unwrap();
    let body = body.to_string();
    let req = format!(
        "POST / HTTP/1.1\r\nHost: {addr}\r\nX-Amz-Target: {target}\r\nContent-Type: application/x-amz-json-1.1\r\nAuthorization: AWS4-HMAC-SHA256 Credential=test/20240101/us-east-1/ssm/aws4_request, SignedHeaders=host, Signature=00\r\nX-Amz-Date: 20240101T000000Z\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).await.unwrap();
    let text = String::from_utf8(resp).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}
