//! `Port` with `type: LocalPortForwarding` (`AWS-StartPortForwardingSession`,
//! `...ToRemoteHost`): basic or mux mode.
//!
//! Mode selection like the agent: **mux** when the agent version is above 3.0.196.0 and
//! the client's ClientVersion is at least 1.1.70, else **basic**.
//!
//! - Basic: one target connection, dialled at start. Output bytes are written to it and
//!   its bytes come back as Output. Flag DisconnectToPort closes it; the next Output
//!   redials. The target closing also just drops the connection until the next Output.
//! - Mux: an smux v1 server over the Output byte stream. Each client SYN dials the target
//!   (failure: Flag ConnectToPortError and FIN); bytes are copied both ways; when either
//!   direction ends, the target connection is closed and the stream FINed (as the agent's
//!   copy loops do).
//!
//! In both modes Flag TerminateSession ends the session.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use ssm_wire::payload::Flag;
use ssm_wire::smux::{Mux, MuxConfig, MuxEvent, Role, StreamId};
use ssm_wire::PayloadType;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc;

use super::{dial, pump, AbortOnDrop, PluginContext, PluginEvent, CHUNK};
use crate::version;

/// Agent versions above this one speak smux (the client checks this too).
const MUX_AGENT_VERSION: &str = "3.0.196.0";
/// Clients from this version on speak smux.
const MUX_CLIENT_VERSION: &str = "1.1.70";
/// How long a dial to the target may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) async fn run(ctx: PluginContext, host: String, port: String) {
    let mux = version::greater(&ctx.session.config.agent_version, MUX_AGENT_VERSION)
        && ctx
            .client_version
            .as_deref()
            .is_some_and(|v| version::at_least(v, MUX_CLIENT_VERSION));
    let mode = if mux { "mux" } else { "basic" };
    ctx.session
        .update_stats(|s| s.port_mode = Some(mode.to_owned()));
    if mux {
        run_mux(ctx, host, port).await
    } else {
        run_basic(ctx, host, port).await
    }
}

async fn dial_timeout(host: &str, port: &str) -> std::io::Result<tokio::net::TcpStream> {
    match tokio::time::timeout(DIAL_TIMEOUT, dial(host, port)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "dial timed out",
        )),
    }
}

// ---- basic ---------------------------------------------------------------------------

struct BasicConn {
    generation: u64,
    writer: OwnedWriteHalf,
    _reader: AbortOnDrop<()>,
}

async fn run_basic(mut ctx: PluginContext, host: String, port: String) {
    let (ended_tx, mut ended_rx) = mpsc::channel::<u64>(4);
    let mut generation = 0u64;
    let connect = |generation: u64, ctx: &PluginContext| {
        let host = host.clone();
        let port = port.clone();
        let out = ctx.output.clone();
        let ended = ended_tx.clone();
        let delay = ctx.chunk_delay();
        async move {
            let stream = dial_timeout(&host, &port).await?;
            let (rd, writer) = stream.into_split();
            let reader = tokio::spawn(async move {
                if pump(rd, PayloadType::Output, &out, delay).await.is_ok() {
                    let _ = ended.send(generation).await;
                }
            });
            Ok::<_, std::io::Error>(BasicConn {
                generation,
                writer,
                _reader: AbortOnDrop(reader),
            })
        }
    };
    let mut conn = match connect(generation, &ctx).await {
        Ok(c) => Some(c),
        Err(e) => {
            let _ = ctx
                .output
                .send(PluginEvent::Exit(format!(
                    "Unable to connect to specified port: {e}"
                )))
                .await;
            return;
        }
    };
    loop {
        tokio::select! {
            input = ctx.input.recv() => {
                let Some(input) = input else { return };
                match input.payload_type {
                    PayloadType::Output => {
                        if conn.is_none() {
                            generation += 1;
                            match connect(generation, &ctx).await {
                                Ok(c) => conn = Some(c),
                                Err(e) => {
                                    let _ = ctx.output.send(PluginEvent::Exit(format!(
                                        "Unable to connect to specified port: {e}"
                                    ))).await;
                                    return;
                                }
                            }
                        }
                        if let Some(c) = conn.as_mut() {
                            if c.writer.write_all(&input.data).await.is_err() {
                                conn = None;
                            }
                        }
                    }
                    PayloadType::Flag => match Flag::decode(&input.data) {
                        Some(Flag::DisconnectToPort) => conn = None,
                        Some(Flag::TerminateSession) => break,
                        _ => {}
                    },
                    _ => {}
                }
            }
            Some(ended) = ended_rx.recv() => {
                if conn.as_ref().is_some_and(|c| c.generation == ended) {
                    conn = None;
                }
            }
        }
    }
    let _ = ctx.output.send(PluginEvent::Exit(String::new())).await;
}

// ---- mux -----------------------------------------------------------------------------

enum StreamEvent {
    DialFailed(StreamId),
    Data(StreamId, Bytes),
    /// The target connection is closed (either direction ended).
    Done(StreamId),
}

struct StreamHandle {
    /// Data for the target; `None` once the client sent FIN.
    tx: Option<mpsc::Sender<Bytes>>,
    _task: AbortOnDrop<()>,
}

/// Bytes read from a target connection at a time (Go's `io.Copy` buffer, as the agent's
/// copy loop uses): smux then frames them (≤ 32 KiB per frame) into one byte stream.
const TARGET_READ: usize = 32 * 1024;
/// Queue of stream events to the mux loop (bounds what target readers buffer).
const STREAM_EVENTS: usize = 32;

async fn stream_task(
    sid: StreamId,
    host: String,
    port: String,
    mut rx: mpsc::Receiver<Bytes>,
    events: mpsc::Sender<StreamEvent>,
) {
    let stream = match dial_timeout(&host, &port).await {
        Ok(s) => s,
        Err(_) => {
            let _ = events.send(StreamEvent::DialFailed(sid)).await;
            return;
        }
    };
    let (mut rd, mut wr) = stream.into_split();
    let reader_events = events.clone();
    let reader = async move {
        let mut buf = vec![0u8; TARGET_READ];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let data = Bytes::copy_from_slice(&buf[..n]);
                    if reader_events
                        .send(StreamEvent::Data(sid, data))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some(b) = rx.recv().await {
            if wr.write_all(&b).await.is_err() {
                return;
            }
        }
    };
    // Either direction ending closes the connection (dropping both halves) and the stream.
    tokio::select! {
        _ = reader => {}
        _ = writer => {}
    }
    let _ = events.send(StreamEvent::Done(sid)).await;
}

/// The agent side of the smux session: the smux server, its streams, and the "pipe" its
/// output goes through.
///
/// The real agent's smux server writes into a unix socket and a reader loop takes at most
/// 1024 bytes per read from it (sleeping 1 ms after each), so Output messages are cut from
/// one merged byte stream, not per smux frame. Here the mux's output buffer is that pipe:
/// [`MuxAgent::pump_output`] takes every stream event already queued before it cuts, sends
/// only full 1024-byte chunks while more is coming, and the tail once nothing is queued.
struct MuxAgent {
    mux: Mux,
    streams: HashMap<StreamId, StreamHandle>,
    host: String,
    port: String,
    ev_tx: mpsc::Sender<StreamEvent>,
    delay: Duration,
}

impl MuxAgent {
    /// Applies one stream event. `Err` when the agent is gone.
    async fn on_stream_event(&mut self, ev: StreamEvent, ctx: &PluginContext) -> Result<(), ()> {
        match ev {
            StreamEvent::DialFailed(sid) => {
                // Keep the byte stream's order: what is pending goes out before the flag.
                self.send_all(ctx).await?;
                let flag = Bytes::copy_from_slice(&Flag::ConnectToPortError.encode());
                ctx.output
                    .send(PluginEvent::Data(PayloadType::Flag, flag))
                    .await
                    .map_err(|_| ())?;
                if self.mux.is_open(sid) {
                    let _ = self.mux.close(sid);
                }
                self.streams.remove(&sid);
            }
            StreamEvent::Data(sid, data) => {
                let mut rest = &data[..];
                while !rest.is_empty() && self.mux.is_open(sid) {
                    match self.mux.write(sid, rest) {
                        Ok(0) => self.send_full(ctx).await?,
                        Ok(n) => rest = &rest[n..],
                        Err(_) => break,
                    }
                }
            }
            StreamEvent::Done(sid) => {
                if self.mux.is_open(sid) {
                    let _ = self.mux.close(sid);
                }
                self.streams.remove(&sid);
            }
        }
        Ok(())
    }

    /// Sends pending output as 1024-byte messages, topping the pipe up from stream events
    /// that are already queued, and the remainder once none is.
    async fn pump_output(
        &mut self,
        ev_rx: &mut mpsc::Receiver<StreamEvent>,
        ctx: &PluginContext,
    ) -> Result<(), ()> {
        loop {
            while self.mux.pending_output_len() < CHUNK {
                match ev_rx.try_recv() {
                    Ok(ev) => self.on_stream_event(ev, ctx).await?,
                    Err(_) => break,
                }
            }
            match self.mux.pending_output_len() {
                0 => return Ok(()),
                n if n >= CHUNK => self.send_chunk(ctx).await?,
                _ => {
                    // A partial read: give producers that are mid-write a chance first.
                    tokio::task::yield_now().await;
                    if ev_rx.is_empty() {
                        self.send_chunk(ctx).await?;
                        if ev_rx.is_empty() {
                            return Ok(());
                        }
                    }
                }
            }
        }
    }

    /// Sends every full 1024-byte chunk pending.
    async fn send_full(&mut self, ctx: &PluginContext) -> Result<(), ()> {
        while self.mux.pending_output_len() >= CHUNK {
            self.send_chunk(ctx).await?;
        }
        Ok(())
    }

    /// Sends everything pending.
    async fn send_all(&mut self, ctx: &PluginContext) -> Result<(), ()> {
        while self.mux.pending_output_len() > 0 {
            self.send_chunk(ctx).await?;
        }
        Ok(())
    }

    /// One read of the pipe: at most 1024 bytes become one Output message.
    async fn send_chunk(&mut self, ctx: &PluginContext) -> Result<(), ()> {
        let Some(chunk) = self.mux.poll_output_max(CHUNK) else {
            return Ok(());
        };
        ctx.output
            .send(PluginEvent::Data(PayloadType::Output, chunk))
            .await
            .map_err(|_| ())?;
        super::agent_pause(self.delay).await;
        Ok(())
    }
}

async fn run_mux(mut ctx: PluginContext, host: String, port: String) {
    let (ev_tx, mut ev_rx) = mpsc::channel::<StreamEvent>(STREAM_EVENTS);
    let mut agent = MuxAgent {
        mux: Mux::new(Role::Server, MuxConfig::default()),
        streams: HashMap::new(),
        host,
        port,
        ev_tx,
        delay: ctx.chunk_delay(),
    };
    let exit_output = loop {
        tokio::select! {
            input = ctx.input.recv() => {
                let Some(input) = input else { return };
                match input.payload_type {
                    PayloadType::Output => {
                        if let Err(e) = agent.mux.feed_bytes(input.data) {
                            break format!("smux protocol error: {e}");
                        }
                        while let Some(ev) = agent.mux.poll_event() {
                            match ev {
                                MuxEvent::Opened(sid) => {
                                    let (tx, rx) = mpsc::channel(64);
                                    let task = tokio::spawn(stream_task(
                                        sid,
                                        agent.host.clone(),
                                        agent.port.clone(),
                                        rx,
                                        agent.ev_tx.clone(),
                                    ));
                                    agent.streams.insert(sid, StreamHandle { tx: Some(tx), _task: AbortOnDrop(task) });
                                }
                                MuxEvent::Data(sid, data) => {
                                    let tx = agent.streams.get(&sid).and_then(|h| h.tx.clone());
                                    if let Some(tx) = tx {
                                        // smux v1 has no per-stream window: a slow target
                                        // stalls the whole session, as with the agent.
                                        let _ = tx.send(data).await;
                                    }
                                }
                                MuxEvent::Closed(sid) => {
                                    if let Some(h) = agent.streams.get_mut(&sid) {
                                        h.tx = None;
                                    }
                                }
                            }
                        }
                    }
                    PayloadType::Flag
                        if Flag::decode(&input.data) == Some(Flag::TerminateSession) =>
                    {
                        break String::new();
                    }
                    _ => {}
                }
            }
            Some(ev) = ev_rx.recv() => {
                if agent.on_stream_event(ev, &ctx).await.is_err() {
                    return;
                }
            }
        }
        if agent.pump_output(&mut ev_rx, &ctx).await.is_err() {
            return;
        }
    };
    let _ = agent.send_all(&ctx).await;
    let _ = ctx.output.send(PluginEvent::Exit(exit_output)).await;
}
