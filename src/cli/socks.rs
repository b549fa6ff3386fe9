//! `socks TARGET [--listen ADDR:PORT] [--auth USER:PASSWORD] [--sessions N]`: a SOCKS5
//! proxy (RFC 1928, CONNECT) and HTTP CONNECT proxy on one listener, into TARGET's
//! network.
//!
//! Each destination (host and port, as the client named it) gets one
//! `AWS-StartPortForwardingSessionToRemoteHost` session (a [`Pool`] of `--sessions N`),
//! started on its first CONNECT and reused by every later connection to it; each
//! connection is one smux stream of a session. Domain names go to the agent unresolved, so names only the instance can
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

use ssm_wire::socks::{Destination, Handshake, Outcome, Reply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use super::aws_ops::StartRequest;
use super::forward::PoolArgs;
use super::pool::Pool;
use super::{load_config, runtime, target, AwsArgs, Client, Failure};
use crate::console::Console;
use crate::exit;

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
    /// Sessions per destination (`--sessions`, `--idle-timeout`: as for `forward`).
    #[command(flatten)]
    pub pool: PoolArgs,
    #[command(flatten)]
    pub aws: AwsArgs,
}

/// One destination: its pool of sessions, and whether a connection to it got through
/// (later ones are then answered at once).
struct Dest {
    pool: Arc<Pool>,
    reached: AtomicBool,
}

struct Proxy {
    client: Arc<Client>,
    target: String,
    credentials: Option<(String, String)>,
    verdict_wait: Duration,
    pool: PoolArgs,
    dests: Mutex<HashMap<Destination, Arc<Dest>>>,
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
        client: Arc::new(client),
        target: id,
        credentials,
        verdict_wait,
        pool: a.pool,
        dests: Mutex::new(HashMap::new()),
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
    // Each session's port mode saw the same signal and is ending its session.
    let dests: Vec<_> = proxy
        .dests
        .lock()
        .map(|m| m.values().cloned().collect())
        .unwrap_or_default();
    for d in &dests {
        d.pool.close();
    }
    for d in dests {
        d.pool.wait_ended().await;
    }
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
    /// The destination's pool, created (and started) on its first CONNECT.
    fn dest(&self, dest: &Destination) -> Arc<Dest> {
        let mut map = self.dests.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = map.get(dest) {
            return d.clone();
        }
        let req = StartRequest::new(
            self.target.clone(),
            Some("AWS-StartPortForwardingSessionToRemoteHost"),
        )
        .param("host", dest.host.clone())
        .param("portNumber", dest.port.to_string())
        .param("localPortNumber", "0");
        let pool = Pool::new(
            self.client.clone(),
            self.target.clone(),
            req,
            self.pool.sessions,
            Duration::from_secs(self.pool.idle_timeout),
            1,
        );
        pool.start();
        let d = Arc::new(Dest {
            pool,
            reached: AtomicBool::new(false),
        });
        map.insert(dest.clone(), d.clone());
        d
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
    let d = proxy.dest(&dest);
    let Some((member, mut pipe)) = d.pool.open_stream().await else {
        let _ = stream
            .write_all(&hs.connect_reply(Reply::GeneralFailure))
            .await;
        return Err(format!("{dest}: no session could start"));
    };
    let mut refused = member.refused.subscribe();
    if !early.is_empty() {
        pipe.write_all(&early).await.map_err(|e| e.to_string())?;
    }
    let mut first = vec![0u8; 16 * 1024];
    let mut got = 0;
    if !d.reached.load(Ordering::Relaxed) {
        // Reached (data, or nothing wrong within the wait) or refused.
        let verdict = tokio::select! {
            biased;
            _ = refused.recv() => Err(()),
            r = pipe.read(&mut first) => r.map_err(|_| ()),
            _ = tokio::time::sleep(proxy.verdict_wait) => Ok(0),
        };
        match verdict {
            Err(()) => {
                let _ = stream
                    .write_all(&hs.connect_reply(Reply::ConnectionRefused))
                    .await;
                drop(pipe);
                Pool::release(&member);
                return Err(format!("{dest}: the agent could not connect"));
            }
            Ok(n) => got = n,
        }
        d.reached.store(true, Ordering::Relaxed);
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
    Pool::carry(member, stream, pipe).await;
    Ok(())
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
