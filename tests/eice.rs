//! EC2 Instance Connect Endpoint tunnels end to end: the built binary's `open-tunnel` and
//! `ssh-proxy --via eice|auto` against ssm-sim's endpoint (TLS WebSocket, SigV4 query
//! signatures recomputed by the simulator) and its EC2 query calls (DescribeInstances,
//! DescribeInstanceConnectEndpoints: `AWS_ENDPOINT_URL_EC2` points at the simulator, as
//! moto does not emulate the latter). Real OpenSSH with an sshd that accepts only keys
//! pushed in the last 60 s; an HTTP CONNECT proxy in between.

mod common;
mod standalone;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use common::*;
use ssm_sim::{Ec2InstanceSim, Simulator, EICE_TEST_HOST};
use standalone::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;

const ID: &str = "i-0e1ce00000000000a";
const IP: &str = "10.1.2.3";
const ENDPOINT: &str = "eice-0123456789abcdef0";
const STEP: Duration = Duration::from_secs(60);

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The standalone client's environment with EC2 at the simulator.
fn env(sim: &Simulator, home: &std::path::Path) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = cli_env(sim, None, home)
        .into_iter()
        .filter(|(k, _)| k != "AWS_ENDPOINT_URL_EC2")
        .collect();
    env.push(("AWS_ENDPOINT_URL_EC2".into(), sim.endpoint_url()));
    env
}

fn plugin(sim: &Simulator, home: &std::path::Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(PLUGIN);
    cmd.args(args)
        .env_clear()
        .envs(env(sim, home))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// One instance whose port 22 is `port`, an endpoint in its subnet, and two decoys: one
/// in another subnet of the VPC (listed first), one in another VPC.
fn setup(sim: &Simulator, port: u16) {
    sim.add_ec2_instance(Ec2InstanceSim::running(ID, "web-eice", IP, loopback(port)));
    let other_subnet = sim.instance_connect_endpoint(
        "eice-0000000000000000b",
        "vpc-0sim",
        "subnet-0b",
        Some("127.0.0.2"),
    );
    sim.add_instance_connect_endpoint(other_subnet);
    let other_vpc = sim.instance_connect_endpoint(
        "eice-0000000000000000c",
        "vpc-0other",
        "subnet-0a",
        Some("127.0.0.3"),
    );
    sim.add_instance_connect_endpoint(other_vpc);
    sim.add_instance_connect_endpoint(sim.instance_connect_endpoint(
        ENDPOINT,
        "vpc-0sim",
        "subnet-0a",
        None,
    ));
}

fn query_param(target: &str, name: &str) -> Option<String> {
    let q = target.split_once('?')?.1;
    q.split('&').find_map(|p| {
        let (k, v) = p.split_once('=')?;
        (k == name).then(|| v.to_owned())
    })
}

/// Reads the "Listening for connections on port N." line.
async fn listening_port(stdout: &Arc<Collected>) -> u16 {
    stdout
        .wait_for("Listening for connections on port ", STEP)
        .await
        .expect("listening line");
    let text = stdout.text();
    let rest = &text[text.find("on port ").expect("line") + 8..];
    rest[..rest.find('.').expect("dot")].parse().expect("port")
}

struct Running {
    child: tokio::process::Child,
    stdout: Arc<Collected>,
    stderr: Arc<Collected>,
}

fn spawn(mut cmd: Command) -> Running {
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let stdout = collect(child.stdout.take().expect("stdout"));
    let stderr = collect(child.stderr.take().expect("stderr"));
    Running {
        child,
        stdout,
        stderr,
    }
}

fn collect<R: tokio::io::AsyncRead + Unpin + Send + 'static>(r: R) -> Arc<Collected> {
    // The harness's collector is private to its module; a child's stream through it.
    Collected::of(r)
}

async fn echo_ok(port: u16, data: Arc<Vec<u8>>) -> TcpStream {
    let s = connect_retry(port).await;
    let (mut r, mut w) = s.into_split();
    let d = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&d).await.expect("write");
        w
    });
    let mut got = vec![0u8; data.len()];
    tokio::time::timeout(STEP, r.read_exact(&mut got))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(sha256(&got), sha256(&data));
    let w = writer.await.expect("writer");
    r.reunite(w).expect("reunite")
}

/// ssh through the endpoint: `ssh-proxy --via eice --push-key` logs in (sshd accepts only
/// pushed keys), `open-tunnel` as ProxyCommand without a push is refused by sshd, `--via
/// auto` for an instance SSM does not know takes the endpoint, and scp moves 10 MiB both
/// ways intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_and_scp_through_eice_with_a_pushed_key() {
    if let Some(why) = sshd_unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let sim = start_sim().await;
    let home = TempDir::new("eice");
    let sshd = start_sshd_instance_connect(&sim, ID).await;
    setup(&sim, sshd.port);
    let key = home.join("id");
    keygen(&key).await;
    let pubkey = home.join("id.pub");
    let env = env(&sim, home.path());
    let ssh = |program: &str, proxy: &str, rest: &[String]| {
        let mut c = Command::new(program);
        c.env_clear().envs(env.clone()).args([
            "-F",
            "/dev/null",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "Port=22",
            "-i",
        ]);
        c.arg(&key)
            .arg("-o")
            .arg(format!("ProxyCommand={proxy}"))
            .args(rest);
        c
    };
    let open_tunnel = format!("{PLUGIN} open-tunnel --instance-id %h --remote-port %p");
    let (code, _, err) = output(ssh(
        "ssh",
        &open_tunnel,
        &["root@web-eice".into(), "true".into()],
    ))
    .await;
    assert_ne!(code, Some(0), "logged in without a pushed key: {err}");
    assert!(sim.pushed_keys().is_empty());
    let tunnels = sim.eice_tunnels();
    assert_eq!(tunnels.len(), 1, "{tunnels:?}");
    assert_eq!(tunnels[0].status, 101, "{tunnels:?}");
    assert_eq!(
        tunnels[0].endpoint_id, ENDPOINT,
        "the endpoint in the instance's subnet"
    );
    assert_eq!(
        (tunnels[0].private_ip.as_str(), tunnels[0].remote_port),
        (IP, 22)
    );

    let with = format!(
        "{PLUGIN} ssh-proxy %h %p --user %r --via eice --push-key {}",
        pubkey.display()
    );
    let (code, out, err) = output(ssh(
        "ssh",
        &with,
        &["root@web-eice".into(), "echo in-$((40+2))".into()],
    ))
    .await;
    assert_eq!(code, Some(0), "ssh: {err}\nsshd: {}", sshd.log());
    assert_eq!(out, "in-42\n");
    let pushed = sim.pushed_keys();
    assert_eq!(pushed.len(), 1);
    assert_eq!(
        (pushed[0].instance_id.as_str(), pushed[0].os_user.as_str()),
        (ID, "root")
    );
    assert!(start_calls(&sim).is_empty(), "no Session Manager session");

    // auto: SSM does not know the instance, so the endpoint.
    let auto = with.replace("--via eice", "--via auto");
    let (code, out, err) = output(ssh(
        "ssh",
        &auto,
        &[format!("root@{ID}"), "echo auto".into()],
    ))
    .await;
    assert_eq!((code, out.as_str()), (Some(0), "auto\n"), "{err}");
    assert!(start_calls(&sim).is_empty(), "no Session Manager session");

    // auto: a node online in SSM takes Session Manager (StartSession, no tunnel).
    let online = "i-0e1ce00000000000e";
    sim.add_managed_node(ssm_sim::ManagedNode::online(online, "ssm-web", "10.1.2.4"));
    let before = sim.eice_tunnels().len();
    let _ = output(ssh(
        "ssh",
        &auto,
        &[format!("root@{online}"), "true".into()],
    ))
    .await;
    let calls = start_calls(&sim);
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0]["Target"], online);
    assert_eq!(calls[0]["DocumentName"], "AWS-StartSSHSession");
    assert_eq!(
        sim.eice_tunnels().len(),
        before,
        "no EICE tunnel for an online node"
    );

    let size = 10 << 20;
    let src = home.join("src.bin");
    std::fs::write(&src, random_bytes(size, 41)).expect("src");
    let want = hex(&sha256(&std::fs::read(&src).expect("src")));
    let remote = home.join("remote.bin");
    let back = home.join("back.bin");
    for (from, to, check) in [
        (
            src.display().to_string(),
            format!("root@web-eice:{}", remote.display()),
            &remote,
        ),
        (
            format!("root@web-eice:{}", remote.display()),
            back.display().to_string(),
            &back,
        ),
    ] {
        let (code, _, err) = output(ssh("scp", &with, &["-q".into(), from, to])).await;
        assert_eq!(code, Some(0), "scp: {err}");
        assert_eq!(hex(&sha256(&std::fs::read(check).expect("copied"))), want);
    }
    let tunnels = sim.eice_tunnels();
    assert!(tunnels.iter().all(|t| t.status == 101), "{tunnels:?}");
    assert!(
        tunnels.iter().all(|t| t.max_client_frame <= 65_000),
        "a frame over 65 000 bytes: {tunnels:?}"
    );
    assert!(tunnels.iter().any(|t| t.bytes_up >= size as u64));
    assert!(tunnels.iter().any(|t| t.bytes_down >= size as u64));
}

/// Listener mode: ten connections at once, each its own tunnel (sha256 of 1 MiB each way);
/// the eleventh is closed while ten are open, as the AWS CLI does; when one ends, a new
/// connection gets a tunnel again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_ten_tunnels_and_the_eleventh_closed() {
    let sim = start_sim().await;
    let home = TempDir::new("eice");
    let echo = echo_server().await;
    setup(&sim, echo.port);
    let mut run = spawn(plugin(
        &sim,
        home.path(),
        &[
            "open-tunnel",
            "--instance-id",
            "web-eice",
            "--local-port",
            "0",
        ],
    ));
    let port = listening_port(&run.stdout).await;
    let small = Arc::new(b"hello".to_vec());
    let mut conns = Vec::new();
    for _ in 0..10 {
        conns.push(echo_ok(port, small.clone()).await);
    }
    assert_eq!(sim.eice_active(), 10);
    // The eleventh: closed without a tunnel.
    let mut eleventh = connect_retry(port).await;
    let mut b = [0u8; 16];
    let n = tokio::time::timeout(STEP, eleventh.read(&mut b))
        .await
        .expect("closed in time");
    assert!(matches!(n, Ok(0) | Err(_)), "the eleventh got data: {n:?}");
    run.stderr
        .wait_for("10 tunnels are open", STEP)
        .await
        .expect("the refusal is reported");
    assert_eq!(sim.eice_tunnels().len(), 10);
    // All ten carry 1 MiB each at the same time.
    let mut tasks = Vec::new();
    for (i, c) in conns.into_iter().enumerate() {
        let data = Arc::new(random_bytes(1 << 20, 100 + i as u64));
        tasks.push(tokio::spawn(async move {
            let got = echo_roundtrip(c, data.clone(), STEP).await.expect("echo");
            assert_eq!(sha256(&got), sha256(&data), "connection {i}");
        }));
    }
    for t in tasks {
        t.await.expect("echo task");
    }
    // Those ended (their tunnels closed): a new connection works.
    poll_until(STEP, || (sim.eice_active() == 0).then_some(()))
        .await
        .expect("tunnels closed");
    drop(echo_ok(port, small).await);
    let tunnels = sim.eice_tunnels();
    assert_eq!(tunnels.len(), 11);
    assert_eq!(sim.eice_max_concurrent(), 10);
    let _ = run.child.start_kill();
}

/// `--max-tunnel-duration 1`: the service closes with 1000 and the stdio tunnel ends
/// with status 0 while stdin stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tunnel_ends_at_max_tunnel_duration() {
    let sim = start_sim().await;
    let home = TempDir::new("eice");
    let echo = echo_server().await;
    setup(&sim, echo.port);
    let mut cmd = plugin(
        &sim,
        home.path(),
        &[
            "open-tunnel",
            "--instance-id",
            ID,
            "--max-tunnel-duration",
            "1",
        ],
    );
    cmd.stdin(std::process::Stdio::piped());
    let mut run = spawn(cmd);
    let mut stdin = run.child.stdin.take().expect("stdin");
    stdin.write_all(b"ping\n").await.expect("write");
    run.stdout.wait_for("ping\n", STEP).await.expect("echo");
    let status = tokio::time::timeout(STEP, run.child.wait())
        .await
        .expect("exits by itself")
        .expect("wait");
    assert_eq!(status.code(), Some(0), "{}", run.stderr.text());
    assert_eq!(run.stdout.text(), "ping\n", "only the stream on stdout");
    let t = &sim.eice_tunnels()[0];
    assert_eq!(t.close_code, Some(1000), "{t:?}");
    assert!(t.close_reason.contains("maximum tunnel duration"), "{t:?}");
    assert_eq!(
        query_param(&t.target, "maxTunnelDuration").as_deref(),
        Some("1")
    );
    drop(stdin);
}

/// Refusals: a port other than 22/3389 (400 with the service's JSON), a target that
/// refuses (1011), an unknown name, no endpoint in the VPC, flag rules. Clear errors, a
/// non-zero status, nothing on stdout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_clear_errors() {
    let sim = start_sim().await;
    let home = TempDir::new("eice");
    let refusing = free_port();
    setup(&sim, refusing);
    let mut lonely = Ec2InstanceSim::running(
        "i-0e1ce00000000000b",
        "lonely",
        "10.9.9.9",
        loopback(refusing),
    );
    lonely.vpc_id = "vpc-0none".into();
    sim.add_ec2_instance(lonely);
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &["--instance-id", ID, "--remote-port", "80"],
            1,
            "only ports 22 and 3389 are allowed",
        ),
        (
            &["--instance-id", "web-eice"],
            1,
            "Unable to connect to target",
        ),
        (
            &["--instance-id", "nosuch"],
            2,
            "no running EC2 instance matches \"nosuch\"",
        ),
        (
            &["--instance-id", "lonely"],
            2,
            "no usable EC2 Instance Connect Endpoint in vpc-0none",
        ),
        (
            &["--private-ip-address", IP],
            2,
            "needs --instance-connect-endpoint-id",
        ),
        (
            &["--instance-id", ID, "--max-tunnel-duration", "3601"],
            2,
            "between 1 and 3600",
        ),
    ];
    for (args, want_code, want) in cases {
        let mut cmd = plugin(&sim, home.path(), &["open-tunnel"]);
        cmd.args(*args).stdin(std::process::Stdio::piped());
        let (code, out, err) = output(cmd).await;
        assert_eq!(code, Some(*want_code), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(out.is_empty(), "{args:?}: stdout {out:?}");
    }
    let t = sim.eice_tunnels();
    assert_eq!(
        (t[0].status, t[0].error_code.as_str()),
        (400, "InvalidParameter")
    );
    assert_eq!(t[1].close_code, Some(1011));
    // The 400's request id is shown.
    let mut cmd = plugin(
        &sim,
        home.path(),
        &["open-tunnel", "--instance-id", ID, "--remote-port", "3390"],
    );
    cmd.stdin(std::process::Stdio::piped());
    let (_, _, err) = output(cmd).await;
    assert!(err.contains("(request id "), "{err}");
}

// ---- the endpoint's signature checks, from outside -------------------------------------

fn tls_config(sim: &Simulator) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(
            sim.ca_certificate_der().expect("CA"),
        ))
        .expect("root");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// Opens `url` (whose host may be any name: the TCP connection goes to the simulator);
/// `Ok(())` on 101, else the status and body.
async fn raw_open(sim: &Simulator, url: &str) -> Result<(), (u16, String)> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let tcp = TcpStream::connect(sim.local_addr()).await.expect("connect");
    let req = url.into_client_request().expect("request");
    let r = tokio_tungstenite::client_async_tls_with_config(
        req,
        tcp,
        None,
        Some(tokio_tungstenite::Connector::Rustls(tls_config(sim))),
    )
    .await;
    match r {
        Ok(_) => Ok(()),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err((
            resp.status().as_u16(),
            String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).into_owned(),
        )),
        Err(e) => panic!("handshake: {e}"),
    }
}

/// Presigns like the client, with any service and time (aws-sigv4, as the plugin).
fn presign(url: &str, service: &str, at: SystemTime) -> String {
    use aws_sigv4::http_request::{
        sign, SignableBody, SignableRequest, SignatureLocation, SigningSettings,
    };
    let identity =
        aws_credential_types::Credentials::new("test", "test", None, None, "test").into();
    let mut settings = SigningSettings::default();
    settings.signature_location = SignatureLocation::QueryParams;
    settings.expires_in = Some(Duration::from_secs(60));
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region(REGION)
        .name(service)
        .time(at)
        .settings(settings)
        .build()
        .expect("params")
        .into();
    let signable = SignableRequest::new("GET", url, std::iter::empty(), SignableBody::Bytes(b""))
        .expect("signable");
    let (instructions, _) = sign(signable, &params).expect("sign").into_parts();
    let mut req = http::Request::builder().uri(url).body(()).expect("request");
    instructions.apply_to_request_http1x(&mut req);
    req.uri().to_string()
}

/// The simulator recomputes the signature: a URL the plugin used is accepted again within
/// 60 s and refused once the simulator's clock is 61 s later (no sleep); unsigned,
/// wrong-service, wrong-host and tampered URLs get 403 with the JSON body. The plugin
/// signs every connection afresh: after the clock second changes, its next tunnel's
/// X-Amz-Date is newer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presigned_urls_are_checked_and_fresh_per_connection() {
    let sim = start_sim().await;
    let home = TempDir::new("eice");
    let echo = echo_server().await;
    setup(&sim, echo.port);
    let mut run = spawn(plugin(
        &sim,
        home.path(),
        &["open-tunnel", "--instance-id", ID, "--local-port", "0"],
    ));
    let port = listening_port(&run.stdout).await;
    drop(echo_ok(port, Arc::new(b"one".to_vec())).await);
    let first = sim.eice_tunnels()[0].clone();
    let host = format!("127.0.0.1:{}", sim.local_addr().port());
    let used = format!("wss://{host}{}", first.target);
    assert_eq!(raw_open(&sim, &used).await, Ok(()), "replay within 60 s");
    sim.set_eice_clock_offset(61);
    let (status, body) = raw_open(&sim, &used)
        .await
        .expect_err("replayed after 61 s");
    assert_eq!(status, 403);
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
    assert_eq!(v["ErrorCode"], "AccessDeniedException");
    assert!(
        v["Message"].as_str().unwrap_or("").contains("expired"),
        "{body}"
    );
    sim.set_eice_clock_offset(0);

    let unsigned = format!("wss://{host}/openTunnel?instanceConnectEndpointId={ENDPOINT}&remotePort=22&privateIpAddress={IP}");
    let now = SystemTime::now();
    for (url, why) in [
        (unsigned.clone(), "not signed"),
        (
            presign(&unsigned, "ssmmessages", now),
            "service ssmmessages",
        ),
        (
            presign(
                &unsigned,
                "ec2-instance-connect",
                now - Duration::from_secs(61),
            ),
            "expired",
        ),
        (
            presign(&unsigned, "ec2-instance-connect", now)
                .replace("remotePort=22", "remotePort=3389"),
            "does not match",
        ),
        (
            presign(
                &unsigned.replace("127.0.0.1", EICE_TEST_HOST),
                "ec2-instance-connect",
                now,
            ),
            "is not the endpoint",
        ),
    ] {
        let (status, body) = raw_open(&sim, &url).await.expect_err(why);
        assert_eq!(status, 403, "{why}: {body}");
        assert!(body.contains(why), "{why}: {body}");
    }
    assert_eq!(
        raw_open(&sim, &presign(&unsigned, "ec2-instance-connect", now)).await,
        Ok(())
    );

    // A fresh URL for the next connection.
    let d1 = query_param(&first.target, "X-Amz-Date").expect("date");
    let second_changed = poll_until(Duration::from_secs(5), || {
        let t = chrono_like(SystemTime::now());
        (t > d1).then_some(t)
    })
    .await
    .expect("the clock moves");
    drop(echo_ok(port, Arc::new(b"two".to_vec())).await);
    let last = sim.eice_tunnels().into_iter().last().expect("a tunnel");
    let d2 = query_param(&last.target, "X-Amz-Date").expect("date");
    assert!(
        d2 >= second_changed,
        "{d2} < {second_changed}: the URL was not signed afresh"
    );
    assert_ne!(
        query_param(&last.target, "X-Amz-Signature"),
        query_param(&first.target, "X-Amz-Signature")
    );
    let _ = run.child.start_kill();
}

/// `X-Amz-Date` of a time (`YYYYMMDDTHHMMSSZ`), via the signer itself.
fn chrono_like(t: SystemTime) -> String {
    let url = presign("wss://h/x", "s", t);
    query_param(url.split_once("wss://h").expect("url").1, "X-Amz-Date").expect("date")
}

/// Through an HTTP CONNECT proxy: the endpoint's DNS name is a name only the proxy
/// resolves; the stdio tunnel carries 2 MiB both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_an_http_connect_proxy() {
    let sim = start_sim().await;
    let home = TempDir::new("eice");
    let echo = echo_server().await;
    setup(&sim, echo.port);
    let named = "eice-0000000000000000d";
    sim.add_instance_connect_endpoint(sim.instance_connect_endpoint(
        named,
        "vpc-0sim",
        "subnet-0a",
        Some(EICE_TEST_HOST),
    ));
    let proxy = TcpListener::bind("127.0.0.1:0").await.expect("proxy");
    let proxy_url = format!("http://{}", proxy.local_addr().expect("addr"));
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let (seen2, upstream) = (seen.clone(), sim.local_addr());
    let proxy_task = tokio::spawn(async move {
        while let Ok((mut c, _)) = proxy.accept().await {
            let seen = seen2.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if c.read(&mut b).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(b[0]);
                }
                let line = String::from_utf8_lossy(&head)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_owned();
                seen.lock().unwrap().push(line);
                let Ok(mut up) = TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = c
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await;
                let _ = tokio::io::copy_bidirectional(&mut c, &mut up).await;
            });
        }
    });
    let mut cmd = plugin(
        &sim,
        home.path(),
        &[
            "open-tunnel",
            "--instance-id",
            "web-eice",
            "--instance-connect-endpoint-id",
            named,
        ],
    );
    cmd.env("HTTPS_PROXY", &proxy_url)
        .env("NO_PROXY", "127.0.0.1,localhost")
        .stdin(std::process::Stdio::piped());
    let mut run = spawn(cmd);
    let mut stdin = run.child.stdin.take().expect("stdin");
    let data = random_bytes(2 << 20, 51);
    let d = data.clone();
    let writer = tokio::spawn(async move {
        stdin.write_all(&d).await.expect("write");
        stdin
    });
    run.stdout
        .wait_until(STEP, "the echo", |b| b.len() >= data.len())
        .await
        .unwrap_or_else(|e| panic!("{e}: {}", run.stderr.text()));
    assert_eq!(sha256(&run.stdout.bytes()), sha256(&data));
    drop(writer.await.expect("writer"));
    let status = tokio::time::timeout(STEP, run.child.wait())
        .await
        .expect("exit")
        .expect("wait");
    assert_eq!(status.code(), Some(0), "{}", run.stderr.text());
    let port = sim.local_addr().port();
    assert!(
        seen.lock()
            .unwrap()
            .iter()
            .any(|l| *l == format!("CONNECT {EICE_TEST_HOST}:{port} HTTP/1.1")),
        "{:?}",
        seen.lock().unwrap()
    );
    assert_eq!(
        sim.eice_tunnels().last().map(|t| t.host.clone()),
        Some(format!("{EICE_TEST_HOST}:{port}"))
    );
    proxy_task.abort();
}

/// Runs `open-tunnel` in stdio mode: `word` and a newline go through the tunnel to the
/// echo server and back on stdout, then stdin's EOF ends the process with status 0.
async fn stdio_round_trip(cmd: Command, word: &str) {
    let mut run = spawn(cmd);
    let mut stdin = run.child.stdin.take().expect("stdin");
    let line = format!("{word}\n");
    stdin.write_all(line.as_bytes()).await.expect("write");
    run.stdout
        .wait_for(&line, STEP)
        .await
        .unwrap_or_else(|e| panic!("{e}: {}", run.stderr.text()));
    drop(stdin);
    let status = tokio::time::timeout(STEP, run.child.wait())
        .await
        .expect("exit")
        .expect("wait");
    assert_eq!(status.code(), Some(0), "{}", run.stderr.text());
}

/// With `AWS_USE_FIPS_ENDPOINT=true` the endpoint's `FipsDnsName` is used (the simulator's
/// is `localhost:PORT`), and the instance is found by its private DNS name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fips_uses_the_fips_dns_name() {
    let sim = start_sim().await;
    let home = TempDir::new("eice");
    let echo = echo_server().await;
    setup(&sim, echo.port);
    let dns = format!("ip-{}.ec2.internal", IP.replace('.', "-"));
    let mut cmd = plugin(&sim, home.path(), &["open-tunnel", "--instance-id", &dns]);
    cmd.env("AWS_USE_FIPS_ENDPOINT", "true")
        .stdin(std::process::Stdio::piped());
    stdio_round_trip(cmd, "fips").await;
    let t = sim.eice_tunnels();
    assert_eq!(
        t[0].host,
        format!("localhost:{}", sim.local_addr().port()),
        "{t:?}"
    );
    assert_eq!(t[0].endpoint_id, ENDPOINT);
}

/// With `--private-ip-address`, the endpoint id and its DNS name, no EC2 call is made
/// (EC2 points at a closed port here) and the tunnel works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_discovery_with_ip_id_and_dns_name() {
    let sim = start_sim().await;
    let home = TempDir::new("eice");
    let echo = echo_server().await;
    setup(&sim, echo.port);
    let dns = format!("127.0.0.1:{}", sim.local_addr().port());
    let mut cmd = plugin(
        &sim,
        home.path(),
        &[
            "open-tunnel",
            "--private-ip-address",
            IP,
            "--instance-connect-endpoint-id",
            ENDPOINT,
            "--instance-connect-endpoint-dns-name",
            &dns,
        ],
    );
    cmd.env("AWS_ENDPOINT_URL_EC2", "http://127.0.0.1:9")
        .stdin(std::process::Stdio::piped());
    stdio_round_trip(cmd, "direct").await;
    assert_eq!(sim.eice_tunnels().len(), 1);
}
