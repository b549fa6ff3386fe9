//! End-to-end port forwarding: the built plugin binary, started the way the AWS CLI
//! starts it, against ssm-sim over TLS, with real clients (curl, TCP and unix sockets).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use ssm_sim::{SimConfig, StartSessionRequest};
use ssm_wire::payload::Flag;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

const START: Duration = Duration::from_secs(20);
const EXIT: Duration = Duration::from_secs(15);

fn starting_line(id: &str) -> String {
    format!("\nStarting session with SessionId: {id}\n")
}

/// The official mux listener lines: `fmt.Printf(displayMsg)` (no newline), then
/// `fmt.Printf("\nWaiting for connections...\n")` (muxportforwarding.go; PROTOCOL.md §8.5.3).
fn mux_opened(port: u16, id: &str) -> String {
    format!("Port {port} opened for sessionId {id}.\nWaiting for connections...\n")
}

fn exiting_line(id: &str) -> String {
    format!("\n\nExiting session with sessionId: {id}.\n\n")
}

/// The plugin's output and log plus the simulator's view of the session.
fn diag(sim: &ssm_sim::Simulator, p: &PluginProc) -> String {
    format!(
        "{}--- sim stats: {:?}\n",
        p.dump(),
        sim.stats(&p.session_id)
    )
}

/// Echoes `data` through `stream` and panics with diagnostics unless it comes back intact.
async fn echo_check<S>(
    sim: &ssm_sim::Simulator,
    p: &PluginProc,
    stream: S,
    data: Arc<Vec<u8>>,
    timeout: Duration,
    what: &str,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    match echo_roundtrip(stream, data.clone(), timeout).await {
        Ok(got) if got == *data => {}
        Ok(got) => panic!(
            "{what}: echo corrupted ({} of {} bytes; first difference at {:?}){}",
            got.len(),
            data.len(),
            got.iter().zip(data.iter()).position(|(a, b)| a != b),
            diag(sim, p)
        ),
        Err(e) => panic!("{what}: {e}{}", diag(sim, p)),
    }
}

/// SIGINT → the official lines, exit 0, TerminateSession flag at the agent, session closed.
async fn sigint_and_check(sim: &ssm_sim::Simulator, p: &mut PluginProc) {
    let id = p.session_id.clone();
    p.signal(SIGINT);
    let status = p.wait_exit(EXIT).await;
    let out = p.stdout.text();
    assert!(
        out.contains("Terminate signal received, exiting.\n"),
        "no terminate line{}",
        p.dump()
    );
    assert!(
        out.ends_with(&exiting_line(&id)),
        "no exiting line at the end{}",
        p.dump()
    );
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGINT{}",
        p.dump()
    );
    // The agent ends the session on the flag, after waiting (at most the sim's
    // close_drain_timeout, 10 s) for its own last messages to be acknowledged.
    let stats = sim
        .wait_closed(&id, Duration::from_secs(15))
        .await
        .expect("the sim closes the session after the TerminateSession flag");
    assert!(
        stats
            .flags_received
            .contains(&Flag::TerminateSession.to_u32()),
        "TerminateSession flag not received by the agent: {:?}",
        stats.flags_received
    );
    assert!(stats.closed);
}

/// The exact bytes scripts parse: starting line, then the mux listener lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mux_printed_lines_are_byte_exact() {
    let sim = start_sim().await;
    let echo = echo_server().await;
    let req = StartSessionRequest::port_forwarding(echo.port, 0);
    let mut p = start_plugin(&sim, &req, None, &[], false);
    let id = p.session_id.clone();
    p.expect_stdout("Waiting for connections...\n", START).await;
    let port = parse_opened_port(&p.stdout.text()).expect("port");
    assert_ne!(port, 0);
    let want = format!("{}{}", starting_line(&id), mux_opened(port, &id));
    assert_eq!(
        p.stdout.text(),
        want,
        "stdout must match the official plugin byte for byte{}",
        p.dump()
    );
    assert_eq!(sim.stats(&id).unwrap().port_mode.as_deref(), Some("mux"));
    sigint_and_check(&sim, &mut p).await;
}

/// An agent that stopped acknowledging holds the send window full (one frame here):
/// SIGINT still sends the TerminateSession flag and exits at once, instead of waiting
/// behind the queued upload for a second signal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_works_while_the_agent_is_stalled() {
    let sim = start_sim().await;
    let echo = echo_server().await;
    let req = StartSessionRequest::port_forwarding(echo.port, 0);
    let cfg = SimConfig {
        stall_input_after: Some(0),
        ..SimConfig::default()
    };
    let mut p = start_plugin(
        &sim,
        &req,
        Some(cfg),
        &[
            ("SSM_PLUGIN_WINDOW_PACKETS", "1"),
            ("SSM_PLUGIN_FLUSH_TIMEOUT", "2"),
        ],
        false,
    );
    let id = p.session_id.clone();
    p.expect_stdout("Waiting for connections...\n", START).await;
    let port = parse_opened_port(&p.stdout.text()).expect("port");
    // A client that keeps writing: the SYN takes the window, the rest queues.
    let mut client = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let writer = tokio::spawn(async move {
        let chunk = vec![7u8; 64 * 1024];
        while client.write_all(&chunk).await.is_ok() {}
    });
    let deadline = tokio::time::Instant::now() + START;
    while sim.stats(&id).unwrap().stalled_frames_ignored == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never stalled{}",
            p.dump()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    p.signal(SIGINT);
    let status = p.wait_exit(EXIT).await;
    let out = p.stdout.text();
    assert!(
        out.contains("Terminate signal received, exiting.\n") && out.ends_with(&exiting_line(&id)),
        "missing lines{}",
        p.dump()
    );
    assert_eq!(status.code(), Some(0), "exit status{}", p.dump());
    // The flag went out past the full window: the stalled agent ignores Output messages
    // before anything counts them, so the one message it saw out of order (behind the
    // data it ignored, held unprocessed as a hung agent would) is the flag.
    assert!(
        sim.stats(&id).unwrap().out_of_order_received >= 1,
        "no flag frame reached the agent{}",
        p.dump()
    );
    writer.abort();
}

/// localPortNumber 0 gives a real port; curl downloads a multi-MB body twice through it
/// (sha256 checked); the "Connection accepted" line appears once; SIGINT ends it cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mux_curl_download_then_sigint() {
    let sim = start_sim().await;
    let body = Arc::new(random_bytes(4 << 20, 1));
    let want = hex(&sha256(&body));
    let http = http_server(body.clone()).await;
    let req = StartSessionRequest::port_forwarding(http.port, 0);
    let mut p = start_plugin(&sim, &req, None, &[], false);
    let id = p.session_id.clone();
    let port = p.opened_port(START).await;
    p.expect_stdout("Waiting for connections...\n", START).await;
    assert!(
        p.stdout.text().starts_with(&starting_line(&id)),
        "{}",
        p.dump()
    );
    let dir = TempDir::new("curl");
    for i in 0..2 {
        let file = dir.join(&format!("body{i}"));
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--fail", "--max-time", "60", "-o"])
            .arg(&file)
            .arg(format!("http://127.0.0.1:{port}/blob"));
        let out = run_cmd(cmd, Duration::from_secs(70)).await;
        assert!(
            out.status.success(),
            "curl failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            p.dump()
        );
        let got = std::fs::read(&file).expect("curl output");
        assert_eq!(got.len(), body.len(), "download {i} length");
        assert_eq!(hex(&sha256(&got)), want, "download {i} sha256");
    }
    let accepted = format!("\nConnection accepted for session [{id}]\n");
    assert_eq!(
        count(&p.stdout.text(), &accepted),
        1,
        "the accepted line is printed for the first connection only{}",
        p.dump()
    );
    assert_eq!(
        http.connections.load(std::sync::atomic::Ordering::SeqCst),
        2
    );
    sigint_and_check(&sim, &mut p).await;
}

async fn curl_download(port: u16, dir: &TempDir, name: &str) -> Result<Vec<u8>, String> {
    let file = dir.join(name);
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--fail", "--max-time", "60", "-o"])
        .arg(&file)
        .arg(format!("http://127.0.0.1:{port}/{name}"));
    let out = run_cmd(cmd, Duration::from_secs(70)).await;
    if !out.status.success() {
        return Err(format!(
            "curl failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    std::fs::read(&file).map_err(|e| format!("curl output: {e}"))
}

/// Issue 4: curl downloads 20 MiB through mux and through basic port forwarding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_20mib_through_mux_and_basic() {
    let sim = start_sim().await;
    let body = Arc::new(random_bytes(20 << 20, 2));
    let want = hex(&sha256(&body));
    let http = http_server(body.clone()).await;
    let dir = TempDir::new("curl20");
    for agent in [ssm_sim::DEFAULT_AGENT_VERSION, "3.0.100.0"] {
        let req = StartSessionRequest::port_forwarding(http.port, 0);
        let cfg = SimConfig {
            agent_version: agent.into(),
            ..SimConfig::default()
        };
        // A higher packet budget keeps the test short; pacing has its own tests.
        let mut p = start_plugin(
            &sim,
            &req,
            Some(cfg),
            &[("SSM_PLUGIN_PACKETS_PER_SECOND", "5000")],
            false,
        );
        let port = p.opened_port(START).await;
        let t0 = std::time::Instant::now();
        let got = match curl_download(port, &dir, "big").await {
            Ok(g) => g,
            Err(e) => panic!("agent {agent}: {e}{}", diag(&sim, &p)),
        };
        eprintln!("agent {agent}: 20 MiB by curl in {:?}", t0.elapsed());
        assert_eq!(
            got.len(),
            body.len(),
            "agent {agent}: length{}",
            diag(&sim, &p)
        );
        assert_eq!(hex(&sha256(&got)), want, "agent {agent}: sha256");
        sigint_and_check(&sim, &mut p).await;
    }
}

/// Three concurrent connections each move a few MB up and down (echo) intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mux_concurrent_connections_echo() {
    let sim = start_sim().await;
    let echo = echo_server().await;
    let req = StartSessionRequest::port_forwarding(echo.port, 0);
    // A higher packet budget keeps the test short; pacing has its own tests.
    let mut p = start_plugin(
        &sim,
        &req,
        None,
        &[("SSM_PLUGIN_PACKETS_PER_SECOND", "5000")],
        false,
    );
    let port = p.opened_port(START).await;
    let mut tasks = Vec::new();
    for i in 0..3u64 {
        let data = Arc::new(random_bytes(2 << 20, 100 + i));
        tasks.push(tokio::spawn(async move {
            let s = connect_retry(port).await;
            let r = echo_roundtrip(s, data.clone(), Duration::from_secs(30)).await;
            (i, r.map(|got| got == *data))
        }));
    }
    for t in tasks {
        let (i, r) = t.await.expect("echo task");
        match r {
            Ok(true) => {}
            Ok(false) => panic!("connection {i}: echo corrupted{}", diag(&sim, &p)),
            Err(e) => panic!("connection {i}: {e}{}", diag(&sim, &p)),
        }
    }
    assert_eq!(
        echo.connections.load(std::sync::atomic::Ordering::SeqCst),
        3
    );
    let id = p.session_id.clone();
    assert_eq!(
        count(
            &p.stdout.text(),
            &format!("\nConnection accepted for session [{id}]\n")
        ),
        1,
        "{}",
        p.dump()
    );
    sigint_and_check(&sim, &mut p).await;
}

/// Issue 4: 50 concurrent connections through one mux session all succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mux_fifty_concurrent_connections() {
    let sim = start_sim().await;
    let echo = echo_server().await;
    let req = StartSessionRequest::port_forwarding(echo.port, 0);
    let mut p = start_plugin(&sim, &req, None, &[], false);
    let port = p.opened_port(START).await;
    let mut tasks = Vec::new();
    for i in 0..50u64 {
        let data = Arc::new(random_bytes(16 << 10, 200 + i));
        tasks.push(tokio::spawn(async move {
            let s = connect_retry(port).await;
            let r = echo_roundtrip(s, data.clone(), Duration::from_secs(45)).await;
            (i, r.map(|got| got == *data))
        }));
    }
    let mut failed = Vec::new();
    for t in tasks {
        match t.await.expect("echo task") {
            (_, Ok(true)) => {}
            (i, Ok(false)) => failed.push(format!("{i}: corrupted")),
            (i, Err(e)) => failed.push(format!("{i}: {e}")),
        }
    }
    assert!(
        failed.is_empty(),
        "{} of 50 connections failed: {failed:?}{}",
        failed.len(),
        diag(&sim, &p)
    );
    assert_eq!(
        echo.connections.load(std::sync::atomic::Ordering::SeqCst),
        50
    );
    sigint_and_check(&sim, &mut p).await;
}

/// A target port nobody listens on: the agent's ConnectToPortError flag is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mux_dead_target_reports_connection_failure() {
    let sim = start_sim().await;
    let dead = free_port();
    let req = StartSessionRequest::port_forwarding(dead, 0);
    let mut p = start_plugin(&sim, &req, None, &[], false);
    let port = p.opened_port(START).await;
    let mut s = connect_retry(port).await;
    let _ = s.write_all(b"hello").await;
    p.expect_stdout(
        "\nConnection to destination port failed, check SSM Agent logs.\n",
        Duration::from_secs(15),
    )
    .await;
    // The stream is closed: the local connection sees EOF.
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("the local connection is closed after ConnectToPortError");
    assert!(matches!(n, Ok(0) | Err(_)), "unexpected data: {n:?}");
    assert!(
        p.running(),
        "the session survives a failed stream{}",
        p.dump()
    );
    sigint_and_check(&sim, &mut p).await;
}

/// Old agent (basic mode): the official lines, one connection at a time, re-accept after
/// the first closes (DisconnectToPort flag at the agent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_mode_reaccepts_after_disconnect() {
    let sim = start_sim().await;
    let echo = echo_server().await;
    let req = StartSessionRequest::port_forwarding(echo.port, 0);
    let cfg = SimConfig {
        agent_version: "3.0.100.0".into(),
        ..SimConfig::default()
    };
    let mut p = start_plugin(&sim, &req, Some(cfg), &[], false);
    let id = p.session_id.clone();
    p.expect_stdout(" opened for sessionId ", START).await;
    let port = p.opened_port(START).await;
    assert_eq!(
        p.stdout.text(),
        format!(
            "{}Port {port} opened for sessionId {id}.\n",
            starting_line(&id)
        ),
        "{}",
        p.dump()
    );
    assert_eq!(sim.stats(&id).unwrap().port_mode.as_deref(), Some("basic"));

    let data = Arc::new(random_bytes(512 << 10, 7));
    let s = connect_retry(port).await;
    echo_check(
        &sim,
        &p,
        s,
        data.clone(),
        Duration::from_secs(30),
        "first connection",
    )
    .await;
    p.expect_stdout(
        &format!("Connection accepted for session {id}.\n"),
        Duration::from_secs(5),
    )
    .await;

    // The first connection is closed (dropped in echo_roundtrip): DisconnectToPort.
    let flags = poll_until(Duration::from_secs(10), || {
        let f = sim.stats(&id).unwrap().flags_received;
        f.contains(&Flag::DisconnectToPort.to_u32()).then_some(f)
    })
    .await;
    assert!(
        flags.is_some(),
        "DisconnectToPort not received: {:?}{}",
        sim.stats(&id).unwrap().flags_received,
        p.dump()
    );

    let data2 = Arc::new(random_bytes(256 << 10, 8));
    let s = connect_retry(port).await;
    echo_check(
        &sim,
        &p,
        s,
        data2.clone(),
        Duration::from_secs(30),
        "second connection",
    )
    .await;
    assert_eq!(
        count(&p.stdout.text(), "Connection accepted for session"),
        1,
        "{}",
        p.dump()
    );
    assert!(echo.connections.load(std::sync::atomic::Ordering::SeqCst) >= 2);
    sigint_and_check(&sim, &mut p).await;
}

/// localConnectionType=unix: the listener is a unix socket at localUnixSocket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mux_unix_socket_listener() {
    let sim = start_sim().await;
    let echo = echo_server().await;
    let dir = TempDir::new("unix");
    let path = dir.join("fwd.sock");
    let path_s = path.display().to_string();
    let req = with_param(
        with_param(
            StartSessionRequest::port_forwarding(echo.port, 0),
            "localConnectionType",
            "unix",
        ),
        "localUnixSocket",
        &path_s,
    );
    let mut p = start_plugin(&sim, &req, None, &[], false);
    let id = p.session_id.clone();
    p.expect_stdout("Waiting for connections...\n", START).await;
    assert!(
        p.stdout
            .text()
            .contains(&format!("Unix socket {path_s} opened for sessionId {id}.")),
        "{}",
        p.dump()
    );
    let s = tokio::net::UnixStream::connect(&path)
        .await
        .expect("connect the unix socket");
    let data = Arc::new(random_bytes(1 << 20, 9));
    echo_check(
        &sim,
        &p,
        s,
        data.clone(),
        Duration::from_secs(30),
        "unix socket",
    )
    .await;
    sigint_and_check(&sim, &mut p).await;
    assert!(
        !path.exists(),
        "the plugin removes its unix socket file on exit"
    );
}

/// AWS-StartPortForwardingSessionToRemoteHost needs nothing new on the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_host_forwarding() {
    let sim = start_sim().await;
    let echo = echo_server().await;
    let req = StartSessionRequest::port_forwarding_to_host("127.0.0.1", echo.port, 0);
    let mut p = start_plugin(&sim, &req, None, &[], false);
    let port = p.opened_port(START).await;
    let s = connect_retry(port).await;
    let data = Arc::new(random_bytes(1 << 20, 10));
    echo_check(
        &sim,
        &p,
        s,
        data.clone(),
        Duration::from_secs(30),
        "remote-host",
    )
    .await;
    assert_eq!(
        echo.connections.load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    sigint_and_check(&sim, &mut p).await;
}

/// A busy local port fails at once with the official error text (the official plugin
/// hangs in mux mode: PROTOCOL.md §10 #11).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_local_port_fails_promptly() {
    let sim = start_sim().await;
    let echo = echo_server().await;
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy_port = busy.local_addr().unwrap().port();
    for agent in [ssm_sim::DEFAULT_AGENT_VERSION, "3.0.100.0"] {
        let req = StartSessionRequest::port_forwarding(echo.port, busy_port);
        let cfg = SimConfig {
            agent_version: agent.into(),
            ..SimConfig::default()
        };
        let mut p = start_plugin(&sim, &req, Some(cfg), &[], false);
        let status = p.wait_exit(Duration::from_secs(15)).await;
        let err = p.stderr.text();
        assert!(
            err.contains(&format!(
                "Cannot perform start session: listen tcp 127.0.0.1:{busy_port}: bind: address already in use"
            )),
            "agent {agent}: missing error line{}",
            p.dump()
        );
        assert!(!status.success(), "agent {agent}: exit status {status:?}");
        assert!(!p.stdout.text().contains("opened for sessionId"));
    }
    drop(busy);
}

/// SSM_PLUGIN_LISTEN_ADDRESS=::1 binds the IPv6 loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_address_ipv6() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("skipped: no IPv6 loopback here");
        return;
    }
    let sim = start_sim().await;
    let echo = echo_server().await;
    let req = StartSessionRequest::port_forwarding(echo.port, 0);
    let mut p = start_plugin(
        &sim,
        &req,
        None,
        &[("SSM_PLUGIN_LISTEN_ADDRESS", "::1")],
        false,
    );
    let port = p.opened_port(START).await;
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err(),
        "must not listen on 127.0.0.1"
    );
    let s = tokio::net::TcpStream::connect(("::1", port))
        .await
        .expect("connect [::1]");
    let data = Arc::new(random_bytes(256 << 10, 11));
    echo_check(
        &sim,
        &p,
        s,
        data.clone(),
        Duration::from_secs(30),
        "IPv6 echo corrupted",
    )
    .await;
    sigint_and_check(&sim, &mut p).await;
}

/// SSM_PLUGIN_QUIET=1 keeps stdout empty; the status lines go to stderr.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_mode_keeps_stdout_empty() {
    let sim = start_sim().await;
    let echo = echo_server().await;
    let req = StartSessionRequest::port_forwarding(echo.port, 0);
    let mut p = start_plugin(&sim, &req, None, &[("SSM_PLUGIN_QUIET", "1")], false);
    let id = p.session_id.clone();
    p.expect_stderr("Waiting for connections...\n", START).await;
    let err = p.stderr.text();
    assert!(err.contains(&starting_line(&id)), "{}", p.dump());
    let port = parse_opened_port(&err).expect("port on stderr");
    let s = connect_retry(port).await;
    let data = Arc::new(random_bytes(64 << 10, 12));
    echo_check(&sim, &p, s, data.clone(), Duration::from_secs(30), "echo").await;
    p.signal(SIGINT);
    let status = p.wait_exit(EXIT).await;
    assert_eq!(status.code(), Some(0), "{}", p.dump());
    assert_eq!(p.stdout.bytes(), b"", "stdout must stay empty{}", p.dump());
    let err = p.stderr.text();
    assert!(
        err.contains("Connection accepted for session"),
        "{}",
        p.dump()
    );
    assert!(
        err.contains("Terminate signal received, exiting.\n"),
        "{}",
        p.dump()
    );
    assert!(err.contains(&exiting_line(&id)), "{}", p.dump());
}
