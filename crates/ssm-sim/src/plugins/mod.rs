//! Session plugins of the simulated agent: what runs on the "instance" side of a session.
//!
//! The agent ([`crate::agent`]) owns the reliable channel; a plugin only sees in-order,
//! decrypted client payloads ([`PluginInput`]) and produces payloads for the client
//! ([`PluginEvent::Data`]) until it ends the session ([`PluginEvent::Exit`]). Reads from
//! local sources are at most [`CHUNK`] bytes, one message per read, like the real agent.
//! Backpressure: the output channel is small and the agent stops draining it while its
//! send window is full, so a plugin's reader blocks instead of buffering.
//!
//! - [`shell`]: `Standard_Stream` and `InteractiveCommands` in a real pty.
//! - [`commands`]: `NonInteractiveCommands` with separate stdout/stderr pipes.
//! - [`port`]: `Port` with `type: LocalPortForwarding`, basic and smux (mux) modes.
//! - [`stdio`]: `Port` without a type (`AWS-StartSSHSession`): one target connection.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Map, Value};
use ssm_wire::PayloadType;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::session::SessionShared;

pub(crate) mod commands;
pub(crate) mod port;
pub(crate) mod shell;
pub(crate) mod stdio;

/// Largest payload produced per local read (the agent's StreamDataPayloadSize).
pub(crate) const CHUNK: usize = 1024;

/// One client payload, in order, decrypted.
#[derive(Debug)]
pub(crate) struct PluginInput {
    pub payload_type: PayloadType,
    pub data: Bytes,
}

/// What a plugin tells the agent.
#[derive(Debug)]
pub(crate) enum PluginEvent {
    /// Send this payload to the client (never empty).
    Data(PayloadType, Bytes),
    /// The session is over; `channel_closed` carries this Output ("" for a normal end).
    Exit(String),
}

/// Everything a plugin task gets.
pub(crate) struct PluginContext {
    pub session: Arc<SessionShared>,
    /// ClientVersion from the HandshakeResponse (None when the handshake was skipped).
    pub client_version: Option<String>,
    pub input: mpsc::Receiver<PluginInput>,
    pub output: mpsc::Sender<PluginEvent>,
}

impl PluginContext {
    pub(crate) fn chunk_delay(&self) -> Duration {
        self.session.config.agent_chunk_delay
    }
}

/// The session types the simulator runs, with their parameters.
#[derive(Clone, Debug)]
pub(crate) enum SessionKind {
    /// `Standard_Stream`: the configured shell in a pty.
    Shell { argv: Vec<String> },
    /// `InteractiveCommands`: `sh -c command` in a pty.
    Interactive { command: String },
    /// `NonInteractiveCommands`: `sh -c command` with pipes.
    NonInteractive { command: String },
    /// `Port`: forwarding to `host:port`. `local_forwarding` is true when the properties
    /// carry `type: LocalPortForwarding` (basic/mux); false is the stdio (ssh) form.
    Port {
        host: String,
        port: String,
        local_forwarding: bool,
        properties: Map<String, Value>,
    },
}

/// A StartSession request that cannot be served: (AWS error type, message).
pub(crate) type KindError = (&'static str, String);

fn param(params: &BTreeMap<String, Vec<String>>, name: &str) -> Option<String> {
    params
        .get(name)
        .and_then(|v| v.first())
        .filter(|s| !s.is_empty())
        .cloned()
}

fn required(params: &BTreeMap<String, Vec<String>>, name: &str) -> Result<String, KindError> {
    param(params, name).ok_or((
        "InvalidDocumentContent",
        format!("The document requires the parameter {name}."),
    ))
}

impl SessionKind {
    /// Maps a DocumentName and its Parameters (lists of strings, as the CLI sends them)
    /// to a session kind.
    pub(crate) fn from_request(
        document: Option<&str>,
        params: &BTreeMap<String, Vec<String>>,
        shell: &[String],
    ) -> Result<SessionKind, KindError> {
        let port_props = |host: Option<String>, default_port: &str, forwarding: bool| {
            let port = param(params, "portNumber").unwrap_or_else(|| default_port.to_owned());
            if port.parse::<u16>().is_err() {
                return Err((
                    "InvalidParameters",
                    format!("portNumber {port:?} is not a port number."),
                ));
            }
            let mut properties = Map::new();
            properties.insert("portNumber".into(), Value::String(port.clone()));
            if forwarding {
                let local = param(params, "localPortNumber").unwrap_or_else(|| "0".to_owned());
                properties.insert("localPortNumber".into(), Value::String(local));
                properties.insert("type".into(), Value::String("LocalPortForwarding".into()));
                for extra in ["localUnixSocket", "localConnectionType"] {
                    if let Some(v) = param(params, extra) {
                        properties.insert(extra.into(), Value::String(v));
                    }
                }
            }
            if let Some(h) = &host {
                properties.insert("host".into(), Value::String(h.clone()));
            }
            Ok(SessionKind::Port {
                host: host.unwrap_or_else(|| "127.0.0.1".to_owned()),
                port,
                local_forwarding: forwarding,
                properties,
            })
        };
        match document {
            None | Some("") | Some("SSM-SessionManagerRunShell") => Ok(SessionKind::Shell {
                argv: if shell.is_empty() {
                    vec!["/bin/sh".to_owned()]
                } else {
                    shell.to_vec()
                },
            }),
            Some("AWS-StartInteractiveCommand") => Ok(SessionKind::Interactive {
                command: required(params, "command")?,
            }),
            Some("AWS-StartNonInteractiveCommand") => Ok(SessionKind::NonInteractive {
                command: required(params, "command")?,
            }),
            Some("AWS-StartPortForwardingSession") => port_props(None, "80", true),
            Some("AWS-StartPortForwardingSessionToRemoteHost") => {
                let host = required(params, "host")?;
                port_props(Some(host), "80", true)
            }
            Some("AWS-StartSSHSession") => port_props(None, "22", false),
            Some(other) => Err((
                "InvalidDocument",
                format!("Document {other} does not exist in the simulator."),
            )),
        }
    }

    /// The SessionType announced in the handshake.
    pub(crate) fn session_type(&self) -> &'static str {
        match self {
            SessionKind::Shell { .. } => "Standard_Stream",
            SessionKind::Interactive { .. } => "InteractiveCommands",
            SessionKind::NonInteractive { .. } => "NonInteractiveCommands",
            SessionKind::Port { .. } => "Port",
        }
    }

    /// The SessionType action's Properties (null for the shell types).
    pub(crate) fn properties(&self) -> Value {
        match self {
            SessionKind::Port { properties, .. } => Value::Object(properties.clone()),
            _ => Value::Null,
        }
    }

    /// Whether KMS encryption applies when a key is configured.
    pub(crate) fn kms_capable(&self) -> bool {
        !matches!(self, SessionKind::Port { .. })
    }

    /// Whether the agent performs the handshake (§6.1).
    pub(crate) fn needs_handshake(&self, kms: bool) -> bool {
        match self {
            SessionKind::Port { .. } | SessionKind::NonInteractive { .. } => true,
            SessionKind::Shell { .. } | SessionKind::Interactive { .. } => kms,
        }
    }
}

/// Starts the plugin for `kind`.
pub(crate) fn spawn(ctx: PluginContext) -> JoinHandle<()> {
    let kind = ctx.session.kind.clone();
    tokio::spawn(async move {
        match kind {
            SessionKind::Shell { argv } => shell::run(ctx, argv).await,
            SessionKind::Interactive { command } => {
                shell::run(ctx, vec!["sh".into(), "-c".into(), command]).await
            }
            SessionKind::NonInteractive { command } => commands::run(ctx, command).await,
            SessionKind::Port {
                host,
                port,
                local_forwarding: true,
                ..
            } => port::run(ctx, host, port).await,
            SessionKind::Port { host, port, .. } => stdio::run(ctx, host, port).await,
        }
    })
}

/// Reads `reader` in chunks of at most [`CHUNK`] bytes and sends each as one payload of
/// `payload_type`, pausing `delay` after each. Returns on EOF, on a read error or when
/// the agent is gone (`Err`).
pub(crate) async fn pump<R: AsyncRead + Unpin>(
    mut reader: R,
    payload_type: PayloadType,
    output: &mpsc::Sender<PluginEvent>,
    delay: Duration,
) -> Result<std::io::Result<()>, ()> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) => return Ok(Ok(())),
            Ok(n) => {
                let data = Bytes::copy_from_slice(&buf[..n]);
                if output
                    .send(PluginEvent::Data(payload_type, data))
                    .await
                    .is_err()
                {
                    return Err(());
                }
                agent_pause(delay).await;
            }
            Err(e) => return Ok(Err(e)),
        }
    }
}

/// The real agent's pause after each chunk it sends (Go's `time.Sleep`, which keeps close
/// to the asked duration). tokio's timer would round 1 ms up to nearly 2, halving every
/// agent-bound transfer, so short pauses sleep on a blocking thread instead.
pub(crate) async fn agent_pause(delay: Duration) {
    if delay.is_zero() {
        return;
    }
    let precise = delay < Duration::from_millis(20)
        && tokio::task::spawn_blocking(move || std::thread::sleep(delay))
            .await
            .is_ok();
    if !precise {
        tokio::time::sleep(delay).await;
    }
}

/// Aborts the wrapped task when dropped, so helper tasks die with their plugin.
pub(crate) struct AbortOnDrop<T>(pub JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Dials `host:port` (TCP).
pub(crate) async fn dial(host: &str, port: &str) -> std::io::Result<tokio::net::TcpStream> {
    let addr = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}
