//! Port forwarding: a local TCP port (or unix socket) connected to a port the agent dials
//! (PROTOCOL.md §8.4, §8.5).
//!
//! - **mux** (agents after 3.0.196.0): every accepted connection is an smux v1 stream over
//!   the channel, so any number of connections run at once. Reads from the local sockets
//!   pass through one small fair queue (tokio's bounded channel serves waiting senders in
//!   order), so a bulk upload on one connection cannot starve a keystroke on another.
//! - **basic** (older agents): one connection at a time; when it ends the plugin sends
//!   `DisconnectToPort` and accepts the next.
//!
//! Printed lines match the official plugin (scripts parse `Port N opened`). SIGINT,
//! SIGTSTP and SIGQUIT end the session cleanly (TerminateSession flag, or the API for
//! agents up to 2.3.722.0 in basic mode); SIGTERM and SIGHUP do the same instead of
//! killing the process. The listener's unix socket file is removed on exit.

use std::collections::HashMap;
use std::net::SocketAddr;
#[cfg(unix)]
use std::path::PathBuf;

use bytes::{Bytes, BytesMut};
use ssm_wire::payload::Flag;
use ssm_wire::smux::{Mux, MuxConfig, MuxEvent, Role, StreamId};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{version_greater, Down, ModeContext, ModeOutcome, Up};
use crate::console::Console;
use crate::exit;

/// Bytes read from a local connection at a time. Small enough that one bulk stream's
/// chunk ahead of an interactive byte costs little latency at the packet budget.
const READ_SIZE: usize = 4096;
/// Chunks from all local connections waiting for the channel.
const READ_QUEUE: usize = 2;
/// Chunks waiting to be written to one local connection.
const WRITE_QUEUE: usize = 256;
/// Mux output held before local reads pause.
const MUX_OUTPUT_HIGH: usize = 4 * 1024;
/// Largest piece of mux output handed to the driver at once. Everything queued between a
/// local socket and the pacer is what a keystroke waits behind during a bulk upload, so
/// these queues are a few KiB, not more (≈ 1 ms of data each at the packet budget's rate
/// would be ideal; 4 KiB keeps per-chunk overhead low when pacing is off).
const UP_CHUNK: usize = 4 * 1024;

type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

enum Listener {
    Tcp(TcpListener),
    #[cfg(unix)]
    Unix(tokio::net::UnixListener, PathBuf),
}

impl Listener {
    async fn accept(&self) -> std::io::Result<(BoxRead, BoxWrite)> {
        match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                let _ = s.set_nodelay(true);
                debug!("accepted {peer}");
                let (r, w) = s.into_split();
                Ok((Box::new(r), Box::new(w)))
            }
            #[cfg(unix)]
            Listener::Unix(l, _) => {
                let (s, _) = l.accept().await?;
                let (r, w) = s.into_split();
                Ok((Box::new(r), Box::new(w)))
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        #[cfg(unix)]
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Binds the listener the session's properties ask for and returns it with the text
/// naming it (`Port N` or `Unix socket PATH`).
async fn bind(ctx: &ModeContext) -> Result<(Listener, String), String> {
    let info = &ctx.info;
    if info.property("localConnectionType") == Some("unix") {
        let path = info.property("localUnixSocket").unwrap_or_default();
        if path.is_empty() {
            return Err("localConnectionType is unix but localUnixSocket is empty".to_owned());
        }
        #[cfg(unix)]
        {
            let l = tokio::net::UnixListener::bind(path)
                .map_err(|e| format!("listen unix {path}: bind: {e}"))?;
            return Ok((
                Listener::Unix(l, PathBuf::from(path)),
                format!("Unix socket {path}"),
            ));
        }
        #[cfg(not(unix))]
        return Err(format!(
            "listen unix {path}: unix sockets are not supported on this platform"
        ));
    }
    let port: u16 = match info.property("localPortNumber").unwrap_or_default() {
        "" => 0,
        p => p
            .parse()
            .map_err(|_| format!("invalid localPortNumber {p:?}"))?,
    };
    let addr = SocketAddr::new(ctx.options.listen_address, port);
    let l = TcpListener::bind(addr)
        .await
        .map_err(|e| format!("listen tcp {addr}: bind: {}", io_text(&e)))?;
    let port = l.local_addr().map(|a| a.port()).unwrap_or(port);
    Ok((Listener::Tcp(l), format!("Port {port}")))
}

fn io_text(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => "address already in use".to_owned(),
        std::io::ErrorKind::PermissionDenied => "permission denied".to_owned(),
        _ => e.to_string(),
    }
}

/// Reports a start failure, asks the agent to end the session, and finishes.
async fn fail(ctx: &ModeContext, why: &str) -> ModeOutcome {
    ctx.console
        .error(&format!("Cannot perform start session: {why}"));
    let _ = ctx.up.send(Up::Flag(Flag::TerminateSession)).await;
    let _ = ctx.up.send(Up::Finish(exit::SESSION_FAILED)).await;
    ModeOutcome::default()
}

/// What ended the accept loop.
enum Stop {
    /// The session closed (the driver closed `down`).
    Closed,
    /// A terminating signal.
    Signal,
}

/// Waits for SIGINT, SIGTSTP, SIGQUIT, SIGTERM or SIGHUP (Ctrl-C on Windows).
async fn terminate_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let kinds = [
            SignalKind::interrupt(),
            SignalKind::from_raw(libc::SIGTSTP),
            SignalKind::quit(),
            SignalKind::terminate(),
            SignalKind::hangup(),
        ];
        let mut sigs = Vec::new();
        for k in kinds {
            match signal(k) {
                Ok(s) => sigs.push(s),
                Err(e) => warn!("cannot handle signal {k:?}: {e}"),
            }
        }
        if sigs.is_empty() {
            return std::future::pending().await;
        }
        let waits = sigs.iter_mut().map(|s| Box::pin(s.recv()));
        futures_util::future::select_all(waits).await;
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn on_signal(ctx: &ModeContext, use_flag: bool) {
    let console: Console = ctx.console;
    console.status("Terminate signal received, exiting.\n");
    // The session now flushes for up to SSM_PLUGIN_FLUSH_TIMEOUT; a second signal means
    // the user does not want to wait.
    tokio::spawn(async {
        terminate_signal().await;
        std::process::exit(i32::from(exit::OK));
    });
    if use_flag {
        let _ = ctx.up.send(Up::Flag(Flag::TerminateSession)).await;
        console.status(&format!(
            "\n\nExiting session with sessionId: {}.\n\n",
            ctx.session_id
        ));
        let _ = ctx.up.send(Up::Finish(exit::OK)).await;
    } else {
        let _ = ctx.up.send(Up::TerminateApi).await;
    }
}

/// Multiplexed port forwarding.
pub async fn run_mux(mut ctx: ModeContext) -> ModeOutcome {
    let (listener, name) = match bind(&ctx).await {
        Ok(l) => l,
        Err(e) => return fail(&ctx, &e).await,
    };
    ctx.console.status(&format!(
        "{name} opened for sessionId {}.\nWaiting for connections...\n",
        ctx.session_id
    ));
    let mut mux = Mux::new(Role::Client, MuxConfig::default());
    let (rd_tx, mut rd_rx) = mpsc::channel::<(StreamId, Option<Bytes>)>(READ_QUEUE);
    let mut writers: HashMap<StreamId, mpsc::Sender<Bytes>> = HashMap::new();
    // A local chunk the mux could not take yet (its output queue was full).
    let mut carry: Option<(StreamId, Bytes)> = None;
    let mut accepted_any = false;
    let signal = terminate_signal();
    tokio::pin!(signal);
    // The two directions never wait on each other: mux output goes up only through a
    // reserved slot, and local reads pause while the mux holds enough output.
    let stop = loop {
        let out_pending = mux.pending_output_len() > 0;
        let take_local = carry.is_none() && mux.pending_output_len() < MUX_OUTPUT_HIGH;
        tokio::select! {
            permit = ctx.up.reserve(), if out_pending => {
                let Ok(permit) = permit else { break Stop::Closed };
                if let Some(out) = mux.poll_output_max(UP_CHUNK) {
                    permit.send(Up::Data(out));
                }
            }
            accepted = listener.accept() => {
                let (r, w) = match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        warn!("accept failed: {e}");
                        continue;
                    }
                };
                if !accepted_any {
                    accepted_any = true;
                    ctx.console.status(&format!(
                        "\nConnection accepted for session [{}]\n",
                        ctx.session_id
                    ));
                }
                let sid = match mux.open_stream() {
                    Ok(s) => s,
                    Err(e) => {
                        warn!("cannot open a stream: {e}");
                        continue;
                    }
                };
                info!("connection opened as stream {sid}");
                let (w_tx, w_rx) = mpsc::channel(WRITE_QUEUE);
                writers.insert(sid, w_tx);
                tokio::spawn(write_local(w, w_rx));
                tokio::spawn(read_local(sid, r, rd_tx.clone()));
            }
            Some((sid, data)) = rd_rx.recv(), if take_local => match data {
                Some(data) => carry = write_stream(&mut mux, sid, data),
                None => {
                    // Local EOF or error: close the stream (FIN) like the official plugin.
                    if mux.is_open(sid) {
                        let _ = mux.close(sid);
                    }
                }
            },
            _ = std::future::ready(()), if carry.is_some() && mux.pending_output_len() < MUX_OUTPUT_HIGH => {
                if let Some((sid, data)) = carry.take() {
                    carry = write_stream(&mut mux, sid, data);
                }
            }
            down = ctx.down.recv() => {
                let Some(down) = down else { break Stop::Closed };
                match down {
                    Down::Output(b) => {
                        if let Err(e) = mux.feed_bytes(b) {
                            ctx.console.error(&format!("Cannot perform start session: port forwarding stream error: {e}"));
                            let _ = ctx.up.send(Up::Flag(Flag::TerminateSession)).await;
                            let _ = ctx.up.send(Up::Finish(exit::SESSION_FAILED)).await;
                            break Stop::Closed;
                        }
                        while let Some(ev) = mux.poll_event() {
                            match ev {
                                MuxEvent::Data(sid, data) => {
                                    // smux v1 has no per-stream window: a local reader that
                                    // stops reading holds back every stream, as with the
                                    // official plugin, but never the upload direction.
                                    if let Some(w) = writers.get(&sid) {
                                        if w.send(data).await.is_err() {
                                            writers.remove(&sid);
                                        }
                                    }
                                }
                                MuxEvent::Closed(sid) => {
                                    // Dropping the sender ends the writer after it drains.
                                    writers.remove(&sid);
                                }
                                MuxEvent::Opened(sid) => debug!("agent opened stream {sid}; ignored"),
                            }
                        }
                    }
                    Down::Flag(Flag::ConnectToPortError) => {
                        ctx.console.status("\nConnection to destination port failed, check SSM Agent logs.\n");
                    }
                    Down::Flag(f) => debug!("flag {f:?} ignored"),
                    Down::StdErr(b) => warn!("agent StdErr in a port session: {}", String::from_utf8_lossy(&b)),
                    Down::ExitCode(c) => debug!("exit code {c} in a port session"),
                }
            }
            _ = &mut signal => break Stop::Signal,
        }
    };
    if let Stop::Signal = stop {
        on_signal(&ctx, true).await;
    }
    drop(listener);
    ModeOutcome::default()
}

/// Queues a local chunk on its stream; returns what the mux could not take yet.
fn write_stream(mux: &mut Mux, sid: StreamId, data: Bytes) -> Option<(StreamId, Bytes)> {
    match mux.write(sid, &data) {
        Ok(n) if n < data.len() => Some((sid, data.slice(n..))),
        Ok(_) => None,
        Err(e) => {
            debug!("stream {sid} write: {e}");
            None
        }
    }
}

async fn read_local(sid: StreamId, mut r: BoxRead, tx: mpsc::Sender<(StreamId, Option<Bytes>)>) {
    let mut buf = BytesMut::with_capacity(READ_SIZE);
    loop {
        buf.reserve(READ_SIZE);
        match r.read_buf(&mut buf).await {
            Ok(0) => break,
            Ok(_) => {
                if tx.send((sid, Some(buf.split().freeze()))).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                debug!("stream {sid}: local read: {e}");
                break;
            }
        }
    }
    let _ = tx.send((sid, None)).await;
}

async fn write_local(mut w: BoxWrite, mut rx: mpsc::Receiver<Bytes>) {
    while let Some(b) = rx.recv().await {
        if let Err(e) = w.write_all(&b).await {
            debug!("local write: {e}");
            return;
        }
    }
    // The remote side closed the stream: close ours too.
    let _ = w.shutdown().await;
}

/// Single-connection port forwarding for old agents.
pub async fn run_basic(mut ctx: ModeContext) -> ModeOutcome {
    let (listener, name) = match bind(&ctx).await {
        Ok(l) => l,
        Err(e) => return fail(&ctx, &e).await,
    };
    ctx.console.status(&format!(
        "{name} opened for sessionId {}.\n",
        ctx.session_id
    ));
    // Old agents (≤ 2.3.722.0) do not understand the TerminateSession flag.
    let use_flag = version_greater(&ctx.info.agent_version, "2.3.722.0");
    let mut accepted_any = false;
    let signal = terminate_signal();
    tokio::pin!(signal);
    'accept: loop {
        let (mut r, w) = tokio::select! {
            c = listener.accept() => match c {
                Ok(c) => c,
                Err(e) => {
                    warn!("accept failed: {e}");
                    continue;
                }
            },
            d = ctx.down.recv() => match d {
                None => break 'accept,
                Some(Down::Output(b)) => {
                    debug!("{} bytes from the agent with no local connection; dropped", b.len());
                    continue;
                }
                Some(other) => {
                    debug!("{other:?} with no local connection");
                    continue;
                }
            },
            _ = &mut signal => {
                on_signal(&ctx, use_flag).await;
                break 'accept;
            }
        };
        if !accepted_any {
            accepted_any = true;
            ctx.console.status(&format!(
                "Connection accepted for session {}.\n",
                ctx.session_id
            ));
        }
        let (w_tx, w_rx) = mpsc::channel(WRITE_QUEUE);
        let writer = tokio::spawn(write_local(w, w_rx));
        let mut buf = BytesMut::with_capacity(READ_SIZE);
        loop {
            buf.reserve(READ_SIZE);
            tokio::select! {
                n = r.read_buf(&mut buf) => match n {
                    Ok(0) | Err(_) => {
                        // The local client went away: the agent closes its side and
                        // redials on the next data.
                        let _ = ctx.up.send(Up::Flag(Flag::DisconnectToPort)).await;
                        break;
                    }
                    Ok(_) => {
                        if ctx.up.send(Up::Data(buf.split().freeze())).await.is_err() {
                            break 'accept;
                        }
                    }
                },
                d = ctx.down.recv() => match d {
                    None => {
                        drop(w_tx);
                        let _ = writer.await;
                        break 'accept;
                    }
                    Some(Down::Output(b)) => {
                        if w_tx.send(b).await.is_err() {
                            let _ = ctx.up.send(Up::Flag(Flag::DisconnectToPort)).await;
                            break;
                        }
                    }
                    Some(other) => debug!("{other:?} ignored in basic port mode"),
                },
                _ = &mut signal => {
                    on_signal(&ctx, use_flag).await;
                    break 'accept;
                }
            }
        }
        drop(w_tx);
        writer.abort();
    }
    drop(listener);
    ModeOutcome::default()
}
