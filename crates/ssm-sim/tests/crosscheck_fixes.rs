//! Regression tests for the simulator bugs and divergences found by the cross-check against
//! the official session-manager-plugin (see CROSSCHECK.md, items A–G).

mod common;

use std::time::Duration;

use common::{api_call, bulk_server, pattern, Client, ConnectOpts, Event};
use serde_json::json;
use ssm_sim::{SimConfig, Simulator, StartSessionRequest};
use ssm_wire::smux::{Mux, MuxConfig, MuxEvent, Role};
use ssm_wire::PayloadType;
use tokio::time::Instant;

const T: Duration = Duration::from_secs(10);

async fn sim(cfg: SimConfig) -> Simulator {
    Simulator::start(cfg).await.expect("simulator")
}

/// A: the official plugin sends its keepalive ping right after the upgrade, often before
/// the OpenDataChannelInput text frame. The gateway must skip control frames.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_accepts_a_ping_before_open_data_channel_input() {
    let sim = sim(SimConfig::default()).await;
    let resp = sim
        .start_session(StartSessionRequest::non_interactive_command("echo pinged"))
        .unwrap();
    let opts = ConnectOpts {
        ping_first: true,
        ..Default::default()
    };
    let mut c = Client::connect_opts(&resp.stream_url, &resp.token_value, opts).await;
    c.handshake().await;
    let (payloads, output) = c.collect_until_closed(T).await;
    assert_eq!(output, "");
    let out: Vec<u8> = payloads
        .iter()
        .filter(|(p, _)| *p == PayloadType::Output)
        .flat_map(|(_, b)| b.to_vec())
        .collect();
    assert_eq!(out, b"pinged\n");
    let s = sim.stats(&resp.session_id).unwrap();
    assert_eq!((s.ws_connections, s.ws_rejected), (1, 0));
}

/// B: a client that stops reading must make the agent stop reading its target, not make
/// it discard frames (which then trickle back one per 100 ms through the head-only
/// resend path). No impairment is configured, so nothing may be lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_never_drops_frames_when_the_client_reads_slowly() {
    const LEN: usize = 24 << 20;
    let port = bulk_server(LEN).await;
    let sim = sim(SimConfig {
        // A window well above the link queue, as with small mux messages.
        max_unacked_bytes: 64 << 20,
        close_drain_timeout: Duration::from_secs(30),
        ..Default::default()
    })
    .await;
    let resp = sim.start_session(StartSessionRequest::ssh(port)).unwrap();
    let opts = ConnectOpts {
        recv_buffer: Some(32 * 1024),
        ..Default::default()
    };
    let mut c = Client::connect_opts(&resp.stream_url, &resp.token_value, opts).await;
    c.handshake().await;
    // Stop reading while the target pours data in.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut got = Vec::with_capacity(LEN);
    let deadline = Instant::now() + Duration::from_secs(60);
    while got.len() < LEN {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.next_event(left).await {
            Some(Event::Payload(PayloadType::Output, b)) => got.extend_from_slice(&b),
            other => {
                let s = sim.stats(&resp.session_id).unwrap();
                panic!(
                    "unexpected {other:?} after {} bytes; unsent {}, retransmissions {}",
                    got.len(),
                    s.agent_frames_unsent,
                    s.retransmissions
                );
            }
        }
    }
    assert!(got == pattern(LEN), "stream corrupted");
    let s = sim.stats(&resp.session_id).unwrap();
    assert_eq!(s.agent_frames_unsent, 0, "frames were discarded");
    // Only the head-only RTO resends while the client was not acking (~1 per 100-200 ms),
    // not a gap refilled message by message.
    assert!(
        s.retransmissions < 40,
        "{} retransmissions",
        s.retransmissions
    );
}

/// C: the agent reads its smux pipe as a byte stream in reads of at most 1024 bytes, so a
/// bulk download is about one message per KiB, not 1024 + 8 byte pairs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mux_output_is_cut_from_a_merged_byte_stream() {
    const LEN: usize = 512 * 1024;
    let port = bulk_server(LEN).await;
    for delay_ms in [0u64, 1] {
        let sim = sim(SimConfig {
            agent_chunk_delay: Duration::from_millis(delay_ms),
            ..Default::default()
        })
        .await;
        let resp = sim
            .start_session(StartSessionRequest::port_forwarding(port, 0))
            .unwrap();
        let mut c = Client::connect(&resp.stream_url, &resp.token_value).await;
        c.handshake().await;
        let mut mux = Mux::new(Role::Client, MuxConfig::default());
        let sid = mux.open_stream().unwrap();
        while let Some(chunk) = mux.poll_output_max(1024) {
            c.send(PayloadType::Output, &chunk).await;
        }
        let mut data = Vec::new();
        let mut sizes = Vec::new();
        'outer: loop {
            match c.next_event(T).await {
                Some(Event::Payload(PayloadType::Output, b)) => {
                    sizes.push(b.len());
                    mux.feed(&b).unwrap();
                    while let Some(ev) = mux.poll_event() {
                        match ev {
                            MuxEvent::Data(s, d) if s == sid => data.extend_from_slice(&d),
                            MuxEvent::Closed(s) if s == sid => break 'outer,
                            _ => {}
                        }
                    }
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(data == pattern(LEN), "stream corrupted");
        let total: usize = sizes.iter().sum();
        let full = sizes.iter().filter(|n| **n == 1024).count();
        assert!(sizes.iter().all(|n| *n <= 1024), "oversized message");
        // Frame headers add 8 bytes per smux frame; allow a few partial reads.
        let ideal = total.div_ceil(1024);
        eprintln!(
            "delay {delay_ms} ms: {} messages ({full} of 1024 bytes) for {total} smux bytes",
            sizes.len()
        );
        assert!(
            sizes.len() <= ideal + ideal / 10 + 4,
            "delay {delay_ms} ms: {} messages for {total} bytes ({full} full)",
            sizes.len()
        );
        sim.terminate_session(&resp.session_id).unwrap();
    }
}

/// D: the real agent hands the HandshakeResponse to its handshake goroutine and acks it on
/// the receive path at once; HandshakeComplete follows from the other goroutine. The sim
/// acks first (and can be told to use the late order).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_response_is_acked_before_handshake_complete() {
    let (port, _) = common::echo_server().await;
    for (late, expected) in [
        (
            false,
            ["output_stream_data", "acknowledge", "output_stream_data"],
        ),
        (
            true,
            ["output_stream_data", "output_stream_data", "acknowledge"],
        ),
    ] {
        let sim = sim(SimConfig {
            ack_handshake_after_complete: late,
            ..Default::default()
        })
        .await;
        let resp = sim.start_session(StartSessionRequest::ssh(port)).unwrap();
        let mut c = Client::connect(&resp.stream_url, &resp.token_value).await;
        c.handshake().await;
        // Let the ack arrive in the late case.
        let _ = c.next_event(Duration::from_millis(300)).await;
        assert_eq!(c.first_frame_types[..3], expected, "late = {late}");
    }
}

/// E: after a reconnect the agent resends its unacked messages head-first at its normal
/// pace (here the real agent's 1 ms per message), never in one burst and never dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_resends_unacked_messages_paced_not_in_one_burst() {
    const LEN: usize = 500 * 1024;
    let port = bulk_server(LEN).await;
    let sim = sim(SimConfig {
        agent_chunk_delay: Duration::from_millis(1),
        close_drain_timeout: Duration::from_secs(30),
        ..Default::default()
    })
    .await;
    let resp = sim.start_session(StartSessionRequest::ssh(port)).unwrap();
    let mut c = Client::connect(&resp.stream_url, &resp.token_value).await;
    c.handshake().await;
    // Do not read (nor ack) while the agent sends everything, then drop the socket.
    let sent_all = Instant::now() + Duration::from_secs(20);
    while sim.stats(&resp.session_id).unwrap().output_payload_bytes < LEN as u64 {
        assert!(Instant::now() < sent_all, "the agent did not send the data");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = sim.stats(&resp.session_id).unwrap();
    let unacked = before.stream_messages_sent - 2;
    assert!(unacked >= 400, "{unacked}");
    let (status, r) = api_call(
        &sim.endpoint_url(),
        "AmazonSSM.ResumeSession",
        &json!({"SessionId": resp.session_id}),
    )
    .await;
    assert_eq!(status, 200);
    let start = Instant::now();
    c.reconnect(
        r["StreamUrl"].as_str().unwrap(),
        r["TokenValue"].as_str().unwrap(),
    )
    .await;
    let mut got = Vec::new();
    let mut in_first_100ms = 0usize;
    while got.len() < LEN {
        match c.next_event(T).await {
            Some(Event::Payload(PayloadType::Output, b)) => {
                if start.elapsed() < Duration::from_millis(100) {
                    in_first_100ms += 1;
                }
                got.extend_from_slice(&b);
            }
            other => panic!("unexpected {other:?} after {} bytes", got.len()),
        }
    }
    let took = start.elapsed();
    eprintln!("{unacked} unacked resent in {took:?}, {in_first_100ms} within 100 ms");
    assert!(got == pattern(LEN), "stream corrupted");
    assert!(
        in_first_100ms <= 150,
        "{in_first_100ms} of {unacked} messages within 100 ms of the reconnect"
    );
    assert!(
        took >= Duration::from_millis(unacked / 2),
        "{unacked} messages resent in {took:?}"
    );
    let s = sim.stats(&resp.session_id).unwrap();
    assert!(s.retransmissions >= unacked, "{}", s.retransmissions);
    assert_eq!(s.agent_frames_unsent, 0);
}

/// F: session ids must not repeat across simulator instances (the official plugin names
/// its mux socket after the id and leaks it when killed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_ids_differ_across_simulators() {
    let a = sim(SimConfig::default()).await;
    let b = sim(SimConfig::default()).await;
    let ia = a.start_session(StartSessionRequest::shell()).unwrap();
    let ib = b.start_session(StartSessionRequest::shell()).unwrap();
    assert_ne!(ia.session_id, ib.session_id);
    assert!(ia.session_id.starts_with("sim-") && ia.session_id.len() == 21);
    // Tokens stay a function of the seed.
    assert_eq!(ia.token_value, ib.token_value);
}

/// G: `ssm-sim demo --no-tls` serves plain http/ws and does not set AWS_CA_BUNDLE, so it
/// can drive a plugin that trusts only the system roots.
#[test]
fn demo_no_tls_uses_plain_http_and_ws() {
    let dir = std::env::temp_dir().join(format!("ssm-sim-demo-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let plugin = dir.join("fake-plugin");
    let record = dir.join("record");
    std::fs::write(
        &plugin,
        format!(
            "#!/bin/sh\nprintf '%s\\n%s\\n%s\\n' \"$6\" \"${{AWS_CA_BUNDLE-unset}}\" \"$AWS_SSM_START_SESSION_RESPONSE\" > '{}'\n",
            record.display()
        ),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_ssm-sim"))
        .args(["demo", "--no-tls", "--plugin"])
        .arg(&plugin)
        .status()
        .unwrap();
    let rec = std::fs::read_to_string(&record).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(status.success(), "{status:?}");
    let lines: Vec<&str> = rec.lines().collect();
    assert!(lines[0].starts_with("http://127.0.0.1:"), "{rec}");
    assert_eq!(lines[1], "unset");
    assert!(
        lines[2].contains("\"StreamUrl\": \"ws://127.0.0.1:"),
        "{rec}"
    );
}
