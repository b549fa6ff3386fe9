//! Session modes: what connects the remote side to the user.
//!
//! The driver ([`crate::session`]) owns the protocol state machine and the WebSocket; a
//! mode runs as its own task and talks to the driver through two bounded queues:
//! [`Up`] (user → remote) and [`Down`] (remote → user). Bounded queues are the
//! backpressure path in both directions: a mode blocks on `up.send` while the channel's
//! send window is full, and the driver stops taking channel events while `down` is full.
//!
//! When `down` closes, the session is over: the mode writes what it still holds, restores
//! whatever it changed (terminal modes, socket files) and returns.

mod local;
pub mod port;

pub use local::{BoxRead, BoxWrite};
pub mod shell;
pub mod stdio;

use bytes::Bytes;
use ssm_wire::payload::{Flag, SizeData};
use ssm_wire::session::SessionInfo;
use tokio::sync::mpsc;

use crate::console::Console;
use crate::options::Options;

/// From the mode to the driver.
#[derive(Debug)]
pub enum Up {
    /// User data for the remote side (any length; the driver chunks it).
    Data(Bytes),
    /// Terminal size.
    #[cfg_attr(not(unix), allow(dead_code))]
    #[allow(dead_code)] // sent by the shell mode
    Size(SizeData),
    Flag(Flag),
    /// Call the TerminateSession API (the `~.` escape), then finish with status 0.
    TerminateApi,
    /// Stop: wait (bounded) until everything sent is acknowledged, then exit with this
    /// status. Nothing sent after it is accepted.
    Finish(u8),
}

/// From the driver to the mode.
#[derive(Debug)]
pub enum Down {
    Output(Bytes),
    StdErr(Bytes),
    ExitCode(i32),
    Flag(Flag),
}

/// Everything a mode needs.
pub struct ModeContext {
    pub session_id: String,
    pub info: SessionInfo,
    pub up: mpsc::Sender<Up>,
    /// For [`Up::TerminateApi`] and [`Up::Finish`] when what is queued on `up` no longer
    /// matters: the driver reads it even while the channel takes no data (an agent that
    /// stopped acknowledging), so `~.` and SIGTERM act at once.
    pub urgent: mpsc::Sender<Up>,
    pub down: mpsc::Receiver<Down>,
    pub console: Console,
    pub options: Options,
    /// Most user bytes one channel frame carries (the payload size, less the cipher's
    /// overhead when the session is encrypted).
    pub frame_data: usize,
}

/// How the session's user side ended, for the exit status.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ModeOutcome {
    /// The remote command's exit code, when the agent sent one.
    pub exit_code: Option<i32>,
    /// The plugin's own exit status, when the mode failed (it wins over a session end
    /// that races with the failure, such as the agent closing on our TerminateSession).
    pub failed: Option<u8>,
}

pub use ssm_wire::mode::{basic_port_uses_terminate_flag, select, ModeKind};

/// Runs the selected mode to completion.
pub async fn run(kind: ModeKind, ctx: ModeContext) -> ModeOutcome {
    match kind {
        ModeKind::Shell => shell::run(ctx).await,
        ModeKind::Stdio => stdio::run(ctx).await,
        ModeKind::BasicPort => port::run_basic(ctx).await,
        ModeKind::MuxPort => port::run_mux(ctx).await,
    }
}
