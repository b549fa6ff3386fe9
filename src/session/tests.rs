//! Deterministic tests of the driver: tokio's paused clock, an in-memory WebSocket
//! connector, an agent played by ssm-wire's own [`Channel`] in the agent role, a fake
//! [`SessionApi`] and a scripted mode. The paths that take minutes of real time
//! (reconnect give-up, retransmission give-up, flush timeout) run in milliseconds, and
//! every assertion is on what the driver did and when, in virtual time.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ssm_wire::channel::{Channel, ChannelConfig, Role};
use ssm_wire::payload::ChannelClosed;
use ssm_wire::{ClientMessage, MessageType, PayloadType};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use super::link::{Connector, MsgSink, MsgStream};
use super::*;
use crate::modes::{Down, ModeContext, ModeKind, ModeOutcome, Up};

// ---- the fake API ------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum ResumeAnswer {
    Token,
    TimedOut,
}

struct FakeApi {
    resume: ResumeAnswer,
    resumes: AtomicUsize,
    terminates: AtomicUsize,
}

impl FakeApi {
    fn new(resume: ResumeAnswer) -> Arc<FakeApi> {
        Arc::new(FakeApi {
            resume,
            resumes: AtomicUsize::new(0),
            terminates: AtomicUsize::new(0),
        })
    }
}

impl SessionApi for FakeApi {
    fn sign<'a>(&'a self, _url: &'a str) -> BoxFuture<'a, SignResult> {
        Box::pin(async { Ok(None) })
    }

    fn resume<'a>(&'a self, _id: &'a str) -> BoxFuture<'a, ResumeResult> {
        self.resumes.fetch_add(1, Ordering::SeqCst);
        let answer = self.resume;
        Box::pin(async move {
            match answer {
                ResumeAnswer::Token => Ok(Some(("token-2".to_owned(), None))),
                ResumeAnswer::TimedOut => Ok(None),
            }
        })
    }

    fn terminate<'a>(&'a self, _id: &'a str) -> BoxFuture<'a, Result<(), ApiError>> {
        self.terminates.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Ok(()) })
    }

    fn data_key<'a>(
        &'a self,
        _key_id: &'a str,
        _session_id: &'a str,
        _target: &'a str,
    ) -> BoxFuture<'a, DataKeyResult> {
        Box::pin(async {
            Err(ApiError {
                message: "no KMS here".to_owned(),
                retryable: false,
            })
        })
    }
}

// ---- the in-memory WebSocket -------------------------------------------------------

/// The agent's end of one WebSocket.
struct ServerSide {
    from_client: mpsc::UnboundedReceiver<Message>,
    to_client: mpsc::UnboundedSender<Result<Message, String>>,
}

/// Hands each accepted connection to the test; refuses once `accept` is false.
struct TestConnector {
    accept: Mutex<VecDeque<bool>>,
    conns: mpsc::UnboundedSender<ServerSide>,
    attempts: AtomicUsize,
}

impl Connector for TestConnector {
    fn connect<'a>(
        &'a self,
        _url: &'a str,
        _headers: &'a [(String, String)],
    ) -> BoxFuture<'a, Result<(MsgSink, MsgStream), String>> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        let accept = self
            .accept
            .lock()
            .map(|mut q| q.pop_front().unwrap_or(false))
            .unwrap_or(false);
        Box::pin(async move {
            if !accept {
                return Err("connection refused".to_owned());
            }
            let (c_tx, c_rx) = mpsc::unbounded_channel::<Message>();
            let (s_tx, s_rx) = mpsc::unbounded_channel::<Result<Message, String>>();
            let _ = self.conns.send(ServerSide {
                from_client: c_rx,
                to_client: s_tx,
            });
            let sink: MsgSink = Box::pin(futures_util::sink::unfold(
                c_tx,
                |tx, m: Message| async move {
                    tx.send(m).map_err(|e| e.to_string())?;
                    Ok::<_, String>(tx)
                },
            ));
            let stream: MsgStream =
                Box::pin(futures_util::stream::unfold(s_rx, |mut rx| async move {
                    rx.recv().await.map(|m| (m, rx))
                }));
            Ok((sink, stream))
        })
    }
}

// ---- the agent ---------------------------------------------------------------------

/// The agent's data channel over one connection: ssm-wire's own reliability in the
/// agent role. `acking: false` plays an agent that stopped acknowledging.
struct Agent {
    ch: Channel,
    side: ServerSide,
    acking: bool,
}

impl Agent {
    fn new(side: ServerSide) -> Agent {
        let config = ChannelConfig {
            packets_per_second: None,
            ..ChannelConfig::default()
        };
        Agent {
            ch: Channel::new(Role::Agent, config, Instant::now().into_std(), 1),
            side,
            acking: true,
        }
    }

    fn flush(&mut self) {
        while let Some(f) = self.ch.poll_transmit(Instant::now().into_std()) {
            let _ = self.side.to_client.send(Ok(Message::Binary(f)));
        }
    }

    fn send(&mut self, pt: PayloadType, data: &[u8]) {
        self.ch
            .send(Instant::now().into_std(), pt, Bytes::copy_from_slice(data))
            .expect("agent send");
        self.flush();
    }

    /// Takes what the client sent so far (acking it unless told not to); returns the
    /// number of frames seen.
    fn absorb(&mut self) -> usize {
        let mut n = 0;
        while let Ok(m) = self.side.from_client.try_recv() {
            n += 1;
            if let Message::Binary(b) = m {
                if self.acking {
                    let _ = self.ch.handle_frame(Instant::now().into_std(), b);
                }
            }
        }
        while self.ch.poll_event().is_some() {}
        self.flush();
        n
    }

    fn channel_closed(&mut self, output: &str) {
        let body = ChannelClosed {
            message_type: "channel_closed".to_owned(),
            session_id: "sess-1".to_owned(),
            output: output.to_owned(),
            schema_version: 1,
            ..ChannelClosed::default()
        };
        let msg = ClientMessage::new(
            MessageType::ChannelClosed,
            0,
            3,
            PayloadType::Undefined,
            Bytes::from(serde_json::to_vec(&body).unwrap()),
            1,
            uuid::Uuid::new_v4(),
        );
        let frame = Bytes::from(msg.encode().unwrap());
        let _ = self.side.to_client.send(Ok(Message::Binary(frame)));
    }

    /// The WebSocket fails under the client (1006: no close frame).
    fn drop_link(self) -> Channel {
        let _ = self
            .side
            .to_client
            .send(Err("connection reset without closing handshake".to_owned()));
        self.ch
    }
}

// ---- the scripted mode -------------------------------------------------------------

/// The test's handle on the mode the driver started.
struct ModeHandle {
    kind: ModeKind,
    up: mpsc::Sender<Up>,
    urgent: mpsc::Sender<Up>,
    /// Everything the driver sent down, as it came.
    seen: Arc<Mutex<Vec<String>>>,
    /// The down queue closed: the driver ended the session.
    closed: Arc<tokio::sync::Notify>,
}

fn scripted_modes(tx: mpsc::UnboundedSender<ModeHandle>) -> ModeStarter {
    Arc::new(move |kind, ctx: ModeContext| {
        let tx = tx.clone();
        Box::pin(async move {
            let ModeContext {
                up,
                urgent,
                mut down,
                ..
            } = ctx;
            let seen = Arc::new(Mutex::new(Vec::new()));
            let closed = Arc::new(tokio::sync::Notify::new());
            let _ = tx.send(ModeHandle {
                kind,
                up: up.clone(),
                urgent: urgent.clone(),
                seen: seen.clone(),
                closed: closed.clone(),
            });
            let mut outcome = ModeOutcome::default();
            while let Some(d) = down.recv().await {
                if let Down::ExitCode(c) = &d {
                    outcome.exit_code = Some(*c);
                }
                if let Ok(mut s) = seen.lock() {
                    s.push(format!("{d:?}"));
                }
            }
            closed.notify_one();
            // Like a mode whose input stays open: it holds `up` until it returns.
            drop(up);
            outcome
        })
    })
}

// ---- the harness -------------------------------------------------------------------

struct Harness {
    api: Arc<FakeApi>,
    connector: Arc<TestConnector>,
    conns: mpsc::UnboundedReceiver<ServerSide>,
    modes: mpsc::UnboundedReceiver<ModeHandle>,
    driver: tokio::task::JoinHandle<u8>,
}

fn options() -> crate::options::Options {
    crate::options::Options {
        packets_per_second: None,
        ..crate::options::Options::default()
    }
}

/// Starts the driver; `accepts` says which connection attempts succeed, in order (later
/// ones fail).
fn start(opts: crate::options::Options, accepts: &[bool], resume: ResumeAnswer) -> Harness {
    let api = FakeApi::new(resume);
    let (conns_tx, conns) = mpsc::unbounded_channel();
    let (modes_tx, modes) = mpsc::unbounded_channel();
    let connector = Arc::new(TestConnector {
        accept: Mutex::new(accepts.iter().copied().collect()),
        conns: conns_tx,
        attempts: AtomicUsize::new(0),
    });
    let params = SessionParams {
        session_id: "sess-1".to_owned(),
        token: "token-1".to_owned(),
        stream_url: "wss://ssmmessages.us-east-1.amazonaws.com/v1/data-channel/sess-1".to_owned(),
        target: Some("i-0123456789abcdef0".to_owned()),
        legacy_cli: false,
        client_version: "1.3.0.0".to_owned(),
        options: opts,
        tls: crate::transport::TlsSettings::new(None).expect("tls settings"),
        console: crate::console::Console { quiet: true },
    };
    let env = Env {
        connector: connector.clone(),
        modes: scripted_modes(modes_tx),
    };
    let session_api: Arc<dyn SessionApi> = api.clone();
    let driver = tokio::spawn(run_with(params, session_api, env));
    Harness {
        api,
        connector,
        conns,
        modes,
        driver,
    }
}

impl Harness {
    /// The next connection, with OpenDataChannel read.
    async fn accept(&mut self) -> Agent {
        let mut side = self.conns.recv().await.expect("a connection");
        match side.from_client.recv().await {
            Some(Message::Text(t)) => assert!(t.contains("\"TokenValue\""), "{t}"),
            other => panic!("expected OpenDataChannel, got {other:?}"),
        }
        Agent::new(side)
    }

    /// Accepts the first connection and starts a shell-type session (no handshake: the
    /// first Output makes it ready).
    async fn ready(&mut self) -> (Agent, ModeHandle) {
        let mut agent = self.accept().await;
        agent.send(PayloadType::Output, b"$ ");
        let mode = self.modes.recv().await.expect("the mode started");
        assert_eq!(mode.kind, ModeKind::Shell);
        (agent, mode)
    }

    async fn exit(self) -> u8 {
        self.driver.await.expect("driver task")
    }
}

/// Lets the driver run until everything runnable is idle (paused time moves only when
/// all tasks wait on timers).
async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

// ---- the scenarios -----------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn reconnect_gives_up_when_the_budget_ends() {
    let mut opts = options();
    opts.reconnect_timeout = Duration::from_secs(600);
    let mut h = start(opts, &[true], ResumeAnswer::Token);
    let (agent, _mode) = h.ready().await;
    let lost = Instant::now();
    drop(agent.drop_link());
    let api = h.api.clone();
    let connector = h.connector.clone();
    let code = h.exit().await;
    let took = lost.elapsed();
    assert_eq!(code, crate::exit::SESSION_FAILED);
    assert!(
        took <= Duration::from_secs(600) && took >= Duration::from_secs(590),
        "gave up after {took:?}"
    );
    let resumes = api.resumes.load(Ordering::SeqCst);
    assert!(resumes > 10, "only {resumes} ResumeSession calls");
    assert_eq!(connector.attempts.load(Ordering::SeqCst), 1 + resumes);
}

#[tokio::test(start_paused = true)]
async fn resume_without_a_token_ends_the_session_at_once() {
    let mut h = start(options(), &[true], ResumeAnswer::TimedOut);
    let (agent, _mode) = h.ready().await;
    let lost = Instant::now();
    drop(agent.drop_link());
    let api = h.api.clone();
    assert_eq!(h.exit().await, crate::exit::SESSION_FAILED);
    assert_eq!(api.resumes.load(Ordering::SeqCst), 1);
    assert!(lost.elapsed() < Duration::from_millis(100));
}

#[tokio::test(start_paused = true)]
async fn a_resumed_session_goes_on_and_resends_what_was_unacknowledged() {
    let mut h = start(options(), &[true, true], ResumeAnswer::Token);
    let (mut agent, mode) = h.ready().await;
    agent.acking = false;
    mode.up
        .send(Up::Data(Bytes::from_static(b"lost")))
        .await
        .unwrap();
    settle().await;
    agent.absorb();
    let ch = agent.drop_link();
    // The same agent channel on a new WebSocket: the data comes again, is acked, and a
    // Finish then flushes and exits 0.
    let side = h.conns.recv().await.expect("reconnected");
    let mut agent = Agent {
        ch,
        side,
        acking: true,
    };
    assert!(matches!(
        agent.side.from_client.recv().await,
        Some(Message::Text(_))
    ));
    settle().await;
    assert!(agent.absorb() >= 1, "nothing resent");
    mode.urgent.send(Up::Finish(0)).await.unwrap();
    settle().await;
    agent.absorb();
    let api = h.api.clone();
    assert_eq!(h.exit().await, 0);
    assert_eq!(api.resumes.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn ctrl_c_during_a_reconnect_exits_within_100_ms() {
    let mut opts = options();
    opts.reconnect_timeout = Duration::from_secs(600);
    let mut h = start(opts, &[true], ResumeAnswer::Token);
    let (mut agent, mode) = h.ready().await;
    // Something unacknowledged, so there would be something to flush.
    agent.acking = false;
    mode.up
        .send(Up::Data(Bytes::from_static(b"typed")))
        .await
        .unwrap();
    settle().await;
    agent.absorb();
    drop(agent.drop_link());
    tokio::time::sleep(Duration::from_secs(5)).await;
    // A terminating signal reaches the driver as the mode's urgent Finish.
    let signalled = Instant::now();
    mode.urgent.send(Up::Finish(130)).await.unwrap();
    let code = h.exit().await;
    assert_eq!(code, 130);
    assert!(
        signalled.elapsed() < Duration::from_millis(100),
        "took {:?}",
        signalled.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn tilde_dot_during_a_reconnect_calls_terminate_session() {
    let mut h = start(options(), &[true], ResumeAnswer::Token);
    let (agent, mode) = h.ready().await;
    drop(agent.drop_link());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let asked = Instant::now();
    mode.urgent.send(Up::TerminateApi).await.unwrap();
    let api = h.api.clone();
    assert_eq!(h.exit().await, 0);
    assert_eq!(api.terminates.load(Ordering::SeqCst), 1);
    assert!(asked.elapsed() < Duration::from_millis(100));
}

#[tokio::test(start_paused = true)]
async fn flush_timeout_bounds_the_exit_when_nothing_is_acknowledged() {
    let mut opts = options();
    opts.flush_timeout = Duration::from_secs(10);
    let mut h = start(opts, &[true], ResumeAnswer::Token);
    let (mut agent, mode) = h.ready().await;
    agent.acking = false;
    mode.up
        .send(Up::Data(Bytes::from_static(b"tail")))
        .await
        .unwrap();
    let finished = Instant::now();
    mode.up.send(Up::Finish(0)).await.unwrap();
    let code = h.exit().await;
    let took = finished.elapsed();
    assert_eq!(code, 0);
    assert!(
        took >= Duration::from_secs(10) && took < Duration::from_millis(10_100),
        "exited after {took:?}"
    );
    assert!(agent.absorb() >= 1, "the data was sent");
}

#[tokio::test(start_paused = true)]
async fn finish_exits_as_soon_as_everything_is_acknowledged() {
    let mut h = start(options(), &[true], ResumeAnswer::Token);
    let (mut agent, mode) = h.ready().await;
    mode.up
        .send(Up::Data(Bytes::from_static(b"tail")))
        .await
        .unwrap();
    mode.up.send(Up::Finish(0)).await.unwrap();
    let finished = Instant::now();
    settle().await;
    agent.absorb();
    assert_eq!(h.exit().await, 0);
    assert!(finished.elapsed() < Duration::from_millis(100));
}

#[tokio::test(start_paused = true)]
async fn retransmission_give_up_calls_terminate_session() {
    let mut h = start(options(), &[true], ResumeAnswer::Token);
    let (mut agent, mode) = h.ready().await;
    agent.acking = false;
    mode.up
        .send(Up::Data(Bytes::from_static(b"x")))
        .await
        .unwrap();
    let sent = Instant::now();
    let api = h.api.clone();
    let code = h.exit().await;
    let took = sent.elapsed();
    assert_eq!(code, crate::exit::SESSION_FAILED);
    assert_eq!(api.terminates.load(Ordering::SeqCst), 1);
    // give_up_after (300 s), checked when the retransmission timer (≤ 4 s) fires.
    assert!(
        took >= Duration::from_secs(300) && took <= Duration::from_secs(305),
        "gave up after {took:?}"
    );
    assert!(agent.absorb() > 10, "retransmissions were sent");
}

#[tokio::test(start_paused = true)]
async fn channel_closed_while_the_window_is_full_ends_the_session() {
    let mut opts = options();
    opts.window_packets = 4;
    let mut h = start(opts, &[true], ResumeAnswer::Token);
    let (mut agent, mode) = h.ready().await;
    agent.acking = false;
    // More than the window: the mode's slot stays full behind it.
    let up = mode.up.clone();
    let filler = tokio::spawn(async move {
        for _ in 0..64 {
            if up
                .send(Up::Data(Bytes::from(vec![1u8; 1024])))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    settle().await;
    assert!(agent.absorb() >= 4);
    let closed_at = Instant::now();
    agent.channel_closed("");
    let code = h.exit().await;
    assert_eq!(code, 0);
    assert!(closed_at.elapsed() < Duration::from_millis(100));
    filler.abort();
}

/// The real agent's order at the end of a command whose stdin is a pipe left open: the
/// ExitCode payload, then (its own WebSocket having died) nothing more but the gateway's
/// channel_closed. The mode never finished its input; the exit status is the command's.
#[tokio::test(start_paused = true)]
async fn exit_code_then_channel_closed_with_input_left_open() {
    let mut h = start(options(), &[true], ResumeAnswer::Token);
    let (mut agent, mode) = h.ready().await;
    agent.send(PayloadType::Output, b"out\n");
    agent.send(PayloadType::ExitCode, b"EXIT_CODE: 3");
    agent.acking = false;
    settle().await;
    agent.absorb();
    let closed_at = Instant::now();
    agent.channel_closed("");
    assert_eq!(h.exit().await, 3);
    assert!(closed_at.elapsed() < Duration::from_millis(100));
    let seen = mode.seen.lock().unwrap().clone();
    assert!(seen.iter().any(|s| s.contains("ExitCode(3)")), "{seen:?}");
}

#[tokio::test(start_paused = true)]
async fn channel_closed_with_an_error_output_exits_1() {
    let mut h = start(options(), &[true], ResumeAnswer::Token);
    let (mut agent, mode) = h.ready().await;
    agent.channel_closed("Unable to connect to specified port: connection refused");
    assert_eq!(h.exit().await, crate::exit::SESSION_FAILED);
    mode.closed.notified().await;
}

#[tokio::test(start_paused = true)]
async fn an_exit_code_wins_over_an_error_output() {
    let mut h = start(options(), &[true], ResumeAnswer::Token);
    let (mut agent, _mode) = h.ready().await;
    agent.send(PayloadType::ExitCode, b"EXIT_CODE: 4");
    settle().await;
    agent.absorb();
    agent.channel_closed("command failed");
    assert_eq!(h.exit().await, 4);
}

/// A mode that never returns after the session ended (a local reader that stalls) holds
/// the exit for SSM_PLUGIN_FLUSH_TIMEOUT at most.
#[tokio::test(start_paused = true)]
async fn a_mode_that_does_not_end_holds_the_exit_for_the_flush_timeout_only() {
    let mut opts = options();
    opts.flush_timeout = Duration::from_secs(7);
    let api = FakeApi::new(ResumeAnswer::Token);
    let (conns_tx, mut conns) = mpsc::unbounded_channel();
    let connector = Arc::new(TestConnector {
        accept: Mutex::new([true].into_iter().collect()),
        conns: conns_tx,
        attempts: AtomicUsize::new(0),
    });
    let modes: ModeStarter = Arc::new(|_, ctx| {
        Box::pin(async move {
            let _ctx = ctx;
            std::future::pending::<ModeOutcome>().await
        })
    });
    let params = SessionParams {
        session_id: "sess-1".to_owned(),
        token: "t".to_owned(),
        stream_url: "wss://ssmmessages.us-east-1.amazonaws.com/v1/data-channel/sess-1".to_owned(),
        target: None,
        legacy_cli: false,
        client_version: "1.3.0.0".to_owned(),
        options: opts,
        tls: crate::transport::TlsSettings::new(None).expect("tls"),
        console: crate::console::Console { quiet: true },
    };
    let driver = tokio::spawn(run_with(params, api, Env { connector, modes }));
    let mut side = conns.recv().await.unwrap();
    side.from_client.recv().await;
    let mut agent = Agent::new(side);
    agent.send(PayloadType::Output, b"$ ");
    settle().await;
    agent.absorb();
    let closed_at = Instant::now();
    agent.channel_closed("");
    assert_eq!(driver.await.unwrap(), 0);
    let took = closed_at.elapsed();
    assert!(
        took >= Duration::from_secs(7) && took < Duration::from_millis(7_100),
        "{took:?}"
    );
}
