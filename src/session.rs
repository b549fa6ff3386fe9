//! The session driver: runs the [`ClientSession`] state machine over a real WebSocket,
//! starts the session mode when the handshake completes, and reconnects through
//! ResumeSession when the WebSocket fails.
//!
//! One task owns the state machine; nothing is shared or locked. Each loop turn moves
//! events to the mode (while its queue has room), user data into the channel (while the
//! send window has room), writes whatever pacing allows, then waits for the next frame,
//! timer, user data or ping tick. The mode ([`crate::modes`]) runs in its own task.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use ssm_wire::payload::OpenDataChannelInput;
use ssm_wire::session::{ClientSession, GeneratedDataKey, SessionEvent};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tracing::{debug, info, warn};

use crate::console::Console;
use crate::exit;
use crate::modes::{self, Down, ModeContext, ModeOutcome, Up};
use crate::options::Options;
use crate::transport::{self, TlsSettings, Ws};

/// A boxed future, for the [`SessionApi`] trait.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// SigV4 headers for a WebSocket upgrade (`None`: the URL is presigned).
pub type SignResult = Result<Option<Vec<(String, String)>>, ApiError>;
/// A new token and maybe a new stream URL; `None` when the session timed out.
pub type ResumeResult = Result<Option<(String, Option<String>)>, ApiError>;
/// A KMS data key: (plaintext, ciphertext blob).
pub type DataKeyResult = Result<(Vec<u8>, Vec<u8>), ApiError>;

/// Why an AWS API call failed, and whether trying again can help.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub message: String,
    pub retryable: bool,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// The AWS calls a session makes. Implemented over the AWS SDK in `main`; tests use the
/// simulator's endpoint through the same implementation.
pub trait SessionApi: Send + Sync {
    /// SigV4 headers for the WebSocket upgrade, `None` when the URL is presigned.
    fn sign<'a>(&'a self, url: &'a str) -> BoxFuture<'a, SignResult>;
    /// ResumeSession: a new token and maybe a new stream URL; `None` when timed out.
    fn resume<'a>(&'a self, session_id: &'a str) -> BoxFuture<'a, ResumeResult>;
    fn terminate<'a>(&'a self, session_id: &'a str) -> BoxFuture<'a, Result<(), ApiError>>;
    /// KMS GenerateDataKey: (plaintext, ciphertext blob).
    fn data_key<'a>(
        &'a self,
        key_id: &'a str,
        session_id: &'a str,
        target: &'a str,
    ) -> BoxFuture<'a, DataKeyResult>;
}

/// What a session needs to start.
pub struct SessionParams {
    pub session_id: String,
    pub token: String,
    pub stream_url: String,
    pub target: Option<String>,
    pub legacy_cli: bool,
    pub client_version: String,
    pub options: Options,
    pub tls: TlsSettings,
    pub console: Console,
}

type Sink = SplitSink<Ws, Message>;
type Stream = SplitStream<Ws>;

/// Frames waiting for the WebSocket writer task.
const WRITE_QUEUE: usize = 64;

/// The write half of the WebSocket, in its own task so that a peer that is slow to read
/// never stops this side from reading (two sides blocked on writes is a deadlock).
struct Writer {
    tx: mpsc::Sender<Message>,
    task: JoinHandle<()>,
}

impl Writer {
    fn spawn(mut sink: Sink) -> Writer {
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
    async fn close(self) {
        let Writer { tx, task } = self;
        drop(tx);
        let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
    }
}

/// Queue depths between driver and mode. Small on purpose: data waits in the kernel's
/// socket buffers, not here, so an interactive byte never queues behind megabytes. Paced,
/// one chunk (one frame) up is enough: the mode refills the slot as soon as the driver
/// takes it. Unpaced, a few chunks keep the driver busy while the mode is scheduled.
const UP_QUEUE_PACED: usize = 1;
const UP_QUEUE_UNPACED: usize = 4;
/// The mode's last word (`~.`, a terminating signal) beside the data queue.
const URGENT_QUEUE: usize = 2;
const DOWN_QUEUE: usize = 64;

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(1)
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

struct Running {
    handle: JoinHandle<ModeOutcome>,
    down: Option<mpsc::Sender<Down>>,
}

/// Runs the session to its end and returns the exit status.
pub async fn run(params: SessionParams, api: Arc<dyn SessionApi>) -> u8 {
    let console = params.console;
    console.status(&format!(
        "\nStarting session with SessionId: {}\n",
        params.session_id
    ));
    let mut driver = Driver::new(params, api);
    match driver.open_initial().await {
        Ok((writer, stream)) => driver.run(writer, stream).await,
        Err(e) => {
            console.error(&format!("Cannot perform start session: {e}"));
            exit::SESSION_FAILED
        }
    }
}

struct Driver {
    p: SessionParams,
    api: Arc<dyn SessionApi>,
    client_id: String,
    session: ClientSession,
    up_rx: Option<mpsc::Receiver<Up>>,
    urgent_rx: Option<mpsc::Receiver<Up>>,
    mode: Option<Running>,
    pending_up: Option<Bytes>,
    finishing: Option<(u8, Instant)>,
}

enum Turn {
    Continue,
    Exit(u8),
}

impl Driver {
    fn new(p: SessionParams, api: Arc<dyn SessionApi>) -> Driver {
        let seed: u64 = rand::thread_rng().gen();
        let channel = ssm_wire::channel::Channel::new(
            ssm_wire::channel::Role::Client,
            p.options.channel_config(seed),
            Instant::now().into_std(),
            unix_ms(),
        );
        let session = ClientSession::new(channel, p.client_version.clone(), p.legacy_cli);
        Driver {
            client_id: uuid::Uuid::new_v4().to_string(),
            p,
            api,
            session,
            up_rx: None,
            urgent_rx: None,
            mode: None,
            pending_up: None,
            finishing: None,
        }
    }

    /// Signs (when credentials exist), dials, and sends OpenDataChannel.
    async fn open(&self, url: &str, token: &str) -> Result<(Writer, Stream), String> {
        let headers = match self.api.sign(url).await {
            Ok(h) => h.unwrap_or_default(),
            Err(e) => {
                warn!("connecting without a SigV4 signature: {e}");
                Vec::new()
            }
        };
        let ws = transport::connect(url, &headers, &self.p.tls, env_var)
            .await
            .map_err(|e| e.to_string())?;
        let (mut sink, stream) = ws.split();
        let open = OpenDataChannelInput {
            message_schema_version: "1.0".to_owned(),
            request_id: uuid::Uuid::new_v4().to_string(),
            token_value: token.to_owned(),
            client_id: self.client_id.clone(),
            client_version: self.p.client_version.clone(),
        };
        let text = serde_json::to_string(&open).map_err(|e| e.to_string())?;
        sink.send(Message::text(text))
            .await
            .map_err(|e| format!("sending OpenDataChannel: {e}"))?;
        // The official plugin pings right after every open, then on its interval.
        let _ = sink
            .send(Message::Ping(Bytes::from_static(b"keepalive")))
            .await;
        Ok((Writer::spawn(sink), stream))
    }

    /// The first connection, retried a few times like the official plugin.
    async fn open_initial(&mut self) -> Result<(Writer, Stream), String> {
        let mut last = String::new();
        for attempt in 0..6u32 {
            if attempt > 0 {
                tokio::time::sleep(backoff(attempt)).await;
            }
            match self.open(&self.p.stream_url, &self.p.token).await {
                Ok(s) => return Ok(s),
                Err(e) => {
                    warn!("opening the data channel (attempt {}): {e}", attempt + 1);
                    last = e;
                }
            }
        }
        Err(last)
    }

    /// After the WebSocket failed: ResumeSession and reconnect, until the budget ends.
    /// Once the session is finishing (stdin EOF, a signal) there is nothing left worth a
    /// reconnect: exit with the finishing status instead of hanging on the budget.
    async fn reconnect(&mut self, why: &str) -> Result<(Writer, Stream), u8> {
        if let Some((code, _)) = self.finishing {
            warn!("data channel lost ({why}) while finishing; exiting");
            return Err(code);
        }
        warn!("data channel lost ({why}); resuming the session");
        self.session.channel_mut().transport_lost();
        let deadline = Instant::now() + self.p.options.reconnect_timeout;
        let mut attempt = 0u32;
        loop {
            if attempt > 0 {
                let wait = backoff(attempt);
                if Instant::now() + wait > deadline {
                    self.p.console.error(&format!(
                        "Cannot perform start session: the data channel was lost ({why}) and could not be resumed within {:?}",
                        self.p.options.reconnect_timeout
                    ));
                    return Err(exit::SESSION_FAILED);
                }
                tokio::time::sleep(wait).await;
            }
            attempt += 1;
            match self.api.resume(&self.p.session_id).await {
                Ok(None) => {
                    self.p
                        .console
                        .status(&format!("Session: {} timed out.\n", self.p.session_id));
                    return Err(exit::SESSION_FAILED);
                }
                Ok(Some((token, url))) => {
                    if let Some(url) = url.filter(|u| !u.is_empty()) {
                        self.p.stream_url = url;
                    }
                    self.p.token = token;
                    match self.open(&self.p.stream_url, &self.p.token).await {
                        Ok(s) => {
                            info!("data channel resumed after {attempt} attempt(s)");
                            self.session
                                .channel_mut()
                                .transport_restored(Instant::now().into_std());
                            return Ok(s);
                        }
                        Err(e) => warn!("reconnecting: {e}"),
                    }
                }
                Err(e) if !e.retryable => {
                    self.p.console.error(&format!(
                        "Cannot perform start session: the data channel was lost ({why}) and ResumeSession failed: {e}"
                    ));
                    return Err(exit::SESSION_FAILED);
                }
                Err(e) => warn!("ResumeSession: {e}"),
            }
        }
    }

    async fn run(&mut self, mut writer: Writer, stream: Stream) -> u8 {
        let code = self.run_inner(&mut writer, stream).await;
        let _ = self.transmit(&writer, Instant::now());
        writer.close().await;
        code
    }

    async fn run_inner(&mut self, writer: &mut Writer, mut stream: Stream) -> u8 {
        let mut status = tokio::time::interval(Duration::from_secs(5));
        let mut ping = tokio::time::interval_at(
            Instant::now() + self.p.options.ping_interval,
            self.p.options.ping_interval,
        );
        loop {
            let now = Instant::now();
            if let Turn::Exit(code) = self.pump_events(now).await {
                return code;
            }
            self.feed_up(now);
            if let Err(e) = self.transmit(writer, now) {
                match self.reconnect(&e).await {
                    Ok((w, r)) => {
                        *writer = w;
                        stream = r;
                        continue;
                    }
                    Err(code) => return self.finish_mode(code).await,
                }
            }
            if let Some((code, deadline)) = self.finishing {
                if self.session.channel().is_flushed() {
                    return code;
                }
                if now >= deadline {
                    warn!(
                        "exiting with {} message(s) unacknowledged after {:?}",
                        self.session.channel().in_flight(),
                        self.p.options.flush_timeout
                    );
                    return code;
                }
            }
            let timer = self
                .session
                .channel_mut()
                .poll_timeout()
                .map(Instant::from_std);
            let finish_at = self.finishing.map(|(_, d)| d);
            // Paced, user data is taken only when a token is there to send it: what waits
            // for a token waits in the mode's single slot, where a keystroke on another
            // connection can still go first, not in the channel's queue.
            let next_send = self
                .session
                .channel_mut()
                .next_send_at(now.into_std())
                .map(Instant::from_std);
            // Until that token the data queue is not watched, so wake for it: once a
            // token is there, the queue is watched again (one wake-up per burst at most).
            let wake = [timer, finish_at, next_send].into_iter().flatten().min();
            let can_take_up = self.finishing.is_none()
                && self.pending_up.is_none()
                && next_send.is_none()
                && self.session.channel().can_send();
            // Events are left only when the mode's queue was full; wait for room. (Testing
            // the queue's capacity here instead would race with the mode taking an item.)
            let down_blocked = self.mode.as_ref().is_some_and(|m| m.down.is_some())
                && self.session.has_pending_events();
            let down_tx = self.mode.as_ref().and_then(|m| m.down.clone());
            // Receive backpressure: while the user side has not taken what was delivered,
            // stop reading the WebSocket (TCP holds the agent back) instead of dropping.
            let wants_input = self.session.channel().wants_input();
            let writer_full = writer.tx.capacity() == 0;
            let writer_tx = writer.tx.clone();
            let up_rx = self.up_rx.as_mut();
            let urgent_rx = self.urgent_rx.as_mut();
            let urgent_open = urgent_rx.is_some();
            tokio::select! {
                biased;
                msg = stream.next(), if wants_input => {
                    let now = Instant::now().into_std();
                    match msg {
                        Some(Ok(Message::Binary(b))) => {
                            if let Err(e) = self.session.handle_frame(now, b) {
                                debug!("dropped frame: {e}");
                            }
                        }
                        Some(Ok(Message::Text(t))) => {
                            let b = Bytes::copy_from_slice(t.as_bytes());
                            if let Err(e) = self.session.handle_frame(now, b) {
                                debug!("dropped text frame: {e}");
                            }
                        }
                        Some(Ok(Message::Close(frame))) => {
                            let why = frame.map(|f| format!("closed by the service: {} {}", f.code, f.reason)).unwrap_or_else(|| "closed by the service".to_owned());
                            match self.reconnect(&why).await {
                                Ok((w, r)) => { *writer = w; stream = r; }
                                Err(code) => return self.finish_mode(code).await,
                            }
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => {
                            match self.reconnect(&e.to_string()).await {
                                Ok((w, r)) => { *writer = w; stream = r; }
                                Err(code) => return self.finish_mode(code).await,
                            }
                        }
                        None => {
                            match self.reconnect("connection closed").await {
                                Ok((w, r)) => { *writer = w; stream = r; }
                                Err(code) => return self.finish_mode(code).await,
                            }
                        }
                    }
                }
                _ = sleep_until_opt(wake) => {
                    self.session.handle_timeout(Instant::now().into_std());
                }
                // Before the data queue: a mode sends its last word here and then ends,
                // and the end of the data queue must not be taken for the whole story.
                up = recv_opt(urgent_rx), if urgent_open => match up {
                    Some(up) => {
                        if let Turn::Exit(code) = self.on_up(Some(up)).await {
                            return code;
                        }
                    }
                    None => self.urgent_rx = None,
                },
                up = recv_opt(up_rx), if can_take_up => {
                    if let Turn::Exit(code) = self.on_up(up).await {
                        return code;
                    }
                }
                _ = reserve_opt(down_tx), if down_blocked => {}
                _ = writer_tx.reserve(), if writer_full => {}
                _ = status.tick(), if tracing::enabled!(tracing::Level::DEBUG) => {
                    let ch = self.session.channel();
                    debug!(
                        "channel: in flight {}, undelivered {} B in {} events, reading {}, down blocked {}, writer full {}, mode {}, {:?}",
                        ch.in_flight(),
                        ch.undelivered_bytes(),
                        ch.pending_events(),
                        wants_input,
                        down_blocked,
                        writer_full,
                        self.mode.is_some(),
                        ch.stats()
                    );
                }
                _ = ping.tick() => {
                    if writer.tx.try_send(Message::Ping(Bytes::from_static(b"keepalive"))).is_err() {
                        debug!("ping not queued: writer busy or gone");
                    }
                }
            }
        }
    }

    /// Queues every frame pacing allows now, while the writer has room.
    fn transmit(&mut self, writer: &Writer, now: Instant) -> Result<(), String> {
        if writer.tx.is_closed() {
            return Err("the WebSocket connection failed".to_owned());
        }
        while writer.tx.capacity() > 0 {
            let Some(frame) = self.session.channel_mut().poll_transmit(now.into_std()) else {
                break;
            };
            writer
                .tx
                .try_send(Message::Binary(frame))
                .map_err(|_| "the WebSocket connection failed".to_owned())?;
        }
        Ok(())
    }

    /// Moves pending user data into the channel while the window allows.
    fn feed_up(&mut self, now: Instant) {
        while let Some(mut data) = self.pending_up.take() {
            if !self.session.channel().can_send() {
                self.pending_up = Some(data);
                return;
            }
            match self.session.send_output(now.into_std(), &data) {
                Ok(n) => {
                    let rest = data.split_off(n);
                    if !rest.is_empty() {
                        self.pending_up = Some(rest);
                    }
                }
                Err(ssm_wire::channel::SendError::WindowFull) => {
                    self.pending_up = Some(data);
                    return;
                }
                Err(e) => {
                    warn!("dropping user data: {e}");
                    return;
                }
            }
        }
    }

    async fn on_up(&mut self, up: Option<Up>) -> Turn {
        let now = Instant::now();
        match up {
            Some(Up::Data(b)) => {
                if !b.is_empty() {
                    self.pending_up = Some(b);
                    self.feed_up(now);
                }
            }
            Some(Up::Size(size)) => {
                if let Err(e) = self.session.send_size(now.into_std(), size) {
                    debug!("size not sent: {e}");
                }
            }
            Some(Up::Flag(flag)) => {
                if let Err(e) = self.session.send_flag(now.into_std(), flag) {
                    warn!("flag not sent: {e}");
                }
            }
            Some(Up::TerminateApi) => {
                if let Err(e) = self.api.terminate(&self.p.session_id).await {
                    self.p
                        .console
                        .error(&format!("\nTerminateSession failed: {e}"));
                }
                return Turn::Exit(exit::OK);
            }
            Some(Up::Finish(code)) => {
                self.up_rx = None;
                self.finishing = Some((code, now + self.p.options.flush_timeout));
            }
            None => {
                // The mode ended without saying how: collect its outcome and finish.
                self.up_rx = None;
                let code = self.finish_mode(exit::OK).await;
                self.finishing = Some((code, now + self.p.options.flush_timeout));
            }
        }
        Turn::Continue
    }

    /// Closes the mode's queue and waits for it to write what it holds and clean up.
    async fn finish_mode(&mut self, default: u8) -> u8 {
        let Some(mut running) = self.mode.take() else {
            return default;
        };
        running.down = None;
        match (&mut running.handle).await {
            Ok(outcome) => match (outcome.failed, outcome.exit_code) {
                (Some(status), _) if default == exit::OK => status,
                (None, Some(c)) if default == exit::OK => exit_status(c),
                _ => default,
            },
            Err(e) => {
                warn!("session mode task failed: {e}");
                if default == exit::OK {
                    exit::SESSION_FAILED
                } else {
                    default
                }
            }
        }
    }

    /// Handles session events while the mode can take them.
    async fn pump_events(&mut self, now: Instant) -> Turn {
        loop {
            if let Some(d) = self.mode.as_ref().and_then(|m| m.down.as_ref()) {
                if d.capacity() == 0 {
                    return Turn::Continue;
                }
            }
            let Some(ev) = self.session.poll_event(now.into_std()) else {
                return Turn::Continue;
            };
            if let Turn::Exit(code) = self.on_event(ev).await {
                return Turn::Exit(code);
            }
        }
    }

    fn send_to_mode(&mut self, d: Down) {
        match self.mode.as_ref().and_then(|m| m.down.as_ref()) {
            // Capacity was checked before the event was taken.
            Some(tx) => {
                if tx.try_send(d).is_err() {
                    warn!("session mode is gone; output dropped");
                }
            }
            None => debug!("output before the session started: {d:?}"),
        }
    }

    async fn on_event(&mut self, ev: SessionEvent) -> Turn {
        let console = self.p.console;
        match ev {
            SessionEvent::DataKeyRequired { key_id, .. } => {
                let now = Instant::now().into_std();
                let result = match &self.p.target {
                    None => Err(
                        "the StartSession parameters have no Target, which KMS encryption needs"
                            .to_owned(),
                    ),
                    Some(target) => self
                        .api
                        .data_key(&key_id, &self.p.session_id, target)
                        .await
                        .map(|(plaintext, ciphertext_blob)| GeneratedDataKey {
                            plaintext,
                            ciphertext_blob,
                        })
                        .map_err(|e| e.to_string()),
                };
                self.session.provide_data_key(now, result);
            }
            SessionEvent::Ready {
                info,
                customer_message,
            } => {
                if let Some(m) = customer_message {
                    console.status(&format!("{m}\n"));
                }
                let kind = modes::select(&info);
                info!(
                    "session ready: type {} ({kind:?}), agent {}",
                    info.session_type, info.agent_version
                );
                let up_queue = if self.p.options.packets_per_second.is_some() {
                    UP_QUEUE_PACED
                } else {
                    UP_QUEUE_UNPACED
                };
                let (up_tx, up_rx) = mpsc::channel(up_queue);
                let (urgent_tx, urgent_rx) = mpsc::channel(URGENT_QUEUE);
                let (down_tx, down_rx) = mpsc::channel(DOWN_QUEUE);
                let ctx = ModeContext {
                    session_id: self.p.session_id.clone(),
                    info,
                    up: up_tx,
                    urgent: urgent_tx,
                    down: down_rx,
                    console,
                    options: self.p.options.clone(),
                    frame_data: self.session.max_data_chunk(),
                };
                self.up_rx = Some(up_rx);
                self.urgent_rx = Some(urgent_rx);
                self.mode = Some(Running {
                    handle: tokio::spawn(modes::run(kind, ctx)),
                    down: Some(down_tx),
                });
            }
            SessionEvent::Output(b) => self.send_to_mode(Down::Output(b)),
            SessionEvent::StdErr(b) => self.send_to_mode(Down::StdErr(b)),
            SessionEvent::ExitCode(c) => self.send_to_mode(Down::ExitCode(c)),
            SessionEvent::Flag(f) => self.send_to_mode(Down::Flag(f)),
            SessionEvent::Closed(closed) => {
                let code = self.finish_mode(exit::OK).await;
                if closed.output.is_empty() {
                    console.status(&format!(
                        "\n\nExiting session with sessionId: {}.\n\n",
                        self.p.session_id
                    ));
                } else {
                    console.status(&format!(
                        "\n\nSessionId: {} : {}\n\n",
                        self.p.session_id, closed.output
                    ));
                }
                return Turn::Exit(code);
            }
            SessionEvent::Paused => info!("service paused publication"),
            SessionEvent::Resumed => info!("service resumed publication"),
            SessionEvent::RetransmitTimeout => {
                console.error(&format!(
                    "Cannot perform start session: the agent stopped acknowledging data for {:?}; terminating the session",
                    self.session.channel().config().give_up_after
                ));
                if let Err(e) = self.api.terminate(&self.p.session_id).await {
                    console.error(&format!("TerminateSession failed: {e}"));
                }
                let code = self.finish_mode(exit::SESSION_FAILED).await;
                return Turn::Exit(code);
            }
            SessionEvent::Failed(why) => {
                console.error(&format!("Cannot perform start session: {why}"));
                let code = self.finish_mode(exit::SESSION_FAILED).await;
                // Let the response that reports the failure reach the agent.
                self.finishing = Some((code, Instant::now() + Duration::from_secs(2)));
            }
        }
        Turn::Continue
    }
}

/// The plugin's exit status for a remote exit code (0..=255, negative and larger values
/// folded the way a shell reports them).
pub fn exit_status(code: i32) -> u8 {
    (code & 0xff) as u8
}

fn backoff(attempt: u32) -> Duration {
    let base = 200u64.saturating_mul(1 << attempt.min(6));
    let capped = base.min(10_000);
    let jitter = rand::thread_rng().gen_range(0..=capped / 2);
    Duration::from_millis(capped / 2 + jitter)
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

async fn recv_opt(rx: Option<&mut mpsc::Receiver<Up>>) -> Option<Up> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn reserve_opt(tx: Option<mpsc::Sender<Down>>) {
    match tx {
        Some(tx) => {
            let _ = tx.reserve().await;
        }
        None => std::future::pending().await,
    }
}
