//! The data-channel link: a WebSocket opened for the session (SigV4 upgrade headers,
//! OpenDataChannel, the first ping), its writer task, and the reconnect loop.
//!
//! The reconnect loop runs as a task of its own ([`spawn_reconnect`]) that the driver
//! polls beside everything else, so a signal or `~.` during a reconnect that may take
//! `SSM_PLUGIN_RECONNECT_TIMEOUT` (600 s) is handled at once.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use rand::Rng;
use ssm_wire::payload::OpenDataChannelInput;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tracing::{debug, info, warn};

use super::{BoxFuture, SessionApi};
use crate::console::Console;
use crate::exit;
use crate::transport::{self, TlsSettings};

/// The write half of a WebSocket.
pub type MsgSink = Pin<Box<dyn Sink<Message, Error = String> + Send>>;
/// The read half of a WebSocket.
pub type MsgStream = Pin<Box<dyn Stream<Item = Result<Message, String>> + Send>>;

/// Opens WebSockets: [`WsConnector`] in the binary, an in-memory pair in the tests.
pub trait Connector: Send + Sync {
    fn connect<'a>(
        &'a self,
        url: &'a str,
        headers: &'a [(String, String)],
    ) -> BoxFuture<'a, Result<(MsgSink, MsgStream), String>>;
}

/// WebSockets over rustls (or plain TCP for `ws://`), through the configured proxy.
pub struct WsConnector {
    tls: TlsSettings,
}

impl WsConnector {
    pub fn new(tls: TlsSettings) -> WsConnector {
        WsConnector { tls }
    }
}

impl Connector for WsConnector {
    fn connect<'a>(
        &'a self,
        url: &'a str,
        headers: &'a [(String, String)],
    ) -> BoxFuture<'a, Result<(MsgSink, MsgStream), String>> {
        Box::pin(async move {
            let ws = transport::connect(url, headers, &self.tls, |k| std::env::var(k).ok())
                .await
                .map_err(|e| e.to_string())?;
            let (sink, stream) = ws.split();
            let sink: MsgSink = Box::pin(sink.sink_map_err(|e| e.to_string()));
            let stream: MsgStream = Box::pin(stream.map(|r| r.map_err(|e| e.to_string())));
            Ok((sink, stream))
        })
    }
}

/// Frames waiting for the WebSocket writer task.
pub const WRITE_QUEUE: usize = 64;

/// The write half of the WebSocket, in its own task so that a peer that is slow to read
/// never stops this side from reading (two sides blocked on writes is a deadlock).
pub struct Writer {
    pub tx: mpsc::Sender<Message>,
    task: JoinHandle<()>,
}

impl Writer {
    fn spawn(mut sink: MsgSink) -> Writer {
        let (tx, mut rx) = mpsc::channel::<Message>(WRITE_QUEUE);
        let task = tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                if let Err(e) = sink.feed(m).await {
                    debug!("WebSocket write: {e}");
                    return;
                }
                while let Ok(m) = rx.try_recv() {
                    if let Err(e) = sink.feed(m).await {
                        debug!("WebSocket write: {e}");
                        return;
                    }
                }
                if let Err(e) = sink.flush().await {
                    debug!("WebSocket flush: {e}");
                    return;
                }
            }
            // The driver is done: a clean close.
            let _ = sink.close().await;
        });
        Writer { tx, task }
    }

    /// Sends what is queued and a close frame, waiting a moment for it.
    pub async fn close(self) {
        let Writer { tx, task } = self;
        drop(tx);
        let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
    }
}

/// An open WebSocket.
pub struct Link {
    pub writer: Writer,
    pub stream: MsgStream,
}

/// Opens links for one session: everything but the URL and the token.
#[derive(Clone)]
pub struct Opener {
    pub api: Arc<dyn SessionApi>,
    pub connector: Arc<dyn Connector>,
    pub client_id: String,
    pub client_version: String,
}

impl Opener {
    /// Signs (when credentials exist), dials, and sends OpenDataChannel.
    pub async fn open(&self, url: &str, token: &str) -> Result<Link, String> {
        let headers = match self.api.sign(url).await {
            Ok(h) => h.unwrap_or_default(),
            Err(e) => {
                warn!("connecting without a SigV4 signature: {e}");
                Vec::new()
            }
        };
        let (mut sink, stream) = self.connector.connect(url, &headers).await?;
        let open = OpenDataChannelInput {
            message_schema_version: "1.0".to_owned(),
            request_id: uuid::Uuid::new_v4().to_string(),
            token_value: token.to_owned(),
            client_id: self.client_id.clone(),
            client_version: self.client_version.clone(),
        };
        let text = serde_json::to_string(&open).map_err(|e| e.to_string())?;
        sink.send(Message::text(text))
            .await
            .map_err(|e| format!("sending OpenDataChannel: {e}"))?;
        // The official plugin pings right after every open, then on its interval.
        let _ = sink
            .send(Message::Ping(Bytes::from_static(b"keepalive")))
            .await;
        Ok(Link {
            writer: Writer::spawn(sink),
            stream,
        })
    }

    /// The first connection, retried a few times like the official plugin.
    pub async fn open_initial(&self, url: &str, token: &str) -> Result<Link, String> {
        let mut last = String::new();
        for attempt in 0..6u32 {
            if attempt > 0 {
                tokio::time::sleep(backoff(attempt)).await;
            }
            match self.open(url, token).await {
                Ok(l) => return Ok(l),
                Err(e) => {
                    warn!("opening the data channel (attempt {}): {e}", attempt + 1);
                    last = e;
                }
            }
        }
        Err(last)
    }
}

/// A reconnect that succeeded: the new link and the token and URL it used.
pub struct Resumed {
    pub link: Link,
    pub token: String,
    pub url: String,
}

/// What a reconnect needs to know.
pub struct ReconnectJob {
    pub opener: Opener,
    pub session_id: String,
    pub url: String,
    pub why: String,
    pub budget: Duration,
    pub console: Console,
}

/// A task that aborts when dropped: a driver that returns leaves nothing running.
pub struct Task<T>(pub JoinHandle<T>);

impl<T> Drop for Task<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<T> std::future::Future for Task<T> {
    type Output = Result<T, tokio::task::JoinError>;
    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx)
    }
}

/// ResumeSession and reconnect, with back-off, until the budget ends: `Err` carries the
/// exit status after the failure was reported.
pub fn spawn_reconnect(job: ReconnectJob) -> Task<Result<Resumed, u8>> {
    Task(tokio::spawn(reconnect(job)))
}

async fn reconnect(job: ReconnectJob) -> Result<Resumed, u8> {
    let ReconnectJob {
        opener,
        session_id,
        mut url,
        why,
        budget,
        console,
    } = job;
    let deadline = Instant::now().checked_add(budget);
    let mut attempt = 0u32;
    loop {
        if attempt > 0 {
            let wait = backoff(attempt);
            if deadline.is_some_and(|d| Instant::now() + wait > d) {
                console.error(&format!(
                    "Cannot perform start session: the data channel was lost ({why}) and could not be resumed within {budget:?}"
                ));
                return Err(exit::SESSION_FAILED);
            }
            tokio::time::sleep(wait).await;
        }
        attempt += 1;
        match opener.api.resume(&session_id).await {
            Ok(None) => {
                console.status(&format!("Session: {session_id} timed out.\n"));
                return Err(exit::SESSION_FAILED);
            }
            Ok(Some((token, new_url))) => {
                if let Some(u) = new_url.filter(|u| !u.is_empty()) {
                    url = u;
                }
                match opener.open(&url, &token).await {
                    Ok(link) => {
                        info!("data channel resumed after {attempt} attempt(s)");
                        return Ok(Resumed { link, token, url });
                    }
                    Err(e) => warn!("reconnecting: {e}"),
                }
            }
            Err(e) if !e.retryable => {
                console.error(&format!(
                    "Cannot perform start session: the data channel was lost ({why}) and ResumeSession failed: {e}"
                ));
                return Err(exit::SESSION_FAILED);
            }
            Err(e) => warn!("ResumeSession: {e}"),
        }
    }
}

/// Exponential back-off with jitter: 100..200 ms doubling to 5..10 s.
pub fn backoff(attempt: u32) -> Duration {
    let base = 200u64.saturating_mul(1 << attempt.min(6));
    let capped = base.min(10_000);
    let jitter = rand::thread_rng().gen_range(0..=capped / 2);
    Duration::from_millis(capped / 2 + jitter)
}
