//! The data channel end to end (issue 3 "Done when"): the built plugin over TLS against
//! ssm-sim with loss, reordering, duplication and latency; payload integrity by sha256
//! both ways; the packet budget against the gateway's cap; malformed and quirky frames; a
//! dropped WebSocket.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ssm_sim::{DropTrigger, DropWebSocket, RetransmitPolicy, SimConfig, StartSessionRequest};
use tokio::io::AsyncWriteExt;

const START: Duration = Duration::from_secs(20);
/// ssm-wire's ChannelConfig default pacing burst (crates/ssm-wire/src/channel.rs).
const BURST: u32 = 16;
/// The OpenDataChannel text frame counts in the gateway's window but is not paced.
const OPEN_FRAMES: u32 = 1;
/// The gateway counts frames when they arrive, after TCP/TLS/WebSocket buffering, so a
/// few frames sent just before a window boundary can land just after it.
const ARRIVAL_JITTER: u32 = 5;

fn starting_line(id: &str) -> String {
    format!("\nStarting session with SessionId: {id}\n")
}

/// Streams `up` into the plugin's stdin while collecting `down_len` bytes of stdout after
/// the starting line; closes stdin only after the download is complete (stdin EOF ends a
/// stdio session). Returns (downloaded bytes, elapsed).
async fn stream_both_ways(
    sim: &ssm_sim::Simulator,
    p: &mut PluginProc,
    up: Arc<Vec<u8>>,
    down_len: usize,
    timeout: Duration,
) -> (Vec<u8>, Duration) {
    let prefix_len = starting_line(&p.session_id).len();
    p.expect_stdout(&starting_line(&p.session_id), START).await;
    let mut stdin = p.stdin.take().expect("stdin");
    let t0 = Instant::now();
    let writer = tokio::spawn(async move {
        for c in up.chunks(64 * 1024) {
            if stdin.write_all(c).await.is_err() {
                return None;
            }
        }
        let _ = stdin.flush().await;
        Some(stdin)
    });
    let want = prefix_len + down_len;
    if let Err(e) = p
        .stdout
        .wait_until(timeout, "the whole download", |b| b.len() >= want)
        .await
    {
        panic!(
            "{e} (got {} bytes){}--- sim stats: {:?}",
            p.stdout.len(),
            p.dump(),
            sim.stats(&p.session_id)
        );
    }
    let elapsed = t0.elapsed();
    let stdin = tokio::time::timeout(timeout, writer)
        .await
        .expect("stdin written")
        .expect("writer task");
    drop(stdin);
    let out = p.stdout.bytes();
    (out[prefix_len..].to_vec(), elapsed)
}

/// 20 MiB each way under 2% loss, 2% reordering, 1% duplication and latency, with a
/// packet budget of 20 000/s and the gateway cap just above it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossy_20mib_each_way_within_packet_budget() {
    const N: usize = 20 << 20;
    const BUDGET: u32 = 20_000;
    let t_start = Instant::now();
    let sim = start_sim().await;
    let up = Arc::new(random_bytes(N, 31));
    let down = Arc::new(random_bytes(N, 32));
    let (target, mut results) = sink_source_server(N as u64, down.clone()).await;
    let cfg = SimConfig {
        loss: 0.02,
        reorder: 0.02,
        duplicate: 0.01,
        latency: Duration::from_millis(3),
        pps_cap: Some(BUDGET + BURST + OPEN_FRAMES + ARRIVAL_JITTER),
        // The real agent resends only the oldest unacked message per 100 ms tick; at 2%
        // loss that caps the download near 10 losses/s. Resending every expired message
        // keeps the agent from being the bottleneck of a 20 MiB test.
        retransmit: RetransmitPolicy::AllExpired,
        // ...and a window like the plugin's own, so that resending every expired message
        // does not flood the link (the sim's RTO has no back-off).
        max_unacked_messages: 512,
        max_unacked_bytes: 512 << 10,
        ..SimConfig::default()
    };
    let req = StartSessionRequest::ssh(target.port);
    let mut p = start_plugin(
        &sim,
        &req,
        Some(cfg),
        &[
            ("SSM_PLUGIN_PACKETS_PER_SECOND", &BUDGET.to_string()),
            // The strict policy, every frame within the budget: this agent is not
            // paused between chunks, so charged acks alone would exceed the budget
            // (and this cap) when the download outruns it.
            ("SSM_PLUGIN_ACK_PACING", "paced"),
        ],
        true,
    );
    let id = p.session_id.clone();
    eprintln!("setup {:?}", t_start.elapsed());
    let (got, elapsed) =
        stream_both_ways(&sim, &mut p, up.clone(), N, Duration::from_secs(100)).await;
    eprintln!("20 MiB down (and up) in {elapsed:?}");
    assert!(got.len() == N, "download length {}", got.len());
    assert_eq!(hex(&sha256(&got)), hex(&sha256(&down)), "download sha256");
    let t1 = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(60), results.recv())
        .await
        .expect("upload complete at the target")
        .expect("sink result");
    eprintln!("upload complete {:?} after the download", t1.elapsed());
    assert_eq!(r.bytes, N as u64, "upload length");
    assert_eq!(hex(&r.sha256), hex(&sha256(&up)), "upload sha256");
    let t2 = Instant::now();
    let status = p.wait_exit(Duration::from_secs(20)).await;
    eprintln!("plugin exited {:?} after stdin EOF", t2.elapsed());
    assert_eq!(status.code(), Some(0), "{}", p.dump());
    assert_eq!(p.stdout.len(), starting_line(&id).len() + N);
    let s = sim.stats(&id).unwrap();
    eprintln!(
        "stats: client_frames {} max_pps {} lost {} dup {} reordered {} retrans(agent) {} dup_rx {} ooo_rx {} ws {}",
        s.client_frames,
        s.max_client_frames_per_sec,
        s.netem_lost,
        s.netem_duplicated,
        s.netem_reordered,
        s.retransmissions,
        s.duplicates_received,
        s.out_of_order_received,
        s.ws_connections
    );
    assert_eq!(s.pps_cap_violations, 0, "gateway cap exceeded");
    assert!(
        s.max_client_frames_per_sec <= BUDGET + BURST + OPEN_FRAMES + ARRIVAL_JITTER,
        "max {} frames/s over the budget {BUDGET}",
        s.max_client_frames_per_sec
    );
    assert_eq!(s.ws_connections, 1, "no reconnects were needed");
    assert!(s.netem_lost > 0 && s.netem_reordered > 0 && s.netem_duplicated > 0);
    assert!(
        s.duplicates_received > 0,
        "the plugin retransmitted lost frames"
    );
    assert!(s.retransmissions > 0, "the agent retransmitted lost frames");
    eprintln!("total {:?}", t_start.elapsed());
}

/// A lost frame while the agent has more than the plugin's receive bound (4 MiB) in
/// flight behind it: the retransmitted frame must still be accepted, or the reorder buffer
/// can never drain. The real agent's window is 100 000 messages, as is the sim's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_frame_behind_a_large_agent_window_is_recovered() {
    const N: usize = 12 << 20;
    let sim = start_sim().await;
    let down = Arc::new(random_bytes(N, 35));
    let (target, _results) = sink_source_server(0, down.clone()).await;
    let cfg = SimConfig {
        loss: 0.002,
        // The real agent resends only its oldest unacknowledged message per 100 ms tick,
        // which makes any recovery crawl; resend every expired one instead.
        retransmit: RetransmitPolicy::AllExpired,
        ..SimConfig::default()
    };
    let req = StartSessionRequest::ssh(target.port);
    let mut p = start_plugin(
        &sim,
        &req,
        Some(cfg),
        &[("SSM_PLUGIN_PACKETS_PER_SECOND", "20000")],
        true,
    );
    let (got, elapsed) = stream_both_ways(
        &sim,
        &mut p,
        Arc::new(Vec::new()),
        N,
        Duration::from_secs(30),
    )
    .await;
    eprintln!("12 MiB down with 0.2% loss in {elapsed:?}");
    assert!(got == *down, "download corrupted");
    let s = sim.stats(&p.session_id).unwrap();
    assert!(s.netem_lost > 0, "something was lost");
    let status = p.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0), "{}", p.dump());
}

/// The default budget (950 packets/s, burst 16) stays under a 1000/s gateway cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_budget_stays_under_gateway_cap() {
    const N: usize = 2 << 20;
    let sim = start_sim().await;
    let up = Arc::new(random_bytes(N, 41));
    let (target, mut results) = sink_source_server(N as u64, Arc::new(Vec::new())).await;
    let cfg = SimConfig {
        pps_cap: Some(1000),
        latency: Duration::from_millis(2),
        ..SimConfig::default()
    };
    let req = StartSessionRequest::ssh(target.port);
    let mut p = start_plugin(&sim, &req, Some(cfg), &[], true);
    let id = p.session_id.clone();
    p.expect_stdout(&starting_line(&id), START).await;
    let mut stdin = p.stdin.take().expect("stdin");
    let t0 = Instant::now();
    for c in up.chunks(64 * 1024) {
        tokio::time::timeout(Duration::from_secs(30), stdin.write_all(c))
            .await
            .expect("stdin accepted")
            .expect("write stdin");
    }
    drop(stdin);
    let status = p.wait_exit(Duration::from_secs(30)).await;
    let elapsed = t0.elapsed();
    let s = sim.stats(&id).unwrap();
    eprintln!(
        "2 MiB up at the default budget in {elapsed:?}; max {} frames/s",
        s.max_client_frames_per_sec
    );
    assert_eq!(status.code(), Some(0), "{}", p.dump());
    assert_eq!(s.pps_cap_violations, 0, "gateway cap exceeded");
    assert!(
        s.max_client_frames_per_sec <= 950 + BURST + OPEN_FRAMES + ARRIVAL_JITTER,
        "max {} frames/s",
        s.max_client_frames_per_sec
    );
    // That the budget is used (not only respected) is a rate over wall-clock time, which a
    // loaded machine lowers: ssm-wire's `pacing_never_exceeds_the_packet_budget` proves it
    // on explicit time, and the benchmark measures it.
    let r = tokio::time::timeout(Duration::from_secs(10), results.recv())
        .await
        .expect("sink result")
        .expect("sink result");
    assert_eq!(r.bytes, N as u64);
    assert_eq!(r.sha256, sha256(&up));
}

/// The realistic profile (20 ms each way, the gateway's 1000 client frames per sliding
/// second, an agent that pauses 1 ms after each chunk it reads) with the default
/// acknowledgement policy (charged: acks never wait for the pacer but use its budget):
/// 2 MiB each way at the same time, the case where acks and data compete, and not one
/// cap violation. Issue 15, item 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn realistic_profile_both_ways_with_default_ack_policy_never_trips_the_cap() {
    const N: usize = 2 << 20;
    let sim = start_sim().await;
    let up = Arc::new(random_bytes(N, 51));
    let down = Arc::new(random_bytes(N, 52));
    let (target, mut results) = sink_source_server(N as u64, down.clone()).await;
    let cfg = SimConfig {
        latency: Duration::from_millis(20),
        pps_cap: Some(1000),
        agent_chunk_delay: Duration::from_millis(1),
        ..SimConfig::default()
    };
    let req = StartSessionRequest::ssh(target.port);
    let mut p = start_plugin(&sim, &req, Some(cfg), &[], true);
    let id = p.session_id.clone();
    let (got, elapsed) =
        stream_both_ways(&sim, &mut p, up.clone(), N, Duration::from_secs(120)).await;
    assert!(got == *down, "download corrupted");
    let r = tokio::time::timeout(Duration::from_secs(120), results.recv())
        .await
        .expect("upload complete at the target")
        .expect("sink result");
    assert_eq!(r.bytes, N as u64, "upload length");
    assert_eq!(hex(&r.sha256), hex(&sha256(&up)), "upload sha256");
    let status = p.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0), "{}", p.dump());
    let s = sim.stats(&id).unwrap();
    eprintln!(
        "realistic, 2 MiB both ways: download in {elapsed:?}; client frames {} max {}/s, agent messages {} resent {}",
        s.client_frames, s.max_client_frames_per_sec, s.stream_messages_sent, s.retransmissions
    );
    assert_eq!(s.pps_cap_violations, 0, "gateway cap exceeded");
    assert_eq!(s.ws_connections, 1, "the gateway never closed the socket");
    assert!(
        s.max_client_frames_per_sec <= 1000,
        "max {} client frames/s",
        s.max_client_frames_per_sec
    );
}

/// The default acknowledgement policy never holds an ack back for the pacer: when the
/// last byte of a 16 MiB download from an agent that does not pause has reached the local
/// client, the agent has already received acks for (nearly) every message. With acks
/// paced at 950/s (the old policy) only about a second's worth would have arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_keep_up_with_an_unpaused_download() {
    const N: usize = 16 << 20;
    let sim = start_sim().await;
    let down = Arc::new(random_bytes(N, 53));
    let (target, _results) = sink_source_server(0, down.clone()).await;
    let req = StartSessionRequest::ssh(target.port);
    let mut p = start_plugin(&sim, &req, Some(SimConfig::default()), &[], true);
    let id = p.session_id.clone();
    let (got, elapsed) = stream_both_ways(
        &sim,
        &mut p,
        Arc::new(Vec::new()),
        N,
        Duration::from_secs(120),
    )
    .await;
    let s = sim.stats(&id).unwrap();
    assert!(got == *down, "download corrupted");
    eprintln!(
        "16 MiB down in {elapsed:?}: {} messages, {} acks received by then",
        s.stream_messages_sent, s.acks_received
    );
    assert!(
        s.stream_messages_sent >= (N / 1024) as u64,
        "{} messages",
        s.stream_messages_sent
    );
    // Only acks still on the wire may be missing.
    assert!(
        s.acks_received * 10 >= s.stream_messages_sent * 9,
        "{} of {} messages acknowledged when the download was complete: acks were held back",
        s.acks_received,
        s.stream_messages_sent
    );
    let status = p.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0), "{}", p.dump());
}

/// Corrupted frames (bad digest, truncated, garbage, lying header length) and the quirky
/// start_publication frames never reach the byte stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_quirk_frames_do_not_corrupt_the_stream() {
    const N: usize = 1 << 20;
    let sim = start_sim().await;
    let echo = echo_server().await;
    let cfg = SimConfig {
        malformed_every: Some(5),
        start_publication_quirk: true,
        ..SimConfig::default()
    };
    let req = StartSessionRequest::ssh(echo.port);
    let mut p = start_plugin(
        &sim,
        &req,
        Some(cfg),
        &[("SSM_PLUGIN_PACKETS_PER_SECOND", "5000")],
        true,
    );
    let id = p.session_id.clone();
    let data = Arc::new(random_bytes(N, 51));
    let (got, _) = stream_both_ways(&sim, &mut p, data.clone(), N, Duration::from_secs(60)).await;
    assert!(got == *data, "echo corrupted{}", p.dump());
    let status = p.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0), "{}", p.dump());
    assert_eq!(p.stdout.len(), starting_line(&id).len() + N, "{}", p.dump());
    let s = sim.stats(&id).unwrap();
    assert!(
        s.malformed_injected > 100,
        "injected {}",
        s.malformed_injected
    );
    assert_eq!(
        s.ws_connections, 1,
        "malformed frames must not drop the socket"
    );
}

/// Resident memory of a process (VmRSS), in KiB.
fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A long tunnel, accelerated: the service drops the WebSocket every 2 000 client frames
/// while 20 MiB go up and come back through an echo target, ten reconnects or more.
/// Nothing is lost, and resident memory does not grow from one reconnect to the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_many_reconnects_lose_nothing_and_memory_stays_flat() {
    const N: usize = 20 << 20;
    let sim = start_sim().await;
    let echo = echo_server().await;
    let cfg = SimConfig {
        drop_websocket_after: Some(DropWebSocket {
            trigger: DropTrigger::ClientFrames(2_000),
            repeat: true,
        }),
        ..SimConfig::default()
    };
    let req = StartSessionRequest::ssh(echo.port);
    let mut p = start_plugin(
        &sim,
        &req,
        Some(cfg),
        &[("SSM_PLUGIN_PACKETS_PER_SECOND", "20000")],
        true,
    );
    let id = p.session_id.clone();
    let pid = p.pid;
    let data = Arc::new(random_bytes(N, 77));
    let done = std::sync::atomic::AtomicBool::new(false);
    // RSS right after each new WebSocket, sampled while the transfer runs.
    let sample = async {
        let mut seen = 0;
        let mut samples = Vec::new();
        while !done.load(std::sync::atomic::Ordering::SeqCst) {
            let conns = sim.stats(&id).map_or(0, |s| s.ws_connections);
            if conns > seen {
                seen = conns;
                samples.push((conns, rss_kib(pid)));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        samples
    };
    let transfer = async {
        let r = stream_both_ways(&sim, &mut p, data.clone(), N, Duration::from_secs(240)).await;
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        r
    };
    let ((got, elapsed), samples) = tokio::join!(transfer, sample);
    eprintln!("20 MiB each way with reconnects in {elapsed:?}; RSS after each (KiB): {samples:?}");
    assert!(got == *data, "echo corrupted across reconnects{}", p.dump());
    let status = p.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0), "{}", p.dump());
    let s = sim.stats(&id).unwrap();
    assert!(s.ws_dropped >= 10, "only {} drops", s.ws_dropped);
    assert_eq!(s.ws_connections, s.ws_dropped + 1);
    // Flat: the later reconnects hold no more than the early ones plus a few buffers.
    let later: Vec<u64> = samples.iter().skip(3).map(|(_, r)| *r).collect();
    let early = samples.get(2).map_or(0, |(_, r)| *r);
    let max_later = later.iter().copied().max().unwrap_or(0);
    assert!(
        later.len() >= 5 && max_later <= early + 8 * 1024,
        "RSS grows across reconnects: {samples:?}"
    );
}

/// The gateway drops the WebSocket mid-transfer (no close frame): the plugin resumes
/// through ResumeSession on the SSM endpoint and the stream continues intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_websocket_resumes_intact() {
    const N: usize = 1 << 20;
    let sim = start_sim().await;
    let echo = echo_server().await;
    let cfg = SimConfig {
        drop_websocket_after: Some(DropWebSocket::after_frames(300)),
        resume_changes_cell: true,
        ..SimConfig::default()
    };
    let req = StartSessionRequest::ssh(echo.port);
    let mut p = start_plugin(
        &sim,
        &req,
        Some(cfg),
        &[("SSM_PLUGIN_PACKETS_PER_SECOND", "5000")],
        true,
    );
    let id = p.session_id.clone();
    let data = Arc::new(random_bytes(N, 61));
    let (got, _) = stream_both_ways(&sim, &mut p, data.clone(), N, Duration::from_secs(60)).await;
    assert!(
        got == *data,
        "echo corrupted across the reconnect{}",
        p.dump()
    );
    let status = p.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0), "{}", p.dump());
    let s = sim.stats(&id).unwrap();
    assert_eq!(s.ws_dropped, 1);
    assert!(s.resume_calls >= 1, "ResumeSession was called");
    assert_eq!(s.ws_connections, 2, "one reconnect");
    let resume = sim
        .api_calls()
        .into_iter()
        .find(|c| c.target == "AmazonSSM.ResumeSession")
        .expect("a ResumeSession API call");
    assert!(
        resume
            .header("authorization")
            .is_some_and(|a| a.starts_with("AWS4-HMAC-SHA256 ")),
        "ResumeSession is SigV4-signed: {:?}",
        resume.headers
    );
}
