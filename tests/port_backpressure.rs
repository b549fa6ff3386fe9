//! A local client that stops reading: end to end through the built plugin, against
//! ssm-sim, with real TCP clients. smux v1 has no per-stream window, so such a client can
//! only be absorbed; these tests prove it is absorbed up to its bound without holding back
//! any other connection, and that accepting and signals keep working past the bound.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use ssm_sim::{SimConfig, StartSessionRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const START: Duration = Duration::from_secs(30);
const MIB: usize = 1024 * 1024;

/// A target that floods `flood` bytes on connections whose first line is `flood`, and
/// echoes every other connection.
async fn flood_or_echo_server(flood: usize) -> (u16, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = l.local_addr().unwrap().port();
    let conns = Arc::new(AtomicUsize::new(0));
    let counted = conns.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut first = [0u8; 6];
                if s.read_exact(&mut first).await.is_err() {
                    return;
                }
                if &first == b"flood\n" {
                    let chunk = vec![0x5au8; 64 * 1024];
                    let mut sent = 0;
                    while sent < flood {
                        let n = chunk.len().min(flood - sent);
                        if s.write_all(&chunk[..n]).await.is_err() {
                            return;
                        }
                        sent += n;
                    }
                    std::future::pending::<()>().await;
                } else {
                    let _ = s.write_all(&first).await;
                    let (mut r, mut w) = s.into_split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    (port, conns)
}

/// Peak resident memory of a process (VmHWM), in bytes.
fn peak_rss(pid: i32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        .map_or(0, |kb| kb * 1024)
}

async fn echo_once(port: u16, data: &[u8]) -> Vec<u8> {
    let mut c = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    c.write_all(b"echo!\n").await.unwrap();
    c.write_all(data).await.unwrap();
    let mut got = vec![0u8; 6 + data.len()];
    c.read_exact(&mut got).await.expect("echo reply");
    got.split_off(6)
}

/// While one client has megabytes waiting that it never reads, another connection echoes;
/// once a second stalled client pushes the session past its bound, new connections are
/// still accepted and SIGINT still ends the session at once; memory stays within the
/// bounds throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_local_reader_holds_back_no_other_connection() {
    let sim = start_sim().await;
    let flood = 12 * MIB;
    let (target, target_conns) = flood_or_echo_server(flood).await;
    let req = StartSessionRequest::port_forwarding(target, 0);
    let mut p = start_plugin(
        &sim,
        &req,
        Some(SimConfig::default()),
        &[
            ("SSM_PLUGIN_PACKETS_PER_SECOND", "0"),
            ("SSM_PLUGIN_CONNECTION_BUFFER", &(16 * MIB).to_string()),
            ("SSM_PLUGIN_SESSION_BUFFER", &(24 * MIB).to_string()),
        ],
        false,
    );
    let id = p.session_id.clone();
    p.expect_stdout("Waiting for connections...\n", START).await;
    let port = parse_opened_port(&p.stdout.text()).expect("port");

    // A asks for 12 MiB and never reads.
    let mut a = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    a.write_all(b"flood\n").await.unwrap();
    // The agent has sent all of it: the plugin took it (it is under A's bound).
    let sent = poll_until(START, || {
        let s = sim.stats(&id)?;
        (s.output_payload_bytes >= flood as u64).then_some(())
    })
    .await;
    assert!(sent.is_some(), "the flood never left the agent{}", p.dump());
    // Another connection is not held back.
    let data = random_bytes(256 * 1024, 7);
    let got = tokio::time::timeout(START, echo_once(port, &data))
        .await
        .unwrap_or_else(|_| panic!("echo held back by the stalled reader{}", p.dump()));
    assert_eq!(sha256(&got), sha256(&data));

    // C asks for 12 MiB more and never reads: together past the session bound of 24 MiB
    // (some of it sits in the kernel's socket buffers), so Output stops being taken.
    let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    c.write_all(b"flood\n").await.unwrap();
    let before = target_conns.load(Ordering::SeqCst);
    // New connections are still accepted and reach the target.
    let _d = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let reached = poll_until(START, || {
        (target_conns.load(Ordering::SeqCst) > before).then_some(())
    })
    .await;
    assert!(
        reached.is_some(),
        "a new connection was not accepted{}",
        p.dump()
    );

    let rss = peak_rss(p.pid);
    p.signal(libc::SIGINT);
    let status = p.wait_exit(START).await;
    let out = p.stdout.text();
    assert!(
        out.contains("Terminate signal received, exiting.\n"),
        "SIGINT not handled{}",
        p.dump()
    );
    assert_eq!(status.code(), Some(0), "exit status{}", p.dump());
    // 24 MiB of downloads at most, plus the runtime, TLS and channel buffers.
    assert!(
        rss < 80 * MIB,
        "peak RSS {} MiB is over the bound{}",
        rss / MIB,
        p.dump()
    );
    drop((a, c));
}
