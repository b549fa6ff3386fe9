//! A session end to end: the [`ClientSession`](ssm_wire::session::ClientSession) state
//! machine over a WebSocket, the session mode that connects it to the user, and the AWS
//! calls it needs.
//!
//! - [`link`]: opening data-channel WebSockets (signing, OpenDataChannel, pings), the
//!   writer task, and the reconnect loop through ResumeSession as a task of its own.
//! - [`driver`]: the one poll loop that owns the state machine. Every slow thing (a
//!   reconnect, KMS GenerateDataKey, TerminateSession, the end of the mode) is a task it
//!   polls, never a call it awaits inline, so signals, `~.`, channel_closed and deadlines
//!   are always serviced.
//!
//! [`run`] is what `main` calls; [`run_with`] lets the tests inject the WebSocket
//! connector and the mode.

pub mod driver;
pub mod link;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::console::Console;
use crate::modes::{ModeContext, ModeKind, ModeOutcome};
use crate::options::Options;
use crate::transport::TlsSettings;

pub use link::Connector;

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
/// simulator's endpoint through the same implementation, or a fake.
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

/// Starts the session mode the handshake selected; returns its outcome when it ends.
pub type ModeStarter =
    Arc<dyn Fn(ModeKind, ModeContext) -> BoxFuture<'static, ModeOutcome> + Send + Sync>;

/// What the driver talks to besides the AWS API: injected by tests.
#[derive(Clone)]
pub struct Env {
    pub connector: Arc<dyn Connector>,
    pub modes: ModeStarter,
}

impl Env {
    /// Real WebSockets over rustls and the real modes (terminal, sockets, stdio).
    pub fn real(tls: &TlsSettings) -> Env {
        Env {
            connector: Arc::new(link::WsConnector::new(tls.clone())),
            modes: Arc::new(|kind, ctx| Box::pin(crate::modes::run(kind, ctx))),
        }
    }
}

/// Runs the session to its end and returns the exit status.
pub async fn run(params: SessionParams, api: Arc<dyn SessionApi>) -> u8 {
    let env = Env::real(&params.tls);
    run_with(params, api, env).await
}

/// [`run`] with an injected connector and mode starter.
pub async fn run_with(params: SessionParams, api: Arc<dyn SessionApi>, env: Env) -> u8 {
    driver::run(params, api, env).await
}

/// The plugin's exit status for a remote exit code (0..=255, negative and larger values
/// folded the way a shell reports them).
pub fn exit_status(code: i32) -> u8 {
    (code & 0xff) as u8
}
