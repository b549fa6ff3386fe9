//! Shell sessions: `Standard_Stream`, `InteractiveCommands` and `NonInteractiveCommands`
//! (PROTOCOL.md §8.1).
//!
//! The user's terminal is connected to the remote pty (or command): stdin goes up as
//! Output payloads, the terminal size as Size payloads, and what comes down is written to
//! stdout (Output) and stderr (StdErr).
//!
//! # Differences from the official plugin (all deliberate)
//!
//! | Official | Here |
//! | --- | --- |
//! | `stty cbreak -echo`: ISIG, ICRNL, IXON stay on; Ctrl-C/Z/\ reach the remote side as local signals turned back into bytes | raw mode like `ssh` ([`crate::terminal`]): the keys arrive as bytes and go up unchanged, Ctrl-S/Ctrl-Q/Ctrl-V/Ctrl-O/Ctrl-Y reach the remote side too |
//! | a read of exactly one `\n` is sent as `\r` | no rewrite: in raw mode Enter reads as `\r` already (ICRNL is off), which is what the remote pty expects; the official rewrite only undoes the ICRNL it left on, and corrupts a real lone `\n` |
//! | terminal restored only on channel_closed; left in cbreak on SIGTERM, SIGHUP, stdin EOF, panic (weakness #14) | restored on every exit path, see below |
//! | size polled every 500 ms (weakness #9) | sent at start and at once on SIGWINCH; polling only on Windows, which has no such signal |
//! | StdErr payloads and `EXIT_CODE: n` written raw to stdout, exit status always 0 (weakness #1) | StdErr to stderr; the ExitCode payload is returned in [`ModeOutcome::exit_code`] and becomes the exit status |
//! | stdin EOF ends the process at once with `Cannot perform start session: EOF`, losing the remaining output | piped stdin: EOF sends one 0x04 (EOT, what a terminal user's Ctrl-D sends, so the remote shell sees end of input) and the session runs until the agent closes it |
//! | escape sequences also active on piped stdin, so `\n~.` in piped data ends the session | escapes only when stdin is a terminal, as in `ssh` |
//!
//! # Escape sequences
//!
//! As in the newer official plugin (PROTOCOL.md §11, implemented by [`Escapes`]): after a
//! `\r` or `\n` (not at session start), `~?` prints help, `~~` sends one `~`, `~-`
//! disables escapes for the rest of the session, `~.` restores the terminal and asks the
//! driver for TerminateSession ([`Up::TerminateApi`]); `~` followed by anything else sends
//! both bytes.
//!
//! # Signals
//!
//! SIGINT, SIGTSTP and SIGQUIT are forwarded as the bytes 0x03, 0x1a and 0x1c (the AWS CLI
//! starts the plugin with them ignored; installing handlers overrides that, as the official
//! plugin does). With stdin in raw mode the terminal no longer generates them, so they only
//! come from `kill` or, with piped stdin, from the terminal's own line discipline.
//! SIGTERM and SIGHUP restore the terminal at once and end the session with status
//! 128 + signal number ([`Up::Finish`]; the driver flushes, bounded, and exits). A second
//! SIGTERM/SIGHUP while the driver is still flushing exits immediately.
//!
//! `~.` and the terminating signals are the session's last word: they go on the driver's
//! urgent queue, past input not yet handed over (which is dropped), so they act at once
//! even when an agent that stopped acknowledging keeps the data queue full.
//!
//! # Exit paths and the terminal
//!
//! - down queue closed (channel_closed, driver done): [`run`] restores and returns;
//! - `~.`, SIGTERM, SIGHUP, stdin hang-up, stdout gone: restored *before* the final
//!   [`Up`] message, so a driver that then calls `std::process::exit` leaves a sane terminal;
//! - panic anywhere: the [`RawModeGuard`] drop (unwinding through [`run`]) and the panic
//!   hook installed by [`RawModeGuard::stdin`] (panics in other tasks or threads);
//! - forced exit on a second signal: [`crate::terminal::restore_global`] first.
//!
//! # Input thread
//!
//! stdin is read on a dedicated, detached thread (not `tokio::io::stdin`, whose blocking
//! read would hold up runtime shutdown until the user pressed a key). It hands chunks over a
//! small bounded queue, so reading stops while the channel's send window is full; the
//! thread dies with the process.

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IsTerminal, Read, Write};

use bytes::Bytes;
use ssm_wire::payload::SizeData;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use super::{Down, ModeContext, ModeOutcome, Up};
use crate::terminal::{self, RawModeGuard};

/// Sent when piped stdin ends: the byte a terminal's Ctrl-D produces.
const EOT: u8 = 0x04;
/// Bytes per stdin read.
const READ_SIZE: usize = 4096;
/// Input read but not yet taken by the driver; stdin is not read beyond this.
const MAX_PENDING_BYTES: usize = 64 * 1024;

/// Exit statuses for the ways the user side ends the session itself (128 + signal number,
/// the shell convention).
const STATUS_SIGHUP: u8 = 128 + 1;
const STATUS_SIGPIPE: u8 = 128 + 13;
#[cfg(unix)]
const STATUS_SIGTERM: u8 = 128 + 15;

/// Text printed for `~?` (PROTOCOL.md §11, byte-exact).
pub const ESCAPE_HELP: &str = "\r\nSupported escape sequence commands:\r\n  ~? - this help message\r\n  ~~ - send the ~ character to the remote target\r\n  ~- - disable escape sequences for the rest of this session\r\n  ~. - disconnect and terminate session\r\n(Note that escapes are only recognized immediately after newline.)\r\n";
/// Text printed for `~-` (PROTOCOL.md §11, byte-exact).
pub const ESCAPES_DISABLED: &str = "\r\nEscape sequences disabled for this session.\r\n";

/// Runs a shell session until the driver closes the down queue.
pub async fn run(ctx: ModeContext) -> ModeOutcome {
    let ModeContext {
        up,
        urgent,
        down,
        info,
        ..
    } = ctx;
    let interactive = io::stdin().is_terminal();
    let guard = if interactive {
        match RawModeGuard::stdin() {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!("cannot put the terminal in raw mode: {e}");
                None
            }
        }
    } else {
        None
    };
    tracing::debug!(
        session_type = %info.session_type,
        interactive,
        raw = guard.is_some(),
        "shell mode starts"
    );

    let (stdout_failed_tx, stdout_failed_rx) = oneshot::channel();
    let output = output_loop(
        down,
        Sink::new(tokio::io::stdout(), io::stdout().is_terminal()),
        Sink::new(tokio::io::stderr(), io::stderr().is_terminal()),
        stdout_failed_tx,
    );
    let input = Input {
        up: &up,
        urgent: &urgent,
        guard: guard.as_ref(),
        raw: guard.is_some(),
        escapes: Escapes::new(interactive),
        signals: OsSignals::new(),
        size: &terminal::size_or_fallback,
        print: &print_stdout,
        exit_now: &|status| std::process::exit(i32::from(status)),
        last_size: None,
        pending: VecDeque::new(),
        pending_bytes: 0,
        finished: false,
    }
    .run(spawn_stdin_reader(), stdout_failed_rx);

    tokio::pin!(output, input);
    let outcome = tokio::select! {
        outcome = &mut output => outcome,
        () = &mut input => output.await,
    };
    if let Some(g) = &guard {
        g.restore();
    }
    tracing::debug!(exit_code = ?outcome.exit_code, "shell mode ends");
    outcome
}

fn print_stdout(text: &str) {
    let mut out = io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

// ---------------------------------------------------------------------------------------
// Escape sequences

/// What the escape machine asks for, in input order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EscapeAction {
    /// Bytes for the remote side.
    Send(Vec<u8>),
    /// Text for the local terminal (stdout).
    Print(&'static str),
    /// `~.`: end the session. Input after it in the same chunk is dropped.
    Terminate,
}

/// The SSH-style escape state machine of the newer official plugin (PROTOCOL.md §11).
///
/// Pure: it sees stdin bytes in read-sized chunks and returns [`EscapeAction`]s; state is
/// kept across chunks, so a sequence split over two reads works.
#[derive(Debug, Clone)]
pub struct Escapes {
    enabled: bool,
    /// The last byte was `\r` or `\n` (not set at session start, as in the official code).
    newline: bool,
    /// A `~` after a newline was swallowed; the next byte is a command.
    escaped: bool,
    /// `~.` was seen; everything after it is dropped.
    terminated: bool,
}

impl Escapes {
    /// A machine that recognises escapes when `enabled` (otherwise passes bytes through).
    pub fn new(enabled: bool) -> Escapes {
        Escapes {
            enabled,
            newline: false,
            escaped: false,
            terminated: false,
        }
    }

    /// Whether escapes are still recognised.
    #[cfg(test)]
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Processes one chunk of stdin.
    pub fn feed(&mut self, input: &[u8]) -> Vec<EscapeAction> {
        if self.terminated {
            return Vec::new();
        }
        if !self.enabled {
            return if input.is_empty() {
                Vec::new()
            } else {
                vec![EscapeAction::Send(input.to_vec())]
            };
        }
        let mut actions = Vec::new();
        let mut out = Vec::with_capacity(input.len());
        let flush = |out: &mut Vec<u8>, actions: &mut Vec<EscapeAction>| {
            if !out.is_empty() {
                actions.push(EscapeAction::Send(std::mem::take(out)));
            }
        };
        for (i, &b) in input.iter().enumerate() {
            if self.escaped {
                self.escaped = false;
                self.newline = false;
                match b {
                    b'?' => {
                        flush(&mut out, &mut actions);
                        actions.push(EscapeAction::Print(ESCAPE_HELP));
                    }
                    b'.' => {
                        flush(&mut out, &mut actions);
                        actions.push(EscapeAction::Terminate);
                        self.terminated = true;
                        return actions;
                    }
                    b'-' => {
                        flush(&mut out, &mut actions);
                        actions.push(EscapeAction::Print(ESCAPES_DISABLED));
                        self.enabled = false;
                        // The rest of the chunk goes through unexamined.
                        out.extend_from_slice(input.get(i + 1..).unwrap_or_default());
                        flush(&mut out, &mut actions);
                        return actions;
                    }
                    b'~' => out.push(b'~'),
                    // Not a command: the swallowed `~` and this byte go through, and (as in
                    // the official code) even a `\r` here does not arm a new escape.
                    other => out.extend_from_slice(&[b'~', other]),
                }
            } else if self.newline && b == b'~' {
                self.escaped = true;
            } else if b == b'\r' || b == b'\n' {
                self.newline = true;
                out.push(b);
            } else {
                self.newline = false;
                out.push(b);
            }
        }
        flush(&mut out, &mut actions);
        actions
    }
}

// ---------------------------------------------------------------------------------------
// Input side: stdin, signals, resize → Up

/// One event from the stdin thread.
#[derive(Debug)]
enum StdinEvent {
    Data(Bytes),
    Eof,
    Error(io::Error),
}

/// What a signal (or the resize timer on Windows) means for the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SignalEvent {
    /// Send this byte to the remote side.
    Forward(u8),
    /// The window size may have changed.
    Resize,
    /// Restore the terminal and end with this exit status.
    Terminate(u8),
}

/// A source of [`SignalEvent`]s; the real one is [`OsSignals`].
trait SignalSource {
    /// The next event; pending forever when there are none.
    fn next(&mut self) -> impl Future<Output = SignalEvent> + Send;
}

/// The input side of the session. Everything bound for the driver goes through `pending`,
/// so signals, `~.` and a failing stdout are acted on (terminal restored) at once even
/// while the driver is not accepting data.
struct Input<'a, S> {
    up: &'a mpsc::Sender<Up>,
    /// The driver's urgent queue: the final message, past any data still queued.
    urgent: &'a mpsc::Sender<Up>,
    guard: Option<&'a RawModeGuard>,
    /// stdin is a terminal in raw mode: EOF there means hang-up.
    raw: bool,
    escapes: Escapes,
    signals: S,
    size: &'a (dyn Fn() -> (u32, u32) + Sync),
    print: &'a (dyn Fn(&str) + Sync),
    /// Leaves the process at once (a second terminating signal while finishing).
    exit_now: &'a (dyn Fn(u8) + Sync),
    last_size: Option<(u32, u32)>,
    pending: VecDeque<Up>,
    pending_bytes: usize,
    /// Finish or TerminateApi has been queued: no more input.
    finished: bool,
}

impl<S: SignalSource> Input<'_, S> {
    /// Runs until the driver stops taking messages (its queue closed) before the session
    /// was finished. After the final message (Finish, TerminateApi) it only watches for a
    /// second terminating signal, even once the driver has closed its queue.
    async fn run(
        mut self,
        mut stdin: mpsc::Receiver<StdinEvent>,
        mut stdout_failed: oneshot::Receiver<u8>,
    ) {
        self.resize();
        let mut stdin_open = true;
        let mut watch_stdout = true;
        loop {
            let read_stdin = stdin_open && !self.finished && self.pending_bytes < MAX_PENDING_BYTES;
            // Biased, signals first: they are rare and must not wait behind a stream of
            // input; then the driver is fed before more stdin is read.
            tokio::select! {
                biased;
                sig = self.signals.next() => self.on_signal(sig),
                permit = self.up.reserve(), if !self.pending.is_empty() => {
                    let Ok(permit) = permit else {
                        self.pending.clear();
                        self.pending_bytes = 0;
                        if self.finished {
                            // The driver stops taking messages after Finish while it flushes;
                            // keep watching for a second terminating signal meanwhile.
                            continue;
                        }
                        tracing::debug!("driver queue closed; input stops");
                        return;
                    };
                    if let Some(msg) = self.pop() {
                        permit.send(msg);
                    }
                }
                ev = stdin.recv(), if read_stdin => match ev {
                    Some(StdinEvent::Data(bytes)) => self.on_input(&bytes),
                    Some(StdinEvent::Eof) | None => {
                        stdin_open = false;
                        self.on_eof();
                    }
                    Some(StdinEvent::Error(e)) => {
                        tracing::debug!("reading stdin failed: {e}");
                        stdin_open = false;
                        self.on_eof();
                    }
                },
                status = &mut stdout_failed, if watch_stdout => {
                    watch_stdout = false;
                    // Err: the output side ended normally.
                    if let Ok(status) = status {
                        self.finish(status);
                    }
                }
            }
        }
    }

    fn push(&mut self, msg: Up) {
        if let Up::Data(b) = &msg {
            self.pending_bytes += b.len();
        }
        self.pending.push_back(msg);
    }

    fn pop(&mut self) -> Option<Up> {
        let msg = self.pending.pop_front()?;
        if let Up::Data(b) = &msg {
            self.pending_bytes = self.pending_bytes.saturating_sub(b.len());
        }
        Some(msg)
    }

    fn on_input(&mut self, bytes: &[u8]) {
        for action in self.escapes.feed(bytes) {
            match action {
                EscapeAction::Send(data) => self.push(Up::Data(Bytes::from(data))),
                EscapeAction::Print(text) => (self.print)(text),
                EscapeAction::Terminate => {
                    tracing::info!("escape sequence ~. received, terminating the session");
                    self.restore();
                    self.last_word(Up::TerminateApi);
                    return;
                }
            }
        }
    }

    fn on_eof(&mut self) {
        if self.finished {
            return;
        }
        if self.raw {
            // A terminal in raw mode only reads EOF (or EIO) when it was hung up: nobody
            // is left to type or to see the output. End like SIGHUP.
            tracing::debug!("terminal hung up");
            self.finish(STATUS_SIGHUP);
        } else {
            tracing::debug!("stdin ended; sending EOT and waiting for the session to close");
            self.push(Up::Data(Bytes::from_static(&[EOT])));
        }
    }

    fn on_signal(&mut self, sig: SignalEvent) {
        match sig {
            SignalEvent::Terminate(status) if self.finished => {
                // Second request while the driver is still flushing: leave now.
                tracing::info!("second terminating signal; exiting with status {status}");
                terminal::restore_global();
                self.restore();
                (self.exit_now)(status);
            }
            _ if self.finished => {}
            SignalEvent::Forward(b) => self.push(Up::Data(Bytes::copy_from_slice(&[b]))),
            SignalEvent::Resize => self.resize(),
            SignalEvent::Terminate(status) => {
                tracing::info!("terminating signal; finishing with status {status}");
                self.finish(status);
            }
        }
    }

    /// Queues a Size message if the size changed; a Size still queued is updated instead.
    fn resize(&mut self) {
        let now = (self.size)();
        if self.last_size == Some(now) {
            return;
        }
        self.last_size = Some(now);
        let data = SizeData {
            cols: now.0,
            rows: now.1,
        };
        for msg in self.pending.iter_mut() {
            if let Up::Size(queued) = msg {
                *queued = data;
                return;
            }
        }
        self.push(Up::Size(data));
    }

    fn finish(&mut self, status: u8) {
        if self.finished {
            return;
        }
        self.restore();
        self.last_word(Up::Finish(status));
    }

    /// Ends the input: input not yet handed to the driver no longer matters, and `msg`
    /// goes on the urgent queue, which the driver reads even while an agent that stopped
    /// acknowledging holds the data queue (the official plugin calls TerminateSession
    /// from `~.` directly, too).
    fn last_word(&mut self, msg: Up) {
        self.pending.clear();
        self.pending_bytes = 0;
        self.finished = true;
        if let Err(e) = self.urgent.try_send(msg) {
            // Only ever one message on a queue of two: it is closed, the driver is gone.
            tracing::debug!("driver gone; final message dropped: {e}");
        }
    }

    fn restore(&self) {
        if let Some(g) = self.guard {
            g.restore();
        }
    }
}

/// Starts the stdin thread. The queue closes (reads as EOF) if the thread cannot start.
fn spawn_stdin_reader() -> mpsc::Receiver<StdinEvent> {
    let (tx, rx) = mpsc::channel(4);
    let spawned = std::thread::Builder::new()
        .name("ssm-stdin".into())
        .spawn(move || read_stdin(&tx));
    if let Err(e) = spawned {
        tracing::warn!("cannot start the stdin thread: {e}");
    }
    rx
}

fn read_stdin(tx: &mpsc::Sender<StdinEvent>) {
    #[cfg(windows)]
    if terminal::stdin_is_console() {
        return console_input::read_loop(tx);
    }
    let stdin = io::stdin();
    let mut stdin = stdin.lock();
    let mut buf = vec![0u8; READ_SIZE];
    loop {
        let event = match stdin.read(&mut buf) {
            Ok(0) => StdinEvent::Eof,
            Ok(n) => StdinEvent::Data(Bytes::copy_from_slice(buf.get(..n).unwrap_or_default())),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Someone set O_NONBLOCK on a shared descriptor: wait for input instead.
                wait_readable();
                continue;
            }
            Err(e) => StdinEvent::Error(e),
        };
        let last = !matches!(event, StdinEvent::Data(_));
        if tx.blocking_send(event).is_err() || last {
            return;
        }
    }
}

#[cfg(unix)]
fn wait_readable() {
    let mut pfd = libc::pollfd {
        fd: libc::STDIN_FILENO,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no timeout; the result only decides when to retry the read.
    unsafe {
        libc::poll(&mut pfd, 1, -1);
    }
}

#[cfg(not(unix))]
fn wait_readable() {
    std::thread::sleep(std::time::Duration::from_millis(10));
}

/// Reading a Windows console as UTF-8 bytes.
///
/// `std::io::stdin` would do the UTF-16 conversion too, but it treats a Ctrl-Z key as end of
/// input, which in raw mode is the user's Ctrl-Z for the remote side.
#[cfg(any(windows, test))]
mod console_input {
    /// Converts UTF-16 code units to UTF-8, carrying a high surrogate that ends the input
    /// over to the next call. Unpaired surrogates become U+FFFD.
    pub fn utf16_to_utf8(carry: &mut Option<u16>, units: &[u16]) -> Vec<u8> {
        let mut all: Vec<u16> = Vec::with_capacity(units.len() + 1);
        all.extend(carry.take());
        all.extend_from_slice(units);
        if let Some(&last) = all.last() {
            if (0xD800..0xDC00).contains(&last) {
                *carry = Some(last);
                all.pop();
            }
        }
        let mut out = Vec::with_capacity(all.len() * 3);
        let mut tmp = [0u8; 4];
        for c in char::decode_utf16(all) {
            let c = c.unwrap_or(char::REPLACEMENT_CHARACTER);
            out.extend_from_slice(c.encode_utf8(&mut tmp).as_bytes());
        }
        out
    }

    #[cfg(windows)]
    pub fn read_loop(tx: &tokio::sync::mpsc::Sender<super::StdinEvent>) {
        use super::StdinEvent;
        use windows_sys::Win32::System::Console::{GetStdHandle, ReadConsoleW, STD_INPUT_HANDLE};

        // SAFETY: GetStdHandle has no preconditions.
        let handle = unsafe { GetStdHandle(STD_INPUT_HANDLE) };
        let mut wide = [0u16; 1024];
        let mut carry = None;
        loop {
            let mut read: u32 = 0;
            // SAFETY: `wide` is valid for `wide.len()` UTF-16 units, `read` is a valid out
            // pointer, and no input-control structure is passed.
            let ok = unsafe {
                ReadConsoleW(
                    handle,
                    wide.as_mut_ptr().cast(),
                    wide.len() as u32,
                    &mut read,
                    std::ptr::null(),
                )
            };
            if ok == 0 {
                let _ = tx.blocking_send(StdinEvent::Error(std::io::Error::last_os_error()));
                return;
            }
            let units = wide.get(..read as usize).unwrap_or_default();
            let bytes = utf16_to_utf8(&mut carry, units);
            if !bytes.is_empty()
                && tx
                    .blocking_send(StdinEvent::Data(bytes::Bytes::from(bytes)))
                    .is_err()
            {
                return;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Signals

#[cfg(unix)]
struct OsSignals {
    int: Option<tokio::signal::unix::Signal>,
    tstp: Option<tokio::signal::unix::Signal>,
    quit: Option<tokio::signal::unix::Signal>,
    term: Option<tokio::signal::unix::Signal>,
    hup: Option<tokio::signal::unix::Signal>,
    winch: Option<tokio::signal::unix::Signal>,
}

#[cfg(unix)]
impl OsSignals {
    fn new() -> OsSignals {
        use tokio::signal::unix::{signal, SignalKind};
        let listen = |kind: SignalKind| match signal(kind) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("cannot handle signal {}: {e}", kind.as_raw_value());
                None
            }
        };
        OsSignals {
            int: listen(SignalKind::interrupt()),
            tstp: listen(SignalKind::from_raw(libc::SIGTSTP)),
            quit: listen(SignalKind::quit()),
            term: listen(SignalKind::terminate()),
            hup: listen(SignalKind::hangup()),
            winch: listen(SignalKind::window_change()),
        }
    }
}

/// Waits for the next delivery; pending forever once the signal cannot be received.
#[cfg(unix)]
async fn delivered(slot: &mut Option<tokio::signal::unix::Signal>) {
    if let Some(s) = slot {
        if s.recv().await.is_some() {
            return;
        }
    }
    *slot = None;
    std::future::pending::<()>().await;
}

#[cfg(unix)]
impl SignalSource for OsSignals {
    async fn next(&mut self) -> SignalEvent {
        tokio::select! {
            () = delivered(&mut self.term) => SignalEvent::Terminate(STATUS_SIGTERM),
            () = delivered(&mut self.hup) => SignalEvent::Terminate(STATUS_SIGHUP),
            () = delivered(&mut self.int) => SignalEvent::Forward(0x03),
            () = delivered(&mut self.tstp) => SignalEvent::Forward(0x1a),
            () = delivered(&mut self.quit) => SignalEvent::Forward(0x1c),
            () = delivered(&mut self.winch) => SignalEvent::Resize,
        }
    }
}

#[cfg(windows)]
struct OsSignals {
    ctrl_c: Option<tokio::signal::windows::CtrlC>,
    ctrl_break: Option<tokio::signal::windows::CtrlBreak>,
    ctrl_close: Option<tokio::signal::windows::CtrlClose>,
    /// Windows has no SIGWINCH: the console size is polled.
    resize: tokio::time::Interval,
}

#[cfg(windows)]
impl OsSignals {
    fn new() -> OsSignals {
        use tokio::signal::windows;
        fn ok<T>(r: io::Result<T>, what: &str) -> Option<T> {
            r.map_err(|e| tracing::warn!("cannot handle {what}: {e}"))
                .ok()
        }
        let mut resize = tokio::time::interval(std::time::Duration::from_millis(500));
        resize.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        OsSignals {
            ctrl_c: ok(windows::ctrl_c(), "Ctrl-C"),
            ctrl_break: ok(windows::ctrl_break(), "Ctrl-Break"),
            ctrl_close: ok(windows::ctrl_close(), "console close"),
            resize,
        }
    }
}

#[cfg(windows)]
impl SignalSource for OsSignals {
    async fn next(&mut self) -> SignalEvent {
        async fn ctrl_c(slot: &mut Option<tokio::signal::windows::CtrlC>) {
            if let Some(s) = slot {
                if s.recv().await.is_some() {
                    return;
                }
            }
            *slot = None;
            std::future::pending::<()>().await;
        }
        async fn ctrl_break(slot: &mut Option<tokio::signal::windows::CtrlBreak>) {
            if let Some(s) = slot {
                if s.recv().await.is_some() {
                    return;
                }
            }
            *slot = None;
            std::future::pending::<()>().await;
        }
        async fn ctrl_close(slot: &mut Option<tokio::signal::windows::CtrlClose>) {
            if let Some(s) = slot {
                if s.recv().await.is_some() {
                    return;
                }
            }
            *slot = None;
            std::future::pending::<()>().await;
        }
        tokio::select! {
            () = ctrl_close(&mut self.ctrl_close) => SignalEvent::Terminate(STATUS_SIGHUP),
            () = ctrl_c(&mut self.ctrl_c) => SignalEvent::Forward(0x03),
            () = ctrl_break(&mut self.ctrl_break) => SignalEvent::Forward(0x03),
            _ = self.resize.tick() => SignalEvent::Resize,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Output side: Down → stdout / stderr

/// An output stream. On a Windows console, whose writer rejects invalid UTF-8, bytes are
/// made valid UTF-8 first (sequences split across payloads are kept together).
struct Sink<W> {
    writer: W,
    fixer: Option<Utf8Fixer>,
    ok: bool,
}

impl<W: AsyncWrite + Unpin> Sink<W> {
    fn new(writer: W, is_terminal: bool) -> Sink<W> {
        Sink {
            writer,
            fixer: (cfg!(windows) && is_terminal).then(Utf8Fixer::default),
            ok: true,
        }
    }

    /// Writes and flushes. After the first failure the stream is not written again.
    async fn write(&mut self, data: &[u8]) -> io::Result<()> {
        if !self.ok {
            return Ok(());
        }
        let result = match &mut self.fixer {
            Some(fixer) => {
                let fixed = fixer.fix(data);
                write_flush(&mut self.writer, &fixed).await
            }
            None => write_flush(&mut self.writer, data).await,
        };
        if result.is_err() {
            self.ok = false;
        }
        result
    }
}

async fn write_flush<W: AsyncWrite + Unpin>(w: &mut W, data: &[u8]) -> io::Result<()> {
    w.write_all(data).await?;
    w.flush().await
}

/// Turns a byte stream into valid UTF-8: invalid sequences become U+FFFD, an incomplete
/// sequence at the end of a chunk waits for the next chunk.
#[derive(Debug, Default)]
struct Utf8Fixer {
    carry: Vec<u8>,
}

impl Utf8Fixer {
    fn fix(&mut self, input: &[u8]) -> Vec<u8> {
        let mut data = std::mem::take(&mut self.carry);
        data.extend_from_slice(input);
        let mut out = Vec::with_capacity(data.len());
        let mut rest = data.as_slice();
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.extend_from_slice(s.as_bytes());
                    return out;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    out.extend_from_slice(valid);
                    match e.error_len() {
                        Some(n) => {
                            out.extend_from_slice("\u{FFFD}".as_bytes());
                            rest = after.get(n..).unwrap_or_default();
                        }
                        None => {
                            self.carry = after.to_vec();
                            return out;
                        }
                    }
                }
            }
        }
    }
}

/// Writes what comes down until the driver closes the queue. A failing stdout is reported
/// once through `stdout_failed` (with the exit status to end the session with); the queue is
/// still drained so the driver never blocks on it.
async fn output_loop<O, E>(
    mut down: mpsc::Receiver<Down>,
    mut out: Sink<O>,
    mut err: Sink<E>,
    stdout_failed: oneshot::Sender<u8>,
) -> ModeOutcome
where
    O: AsyncWrite + Unpin,
    E: AsyncWrite + Unpin,
{
    let mut stdout_failed = Some(stdout_failed);
    let mut exit_code = None;
    while let Some(msg) = down.recv().await {
        match msg {
            Down::Output(bytes) => {
                if let Err(e) = out.write(&bytes).await {
                    tracing::debug!("writing stdout failed: {e}");
                    let status = if e.kind() == io::ErrorKind::BrokenPipe {
                        STATUS_SIGPIPE
                    } else {
                        STATUS_SIGHUP
                    };
                    if let Some(tx) = stdout_failed.take() {
                        let _ = tx.send(status);
                    }
                }
            }
            Down::StdErr(bytes) => {
                if let Err(e) = err.write(&bytes).await {
                    tracing::debug!("writing stderr failed: {e}");
                }
            }
            Down::ExitCode(code) => {
                tracing::debug!(code, "remote exit code");
                exit_code = Some(code);
            }
            Down::Flag(flag) => tracing::debug!(?flag, "flag ignored in a shell session"),
        }
    }
    ModeOutcome {
        exit_code,
        failed: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use EscapeAction::{Print, Send, Terminate};

    fn send(b: &[u8]) -> EscapeAction {
        Send(b.to_vec())
    }

    fn feed_all(e: &mut Escapes, chunks: &[&[u8]]) -> Vec<EscapeAction> {
        chunks.iter().flat_map(|c| e.feed(c)).collect()
    }

    /// Everything sent, concatenated, plus prints and terminate in order.
    fn flatten(actions: &[EscapeAction]) -> (Vec<u8>, Vec<&'static str>, bool) {
        let mut data = Vec::new();
        let mut prints = Vec::new();
        let mut term = false;
        for a in actions {
            match a {
                Send(d) => data.extend_from_slice(d),
                Print(p) => prints.push(*p),
                Terminate => term = true,
            }
        }
        (data, prints, term)
    }

    #[test]
    fn escape_texts_are_exact() {
        assert_eq!(
            ESCAPE_HELP,
            concat!(
                "\r\nSupported escape sequence commands:\r\n",
                "  ~? - this help message\r\n",
                "  ~~ - send the ~ character to the remote target\r\n",
                "  ~- - disable escape sequences for the rest of this session\r\n",
                "  ~. - disconnect and terminate session\r\n",
                "(Note that escapes are only recognized immediately after newline.)\r\n"
            )
        );
        assert_eq!(
            ESCAPES_DISABLED,
            "\r\nEscape sequences disabled for this session.\r\n"
        );
    }

    #[test]
    fn not_armed_at_session_start() {
        let mut e = Escapes::new(true);
        assert_eq!(e.feed(b"~."), vec![send(b"~.")]);
        let mut e = Escapes::new(true);
        assert_eq!(e.feed(b"~?"), vec![send(b"~?")]);
    }

    #[test]
    fn plain_input_passes_through() {
        let mut e = Escapes::new(true);
        assert_eq!(e.feed(b"ls -l\r"), vec![send(b"ls -l\r")]);
        assert_eq!(e.feed(b"a~b\r"), vec![send(b"a~b\r")]);
        assert_eq!(e.feed(b""), vec![]);
        assert_eq!(e.feed(b"\x03\x1a\x1c\x04"), vec![send(b"\x03\x1a\x1c\x04")]);
    }

    #[test]
    fn tilde_dot_after_cr_or_lf_terminates() {
        for nl in [&b"\r"[..], b"\n"] {
            let mut e = Escapes::new(true);
            let mut input = b"exit".to_vec();
            input.extend_from_slice(nl);
            input.extend_from_slice(b"~.rest");
            let mut expected = b"exit".to_vec();
            expected.extend_from_slice(nl);
            assert_eq!(e.feed(&input), vec![Send(expected), Terminate]);
            // Nothing after termination.
            assert_eq!(e.feed(b"\r~.more"), vec![]);
        }
    }

    #[test]
    fn tilde_question_prints_help() {
        let mut e = Escapes::new(true);
        assert_eq!(
            e.feed(b"a\r~?b"),
            vec![send(b"a\r"), Print(ESCAPE_HELP), send(b"b")]
        );
        // After a command the newline state is reset (official behaviour): no second escape
        // until the next newline.
        let mut e = Escapes::new(true);
        assert_eq!(
            e.feed(b"\r~?~."),
            vec![send(b"\r"), Print(ESCAPE_HELP), send(b"~.")]
        );
    }

    #[test]
    fn double_tilde_sends_one() {
        let mut e = Escapes::new(true);
        assert_eq!(e.feed(b"\r~~x"), vec![send(b"\r~x")]);
        assert!(e.enabled());
        // Reset afterwards: "~." right after "~~" is data.
        let mut e = Escapes::new(true);
        assert_eq!(e.feed(b"\n~~~."), vec![send(b"\n~~.")]);
    }

    #[test]
    fn tilde_dash_disables_for_the_rest_of_the_session() {
        let mut e = Escapes::new(true);
        assert_eq!(
            e.feed(b"\r~-\r~.x"),
            vec![send(b"\r"), Print(ESCAPES_DISABLED), send(b"\r~.x")]
        );
        assert!(!e.enabled());
        assert_eq!(e.feed(b"\r~?"), vec![send(b"\r~?")]);
        assert_eq!(e.feed(b"\r~."), vec![send(b"\r~.")]);
        // Dash at the end of a chunk: nothing more to send from it.
        let mut e = Escapes::new(true);
        assert_eq!(e.feed(b"\r~-"), vec![send(b"\r"), Print(ESCAPES_DISABLED)]);
        assert_eq!(e.feed(b"\r~."), vec![send(b"\r~.")]);
    }

    #[test]
    fn unknown_command_forwards_tilde_and_byte() {
        let mut e = Escapes::new(true);
        assert_eq!(e.feed(b"\r~x"), vec![send(b"\r~x")]);
        // The forwarded byte, even a newline, does not arm a new escape (official code).
        let mut e = Escapes::new(true);
        assert_eq!(e.feed(b"\r~\r~."), vec![send(b"\r~\r~.")]);
        // ... but a newline after that does.
        let mut e = Escapes::new(true);
        assert_eq!(e.feed(b"\r~\r\r~."), vec![send(b"\r~\r\r"), Terminate]);
    }

    #[test]
    fn consecutive_newlines_keep_it_armed() {
        let mut e = Escapes::new(true);
        assert_eq!(e.feed(b"\r\n\r~."), vec![send(b"\r\n\r"), Terminate]);
    }

    #[test]
    fn works_across_read_boundaries() {
        // newline | ~ | command, each in its own read
        let mut e = Escapes::new(true);
        let a = feed_all(&mut e, &[b"ls\r", b"~", b"."]);
        assert_eq!(a, vec![send(b"ls\r"), Terminate]);

        let mut e = Escapes::new(true);
        let a = feed_all(&mut e, &[b"\r", b"~", b"?", b"x"]);
        assert_eq!(a, vec![send(b"\r"), Print(ESCAPE_HELP), send(b"x")]);

        let mut e = Escapes::new(true);
        let a = feed_all(&mut e, &[b"\n~", b"~"]);
        assert_eq!(flatten(&a), (b"\n~".to_vec(), vec![], false));

        let mut e = Escapes::new(true);
        let a = feed_all(&mut e, &[b"\r~", b"-", b"\r~."]);
        assert_eq!(
            flatten(&a),
            (b"\r\r~.".to_vec(), vec![ESCAPES_DISABLED], false)
        );

        // A swallowed "~" alone in a read sends nothing yet.
        let mut e = Escapes::new(true);
        assert_eq!(e.feed(b"\r"), vec![send(b"\r")]);
        assert_eq!(e.feed(b"~"), vec![]);
        assert_eq!(e.feed(b"z"), vec![send(b"~z")]);
    }

    #[test]
    fn every_split_of_a_stream_gives_the_same_result() {
        let input: &[u8] = b"echo a\r~~b\n~?c\r~zd\r~-e\r~.f";
        let mut whole = Escapes::new(true);
        let expected = flatten(&whole.feed(input));
        assert_eq!(
            expected,
            (
                b"echo a\r~b\nc\r~zd\re\r~.f".to_vec(),
                vec![ESCAPE_HELP, ESCAPES_DISABLED],
                false
            )
        );
        for split in 0..=input.len() {
            let (a, b) = input.split_at(split);
            let mut e = Escapes::new(true);
            assert_eq!(
                flatten(&feed_all(&mut e, &[a, b])),
                expected,
                "split at {split}"
            );
        }
        let mut e = Escapes::new(true);
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(flatten(&feed_all(&mut e, &bytes)), expected);
    }

    #[test]
    fn disabled_machine_is_a_pass_through() {
        let mut e = Escapes::new(false);
        assert_eq!(e.feed(b"\r~.\r~?"), vec![send(b"\r~.\r~?")]);
        assert_eq!(e.feed(b""), vec![]);
    }

    #[test]
    fn utf16_conversion_carries_split_surrogates() {
        let mut carry = None;
        let s = "a😀é";
        let units: Vec<u16> = s.encode_utf16().collect();
        // Split inside the surrogate pair of the emoji.
        let first = console_input::utf16_to_utf8(&mut carry, &units[..2]);
        assert_eq!(first, b"a");
        assert!(carry.is_some());
        let second = console_input::utf16_to_utf8(&mut carry, &units[2..]);
        assert_eq!(second, "😀é".as_bytes());
        assert!(carry.is_none());
        // Unpaired low surrogate and control bytes.
        let mut carry = None;
        assert_eq!(
            console_input::utf16_to_utf8(&mut carry, &[0xDC00, 0x03, 0x1a]),
            "\u{FFFD}\u{3}\u{1a}".as_bytes()
        );
    }

    #[test]
    fn utf8_fixer_keeps_split_sequences_and_replaces_invalid_bytes() {
        let mut f = Utf8Fixer::default();
        let e_acute = "é".as_bytes();
        assert_eq!(f.fix(&[b'a', e_acute[0]]), b"a");
        assert_eq!(f.fix(&[e_acute[1], b'b']), "éb".as_bytes());
        assert_eq!(f.fix(&[0xff, b'c', 0xc3]), "\u{FFFD}c".as_bytes());
        assert_eq!(f.fix(b"d"), "\u{FFFD}d".as_bytes());
        assert_eq!(f.fix(b""), b"");
    }

    // --- Input and output loops with fake stdin, signals and writers -----------------

    struct FakeSignals(mpsc::Receiver<SignalEvent>);

    impl SignalSource for FakeSignals {
        async fn next(&mut self) -> SignalEvent {
            match self.0.recv().await {
                Some(ev) => ev,
                None => std::future::pending().await,
            }
        }
    }

    struct Harness {
        up: mpsc::Receiver<Up>,
        stdin: mpsc::Sender<StdinEvent>,
        signals: mpsc::Sender<SignalEvent>,
        stdout_failed: Option<oneshot::Sender<u8>>,
    }

    static SIZE: Mutex<(u32, u32)> = Mutex::new((80, 24));
    static PRINTED: Mutex<Vec<String>> = Mutex::new(Vec::new());

    fn fake_size() -> (u32, u32) {
        *SIZE.lock().unwrap()
    }

    fn fake_print(s: &str) {
        PRINTED.lock().unwrap().push(s.to_owned());
    }

    static EXITED: Mutex<Vec<u8>> = Mutex::new(Vec::new());

    fn fake_exit(status: u8) {
        EXITED.lock().unwrap().push(status);
    }

    /// An input side on fake signals, size and printing.
    fn fake_input<'a>(
        up: &'a mpsc::Sender<Up>,
        urgent: &'a mpsc::Sender<Up>,
        raw: bool,
        escapes: bool,
        signals: mpsc::Receiver<SignalEvent>,
    ) -> Input<'a, FakeSignals> {
        Input {
            up,
            urgent,
            guard: None,
            raw,
            escapes: Escapes::new(escapes),
            signals: FakeSignals(signals),
            size: &fake_size,
            print: &fake_print,
            exit_now: &fake_exit,
            last_size: None,
            pending: VecDeque::new(),
            pending_bytes: 0,
            finished: false,
        }
    }

    /// Runs the input side of a session on fake sources until `script` finishes.
    async fn with_input<F, Fut>(raw: bool, escapes: bool, script: F)
    where
        F: FnOnce(Harness) -> Fut,
        Fut: Future<Output = ()>,
    {
        let (up_tx, up_rx) = mpsc::channel(2);
        let (stdin_tx, stdin_rx) = mpsc::channel(4);
        let (sig_tx, sig_rx) = mpsc::channel(4);
        let (fail_tx, fail_rx) = oneshot::channel();
        let input = fake_input(&up_tx, &up_tx, raw, escapes, sig_rx).run(stdin_rx, fail_rx);
        let harness = Harness {
            up: up_rx,
            stdin: stdin_tx,
            signals: sig_tx,
            stdout_failed: Some(fail_tx),
        };
        tokio::select! {
            () = input => panic!("input side ended while the driver queue was open"),
            () = script(harness) => {}
        }
    }

    /// Waits until the input side has taken everything from the fake stdin queue.
    async fn consumed(stdin: &mpsc::Sender<StdinEvent>) {
        for _ in 0..500 {
            if stdin.capacity() == stdin.max_capacity() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        panic!("stdin not consumed");
    }

    async fn next_up(h: &mut Harness) -> Up {
        tokio::time::timeout(std::time::Duration::from_secs(5), h.up.recv())
            .await
            .expect("an Up message")
            .expect("queue open")
    }

    /// Nothing more comes once every task is idle. The tests that use it run on paused
    /// time, where the timeout fires only after the input side has nothing left to do (the
    /// clock advances only when all tasks wait), so this observes quiescence, not a delay.
    async fn no_more_up(h: &mut Harness) {
        let r = tokio::time::timeout(std::time::Duration::from_secs(3600), h.up.recv()).await;
        assert!(r.is_err(), "unexpected message {r:?}");
    }

    fn data(up: Up) -> Vec<u8> {
        match up {
            Up::Data(b) => b.to_vec(),
            other => panic!("expected Data, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn piped_stdin_sends_eot_and_keeps_running() {
        with_input(false, false, |mut h| async move {
            assert!(matches!(next_up(&mut h).await, Up::Size(_)));
            h.stdin
                .send(StdinEvent::Data(Bytes::from_static(b"echo hi\n~.\n")))
                .await
                .unwrap();
            h.stdin.send(StdinEvent::Eof).await.unwrap();
            assert_eq!(data(next_up(&mut h).await), b"echo hi\n~.\n");
            assert_eq!(data(next_up(&mut h).await), [EOT]);
            no_more_up(&mut h).await;
            // Still alive: signals are forwarded as bytes.
            h.signals.send(SignalEvent::Forward(0x03)).await.unwrap();
            assert_eq!(data(next_up(&mut h).await), [0x03]);
            h.signals.send(SignalEvent::Forward(0x1a)).await.unwrap();
            h.signals.send(SignalEvent::Forward(0x1c)).await.unwrap();
            assert_eq!(data(next_up(&mut h).await), [0x1a]);
            assert_eq!(data(next_up(&mut h).await), [0x1c]);
        })
        .await;
    }

    /// `~.` and a terminating signal reach the driver through the urgent queue even while
    /// the data queue is full (an agent that stopped acknowledging holds it).
    #[tokio::test(start_paused = true)]
    async fn last_word_passes_a_full_data_queue() {
        let cases: [(&[u8], Option<SignalEvent>); 2] =
            [(b"x\r~.", None), (b"x", Some(SignalEvent::Terminate(143)))];
        for (typed, signal) in cases {
            let (up_tx, mut up_rx) = mpsc::channel(1);
            let (urgent_tx, mut urgent_rx) = mpsc::channel(2);
            let (stdin_tx, stdin_rx) = mpsc::channel(4);
            let (sig_tx, sig_rx) = mpsc::channel(4);
            let (_fail_tx, fail_rx) = oneshot::channel();
            let input = fake_input(&up_tx, &urgent_tx, true, true, sig_rx).run(stdin_rx, fail_rx);
            let script = async {
                // The first Size message fills the data queue, and nobody reads it.
                stdin_tx
                    .send(StdinEvent::Data(Bytes::copy_from_slice(typed)))
                    .await
                    .unwrap();
                if let Some(sig) = signal {
                    consumed(&stdin_tx).await;
                    sig_tx.send(sig).await.unwrap();
                }
                let last =
                    tokio::time::timeout(std::time::Duration::from_secs(5), urgent_rx.recv())
                        .await
                        .expect("the final message on the urgent queue")
                        .expect("urgent queue open");
                match signal {
                    None => assert!(matches!(last, Up::TerminateApi), "{last:?}"),
                    Some(_) => assert!(matches!(last, Up::Finish(143)), "{last:?}"),
                }
            };
            tokio::select! {
                () = input => panic!("input side ended"),
                () = script => {}
            }
            // The data queue still holds only the Size message: the typed bytes were dropped.
            assert!(matches!(up_rx.try_recv(), Ok(Up::Size(_))));
            assert!(up_rx.try_recv().is_err());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn tilde_dot_sends_terminate_api_and_nothing_after() {
        with_input(true, true, |mut h| async move {
            assert!(matches!(next_up(&mut h).await, Up::Size(_)));
            h.stdin
                .send(StdinEvent::Data(Bytes::from_static(b"ls\r~")))
                .await
                .unwrap();
            assert_eq!(data(next_up(&mut h).await), b"ls\r");
            h.stdin
                .send(StdinEvent::Data(Bytes::from_static(b".typed")))
                .await
                .unwrap();
            assert!(matches!(next_up(&mut h).await, Up::TerminateApi));
            let _ = h
                .stdin
                .send(StdinEvent::Data(Bytes::from_static(b"x")))
                .await;
            let _ = h.signals.send(SignalEvent::Forward(0x03)).await;
            let _ = h.signals.send(SignalEvent::Resize).await;
            no_more_up(&mut h).await;
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn help_is_printed_locally() {
        with_input(true, true, |mut h| async move {
            assert!(matches!(next_up(&mut h).await, Up::Size(_)));
            h.stdin
                .send(StdinEvent::Data(Bytes::from_static(b"\r~?")))
                .await
                .unwrap();
            assert_eq!(data(next_up(&mut h).await), b"\r");
            no_more_up(&mut h).await;
            assert!(PRINTED
                .lock()
                .unwrap()
                .iter()
                .any(|p| p.as_str() == ESCAPE_HELP));
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn terminating_signal_finishes_with_its_status() {
        with_input(true, true, |mut h| async move {
            assert!(matches!(next_up(&mut h).await, Up::Size(_)));
            h.signals.send(SignalEvent::Terminate(143)).await.unwrap();
            assert!(matches!(next_up(&mut h).await, Up::Finish(143)));
            let _ = h
                .stdin
                .send(StdinEvent::Data(Bytes::from_static(b"x")))
                .await;
            no_more_up(&mut h).await;
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn input_outlives_a_driver_that_closes_its_queue_after_finish() {
        with_input(true, false, |mut h| async move {
            assert!(matches!(next_up(&mut h).await, Up::Size(_)));
            h.signals.send(SignalEvent::Terminate(143)).await.unwrap();
            assert!(matches!(next_up(&mut h).await, Up::Finish(143)));
            // The driver stops taking messages while it flushes.
            drop(h.up);
            // A second terminating signal is still acted on: the process would exit.
            h.signals.send(SignalEvent::Terminate(130)).await.unwrap();
            for _ in 0..10_000 {
                if EXITED.lock().unwrap().contains(&130) {
                    return;
                }
                tokio::task::yield_now().await;
            }
            panic!("the second signal was not acted on");
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn terminal_hang_up_finishes_with_sighup_status() {
        with_input(true, true, |mut h| async move {
            assert!(matches!(next_up(&mut h).await, Up::Size(_)));
            h.stdin.send(StdinEvent::Eof).await.unwrap();
            assert!(matches!(next_up(&mut h).await, Up::Finish(STATUS_SIGHUP)));
            no_more_up(&mut h).await;
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn failing_stdout_finishes_the_session() {
        with_input(false, false, |mut h| async move {
            assert!(matches!(next_up(&mut h).await, Up::Size(_)));
            if let Some(tx) = h.stdout_failed.take() {
                tx.send(STATUS_SIGPIPE).unwrap();
            }
            assert!(matches!(next_up(&mut h).await, Up::Finish(STATUS_SIGPIPE)));
            no_more_up(&mut h).await;
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn resize_sends_only_changes() {
        // Uses the shared SIZE: this is the only test that changes it.
        with_input(false, false, |mut h| async move {
            match next_up(&mut h).await {
                Up::Size(s) => assert_eq!((s.cols, s.rows), (80, 24)),
                other => panic!("{other:?}"),
            }
            h.signals.send(SignalEvent::Resize).await.unwrap();
            no_more_up(&mut h).await;
            *SIZE.lock().unwrap() = (100, 40);
            h.signals.send(SignalEvent::Resize).await.unwrap();
            match next_up(&mut h).await {
                Up::Size(s) => assert_eq!((s.cols, s.rows), (100, 40)),
                other => panic!("{other:?}"),
            }
            *SIZE.lock().unwrap() = (80, 24);
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn output_goes_to_stdout_stderr_and_exit_code_is_kept() {
        let (tx, rx) = mpsc::channel(8);
        let (fail_tx, mut fail_rx) = oneshot::channel();
        let mut out = Vec::new();
        let mut err = Vec::new();
        tx.send(Down::Output(Bytes::from_static(b"out1 ")))
            .await
            .unwrap();
        tx.send(Down::StdErr(Bytes::from_static(b"err1")))
            .await
            .unwrap();
        tx.send(Down::Flag(ssm_wire::payload::Flag::Unknown(9)))
            .await
            .unwrap();
        tx.send(Down::Output(Bytes::from_static(b"out2")))
            .await
            .unwrap();
        tx.send(Down::ExitCode(3)).await.unwrap();
        drop(tx);
        let outcome = output_loop(
            rx,
            Sink::new(&mut out, false),
            Sink::new(&mut err, false),
            fail_tx,
        )
        .await;
        assert_eq!(
            outcome,
            ModeOutcome {
                exit_code: Some(3),
                failed: None
            }
        );
        assert_eq!(out, b"out1 out2");
        assert_eq!(err, b"err1");
        assert!(fail_rx.try_recv().is_err(), "no failure reported");
    }

    /// A writer that fails like a closed pipe.
    struct BrokenPipe;

    impl AsyncWrite for BrokenPipe {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            std::task::Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn broken_stdout_is_reported_once_and_the_queue_still_drains() {
        let (tx, rx) = mpsc::channel(8);
        let (fail_tx, fail_rx) = oneshot::channel();
        let mut err = Vec::new();
        for _ in 0..3 {
            tx.send(Down::Output(Bytes::from_static(b"x")))
                .await
                .unwrap();
        }
        tx.send(Down::StdErr(Bytes::from_static(b"e")))
            .await
            .unwrap();
        tx.send(Down::ExitCode(0)).await.unwrap();
        drop(tx);
        let outcome = output_loop(
            rx,
            Sink::new(BrokenPipe, false),
            Sink::new(&mut err, false),
            fail_tx,
        )
        .await;
        assert_eq!(outcome.exit_code, Some(0));
        assert_eq!(err, b"e");
        assert_eq!(fail_rx.await, Ok(STATUS_SIGPIPE));
    }

    #[test]
    fn run_future_is_send() {
        fn assert_send<T: std::marker::Send>(_: &T) {}
        let (up, _up_rx) = mpsc::channel(1);
        let (_down_tx, down) = mpsc::channel(1);
        let ctx = ModeContext {
            session_id: "s".into(),
            info: ssm_wire::session::SessionInfo {
                session_type: "Standard_Stream".into(),
                kind: ssm_wire::session::SessionKind::Stream,
                properties: serde_json::Value::Null,
                agent_version: String::new(),
                encrypted: false,
            },
            up: up.clone(),
            urgent: up,
            down,
            console: crate::console::Console { quiet: false },
            options: crate::options::Options::default(),
            frame_data: 1024,
        };
        let fut = run(ctx);
        assert_send(&fut);
        // Dropped without being polled: nothing touched the terminal.
    }
}
