//! Shared harness for the end-to-end tests: runs the built `session-manager-plugin`
//! binary as a real process against `ssm-sim` over TLS, invoked exactly as the AWS CLI
//! invokes it, plus small local servers (TCP echo, sha256 sink/source, HTTP) and process
//! helpers. Everything is bounded by timeouts and cleaned up on drop.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};
use ssm_sim::{cli_response_json, SimConfig, Simulator, StartSessionRequest, StartSessionResponse};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The plugin binary cargo built for this test run.
pub const PLUGIN: &str = env!("CARGO_BIN_EXE_session-manager-plugin");
pub const REGION: &str = "us-east-1";
pub const TARGET: &str = ssm_sim::DEFAULT_TARGET;

// ---- temp dirs ----------------------------------------------------------------------

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A directory removed (recursively) on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        // Short: unix socket paths are limited to ~108 bytes.
        let p =
            std::env::temp_dir().join(format!("smp-{tag}-{}-{n}-{nanos:x}", std::process::id()));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // E2E_KEEP=1 keeps logs and files for a post-mortem.
        if std::env::var_os("E2E_KEEP").is_some() {
            eprintln!("kept {}", self.0.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---- simulator ----------------------------------------------------------------------

/// A TLS simulator with the default (perfect) network.
pub async fn start_sim() -> Simulator {
    start_sim_with(SimConfig::default()).await
}

/// A TLS simulator with `config` (its `tls` is forced on).
pub async fn start_sim_with(config: SimConfig) -> Simulator {
    Simulator::start(SimConfig {
        tls: true,
        ..config
    })
    .await
    .expect("start simulator")
}

/// The StartSession parameters JSON exactly as the AWS CLI passes it in argv[5].
pub fn params_json(req: &StartSessionRequest) -> String {
    let mut m = serde_json::Map::new();
    m.insert(
        "Target".into(),
        serde_json::Value::String(req.target.clone()),
    );
    if let Some(doc) = &req.document_name {
        m.insert(
            "DocumentName".into(),
            serde_json::Value::String(doc.clone()),
        );
    }
    if !req.parameters.is_empty() {
        let params: BTreeMap<String, serde_json::Value> = req
            .parameters
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::json!(v)))
            .collect();
        m.insert("Parameters".into(), serde_json::json!(params));
    }
    serde_json::Value::Object(m).to_string()
}

/// Appends one string parameter to a request (e.g. `localUnixSocket`).
pub fn with_param(mut req: StartSessionRequest, k: &str, v: &str) -> StartSessionRequest {
    req.parameters.insert(k.to_owned(), vec![v.to_owned()]);
    req
}

// ---- the plugin process -------------------------------------------------------------

/// Output of a child stream, collected in the background.
#[derive(Default)]
pub struct Collected {
    buf: Mutex<Vec<u8>>,
    notify: Notify,
    eof: AtomicBool,
}

impl Collected {
    /// Collects `r` in the background.
    pub fn of<R: AsyncRead + Unpin + Send + 'static>(r: R) -> Arc<Collected> {
        Collected::spawn(r)
    }

    fn spawn<R: AsyncRead + Unpin + Send + 'static>(mut r: R) -> Arc<Collected> {
        let c = Arc::new(Collected::default());
        let c2 = c.clone();
        tokio::spawn(async move {
            let mut chunk = vec![0u8; 64 * 1024];
            loop {
                match r.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        c2.buf.lock().unwrap().extend_from_slice(&chunk[..n]);
                        c2.notify.notify_waiters();
                    }
                }
            }
            c2.eof.store(true, Ordering::SeqCst);
            c2.notify.notify_waiters();
        });
        c
    }

    pub fn bytes(&self) -> Vec<u8> {
        self.buf.lock().unwrap().clone()
    }

    pub fn len(&self) -> usize {
        self.buf.lock().unwrap().len()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf.lock().unwrap()).into_owned()
    }

    pub fn is_eof(&self) -> bool {
        self.eof.load(Ordering::SeqCst)
    }

    /// Waits until `pred` holds for the collected bytes; `Err` on EOF or timeout.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&[u8]) -> bool,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if pred(&self.buf.lock().unwrap()) {
                return Ok(());
            }
            if self.is_eof() {
                return Err(format!("stream ended before {what}"));
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(format!("timed out after {timeout:?} waiting for {what}"));
            }
        }
    }

    /// Waits until the text contains `pat`.
    pub async fn wait_for(&self, pat: &str, timeout: Duration) -> Result<(), String> {
        let p = pat.as_bytes().to_vec();
        self.wait_until(timeout, &format!("{pat:?}"), move |b| find(b, &p).is_some())
            .await
    }
}

/// Byte-substring search.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Number of non-overlapping occurrences of `needle` in `hay`.
pub fn count(hay: &str, needle: &str) -> usize {
    hay.matches(needle).count()
}

/// How to start a plugin.
pub struct PluginSpec<'a> {
    pub sim: &'a Simulator,
    pub req: &'a StartSessionRequest,
    pub resp: &'a StartSessionResponse,
    /// Extra environment variables (`SSM_PLUGIN_*` knobs).
    pub env: Vec<(String, String)>,
    /// Pipe stdin (else /dev/null).
    pub stdin: bool,
}

/// A running plugin process (killed on drop).
pub struct PluginProc {
    pub child: Child,
    pub pid: i32,
    pub stdout: Arc<Collected>,
    pub stderr: Arc<Collected>,
    pub stdin: Option<ChildStdin>,
    pub session_id: String,
    /// HOME and the log file live here.
    pub dir: TempDir,
    exited: Option<ExitStatus>,
}

/// The environment every plugin gets: no real AWS configuration, the sim's CA, dummy
/// credentials.
pub fn base_env(sim: &Simulator, home: &Path) -> Vec<(String, String)> {
    let ca = sim.ca_pem_path().expect("TLS simulator has a CA");
    let mut v: Vec<(String, String)> = vec![
        ("PATH".into(), std::env::var("PATH").unwrap_or_default()),
        ("HOME".into(), home.display().to_string()),
        ("AWS_CA_BUNDLE".into(), ca.display().to_string()),
        ("AWS_ACCESS_KEY_ID".into(), "test".into()),
        ("AWS_SECRET_ACCESS_KEY".into(), "test".into()),
        ("AWS_REGION".into(), REGION.into()),
        ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
        (
            "AWS_CONFIG_FILE".into(),
            home.join("no-aws-config").display().to_string(),
        ),
        (
            "AWS_SHARED_CREDENTIALS_FILE".into(),
            home.join("no-aws-credentials").display().to_string(),
        ),
        (
            "SSM_PLUGIN_LOG".into(),
            std::env::var("E2E_PLUGIN_LOG").unwrap_or_else(|_| "info".into()),
        ),
        (
            "SSM_PLUGIN_LOG_FILE".into(),
            home.join("plugin.log").display().to_string(),
        ),
    ];
    if let Ok(tmp) = std::env::var("TMPDIR") {
        v.push(("TMPDIR".into(), tmp));
    }
    v
}

/// argv after argv[0], as the AWS CLI builds it (env-var form).
pub fn plugin_args(sim: &Simulator, req: &StartSessionRequest) -> Vec<String> {
    vec![
        "AWS_SSM_START_SESSION_RESPONSE".into(),
        REGION.into(),
        "StartSession".into(),
        String::new(),
        params_json(req),
        sim.endpoint_url(),
    ]
}

impl PluginProc {
    pub fn spawn(spec: PluginSpec<'_>) -> PluginProc {
        let dir = TempDir::new("home");
        let mut cmd = Command::new(PLUGIN);
        cmd.args(plugin_args(spec.sim, spec.req))
            .env_clear()
            .envs(base_env(spec.sim, dir.path()))
            .env(
                "AWS_SSM_START_SESSION_RESPONSE",
                cli_response_json(spec.resp),
            )
            .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(if spec.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("spawn session-manager-plugin");
        let pid = child.id().expect("pid") as i32;
        let stdout = Collected::spawn(child.stdout.take().expect("stdout"));
        let stderr = Collected::spawn(child.stderr.take().expect("stderr"));
        let stdin = child.stdin.take();
        PluginProc {
            child,
            pid,
            stdout,
            stderr,
            stdin,
            session_id: spec.resp.session_id.clone(),
            dir,
            exited: None,
        }
    }

    /// Sends a signal to the plugin.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) with a pid we spawned and have not reaped.
        unsafe {
            libc::kill(self.pid, sig);
        }
    }

    /// The plugin's log file (if it wrote one).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("plugin.log")).unwrap_or_default()
    }

    /// A diagnostic dump for assertion messages.
    pub fn dump(&self) -> String {
        let tail = |s: String, n: usize| {
            if s.len() > n {
                let mut i = s.len() - n;
                while !s.is_char_boundary(i) {
                    i += 1;
                }
                format!("…{}", &s[i..])
            } else {
                s
            }
        };
        let out = self.stdout.bytes();
        let out = if out.len() > 2000 {
            format!(
                "<{} bytes> {:?}",
                out.len(),
                String::from_utf8_lossy(&out[..300])
            )
        } else {
            format!("{:?}", String::from_utf8_lossy(&out))
        };
        format!(
            "\n--- stdout: {out}\n--- stderr: {:?}\n--- log tail:\n{}\n",
            tail(self.stderr.text(), 3000),
            tail(self.log(), 6000)
        )
    }

    /// Waits for `pat` on stdout; panics with a dump on failure.
    pub async fn expect_stdout(&self, pat: &str, timeout: Duration) {
        if let Err(e) = self.stdout.wait_for(pat, timeout).await {
            panic!("stdout: {e}{}", self.dump());
        }
    }

    /// Waits for `pat` on stderr; panics with a dump on failure.
    pub async fn expect_stderr(&self, pat: &str, timeout: Duration) {
        if let Err(e) = self.stderr.wait_for(pat, timeout).await {
            panic!("stderr: {e}{}", self.dump());
        }
    }

    /// Waits for the "Port N opened" line and returns N.
    pub async fn opened_port(&self, timeout: Duration) -> u16 {
        self.expect_stdout(" opened for sessionId ", timeout).await;
        parse_opened_port(&self.stdout.text())
            .unwrap_or_else(|| panic!("no port in the opened line{}", self.dump()))
    }

    /// Closes stdin (EOF for the plugin).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits for the process to exit (and its output to be collected); on timeout kills it
    /// and panics with a dump.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(s) = self.exited {
            return s;
        }
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(Ok(s)) => {
                self.exited = Some(s);
                // Let the collectors reach EOF.
                let _ = self
                    .stdout
                    .wait_until(Duration::from_secs(5), "stdout EOF", |_| false)
                    .await;
                let _ = self
                    .stderr
                    .wait_until(Duration::from_secs(5), "stderr EOF", |_| false)
                    .await;
                s
            }
            Ok(Err(e)) => panic!("waiting for the plugin: {e}"),
            Err(_) => {
                let _ = self.child.start_kill();
                let _ = self.child.wait().await;
                panic!("the plugin did not exit within {timeout:?}{}", self.dump());
            }
        }
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// Parses `Port N opened for sessionId` from the plugin's text.
pub fn parse_opened_port(text: &str) -> Option<u16> {
    let i = text.find("Port ")?;
    let rest = &text[i + 5..];
    let end = rest.find(' ')?;
    rest[..end].parse().ok()
}

/// Starts a session in the simulator and the plugin for it.
pub fn start_plugin(
    sim: &Simulator,
    req: &StartSessionRequest,
    config: Option<SimConfig>,
    env: &[(&str, &str)],
    stdin: bool,
) -> PluginProc {
    let resp = match config {
        Some(c) => sim.start_session_with(req.clone(), c),
        None => sim.start_session(req.clone()),
    }
    .expect("StartSession");
    PluginProc::spawn(PluginSpec {
        sim,
        req,
        resp: &resp,
        env: env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        stdin,
    })
}

// ---- local servers ------------------------------------------------------------------

/// A server task aborted on drop.
pub struct Server {
    pub port: u16,
    task: JoinHandle<()>,
    pub connections: Arc<AtomicUsize>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A port nothing listens on (bound once, then released).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// TCP echo server on 127.0.0.1: every connection gets its bytes back; the write side is
/// shut down after the peer's EOF.
pub async fn echo_server() -> Server {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let port = l.local_addr().unwrap().port();
    let connections = Arc::new(AtomicUsize::new(0));
    let conns = connections.clone();
    let task = tokio::spawn(async move {
        let mut tasks = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            conns.fetch_add(1, Ordering::SeqCst);
            tasks.push(AbortOnDrop(tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            })));
        }
    });
    Server {
        port,
        task,
        connections,
    }
}

struct AbortOnDrop(JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Deterministic pseudo-random bytes.
pub fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

pub fn sha256(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The result of one sink connection: bytes received and their sha256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkResult {
    pub bytes: u64,
    pub sha256: [u8; 32],
}

/// A target that, per connection, hashes what it receives (until EOF or `expect` bytes)
/// and at the same time sends `source` (then keeps the connection open while reading).
/// Results arrive on the returned receiver, one per connection.
pub async fn sink_source_server(
    expect: u64,
    source: Arc<Vec<u8>>,
) -> (Server, tokio::sync::mpsc::Receiver<SinkResult>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind sink");
    let port = l.local_addr().unwrap().port();
    let connections = Arc::new(AtomicUsize::new(0));
    let conns = connections.clone();
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let task = tokio::spawn(async move {
        let mut tasks = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            conns.fetch_add(1, Ordering::SeqCst);
            let tx = tx.clone();
            let source = source.clone();
            tasks.push(AbortOnDrop(tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let (mut r, mut w) = s.into_split();
                let writer = tokio::spawn(async move {
                    for c in source.chunks(64 * 1024) {
                        if w.write_all(c).await.is_err() {
                            return;
                        }
                    }
                    let _ = w.flush().await;
                    // Keep the write half open: closing it would end a stdio session.
                    std::future::pending::<()>().await;
                });
                let _writer = AbortOnDrop(writer);
                let mut h = Sha256::new();
                let mut n = 0u64;
                let mut buf = vec![0u8; 64 * 1024];
                while n < expect {
                    match r.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => {
                            h.update(&buf[..k]);
                            n += k as u64;
                        }
                    }
                }
                let _ = tx
                    .send(SinkResult {
                        bytes: n,
                        sha256: h.finalize().into(),
                    })
                    .await;
                // Hold the connection until the test ends.
                std::future::pending::<()>().await;
            })));
        }
    });
    (
        Server {
            port,
            task,
            connections,
        },
        rx,
    )
}

/// A minimal HTTP/1.1 server answering every GET with `body` (Content-Length, then close).
pub async fn http_server(body: Arc<Vec<u8>>) -> Server {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind http");
    let port = l.local_addr().unwrap().port();
    let connections = Arc::new(AtomicUsize::new(0));
    let conns = connections.clone();
    let task = tokio::spawn(async move {
        let mut tasks = Vec::new();
        while let Ok((mut s, _)) = l.accept().await {
            conns.fetch_add(1, Ordering::SeqCst);
            let body = body.clone();
            tasks.push(AbortOnDrop(tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1024];
                while find(&head, b"\r\n\r\n").is_none() {
                    match s.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&b[..n]),
                    }
                }
                let hdr = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                if s.write_all(hdr.as_bytes()).await.is_err() {
                    return;
                }
                let _ = s.write_all(&body).await;
                let _ = s.shutdown().await;
            })));
        }
    });
    Server {
        port,
        task,
        connections,
    }
}

/// Sends `data` through a connection to an echo server, writer and reader running
/// concurrently, and returns the bytes that came back (`Err` with the count received on
/// timeout or a socket error).
pub async fn echo_roundtrip<S>(
    stream: S,
    data: Arc<Vec<u8>>,
    timeout: Duration,
) -> Result<Vec<u8>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let (mut r, mut w) = tokio::io::split(stream);
    let d = data.clone();
    let written = Arc::new(AtomicUsize::new(0));
    let wr = written.clone();
    let writer = tokio::spawn(async move {
        for c in d.chunks(32 * 1024) {
            w.write_all(c)
                .await
                .map_err(|e| format!("write to the forwarded port: {e}"))?;
            wr.fetch_add(c.len(), Ordering::SeqCst);
        }
        w.flush().await.map_err(|e| format!("flush: {e}"))?;
        Ok::<_, String>(w)
    });
    let want = data.len();
    let got = Arc::new(Mutex::new(Vec::with_capacity(want)));
    let g = got.clone();
    let read = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if g.lock().unwrap().len() >= want {
                return Ok(());
            }
            match r.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(n) => g.lock().unwrap().extend_from_slice(&buf[..n]),
                Err(e) => return Err(format!("read from the forwarded port: {e}")),
            }
        }
    };
    let res = tokio::time::timeout(timeout, read).await;
    let n = got.lock().unwrap().len();
    match res {
        Err(_) => {
            writer.abort();
            return Err(format!(
                "echo of {want} bytes timed out after {timeout:?}: wrote {}, read back {n}",
                written.load(Ordering::SeqCst)
            ));
        }
        Ok(Err(e)) => {
            writer.abort();
            return Err(e);
        }
        Ok(Ok(())) => {}
    }
    match tokio::time::timeout(Duration::from_secs(5), writer).await {
        Ok(Ok(Ok(w))) => drop(w),
        Ok(Ok(Err(e))) => return Err(e),
        Ok(Err(e)) => return Err(format!("writer task: {e}")),
        Err(_) => return Err("writer did not finish".into()),
    }
    let v = std::mem::take(&mut *got.lock().unwrap());
    Ok(v)
}

pub async fn connect_retry(port: u16) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpStream::connect(("127.0.0.1", port)).await {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return s;
            }
            Err(e) if Instant::now() > deadline => panic!("connect 127.0.0.1:{port}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Runs an external command with a timeout (killed on timeout), returning its output.
pub async fn run_cmd(mut cmd: Command, timeout: Duration) -> std::process::Output {
    cmd.kill_on_drop(true)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().expect("spawn command");
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(r) => r.expect("command output"),
        Err(_) => panic!("command {cmd:?} timed out after {timeout:?}"),
    }
}

/// A one-shot flag for "the background task finished".
pub fn done_pair() -> (oneshot::Sender<()>, oneshot::Receiver<()>) {
    oneshot::channel()
}

/// Polls `f` until it returns `Some` or the timeout passes.
pub async fn poll_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub const SIGINT: i32 = libc::SIGINT;
pub const SIGTERM: i32 = libc::SIGTERM;
