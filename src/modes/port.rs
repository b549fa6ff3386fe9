//! Port forwarding: a local TCP port (or unix socket) connected to a port the agent dials
//! (PROTOCOL.md §8.4, §8.5).
//!
//! - **mux** (agents after 3.0.196.0): every accepted connection is an smux v1 stream over
//!   the channel, so any number of connections run at once. The protocol and scheduling
//!   live in [`ssm_wire::port::PortSession`] (turn order, read grants, download bounds);
//!   this module is its I/O shell (see [`run_mux`]).
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
use std::time::Duration;

use ssm_wire::payload::Flag;
use ssm_wire::port::{BasicPortSession, BasicTransmit, ConnId, PortConfig, PortEvent, PortSession};
use ssm_wire::smux;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::local::{BoxRead, BoxWrite, Conn, LocalEvent};
use super::{basic_port_uses_terminate_flag, Down, ModeContext, ModeOutcome, Up};
use crate::console::Console;
use crate::exit;

/// Bytes read from a local connection at a time (each connection holds at most two
/// reads' worth; the rest waits in the kernel).
const READ_SIZE: usize = 4096;
/// Mux output handed to the driver at once when pacing is off.
const UNPACED_CHUNK: usize = 8 * 1024;

enum Listener {
    Tcp(TcpListener),
    #[cfg(unix)]
    Unix(tokio::net::UnixListener, PathBuf),
    /// Connections accepted by someone else (the SOCKS proxy) and handed over.
    Handed(Handoff),
}

/// Local connections handed to a mux port session instead of a listener of its own, and
/// where it says that the agent could not reach the destination (`ConnectToPortError`:
/// the flag names no stream; every stream of the session goes to one destination).
pub struct Handoff {
    pub conns: mpsc::Receiver<(BoxRead, BoxWrite)>,
    pub refused: tokio::sync::broadcast::Sender<()>,
}

impl Listener {
    /// The next connection; `Ok(None)` once a handed-over source has closed (nothing
    /// more will come).
    async fn accept(&mut self) -> std::io::Result<Option<(BoxRead, BoxWrite)>> {
        match self {
            Listener::Handed(h) => Ok(h.conns.recv().await),
            Listener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                let _ = s.set_nodelay(true);
                debug!("accepted {peer}");
                let (r, w) = s.into_split();
                Ok(Some((Box::new(r), Box::new(w))))
            }
            #[cfg(unix)]
            Listener::Unix(l, _) => {
                let (s, _) = l.accept().await?;
                let (r, w) = s.into_split();
                Ok(Some((Box::new(r), Box::new(w))))
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
    /// The agent's smux stream broke; the session is being terminated.
    Failed,
    /// Connections were handed over and their source closed with none left open (a pool
    /// closing an idle session): end the session.
    Drained,
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

/// The port-forwarding session's limits from the options and the frame size.
fn port_config(ctx: &ModeContext) -> PortConfig {
    // Paced, one turn is one channel frame: a keystroke waits behind at most one frame of
    // each busy connection plus the frame already handed to the driver. Unpaced, a turn is
    // a few frames, which costs microseconds and saves per-chunk overhead.
    let chunk = if ctx.options.packets_per_second.is_some() {
        ctx.frame_data.max(smux::HEADER_LEN + 1)
    } else {
        UNPACED_CHUNK
    };
    PortConfig {
        chunk,
        read_size: READ_SIZE,
        max_conn_buffered: ctx.options.connection_buffer,
        max_total_buffered: ctx
            .options
            .session_buffer
            .max(ctx.options.connection_buffer),
    }
}

/// Accepting pauses after an error (EMFILE, ENFILE, ...) instead of spinning, for 10 ms
/// doubling to 1 s, and resumes at full speed after the next success.
#[derive(Default)]
struct AcceptBackoff {
    delay: Option<Duration>,
    until: Option<tokio::time::Instant>,
}

impl AcceptBackoff {
    fn failed(&mut self, e: &std::io::Error) {
        let delay = self.delay.map_or(Duration::from_millis(10), |d| {
            (d * 2).min(Duration::from_secs(1))
        });
        warn!("accept failed: {e}; accepting again in {delay:?}");
        self.delay = Some(delay);
        self.until = Some(tokio::time::Instant::now() + delay);
    }

    fn succeeded(&mut self) {
        self.delay = None;
    }

    fn waiting(&self) -> bool {
        self.until.is_some()
    }

    async fn wait(&mut self) {
        if let Some(t) = self.until {
            tokio::time::sleep_until(t).await;
        }
        self.until = None;
    }
}

/// Multiplexed port forwarding: a thin I/O shell around [`PortSession`].
///
/// The loop never awaits anything but its own select: each local connection has a reader
/// and a writer task ([`Conn`]) that block only on their own socket, the session decides
/// who reads, who sends next and when Output may come in, and the driver's up slot is
/// reserved only while the session has something to send.
pub async fn run_mux(ctx: ModeContext) -> ModeOutcome {
    let signals = TerminateSignals::new();
    let (listener, name) = match bind(&ctx).await {
        Ok(l) => l,
        Err(e) => return fail(&ctx, &e).await,
    };
    ctx.console.status(&format!(
        "{name} opened for sessionId {}.\nWaiting for connections...\n",
        ctx.session_id
    ));
    mux_loop(ctx, listener, signals, true).await
}

/// [`run_mux`] over connections handed over by the caller, without status lines.
pub async fn run_mux_handed(ctx: ModeContext, handoff: Handoff) -> ModeOutcome {
    let signals = TerminateSignals::new();
    mux_loop(ctx, Listener::Handed(handoff), signals, false).await
}

async fn mux_loop(
    mut ctx: ModeContext,
    mut listener: Listener,
    signals: TerminateSignals,
    announce: bool,
) -> ModeOutcome {
    let config = port_config(&ctx);
    debug!("port session: {config:?}");
    let mut port = PortSession::new(config);
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<LocalEvent<ConnId>>();
    let mut conns: HashMap<ConnId, Conn> = HashMap::new();
    let mut backoff = AcceptBackoff::default();
    let mut accepted_any = false;
    let signal = signals.recv();
    tokio::pin!(signal);
    let mut source_closed = false;
    let stop = loop {
        apply_events(&mut port, &mut conns);
        if source_closed && conns.is_empty() {
            break Stop::Drained;
        }
        let accepting =
            !source_closed && conns.len() < ctx.options.max_connections && !backoff.waiting();
        tokio::select! {
            biased;
            _ = &mut signal => break Stop::Signal,
            Some(ev) = ev_rx.recv() => on_local(&mut port, ev),
            permit = ctx.up.reserve(), if port.has_transmit() => {
                let Ok(permit) = permit else { break Stop::Closed };
                if let Some(out) = port.poll_transmit() {
                    permit.send(Up::Data(out));
                }
                if let Some(e) = port.error() {
                    ctx.console.error(&format!("Cannot perform start session: {e}"));
                    let _ = ctx.urgent.send(Up::Flag(Flag::TerminateSession)).await;
                    let _ = ctx.urgent.send(Up::Finish(exit::SESSION_FAILED)).await;
                    break Stop::Failed;
                }
            }
            down = ctx.down.recv(), if port.wants_remote() => {
                let Some(down) = down else { break Stop::Closed };
                match down {
                    Down::Output(b) => {
                        if let Err(e) = port.handle_remote(b) {
                            apply_events(&mut port, &mut conns);
                            ctx.console.error(&format!("Cannot perform start session: {e}"));
                            let _ = ctx.urgent.send(Up::Flag(Flag::TerminateSession)).await;
                            let _ = ctx.urgent.send(Up::Finish(exit::SESSION_FAILED)).await;
                            break Stop::Failed;
                        }
                    }
                    Down::Flag(Flag::ConnectToPortError) => {
                        if let Listener::Handed(h) = &listener {
                            let _ = h.refused.send(());
                        } else {
                            ctx.console.status("\nConnection to destination port failed, check SSM Agent logs.\n");
                        }
                    }
                    Down::Flag(f) => debug!("flag {f:?} ignored"),
                    Down::StdErr(b) => warn!("agent StdErr in a port session: {}", String::from_utf8_lossy(&b)),
                    Down::ExitCode(c) => debug!("exit code {c} in a port session"),
                }
            }
            accepted = listener.accept(), if accepting => {
                let (r, w) = match accepted {
                    Ok(Some(c)) => c,
                    Ok(None) => {
                        source_closed = true;
                        continue;
                    }
                    Err(e) => {
                        backoff.failed(&e);
                        continue;
                    }
                };
                backoff.succeeded();
                if !accepted_any && announce {
                    accepted_any = true;
                    ctx.console.status(&format!(
                        "\nConnection accepted for session [{}]\n",
                        ctx.session_id
                    ));
                }
                match port.open() {
                    Ok(id) => {
                        info!("connection opened as stream {id}");
                        conns.insert(id, Conn::spawn(id, r, w, READ_SIZE, ev_tx.clone()));
                    }
                    Err(e) => warn!("cannot open a stream: {e}"),
                }
            }
            () = backoff.wait(), if backoff.waiting() => {}
        }
    };
    drop(listener);
    match stop {
        Stop::Signal => on_signal(&ctx, true).await,
        Stop::Closed => {
            // The session is over: let every connection write what it still holds, for a
            // bounded time (a local reader that stopped reading must not hold the exit).
            apply_events(&mut port, &mut conns);
            let writers: Vec<_> = conns.drain().filter_map(|(_, c)| c.finish()).collect();
            if !writers.is_empty() {
                tokio::select! {
                    _ = futures_util::future::join_all(writers) => {}
                    _ = tokio::time::sleep(ctx.options.flush_timeout) => {
                        warn!("local connections still had data to write after {:?}", ctx.options.flush_timeout);
                    }
                    _ = &mut signal => {}
                }
            }
        }
        Stop::Failed => {
            return ModeOutcome {
                failed: Some(exit::SESSION_FAILED),
                ..ModeOutcome::default()
            }
        }
        Stop::Drained => {
            info!("no connections and none to come: ending the session");
            let _ = ctx.urgent.send(Up::Flag(Flag::TerminateSession)).await;
            let _ = ctx.urgent.send(Up::Finish(exit::OK)).await;
        }
    }
    ModeOutcome::default()
}

/// Does what the session asks of the local connections.
fn apply_events(port: &mut PortSession, conns: &mut HashMap<ConnId, Conn>) {
    while let Some(ev) = port.poll_event() {
        match ev {
            PortEvent::Read(id) => {
                if let Some(c) = conns.get(&id) {
                    c.grant_read();
                }
            }
            PortEvent::Write(id, data) => {
                if let Some(c) = conns.get(&id) {
                    c.write(data);
                }
            }
            PortEvent::Shutdown(id) => {
                if let Some(c) = conns.get(&id) {
                    c.shutdown();
                }
            }
            PortEvent::Finished(id) => {
                debug!("stream {id} finished");
                // Its writer has written everything and shut down (or the connection is
                // gone); dropping the handle ends both tasks.
                conns.remove(&id);
            }
        }
    }
}

/// Tells the session what a connection's tasks saw. A report for a connection that has
/// finished meanwhile is stale and ignored.
fn on_local(port: &mut PortSession, ev: LocalEvent<ConnId>) {
    let result = match ev {
        LocalEvent::Read(id, data) => port.handle_read(id, data),
        LocalEvent::Eof(id) => port.handle_read_eof(id),
        LocalEvent::Written(id, n) => port.handle_written(id, n),
        LocalEvent::Gone(id) => {
            debug!("stream {id}: local connection gone");
            port.handle_local_gone(id)
        }
        LocalEvent::Closed(_) => Ok(()),
    };
    if let Err(e) = result {
        debug!("{e} (stale report)");
    }
}

/// Single-connection port forwarding for old agents: one connection at a time; when it
/// ends the plugin sends `DisconnectToPort` and accepts the next. Built like the mux mode:
/// the loop never waits on the local socket or on the driver's queue.
pub async fn run_basic(mut ctx: ModeContext) -> ModeOutcome {
    let signals = TerminateSignals::new();
    let (mut listener, name) = match bind(&ctx).await {
        Ok(l) => l,
        Err(e) => return fail(&ctx, &e).await,
    };
    ctx.console.status(&format!(
        "{name} opened for sessionId {}.\n",
        ctx.session_id
    ));
    // Old agents (≤ 2.3.722.0) do not understand the TerminateSession flag.
    let use_flag = basic_port_uses_terminate_flag(&ctx.info.agent_version);
    let mut basic = BasicPortSession::new(ctx.options.connection_buffer);
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<LocalEvent<u64>>();
    let mut conn: Option<(u64, Conn)> = None;
    let mut next_id = 0u64;
    let mut backoff = AcceptBackoff::default();
    let mut accepted_any = false;
    let signal = signals.recv();
    tokio::pin!(signal);
    let stop = loop {
        if basic.take_read_grant() {
            if let Some((_, c)) = &conn {
                c.grant_read();
            }
        }
        if basic.take_disconnected() {
            conn = None;
        }
        tokio::select! {
            biased;
            _ = &mut signal => break Stop::Signal,
            Some(ev) = ev_rx.recv() => {
                let current = conn.as_ref().map(|(id, _)| *id);
                match ev {
                    LocalEvent::Read(id, b) if Some(id) == current => basic.handle_read(b),
                    LocalEvent::Eof(id) | LocalEvent::Gone(id) if Some(id) == current => basic.handle_local_closed(),
                    LocalEvent::Written(id, n) if Some(id) == current => basic.handle_written(n),
                    _ => {}
                }
            }
            permit = ctx.up.reserve(), if basic.has_transmit() => {
                let Ok(permit) = permit else { break Stop::Closed };
                match basic.poll_transmit() {
                    Some(BasicTransmit::Data(b)) => permit.send(Up::Data(b)),
                    Some(BasicTransmit::DisconnectToPort) => permit.send(Up::Flag(Flag::DisconnectToPort)),
                    None => {}
                }
            }
            down = ctx.down.recv(), if basic.wants_remote() => match down {
                None => break Stop::Closed,
                Some(Down::Output(b)) => match &conn {
                    Some((_, c)) => {
                        basic.handle_remote(b.len());
                        c.write(b);
                    }
                    None => debug!("{} bytes from the agent with no local connection; dropped", b.len()),
                },
                Some(other) => debug!("{other:?} ignored in basic port mode"),
            },
            accepted = listener.accept(), if !basic.is_connected() && !backoff.waiting() => {
                let (r, w) = match accepted {
                    Ok(Some(c)) => c,
                    // Only a handed-over source ends, and basic mode never has one.
                    Ok(None) => continue,
                    Err(e) => {
                        backoff.failed(&e);
                        continue;
                    }
                };
                backoff.succeeded();
                if !accepted_any {
                    accepted_any = true;
                    ctx.console.status(&format!(
                        "Connection accepted for session {}.\n",
                        ctx.session_id
                    ));
                }
                next_id += 1;
                basic.handle_accept();
                conn = Some((next_id, Conn::spawn(next_id, r, w, READ_SIZE, ev_tx.clone())));
            }
            () = backoff.wait(), if backoff.waiting() => {}
        }
    };
    drop(listener);
    match stop {
        Stop::Signal => on_signal(&ctx, use_flag).await,
        Stop::Closed | Stop::Failed | Stop::Drained => {
            if let Some(writer) = conn.and_then(|(_, c)| c.finish()) {
                tokio::select! {
                    _ = writer => {}
                    _ = tokio::time::sleep(ctx.options.flush_timeout) => {}
                    _ = &mut signal => {}
                }
            }
        }
    }
    ModeOutcome::default()
}
