//! Several sessions behind one local listener (`forward … --sessions N`, `sessions = N` in
//! a config-file tunnel): each session carries about 1 MB/s (the gateway's frame cap), so
//! N sessions to the same target and document carry about N times that.
//!
//! The pool owns the listener; every session runs the mux port mode over connections
//! handed to it ([`crate::modes::port::run_mux_handed`]). A new connection goes to the
//! least-loaded ready session: fewest open connections, then fewest bytes carried in the
//! last few seconds; while sessions are still starting, a connection waits for one of
//! them rather than share a busy one. Each session reconnects on its own (the driver's ResumeSession
//! path); one that ends is replaced; sessions beyond the first that carried nothing for
//! the idle time are closed (their source is closed, the mode ends the session once its
//! last connection is done) and reopened when load calls for them.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ssm_wire::mode::ModeKind;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, watch, Notify};
use tokio::time::Instant;
use tracing::{info, warn};

use super::aws_ops::{self, StartRequest};
use super::Client;
use crate::console::Console;
use crate::modes::port::{run_mux_handed, Handoff};
use crate::modes::{BoxRead, BoxWrite, ModeOutcome, Up};
use crate::{exit, session};

/// Connections waiting to be taken by one session.
const HANDOFF_QUEUE: usize = 64;
/// Buffer of the pipe between a local connection and its session stream.
const PIPE: usize = 64 * 1024;
/// Longest a connection waits for a starting session instead of sharing a busy one.
const WARM_WAIT: Duration = Duration::from_secs(30);
/// How often the pool looks for ended and idle sessions.
const SWEEP: Duration = Duration::from_secs(1);
/// StartSession failures in a row after which `forward` gives up.
pub const MAX_START_FAILURES: u32 = 5;

#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    Starting,
    Ready(String),
    Ended,
}

/// One session of the pool.
pub struct Member {
    conns: Mutex<Option<mpsc::Sender<(BoxRead, BoxWrite)>>>,
    /// The agent could not reach the destination (`ConnectToPortError`).
    pub refused: broadcast::Sender<()>,
    state: watch::Receiver<State>,
    active: AtomicUsize,
    /// Bytes carried, both ways, in the current and the previous sweep period.
    bytes_now: AtomicU64,
    bytes_prev: AtomicU64,
    last_busy: Mutex<Instant>,
}

impl Member {
    fn ready(&self) -> Option<String> {
        match &*self.state.borrow() {
            State::Ready(id) => Some(id.clone()),
            _ => None,
        }
    }

    fn sender(&self) -> Option<mpsc::Sender<(BoxRead, BoxWrite)>> {
        self.conns.lock().ok().and_then(|c| c.clone())
    }

    fn load(&self) -> (usize, u64) {
        (
            self.active.load(Ordering::Relaxed),
            self.bytes_now.load(Ordering::Relaxed) + self.bytes_prev.load(Ordering::Relaxed),
        )
    }
}

/// The pool. `size` ≥ 1 sessions at most; the first one is never closed for idleness.
pub struct Pool {
    client: Arc<Client>,
    target: String,
    request: StartRequest,
    size: usize,
    idle: Duration,
    members: Mutex<Vec<Arc<Member>>>,
    changed: Notify,
    start_failures: AtomicU64,
    /// StartSession failures within one wait for a session after which it gives up.
    give_up_after: u64,
    /// Shutting down: no session is started any more.
    closing: std::sync::atomic::AtomicBool,
}

impl Pool {
    pub fn new(
        client: Arc<Client>,
        target: String,
        request: StartRequest,
        size: usize,
        idle: Duration,
        give_up_after: u32,
    ) -> Arc<Pool> {
        Arc::new(Pool {
            client,
            target,
            request,
            size: size.max(1),
            idle,
            members: Mutex::new(Vec::new()),
            changed: Notify::new(),
            start_failures: AtomicU64::new(0),
            give_up_after: u64::from(give_up_after.max(1)),
            closing: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn members(&self) -> Vec<Arc<Member>> {
        self.members.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Session ids of the ready sessions, in start order.
    pub fn session_ids(&self) -> Vec<String> {
        self.members().iter().filter_map(|m| m.ready()).collect()
    }

    /// Starts sessions up to the pool's size.
    pub fn fill(self: &Arc<Self>) {
        let n = self.members().len();
        for _ in n..self.size {
            self.start_member();
        }
    }

    /// No more sessions: the process is ending (the sessions end on the same signal).
    pub fn close(&self) {
        self.closing.store(true, Ordering::Relaxed);
    }

    fn start_member(self: &Arc<Self>) -> Option<Arc<Member>> {
        if self.closing.load(Ordering::Relaxed) {
            return None;
        }
        let (tx, rx) = mpsc::channel(HANDOFF_QUEUE);
        let (state_tx, state_rx) = watch::channel(State::Starting);
        let (refused, _) = broadcast::channel(16);
        let m = Arc::new(Member {
            conns: Mutex::new(Some(tx)),
            refused: refused.clone(),
            state: state_rx,
            active: AtomicUsize::new(0),
            bytes_now: AtomicU64::new(0),
            bytes_prev: AtomicU64::new(0),
            last_busy: Mutex::new(Instant::now()),
        });
        if let Ok(mut v) = self.members.lock() {
            v.push(m.clone());
        }
        let handoff = Handoff { conns: rx, refused };
        tokio::spawn(self.clone().run_member(handoff, state_tx));
        Some(m)
    }

    async fn run_member(self: Arc<Self>, handoff: Handoff, state: watch::Sender<State>) {
        let resp = match aws_ops::start_session(&self.client.aws, &self.request).await {
            Ok(r) => {
                self.start_failures.store(0, Ordering::Relaxed);
                r
            }
            Err(e) => {
                self.start_failures.fetch_add(1, Ordering::Relaxed);
                warn!("pool: StartSession failed: {e}");
                let _ = state.send(State::Ended);
                self.changed.notify_waiters();
                return;
            }
        };
        let id = resp.session_id.clone();
        info!("pool: session {id} starting");
        let slot = Arc::new(Mutex::new(Some((handoff, state.clone(), id.clone()))));
        let pool = self.clone();
        let modes: session::ModeStarter = Arc::new(move |kind, ctx| {
            let taken = slot.lock().ok().and_then(|mut s| s.take());
            let pool = pool.clone();
            Box::pin(async move {
                let Some((handoff, state, id)) = taken else {
                    return ModeOutcome::default();
                };
                if kind != ModeKind::MuxPort {
                    // Counts as a failed start: another session would fare no better.
                    pool.start_failures.fetch_add(1, Ordering::Relaxed);
                    ctx.console.error(&format!(
                        "session-manager-plugin: --sessions needs multiplexed port sessions (agent 3.0.196.0 or later); the agent offers {kind:?}"
                    ));
                    let _ = ctx
                        .up
                        .send(Up::Flag(ssm_wire::payload::Flag::TerminateSession))
                        .await;
                    let _ = ctx.up.send(Up::Finish(exit::SESSION_FAILED)).await;
                    return ModeOutcome {
                        failed: Some(exit::SESSION_FAILED),
                        ..ModeOutcome::default()
                    };
                }
                let _ = state.send(State::Ready(id));
                pool.changed.notify_waiters();
                run_mux_handed(ctx, handoff).await
            })
        });
        let console = Console { quiet: true };
        let code = self
            .client
            .run_session_with_modes(
                resp,
                &self.target,
                console,
                self.client.options.clone(),
                modes,
            )
            .await;
        info!("pool: session {id} ended with status {code}");
        let _ = state.send(State::Ended);
        self.changed.notify_waiters();
    }

    /// Drops ended sessions (replacing them), closes idle extra ones, ages the load.
    pub async fn sweep(self: Arc<Self>) {
        loop {
            tokio::time::sleep(SWEEP).await;
            let now = Instant::now();
            let mut replace = 0;
            if let Ok(mut v) = self.members.lock() {
                v.retain(|m| {
                    let ended = *m.state.borrow() == State::Ended;
                    let closed = m.conns.lock().map(|c| c.is_none()).unwrap_or(true);
                    if ended && !closed {
                        replace += 1; // failed, not closed by us: replace it
                    }
                    !ended
                });
                let open: Vec<_> = v.iter().filter(|m| m.sender().is_some()).cloned().collect();
                for m in open.iter().skip(1) {
                    let (active, bytes) = m.load();
                    let mut last = m.last_busy.lock().unwrap_or_else(|e| e.into_inner());
                    if active > 0 || bytes > 0 {
                        *last = now;
                    } else if now.duration_since(*last) >= self.idle {
                        info!("pool: closing an idle session");
                        if let Ok(mut c) = m.conns.lock() {
                            *c = None;
                        }
                    }
                }
                for m in v.iter() {
                    let b = m.bytes_now.swap(0, Ordering::Relaxed);
                    m.bytes_prev.store(b, Ordering::Relaxed);
                }
            }
            let have = self
                .members()
                .iter()
                .filter(|m| m.sender().is_some())
                .count();
            if have == 0 {
                replace = replace.max(1);
            }
            // A StartSession that keeps failing is retried by the next connection, not
            // every second.
            if self.start_failures.load(Ordering::Relaxed) >= u64::from(MAX_START_FAILURES) {
                replace = 0;
            }
            for _ in 0..replace.min(self.size.saturating_sub(have)) {
                self.start_member();
            }
        }
    }

    /// The least-loaded ready session's sender; grows the pool when every session is
    /// busy; waits while none is ready.
    async fn pick(self: &Arc<Self>) -> Option<(Arc<Member>, mpsc::Sender<(BoxRead, BoxWrite)>)> {
        let deadline = Instant::now() + Duration::from_secs(120);
        let failures_before = self.start_failures.load(Ordering::Relaxed);
        let warm_until = Instant::now() + WARM_WAIT;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let members = self.members();
            let open: Vec<_> = members
                .iter()
                .filter_map(|m| m.sender().map(|s| (m.clone(), s)))
                .collect();
            let best = open
                .iter()
                .filter(|(m, _)| m.ready().is_some())
                .min_by_key(|(m, _)| m.load())
                .cloned();
            let starting = open
                .iter()
                .any(|(m, _)| *m.state.borrow() == State::Starting);
            if best.is_none() && self.closing.load(Ordering::Relaxed) {
                return None;
            }
            if let Some((m, _)) = &best {
                let busy = m.load().0 > 0;
                // While the pool starts, a connection waits for a starting session
                // rather than share a busy one (bounded: then it shares).
                let wait_for_start = busy && starting && Instant::now() < warm_until;
                if !wait_for_start {
                    if busy && open.len() < self.size && !starting {
                        self.start_member();
                    }
                    return best;
                }
            }
            let failed = self
                .start_failures
                .load(Ordering::Relaxed)
                .saturating_sub(failures_before);
            if failed >= self.give_up_after {
                return None;
            }
            if best.is_none() && !starting {
                self.start_member();
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(SWEEP) => {}
                _ = tokio::time::sleep_until(deadline) => return None,
            }
        }
    }

    /// Starts the pool's sessions and its sweeper.
    pub fn start(self: &Arc<Self>) {
        self.fill();
        tokio::spawn(self.clone().sweep());
    }

    /// A stream on the least-loaded ready session: the caller's end of a pipe whose other
    /// end the session's mode serves, and the session. `None` when no session could start.
    pub async fn open_stream(self: &Arc<Self>) -> Option<(Arc<Member>, DuplexStream)> {
        let (m, tx) = self.pick().await?;
        let (ours, theirs) = tokio::io::duplex(PIPE);
        let (tr, tw) = tokio::io::split(theirs);
        if tx.send((Box::new(tr), Box::new(tw))).await.is_err() {
            warn!("pool: the session ended before taking a connection");
            return None;
        }
        m.active.fetch_add(1, Ordering::Relaxed);
        *m.last_busy.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        Some((m, ours))
    }

    /// Copies between a local connection and its stream until both are done, counting the
    /// bytes as the session's load.
    pub async fn carry<S>(member: Arc<Member>, stream: S, mut pipe: DuplexStream)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut counted = Counted {
            inner: stream,
            member: member.clone(),
        };
        let _ = tokio::io::copy_bidirectional(&mut counted, &mut pipe).await;
        Pool::release(&member);
    }

    /// A stream from [`Pool::open_stream`] is done (without [`Pool::carry`]).
    pub fn release(member: &Member) {
        member.active.fetch_sub(1, Ordering::Relaxed);
        *member.last_busy.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    /// Serves one local connection on a session of the pool.
    pub async fn dispatch<S>(self: Arc<Self>, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Some((m, pipe)) = self.open_stream().await else {
            warn!("pool: no session to carry a connection; closing it");
            return;
        };
        Pool::carry(m, stream, pipe).await;
    }

    /// Waits (bounded by the flush timeout) until every session has ended.
    pub async fn wait_ended(&self) {
        let wait = async {
            for m in self.members() {
                let mut st = m.state.clone();
                let _ = st.wait_for(|s| *s == State::Ended).await;
            }
        };
        let _ = tokio::time::timeout(self.client.options.flush_timeout, wait).await;
    }
}

/// A local connection that adds what passes through it to its session's load.
struct Counted<S> {
    inner: S,
    member: Arc<Member>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.member.bytes_now.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, data);
        if let std::task::Poll::Ready(Ok(n)) = &r {
            self.member
                .bytes_now
                .fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Runs a pool behind `listener` until a terminating signal; prints the plugin's
/// `Port N opened` line once the first session is ready.
pub async fn serve(pool: Arc<Pool>, listener: TcpListener, console: Console) -> u8 {
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    pool.start();
    let stop = super::socks::terminate_signal();
    tokio::pin!(stop);
    // The line scripts wait for, once a session can carry connections.
    let first = loop {
        let notified = pool.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        // Once every first session is ready (or has failed), so that the first
        // connections spread over all of them.
        let members = pool.members();
        let starting = members.iter().any(|m| *m.state.borrow() == State::Starting);
        if !starting {
            if let Some(id) = pool.session_ids().first() {
                break Some(id.clone());
            }
        }
        if pool.start_failures.load(Ordering::Relaxed) >= u64::from(MAX_START_FAILURES) {
            break None;
        }
        tokio::select! {
            _ = &mut stop => {
                pool.close();
                return exit::OK;
            }
            _ = notified => {}
            _ = tokio::time::sleep(SWEEP) => {}
        }
    };
    let Some(first) = first else {
        console.error("session-manager-plugin: forward: no session of the pool could start");
        return exit::SESSION_FAILED;
    };
    console.status(&format!(
        "Port {port} opened for sessionId {first} (a pool of up to {} sessions).\nWaiting for connections...\n",
        pool.size
    ));
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => {
                    let _ = s.set_nodelay(true);
                    tokio::spawn(pool.clone().dispatch(s));
                }
                Err(e) => {
                    warn!("pool accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    // Every session's mode saw the same signal and is ending its session.
    pool.close();
    pool.wait_ended().await;
    exit::OK
}
