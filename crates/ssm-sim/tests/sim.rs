//! End-to-end tests of the simulator, driven by the minimal client in `common`.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{api_call, closed_port, echo_server, Client, Event};
use serde_json::{json, Value};
use ssm_sim::{DropWebSocket, SimConfig, Simulator, StartSessionRequest};
use ssm_wire::payload::Flag;
use ssm_wire::smux::{Mux, MuxConfig, MuxEvent, Role};
use ssm_wire::PayloadType;

const T: Duration = Duration::from_secs(10);

async fn sim(cfg: SimConfig) -> Simulator {
    Simulator::start(cfg).await.expect("simulator")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_interactive_command_returns_stdout_stderr_and_exit_code() {
    let sim = sim(SimConfig::default()).await;
    let resp = sim
        .start_session(StartSessionRequest::non_interactive_command(
            "echo out; echo err >&2; exit 3",
        ))
        .unwrap();
    let mut c = Client::connect(&resp.stream_url, &resp.token_value).await;
    let req = c.handshake().await;
    assert_eq!(req["AgentVersion"], "3.3.987.0");
    assert_eq!(
        req["RequestedClientActions"][0]["ActionParameters"],
        json!({"SessionType": "NonInteractiveCommands", "Properties": null})
    );
    let (payloads, output) = c.collect_until_closed(T).await;
    assert_eq!(output, "");
    let cat = |pt: PayloadType| -> Vec<u8> {
        payloads
            .iter()
            .filter(|(p, _)| *p == pt)
            .flat_map(|(_, b)| b.to_vec())
            .collect()
    };
    assert_eq!(cat(PayloadType::Output), b"out\n");
    assert_eq!(cat(PayloadType::StdErr), b"err\n");
    assert_eq!(payloads.last().unwrap().0, PayloadType::ExitCode);
    assert_eq!(cat(PayloadType::ExitCode), b"EXIT_CODE: 3");
    let stats = sim.wait_closed(&resp.session_id, T).await.unwrap();
    assert_eq!(
        stats.client_version.as_deref(),
        Some(common::CLIENT_VERSION)
    );
    assert_eq!(stats.ws_connections, 1);
    assert_eq!(stats.open_inputs.len(), 1);
    assert_eq!(stats.open_inputs[0].client_id, c.client_id);
    assert!(stats.acks_received >= 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_interrupts_a_non_interactive_command() {
    let sim = sim(SimConfig::default()).await;
    let resp = sim
        .start_session(StartSessionRequest::non_interactive_command(
            "echo ready; sleep 30",
        ))
        .unwrap();
    let mut c = Client::connect(&resp.stream_url, &resp.token_value).await;
    c.handshake().await;
    let (pt, b) = c.expect_payload(T).await;
    assert_eq!((pt, &b[..]), (PayloadType::Output, &b"ready\n"[..]));
    c.send(PayloadType::Output, &[0x03]).await;
    let (payloads, _) = c.collect_until_closed(T).await;
    let exit = payloads.iter().find(|(p, _)| *p == PayloadType::ExitCode);
    assert_eq!(exit.unwrap().1, Bytes::from_static(b"EXIT_CODE: 130"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdio_port_session_round_trips_bytes_and_ends_on_target_eof() {
    let (port, _) = echo_server().await;
    let sim = sim(SimConfig::default()).await;
    let resp = sim.start_session(StartSessionRequest::ssh(port)).unwrap();
    let mut c = Client::connect(&resp.stream_url, &resp.token_value).await;
    let req = c.handshake().await;
    // Port properties: strings, sorted keys, no type => stdio mode on the client.
    let params = &req["RequestedClientActions"][0]["ActionParameters"];
    assert_eq!(params["SessionType"], "Port");
    assert_eq!(
        params["Properties"],
        json!({"portNumber": port.to_string()})
    );
    c.send(PayloadType::Output, b"hello through the tunnel")
        .await;
    let mut got = Vec::new();
    while got.len() < 24 {
        let (pt, b) = c.expect_payload(T).await;
        assert_eq!(pt, PayloadType::Output);
        got.extend_from_slice(&b);
    }
    assert_eq!(got, b"hello through the tunnel");
    assert_eq!(
        sim.stats(&resp.session_id).unwrap().port_mode.as_deref(),
        Some("stdio")
    );
    sim.terminate_session(&resp.session_id).unwrap();
    assert_eq!(c.next_event(T).await, Some(Event::Closed(String::new())));
    assert!(sim.stats(&resp.session_id).unwrap().terminate_called);
}

/// Sends `n` numbered messages through an echo target and checks every byte comes back
/// in order.
async fn echo_many(c: &mut Client, n: usize) {
    let mut expected = Vec::new();
    for i in 0..n {
        let line = format!("message {i:04}|");
        expected.extend_from_slice(line.as_bytes());
        c.send(PayloadType::Output, line.as_bytes()).await;
    }
    let mut got = Vec::new();
    while got.len() < expected.len() {
        match c.next_event(T).await {
            Some(Event::Payload(PayloadType::Output, b)) => got.extend_from_slice(&b),
            other => panic!("unexpected {other:?} after {} bytes", got.len()),
        }
    }
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(&expected)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_and_in_order_delivery_under_loss_duplication_and_reordering() {
    let (port, _) = echo_server().await;
    let sim = sim(SimConfig {
        latency: Duration::from_millis(5),
        loss: 0.05,
        duplicate: 0.1,
        reorder: 0.2,
        seed: 7,
        ..Default::default()
    })
    .await;
    let resp = sim.start_session(StartSessionRequest::ssh(port)).unwrap();
    let mut c = Client::connect(&resp.stream_url, &resp.token_value).await;
    c.handshake().await;
    echo_many(&mut c, 150).await;
    let s = sim.stats(&resp.session_id).unwrap();
    assert!(
        s.netem_lost > 0 && s.netem_duplicated > 0 && s.netem_reordered > 0,
        "{s:?}"
    );
    assert!(
        s.duplicates_received > 0 || s.out_of_order_received > 0,
        "{s:?}"
    );
    assert!(s.retransmissions > 0, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pps_cap_closes_the_websocket() {
    let sim = sim(SimConfig {
        pps_cap: Some(20),
        ..Default::default()
    })
    .await;
    let resp = sim
        .start_session(StartSessionRequest::non_interactive_command("sleep 5"))
        .unwrap();
    let mut c = Client::connect(&resp.stream_url, &resp.token_value).await;
    c.handshake().await;
    for _ in 0..40 {
        c.send(PayloadType::Output, b"x").await;
    }
    loop {
        match c.next_event(T).await {
            Some(Event::Disconnected) => break,
            Some(Event::Payload(..)) => continue,
            other => panic!("expected the socket to close, got {other:?}"),
        }
    }
    let s = sim.stats(&resp.session_id).unwrap();
    assert_eq!(s.pps_cap_violations, 1);
    assert!(s.max_client_frames_per_sec > 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_a_dropped_websocket_continues_the_stream() {
    let (port, _) = echo_server().await;
    let sim = sim(SimConfig {
        drop_websocket_after: Some(DropWebSocket::after_frames(6)),
        resume_changes_cell: true,
        ..Default::default()
    })
    .await;
    let resp = sim.start_session(StartSessionRequest::ssh(port)).unwrap();
    let mut c = Client::connect(&resp.stream_url, &resp.token_value).await;
    c.handshake().await;
    let mut expected = Vec::new();
    for i in 0..20 {
        let line = format!("line {i}|");
        expected.extend_from_slice(line.as_bytes());
        c.send(PayloadType::Output, line.as_bytes()).await;
    }
    let mut got = Vec::new();
    let mut resumed = false;
    while got.len() < expected.len() {
        match c.next_event(T).await {
            Some(Event::Payload(PayloadType::Output, b)) => got.extend_from_slice(&b),
            Some(Event::Disconnected) => {
                assert!(!resumed, "dropped twice");
                resumed = true;
                let (status, r) = api_call(
                    &sim.endpoint_url(),
                    "AmazonSSM.ResumeSession",
                    &json!({"SessionId": resp.session_id}),
                )
                .await;
                assert_eq!(status, 200);
                let token = r["TokenValue"].as_str().unwrap().to_owned();
                let url = r["StreamUrl"].as_str().unwrap().to_owned();
                assert_ne!(token, resp.token_value);
                assert_ne!(url, resp.stream_url, "cell-number changes");
                c.reconnect(&url, &token).await;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(resumed);
    assert_eq!(got, expected);
    let s = sim.stats(&resp.session_id).unwrap();
    assert_eq!((s.ws_connections, s.ws_dropped, s.resume_calls), (2, 1, 1));

    // The old token no longer opens the channel.
    let mut stale = Client::connect(&resp.stream_url, &resp.token_value).await;
    assert_eq!(stale.next_event(T).await, Some(Event::Disconnected));
    assert_eq!(sim.stats(&resp.session_id).unwrap().ws_rejected, 1);
}

/// Feeds Output payloads into a client-side smux session until `pred` holds.
async fn mux_until(
    c: &mut Client,
    mux: &mut Mux,
    mut pred: impl FnMut(&MuxEvent) -> bool,
) -> Vec<MuxEvent> {
    let mut seen = Vec::new();
    loop {
        match c.next_event(T).await {
            Some(Event::Payload(PayloadType::Output, b)) => {
                mux.feed(&b).unwrap();
                while let Some(ev) = mux.poll_event() {
                    let done = pred(&ev);
                    seen.push(ev);
                    if done {
                        return seen;
                    }
                }
            }
            Some(Event::Payload(PayloadType::Flag, b)) => {
                assert_eq!(Flag::decode(&b), Some(Flag::ConnectToPortError));
                seen.push(MuxEvent::Closed(u32::MAX));
                return seen;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

async fn mux_flush(c: &mut Client, mux: &mut Mux) {
    while let Some(chunk) = mux.poll_output_max(1024) {
        c.send(PayloadType::Output, &chunk).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mux_port_forwarding_streams_and_dial_failure() {
    let (port, conns) = echo_server().await;
    let sim = sim(SimConfig::default()).await;
    let resp = sim
        .start_session(StartSessionRequest::port_forwarding(port, 0))
        .unwrap();
    let mut c = Client::connect(&resp.stream_url, &resp.token_value).await;
    let req = c.handshake().await;
    assert_eq!(
        req["RequestedClientActions"][0]["ActionParameters"]["Properties"],
        json!({"localPortNumber": "0", "portNumber": port.to_string(), "type": "LocalPortForwarding"})
    );
    let mut mux = Mux::new(Role::Client, MuxConfig::default());
    let a = mux.open_stream().unwrap();
    let b = mux.open_stream().unwrap();
    let big: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    mux.write(a, &big).unwrap();
    mux.write(b, b"second stream").unwrap();
    mux_flush(&mut c, &mut mux).await;
    let mut got_a = Vec::new();
    let mut got_b = Vec::new();
    mux_until(&mut c, &mut mux, |ev| {
        if let MuxEvent::Data(sid, d) = ev {
            if *sid == a {
                got_a.extend_from_slice(d);
            } else {
                got_b.extend_from_slice(d);
            }
        }
        got_a.len() == big.len() && got_b.len() == 13
    })
    .await;
    assert_eq!(got_a, big);
    assert_eq!(got_b, b"second stream");
    assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 2);
    // Closing one stream leaves the other working.
    mux.close(a).unwrap();
    mux.write(b, b"+more").unwrap();
    mux_flush(&mut c, &mut mux).await;
    let mut more = Vec::new();
    mux_until(&mut c, &mut mux, |ev| {
        if let MuxEvent::Data(sid, d) = ev {
            assert_eq!(*sid, b);
            more.extend_from_slice(d);
        }
        more == b"+more"
    })
    .await;
    assert_eq!(
        sim.stats(&resp.session_id).unwrap().port_mode.as_deref(),
        Some("mux")
    );
    // TerminateSession flag ends the session.
    c.send(PayloadType::Flag, &Flag::TerminateSession.encode())
        .await;
    let (_, output) = c.collect_until_closed(T).await;
    assert_eq!(output, "");

    // A target that speaks first and hangs up: data, then FIN from the agent.
    let greeter = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gport = greeter.local_addr().unwrap().port();
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        while let Ok((mut s, _)) = greeter.accept().await {
            let _ = s.write_all(b"hi and bye").await;
        }
    });
    let resp = sim
        .start_session(StartSessionRequest::port_forwarding(gport, 0))
        .unwrap();
    let mut c = Client::connect(&resp.stream_url, &resp.token_value).await;
    c.handshake().await;
    let mut mux = Mux::new(Role::Client, MuxConfig::default());
    let g = mux.open_stream().unwrap();
    mux_flush(&mut c, &mut mux).await;
    let seen = mux_until(&mut c, &mut mux, |ev| *ev == MuxEvent::Closed(g)).await;
    assert_eq!(
        seen[0],
        MuxEvent::Data(g, Bytes::from_static(b"hi and bye"))
    );

    // A target nobody listens on: ConnectToPortError.
    let dead = closed_port().await;
    let resp = sim
        .start_session(StartSessionRequest::port_forwarding(dead, 0))
        .unwrap();
    let mut c = Client::connect(&resp.stream_url, &resp.token_value).await;
    c.handshake().await;
    let mut mux = Mux::new(Role::Client, MuxConfig::default());
    let s = mux.open_stream().unwrap();
    mux.write(s, b"anyone?").unwrap();
    mux_flush(&mut c, &mut mux).await;
    let seen = mux_until(&mut c, &mut mux, |_| false).await;
    assert_eq!(seen.last(), Some(&MuxEvent::Closed(u32::MAX)));
    mux_until(&mut c, &mut mux, |ev| *ev == MuxEvent::Closed(s)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_port_forwarding_with_an_old_agent_redials_after_disconnect() {
    let (port, conns) = echo_server().await;
    let sim = sim(SimConfig {
        agent_version: "3.0.100.0".into(),
        ..Default::default()
    })
    .await;
    let resp = sim
        .start_session(StartSessionRequest::port_forwarding_to_host(
            "127.0.0.1",
            port,
            0,
        ))
        .unwrap();
    let mut c = Client::connect(&resp.stream_url, &resp.token_value).await;
    let req = c.handshake().await;
    assert_eq!(req["AgentVersion"], "3.0.100.0");
    assert_eq!(
        req["RequestedClientActions"][0]["ActionParameters"]["Properties"]["host"],
        "127.0.0.1"
    );
    c.send(PayloadType::Output, b"one").await;
    assert_eq!(c.expect_payload(T).await.1, Bytes::from_static(b"one"));
    c.send(PayloadType::Flag, &Flag::DisconnectToPort.encode())
        .await;
    c.send(PayloadType::Output, b"two").await;
    assert_eq!(c.expect_payload(T).await.1, Bytes::from_static(b"two"));
    assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 2);
    let s = sim.stats(&resp.session_id).unwrap();
    assert_eq!(s.port_mode.as_deref(), Some("basic"));
    assert_eq!(s.flags_received, vec![1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_session_runs_in_a_pty() {
    let sim = sim(SimConfig::default()).await;
    let resp = sim.start_session(StartSessionRequest::shell()).unwrap();
    let mut c = Client::connect(&resp.stream_url, &resp.token_value).await;
    // No handshake without KMS: the first message is already terminal output.
    c.send_json(PayloadType::Size, &json!({"cols": 123, "rows": 45}))
        .await;
    c.send(PayloadType::Output, b"stty size; echo $((6*7))x; tty\r")
        .await;
    let mut screen = String::new();
    while !(screen.contains("45 123") && screen.contains("42x") && screen.contains("/dev/")) {
        let (pt, b) = c.expect_payload(T).await;
        assert_eq!(pt, PayloadType::Output);
        screen.push_str(&String::from_utf8_lossy(&b));
    }
    c.send(PayloadType::Output, b"exit\r").await;
    let (_, output) = c.collect_until_closed(T).await;
    assert_eq!(output, "");
    let s = sim.stats(&resp.session_id).unwrap();
    assert_eq!(s.sizes_received, vec![(123, 45)]);
    assert!(s.handshake_complete && s.client_version.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_handshake_encrypts_the_shell() {
    use base64::Engine;
    use ssm_wire::crypto::{DataKey, SessionCipher};
    let sim = sim(SimConfig {
        kms_key_id: Some("alias/ssm-sim".into()),
        ..Default::default()
    })
    .await;
    let resp = sim
        .start_session(StartSessionRequest::interactive_command(
            "echo secret-output",
        ))
        .unwrap();
    let mut c = Client::connect(&resp.stream_url, &resp.token_value).await;
    let (pt, body) = c.expect_payload(T).await;
    assert_eq!(pt, PayloadType::HandshakeRequest);
    let req: Value = serde_json::from_slice(&body).unwrap();
    let kms = &req["RequestedClientActions"][1];
    assert_eq!(kms["ActionType"], "KMSEncryption");
    assert_eq!(kms["ActionParameters"]["KMSKeyId"], "alias/ssm-sim");
    let (status, key) = api_call(
        &sim.endpoint_url(),
        "TrentService.GenerateDataKey",
        &json!({"KeyId": "alias/ssm-sim", "NumberOfBytes": 64,
                "EncryptionContext": {"aws:ssm:SessionId": resp.session_id, "aws:ssm:TargetId": "i-0123456789abcdef0"}}),
    )
    .await;
    assert_eq!(status, 200);
    let b64 = base64::engine::general_purpose::STANDARD;
    let plain = b64.decode(key["Plaintext"].as_str().unwrap()).unwrap();
    let cipher = SessionCipher::client(&DataKey::from_slice(&plain).unwrap());
    c.send_json(
        PayloadType::HandshakeResponse,
        &json!({"ClientVersion": common::CLIENT_VERSION, "ProcessedClientActions": [
            {"ActionType": "SessionType", "ActionStatus": 1, "ActionResult": null, "Error": ""},
            {"ActionType": "KMSEncryption", "ActionStatus": 1,
             "ActionResult": {"KMSCipherTextKey": key["CiphertextBlob"], "KMSCipherTextHash": null}, "Error": ""}],
          "Errors": null}),
    )
    .await;
    let (pt, body) = c.expect_payload(T).await;
    assert_eq!(pt, PayloadType::EncChallengeRequest);
    let challenge: Value = serde_json::from_slice(&body).unwrap();
    let answer = cipher
        .answer_challenge(challenge["Challenge"].as_str().unwrap())
        .unwrap();
    c.send_json(
        PayloadType::EncChallengeResponse,
        &json!({"Challenge": answer}),
    )
    .await;
    let (pt, body) = c.expect_payload(T).await;
    assert_eq!(pt, PayloadType::HandshakeComplete);
    let done: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        done["CustomerMessage"],
        "This session is encrypted using AWS KMS."
    );
    let (payloads, _) = c.collect_until_closed(T).await;
    let mut screen = Vec::new();
    for (pt, b) in payloads {
        assert_eq!(pt, PayloadType::Output);
        assert!(!b.windows(6).any(|w| w == b"secret"), "sent in clear");
        screen.extend(cipher.open(&b).unwrap());
    }
    assert!(String::from_utf8_lossy(&screen).contains("secret-output"));
    let s = sim.stats(&resp.session_id).unwrap();
    assert!(s.encrypted);
    assert_eq!(
        s.kms_encryption_contexts[0]["aws:ssm:TargetId"],
        "i-0123456789abcdef0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_failure_closes_the_channel_with_a_reason() {
    let sim = sim(SimConfig::default()).await;
    let resp = sim
        .start_session(StartSessionRequest::non_interactive_command("true"))
        .unwrap();
    let mut c = Client::connect(&resp.stream_url, &resp.token_value).await;
    let (pt, _) = c.expect_payload(T).await;
    assert_eq!(pt, PayloadType::HandshakeRequest);
    c.send_json(
        PayloadType::HandshakeResponse,
        &json!({"ClientVersion": "1.2.677.0", "ProcessedClientActions": [
            {"ActionType": "SessionType", "ActionStatus": 2, "ActionResult": null, "Error": "nope"}],
          "Errors": ["nope"]}),
    )
    .await;
    let (_, output) = c.collect_until_closed(T).await;
    assert!(
        output.contains("SessionType failed on client with status 2"),
        "{output}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_speaks_json_1_1_and_records_calls() {
    let sim = sim(SimConfig::default()).await;
    let ep = sim.endpoint_url();
    let (status, r) = api_call(
        &ep,
        "AmazonSSM.StartSession",
        &json!({"Target": "i-0123456789abcdef0", "DocumentName": "AWS-StartNonInteractiveCommand",
                "Parameters": {"command": ["true"]}, "Reason": "test"}),
    )
    .await;
    assert_eq!(status, 200);
    let id = r["SessionId"].as_str().unwrap().to_owned();
    assert!(r["StreamUrl"].as_str().unwrap().starts_with(&format!(
        "{}/v1/data-channel/{id}?role=publish_subscribe&cell-number=",
        ep.replace("http", "ws")
    )));
    let (status, err) =
        api_call(&ep, "AmazonSSM.StartSession", &json!({"DocumentName": "x"})).await;
    assert_eq!(status, 400);
    assert_eq!(err["__type"], "ValidationException");
    let (status, err) = api_call(
        &ep,
        "AmazonSSM.StartSession",
        &json!({"Target": "i-1", "DocumentName": "No-Such-Document"}),
    )
    .await;
    assert_eq!(
        (status, err["__type"].as_str()),
        (400, Some("InvalidDocument"))
    );
    let (status, _) = api_call(&ep, "AmazonSSM.TerminateSession", &json!({"SessionId": id})).await;
    assert_eq!(status, 200);
    sim.wait_closed(&id, T).await.unwrap();
    let (_, r) = api_call(&ep, "AmazonSSM.ResumeSession", &json!({"SessionId": id})).await;
    assert_eq!(r["TokenValue"], Value::Null);
    let calls = sim.api_calls();
    assert_eq!(calls.len(), 5);
    assert!(calls[0]
        .header("Authorization")
        .unwrap()
        .starts_with("AWS4-HMAC-SHA256"));
    assert_eq!(calls[0].header("x-amz-date"), Some("20240101T000000Z"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_quirks_and_malformed_frames() {
    let sim = sim(SimConfig {
        tls: true,
        start_publication_quirk: true,
        malformed_every: Some(2),
        ..Default::default()
    })
    .await;
    assert!(sim.endpoint_url().starts_with("https://127.0.0.1:"));
    let pem = std::fs::read_to_string(sim.ca_pem_path().unwrap()).unwrap();
    assert!(pem.contains("BEGIN CERTIFICATE"));
    let resp = sim
        .start_session(StartSessionRequest::non_interactive_command(
            "for i in 1 2 3 4 5 6 7 8; do echo line$i; done",
        ))
        .unwrap();
    assert!(resp.stream_url.starts_with("wss://"));
    let mut c = Client::connect_with_root(
        &resp.stream_url,
        &resp.token_value,
        sim.ca_certificate_der(),
    )
    .await;
    c.handshake().await;
    let (payloads, _) = c.collect_until_closed(T).await;
    let out: Vec<u8> = payloads
        .iter()
        .filter(|(p, _)| *p == PayloadType::Output)
        .flat_map(|(_, b)| b.to_vec())
        .collect();
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "line1\nline2\nline3\nline4\nline5\nline6\nline7\nline8\n"
    );
    assert_eq!(
        c.first_frame_types[..2],
        ["start_publication", "start_publication"]
    );
    assert!(c.publication_frames >= 2);
    let s = sim.stats(&resp.session_id).unwrap();
    assert!(s.malformed_injected > 0);
    assert!(c.invalid_frames > 0);
    assert_eq!(s.upgrade_headers.len(), 1);
}

/// A delayed link holds every item for its latency, and the measured overshoot is what
/// comes on top (the bench subtracts it to tell the plugin's latency from the sim's).
#[tokio::test(flavor = "current_thread")]
async fn link_overshoot_holds_items_for_the_latency() {
    let latency = std::time::Duration::from_millis(5);
    let start = std::time::Instant::now();
    let over = ssm_sim::link_overshoot(latency, 20).await;
    assert_eq!(over.len(), 20);
    assert!(over.windows(2).all(|w| w[0] <= w[1]), "sorted");
    assert!(
        start.elapsed() >= latency * 20,
        "items came out early: {:?}",
        start.elapsed()
    );
}
