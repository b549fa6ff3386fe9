//! The simulated message gateway (MGS): the data-channel WebSocket endpoint.
//!
//! Per connection: check the upgrade, require the OpenDataChannelInput text frame with the
//! session's current token, attach to the session's agent, then pump binary frames both
//! ways through the network emulation ([`crate::netem`]). The gateway also plays the
//! service's rough edges: the packet cap with socket teardown, deliberate socket drops,
//! and quirky `start_publication` frames.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use ssm_wire::payload::OpenDataChannelInput;
use ssm_wire::{ClientMessage, MessageType, PayloadType};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::agent::{now_millis, AgentEvent};
use crate::config::DropTrigger;
use crate::http::{Conn, RequestHead};
use crate::netem::{self, Impairment};
use crate::session::SessionShared;
use crate::stats::RateWindow;
use crate::Inner;

/// How long the gateway waits for OpenDataChannelInput after the upgrade.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// Queue between the agent and a connection's network emulation (frames). The agent
/// never drops frames when it is full: it keeps them in order and stops reading its
/// plugin's output until there is room again (like a TCP socket's backpressure).
pub(crate) const LINK_CAPACITY: usize = 8192;

/// Most frames the writer puts out per flush.
const WRITE_BATCH: u64 = 64;

/// What the network emulation hands to a connection's writer.
#[derive(Clone, Debug)]
pub(crate) enum WsOut {
    Frame(Bytes),
    /// Close the WebSocket (a newer connection of the same session took over).
    Close,
}

/// Control messages to a connection's writer, bypassing the emulated network.
enum Control {
    Close(CloseCode, &'static str),
}

/// Extracts the session id from `/v1/data-channel/<id>`.
pub(crate) fn session_id_from_path(path: &str) -> Option<&str> {
    path.strip_prefix("/v1/data-channel/")
        .filter(|id| !id.is_empty() && !id.contains('/'))
}

/// Whether a client frame is stream data or an ack (the kinds that may be impaired).
fn impairable(frame: &[u8]) -> bool {
    let mt = frame.get(4..36).unwrap_or(&[]);
    mt.starts_with(b"input_stream_data ") || mt.starts_with(b"acknowledge ")
}

/// The reported `start_publication` shape: PayloadLength = frame length little-endian,
/// zero digest, no payload (fixture 22).
fn quirk_start_publication(id: uuid::Uuid) -> Option<Bytes> {
    let mut msg = ClientMessage::new(
        MessageType::StartPublication,
        0,
        3,
        PayloadType::Undefined,
        Bytes::new(),
        now_millis(),
        id,
    );
    msg.payload_digest = [0; 32];
    msg.payload_length = u32::from_be_bytes(120u32.to_le_bytes());
    msg.encode().ok().map(Bytes::from)
}

/// Serves one WebSocket upgrade request for the data channel.
pub(crate) async fn serve<S>(mut conn: Conn<S>, head: RequestHead, inner: Arc<Inner>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let session = session_id_from_path(head.path()).and_then(|id| inner.session(id));
    let Some(session) = session else {
        let _ = conn
            .respond(404, "text/plain", &[], b"unknown session\n", true)
            .await;
        return;
    };
    session.update_stats(|s| s.upgrade_headers.push(head.headers.clone()));
    let Some(key) = head.header("sec-websocket-key") else {
        let _ = conn
            .respond(400, "text/plain", &[], b"missing Sec-WebSocket-Key\n", true)
            .await;
        return;
    };
    let accept = derive_accept_key(key.as_bytes());
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    if conn.stream.write_all(response.as_bytes()).await.is_err() {
        return;
    }
    if conn.stream.flush().await.is_err() {
        return;
    }
    let ws = WebSocketStream::from_partially_read(conn.stream, conn.buf, Role::Server, None).await;
    run_connection(ws, session, inner).await;
}

async fn run_connection<S>(ws: WebSocketStream<S>, session: Arc<SessionShared>, inner: Arc<Inner>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut stream) = ws.split();
    let mut rate = RateWindow::default();
    let count_client = |session: &SessionShared, rate: &mut RateWindow, len: usize| -> u32 {
        let in_window = rate.record(Instant::now().into_std());
        session.update_stats(|s| {
            s.client_frames += 1;
            s.client_bytes += len as u64;
            s.max_client_frames_per_sec = s.max_client_frames_per_sec.max(in_window);
        });
        in_window
    };

    // 1. OpenDataChannelInput. Control frames may come first: the official plugin starts
    //    its keepalive pinger (one ping at once) before it sends the token, so the ping
    //    often wins. tungstenite answers pings by itself.
    let first = tokio::time::timeout(OPEN_TIMEOUT, async {
        loop {
            match stream.next().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                other => return other,
            }
        }
    })
    .await;
    let text = match first {
        Ok(Some(Ok(Message::Text(t)))) => t,
        _ => {
            session.update_stats(|s| s.ws_rejected += 1);
            let _ = sink
                .send(close_message(
                    CloseCode::Policy,
                    "expected OpenDataChannelInput",
                ))
                .await;
            return;
        }
    };
    count_client(&session, &mut rate, text.len());
    let input = serde_json::from_str::<OpenDataChannelInput>(text.as_str());
    let token_ok = match &input {
        Ok(i) => {
            session.update_stats(|s| s.open_inputs.push(i.clone()));
            i.token_value == session.token()
        }
        Err(_) => false,
    };
    if !token_ok || session.is_closed() {
        session.update_stats(|s| s.ws_rejected += 1);
        let reason = if token_ok {
            "session closed"
        } else {
            "invalid token"
        };
        let _ = sink.send(close_message(CloseCode::Policy, reason)).await;
        return;
    }
    let conn_id = session.next_connection();
    session.update_stats(|s| s.ws_connections += 1);

    // 2. Writer: network emulation output and control messages to the socket.
    let cfg = &session.config;
    let imp = Impairment {
        latency: cfg.latency,
        loss: if cfg.impaired() { cfg.loss } else { 0.0 },
        duplicate: cfg.duplicate,
        reorder: cfg.reorder,
    };
    let (out_tx, mut out_rx) = mpsc::channel::<WsOut>(1024);
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<Control>(4);
    let writer_session = session.clone();
    let writer = tokio::spawn(async move {
        let mut out_open = true;
        loop {
            tokio::select! {
                biased;
                ctl = ctl_rx.recv() => {
                    if let Some(Control::Close(code, reason)) = ctl {
                        let _ = sink.send(close_message(code, reason)).await;
                    }
                    return;
                }
                out = out_rx.recv(), if out_open => match out {
                    Some(WsOut::Frame(b)) => {
                        // Everything already waiting goes out in one flush: a write per
                        // frame would make the simulator, not the plugin, the bottleneck.
                        let (mut frames, mut bytes) = (0u64, 0u64);
                        let mut next = Some(b);
                        let mut close = false;
                        while let Some(b) = next.take() {
                            frames += 1;
                            bytes += b.len() as u64;
                            if sink.feed(Message::Binary(b)).await.is_err() {
                                return;
                            }
                            if frames < WRITE_BATCH {
                                match out_rx.try_recv() {
                                    Ok(WsOut::Frame(b)) => next = Some(b),
                                    Ok(WsOut::Close) => close = true,
                                    Err(_) => {}
                                }
                            }
                        }
                        if sink.flush().await.is_err() {
                            return;
                        }
                        writer_session.update_stats(|s| {
                            s.agent_frames += frames;
                            s.agent_bytes += bytes;
                        });
                        if close {
                            let _ = sink.send(close_message(CloseCode::Away, "replaced by a newer connection")).await;
                            return;
                        }
                    }
                    Some(WsOut::Close) => {
                        let _ = sink.send(close_message(CloseCode::Away, "replaced by a newer connection")).await;
                        return;
                    }
                    None => {
                        // The session is over and channel_closed is out: keep the socket
                        // open until the client closes it (it exits on channel_closed).
                        let _ = sink.flush().await;
                        out_open = false;
                    }
                }
            }
        }
    });
    let a2c = netem::spawn_link(
        imp,
        session.rng(0x100 + u64::from(conn_id) * 2),
        Some(session.clone()),
        out_tx,
        LINK_CAPACITY,
    );
    let c2a = netem::spawn_link(
        imp,
        session.rng(0x101 + u64::from(conn_id) * 2),
        Some(session.clone()),
        session.events.clone(),
        LINK_CAPACITY,
    );

    if cfg.start_publication_quirk {
        let mut rng = session.rng(0x200 + u64::from(conn_id));
        for _ in 0..2 {
            let mut b = [0u8; 16];
            rand::RngCore::fill_bytes(&mut rng, &mut b);
            if let Some(f) =
                quirk_start_publication(uuid::Builder::from_random_bytes(b).into_uuid())
            {
                let _ = a2c.send((WsOut::Frame(f), false)).await;
            }
        }
    }

    if session
        .events
        .send(AgentEvent::Attach {
            conn: conn_id,
            link: a2c.clone(),
        })
        .await
        .is_err()
    {
        let _ = ctl_tx
            .send(Control::Close(CloseCode::Normal, "session ended"))
            .await;
        return;
    }
    drop(a2c);

    // 3. Reader.
    let drop_rule = cfg
        .drop_websocket_after
        .filter(|d| d.repeat || conn_id == 1);
    let drop_at = match drop_rule.map(|d| d.trigger) {
        Some(DropTrigger::Elapsed(d)) => Some(Instant::now() + d),
        _ => None,
    };
    let drop_after_frames = match drop_rule.map(|d| d.trigger) {
        Some(DropTrigger::ClientFrames(n)) => Some(n),
        _ => None,
    };
    let mut shutdown = inner.shutdown.clone();
    let mut frames_here = 0u64;
    let mut abrupt = false;
    loop {
        let msg = tokio::select! {
            msg = stream.next() => msg,
            _ = sleep_until_opt(drop_at), if drop_at.is_some() => {
                abrupt = true;
                break;
            }
            _ = shutdown.changed() => break,
        };
        let data = match msg {
            Some(Ok(Message::Binary(b))) => b,
            Some(Ok(Message::Text(t))) => Bytes::copy_from_slice(t.as_bytes()),
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
        };
        let in_window = count_client(&session, &mut rate, data.len());
        if let Some(cap) = cfg.pps_cap {
            if in_window > cap {
                session.update_stats(|s| s.pps_cap_violations += 1);
                let _ = ctl_tx
                    .send(Control::Close(CloseCode::Policy, "rate exceeded"))
                    .await;
                break;
            }
        }
        let imp_ok = impairable(&data);
        // Once the session is over nothing consumes client frames; they are discarded
        // and the socket stays open until the client leaves.
        let _ = c2a
            .send((
                AgentEvent::Frame {
                    conn: conn_id,
                    data,
                },
                imp_ok,
            ))
            .await;
        frames_here += 1;
        if drop_after_frames.is_some_and(|n| frames_here >= n) {
            abrupt = true;
            break;
        }
    }
    let _ = session
        .events
        .send(AgentEvent::Detach { conn: conn_id })
        .await;
    if abrupt {
        session.update_stats(|s| s.ws_dropped += 1);
        writer.abort();
        // Dropping both halves closes the TCP connection without a close frame.
        let _ = writer.await;
        drop(stream);
    } else {
        // Give the writer a moment to put a close frame out, then tear down.
        let _ = ctl_tx
            .send(Control::Close(CloseCode::Normal, "closing"))
            .await;
        let abort = writer.abort_handle();
        if tokio::time::timeout(Duration::from_secs(1), writer)
            .await
            .is_err()
        {
            abort.abort();
        }
    }
}

fn close_message(code: CloseCode, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
