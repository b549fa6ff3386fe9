//! `forward … --sessions N` (issue 15, item 1): one listener, several sessions to the same
//! target and document, each new connection on the least-loaded one.

mod common;
mod standalone;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use ssm_sim::{DropWebSocket, SimConfig};
use standalone::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// A pool of 4 in the realistic agent's pace with the gateway's cap on every session: 16
/// concurrent downloads with sha256 spread over all four, every session's first
/// WebSocket dropped mid-way and resumed, nothing lost, no cap violation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_of_four_spreads_sixteen_transfers_and_survives_drops() {
    const N: usize = 16;
    const SIZE: usize = 512 << 10;
    let sim = start_sim_with(SimConfig {
        pps_cap: Some(1000),
        agent_chunk_delay: Duration::from_millis(1),
        // Each session's first WebSocket, after 200 client frames (its downloads are
        // about 2000 acks): mid-way through the transfers.
        drop_websocket_after: Some(DropWebSocket::after_frames(200)),
        ..SimConfig::default()
    })
    .await;
    let home = TempDir::new("pool");
    let body = Arc::new(random_bytes(SIZE, 71));
    let web = http_server(body.clone()).await;
    let want = hex(&sha256(&body));
    let lp = free_port();
    let spec = format!("{lp}:{}", web.port);
    let mut cmd = cli(
        &sim,
        None,
        home.path(),
        &["forward", TARGET, "-L", &spec, "--sessions", "4"],
    );
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let mut child = cmd.spawn().expect("spawn forward");
    let pid = child.id().expect("pid") as i32;
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let opened = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(l) = lines.next_line().await.expect("stdout") {
            if l.starts_with(&format!("Port {lp} opened for sessionId ")) {
                return l;
            }
        }
        panic!("forward ended before its port opened");
    })
    .await
    .expect("port opened");
    assert!(opened.contains("a pool of up to 4 sessions"), "{opened}");

    let mut tasks = Vec::new();
    for _ in 0..N {
        tasks.push(tokio::spawn(async move {
            let mut c = Command::new("curl");
            c.args(["-sS", "--fail", "--max-time", "120"])
                .arg(format!("http://127.0.0.1:{lp}/"));
            let out = run_cmd(c, Duration::from_secs(150)).await;
            assert!(
                out.status.success(),
                "curl: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            hex(&sha256(&out.stdout))
        }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("curl task"), want, "a download differs");
    }

    let ids = sim.session_ids();
    assert_eq!(ids.len(), 4, "four sessions: {ids:?}");
    for id in &ids {
        let s = sim.stats(id).expect("stats");
        eprintln!(
            "{id}: {} bytes down, {} websockets, max {} client frames/s, {} violations",
            s.output_payload_bytes,
            s.ws_connections,
            s.max_client_frames_per_sec,
            s.pps_cap_violations
        );
        assert!(
            s.output_payload_bytes >= SIZE as u64,
            "{id} carried {} bytes: the transfers were not spread",
            s.output_payload_bytes
        );
        assert!(
            s.ws_connections >= 2,
            "{id}: its WebSocket was dropped and resumed"
        );
        assert_eq!(s.pps_cap_violations, 0, "{id}: gateway cap exceeded");
    }
    let total: u64 = ids
        .iter()
        .map(|id| sim.stats(id).unwrap().output_payload_bytes)
        .sum();
    assert!(total >= (N * SIZE) as u64);

    // Ctrl-C ends the pool and its sessions.
    // SAFETY: kill(2) on the child we spawned.
    unsafe { libc::kill(pid, libc::SIGINT) };
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("forward exited")
        .expect("wait");
    assert_eq!(status.code(), Some(0));
}

/// The config file's `sessions` is checked like the flag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_size_is_validated() {
    let sim = start_sim().await;
    let home = TempDir::new("pool-bad");
    let (code, _, err) = output(cli(
        &sim,
        None,
        home.path(),
        &["forward", TARGET, "-L", "0:80", "--sessions", "0"],
    ))
    .await;
    assert_eq!(code, Some(2), "{err}");
    let cfg = home.path().join("c.toml");
    std::fs::write(
        &cfg,
        "[tunnels.t]\ntarget = \"i-0123456789abcdef0\"\nforward = [\"0:80\"]\nsessions = 100\n",
    )
    .unwrap();
    let (code, _, err) = output(cli(
        &sim,
        None,
        home.path(),
        &["tunnel", "t", "--config", cfg.to_str().unwrap()],
    ))
    .await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("tunnels.t.sessions"), "{err}");
}
