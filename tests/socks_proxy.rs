//! `socks` (issue 15, item 2): a SOCKS5 / HTTP CONNECT proxy whose every destination is
//! an `AWS-StartPortForwardingSessionToRemoteHost` session of the simulator, reused by
//! later connections. Real curl (`--socks5-hostname`, `--socks5`, `-p -x http://`), a raw
//! RFC 1928 client for reply codes and 50 concurrent CONNECTs, and RFC 1929
//! username/password on a non-loopback listener.

mod common;
mod standalone;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use standalone::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

const T: Duration = Duration::from_secs(30);

/// The proxy process; killed on drop.
struct Proxy {
    _child: Child,
    port: u16,
}

async fn start_proxy(
    sim: &ssm_sim::Simulator,
    home: &std::path::Path,
    listen: &str,
    extra: &[&str],
) -> Proxy {
    let port: u16 = listen.rsplit(':').next().unwrap().parse().unwrap();
    let mut args = vec!["socks", TARGET, "--listen", listen];
    args.extend_from_slice(extra);
    let mut cmd = cli(sim, None, home, &args);
    // The refusal must be seen however loaded the machine is: the first connection to a
    // destination waits up to 5 s for it (the default is 500 ms); successes that carry
    // data from the destination are answered as soon as it comes.
    cmd.env("SSM_PLUGIN_SOCKS_VERDICT_MS", "5000");
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let child = cmd.spawn().expect("spawn socks");
    connect_retry(port).await;
    Proxy {
        _child: child,
        port,
    }
}

/// curl through the proxy; the body's sha256 on success.
async fn curl(args: &[String]) -> Option<String> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--fail", "--max-time", "20"]).args(args);
    let out = run_cmd(cmd, T).await;
    out.status.success().then(|| hex(&sha256(&out.stdout)))
}

/// A raw SOCKS5 CONNECT to 127.0.0.1:`port` (IPv4 form); returns the stream and the
/// reply code.
async fn raw_connect(proxy: u16, port: u16) -> (TcpStream, u8) {
    let mut s = TcpStream::connect(("127.0.0.1", proxy))
        .await
        .expect("proxy");
    s.write_all(&[5, 1, 0]).await.unwrap();
    let mut m = [0u8; 2];
    s.read_exact(&mut m).await.unwrap();
    assert_eq!(m, [5, 0], "method selection");
    let mut req = vec![5, 1, 0, 1, 127, 0, 0, 1];
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req).await.unwrap();
    let mut rep = [0u8; 10];
    tokio::time::timeout(T, s.read_exact(&mut rep))
        .await
        .expect("reply in time")
        .expect("reply");
    assert_eq!(rep[0], 5);
    (s, rep[1])
}

fn socks_sessions(sim: &ssm_sim::Simulator) -> Vec<serde_json::Value> {
    start_calls(sim)
        .into_iter()
        .filter(|c| c["DocumentName"] == "AWS-StartPortForwardingSessionToRemoteHost")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks5_with_curl_refusal_and_fifty_concurrent_connects() {
    let sim = start_sim().await;
    let home = TempDir::new("socks");
    let body = Arc::new(random_bytes(1 << 20, 61));
    let web = http_server(body.clone()).await;
    let want = hex(&sha256(&body));
    let p = start_proxy(
        &sim,
        home.path(),
        &format!("127.0.0.1:{}", free_port()),
        &[],
    )
    .await;
    let proxy = format!("127.0.0.1:{}", p.port);

    // A domain name, resolved by the "instance" (the simulator's agent).
    let url = format!("http://localhost:{}/", web.port);
    assert_eq!(
        curl(&["--socks5-hostname".into(), proxy.clone(), url.clone()]).await,
        Some(want.clone()),
        "domain destination"
    );
    // The same destination again: the same session.
    assert_eq!(
        curl(&["--socks5-hostname".into(), proxy.clone(), url.clone()]).await,
        Some(want.clone())
    );
    // An IPv4 destination (curl resolves 127.0.0.1 itself and sends the address).
    let url4 = format!("http://127.0.0.1:{}/", web.port);
    assert_eq!(
        curl(&["--socks5".into(), proxy.clone(), url4.clone()]).await,
        Some(want.clone()),
        "IPv4 destination"
    );
    // HTTP CONNECT on the same listener.
    assert_eq!(
        curl(&[
            "-p".into(),
            "-x".into(),
            format!("http://{proxy}"),
            url.clone()
        ])
        .await,
        Some(want.clone()),
        "HTTP CONNECT"
    );
    let calls = socks_sessions(&sim);
    let hosts: Vec<&str> = calls
        .iter()
        .filter_map(|c| c["Parameters"]["host"][0].as_str())
        .collect();
    assert_eq!(
        hosts.iter().filter(|h| **h == "localhost").count(),
        1,
        "one session per destination, reused: {calls:?}"
    );
    assert_eq!(hosts.iter().filter(|h| **h == "127.0.0.1").count(), 1);

    // A destination nothing listens on: reply 5 (connection refused).
    let refused = free_port();
    let (_s, code) = raw_connect(p.port, refused).await;
    assert_eq!(code, 5, "refused destination");

    // 50 concurrent CONNECTs to an echo server, each with its own bytes.
    let echo = echo_server().await;
    let mut tasks = Vec::new();
    for i in 0..50u64 {
        let (proxy, port) = (p.port, echo.port);
        tasks.push(tokio::spawn(async move {
            let (mut s, code) = raw_connect(proxy, port).await;
            assert_eq!(code, 0, "connection {i}");
            let data = random_bytes(64 * 1024, 100 + i);
            // smux v1 has no half-close (a FIN closes the stream both ways, as with
            // the official plugin): read the echo in full before closing.
            let (mut r, mut w) = s.split();
            let send = w.write_all(&data);
            let mut back = vec![0u8; data.len()];
            let recv = r.read_exact(&mut back);
            let (a, b) = tokio::join!(send, recv);
            a.unwrap();
            b.unwrap();
            assert!(back == data, "connection {i}: echo differs");
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(120), t)
            .await
            .expect("connections done in time")
            .expect("connection task");
    }
    let echo_sessions = socks_sessions(&sim)
        .iter()
        .filter(|c| c["Parameters"]["portNumber"][0] == echo.port.to_string().as_str())
        .count();
    assert_eq!(echo_sessions, 1, "50 connections, one session");
    drop(p);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn username_password_off_loopback() {
    let sim = start_sim().await;
    let home = TempDir::new("socks-auth");
    // Not loopback and no credentials: refused before anything starts.
    let (code, _, err) = output(cli(
        &sim,
        None,
        home.path(),
        &[
            "socks",
            TARGET,
            "--listen",
            &format!("0.0.0.0:{}", free_port()),
        ],
    ))
    .await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--auth"), "{err}");

    let body = Arc::new(random_bytes(100_000, 62));
    let web = http_server(body.clone()).await;
    let want = hex(&sha256(&body));
    let p = start_proxy(
        &sim,
        home.path(),
        &format!("0.0.0.0:{}", free_port()),
        &["--auth", "alice:s3cret"],
    )
    .await;
    let proxy = format!("127.0.0.1:{}", p.port);
    let url = format!("http://localhost:{}/", web.port);
    assert_eq!(
        curl(&[
            "--socks5-hostname".into(),
            proxy.clone(),
            "--proxy-user".into(),
            "alice:s3cret".into(),
            url.clone()
        ])
        .await,
        Some(want.clone())
    );
    assert_eq!(
        curl(&[
            "--socks5-hostname".into(),
            proxy.clone(),
            "--proxy-user".into(),
            "alice:wrong".into(),
            url.clone()
        ])
        .await,
        None,
        "wrong password accepted"
    );
    assert_eq!(
        curl(&["--socks5-hostname".into(), proxy.clone(), url.clone()]).await,
        None,
        "no credentials accepted"
    );
    // HTTP CONNECT needs them too.
    assert_eq!(
        curl(&[
            "-p".into(),
            "-x".into(),
            format!("http://alice:s3cret@{proxy}"),
            url.clone()
        ])
        .await,
        Some(want)
    );
    drop(p);
}

/// `socks --sessions 3`: one destination's connections spread over three sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks_pools_a_destination_over_several_sessions() {
    let sim = start_sim().await;
    let home = TempDir::new("socks-pool");
    let echo = echo_server().await;
    let p = start_proxy(
        &sim,
        home.path(),
        &format!("127.0.0.1:{}", free_port()),
        &["--sessions", "3"],
    )
    .await;
    let mut tasks = Vec::new();
    for i in 0..12u64 {
        let (proxy, port) = (p.port, echo.port);
        tasks.push(tokio::spawn(async move {
            let (mut s, code) = raw_connect(proxy, port).await;
            assert_eq!(code, 0, "connection {i}");
            let data = random_bytes(256 * 1024, 200 + i);
            let (mut r, mut w) = s.split();
            let mut back = vec![0u8; data.len()];
            let (a, b) = tokio::join!(w.write_all(&data), r.read_exact(&mut back));
            a.unwrap();
            b.unwrap();
            assert!(back == data, "connection {i}: echo differs");
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(120), t)
            .await
            .expect("connections done in time")
            .expect("connection task");
    }
    let ids = sim.session_ids();
    assert_eq!(ids.len(), 3, "three sessions for the destination: {ids:?}");
    for id in &ids {
        let s = sim.stats(id).expect("stats");
        assert!(
            s.input_payload_bytes >= 256 * 1024,
            "{id} carried {} bytes: the connections were not spread",
            s.input_payload_bytes
        );
    }
    drop(p);
}
