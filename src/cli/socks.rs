//! `socks TARGET [--listen ADDR:PORT] [--auth USER:PASSWORD]`: a SOCKS5 proxy (RFC 1928,
//! CONNECT) and HTTP CONNECT proxy on one listener, into TARGET's network.
//!
//! Each destination (host and port, as the client named it) gets one
//! `AWS-StartPortForwardingSessionToRemoteHost` session, started on its first CONNECT and
//! reused by every later connection to it; each connection is one smux stream of that
//! session. Domain names go to the agent unresolved, so names only the instance can
//! resolve (private DNS) work. Authentication: none on a loopback listener unless
//! `--auth` is given; required (RFC 1929, or `Proxy-Authorization: Basic` for HTTP) on any
//! other address.
//!
//! The handshake is `ssm_wire::socks`; this file is its I/O shell. Nothing confirms that
//! the agent reached the destination (smux v1 has no open confirmation): the reply to a
//! destination's first connection waits until the remote side sends data, the agent
//! reports `ConnectToPortError` (reply 5, connection refused) or [`VERDICT_WAIT`] passes
//! quietly (success); later connections to a destination already reached are answered
//! at once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ssm_wire::mode::ModeKind;
use ssm_wire::socks::{Destination, Handshake, Outcome, Reply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc, watch};
use tracing::{debug, info, warn};

use super::aws_ops::{self, StartRequest};
use super::{load_config, runtime, target, AwsArgs, Client, Failure};
use crate::console::Console;
use crate::modes::port::{run_mux_handed, Handoff};
use crate::modes::{BoxRead, BoxWrite, ModeOutcome};
use crate::{exit, session};

/// How long the first connection to a destination waits for the agent to report that it
/// could not reach it, when the destination sends nothing first
/// (`SSM_PLUGIN_SOCKS_VERDICT_MS` overrides it, 0 to 60000).
const VERDICT_WAIT: Duration = Duration::from_millis(500);

fn verdict_wait() -> Result<Duration, String> {
    match std::env::var("SSM_PLUGIN_SOCKS_VERDICT_MS") {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|ms| *ms <= 60_000)
            .map(Duration::from_millis)
            .ok_or_else(|| {
                format!("SSM_PLUGIN_SOCKS_VERDICT_MS: {v:?} is not 0 to 60000 milliseconds")
            }),
        _ => Ok(VERDICT_WAIT),
    }
}
/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Most handshake bytes buffered from one client.
const MAX_HANDSHAKE: usize = 16 * 1024;
/// Connections waiting to be taken by a session.
const HANDOFF_QUEUE: usize = 64;
/// Buffer of the pipe between a client's socket and its session stream.
const PIPE: usize = 64 * 1024;

#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:\n  \
session-manager-plugin socks bastion\n  \
curl --socks5-hostname 127.0.0.1:1080 http://internal-app.corp:8080/\n  \
session-manager-plugin socks bastion --listen 0.0.0.0:1080 --auth alice:s3cret\n\n\
The same listener also accepts HTTP CONNECT (https_proxy=http://127.0.0.1:1080).")]
pub struct Args {
    /// Instance id or name whose network the proxy opens.
    pub target: String,
    /// Address and port to listen on.
    #[arg(long, default_value = "127.0.0.1:1080", value_name = "ADDR:PORT")]
    pub listen: SocketAddr,
    /// Username and password clients must give (required unless ADDR is loopback; also
    /// read from SSM_PLUGIN_SOCKS_AUTH).
    #[arg(long, value_name = "USER:PASSWORD")]
    pub auth: Option<String>,
    #[command(flatten)]
    pub aws: AwsArgs,
}

/// Where a destination's session is.
#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    Starting,
    Ready,
    Failed(String),
}

/// One destination's session, shared by its connections.
struct DestSession {
    conns: mpsc::Sender<(BoxRead, BoxWrite)>,
    refused: broadcast::Sender<()>,
    state: watch::Receiver<State>,
    /// A connection to it got through: later ones are answered at once.
    reached: AtomicBool,
}

struct Proxy {
    client: Client,
    target: String,
    credentials: Option<(String, String)>,
    verdict_wait: Duration,
    sessions: Mutex<HashMap<Destination, Arc<DestSession>>>,
}

fn parse_auth(s: &str) -> Result<(String, String), String> {
    match s.split_once(':') {
        Some((u, p)) if !u.is_empty() && !p.is_empty() && u.len() <= 255 && p.len() <= 255 => {
            Ok((u.to_owned(), p.to_owned()))
        }
        _ => Err("--auth expects USER:PASSWORD, each 1 to 255 bytes (RFC 1929)".to_owned()),
    }
}

pub fn main(a: Args) -> Result<u8, Failure> {
    let auth = a
        .auth
        .clone()
        .or_else(|| std::env::var("SSM_PLUGIN_SOCKS_AUTH").ok())
        .filter(|s| !s.trim().is_empty());
    let credentials = auth
        .as_deref()
        .map(parse_auth)
        .transpose()
        .map_err(Failure::usage)?;
    if credentials.is_none() && !a.listen.ip().is_loopback() {
        return Err(Failure::usage(format!(
            "socks: listening on {} (not loopback) needs --auth USER:PASSWORD",
            a.listen
        )));
    }
    let verdict_wait = verdict_wait().map_err(Failure::usage)?;
    let cfg = load_config(&a.aws)?;
    let client = Client::new(&a.aws, &cfg.defaults)?;
    let rt = runtime()?;
    let id = target::resolve(&rt, &client.aws, &a.target)?;
    let console = Console {
        quiet: client.options.quiet,
    };
    let proxy = Arc::new(Proxy {
        client,
        target: id,
        credentials,
        verdict_wait,
        sessions: Mutex::new(HashMap::new()),
    });
    let code = rt.block_on(serve(proxy, a.listen, console));
    rt.shutdown_background();
    code
}

async fn serve(proxy: Arc<Proxy>, listen: SocketAddr, console: Console) -> Result<u8, Failure> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| Failure::failed(format!("socks: listen tcp {listen}: {e}")))?;
    let addr = listener.local_addr().unwrap_or(listen);
    console.status(&format!(
        "SOCKS5 proxy on {addr} for {}.\nWaiting for connections...\n",
        proxy.target
    ));
    let stop = terminate_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let p = proxy.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve_client(p, stream).await {
                            debug!("socks client {peer}: {e}");
                        }
                    });
                }
                Err(e) => {
                    warn!("socks accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    drop(listener);
    // Each session's port mode saw the same signal and is ending its session; give them
    // the flush time the options allow.
    let sessions: Vec<_> = proxy
        .sessions
        .lock()
        .map(|m| m.values().cloned().collect())
        .unwrap_or_default();
    let wait_all = async {
        for s in sessions {
            s.conns.closed().await;
        }
    };
    let _ = tokio::time::timeout(proxy.client.options.flush_timeout, wait_all).await;
    Ok(exit::OK)
}

pub(super) async fn terminate_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut a), Ok(mut b)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = a.recv() => {}
            _ = b.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

impl Proxy {
    /// The destination's session, started if there is none (or the last one ended).
    fn session_for(self: &Arc<Self>, dest: &Destination) -> Arc<DestSession> {
        let mut map = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = map.get(dest) {
            let failed = matches!(*s.state.borrow(), State::Failed(_));
            if !failed && !s.conns.is_closed() {
                return s.clone();
            }
        }
        let (conns_tx, conns_rx) = mpsc::channel(HANDOFF_QUEUE);
        let (refused, _) = broadcast::channel(16);
        let (state_tx, state_rx) = watch::channel(State::Starting);
        let s = Arc::new(DestSession {
            conns: conns_tx,
            refused: refused.clone(),
            state: state_rx,
            reached: AtomicBool::new(false),
        });
        map.insert(dest.clone(), s.clone());
        let handoff = Handoff {
            conns: conns_rx,
            refused,
        };
        tokio::spawn(run_dest_session(
            self.clone(),
            dest.clone(),
            s.clone(),
            handoff,
            state_tx,
        ));
        s
    }
}

async fn run_dest_session(
    proxy: Arc<Proxy>,
    dest: Destination,
    me: Arc<DestSession>,
    handoff: Handoff,
    state: watch::Sender<State>,
) {
    let req = StartRequest::new(
        proxy.target.clone(),
        Some("AWS-StartPortForwardingSessionToRemoteHost"),
    )
    .param("host", dest.host.clone())
    .param("portNumber", dest.port.to_string())
    .param("localPortNumber", "0");
    let resp = match aws_ops::start_session(&proxy.client.aws, &req).await {
        Ok(r) => r,
        Err(e) => {
            warn!("socks {dest}: StartSession failed: {e}");
            let _ = state.send(State::Failed(e.to_string()));
            forget(&proxy, &dest, &me);
            return;
        }
    };
    info!("socks {dest}: session {}", resp.session_id);
    let slot = Arc::new(Mutex::new(Some((handoff, state.clone()))));
    let modes: session::ModeStarter = Arc::new(move |kind, ctx| {
        let taken = slot.lock().ok().and_then(|mut s| s.take());
        Box::pin(async move {
            let Some((handoff, state)) = taken else {
                return ModeOutcome::default();
            };
            if kind != ModeKind::MuxPort {
                let why = format!(
                    "the agent offers {kind:?}; the SOCKS proxy needs multiplexed port sessions (agent 3.0.196.0 or later)"
                );
                let _ = state.send(State::Failed(why.clone()));
                ctx.console
                    .error(&format!("session-manager-plugin: socks: {why}"));
                let _ = ctx
                    .up
                    .send(crate::modes::Up::Flag(
                        ssm_wire::payload::Flag::TerminateSession,
                    ))
                    .await;
                let _ = ctx
                    .up
                    .send(crate::modes::Up::Finish(exit::SESSION_FAILED))
                    .await;
                return ModeOutcome {
                    failed: Some(exit::SESSION_FAILED),
                    ..ModeOutcome::default()
                };
            }
            let _ = state.send(State::Ready);
            run_mux_handed(ctx, handoff).await
        })
    });
    // Status lines of these sessions go to stderr: stdout is the proxy's own.
    let console = Console { quiet: true };
    let code = proxy
        .client
        .run_session_with_modes(
            resp,
            &proxy.target,
            console,
            proxy.client.options.clone(),
            modes,
        )
        .await;
    info!("socks {dest}: session ended with status {code}");
    state.send_if_modified(|s| {
        if *s == State::Starting {
            *s = State::Failed(format!("the session ended with status {code}"));
            true
        } else {
            false
        }
    });
    forget(&proxy, &dest, &me);
}

/// Removes a destination's entry if it is still this session.
fn forget(proxy: &Proxy, dest: &Destination, me: &Arc<DestSession>) {
    let mut map = proxy.sessions.lock().unwrap_or_else(|e| e.into_inner());
    if map.get(dest).is_some_and(|s| Arc::ptr_eq(s, me)) {
        map.remove(dest);
    }
}

/// Reads the handshake; returns the destination and any bytes after the request.
async fn handshake(
    stream: &mut TcpStream,
    hs: &mut Handshake,
) -> Result<(Destination, Vec<u8>), String> {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let p = hs.input(&buf);
        if !p.write.is_empty() {
            stream
                .write_all(&p.write)
                .await
                .map_err(|e| e.to_string())?;
        }
        buf.drain(..p.consumed);
        match p.outcome {
            Outcome::Connect(d) => return Ok((d, buf)),
            Outcome::Refused(why) => return Err(why),
            Outcome::Continue if p.consumed > 0 => continue,
            Outcome::Continue => {}
        }
        if buf.len() >= MAX_HANDSHAKE {
            return Err("handshake too long".to_owned());
        }
        let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the client closed during the handshake".to_owned());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn serve_client(proxy: Arc<Proxy>, mut stream: TcpStream) -> Result<(), String> {
    let _ = stream.set_nodelay(true);
    let mut hs = Handshake::new(proxy.credentials.clone());
    let (dest, early) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut stream, &mut hs))
        .await
        .map_err(|_| "handshake timed out".to_owned())??;
    debug!("socks CONNECT {dest}");
    let s = proxy.session_for(&dest);
    let mut st = s.state.clone();
    let state = st
        .wait_for(|s| *s != State::Starting)
        .await
        .map(|s| s.clone())
        .unwrap_or(State::Failed("the session ended".to_owned()));
    if let State::Failed(why) = state {
        let _ = stream
            .write_all(&hs.connect_reply(Reply::GeneralFailure))
            .await;
        return Err(format!("{dest}: {why}"));
    }
    let (ours, theirs) = tokio::io::duplex(PIPE);
    let (tr, tw) = tokio::io::split(theirs);
    let mut refused = s.refused.subscribe();
    if s.conns.send((Box::new(tr), Box::new(tw))).await.is_err() {
        let _ = stream
            .write_all(&hs.connect_reply(Reply::GeneralFailure))
            .await;
        return Err(format!("{dest}: the session ended"));
    }
    let mut pipe = ours;
    if !early.is_empty() {
        pipe.write_all(&early).await.map_err(|e| e.to_string())?;
    }
    let mut first = vec![0u8; 16 * 1024];
    let mut got = 0;
    if !s.reached.load(Ordering::Relaxed) {
        // Reached (data, or nothing wrong within the wait) or refused.
        let verdict = tokio::select! {
            biased;
            _ = refused.recv() => Err(()),
            r = pipe.read(&mut first) => match r {
                Ok(n) => Ok(n),
                Err(_) => Err(()),
            },
            _ = tokio::time::sleep(proxy.verdict_wait) => Ok(0),
        };
        match verdict {
            Err(()) => {
                let _ = stream
                    .write_all(&hs.connect_reply(Reply::ConnectionRefused))
                    .await;
                return Err(format!("{dest}: the agent could not connect"));
            }
            Ok(n) => got = n,
        }
        s.reached.store(true, Ordering::Relaxed);
    }
    stream
        .write_all(&hs.connect_reply(Reply::Succeeded))
        .await
        .map_err(|e| e.to_string())?;
    if got > 0 {
        stream
            .write_all(&first[..got])
            .await
            .map_err(|e| e.to_string())?;
    }
    drop(first);
    tokio::io::copy_bidirectional(&mut stream, &mut pipe)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_flag() {
        assert_eq!(
            parse_auth("alice:s3:cret").unwrap(),
            ("alice".to_owned(), "s3:cret".to_owned())
        );
        for bad in ["alice", ":x", "x:", ""] {
            assert!(parse_auth(bad).is_err(), "{bad}");
        }
    }
}
