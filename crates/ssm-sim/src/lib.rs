//! `ssm-sim`: a simulator of the far side of an AWS Session Manager session — the SSM
//! API, the message gateway (MGS) and the SSM agent — for end-to-end tests and benchmarks
//! of `session-manager-plugin`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), ssm_sim::SimError> {
//! use ssm_sim::{SimConfig, Simulator, StartSessionRequest};
//! let sim = Simulator::start(SimConfig { tls: true, ..Default::default() }).await?;
//! let resp = sim.start_session(StartSessionRequest::non_interactive_command("echo hi"))?;
//! // hand `resp` (SessionId, TokenValue, StreamUrl) to the plugin, with
//! // AWS_CA_BUNDLE=sim.ca_pem_path() and the endpoint sim.endpoint_url() ...
//! let stats = sim.wait_closed(&resp.session_id, std::time::Duration::from_secs(10)).await?;
//! assert!(stats.closed);
//! # Ok(()) }
//! ```
//!
//! One listener serves both the AWS JSON 1.1 API (`AmazonSSM.StartSession`,
//! `ResumeSession`, `TerminateSession`, `DescribeInstanceInformation`,
//! `TrentService.GenerateDataKey`, EC2 Instance Connect's `SendSSHPublicKey`) and the data
//! channel WebSocket `/v1/data-channel/<SessionId>`; with `tls` both are HTTPS/WSS under a
//! throwaway CA.
//!
//! Modules:
//! - [`config`]: every knob ([`SimConfig`]).
//! - [`stats`]: what the simulator observed ([`SessionStats`]).
//! - `api`: the SSM/KMS JSON API; `http`: the HTTP/1.1 server side; `tls`: certificates.
//! - [`eice`]: the EC2 Instance Connect Endpoint (`/openTunnel`, SigV4 query signatures
//!   checked) and the EC2 query calls that find it (`DescribeInstances`,
//!   `DescribeInstanceConnectEndpoints`).
//! - `gateway`: the WebSocket endpoint; `netem`: latency/loss/duplication/reordering.
//! - `agent`: the agent's reliable channel and handshake; `plugins`: shell, commands,
//!   port forwarding, stdio; `pty`: pseudo-terminals.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

mod agent;
mod api;
pub mod config;
pub mod eice;
mod gateway;
mod http;
mod kms;
mod netem;
mod nodes;
mod plugins;
mod pty;
mod session;
pub mod stats;
mod tls;
mod version;

pub use api::{cli_response_json, ApiCall};
pub use config::{
    DropTrigger, DropWebSocket, ReconnectResend, RetransmitPolicy, SimConfig, DEFAULT_AGENT_VERSION,
};
pub use eice::{Ec2InstanceSim, InstanceConnectEndpoint, TunnelRecord};
pub use kms::KmsRequest;
pub use netem::link_overshoot;
pub use nodes::{ManagedNode, PushedKey, KEY_LIFETIME};
pub use ssm_wire::payload::StartSessionResponse;
pub use stats::SessionStats;

use crate::kms::KmsStore;
use crate::plugins::SessionKind;
use crate::session::{lock, SessionShared};

/// Errors of the simulator's library API.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS setup failed: {0}")]
    Tls(String),
    /// The request would be refused by the service (`code` is the AWS error type).
    #[error("{code}: {message}")]
    InvalidRequest { code: &'static str, message: String },
    #[error("no session {0}")]
    UnknownSession(String),
    #[error("timed out")]
    Timeout,
    #[error("the simulator was started outside a Tokio runtime")]
    NoRuntime,
}

/// A StartSession call, as the AWS CLI sends it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StartSessionRequest {
    /// `--target`, e.g. `i-0123456789abcdef0`.
    pub target: String,
    /// `--document-name`; `None` is the default shell document.
    pub document_name: Option<String>,
    /// `--parameters`: each value is a list of strings.
    pub parameters: BTreeMap<String, Vec<String>>,
}

/// A host name (not loopback, so proxies apply) the simulator's certificate covers.
pub const EICE_TEST_HOST: &str = "eice.ssm-sim.test";

/// The target the helpers use.
pub const DEFAULT_TARGET: &str = "i-0123456789abcdef0";

impl StartSessionRequest {
    fn with(document: Option<&str>, params: &[(&str, &str)]) -> Self {
        StartSessionRequest {
            target: DEFAULT_TARGET.to_owned(),
            document_name: document.map(str::to_owned),
            parameters: params
                .iter()
                .map(|(k, v)| ((*k).to_owned(), vec![(*v).to_owned()]))
                .collect(),
        }
    }

    /// A shell session (`Standard_Stream`, no document).
    pub fn shell() -> Self {
        Self::with(None, &[])
    }

    /// `AWS-StartInteractiveCommand` running `command` in a pty.
    pub fn interactive_command(command: &str) -> Self {
        Self::with(Some("AWS-StartInteractiveCommand"), &[("command", command)])
    }

    /// `AWS-StartNonInteractiveCommand` running `command` with separate stdout/stderr.
    pub fn non_interactive_command(command: &str) -> Self {
        Self::with(
            Some("AWS-StartNonInteractiveCommand"),
            &[("command", command)],
        )
    }

    /// `AWS-StartPortForwardingSession` to `127.0.0.1:port` on the "instance".
    pub fn port_forwarding(port: u16, local_port: u16) -> Self {
        let (p, l) = (port.to_string(), local_port.to_string());
        Self::with(
            Some("AWS-StartPortForwardingSession"),
            &[("portNumber", &p), ("localPortNumber", &l)],
        )
    }

    /// `AWS-StartPortForwardingSessionToRemoteHost` to `host:port`.
    pub fn port_forwarding_to_host(host: &str, port: u16, local_port: u16) -> Self {
        let (p, l) = (port.to_string(), local_port.to_string());
        Self::with(
            Some("AWS-StartPortForwardingSessionToRemoteHost"),
            &[("host", host), ("portNumber", &p), ("localPortNumber", &l)],
        )
    }

    /// `AWS-StartSSHSession` (stdio mode) to `127.0.0.1:port`.
    pub fn ssh(port: u16) -> Self {
        let p = port.to_string();
        Self::with(Some("AWS-StartSSHSession"), &[("portNumber", &p)])
    }
}

/// Anything the server can speak HTTP over.
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// State shared by the listener, the API, the gateway and the agents.
pub(crate) struct Inner {
    pub config: SimConfig,
    pub http_base: String,
    pub ws_base: String,
    pub sessions: Mutex<HashMap<String, Arc<SessionShared>>>,
    pub counter: AtomicU64,
    pub kms: Arc<KmsStore>,
    pub api_calls: Mutex<Vec<ApiCall>>,
    /// What DescribeInstanceInformation lists.
    pub nodes: Mutex<Vec<nodes::ManagedNode>>,
    /// Every accepted SendSSHPublicKey.
    pub pushed_keys: Mutex<Vec<nodes::PushedKey>>,
    /// The EC2 Instance Connect Endpoint and the EC2 instances behind it.
    pub eice: eice::EiceState,
    pub shutdown: watch::Receiver<bool>,
    pub rng: Mutex<StdRng>,
    /// Mixed into every session id so that ids differ across simulator instances and
    /// processes (drawn from OS randomness, the pid and the clock; not from the seed).
    pub id_nonce: [u8; 9],
    pub runtime: tokio::runtime::Handle,
}

impl Inner {
    pub(crate) fn session(&self, id: &str) -> Option<Arc<SessionShared>> {
        lock(&self.sessions).get(id).cloned()
    }

    fn random_b64(&self, n: usize) -> String {
        let mut b = vec![0u8; n];
        lock(&self.rng).fill_bytes(&mut b);
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    }

    pub(crate) fn new_token(&self) -> String {
        self.random_b64(96)
    }

    pub(crate) fn new_cell(&self) -> String {
        self.random_b64(12)
    }

    pub(crate) fn stream_url(&self, id: &str, cell: &str) -> String {
        format!(
            "{}/v1/data-channel/{id}?role=publish_subscribe&cell-number={cell}",
            self.ws_base
        )
    }

    /// Creates a session and its agent; the API and the library both come here.
    pub(crate) fn create_session(
        &self,
        req: &StartSessionRequest,
        config: SimConfig,
    ) -> Result<StartSessionResponse, SimError> {
        if req.target.is_empty() {
            return Err(SimError::InvalidRequest {
                code: "ValidationException",
                message: "1 validation error detected: Value at 'target' failed to satisfy constraint: Member must not be null".to_owned(),
            });
        }
        let kind =
            SessionKind::from_request(req.document_name.as_deref(), &req.parameters, &config.shell)
                .map_err(|(code, message)| SimError::InvalidRequest { code, message })?;
        let index = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut id_bytes = [0u8; 9];
        lock(&self.rng).fill_bytes(&mut id_bytes);
        for (b, n) in id_bytes.iter_mut().zip(self.id_nonce) {
            *b ^= n;
        }
        let hex: String = id_bytes.iter().map(|b| format!("{b:02x}")).collect();
        let id = format!("sim-{}", &hex[..17]);
        let token = self.new_token();
        let cell = self.new_cell();
        let (events_tx, events_rx) = mpsc::channel(1024);
        let (closed_tx, _) = watch::channel(false);
        let stats = SessionStats {
            session_id: id.clone(),
            target: req.target.clone(),
            document_name: req.document_name.clone().unwrap_or_default(),
            session_type: kind.session_type().to_owned(),
            ..Default::default()
        };
        let shared = Arc::new(SessionShared {
            id: id.clone(),
            target: req.target.clone(),
            config,
            kind,
            index,
            token: Mutex::new(token.clone()),
            cell: Mutex::new(cell.clone()),
            stats: Mutex::new(stats),
            events: events_tx,
            closed: closed_tx,
            connections: AtomicU32::new(0),
        });
        lock(&self.sessions).insert(id.clone(), shared.clone());
        let _guard = self.runtime.enter();
        agent::spawn(shared, self.kms.clone(), events_rx, self.shutdown.clone());
        Ok(StartSessionResponse {
            stream_url: self.stream_url(&id, &cell),
            session_id: id,
            token_value: token,
        })
    }

    /// ResumeSession: a fresh token (and maybe cell), or `None` for ended/unknown sessions.
    pub(crate) fn resume_session(&self, id: &str) -> Option<StartSessionResponse> {
        let session = self.session(id)?;
        session.update_stats(|s| s.resume_calls += 1);
        if session.is_closed() {
            return None;
        }
        let token = self.new_token();
        *lock(&session.token) = token.clone();
        let cell = if session.config.resume_changes_cell {
            let c = self.new_cell();
            *lock(&session.cell) = c.clone();
            c
        } else {
            lock(&session.cell).clone()
        };
        Some(StartSessionResponse {
            session_id: id.to_owned(),
            token_value: token,
            stream_url: self.stream_url(id, &cell),
        })
    }

    /// TerminateSession: ends the session; `false` if unknown.
    pub(crate) fn terminate_session(&self, id: &str) -> bool {
        let Some(session) = self.session(id) else {
            return false;
        };
        session.update_stats(|s| s.terminate_called = true);
        if session
            .events
            .try_send(agent::AgentEvent::Terminate)
            .is_err()
        {
            // The agent is gone or swamped; the session is over either way.
            session.mark_closed("");
        }
        true
    }
}

/// A running simulator. Dropping it stops every session (and kills their processes).
pub struct Simulator {
    inner: Arc<Inner>,
    addr: SocketAddr,
    tls: Option<tls::TlsMaterial>,
    accept_task: JoinHandle<()>,
    shutdown_tx: watch::Sender<bool>,
}

static SIM_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Simulator {
    /// Binds the listener and starts serving. Must be called inside a Tokio runtime
    /// (multi-threaded recommended: the simulated agent runs real processes).
    pub async fn start(config: SimConfig) -> Result<Simulator, SimError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| SimError::NoRuntime)?;
        let listener = TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        let unique = SIM_COUNTER.fetch_add(1, Ordering::Relaxed) ^ (config.seed << 16);
        let tls = if config.tls {
            Some(tls::TlsMaterial::generate(unique)?)
        } else {
            None
        };
        let host = if addr.ip().is_unspecified() {
            "127.0.0.1".to_owned()
        } else if addr.is_ipv6() {
            format!("[{}]", addr.ip())
        } else {
            addr.ip().to_string()
        };
        let (http_scheme, ws_scheme) = if tls.is_some() {
            ("https", "wss")
        } else {
            ("http", "ws")
        };
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let inner = Arc::new(Inner {
            http_base: format!("{http_scheme}://{host}:{}", addr.port()),
            ws_base: format!("{ws_scheme}://{host}:{}", addr.port()),
            sessions: Mutex::new(HashMap::new()),
            counter: AtomicU64::new(0),
            kms: Arc::new(KmsStore::default()),
            api_calls: Mutex::new(Vec::new()),
            nodes: Mutex::new(Vec::new()),
            pushed_keys: Mutex::new(Vec::new()),
            eice: eice::EiceState::default(),
            shutdown: shutdown_rx,
            rng: Mutex::new(StdRng::seed_from_u64(config.seed ^ 0xA11C_E5ED)),
            id_nonce: id_nonce(),
            runtime,
            config,
        });
        let acceptor = tls
            .as_ref()
            .map(|t| tokio_rustls::TlsAcceptor::from(t.server_config.clone()));
        let accept_task = tokio::spawn(accept_loop(listener, acceptor, inner.clone()));
        Ok(Simulator {
            inner,
            addr,
            tls,
            accept_task,
            shutdown_tx,
        })
    }

    /// `http(s)://127.0.0.1:PORT`: the SSM and KMS endpoint (`--endpoint-url`).
    pub fn endpoint_url(&self) -> String {
        self.inner.http_base.clone()
    }

    /// The listening address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// PEM file of the CA that signed the server certificate (when `tls`): point
    /// `AWS_CA_BUNDLE` at it.
    pub fn ca_pem_path(&self) -> Option<PathBuf> {
        self.tls.as_ref().map(|t| t.ca_pem_path().to_path_buf())
    }

    /// The CA certificate (DER) for a rustls root store (when `tls`).
    pub fn ca_certificate_der(&self) -> Option<Vec<u8>> {
        self.tls
            .as_ref()
            .and_then(|t| t.ca_der())
            .map(|d| d.as_ref().to_vec())
    }

    /// The configuration sessions created through the HTTP API use.
    pub fn config(&self) -> &SimConfig {
        &self.inner.config
    }

    /// StartSession, in process: same validation and result as the API call.
    pub fn start_session(
        &self,
        req: StartSessionRequest,
    ) -> Result<StartSessionResponse, SimError> {
        self.inner.create_session(&req, self.inner.config.clone())
    }

    /// StartSession with per-session knobs (`tls`/`listen` of `config` are ignored).
    pub fn start_session_with(
        &self,
        req: StartSessionRequest,
        config: SimConfig,
    ) -> Result<StartSessionResponse, SimError> {
        self.inner.create_session(&req, config)
    }

    /// ResumeSession, in process: `Ok(None)` is the API's null TokenValue (session ended).
    pub fn resume_session(
        &self,
        session_id: &str,
    ) -> Result<Option<StartSessionResponse>, SimError> {
        if self.inner.session(session_id).is_none() {
            return Err(SimError::UnknownSession(session_id.to_owned()));
        }
        Ok(self.inner.resume_session(session_id))
    }

    /// TerminateSession, in process.
    pub fn terminate_session(&self, session_id: &str) -> Result<(), SimError> {
        if self.inner.terminate_session(session_id) {
            Ok(())
        } else {
            Err(SimError::UnknownSession(session_id.to_owned()))
        }
    }

    /// A snapshot of a session's counters and records.
    pub fn stats(&self, session_id: &str) -> Option<SessionStats> {
        self.inner.session(session_id).map(|s| s.stats_snapshot())
    }

    /// Ids of every session created so far, oldest first.
    pub fn session_ids(&self) -> Vec<String> {
        let sessions = lock(&self.inner.sessions);
        let mut v: Vec<(u64, String)> =
            sessions.values().map(|s| (s.index, s.id.clone())).collect();
        v.sort();
        v.into_iter().map(|(_, id)| id).collect()
    }

    /// Waits until the session has ended (channel_closed sent or due) and returns its
    /// final stats.
    pub async fn wait_closed(
        &self,
        session_id: &str,
        timeout: Duration,
    ) -> Result<SessionStats, SimError> {
        let session = self
            .inner
            .session(session_id)
            .ok_or_else(|| SimError::UnknownSession(session_id.to_owned()))?;
        let mut closed = session.closed.subscribe();
        tokio::time::timeout(timeout, closed.wait_for(|c| *c))
            .await
            .map_err(|_| SimError::Timeout)?
            .map_err(|_| SimError::Timeout)?;
        Ok(session.stats_snapshot())
    }

    /// Every API call received, in order (target, headers, body, status).
    pub fn api_calls(&self) -> Vec<ApiCall> {
        lock(&self.inner.api_calls).clone()
    }

    /// Adds a node to what DescribeInstanceInformation lists (in this order).
    pub fn add_managed_node(&self, node: ManagedNode) {
        lock(&self.inner.nodes).push(node);
    }

    /// Every key accepted by SendSSHPublicKey, oldest first.
    pub fn pushed_keys(&self) -> Vec<PushedKey> {
        lock(&self.inner.pushed_keys).clone()
    }

    /// Adds an instance to what EC2 DescribeInstances lists; EICE tunnels to its private
    /// IP reach `ports`.
    pub fn add_ec2_instance(&self, instance: Ec2InstanceSim) {
        lock(&self.inner.eice.instances).push(instance);
    }

    /// Adds an Instance Connect Endpoint (DescribeInstanceConnectEndpoints lists it; its
    /// `dns_name` is the host its tunnels must be signed for).
    pub fn add_instance_connect_endpoint(&self, endpoint: InstanceConnectEndpoint) {
        lock(&self.inner.eice.endpoints).push(endpoint);
    }

    /// An endpoint in `vpc_id`/`subnet_id` reached at this simulator (`dns_name`
    /// `127.0.0.1:PORT`, or `host:PORT` when `host` is given, e.g. a name only a proxy
    /// resolves; the certificate covers [`EICE_TEST_HOST`]).
    pub fn instance_connect_endpoint(
        &self,
        id: &str,
        vpc_id: &str,
        subnet_id: &str,
        host: Option<&str>,
    ) -> InstanceConnectEndpoint {
        let port = self.addr.port();
        let host = host.unwrap_or("127.0.0.1");
        InstanceConnectEndpoint {
            id: id.to_owned(),
            vpc_id: vpc_id.to_owned(),
            subnet_id: subnet_id.to_owned(),
            state: "create-complete".to_owned(),
            dns_name: format!("{host}:{port}"),
            fips_dns_name: format!("localhost:{port}"),
        }
    }

    /// Adds an access key the EICE endpoint accepts signatures of (`test`/`test` is there
    /// from the start).
    pub fn add_eice_credentials(&self, access_key: &str, secret_key: &str) {
        lock(&self.inner.eice.credentials).insert(access_key.to_owned(), secret_key.to_owned());
    }

    /// Moves the EICE endpoint's clock (for `X-Amz-Date` checks) by `secs` from the
    /// system clock: a test of expiry needs no sleep.
    pub fn set_eice_clock_offset(&self, secs: i64) {
        self.inner.eice.clock_offset.store(secs, Ordering::SeqCst);
    }

    /// Every `openTunnel` request, oldest first.
    pub fn eice_tunnels(&self) -> Vec<TunnelRecord> {
        lock(&self.inner.eice.tunnels).clone()
    }

    /// The most EICE tunnels that were open at the same time.
    pub fn eice_max_concurrent(&self) -> usize {
        self.inner.eice.max_active.load(Ordering::SeqCst)
    }

    /// EICE tunnels open now.
    pub fn eice_active(&self) -> usize {
        self.inner.eice.active.load(Ordering::SeqCst)
    }

    /// Every GenerateDataKey call received.
    pub fn kms_requests(&self) -> Vec<KmsRequest> {
        self.inner.kms.requests()
    }
}

/// A per-simulator value for session ids: OS-seeded randomness, mixed with the pid, the
/// clock and an in-process counter for good measure.
fn id_nonce() -> [u8; 9] {
    let mut nonce = [0u8; 9];
    rand::thread_rng().fill_bytes(&mut nonce);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let extra = nanos
        ^ (u64::from(std::process::id()) << 32)
        ^ NONCE_COUNTER
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for (b, e) in nonce.iter_mut().zip(extra.to_le_bytes()) {
        *b ^= e;
    }
    nonce
}

static NONCE_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Drop for Simulator {
    fn drop(&mut self) {
        self.shutdown_tx.send_replace(true);
        self.accept_task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    inner: Arc<Inner>,
) {
    loop {
        let Ok((tcp, _peer)) = listener.accept().await else {
            // Out of file descriptors or similar: back off briefly instead of spinning.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let inner = inner.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let stream: Box<dyn Io> = match acceptor {
                Some(acceptor) => {
                    match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
                    {
                        Ok(Ok(tls)) => Box::new(tls),
                        _ => return,
                    }
                }
                None => Box::new(tcp),
            };
            api::serve_connection(stream, inner).await;
        });
    }
}
