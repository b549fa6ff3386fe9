//! `bench`: end-to-end benchmark of a `session-manager-plugin` binary against ssm-sim.
//!
//! ```text
//! cargo build --release -p session-manager-plugin -p ssm-sim
//! cargo run --release -p ssm-sim --bin bench -- [--plugin PATH] [--vs PATH] [--runs N]
//!     [--size-mib N] [--paced-size-mib N] [--max-secs S] [--echo-trips N] [--quick]
//!     [--only LIST] [--env-a K=V] [--env-b K=V] [--tls] [--json]
//! ```
//!
//! The plugin runs as a real process, invoked exactly as the AWS CLI does (argv
//! `AWS_SSM_START_SESSION_RESPONSE us-east-1 StartSession "" PARAMS ENDPOINT`, the
//! StartSession response in that environment variable, dummy credentials, a throwaway
//! HOME, `AWS_EC2_METADATA_DISABLED=true`), against a simulator running in this process.
//! Every session is `AWS-StartPortForwardingSession` in mux mode to a target server inside
//! this process that sinks and counts (`U`), streams N bytes (`D`) or echoes (`E`),
//! chosen by the first byte a local client sends through the plugin's printed port.
//!
//! Every figure is measured `--runs` times (each on a fresh plugin process) and reported
//! as the median with min and max. With `--vs PATH` a second binary (B) runs alternately
//! with the first (A) inside the same loop, and each figure is printed for both with the
//! ratio A/B. The table goes to stdout (to stderr with `--json`, which prints a JSON
//! document on stdout instead); progress lines go to stderr.
//!
//! No sleeps pace anything here: transfers finish when the counted bytes arrive or when a
//! deadline (`--max-secs`) passes, whichever comes first; child processes are killed when
//! this process exits (PR_SET_PDEATHSIG) or is interrupted.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use ssm_sim::{cli_response_json, SimConfig, Simulator, StartSessionRequest, DEFAULT_TARGET};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

const MIB: f64 = 1024.0 * 1024.0;
/// The realistic profile: one-way latency and the gateway's packet cap.
const REAL_LATENCY: Duration = Duration::from_millis(20);
const REAL_PPS_CAP: u32 = 1000;
/// How long a plugin may take to print 'Waiting for connections...'.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// Bulk bytes that must have reached the sink before echoes under load are timed.
const LOAD_WARMUP_BYTES: u64 = 512 * 1024;

const USAGE: &str = "usage: bench [--plugin PATH] [--vs PATH] [--runs N] [--size-mib N]
             [--paced-size-mib N] [--max-secs S] [--echo-trips N] [--load-secs S]
             [--agent-delay-ms N] [--quick]
             [--only LIST] [--env-a K=V]... [--env-b K=V]... [--tls] [--json]

  --plugin PATH       plugin under test, A (default: target/release/session-manager-plugin)
  --vs PATH           second plugin, B, run alternately with A (e.g. the official build)
  --runs N            repetitions of every figure (default 3; --quick: 1)
  --size-mib N        bytes per unconstrained transfer (default 64; --quick: 8)
  --paced-size-mib N  bytes per paced / realistic-profile transfer (default 8; --quick: 1)
  --pool-size-mib N   bytes per transfer of the pool scenario (default 8; --quick: 1)
  --max-secs S        cap on any one transfer or echo series (default 60; --quick: 3)
  --echo-trips N      1-byte echo round trips on loopback (default 2000; --quick: 500)
  --load-secs S       how long echoes under a bulk upload are timed (default 15; --quick: 2)
  --agent-delay-ms N  realistic profile: agent pause per 1 KiB chunk read (default 1)
  --only LIST         comma-separated scenarios: unc,paced,long,real,echo,echo-unpaced,
                      echo-typing,echo-real,load,load-real,version (default: all);
                      echo-typing = 100 one-byte trips, one every 50 ms, default pacing; long = --size-mib
                      each way at default pacing from the unpaused agent, whose window
                      (100 000 messages) binds, both plugins; pool = A's `forward
                      --sessions N` (N = 1, 2, 4, 8) in the realistic profile, 8
                      parallel transfers of --pool-size-mib each way; socks = A's
                      SOCKS5 proxy: CONNECT set-up time and a 30-object page load
                      against the same through one `forward` session
  --env-a K=V         extra environment for A (e.g. SSM_PLUGIN_WINDOW_PACKETS=1024);
  --env-b K=V         for B; applied after the scenario's own settings
  --tls               serve HTTPS/WSS (AWS_CA_BUNDLE and SSL_CERT_FILE point at the CA)
  --json              JSON on stdout; the table goes to stderr
  --quick             a smoke run of every figure, under a minute with --vs";

const SCENARIOS: &[&str] = &[
    "unc",
    "paced",
    "long",
    "pool",
    "socks",
    "real",
    "echo",
    "echo-unpaced",
    "echo-typing",
    "echo-real",
    "load",
    "load-real",
    "version",
];

// ---- options ----------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Opts {
    plugin: PathBuf,
    vs: Option<PathBuf>,
    runs: usize,
    size_mib: f64,
    paced_size_mib: f64,
    pool_size_mib: f64,
    max_secs: f64,
    echo_trips: usize,
    /// Keystrokes of the `echo-typing` scenario.
    typing_trips: usize,
    real_echo_trips: usize,
    load_secs: f64,
    load_trips: usize,
    /// Realistic profile: the simulated agent's pause after each chunk it reads.
    agent_delay_ms: u64,
    version_runs: usize,
    quick: bool,
    json: bool,
    tls: bool,
    only: Vec<String>,
    env_a: Vec<(String, String)>,
    env_b: Vec<(String, String)>,
}

fn default_plugin() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let p = root.join("target/release/session-manager-plugin");
    p.canonicalize().unwrap_or(p)
}

fn parse_args(args: &[String]) -> Result<Opts, String> {
    let quick = args.iter().any(|a| a == "--quick");
    let mut o = Opts {
        plugin: default_plugin(),
        vs: None,
        runs: if quick { 1 } else { 3 },
        size_mib: if quick { 8.0 } else { 64.0 },
        paced_size_mib: if quick { 1.0 } else { 8.0 },
        pool_size_mib: if quick { 1.0 } else { 8.0 },
        max_secs: if quick { 3.0 } else { 60.0 },
        echo_trips: if quick { 500 } else { 2000 },
        typing_trips: if quick { 20 } else { 100 },
        real_echo_trips: if quick { 20 } else { 100 },
        load_secs: if quick { 2.0 } else { 15.0 },
        load_trips: if quick { 200 } else { 500 },
        agent_delay_ms: 1,
        version_runs: if quick { 5 } else { 20 },
        quick,
        json: false,
        tls: false,
        only: SCENARIOS.iter().map(|s| (*s).to_owned()).collect(),
        env_a: Vec::new(),
        env_b: Vec::new(),
    };
    let mut it = args.iter();
    let value = |it: &mut std::slice::Iter<String>, flag: &str| -> Result<String, String> {
        it.next()
            .cloned()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
    };
    fn num<T: std::str::FromStr>(v: &str, flag: &str) -> Result<T, String> {
        v.parse()
            .map_err(|_| format!("invalid value {v:?} for {flag}"))
    }
    fn kv(v: &str, flag: &str) -> Result<(String, String), String> {
        v.split_once('=')
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .ok_or_else(|| format!("{flag} expects KEY=VALUE, got {v:?}"))
    }
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--plugin" => o.plugin = PathBuf::from(value(&mut it, flag)?),
            "--vs" => o.vs = Some(PathBuf::from(value(&mut it, flag)?)),
            "--runs" => o.runs = num(&value(&mut it, flag)?, flag)?,
            "--size-mib" => o.size_mib = num(&value(&mut it, flag)?, flag)?,
            "--paced-size-mib" => o.paced_size_mib = num(&value(&mut it, flag)?, flag)?,
            "--pool-size-mib" => o.pool_size_mib = num(&value(&mut it, flag)?, flag)?,
            "--max-secs" => o.max_secs = num(&value(&mut it, flag)?, flag)?,
            "--echo-trips" => o.echo_trips = num(&value(&mut it, flag)?, flag)?,
            "--load-secs" => o.load_secs = num(&value(&mut it, flag)?, flag)?,
            "--agent-delay-ms" => o.agent_delay_ms = num(&value(&mut it, flag)?, flag)?,
            "--only" => {
                let v = value(&mut it, flag)?;
                o.only = v.split(',').map(|s| s.trim().to_owned()).collect();
                if let Some(bad) = o.only.iter().find(|s| !SCENARIOS.contains(&s.as_str())) {
                    return Err(format!(
                        "unknown scenario {bad:?}; known: {}",
                        SCENARIOS.join(",")
                    ));
                }
            }
            "--env-a" => o.env_a.push(kv(&value(&mut it, flag)?, flag)?),
            "--env-b" => o.env_b.push(kv(&value(&mut it, flag)?, flag)?),
            "--tls" => o.tls = true,
            "--json" => o.json = true,
            "--quick" => {}
            "-h" | "--help" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown option {other}\n{USAGE}")),
        }
    }
    if o.runs == 0 || o.size_mib <= 0.0 || o.paced_size_mib <= 0.0 || o.max_secs <= 0.0 {
        return Err("--runs, --size-mib, --paced-size-mib and --max-secs must be > 0".into());
    }
    Ok(o)
}

// ---- child processes --------------------------------------------------------------------

/// A child's pid, and whether it has been reaped (the pid is only signalled before).
struct ProcState {
    pid: i32,
    reaped: Mutex<bool>,
}

impl ProcState {
    fn signal(&self, sig: i32) {
        let reaped = self.reaped.lock().unwrap_or_else(|e| e.into_inner());
        if !*reaped {
            // SAFETY: plain syscall; the child is not reaped (we hold the lock that the
            // reaper takes), so the pid still names it.
            unsafe {
                libc::kill(self.pid, sig);
            }
        }
    }
}

/// Every live child, for the Ctrl-C handler.
static CHILDREN: Mutex<Vec<Weak<ProcState>>> = Mutex::new(Vec::new());

fn kill_all_children() {
    let children = CHILDREN.lock().unwrap_or_else(|e| e.into_inner());
    for c in children.iter().filter_map(Weak::upgrade) {
        c.signal(libc::SIGKILL);
    }
}

/// What `wait4` reported.
#[derive(Clone, Copy, Debug, Default)]
struct ExitInfo {
    status: i32,
    user_s: f64,
    sys_s: f64,
    max_rss_kib: i64,
    /// It had to be sent SIGTERM ("SIGTERM") or SIGKILL ("SIGKILL") to end.
    forced: Option<&'static str>,
}

fn tv_secs(tv: libc::timeval) -> f64 {
    tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6
}

/// A running child: its stdout lines (with arrival times), stderr text, and exit report.
struct Proc {
    state: Arc<ProcState>,
    exit_rx: Option<oneshot::Receiver<ExitInfo>>,
    lines: mpsc::UnboundedReceiver<(Instant, String)>,
    stdout_seen: Vec<String>,
    stderr: Arc<Mutex<String>>,
}

impl Proc {
    fn spawn(mut cmd: Command) -> std::io::Result<(Proc, Instant)> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to SIGKILL the child
        // when this process dies, so no plugin outlives the benchmark.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let started = Instant::now();
        let mut child = cmd.spawn()?;
        let pid = child.id() as i32;
        let state = Arc::new(ProcState {
            pid,
            reaped: Mutex::new(false),
        });
        CHILDREN
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::downgrade(&state));
        let (line_tx, lines) = mpsc::unbounded_channel();
        if let Some(out) = child.stdout.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if line_tx.send((Instant::now(), line)).is_err() {
                        break;
                    }
                }
            });
        }
        let stderr = Arc::new(Mutex::new(String::new()));
        if let Some(mut err) = child.stderr.take() {
            let sink = stderr.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let mut s = sink.lock().unwrap_or_else(|e| e.into_inner());
                    if s.len() < 64 * 1024 {
                        s.push_str(&String::from_utf8_lossy(&buf[..n]));
                    }
                }
            });
        }
        // `child` is dropped without waiting: the reaper thread below owns reaping.
        drop(child);
        let (exit_tx, exit_rx) = oneshot::channel();
        let reaper_state = state.clone();
        std::thread::spawn(move || {
            // Wait for the exit without reaping, so the pid cannot be reused while a
            // signal might still be sent to it; then reap under the lock.
            loop {
                // SAFETY: zeroed siginfo_t is a valid out-parameter.
                let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
                // SAFETY: plain syscall on our own child.
                let r = unsafe {
                    libc::waitid(
                        libc::P_PID,
                        pid as libc::id_t,
                        &mut info,
                        libc::WEXITED | libc::WNOWAIT,
                    )
                };
                if r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                    break;
                }
            }
            let mut reaped = reaper_state
                .reaped
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let mut status = 0;
            // SAFETY: zeroed rusage is a valid out-parameter.
            let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: plain syscall on our own child.
            unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
            *reaped = true;
            drop(reaped);
            let _ = exit_tx.send(ExitInfo {
                status,
                user_s: tv_secs(ru.ru_utime),
                sys_s: tv_secs(ru.ru_stime),
                max_rss_kib: ru.ru_maxrss,
                forced: None,
            });
        });
        Ok((
            Proc {
                state,
                exit_rx: Some(exit_rx),
                lines,
                stdout_seen: Vec::new(),
                stderr,
            },
            started,
        ))
    }

    fn pid(&self) -> i32 {
        self.state.pid
    }

    /// Waits for a stdout line containing `needle`; returns its arrival time.
    async fn wait_line(&mut self, needle: &str, timeout: Duration) -> Result<Instant, String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some((at, line))) => {
                    let hit = line.contains(needle);
                    self.stdout_seen.push(line);
                    if hit {
                        return Ok(at);
                    }
                }
                Ok(None) => return Err(format!("exited before printing {needle:?}")),
                Err(_) => return Err(format!("no {needle:?} within {timeout:?}")),
            }
        }
    }

    fn output_tail(&mut self) -> String {
        while let Ok((_, l)) = self.lines.try_recv() {
            self.stdout_seen.push(l);
        }
        let out = self.stdout_seen.join("\n");
        let err = self.stderr.lock().map(|s| s.clone()).unwrap_or_default();
        let tail = |s: &str| {
            let s = s.trim();
            let start = s.len().saturating_sub(1500);
            let start = (start..=s.len())
                .find(|i| s.is_char_boundary(*i))
                .unwrap_or(s.len());
            s[start..].to_owned()
        };
        format!("stdout: {}\nstderr: {}", tail(&out), tail(&err))
    }

    /// Waits for the exit; SIGTERM after `grace`, SIGKILL `grace` later.
    async fn wait_exit(&mut self, grace: Duration) -> ExitInfo {
        let Some(mut rx) = self.exit_rx.take() else {
            return ExitInfo::default();
        };
        if let Ok(r) = tokio::time::timeout(grace, &mut rx).await {
            return r.unwrap_or_default();
        }
        self.state.signal(libc::SIGTERM);
        if let Ok(r) = tokio::time::timeout(grace, &mut rx).await {
            return ExitInfo {
                forced: Some("SIGTERM"),
                ..r.unwrap_or_default()
            };
        }
        self.state.signal(libc::SIGKILL);
        ExitInfo {
            forced: Some("SIGKILL"),
            ..rx.await.unwrap_or_default()
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.state.signal(libc::SIGKILL);
    }
}

/// Peak resident set size (VmHWM) of a live process, in MiB. `ru_maxrss` from `wait4` is
/// not used: after fork + exec it also covers the forked copy of this process.
fn proc_hwm_mib(pid: i32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// CPU seconds (user + system, all threads) a live process has used so far.
fn proc_cpu_secs(pid: i32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command name: field 3 (state) is f[0]; utime (14) f[11], stime (15) f[12].
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: plain sysconf query.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some(ticks / if hz > 0 { hz as f64 } else { 100.0 })
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn load1() -> f64 {
    loadavg()
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.0)
}

// ---- target server ------------------------------------------------------------------------

/// The "instance" port the agent dials. First byte: `U` sink and count, `D` + u64 BE:
/// stream that many bytes then close, `E`: echo.
struct Target {
    port: u16,
    sunk: watch::Receiver<u64>,
    task: JoinHandle<()>,
}

impl Drop for Target {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Target {
    async fn start() -> std::io::Result<Target> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let port = listener.local_addr()?.port();
        let (sunk_tx, sunk) = watch::channel(0u64);
        let sunk_tx = Arc::new(sunk_tx);
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((s, _)) = listener.accept().await {
                let _ = s.set_nodelay(true);
                conns.spawn(serve_target(s, sunk_tx.clone()));
                while conns.try_join_next().is_some() {}
            }
        });
        Ok(Target { port, sunk, task })
    }

    fn sunk(&self) -> u64 {
        *self.sunk.borrow()
    }
}

async fn serve_target(mut s: TcpStream, sunk: Arc<watch::Sender<u64>>) {
    let mut mode = [0u8; 1];
    if s.read_exact(&mut mode).await.is_err() {
        return;
    }
    match mode[0] {
        b'U' => {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                sunk.send_modify(|c| *c += n as u64);
            }
        }
        b'D' => {
            let mut n = [0u8; 8];
            if s.read_exact(&mut n).await.is_err() {
                return;
            }
            let mut left = u64::from_be_bytes(n);
            let buf = vec![0xa5u8; 64 * 1024];
            while left > 0 {
                let k = left.min(buf.len() as u64) as usize;
                if s.write_all(&buf[..k]).await.is_err() {
                    return;
                }
                left -= k as u64;
            }
            let _ = s.shutdown().await;
        }
        b'E' => {
            let mut buf = [0u8; 4096];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
        _ => {}
    }
}

// ---- local clients --------------------------------------------------------------------------

async fn connect_local(port: u16) -> Result<TcpStream, String> {
    let s = match TcpStream::connect(("127.0.0.1", port)).await {
        Ok(s) => s,
        Err(e4) => TcpStream::connect(("::1", port))
            .await
            .map_err(|e6| format!("connect to the plugin's port {port}: {e4}; [::1]: {e6}"))?,
    };
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// Bytes moved and the time it took.
#[derive(Clone, Copy, Debug)]
struct Moved {
    bytes: u64,
    secs: f64,
    /// The deadline cut the transfer short.
    capped: bool,
}

impl Moved {
    fn mibs(&self) -> f64 {
        if self.secs > 0.0 {
            self.bytes as f64 / MIB / self.secs
        } else {
            0.0
        }
    }
}

/// Writes to a `U` connection until `limit` bytes are written or the task is aborted.
async fn bulk_writer(port: u16, limit: u64) -> Result<JoinHandle<()>, String> {
    let mut s = connect_local(port).await?;
    s.write_all(b"U").await.map_err(|e| format!("write: {e}"))?;
    Ok(tokio::spawn(async move {
        let buf = vec![0x5au8; 64 * 1024];
        let mut left = limit;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            if s.write_all(&buf[..n]).await.is_err() {
                return;
            }
            left -= n as u64;
        }
        // Keep the connection open until aborted, so the end of the stream is not part
        // of the measurement.
        std::future::pending::<()>().await;
    }))
}

async fn upload(port: u16, target: &Target, size: u64, deadline: Instant) -> Result<Moved, String> {
    let base = target.sunk();
    let start = Instant::now();
    let writer = bulk_writer(port, size).await?;
    let mut rx = target.sunk.clone();
    // The `Ref` wait_for returns holds the watch's lock: drop it at once (the sink
    // task's `send_modify` would block on it).
    let done = tokio::time::timeout_at(deadline.into(), rx.wait_for(|c| *c - base >= size))
        .await
        .is_ok_and(|r| r.is_ok());
    let secs = start.elapsed().as_secs_f64();
    let bytes = target.sunk() - base;
    writer.abort();
    Ok(Moved {
        bytes,
        secs,
        capped: !done,
    })
}

async fn download(port: u16, size: u64, deadline: Instant) -> Result<Moved, String> {
    let mut s = connect_local(port).await?;
    let mut req = vec![b'D'];
    req.extend_from_slice(&size.to_be_bytes());
    let start = Instant::now();
    s.write_all(&req).await.map_err(|e| format!("write: {e}"))?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    let mut last = start;
    let mut capped = false;
    while got < size {
        match tokio::time::timeout_at(deadline.into(), s.read(&mut buf)).await {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => {
                got += n as u64;
                last = Instant::now();
            }
            Ok(Err(e)) => return Err(format!("download read: {e}")),
            Err(_) => {
                capped = true;
                last = Instant::now();
                break;
            }
        }
    }
    if got < size && !capped {
        return Err(format!("download ended after {got} of {size} bytes"));
    }
    Ok(Moved {
        bytes: got,
        secs: last.duration_since(start).as_secs_f64(),
        capped,
    })
}

/// A SOCKS5 CONNECT (no authentication) to 127.0.0.1:`port` through the proxy on
/// `proxy`; returns the stream once the proxy replied success.
async fn socks_connect(proxy: u16, port: u16) -> Result<TcpStream, String> {
    let mut s = connect_local(proxy).await?;
    let mut req = vec![5u8, 1, 0, 5, 1, 0, 1, 127, 0, 0, 1];
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req)
        .await
        .map_err(|e| format!("socks write: {e}"))?;
    let mut rep = [0u8; 12];
    s.read_exact(&mut rep)
        .await
        .map_err(|e| format!("socks reply: {e}"))?;
    if rep[..2] != [5, 0] || rep[3] != 0 {
        return Err(format!("socks refused: {rep:?}"));
    }
    Ok(s)
}

/// Reads one object of `size` bytes from a `D` request on `s`.
async fn fetch_object(mut s: TcpStream, size: u64) -> Result<(), String> {
    let mut req = vec![b'D'];
    req.extend_from_slice(&size.to_be_bytes());
    s.write_all(&req).await.map_err(|e| format!("write: {e}"))?;
    let mut buf = vec![0u8; size as usize];
    s.read_exact(&mut buf)
        .await
        .map_err(|e| format!("object read: {e}"))?;
    Ok(())
}

async fn direct_object(port: u16, size: u64) -> Result<(), String> {
    fetch_object(connect_local(port).await?, size).await
}

async fn socks_object(proxy: u16, port: u16, size: u64) -> Result<(), String> {
    fetch_object(socks_connect(proxy, port).await?, size).await
}

/// `objects` fetches, `at_once` at a time; the wall time in milliseconds.
async fn page_load<F, Fut>(
    objects: usize,
    _size: u64,
    at_once: usize,
    fetch: F,
) -> Result<f64, String>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    use futures_util::stream::{self, StreamExt};
    let t = Instant::now();
    let results: Vec<Result<(), String>> = stream::iter((0..objects).map(|_| fetch()))
        .buffer_unordered(at_once)
        .collect()
        .await;
    for r in results {
        r?;
    }
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

/// 1-byte echo round trips (after 3 untimed warm-up trips), in milliseconds.
async fn echo(port: u16, trips: usize, deadline: Instant) -> Result<Vec<f64>, String> {
    echo_with_gap(port, trips, deadline, Duration::ZERO).await
}

/// [`echo`] with `gap` of idle time before each trip (not counted in its RTT).
async fn echo_with_gap(
    port: u16,
    trips: usize,
    deadline: Instant,
    gap: Duration,
) -> Result<Vec<f64>, String> {
    let mut s = connect_local(port).await?;
    s.write_all(b"E").await.map_err(|e| format!("write: {e}"))?;
    let mut rtts = Vec::with_capacity(trips);
    let mut b = [0u8; 1];
    for i in 0..trips + 3 {
        if !gap.is_zero() {
            tokio::time::sleep(gap).await;
        }
        let t = Instant::now();
        let trip = async {
            s.write_all(b"x").await?;
            s.read_exact(&mut b).await
        };
        match tokio::time::timeout_at(deadline.into(), trip).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(format!("echo: {e}")),
            Err(_) if rtts.len() >= 3 => break,
            Err(_) => {
                return Err(format!(
                    "echo: only {} trips before the deadline",
                    rtts.len()
                ))
            }
        }
        if i >= 3 {
            rtts.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(rtts)
}

/// The simulator's configured round trip (both directions' latency) in ms, for the
/// realistic profile; 0 on loopback.
fn sim_rtt_ms(profile: &SimConfig, realistic: bool) -> f64 {
    if realistic {
        2.0 * profile.latency.as_secs_f64() * 1e3
    } else {
        0.0
    }
}

/// p50 and p99 of sorted round trips, less `minus` ms.
fn p50_p99(sorted: &[f64], minus: f64) -> (f64, f64) {
    (
        percentile(sorted, 50.0) - minus,
        percentile(sorted, 99.0) - minus,
    )
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

// ---- plugin sessions --------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct PluginSpec {
    label: &'static str,
    path: PathBuf,
    version: String,
    /// The official plugin (version 1.2.x): no SSM_PLUGIN_* knobs.
    official: bool,
    extra_env: Vec<(String, String)>,
}

struct Env {
    home: PathBuf,
    ca: Option<PathBuf>,
}

fn base_command(path: &Path, env: &Env) -> Command {
    let mut cmd = Command::new(path);
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", &env.home)
        .env("LANG", "C.UTF-8")
        .env("AWS_ACCESS_KEY_ID", "AKIDBENCHMARK")
        .env("AWS_SECRET_ACCESS_KEY", "benchmark-secret")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true");
    if let Some(ca) = &env.ca {
        cmd.env("AWS_CA_BUNDLE", ca).env("SSL_CERT_FILE", ca);
    }
    cmd
}

/// One plugin process serving one port-forwarding session.
struct Session {
    proc: Proc,
    port: u16,
    id: String,
    startup_ms: f64,
}

async fn start_session(
    sim: &Simulator,
    env: &Env,
    profile: &SimConfig,
    target_port: u16,
    plugin: &PluginSpec,
    scenario_env: &[(&str, &str)],
) -> Result<Session, String> {
    let req = StartSessionRequest::port_forwarding(target_port, 0);
    let resp = sim
        .start_session_with(req, profile.clone())
        .map_err(|e| format!("StartSession: {e}"))?;
    let params = json!({
        "Target": DEFAULT_TARGET,
        "DocumentName": "AWS-StartPortForwardingSession",
        "Parameters": {
            "portNumber": [target_port.to_string()],
            "localPortNumber": ["0"],
        },
    });
    let mut cmd = base_command(&plugin.path, env);
    cmd.arg("AWS_SSM_START_SESSION_RESPONSE")
        .arg("us-east-1")
        .arg("StartSession")
        .arg("")
        .arg(params.to_string())
        .arg(sim.endpoint_url())
        .env("AWS_SSM_START_SESSION_RESPONSE", cli_response_json(&resp));
    for (k, v) in scenario_env {
        cmd.env(k, v);
    }
    for (k, v) in &plugin.extra_env {
        cmd.env(k, v);
    }
    let (mut proc, started) =
        Proc::spawn(cmd).map_err(|e| format!("cannot run {}: {e}", plugin.path.display()))?;
    let ready = match proc
        .wait_line("Waiting for connections", STARTUP_TIMEOUT)
        .await
    {
        Ok(at) => at,
        Err(e) => return Err(format!("{} {e}\n{}", plugin.label, proc.output_tail())),
    };
    let port = proc
        .stdout_seen
        .iter()
        .find_map(|l| {
            let rest = l.split("Port ").nth(1)?;
            rest.split_whitespace().next()?.parse::<u16>().ok()
        })
        .ok_or_else(|| format!("no 'Port N opened' line\n{}", proc.output_tail()))?;
    Ok(Session {
        proc,
        port,
        id: resp.session_id,
        startup_ms: ready.duration_since(started).as_secs_f64() * 1e3,
    })
}

impl Session {
    fn cpu(&self) -> f64 {
        proc_cpu_secs(self.proc.pid()).unwrap_or(f64::NAN)
    }

    /// Ends the session through the API (the agent sends channel_closed) and reaps;
    /// signals the plugin if it is still running `grace` later.
    async fn finish(mut self, sim: &Simulator, grace: Duration) -> ExitInfo {
        let _ = sim.terminate_session(&self.id);
        self.proc.wait_exit(grace).await
    }
}

// ---- results ----------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Better {
    Higher,
    Lower,
    /// Must be zero.
    Zero,
    /// Context only.
    Info,
}

struct FigureDef {
    key: &'static str,
    label: &'static str,
    unit: &'static str,
    better: Better,
}

const fn fig(
    key: &'static str,
    label: &'static str,
    unit: &'static str,
    better: Better,
) -> FigureDef {
    FigureDef {
        key,
        label,
        unit,
        better,
    }
}

const FIGURES: &[FigureDef] = &[
    fig(
        "unc_up",
        "upload, loopback, no pacing",
        "MiB/s",
        Better::Higher,
    ),
    fig(
        "unc_down",
        "download, loopback, no pacing",
        "MiB/s",
        Better::Higher,
    ),
    fig(
        "paced_up",
        "upload, loopback, default pacing",
        "MiB/s",
        Better::Higher,
    ),
    fig(
        "paced_down",
        "download, loopback, default pacing",
        "MiB/s",
        Better::Higher,
    ),
    fig(
        "long_up",
        "upload, loopback, default pacing, --size-mib",
        "MiB/s",
        Better::Higher,
    ),
    fig(
        "long_down",
        "download, loopback, default pacing, --size-mib",
        "MiB/s",
        Better::Higher,
    ),
    fig(
        "pool1_down",
        "pool of 1, realistic, 8 parallel downloads, aggregate",
        "MiB/s",
        Better::Higher,
    ),
    fig(
        "pool1_up",
        "pool of 1, realistic, 8 parallel uploads, aggregate",
        "MiB/s",
        Better::Higher,
    ),
    fig(
        "pool2_down",
        "pool of 2, realistic, 8 parallel downloads, aggregate",
        "MiB/s",
        Better::Higher,
    ),
    fig(
        "pool2_up",
        "pool of 2, realistic, 8 parallel uploads, aggregate",
        "MiB/s",
        Better::Higher,
    ),
    fig(
        "pool4_down",
        "pool of 4, realistic, 8 parallel downloads, aggregate",
        "MiB/s",
        Better::Higher,
    ),
    fig(
        "pool4_up",
        "pool of 4, realistic, 8 parallel uploads, aggregate",
        "MiB/s",
        Better::Higher,
    ),
    fig(
        "pool8_down",
        "pool of 8, realistic, 8 parallel downloads, aggregate",
        "MiB/s",
        Better::Higher,
    ),
    fig(
        "pool8_up",
        "pool of 8, realistic, 8 parallel uploads, aggregate",
        "MiB/s",
        Better::Higher,
    ),
    fig(
        "pool_viol",
        "  pool: cap violations, all sessions",
        "count",
        Better::Zero,
    ),
    fig(
        "socks_first_ms",
        "SOCKS5 CONNECT, first to a destination (session start)",
        "ms",
        Better::Lower,
    ),
    fig(
        "socks_next_ms",
        "SOCKS5 CONNECT, later ones, p50 of 20",
        "ms",
        Better::Lower,
    ),
    fig(
        "page_fwd_ms",
        "30-object page (32 KiB each, 6 at a time), forward, realistic",
        "ms",
        Better::Lower,
    ),
    fig(
        "page_socks_ms",
        "  same through the SOCKS5 proxy (1 session)",
        "ms",
        Better::Lower,
    ),
    fig(
        "page_socks4_ms",
        "  same through the SOCKS5 proxy, --sessions 4",
        "ms",
        Better::Lower,
    ),
    fig(
        "real_up",
        "upload, realistic profile",
        "MiB/s",
        Better::Higher,
    ),
    fig(
        "real_down",
        "download, realistic profile",
        "MiB/s",
        Better::Higher,
    ),
    fig(
        "real_up_viol",
        "  cap violations (upload)",
        "count",
        Better::Zero,
    ),
    fig(
        "real_down_viol",
        "  cap violations (download)",
        "count",
        Better::Zero,
    ),
    fig(
        "real_up_fps",
        "  peak client frames/s (upload)",
        "fr/s",
        Better::Info,
    ),
    fig(
        "real_down_fps",
        "  peak client frames/s (download)",
        "fr/s",
        Better::Info,
    ),
    fig("echo_p50", "echo RTT, loopback, p50", "ms", Better::Lower),
    fig("echo_p99", "echo RTT, loopback, p99", "ms", Better::Lower),
    fig(
        "echo_typing_p50",
        "echo RTT, loopback, typing pace (1 byte / 50 ms), p50",
        "ms",
        Better::Lower,
    ),
    fig(
        "echo_typing_p99",
        "echo RTT, loopback, typing pace (1 byte / 50 ms), p99",
        "ms",
        Better::Lower,
    ),
    fig(
        "echo_np_p50",
        "echo RTT, loopback, A unpaced, p50",
        "ms",
        Better::Lower,
    ),
    fig(
        "echo_np_p99",
        "echo RTT, loopback, A unpaced, p99",
        "ms",
        Better::Lower,
    ),
    fig(
        "echo_real_p50",
        "echo RTT - 40 ms, realistic, p50",
        "ms",
        Better::Lower,
    ),
    fig(
        "echo_real_p99",
        "echo RTT - 40 ms, realistic, p99",
        "ms",
        Better::Lower,
    ),
    fig(
        "echo_real_sim",
        "  of which the sim's delay threads",
        "ms",
        Better::Info,
    ),
    fig(
        "load_p50",
        "echo under upload, loopback, p50",
        "ms",
        Better::Lower,
    ),
    fig(
        "load_p99",
        "echo under upload, loopback, p99",
        "ms",
        Better::Lower,
    ),
    fig(
        "load_bulk",
        "  upload rate meanwhile",
        "MiB/s",
        Better::Info,
    ),
    fig(
        "load_real_p50",
        "echo under upload - 40 ms, realistic, p50",
        "ms",
        Better::Lower,
    ),
    fig(
        "load_real_p99",
        "echo under upload - 40 ms, realistic, p99",
        "ms",
        Better::Lower,
    ),
    fig(
        "load_real_bulk",
        "  upload rate meanwhile",
        "MiB/s",
        Better::Info,
    ),
    fig(
        "cpu_unc_up",
        "CPU per MiB, upload, no pacing",
        "s/MiB",
        Better::Lower,
    ),
    fig(
        "cpu_unc_down",
        "CPU per MiB, download, no pacing",
        "s/MiB",
        Better::Lower,
    ),
    fig(
        "cpu_real_up",
        "CPU per MiB, upload, realistic",
        "s/MiB",
        Better::Lower,
    ),
    fig(
        "cpu_real_down",
        "CPU per MiB, download, realistic",
        "s/MiB",
        Better::Lower,
    ),
    fig(
        "rss_up",
        "peak RSS, upload, no pacing",
        "MiB",
        Better::Lower,
    ),
    fig(
        "rss_down",
        "peak RSS, download, no pacing",
        "MiB",
        Better::Lower,
    ),
    fig(
        "startup",
        "start -> 'Waiting for connections...'",
        "ms",
        Better::Lower,
    ),
    fig("version", "--version wall time", "ms", Better::Lower),
];

#[derive(Default)]
struct Results {
    /// key -> samples for [A, B].
    samples: BTreeMap<&'static str, [Vec<f64>; 2]>,
    /// Per-measurement records for the JSON.
    records: Vec<Value>,
    errors: Vec<String>,
    notes: Vec<String>,
    /// Plugins that had to be signalled to end.
    forced: Vec<String>,
    max_load: f64,
}

impl Results {
    fn add(&mut self, key: &'static str, who: usize, v: f64) {
        if v.is_finite() {
            self.samples.entry(key).or_default()[who].push(v);
        }
    }

    fn get(&self, key: &str, who: usize) -> Option<&[f64]> {
        self.samples
            .get(key)
            .map(|s| s[who].as_slice())
            .filter(|s| !s.is_empty())
    }
}

#[derive(Clone, Copy, Debug)]
struct Stat {
    median: f64,
    min: f64,
    max: f64,
    n: usize,
}

fn stat(v: &[f64]) -> Option<Stat> {
    if v.is_empty() {
        return None;
    }
    let s = sorted(v.to_vec());
    let n = s.len();
    let median = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    Some(Stat {
        median,
        min: s[0],
        max: s[n - 1],
        n,
    })
}

// ---- the benchmark ---------------------------------------------------------------------------

struct Bench {
    started: Instant,
    /// "scenario run N plugin X", for notes.
    current: String,
    opts: Opts,
    sim: Simulator,
    env: Env,
    plugins: Vec<PluginSpec>,
    res: Results,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    Up,
    Down,
}

/// One kind of measurement. The official plugin has no pacing knob, so it skips the
/// "paced" transfers (its unpaced figures stand in for them).
#[derive(Clone, Copy)]
enum Job {
    Transfer(&'static str, Dir),
    /// A's `forward --sessions N`, 8 parallel transfers.
    Pool(usize, Dir),
    /// A's SOCKS5 proxy against `forward`.
    Socks,
    Echo(EchoKind),
    Load(bool),
}

/// Which echo series: loopback at default settings, loopback with A's pacer off (the
/// plugin's own latency, not its frame budget), or the realistic profile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EchoKind {
    Loopback,
    Unpaced,
    Realistic,
    /// One byte every [`TYPING_GAP`] at default pacing: what a person typing feels.
    Typing,
}

/// The pause between keystrokes of the `echo-typing` scenario (a fast typist).
const TYPING_GAP: Duration = Duration::from_millis(50);

fn unconstrained() -> SimConfig {
    SimConfig {
        close_drain_timeout: Duration::from_secs(1),
        ..SimConfig::default()
    }
}

fn realistic(agent_delay_ms: u64) -> SimConfig {
    SimConfig {
        latency: REAL_LATENCY,
        pps_cap: Some(REAL_PPS_CAP),
        // The real agent sleeps 1 ms after every chunk it reads from the target.
        agent_chunk_delay: Duration::from_millis(agent_delay_ms),
        close_drain_timeout: Duration::from_secs(1),
        ..SimConfig::default()
    }
}

const NO_PACING: &[(&str, &str)] = &[("SSM_PLUGIN_PACKETS_PER_SECOND", "0")];

impl Bench {
    fn progress(&self, line: &str) {
        eprintln!(
            "[bench {:6.1}s load {}] {line}",
            self.started.elapsed().as_secs_f64(),
            loadavg()
        );
    }

    fn note_load(&mut self) {
        self.res.max_load = self.res.max_load.max(load1());
    }

    fn wants(&self, scenario: &str) -> bool {
        self.opts.only.iter().any(|s| s == scenario)
    }

    /// Ends a session and notes a plugin that did not exit by itself.
    async fn finish(&mut self, sess: Session) -> ExitInfo {
        let grace = Duration::from_secs(if self.opts.quick { 2 } else { 10 });
        let exit = sess.finish(&self.sim, grace).await;
        if let Some(sig) = exit.forced {
            self.res.forced.push(format!(
                "{}: did not exit within {grace:?} of TerminateSession (channel_closed); needed {sig}",
                self.current
            ));
        }
        exit
    }

    fn deadline(&self) -> Instant {
        Instant::now() + Duration::from_secs_f64(self.opts.max_secs)
    }

    /// Runs `job` for every run and plugin, alternating A and B.
    async fn each_run(&mut self, scenario: &str, job: Job) {
        let skip_official = matches!(job, Job::Transfer("paced", _) | Job::Pool(..) | Job::Socks);
        for run in 0..self.opts.runs {
            for who in 0..self.plugins.len() {
                if skip_official && self.plugins[who].official {
                    continue;
                }
                self.note_load();
                self.current = format!(
                    "{scenario} run {} plugin {}",
                    run + 1,
                    self.plugins[who].label
                );
                let r = match job {
                    Job::Transfer(s, dir) => self.transfer(who, run, s, dir).await,
                    Job::Echo(kind) => self.echo_run(who, run, kind).await,
                    Job::Load(real) => self.load_run(who, run, real).await,
                    Job::Pool(n, dir) => self.pool_run(who, run, n, dir).await,
                    Job::Socks => self.socks_run(who, run).await,
                };
                if let Err(e) = r {
                    let msg = format!(
                        "{scenario} run {} plugin {}: {e}",
                        run + 1,
                        self.plugins[who].label
                    );
                    self.progress(&format!("ERROR {msg}"));
                    self.res.errors.push(msg);
                }
            }
        }
    }

    async fn transfer(
        &mut self,
        who: usize,
        run: usize,
        scenario: &'static str,
        dir: Dir,
    ) -> Result<(), String> {
        let (profile, env, size_mib) = match scenario {
            "unc" => (unconstrained(), NO_PACING, self.opts.size_mib),
            "paced" => (unconstrained(), &[][..], self.opts.paced_size_mib),
            "long" => (unconstrained(), &[][..], self.opts.size_mib),
            _ => (
                realistic(self.opts.agent_delay_ms),
                &[][..],
                self.opts.paced_size_mib,
            ),
        };
        let size = (size_mib * MIB) as u64;
        let plugin = self.plugins[who].clone();
        let target = Target::start().await.map_err(|e| format!("target: {e}"))?;
        let sess = start_session(&self.sim, &self.env, &profile, target.port, &plugin, env).await?;
        let startup_ms = sess.startup_ms;
        if scenario != "real" {
            self.res.add("startup", who, sess.startup_ms);
        }
        let cpu0 = sess.cpu();
        let self0 = proc_cpu_secs(std::process::id() as i32).unwrap_or(f64::NAN);
        let deadline = self.deadline();
        let moved = match dir {
            Dir::Up => upload(sess.port, &target, size, deadline).await,
            Dir::Down => download(sess.port, size, deadline).await,
        };
        let cpu1 = sess.cpu();
        let self1 = proc_cpu_secs(std::process::id() as i32).unwrap_or(f64::NAN);
        let rss = proc_hwm_mib(sess.proc.pid()).unwrap_or(f64::NAN);
        let st = self.sim.stats(&sess.id).unwrap_or_default();
        let exit = self.finish(sess).await;
        let moved = moved?;
        let cpu_per_mib = (cpu1 - cpu0) / (moved.bytes as f64 / MIB);
        // This process (simulator, target, clients): shows when the machine, not the
        // plugin, is the limit (plugin + bench CPU close to 2 cores x wall time).
        let bench_cpu_per_mib = (self1 - self0) / (moved.bytes as f64 / MIB);
        let d = if dir == Dir::Up { "up" } else { "down" };
        let key = |s: &str| -> &'static str {
            FIGURES
                .iter()
                .find(|f| f.key == format!("{scenario}_{d}{s}"))
                .map(|f| f.key)
                .unwrap_or("")
        };
        self.res.add(key(""), who, moved.mibs());
        match scenario {
            "unc" => {
                self.res.add(
                    if dir == Dir::Up {
                        "cpu_unc_up"
                    } else {
                        "cpu_unc_down"
                    },
                    who,
                    cpu_per_mib,
                );
                self.res
                    .add(if dir == Dir::Up { "rss_up" } else { "rss_down" }, who, rss);
            }
            "real" => {
                self.res.add(
                    if dir == Dir::Up {
                        "cpu_real_up"
                    } else {
                        "cpu_real_down"
                    },
                    who,
                    cpu_per_mib,
                );
                self.res
                    .add(key("_viol"), who, f64::from(st.pps_cap_violations));
                self.res
                    .add(key("_fps"), who, f64::from(st.max_client_frames_per_sec));
            }
            _ => {}
        }
        if moved.capped {
            let n = format!(
                "{scenario} {d} ({}): capped at --max-secs {} after {:.1} MiB",
                plugin.label,
                self.opts.max_secs,
                moved.bytes as f64 / MIB
            );
            if !self.res.notes.contains(&n) {
                self.res.notes.push(n);
            }
        }
        self.progress(&format!(
            "{scenario} {d} run {} {}: {:.2} MiB/s ({:.1} MiB in {:.2} s{}), cpu {:.4} s/MiB \
             (bench process {bench_cpu_per_mib:.4}), \
             rss {rss:.1} MiB, startup {:.0} ms | sim: client frames {}, acks from agent {}, \
             agent frames {}, resent by client {}, agent retransmits {}, not-ready {}, \
             peak fps {}, violations {}, websockets {}",
            run + 1,
            plugin.label,
            moved.mibs(),
            moved.bytes as f64 / MIB,
            moved.secs,
            if moved.capped { ", capped" } else { "" },
            cpu_per_mib,
            startup_ms,
            st.client_frames,
            st.acks_sent,
            st.agent_frames,
            st.duplicates_received,
            st.retransmissions,
            st.handler_not_ready,
            st.max_client_frames_per_sec,
            st.pps_cap_violations,
            st.ws_connections,
        ));
        self.res.records.push(json!({
            "scenario": scenario, "direction": d, "run": run + 1, "plugin": plugin.label,
            "bytes": moved.bytes, "secs": moved.secs, "mib_per_s": moved.mibs(),
            "capped": moved.capped, "cpu_s": cpu1 - cpu0, "cpu_s_per_mib": cpu_per_mib,
            "bench_process_cpu_s": self1 - self0,
            "exit_status": exit.status, "forced_exit": exit.forced, "user_s": exit.user_s, "sys_s": exit.sys_s,
            "peak_rss_mib": rss, "ru_maxrss_mib": exit.max_rss_kib as f64 / 1024.0,
            "sim": {
                "client_frames": st.client_frames, "agent_frames": st.agent_frames,
                "acks_from_agent": st.acks_sent, "acks_from_client": st.acks_received,
                "client_resends": st.duplicates_received,
                "agent_retransmissions": st.retransmissions,
                "handler_not_ready": st.handler_not_ready,
                "max_client_frames_per_sec": st.max_client_frames_per_sec,
                "pps_cap_violations": st.pps_cap_violations,
                "websockets": st.ws_connections,
            },
        }));
        Ok(())
    }

    /// `forward --sessions n` against a simulator of its own in the realistic profile (the
    /// standalone client calls StartSession itself, so the profile is the simulator's),
    /// 8 parallel transfers of `--pool-size-mib`; the aggregate rate is all bytes over the
    /// time until the last transfer ended.
    async fn pool_run(&mut self, who: usize, run: usize, n: usize, dir: Dir) -> Result<(), String> {
        const PARALLEL: usize = 8;
        let plugin = self.plugins[who].clone();
        let sim = Simulator::start(SimConfig {
            tls: self.opts.tls,
            ..realistic(self.opts.agent_delay_ms)
        })
        .await
        .map_err(|e| format!("simulator: {e}"))?;
        let target = Target::start().await.map_err(|e| format!("target: {e}"))?;
        let env = Env {
            home: self.env.home.clone(),
            ca: sim.ca_pem_path(),
        };
        let lp = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
            l.local_addr().map_err(|e| e.to_string())?.port()
        };
        let mut cmd = base_command(&plugin.path, &env);
        cmd.args(["forward", DEFAULT_TARGET, "-L"])
            .arg(format!("{lp}:{}", target.port))
            .args(["--sessions", &n.to_string()])
            .env("AWS_ENDPOINT_URL_SSM", sim.endpoint_url())
            .env("XDG_CONFIG_HOME", self.env.home.join("no-config"));
        for (k, v) in &plugin.extra_env {
            cmd.env(k, v);
        }
        let (mut proc, _) =
            Proc::spawn(cmd).map_err(|e| format!("cannot run {}: {e}", plugin.path.display()))?;
        proc.wait_line("Waiting for connections", STARTUP_TIMEOUT)
            .await
            .map_err(|e| format!("{e}\n{}", proc.output_tail()))?;
        let size = (self.opts.pool_size_mib * MIB) as u64;
        let deadline = self.deadline();
        let start = Instant::now();
        let moved = match dir {
            Dir::Down => {
                let jobs = (0..PARALLEL).map(|_| download(lp, size, deadline));
                futures_util::future::join_all(jobs).await
            }
            Dir::Up => {
                let base = target.sunk();
                let mut writers = Vec::new();
                for _ in 0..PARALLEL {
                    writers.push(bulk_writer(lp, size).await?);
                }
                let mut rx = target.sunk.clone();
                let total = size * PARALLEL as u64;
                let done =
                    tokio::time::timeout_at(deadline.into(), rx.wait_for(|c| *c - base >= total))
                        .await
                        .is_ok_and(|r| r.is_ok());
                let secs = start.elapsed().as_secs_f64();
                for w in writers {
                    w.abort();
                }
                vec![Ok(Moved {
                    bytes: target.sunk() - base,
                    secs,
                    capped: !done,
                })]
            }
        };
        let secs = start.elapsed().as_secs_f64();
        let mut bytes = 0;
        let mut capped = false;
        for m in moved {
            let m = m?;
            bytes += m.bytes;
            capped |= m.capped;
        }
        let secs = if dir == Dir::Up {
            secs.min(self.opts.max_secs)
        } else {
            secs
        };
        let rate = bytes as f64 / MIB / secs;
        let ids = sim.session_ids();
        let viol: u32 = ids
            .iter()
            .filter_map(|id| sim.stats(id))
            .map(|s| s.pps_cap_violations)
            .sum();
        let peak = ids
            .iter()
            .filter_map(|id| sim.stats(id))
            .map(|s| s.max_client_frames_per_sec)
            .max()
            .unwrap_or(0);
        let per: Vec<String> = ids
            .iter()
            .filter_map(|id| sim.stats(id))
            .map(|s| {
                format!(
                    "{:.1}",
                    (s.output_payload_bytes + s.input_payload_bytes) as f64 / MIB
                )
            })
            .collect();
        proc.state.signal(libc::SIGINT);
        let _ = proc.wait_exit(Duration::from_secs(10)).await;
        let d = if dir == Dir::Up { "up" } else { "down" };
        let key = FIGURES
            .iter()
            .find(|f| f.key == format!("pool{n}_{d}"))
            .map(|f| f.key)
            .unwrap_or("");
        self.res.add(key, who, rate);
        self.res.add("pool_viol", who, f64::from(viol));
        self.progress(&format!(
            "pool {n} {d} run {} {}: {rate:.2} MiB/s aggregate ({:.1} MiB in {secs:.2} s{}), \
             {} sessions, MiB per session {per:?}, peak client fps {peak}, violations {viol}",
            run + 1,
            plugin.label,
            bytes as f64 / MIB,
            if capped { ", capped" } else { "" },
            ids.len(),
        ));
        self.res.records.push(json!({
            "scenario": "pool", "sessions": n, "direction": d, "run": run + 1,
            "plugin": plugin.label, "bytes": bytes, "secs": secs, "mib_per_s": rate,
            "capped": capped, "sim_sessions": ids.len(), "pps_cap_violations": viol,
            "max_client_frames_per_sec": peak,
        }));
        Ok(())
    }

    /// Spawns A's standalone client (`args`) against `sim`; returns it once it printed
    /// `wait_for`.
    async fn spawn_cli(
        &self,
        who: usize,
        sim: &Simulator,
        args: &[String],
        wait_for: &str,
    ) -> Result<Proc, String> {
        let plugin = &self.plugins[who];
        let env = Env {
            home: self.env.home.clone(),
            ca: sim.ca_pem_path(),
        };
        let mut cmd = base_command(&plugin.path, &env);
        cmd.args(args)
            .env("AWS_ENDPOINT_URL_SSM", sim.endpoint_url())
            .env("XDG_CONFIG_HOME", self.env.home.join("no-config"));
        for (k, v) in &plugin.extra_env {
            cmd.env(k, v);
        }
        let (mut proc, _) =
            Proc::spawn(cmd).map_err(|e| format!("cannot run {}: {e}", plugin.path.display()))?;
        proc.wait_line(wait_for, STARTUP_TIMEOUT)
            .await
            .map_err(|e| format!("{e}\n{}", proc.output_tail()))?;
        Ok(proc)
    }

    /// SOCKS5 CONNECT set-up times and a 30-object page load (6 connections at a time, a
    /// fresh connection per object as HTTP/1.1 without keep-alive does) through A's
    /// proxy, against the same through one `forward` session; realistic profile.
    async fn socks_run(&mut self, who: usize, run: usize) -> Result<(), String> {
        const OBJECTS: usize = 30;
        const OBJECT: u64 = 32 * 1024;
        const AT_ONCE: usize = 6;
        let sim = Simulator::start(SimConfig {
            tls: self.opts.tls,
            ..realistic(self.opts.agent_delay_ms)
        })
        .await
        .map_err(|e| format!("simulator: {e}"))?;
        let target = Target::start().await.map_err(|e| format!("target: {e}"))?;
        let free = || -> Result<u16, String> {
            let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
            Ok(l.local_addr().map_err(|e| e.to_string())?.port())
        };
        let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
        // Page through one forward session.
        let fp = free()?;
        let mut fwd = self
            .spawn_cli(
                who,
                &sim,
                &s(&[
                    "forward",
                    DEFAULT_TARGET,
                    "-L",
                    &format!("{fp}:{}", target.port),
                ]),
                "Waiting for connections",
            )
            .await?;
        let page_fwd = page_load(OBJECTS, OBJECT, AT_ONCE, || direct_object(fp, OBJECT)).await?;
        fwd.state.signal(libc::SIGINT);
        let _ = fwd.wait_exit(Duration::from_secs(10)).await;
        let mut socks_figs = Vec::new();
        for sessions in [1usize, 4] {
            let sp = free()?;
            let mut proxy = self
                .spawn_cli(
                    who,
                    &sim,
                    &s(&[
                        "socks",
                        DEFAULT_TARGET,
                        "--listen",
                        &format!("127.0.0.1:{sp}"),
                        "--sessions",
                        &sessions.to_string(),
                    ]),
                    "Waiting for connections",
                )
                .await?;
            let tp = target.port;
            if sessions == 1 {
                // The first CONNECT starts the destination's session.
                let t = Instant::now();
                let c = socks_connect(sp, tp).await?;
                let first = t.elapsed().as_secs_f64() * 1e3;
                drop(c);
                let mut next = Vec::new();
                for _ in 0..20 {
                    let t = Instant::now();
                    let c = socks_connect(sp, tp).await?;
                    next.push(t.elapsed().as_secs_f64() * 1e3);
                    drop(c);
                }
                let next = percentile(&sorted(next), 50.0);
                self.res.add("socks_first_ms", who, first);
                self.res.add("socks_next_ms", who, next);
                socks_figs.push(format!(
                    "first CONNECT {first:.1} ms, later p50 {next:.2} ms"
                ));
            } else {
                // Start the pool and let it settle before timing the page.
                drop(socks_connect(sp, tp).await?);
            }
            let page = page_load(OBJECTS, OBJECT, AT_ONCE, || socks_object(sp, tp, OBJECT)).await?;
            self.res.add(
                if sessions == 1 {
                    "page_socks_ms"
                } else {
                    "page_socks4_ms"
                },
                who,
                page,
            );
            socks_figs.push(format!("page via SOCKS ({sessions} sessions) {page:.0} ms"));
            proxy.state.signal(libc::SIGINT);
            let _ = proxy.wait_exit(Duration::from_secs(10)).await;
        }
        self.res.add("page_fwd_ms", who, page_fwd);
        let viol: u32 = sim
            .session_ids()
            .iter()
            .filter_map(|id| sim.stats(id))
            .map(|s| s.pps_cap_violations)
            .sum();
        self.progress(&format!(
            "socks run {} {}: page via forward {page_fwd:.0} ms; {}; violations {viol}",
            run + 1,
            self.plugins[who].label,
            socks_figs.join("; ")
        ));
        self.res.records.push(json!({
            "scenario": "socks", "run": run + 1, "plugin": self.plugins[who].label,
            "page_forward_ms": page_fwd, "details": socks_figs, "pps_cap_violations": viol,
        }));
        Ok(())
    }

    async fn echo_run(&mut self, who: usize, run: usize, kind: EchoKind) -> Result<(), String> {
        let realistic_profile = kind == EchoKind::Realistic;
        let (profile, trips, key, env) = match kind {
            EchoKind::Realistic => (
                realistic(self.opts.agent_delay_ms),
                self.opts.real_echo_trips,
                "echo_real",
                &[][..],
            ),
            EchoKind::Unpaced => (unconstrained(), self.opts.echo_trips, "echo_np", NO_PACING),
            EchoKind::Loopback => (unconstrained(), self.opts.echo_trips, "echo", &[][..]),
            EchoKind::Typing => (
                unconstrained(),
                self.opts.typing_trips,
                "echo_typing",
                &[][..],
            ),
        };
        let plugin = self.plugins[who].clone();
        let target = Target::start().await.map_err(|e| format!("target: {e}"))?;
        let sess = start_session(&self.sim, &self.env, &profile, target.port, &plugin, env).await?;
        if kind == EchoKind::Loopback {
            self.res.add("startup", who, sess.startup_ms);
        }
        let gap = if kind == EchoKind::Typing {
            TYPING_GAP
        } else {
            Duration::ZERO
        };
        // The gaps are idle time: the series gets them on top of --max-secs.
        let deadline = self.deadline() + gap * (trips as u32 + 3);
        let r = echo_with_gap(sess.port, trips, deadline, gap).await;
        let exit = self.finish(sess).await;
        let rtts = sorted(r?);
        let minus = sim_rtt_ms(&profile, realistic_profile);
        let (p50, p99) = p50_p99(&rtts, minus);
        if realistic_profile {
            // The simulator's delay threads take their share of every trip (a wake-up of
            // their own and one of the runtime, each way): measured here, on this machine,
            // right after the series, so the plugin's share can be told apart.
            let over = ssm_sim::link_overshoot(profile.latency, 200).await;
            if !over.is_empty() {
                let median = over[over.len() / 2].as_secs_f64() * 1e3;
                self.res.add("echo_real_sim", who, 2.0 * median);
            }
        }
        let (k50, k99) = match kind {
            EchoKind::Loopback => ("echo_p50", "echo_p99"),
            EchoKind::Unpaced => ("echo_np_p50", "echo_np_p99"),
            EchoKind::Realistic => ("echo_real_p50", "echo_real_p99"),
            EchoKind::Typing => ("echo_typing_p50", "echo_typing_p99"),
        };
        self.res.add(k50, who, p50);
        self.res.add(k99, who, p99);
        self.progress(&format!(
            "{key} run {} {}: {} trips, p50 {p50:.3} ms, p99 {p99:.3} ms, max {:.3} ms (minus {minus} ms)",
            run + 1,
            plugin.label,
            rtts.len(),
            rtts.last().copied().unwrap_or(f64::NAN) - minus,
        ));
        self.res.records.push(json!({
            "scenario": key, "run": run + 1, "plugin": plugin.label, "trips": rtts.len(),
            "p50_ms": p50, "p99_ms": p99, "minus_ms": minus, "exit_status": exit.status,
            "forced_exit": exit.forced,
        }));
        Ok(())
    }

    async fn load_run(
        &mut self,
        who: usize,
        run: usize,
        realistic_profile: bool,
    ) -> Result<(), String> {
        let (profile, key) = if realistic_profile {
            (realistic(self.opts.agent_delay_ms), "load_real")
        } else {
            (unconstrained(), "load")
        };
        let plugin = self.plugins[who].clone();
        let target = Target::start().await.map_err(|e| format!("target: {e}"))?;
        let sess = start_session(&self.sim, &self.env, &profile, target.port, &plugin, &[]).await?;
        let result = async {
            let writer = bulk_writer(sess.port, u64::MAX).await?;
            let mut rx = target.sunk.clone();
            let warm = tokio::time::timeout(
                Duration::from_secs_f64(self.opts.max_secs),
                rx.wait_for(|c| *c >= LOAD_WARMUP_BYTES),
            )
            .await
            .is_ok_and(|r| r.is_ok());
            if !warm {
                writer.abort();
                return Err(format!(
                    "the bulk upload moved under {LOAD_WARMUP_BYTES} bytes in {} s",
                    self.opts.max_secs
                ));
            }
            let (b0, t0) = (target.sunk(), Instant::now());
            let deadline = Instant::now() + Duration::from_secs_f64(self.opts.load_secs);
            let rtts = echo(sess.port, self.opts.load_trips, deadline).await;
            let bulk = (target.sunk() - b0) as f64 / MIB / t0.elapsed().as_secs_f64();
            writer.abort();
            Ok((rtts?, bulk))
        }
        .await;
        let st = self.sim.stats(&sess.id).unwrap_or_default();
        let exit = self.finish(sess).await;
        let (rtts, bulk) = result?;
        let rtts = sorted(rtts);
        let minus = sim_rtt_ms(&profile, realistic_profile);
        let (p50, p99) = p50_p99(&rtts, minus);
        let (k50, k99, kb) = if realistic_profile {
            ("load_real_p50", "load_real_p99", "load_real_bulk")
        } else {
            ("load_p50", "load_p99", "load_bulk")
        };
        self.res.add(k50, who, p50);
        self.res.add(k99, who, p99);
        self.res.add(kb, who, bulk);
        if realistic_profile {
            // Cap violations during the loaded echo count too.
            let n = format!(
                "{key} ({}): {} cap violation(s) in run {}",
                plugin.label,
                st.pps_cap_violations,
                run + 1
            );
            if st.pps_cap_violations > 0 {
                self.res.notes.push(n);
            }
        }
        self.progress(&format!(
            "{key} run {} {}: {} trips, p50 {p50:.2} ms, p99 {p99:.2} ms (minus {minus} ms), \
             bulk {bulk:.2} MiB/s, peak fps {}, violations {}",
            run + 1,
            plugin.label,
            rtts.len(),
            st.max_client_frames_per_sec,
            st.pps_cap_violations,
        ));
        self.res.records.push(json!({
            "scenario": key, "run": run + 1, "plugin": plugin.label, "trips": rtts.len(),
            "p50_ms": p50, "p99_ms": p99, "minus_ms": minus, "bulk_mib_per_s": bulk,
            "max_client_frames_per_sec": st.max_client_frames_per_sec,
            "pps_cap_violations": st.pps_cap_violations, "exit_status": exit.status,
            "forced_exit": exit.forced,
        }));
        Ok(())
    }

    async fn version_runs(&mut self) {
        for i in 0..self.opts.version_runs {
            for who in 0..self.plugins.len() {
                let path = self.plugins[who].path.clone();
                let mut cmd = base_command(&path, &self.env);
                cmd.arg("--version");
                let t = Instant::now();
                let r = match Proc::spawn(cmd) {
                    Ok((mut p, _)) => {
                        let exit = p.wait_exit(Duration::from_secs(10)).await;
                        Ok((t.elapsed().as_secs_f64() * 1e3, exit))
                    }
                    Err(e) => Err(e.to_string()),
                };
                match r {
                    Ok((ms, exit)) if exit.status == 0 => self.res.add("version", who, ms),
                    Ok((_, exit)) => self.res.errors.push(format!(
                        "--version run {} plugin {}: exit status {}",
                        i + 1,
                        self.plugins[who].label,
                        exit.status
                    )),
                    Err(e) => self.res.errors.push(format!("--version: {e}")),
                }
            }
        }
    }

    async fn run_all(&mut self) {
        if self.wants("version") {
            self.progress("--version");
            self.version_runs().await;
        }
        let jobs = [
            ("unc", Job::Transfer("unc", Dir::Up)),
            ("unc", Job::Transfer("unc", Dir::Down)),
            ("paced", Job::Transfer("paced", Dir::Up)),
            ("paced", Job::Transfer("paced", Dir::Down)),
            ("long", Job::Transfer("long", Dir::Up)),
            ("long", Job::Transfer("long", Dir::Down)),
            ("pool", Job::Pool(1, Dir::Down)),
            ("pool", Job::Pool(2, Dir::Down)),
            ("pool", Job::Pool(4, Dir::Down)),
            ("pool", Job::Pool(8, Dir::Down)),
            ("pool", Job::Pool(1, Dir::Up)),
            ("pool", Job::Pool(2, Dir::Up)),
            ("pool", Job::Pool(4, Dir::Up)),
            ("pool", Job::Pool(8, Dir::Up)),
            ("socks", Job::Socks),
            ("real", Job::Transfer("real", Dir::Up)),
            ("real", Job::Transfer("real", Dir::Down)),
            ("echo", Job::Echo(EchoKind::Loopback)),
            ("echo-unpaced", Job::Echo(EchoKind::Unpaced)),
            ("echo-typing", Job::Echo(EchoKind::Typing)),
            ("echo-real", Job::Echo(EchoKind::Realistic)),
            ("load", Job::Load(false)),
            ("load-real", Job::Load(true)),
        ];
        for (scenario, job) in jobs {
            if self.wants(scenario) {
                self.each_run(scenario, job).await;
            }
        }
        self.note_load();
    }
}

// ---- report -----------------------------------------------------------------------------------

fn fmt_num(x: f64) -> String {
    let a = x.abs();
    if !x.is_finite() {
        "-".to_owned()
    } else if a >= 100.0 || (a == a.trunc() && a < 1e9) {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else if a >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

fn fmt_stat(s: Option<Stat>) -> String {
    match s {
        None => "-".to_owned(),
        Some(s) if s.n == 1 => fmt_num(s.median),
        Some(s) => format!(
            "{} [{}..{}]",
            fmt_num(s.median),
            fmt_num(s.min),
            fmt_num(s.max)
        ),
    }
}

/// B's samples for a figure; the official plugin's paced figures are its unpaced ones.
fn b_samples<'a>(res: &'a Results, plugins: &[PluginSpec], key: &str) -> (Option<&'a [f64]>, bool) {
    if plugins.len() < 2 {
        return (None, false);
    }
    if let Some(s) = res.get(key, 1) {
        return (Some(s), false);
    }
    if plugins[1].official {
        if let Some(unc) = key.strip_prefix("paced_") {
            return (res.get(&format!("unc_{unc}"), 1), true);
        }
    }
    (None, false)
}

struct Row {
    def: &'static FigureDef,
    a: Option<Stat>,
    b: Option<Stat>,
    b_borrowed: bool,
}

fn rows(res: &Results, plugins: &[PluginSpec]) -> Vec<Row> {
    FIGURES
        .iter()
        .filter_map(|def| {
            let a = res.get(def.key, 0).and_then(stat);
            let (b, b_borrowed) = b_samples(res, plugins, def.key);
            let b = b.and_then(stat);
            (a.is_some() || b.is_some()).then_some(Row {
                def,
                a,
                b,
                b_borrowed,
            })
        })
        .collect()
}

fn ratio(a: Option<Stat>, b: Option<Stat>) -> Option<f64> {
    let (a, b) = (a?, b?);
    (b.median != 0.0).then_some(a.median / b.median)
}

fn table(opts: &Opts, plugins: &[PluginSpec], res: &Results, load_start: &str) -> String {
    let mut out = String::new();
    let rows = rows(res, plugins);
    let two = plugins.len() > 1;
    let mut lines: Vec<[String; 5]> = vec![[
        "figure".into(),
        "unit".into(),
        "A: median [min..max]".into(),
        if two {
            "B: median [min..max]".into()
        } else {
            String::new()
        },
        if two { "A/B".into() } else { String::new() },
    ]];
    for r in &rows {
        let mut b = fmt_stat(r.b);
        if r.b_borrowed {
            b.push_str(" (*)");
        }
        let ratio = match (r.def.better, ratio(r.a, r.b)) {
            (Better::Info | Better::Zero, _) | (_, None) => String::new(),
            (Better::Higher, Some(x)) => format!("{x:.2}x"),
            (_, Some(x)) => format!("{x:.3}x"),
        };
        lines.push([
            r.def.label.to_owned(),
            r.def.unit.to_owned(),
            fmt_stat(r.a),
            if two { b } else { String::new() },
            ratio,
        ]);
    }
    let mut w = [0usize; 5];
    for l in &lines {
        for (i, c) in l.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    out.push_str("\nsession-manager-plugin benchmark (mux port forwarding through ssm-sim)\n");
    for p in plugins {
        out.push_str(&format!(
            "  {}: {} (version {}{})\n",
            p.label,
            p.path.display(),
            p.version,
            if p.official { ", official" } else { "" }
        ));
    }
    out.push('\n');
    for (i, l) in lines.iter().enumerate() {
        let mut s = format!(
            "{:<w0$}  {:<w1$}  {:>w2$}",
            l[0],
            l[1],
            l[2],
            w0 = w[0],
            w1 = w[1],
            w2 = w[2]
        );
        if two {
            s.push_str(&format!(
                "  {:>w3$}  {:>w4$}",
                l[3],
                l[4],
                w3 = w[3],
                w4 = w[4]
            ));
        }
        out.push_str(s.trim_end());
        out.push('\n');
        if i == 0 {
            out.push_str(&"-".repeat(w.iter().sum::<usize>() + 8));
            out.push('\n');
        }
    }
    out.push_str(&method_notes(opts, plugins, res, load_start));
    let t = targets(res, plugins);
    if !t.is_empty() {
        out.push_str("\nissue 7 targets (A vs B medians):\n");
        for (name, ok, detail) in t {
            out.push_str(&format!(
                "  [{}] {name}: {detail}\n",
                match ok {
                    Some(true) => "PASS",
                    Some(false) => "MISS",
                    None => " -- ",
                }
            ));
        }
    }
    if !res.forced.is_empty() {
        out.push_str("\nplugins that did not exit after the session ended:\n");
        for e in &res.forced {
            out.push_str(&format!("  {e}\n"));
        }
    }
    if !res.errors.is_empty() {
        out.push_str("\nerrors:\n");
        for e in &res.errors {
            out.push_str(&format!("  {}\n", e.replace('\n', "\n    ")));
        }
    }
    out
}

fn method_notes(opts: &Opts, plugins: &[PluginSpec], res: &Results, load_start: &str) -> String {
    let mut n = String::from("\nmethod:\n");
    let mut line = |s: String| {
        n.push_str("  - ");
        n.push_str(&s);
        n.push('\n');
    };
    line(format!(
        "{} run(s) per figure, each on a fresh plugin process; A and B alternate run by run. \
         Cells: median [min..max] over runs.",
        opts.runs
    ));
    line(format!(
        "plugin invoked like the AWS CLI (argv, env response, dummy creds, HOME={}), against an \
         in-process ssm-sim over {}; mux port forwarding to a target in this process.",
        "temp dir",
        if opts.tls { "wss (TLS)" } else { "plain ws" }
    ));
    line(format!(
        "'no pacing': A with SSM_PLUGIN_PACKETS_PER_SECOND=0 (our default paces stream frames \
         at 950 packets/s, acks charged to the same budget, to stay under the gateway's \
         ~1000/s cap); transfers of {} MiB each way. 'typing pace': one byte every 50 ms, \
         the idle gaps not counted.",
        opts.size_mib
    ));
    line(format!(
        "'default pacing' and 'realistic': {} MiB per transfer (paced transfers are rate-bound; \
         smaller so runs finish in reasonable time).",
        opts.paced_size_mib
    ));
    line(format!(
        "realistic profile: sim latency {} ms one-way (both directions), gateway cap {} client \
         frames per sliding second (a violation closes the WebSocket), agent sleeps {} ms per \
         1 KiB chunk it reads (the real agent: 1 ms; download is then bound by the agent's \
         sleep granularity, for both plugins).",
        REAL_LATENCY.as_millis(),
        REAL_PPS_CAP,
        opts.agent_delay_ms
    ));
    line(format!(
        "any one transfer or echo series stops after --max-secs {}; a capped transfer's rate is \
         bytes delivered / time.",
        opts.max_secs
    ));
    line(format!(
        "echo: 1-byte round trips on one connection after 3 warm-up trips; loopback {} trips \
         (A at default pacing, where 2 frames per trip meet A's 950 frames/s budget, and again \
         with A's pacing off: the plugin's own latency); realistic {} trips, minus the sim's \
         2 x {} ms; 'of which the sim's delay threads' is 2 x the median time 200 items \
         spend in one of the sim's delayed links beyond its latency, measured after the series.",
        opts.echo_trips,
        opts.real_echo_trips,
        REAL_LATENCY.as_millis()
    ));
    line(format!(
        "echo under upload: a second connection uploads continuously; after {} KiB reached the \
         target, up to {} trips within {} s are timed.",
        LOAD_WARMUP_BYTES / 1024,
        opts.load_trips,
        opts.load_secs
    ));
    line(
        "CPU per MiB: user+sys from /proc/PID/stat across the transfer only (10 ms ticks); \
         peak RSS: VmHWM from /proc/PID/status at the end of the transfer."
            .to_owned(),
    );
    line(format!(
        "startup: spawn -> the 'Waiting for connections...' line on stdout (loopback sessions, \
         includes WebSocket open and handshake); --version: {} spawn-to-exit runs.",
        opts.version_runs
    ));
    if plugins.get(1).is_some_and(|p| p.official) {
        line(
            "(*) B is the official plugin: it has no pacing knob (it sleeps 1 ms per 1024-byte \
             chunk), so its 'default pacing' cells repeat its unpaced runs."
                .to_owned(),
        );
    }
    for p in plugins {
        if !p.extra_env.is_empty() {
            line(format!("{} extra environment: {:?}", p.label, p.extra_env));
        }
    }
    // SAFETY: plain sysconf query.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    line(format!(
        "machine: {cpus} CPUs; load average at start {load_start}, at end {}, highest 1-min seen \
         {:.2}. The simulator, target and clients share the machine with the plugin.",
        loadavg(),
        res.max_load
    ));
    for note in &res.notes {
        line(note.clone());
    }
    n
}

/// (target, met?, detail)
fn targets(res: &Results, plugins: &[PluginSpec]) -> Vec<(String, Option<bool>, String)> {
    let a = |k: &str| res.get(k, 0).and_then(stat).map(|s| s.median);
    let b = |k: &str| {
        b_samples(res, plugins, k)
            .0
            .and_then(stat)
            .map(|s| s.median)
    };
    let amax = |k: &str| res.get(k, 0).and_then(stat).map(|s| s.max);
    let both = |x: Option<f64>, y: Option<f64>| match (x, y) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, y) => x.or(y),
    };
    // A relative to B: (met, detail).
    let rel = |x: Option<f64>, y: Option<f64>, want: f64, higher: bool| match (x, y) {
        (Some(x), Some(y)) if y != 0.0 => {
            let r = x / y;
            let ok = if higher { r >= want } else { r <= want };
            let op = if higher { ">=" } else { "<=" };
            let d = format!(
                "A {} / B {} = {r:.3}x (want {op} {want:.3})",
                fmt_num(x),
                fmt_num(y)
            );
            (Some(ok), d)
        }
        _ => (None, "not measured".to_owned()),
    };
    // A against an absolute limit.
    let abs = |x: Option<f64>, limit: f64, unit: &str| match x {
        Some(x) => (
            Some(x <= limit),
            format!("A {} {unit} (want <= {limit} {unit})", fmt_num(x)),
        ),
        None => (None, "not measured".to_owned()),
    };
    let lat2 = 2.0 * REAL_LATENCY.as_secs_f64() * 1e3;
    let minus = |x: Option<f64>, y: Option<f64>| Some(x? - y?);
    // Loaded RTT p99 over unloaded RTT p99 (both with the sim's latency added back).
    let loaded = |k: &str, unloaded: &str, plus: f64| match (a(k), a(unloaded)) {
        (Some(x), Some(y)) => {
            let r = (x + plus) / (y + plus);
            let d = format!(
                "RTT p99 loaded {} ms / unloaded {} ms = {r:.1}x (want <= 3x)",
                fmt_num(x + plus),
                fmt_num(y + plus)
            );
            (Some(r <= 3.0), d)
        }
        _ => (None, "not measured".to_owned()),
    };
    let list = [
        (
            "unconstrained upload >= 10x B",
            rel(a("unc_up"), b("unc_up"), 10.0, true),
        ),
        (
            "unconstrained download >= 10x B",
            rel(a("unc_down"), b("unc_down"), 10.0, true),
        ),
        (
            "realistic upload >= 1.3x B",
            rel(a("real_up"), b("real_up"), 1.3, true),
        ),
        (
            "zero cap violations, realistic (max over runs)",
            abs(both(amax("real_up_viol"), amax("real_down_viol")), 0.0, ""),
        ),
        (
            "echo added p50 <= 0.3 ms (loopback, A unpaced)",
            abs(a("echo_np_p50"), 0.3, "ms"),
        ),
        (
            "echo added p99 <= 2 ms (loopback, A unpaced)",
            abs(a("echo_np_p99"), 2.0, "ms"),
        ),
        (
            "echo added p50 <= 0.3 ms (realistic, less the sim's delay threads)",
            abs(minus(a("echo_real_p50"), a("echo_real_sim")), 0.3, "ms"),
        ),
        (
            "echo added p99 <= 2 ms (realistic)",
            abs(a("echo_real_p99"), 2.0, "ms"),
        ),
        (
            "interactive p99 under upload <= 3x unloaded (realistic)",
            loaded("load_real_p99", "echo_real_p99", lat2),
        ),
        (
            "interactive p99 under upload <= 3x unloaded (loopback)",
            loaded("load_p99", "echo_p99", 0.0),
        ),
        (
            "CPU/MiB upload <= 1/3 of B",
            rel(a("cpu_unc_up"), b("cpu_unc_up"), 1.0 / 3.0, false),
        ),
        (
            "CPU/MiB download <= 1/3 of B",
            rel(a("cpu_unc_down"), b("cpu_unc_down"), 1.0 / 3.0, false),
        ),
        (
            "peak RSS <= 1/2 of B",
            rel(
                both(a("rss_up"), a("rss_down")),
                both(b("rss_up"), b("rss_down")),
                0.5,
                false,
            ),
        ),
        ("--version <= 5 ms", abs(a("version"), 5.0, "ms")),
    ];
    list.into_iter()
        .map(|(name, (ok, d))| (name.to_owned(), ok, d))
        .collect()
}

fn json_report(opts: &Opts, plugins: &[PluginSpec], res: &Results, load_start: &str) -> Value {
    let st = |s: Option<Stat>| {
        s.map(|s| json!({"median": s.median, "min": s.min, "max": s.max, "n": s.n}))
            .unwrap_or(Value::Null)
    };
    let figures: Vec<Value> = rows(res, plugins)
        .iter()
        .map(|r| {
            json!({
                "key": r.def.key,
                "label": r.def.label.trim(),
                "unit": r.def.unit,
                "better": format!("{:?}", r.def.better).to_lowercase(),
                "a": st(r.a),
                "a_samples": res.get(r.def.key, 0).unwrap_or(&[]),
                "b": st(r.b),
                "b_samples": b_samples(res, plugins, r.def.key).0.unwrap_or(&[]),
                "b_from_unpaced_runs": r.b_borrowed,
                "ratio_a_over_b": ratio(r.a, r.b),
            })
        })
        .collect();
    let targets: Vec<Value> = targets(res, plugins)
        .into_iter()
        .map(|(name, ok, detail)| json!({"target": name, "met": ok, "detail": detail}))
        .collect();
    json!({
        "plugins": plugins.iter().map(|p| json!({
            "label": p.label, "path": p.path.display().to_string(), "version": p.version,
            "official": p.official, "extra_env": p.extra_env,
        })).collect::<Vec<_>>(),
        "method": {
            "runs": opts.runs, "size_mib": opts.size_mib, "paced_size_mib": opts.paced_size_mib,
            "max_secs": opts.max_secs, "echo_trips": opts.echo_trips,
            "realistic_echo_trips": opts.real_echo_trips, "load_secs": opts.load_secs,
            "load_trips": opts.load_trips, "version_runs": opts.version_runs,
            "tls": opts.tls, "quick": opts.quick,
            "realistic_profile": {
                "latency_ms_one_way": REAL_LATENCY.as_millis() as u64,
                "pps_cap": REAL_PPS_CAP, "agent_chunk_delay_ms": opts.agent_delay_ms,
            },
            "a_unpaced_env": "SSM_PLUGIN_PACKETS_PER_SECOND=0",
            "default_pacing_pps": 950,
        },
        "machine": {
            "load_start": load_start, "load_end": loadavg(), "max_load_1min": res.max_load,
        },
        "figures": figures,
        "targets": targets,
        "records": res.records,
        "notes": res.notes,
        "forced_exits": res.forced,
        "errors": res.errors,
    })
}

// ---- main --------------------------------------------------------------------------------------

fn plugin_version(path: &Path) -> Result<String, String> {
    let out = Command::new(path)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {} --version: {e}", path.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} --version failed: {}",
            path.display(),
            out.status
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The plugins' HOME: empty, so no ~/.aws configuration applies.
fn home_dir() -> PathBuf {
    std::env::temp_dir().join(format!("ssm-bench-home-{}", std::process::id()))
}

async fn run(opts: Opts) -> Result<(), String> {
    let mut plugins = Vec::new();
    let specs = [(&opts.plugin, "A", &opts.env_a)]
        .into_iter()
        .chain(opts.vs.as_ref().map(|p| (p, "B", &opts.env_b)));
    for (path, label, env) in specs {
        if !path.is_file() {
            return Err(format!(
                "{label}: no plugin binary at {} (build it: cargo build --release -p session-manager-plugin)",
                path.display()
            ));
        }
        let version = plugin_version(path)?;
        plugins.push(PluginSpec {
            label,
            path: path.clone(),
            official: version.starts_with("1.2."),
            version,
            extra_env: env.clone(),
        });
    }
    let home = home_dir();
    std::fs::create_dir_all(&home).map_err(|e| format!("{}: {e}", home.display()))?;
    let sim = Simulator::start(SimConfig {
        tls: opts.tls,
        ..unconstrained()
    })
    .await
    .map_err(|e| format!("simulator: {e}"))?;
    let env = Env {
        home: home.clone(),
        ca: sim.ca_pem_path(),
    };
    let load_start = loadavg();
    let mut bench = Bench {
        started: Instant::now(),
        current: String::new(),
        opts: opts.clone(),
        sim,
        env,
        plugins: plugins.clone(),
        res: Results {
            max_load: load1(),
            ..Results::default()
        },
    };
    bench.progress(&format!(
        "A = {} ({}){}",
        plugins[0].path.display(),
        plugins[0].version,
        plugins
            .get(1)
            .map(|b| format!(", B = {} ({})", b.path.display(), b.version))
            .unwrap_or_default()
    ));
    let started = Instant::now();
    bench.run_all().await;
    let res = std::mem::take(&mut bench.res);
    drop(bench);
    let _ = std::fs::remove_dir_all(&home);
    let text = table(&opts, &plugins, &res, &load_start);
    let text = format!(
        "{text}\ntotal benchmark time {:.0} s\n",
        started.elapsed().as_secs_f64()
    );
    if opts.json {
        eprint!("{text}");
        let doc = json_report(&opts, &plugins, &res, &load_start);
        println!(
            "{}",
            serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?
        );
    } else {
        print!("{text}");
    }
    if res.samples.is_empty() {
        return Err("no figure was measured".into());
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match parse_args(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        tokio::select! {
            r = run(opts) => r,
            _ = tokio::signal::ctrl_c() => {
                kill_all_children();
                Err("interrupted".to_owned())
            }
        }
    });
    kill_all_children();
    let _ = std::fs::remove_dir_all(home_dir());
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e}");
            ExitCode::from(1)
        }
    }
}
