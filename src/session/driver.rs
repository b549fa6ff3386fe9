//! The session driver: one task, one poll loop, owning the [`ClientSession`] state machine.
//!
//! Each turn moves events to the mode (while its queue has room), user data into the
//! channel (while the send window and the pacer allow), writes what pacing allows, and
//! then waits for whichever comes first: a frame, a timer, user data, the mode's urgent
//! word (`~.`, a terminating signal), a reconnect, KMS or TerminateSession task finishing,
//! the mode ending, room in a queue, a ping tick. Nothing slow is awaited inline: in every
//! state (handshake, steady, window full, agent silent, reconnecting, flushing, ending)
//! the loop answers within one turn.
//!
//! How a session ends:
//! - **finishing**: the mode said [`Up::Finish`] (stdin EOF, a signal). Wait until
//!   everything sent is acknowledged (bounded by `SSM_PLUGIN_FLUSH_TIMEOUT`), then exit
//!   with the mode's status; at once if the link is down.
//! - **ending**: the session is over (channel_closed, the agent stopped acknowledging,
//!   the reconnect gave up, `~.`). The mode's queue is closed so it writes what it holds
//!   and returns; the driver waits for it (and for TerminateSession when one was called),
//!   bounded by `SSM_PLUGIN_FLUSH_TIMEOUT`, then exits with the status the ending and the
//!   mode's outcome decide.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::StreamExt;
use rand::Rng;
use ssm_wire::session::{ClientSession, GeneratedDataKey, SessionEvent};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tracing::{debug, info, warn};

use super::link::{spawn_reconnect, Link, Opener, ReconnectJob, Resumed, Task};
use super::{exit_status, ApiError, Env, ModeStarter, SessionApi, SessionParams};
use crate::exit;
use crate::modes::{self, Down, ModeContext, ModeOutcome, Up};

/// Queue depths between driver and mode. Small on purpose: data waits in the kernel's
/// socket buffers, not here, so an interactive byte never queues behind megabytes. Paced,
/// one chunk (one frame) up is enough: the mode refills the slot as soon as the driver
/// takes it. Unpaced, a few chunks keep the driver busy while the mode is scheduled.
const UP_QUEUE_PACED: usize = 1;
const UP_QUEUE_UNPACED: usize = 4;
/// The mode's last word (`~.`, a terminating signal) beside the data queue.
const URGENT_QUEUE: usize = 2;
const DOWN_QUEUE: usize = 64;
/// After a handshake failure, how long the response that reports it may take to reach
/// the agent.
const FAILURE_FLUSH: Duration = Duration::from_secs(2);

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(1)
}

/// Runs the session to its end and returns the exit status.
pub async fn run(params: SessionParams, api: Arc<dyn SessionApi>, env: Env) -> u8 {
    let console = params.console;
    console.status(&format!(
        "\nStarting session with SessionId: {}\n",
        params.session_id
    ));
    let mut driver = Driver::new(params, api, env);
    let link = driver
        .opener
        .open_initial(&driver.p.stream_url, &driver.p.token)
        .await;
    match link {
        Ok(link) => driver.run(link).await,
        Err(e) => {
            console.error(&format!("Cannot perform start session: {e}"));
            exit::SESSION_FAILED
        }
    }
}

struct Running {
    handle: Task<ModeOutcome>,
    down: Option<mpsc::Sender<Down>>,
}

/// The session is over; the driver waits for the mode (and TerminateSession) to finish.
struct Ending {
    /// The status unless the mode's outcome or the remote exit code says otherwise.
    code: u8,
    /// Printed once the mode has written what it held.
    status: Option<String>,
    deadline: Instant,
    terminate: Option<Task<Result<(), ApiError>>>,
}

struct Driver {
    p: SessionParams,
    api: Arc<dyn SessionApi>,
    opener: Opener,
    modes: ModeStarter,
    session: ClientSession,
    link: Option<Link>,
    reconnecting: Option<Task<Result<Resumed, u8>>>,
    data_key: Option<Task<Result<GeneratedDataKey, String>>>,
    up_rx: Option<mpsc::Receiver<Up>>,
    urgent_rx: Option<mpsc::Receiver<Up>>,
    mode: Option<Running>,
    /// The mode's outcome once it ended (`Err`: its task failed).
    mode_outcome: Option<Result<ModeOutcome, String>>,
    /// The remote command's exit code, as the driver saw it go to the mode.
    exit_code: Option<i32>,
    pending_up: Option<Bytes>,
    finishing: Option<(u8, Instant)>,
    ending: Option<Ending>,
    /// channel_closed carried an error Output.
    closed_with_output: bool,
}

impl Driver {
    fn new(p: SessionParams, api: Arc<dyn SessionApi>, env: Env) -> Driver {
        let seed: u64 = rand::thread_rng().gen();
        let channel = ssm_wire::channel::Channel::new(
            ssm_wire::channel::Role::Client,
            p.options.channel_config(seed),
            Instant::now().into_std(),
            unix_ms(),
        );
        let session = ClientSession::new(channel, p.client_version.clone(), p.legacy_cli);
        let opener = Opener {
            api: api.clone(),
            connector: env.connector,
            client_id: uuid::Uuid::new_v4().to_string(),
            client_version: p.client_version.clone(),
        };
        Driver {
            p,
            api,
            opener,
            modes: env.modes,
            session,
            link: None,
            reconnecting: None,
            data_key: None,
            up_rx: None,
            urgent_rx: None,
            mode: None,
            mode_outcome: None,
            exit_code: None,
            pending_up: None,
            finishing: None,
            ending: None,
            closed_with_output: false,
        }
    }

    async fn run(&mut self, link: Link) -> u8 {
        self.link = Some(link);
        let code = self.run_loop().await;
        if self.link.is_some() {
            let _ = self.transmit(Instant::now());
        }
        if let Some(link) = self.link.take() {
            link.writer.close().await;
        }
        code
    }

    async fn run_loop(&mut self) -> u8 {
        let mut status = tokio::time::interval(Duration::from_secs(5));
        let mut ping = tokio::time::interval_at(
            Instant::now() + self.p.options.ping_interval,
            self.p.options.ping_interval,
        );
        loop {
            let now = Instant::now();
            self.pump_events(now);
            self.feed_up(now);
            if self.link.is_some() {
                if let Err(e) = self.transmit(now) {
                    self.link_lost(&e);
                }
            }
            if let Some(code) = self.check_end(now) {
                return code;
            }
            let timer = self
                .session
                .channel_mut()
                .poll_timeout()
                .map(Instant::from_std);
            // Paced, user data is taken only when a token is there to send it: what waits
            // for a token waits in the mode's single slot, where a keystroke on another
            // connection can still go first, not in the channel's queue.
            let next_send = self
                .session
                .channel_mut()
                .next_send_at(now.into_std())
                .map(Instant::from_std);
            let deadline = self
                .finishing
                .map(|(_, d)| d)
                .or(self.ending.as_ref().map(|e| e.deadline));
            // Until that token the data queue is not watched, so wake for it: once a
            // token is there, the queue is watched again (one wake-up per burst at most).
            let wake = [timer, deadline, next_send].into_iter().flatten().min();
            let can_take_up = self.finishing.is_none()
                && self.ending.is_none()
                && self.pending_up.is_none()
                && next_send.is_none()
                && self.link.is_some()
                && self.session.channel().can_send();
            // Events are left only when the mode's queue was full; wait for room. (Testing
            // the queue's capacity here instead would race with the mode taking an item.)
            let down_tx = self.mode.as_ref().and_then(|m| m.down.clone());
            let down_blocked = down_tx.is_some() && self.session.has_pending_events();
            // Receive backpressure: while the user side has not taken what was delivered,
            // stop reading the WebSocket (TCP holds the agent back) instead of dropping.
            let wants_input = self.session.channel().wants_input();
            let writer_tx = self.link.as_ref().map(|l| l.writer.tx.clone());
            let writer_full = writer_tx.as_ref().is_some_and(|tx| tx.capacity() == 0);
            let stream = self.link.as_mut().map(|l| &mut l.stream);
            let reading = stream.is_some() && wants_input;
            let urgent_open = self.urgent_rx.is_some();
            let urgent_rx = self.urgent_rx.as_mut();
            let up_rx = self.up_rx.as_mut();
            let mode_running = self.mode.is_some();
            let mode_handle = self.mode.as_mut().map(|m| &mut m.handle);
            let reconnecting = self.reconnecting.as_mut();
            let data_key = self.data_key.as_mut();
            let terminate = self.ending.as_mut().and_then(|e| e.terminate.as_mut());
            tokio::select! {
                biased;
                // Before the data queue: a mode sends its last word here and then ends,
                // and the end of the data queue must not be taken for the whole story.
                up = recv_opt(urgent_rx), if urgent_open => match up {
                    Some(up) => self.on_up(up),
                    None => self.urgent_rx = None,
                },
                r = opt(reconnecting) => {
                    self.reconnecting = None;
                    self.on_reconnected(r);
                }
                k = opt(data_key) => {
                    self.data_key = None;
                    let k = k.unwrap_or_else(|e| Err(format!("the KMS call failed: {e}")));
                    self.session.provide_data_key(Instant::now().into_std(), k);
                }
                t = opt(terminate) => {
                    if let Some(e) = self.ending.as_mut() {
                        e.terminate = None;
                    }
                    match t {
                        Ok(Ok(())) => info!("TerminateSession called"),
                        Ok(Err(e)) => self.p.console.error(&format!("\nTerminateSession failed: {e}")),
                        Err(e) => warn!("TerminateSession task failed: {e}"),
                    }
                }
                msg = next_opt(stream), if reading => self.on_message(msg),
                _ = sleep_until_opt(wake) => {
                    self.session.handle_timeout(Instant::now().into_std());
                }
                up = recv_opt(up_rx), if can_take_up => match up {
                    Some(up) => self.on_up(up),
                    None => {
                        self.up_rx = None;
                        self.after_mode();
                    }
                },
                // After the queues: what a mode sent before it returned is taken first.
                outcome = opt(mode_handle), if mode_running => {
                    self.mode = None;
                    self.mode_outcome = Some(outcome.map_err(|e| e.to_string()));
                    self.after_mode();
                }
                _ = reserve_opt(down_tx), if down_blocked => {}
                _ = reserve_msg(writer_tx), if writer_full => {}
                _ = status.tick(), if tracing::enabled!(tracing::Level::DEBUG) => self.log_status(),
                _ = ping.tick() => {
                    if let Some(link) = &self.link {
                        if link.writer.tx.try_send(Message::Ping(Bytes::from_static(b"keepalive"))).is_err() {
                            debug!("ping not queued: writer busy or gone");
                        }
                    }
                }
            }
        }
    }

    fn log_status(&self) {
        let ch = self.session.channel();
        debug!(
            "channel: in flight {}, undelivered {} B in {} events, link {}, reconnecting {}, mode {}, finishing {}, ending {}, {:?}",
            ch.in_flight(),
            ch.undelivered_bytes(),
            ch.pending_events(),
            self.link.is_some(),
            self.reconnecting.is_some(),
            self.mode.is_some(),
            self.finishing.is_some(),
            self.ending.is_some(),
            ch.stats()
        );
    }

    /// The exit status, once the session may exit.
    fn check_end(&mut self, now: Instant) -> Option<u8> {
        if let Some(e) = &self.ending {
            let waiting = self.mode.is_some() || e.terminate.is_some();
            if waiting && now < e.deadline {
                return None;
            }
            if waiting {
                warn!(
                    "exiting: the session mode did not finish within {:?}",
                    self.p.options.flush_timeout
                );
            }
            let e = self.ending.take()?;
            if let Some(s) = &e.status {
                self.p.console.status(s);
            }
            return Some(self.final_code(e.code));
        }
        let (code, deadline) = self.finishing?;
        if self.link.is_none() {
            // Reconnecting (or the link is gone): nothing can be flushed, and what the
            // user asked for (a signal, the end of input) must not wait for a reconnect.
            warn!("exiting while the data channel is down");
            return Some(code);
        }
        if self.session.channel().is_flushed() {
            return Some(code);
        }
        if now >= deadline {
            warn!(
                "exiting with {} message(s) unacknowledged after {:?}",
                self.session.channel().in_flight(),
                self.p.options.flush_timeout
            );
            return Some(code);
        }
        None
    }

    /// `default` unless the mode failed, or the remote command gave its exit code, while
    /// the session was ending normally.
    fn final_code(&self, default: u8) -> u8 {
        let outcome = match &self.mode_outcome {
            Some(Ok(o)) => *o,
            Some(Err(e)) => {
                warn!("session mode task failed: {e}");
                return if default == exit::OK {
                    exit::SESSION_FAILED
                } else {
                    default
                };
            }
            None => ModeOutcome::default(),
        };
        if let Some(status) = outcome.failed {
            if default == exit::OK {
                return status;
            }
        }
        match outcome.exit_code.or(self.exit_code) {
            Some(c) if default == exit::OK || self.ending_prefers_exit_code(default) => {
                exit_status(c)
            }
            _ => default,
        }
    }

    /// A channel_closed with an error Output ends with status 1, unless the remote
    /// command already produced its own status.
    fn ending_prefers_exit_code(&self, default: u8) -> bool {
        default == exit::SESSION_FAILED && self.closed_with_output
    }

    /// The mode ended or closed its data queue: once both, finish with its status.
    fn after_mode(&mut self) {
        if self.mode.is_some() || self.up_rx.is_some() {
            return;
        }
        if self.finishing.is_none() && self.ending.is_none() {
            let code = self.final_code(exit::OK);
            self.finishing = Some((code, Instant::now() + self.p.options.flush_timeout));
        }
    }

    /// Ends the session: the mode's queue closes so it writes what it holds and returns.
    fn end(&mut self, code: u8, status: Option<String>, terminate: bool) {
        if self.ending.is_some() {
            return;
        }
        if let Some(m) = self.mode.as_mut() {
            m.down = None;
        }
        let terminate = terminate.then(|| {
            let api = self.api.clone();
            let id = self.p.session_id.clone();
            Task(tokio::spawn(async move { api.terminate(&id).await }))
        });
        self.reconnecting = None;
        self.finishing = None;
        self.ending = Some(Ending {
            code,
            status,
            deadline: Instant::now() + self.p.options.flush_timeout,
            terminate,
        });
    }

    /// The WebSocket failed: resume in the background (or, when finishing, exit).
    fn link_lost(&mut self, why: &str) {
        self.link = None;
        if self.finishing.is_some() || self.ending.is_some() {
            warn!("data channel lost ({why}) while finishing");
            return;
        }
        if self.reconnecting.is_some() {
            return;
        }
        warn!("data channel lost ({why}); resuming the session");
        self.session.channel_mut().transport_lost();
        self.reconnecting = Some(spawn_reconnect(ReconnectJob {
            opener: self.opener.clone(),
            session_id: self.p.session_id.clone(),
            url: self.p.stream_url.clone(),
            why: why.to_owned(),
            budget: self.p.options.reconnect_timeout,
            console: self.p.console,
        }));
    }

    fn on_reconnected(&mut self, r: Result<Result<Resumed, u8>, tokio::task::JoinError>) {
        match r {
            Ok(Ok(resumed)) => {
                self.p.token = resumed.token;
                self.p.stream_url = resumed.url;
                self.link = Some(resumed.link);
                self.session
                    .channel_mut()
                    .transport_restored(Instant::now().into_std());
            }
            Ok(Err(code)) => self.end(code, None, false),
            Err(e) => {
                self.p.console.error(&format!(
                    "Cannot perform start session: reconnecting failed: {e}"
                ));
                self.end(exit::SESSION_FAILED, None, false);
            }
        }
    }

    fn on_message(&mut self, msg: Option<Result<Message, String>>) {
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
                let why = frame
                    .map(|f| format!("closed by the service: {} {}", f.code, f.reason))
                    .unwrap_or_else(|| "closed by the service".to_owned());
                self.link_lost(&why);
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => self.link_lost(&e),
            None => self.link_lost("connection closed"),
        }
    }

    /// Queues every frame pacing allows now, while the writer has room.
    fn transmit(&mut self, now: Instant) -> Result<(), String> {
        let Some(link) = &self.link else {
            return Ok(());
        };
        let tx = &link.writer.tx;
        if tx.is_closed() {
            return Err("the WebSocket connection failed".to_owned());
        }
        while tx.capacity() > 0 {
            let Some(frame) = self.session.channel_mut().poll_transmit(now.into_std()) else {
                break;
            };
            tx.try_send(Message::Binary(frame))
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
                    // Not silently: the session cannot carry the user's data any more.
                    self.p.console.error(&format!(
                        "Cannot perform start session: sending data failed: {e}"
                    ));
                    self.end(exit::SESSION_FAILED, None, false);
                    return;
                }
            }
        }
    }

    fn on_up(&mut self, up: Up) {
        let now = Instant::now();
        match up {
            Up::Data(b) => {
                if !b.is_empty() && self.ending.is_none() {
                    self.pending_up = Some(b);
                    self.feed_up(now);
                }
            }
            Up::Size(size) => {
                if let Err(e) = self.session.send_size(now.into_std(), size) {
                    debug!("size not sent: {e}");
                }
            }
            Up::Flag(flag) => {
                if let Err(e) = self.session.send_flag(now.into_std(), flag) {
                    warn!("flag not sent: {e}");
                }
            }
            Up::TerminateApi => self.end(exit::OK, None, true),
            Up::Finish(code) => {
                self.up_rx = None;
                if self.ending.is_none() && self.finishing.is_none() {
                    self.finishing = Some((code, now + self.p.options.flush_timeout));
                }
            }
        }
    }

    /// Handles session events while the mode can take them.
    fn pump_events(&mut self, now: Instant) {
        loop {
            if let Some(d) = self.mode.as_ref().and_then(|m| m.down.as_ref()) {
                if d.capacity() == 0 {
                    return;
                }
            }
            let Some(ev) = self.session.poll_event(now.into_std()) else {
                return;
            };
            self.on_event(ev);
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
            None => debug!("output with no session mode running: {d:?}"),
        }
    }

    fn on_event(&mut self, ev: SessionEvent) {
        let console = self.p.console;
        match ev {
            SessionEvent::DataKeyRequired { key_id, .. } => match &self.p.target {
                None => self.session.provide_data_key(
                    Instant::now().into_std(),
                    Err(
                        "the StartSession parameters have no Target, which KMS encryption needs"
                            .to_owned(),
                    ),
                ),
                Some(target) => {
                    let api = self.api.clone();
                    let (id, target) = (self.p.session_id.clone(), target.clone());
                    self.data_key = Some(Task(tokio::spawn(async move {
                        api.data_key(&key_id, &id, &target)
                            .await
                            .map(|(plaintext, ciphertext_blob)| GeneratedDataKey {
                                plaintext,
                                ciphertext_blob,
                            })
                            .map_err(|e| e.to_string())
                    })));
                }
            },
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
                    handle: Task(tokio::spawn((self.modes)(kind, ctx))),
                    down: Some(down_tx),
                });
            }
            SessionEvent::Output(b) => self.send_to_mode(Down::Output(b)),
            SessionEvent::StdErr(b) => self.send_to_mode(Down::StdErr(b)),
            SessionEvent::ExitCode(c) => {
                self.exit_code = Some(c);
                self.send_to_mode(Down::ExitCode(c));
            }
            SessionEvent::Flag(f) => self.send_to_mode(Down::Flag(f)),
            SessionEvent::Closed(closed) => {
                let (code, status) = if closed.output.is_empty() {
                    (
                        exit::OK,
                        format!(
                            "\n\nExiting session with sessionId: {}.\n\n",
                            self.p.session_id
                        ),
                    )
                } else {
                    self.closed_with_output = true;
                    (
                        exit::SESSION_FAILED,
                        format!(
                            "\n\nSessionId: {} : {}\n\n",
                            self.p.session_id, closed.output
                        ),
                    )
                };
                self.end(code, Some(status), false);
            }
            SessionEvent::Paused => info!("service paused publication"),
            SessionEvent::Resumed => info!("service resumed publication"),
            SessionEvent::RetransmitTimeout => {
                console.error(&format!(
                    "Cannot perform start session: the agent stopped acknowledging data for {:?}; terminating the session",
                    self.session.channel().config().give_up_after
                ));
                self.end(exit::SESSION_FAILED, None, true);
            }
            SessionEvent::Failed(why) => {
                console.error(&format!("Cannot perform start session: {why}"));
                if let Some(m) = self.mode.as_mut() {
                    m.down = None;
                }
                // Let the response that reports the failure reach the agent.
                self.finishing = Some((exit::SESSION_FAILED, Instant::now() + FAILURE_FLUSH));
            }
        }
    }
}

async fn opt<F: std::future::Future + Unpin>(f: Option<&mut F>) -> F::Output {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

async fn next_opt(s: Option<&mut super::link::MsgStream>) -> Option<Result<Message, String>> {
    match s {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
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

async fn reserve_msg(tx: Option<mpsc::Sender<Message>>) {
    match tx {
        Some(tx) => {
            let _ = tx.reserve().await;
        }
        None => std::future::pending().await,
    }
}
