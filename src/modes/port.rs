//! Port forwarding: a local TCP port (or unix socket) connected to a port the agent dials
//! (PROTOCOL.md §8.4, §8.5).
//!
//! - **mux** (agents after 3.0.196.0): every accepted connection is an smux v1 stream over
//!   the channel, so any number of connections run at once. Connections take turns for
//!   the channel one frame at a time (see [`run_mux`]), so a bulk upload on one connection
//!   cannot hold a keystroke on another behind it.
//! - **basic** (older agents): one connection at a time; when it ends the plugin sends
//!   `DisconnectToPort` and accepts the next.
//!
//! Printed lines match the official plugin (scripts parse `Port N opened`). SIGINT,
//! SIGTSTP and SIGQUIT end the session cleanly (TerminateSession flag, or the API for
//! agents up to 2.3.722.0 in basic mode); SIGTERM and SIGHUP do the same instead of
//! killing the process. The listener's unix socket file is removed on exit.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
#[cfg(unix)]
use std::path::PathBuf;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use ssm_wire::payload::Flag;
use ssm_wire::smux::{self, Mux, MuxConfig, MuxEvent, Role, StreamId};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};
use tracing::{debug, info, warn};

use super::{version_greater, Down, ModeContext, ModeOutcome, Up};
use crate::console::Console;
use crate::exit;

/// Bytes read from a local connection at a time (each connection holds at most two
/// reads' worth; the rest waits in the kernel).
const READ_SIZE: usize = 4096;
/// Reads from all local connections on their way to the mode (each connection has at
/// most one in flight, so this never holds one connection's bytes in front of another's).
const READ_EVENTS: usize = 64;
/// Chunks waiting to be written to one local connection.
const WRITE_QUEUE: usize = 256;
/// Mux output handed to the driver at once when pacing is off.
const UNPACED_CHUNK: usize = 8 * 1024;

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
    ModeOutcome {
        failed: Some(exit::SESSION_FAILED),
        ..ModeOutcome::default()
    }
}

/// What ended the accept loop.
enum Stop {
    /// The session closed (the driver closed `down`).
    Closed,
    /// A terminating signal.
    Signal,
}

/// SIGINT, SIGTSTP, SIGQUIT, SIGTERM and SIGHUP (Ctrl-C on Windows), handled from the
/// moment this is created: create it before printing anything a caller may answer with a
/// signal, or the signal's default action kills the process first.
struct TerminateSignals {
    #[cfg(unix)]
    sigs: Vec<tokio::signal::unix::Signal>,
}

impl TerminateSignals {
    fn new() -> TerminateSignals {
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
            TerminateSignals { sigs }
        }
        #[cfg(not(unix))]
        TerminateSignals {}
    }

    /// Waits for the next of them.
    async fn recv(self) {
        #[cfg(unix)]
        {
            let mut sigs = self.sigs;
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
}

async fn on_signal(ctx: &ModeContext, use_flag: bool) {
    let console: Console = ctx.console;
    console.status("Terminate signal received, exiting.\n");
    // The session now flushes for up to SSM_PLUGIN_FLUSH_TIMEOUT; a second signal means
    // the user does not want to wait.
    let again = TerminateSignals::new();
    tokio::spawn(async {
        again.recv().await;
        std::process::exit(i32::from(exit::OK));
    });
    if use_flag {
        // On the urgent queue: data still queued no longer matters, and an agent that
        // stopped acknowledging must not keep the flag (and the exit) waiting.
        let _ = ctx.urgent.send(Up::Flag(Flag::TerminateSession)).await;
        console.status(&format!(
            "\n\nExiting session with sessionId: {}.\n\n",
            ctx.session_id
        ));
        let _ = ctx.urgent.send(Up::Finish(exit::OK)).await;
    } else {
        let _ = ctx.urgent.send(Up::TerminateApi).await;
    }
}

/// One local connection's bytes waiting for their turn on the channel.
struct LocalStream {
    pending: VecDeque<Bytes>,
    pending_len: usize,
    /// Lets the stream's reader take one more read.
    reads: Arc<Semaphore>,
    /// A read was granted and has not come back yet.
    reading: bool,
    /// The local side reached EOF: close the stream once `pending` is out.
    eof: bool,
}

impl LocalStream {
    /// Takes up to `max` bytes from the front: a slice of one read when it has enough, so
    /// full frames cost no copy, else the ends of consecutive reads joined, so frames stay
    /// full whatever sizes the reads had.
    fn take(&mut self, max: usize) -> Option<Bytes> {
        let front = self.pending.front_mut()?;
        let piece = if front.len() > max {
            front.split_to(max)
        } else if front.len() == max || self.pending.len() == 1 {
            self.pending.pop_front()?
        } else {
            let mut joined = BytesMut::with_capacity(max.min(self.pending_len));
            while joined.len() < max {
                let Some(front) = self.pending.front_mut() else {
                    break;
                };
                let n = front.len().min(max - joined.len());
                joined.extend_from_slice(&front.split_to(n));
                if front.is_empty() {
                    self.pending.pop_front();
                }
            }
            joined.freeze()
        };
        self.pending_len -= piece.len();
        Some(piece)
    }

    /// Grants the reader another read once little is left, so a bulk stream always has
    /// its next piece ready while holding at most two reads' worth.
    fn refill(&mut self) {
        if !self.reading && !self.eof && self.pending_len < READ_SIZE {
            self.reading = true;
            self.reads.add_permits(1);
        }
    }
}

/// Sizes of the path from the local sockets to the channel.
#[derive(Clone, Copy, Debug)]
struct UpSizes {
    /// Most data bytes of one stream written to the mux in one turn.
    piece: usize,
    /// Most mux output handed to the driver at once.
    chunk: usize,
}

impl UpSizes {
    /// Paced, one turn is one channel frame: a keystroke waits behind at most one frame of
    /// each busy stream plus the frame or two already handed to the driver. Unpaced, the
    /// turn is a few frames, which costs microseconds and saves per-chunk overhead.
    fn new(ctx: &ModeContext) -> UpSizes {
        let chunk = if ctx.options.packets_per_second.is_some() {
            ctx.frame_data.max(smux::HEADER_LEN + 1)
        } else {
            UNPACED_CHUNK
        };
        UpSizes {
            piece: chunk - smux::HEADER_LEN,
            chunk,
        }
    }
}

/// Multiplexed port forwarding.
///
/// Upload scheduling: each local connection has its own small buffer, filled by its
/// reader one read at a time. Nothing goes into the mux until the driver has room for the
/// next chunk; then the next connection in turn (round robin) writes one piece. So bulk
/// data waits in the kernel's socket buffers and in its own connection's buffer, never
/// in a queue in front of another connection's bytes.
pub async fn run_mux(mut ctx: ModeContext) -> ModeOutcome {
    let signals = TerminateSignals::new();
    let (listener, name) = match bind(&ctx).await {
        Ok(l) => l,
        Err(e) => return fail(&ctx, &e).await,
    };
    ctx.console.status(&format!(
        "{name} opened for sessionId {}.\nWaiting for connections...\n",
        ctx.session_id
    ));
    let sizes = UpSizes::new(&ctx);
    debug!("upload path: {sizes:?}");
    let mut mux = Mux::new(Role::Client, MuxConfig::default());
    let (rd_tx, mut rd_rx) = mpsc::channel::<(StreamId, Option<Bytes>)>(READ_EVENTS);
    let mut writers: HashMap<StreamId, mpsc::Sender<Bytes>> = HashMap::new();
    let mut locals: HashMap<StreamId, LocalStream> = HashMap::new();
    // Streams with something to send (data, or the FIN after it), in turn order.
    let mut turns = Turns::default();
    let mut accepted_any = false;
    let signal = signals.recv();
    tokio::pin!(signal);
    // The two directions never wait on each other: mux output goes up only through a
    // reserved slot, and local reads only fill the connections' own buffers.
    let stop = loop {
        let up_wanted = mux.pending_output_len() > 0 || !turns.is_empty();
        tokio::select! {
            permit = ctx.up.reserve(), if up_wanted => {
                let Ok(permit) = permit else { break Stop::Closed };
                if mux.pending_output_len() == 0 {
                    next_turn(&mut mux, &mut locals, &mut turns, sizes.piece);
                }
                if let Some(out) = mux.poll_output_max(sizes.chunk) {
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
                let reads = Arc::new(Semaphore::new(1));
                locals.insert(sid, LocalStream {
                    pending: VecDeque::new(),
                    pending_len: 0,
                    reads: reads.clone(),
                    reading: true,
                    eof: false,
                });
                tokio::spawn(write_local(w, w_rx));
                tokio::spawn(read_local(sid, r, reads, rd_tx.clone()));
            }
            Some((sid, data)) = rd_rx.recv() => {
                let Some(local) = locals.get_mut(&sid) else { continue };
                local.reading = false;
                let was_idle = local.pending.is_empty() && !local.eof;
                match data {
                    Some(data) => {
                        local.pending_len += data.len();
                        local.pending.push_back(data);
                        local.refill();
                    }
                    // Local EOF or error: FIN after what is pending, like the official plugin.
                    None => local.eof = true,
                }
                if was_idle {
                    turns.fresh.push_back(sid);
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

/// The order in which streams with data take turns. A stream that had nothing waiting
/// when its data came (a keystroke, a request) goes before the streams that have been busy
/// all along (bulk transfers), as in fq_codel: its first piece waits for at most one
/// frame instead of one frame per busy stream.
#[derive(Default)]
struct Turns {
    fresh: VecDeque<StreamId>,
    busy: VecDeque<StreamId>,
}

impl Turns {
    fn is_empty(&self) -> bool {
        self.fresh.is_empty() && self.busy.is_empty()
    }

    fn pop(&mut self) -> Option<StreamId> {
        self.fresh.pop_front().or_else(|| self.busy.pop_front())
    }
}

/// Gives the next stream in turn one piece (or its FIN) in the mux; it goes to the back
/// of the busy line while it has more.
fn next_turn(
    mux: &mut Mux,
    locals: &mut HashMap<StreamId, LocalStream>,
    turns: &mut Turns,
    piece: usize,
) {
    let Some(sid) = turns.pop() else { return };
    let Some(local) = locals.get_mut(&sid) else {
        return;
    };
    if let Some(data) = local.take(piece) {
        match mux.write(sid, &data) {
            // The mux's output was drained before this turn, so it takes the whole piece.
            Ok(n) if n < data.len() => {
                local.pending_len += data.len() - n;
                local.pending.push_front(data.slice(n..));
            }
            Ok(_) => {}
            Err(e) => {
                debug!("stream {sid} write: {e}");
                local.pending.clear();
                local.pending_len = 0;
            }
        }
        local.refill();
    }
    if !local.pending.is_empty() {
        turns.busy.push_back(sid);
    } else if local.eof {
        if mux.is_open(sid) {
            let _ = mux.close(sid);
        }
        locals.remove(&sid);
    }
}

async fn read_local(
    sid: StreamId,
    mut r: BoxRead,
    reads: Arc<Semaphore>,
    tx: mpsc::Sender<(StreamId, Option<Bytes>)>,
) {
    let mut buf = BytesMut::with_capacity(READ_SIZE);
    loop {
        // One read per grant: the mode grants the next when this one is nearly sent.
        match reads.acquire().await {
            Ok(p) => p.forget(),
            Err(_) => return,
        }
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
    let signals = TerminateSignals::new();
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
    let signal = signals.recv();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn local(chunks: &[&[u8]]) -> LocalStream {
        let pending: VecDeque<Bytes> = chunks.iter().map(|c| Bytes::copy_from_slice(c)).collect();
        LocalStream {
            pending_len: pending.iter().map(Bytes::len).sum(),
            pending,
            reads: Arc::new(Semaphore::new(0)),
            reading: false,
            eof: false,
        }
    }

    /// What the agent's side of the mux makes of `out`: (stream, data) per PSH frame.
    fn frames(out: &[Bytes]) -> Vec<(StreamId, Vec<u8>)> {
        let mut server = Mux::new(Role::Server, MuxConfig::default());
        let mut got = Vec::new();
        for b in out {
            server.feed_bytes(b.clone()).expect("valid smux");
            while let Some(ev) = server.poll_event() {
                if let MuxEvent::Data(sid, d) = ev {
                    got.push((sid, d.to_vec()));
                }
            }
        }
        got
    }

    #[test]
    fn take_fills_pieces_across_reads() {
        // Reads of 700 and 700 bytes become a 1016-byte piece and the 384-byte rest,
        // not 700 + 316 + 384.
        let mut l = local(&[&[1u8; 700], &[2u8; 700]]);
        let a = l.take(1016).unwrap();
        assert_eq!(a.len(), 1016);
        assert_eq!(&a[..700], &[1u8; 700][..]);
        assert_eq!(&a[700..], &[2u8; 316][..]);
        let b = l.take(1016).unwrap();
        assert_eq!(b.len(), 384);
        assert_eq!(l.pending_len, 0);
        assert!(l.take(1016).is_none());
        // A long read is sliced without joining.
        let mut l = local(&[&[3u8; 2500]]);
        assert_eq!(l.take(1016).unwrap().len(), 1016);
        assert_eq!(l.take(1016).unwrap().len(), 1016);
        assert_eq!(l.take(1016).unwrap().len(), 468);
    }

    #[test]
    fn refill_grants_one_read_while_little_is_pending() {
        let mut l = local(&[&[0u8; READ_SIZE]]);
        l.refill();
        assert_eq!(
            l.reads.available_permits(),
            0,
            "a full read is still pending"
        );
        l.take(READ_SIZE / 2);
        l.refill();
        l.refill();
        assert_eq!(l.reads.available_permits(), 1, "exactly one read granted");
        assert!(l.reading);
    }

    /// A stream that was idle goes before streams that have been busy, so a keystroke
    /// waits behind at most one piece of a bulk upload however many bulk streams run.
    #[test]
    fn fresh_stream_goes_before_busy_ones() {
        let mut mux = Mux::new(Role::Client, MuxConfig::default());
        let mut locals = HashMap::new();
        let mut turns = Turns::default();
        let mut out = Vec::new();
        let bulk: Vec<StreamId> = (0..3).map(|_| mux.open_stream().unwrap()).collect();
        for &sid in &bulk {
            locals.insert(sid, local(&[&[0xb0u8; 8192]]));
            turns.busy.push_back(sid);
        }
        out.extend(mux.poll_output());
        // Two turns of bulk, then a keystroke arrives on a new stream.
        for _ in 0..2 {
            next_turn(&mut mux, &mut locals, &mut turns, 1016);
            out.extend(mux.poll_output());
        }
        let key = mux.open_stream().unwrap();
        out.extend(mux.poll_output());
        locals.insert(key, local(&[b"k"]));
        turns.fresh.push_back(key);
        next_turn(&mut mux, &mut locals, &mut turns, 1016);
        out.extend(mux.poll_output());
        // The keystroke stream drained and left the turns; the bulk streams rotate on.
        next_turn(&mut mux, &mut locals, &mut turns, 1016);
        out.extend(mux.poll_output());
        assert!(locals[&key].pending.is_empty());
        assert!(
            !turns.fresh.contains(&key) && !turns.busy.contains(&key),
            "a drained stream leaves the turns"
        );
        let got = frames(&out);
        assert_eq!(got.len(), 4);
        assert_eq!(got[0].0, bulk[0]);
        assert_eq!(got[1].0, bulk[1]);
        assert_eq!(
            got[2],
            (key, b"k".to_vec()),
            "the keystroke is the very next frame"
        );
        assert_eq!(got[3].0, bulk[2]);
        assert_eq!(got[3].1.len(), 1016);
    }

    /// EOF closes the stream only after its pending data, and removes it.
    #[test]
    fn eof_sends_fin_after_pending_data() {
        let mut mux = Mux::new(Role::Client, MuxConfig::default());
        let sid = mux.open_stream().unwrap();
        let mut out = vec![mux.poll_output().unwrap()];
        let mut locals = HashMap::new();
        let mut l = local(&[&[7u8; 1500]]);
        l.eof = true;
        locals.insert(sid, l);
        let mut turns = Turns::default();
        turns.fresh.push_back(sid);
        while !turns.is_empty() {
            next_turn(&mut mux, &mut locals, &mut turns, 1016);
            out.extend(mux.poll_output());
        }
        assert!(locals.is_empty());
        assert!(!mux.is_open(sid));
        let mut server = Mux::new(Role::Server, MuxConfig::default());
        let mut data = Vec::new();
        let mut closed = false;
        for b in out {
            server.feed_bytes(b).unwrap();
            while let Some(ev) = server.poll_event() {
                match ev {
                    MuxEvent::Data(_, d) => {
                        assert!(!closed, "data after FIN");
                        data.extend_from_slice(&d);
                    }
                    MuxEvent::Closed(_) => closed = true,
                    MuxEvent::Opened(_) => {}
                }
            }
        }
        assert_eq!(data, vec![7u8; 1500]);
        assert!(closed);
    }
}
