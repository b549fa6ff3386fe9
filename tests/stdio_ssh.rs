//! End-to-end stdio forwarding (`AWS-StartSSHSession`, ssh ProxyCommand): the built plugin
//! against ssm-sim over TLS, byte-exact both ways, and real OpenSSH (sshd, ssh, scp)
//! through it.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ssm_sim::{SimConfig, StartSessionRequest};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

const START: Duration = Duration::from_secs(20);

fn starting_line(id: &str) -> String {
    format!("\nStarting session with SessionId: {id}\n")
}

/// Bytes written to stdin come back on stdout exactly, including single-byte `\n`
/// chunks (the official plugin rewrites a lone `\n` payload into `\r`, PROTOCOL.md §10
/// #10); after stdin closes the plugin exits 0 with everything acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdio_echo_is_byte_exact() {
    let sim = start_sim().await;
    let echo = echo_server().await;
    let req = StartSessionRequest::ssh(echo.port);
    let mut p = start_plugin(
        &sim,
        &req,
        None,
        &[("SSM_PLUGIN_PACKETS_PER_SECOND", "5000")],
        true,
    );
    let id = p.session_id.clone();
    let prefix = starting_line(&id).into_bytes();
    p.expect_stdout(&starting_line(&id), START).await;
    let mut stdin = p.stdin.take().expect("stdin");

    // Lone newlines, each its own read (and so its own payload): wait for every echo.
    let mut sent: Vec<u8> = Vec::new();
    for lone in [&b"\n"[..], b"\n", b"a\n", b"\n", b"\r\n", b"\n"] {
        stdin.write_all(lone).await.expect("write stdin");
        stdin.flush().await.expect("flush stdin");
        sent.extend_from_slice(lone);
        let want = prefix.len() + sent.len();
        if let Err(e) = p
            .stdout
            .wait_until(START, "the echo of a lone newline", |b| b.len() >= want)
            .await
        {
            panic!("{e}{}", p.dump());
        }
        assert_eq!(
            &p.stdout.bytes()[prefix.len()..],
            &sent[..],
            "lone-newline echo differs{}",
            p.dump()
        );
    }

    // Bulk: 5 MB of random bytes with extra isolated 0x0A bytes.
    let mut bulk = random_bytes(5_000_000, 21);
    for i in (500..bulk.len() - 1).step_by(1009) {
        bulk[i - 1] = b'x';
        bulk[i] = b'\n';
        bulk[i + 1] = b'y';
    }
    let bulk = Arc::new(bulk);
    let b2 = bulk.clone();
    let writer = tokio::spawn(async move {
        for c in b2.chunks(40_000) {
            stdin.write_all(c).await.expect("write stdin");
        }
        stdin.flush().await.expect("flush");
        stdin
    });
    sent.extend_from_slice(&bulk);
    let want = prefix.len() + sent.len();
    let t0 = Instant::now();
    if let Err(e) = p
        .stdout
        .wait_until(Duration::from_secs(90), "the whole echo", |b| {
            b.len() >= want
        })
        .await
    {
        panic!("{e}{}", p.dump());
    }
    eprintln!("5 MB echoed in {:?}", t0.elapsed());
    let stdin = writer.await.expect("writer");
    let out = p.stdout.bytes();
    assert_eq!(&out[..prefix.len()], &prefix[..], "{}", p.dump());
    assert!(
        out[prefix.len()..] == sent[..],
        "echo differs (first difference at byte {:?}){}",
        out[prefix.len()..]
            .iter()
            .zip(sent.iter())
            .position(|(a, b)| a != b),
        p.dump()
    );

    drop(stdin);
    let status = p.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0), "{}", p.dump());
    assert_eq!(
        p.stdout.len(),
        want,
        "nothing else on stdout after the echo{}",
        p.dump()
    );
    let stats = sim.stats(&id).unwrap();
    assert_eq!(
        stats.input_payload_bytes,
        sent.len() as u64,
        "the agent received every byte written to stdin"
    );
    assert_eq!(stats.port_mode.as_deref(), Some("stdio"));
}

/// On stdin EOF the plugin exits 0 only after every byte it sent was acknowledged, even
/// on a slow, lossy network: the target has all of it the moment the plugin is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdio_eof_flushes_before_exit() {
    let sim = start_sim().await;
    let n: usize = 2 << 20;
    let data = Arc::new(random_bytes(n, 22));
    let (sink, mut results) = sink_source_server(n as u64, Arc::new(Vec::new())).await;
    let req = StartSessionRequest::ssh(sink.port);
    let cfg = SimConfig {
        latency: Duration::from_millis(40),
        loss: 0.02,
        ..SimConfig::default()
    };
    let mut p = start_plugin(
        &sim,
        &req,
        Some(cfg),
        &[("SSM_PLUGIN_PACKETS_PER_SECOND", "5000")],
        true,
    );
    let id = p.session_id.clone();
    let mut stdin = p.stdin.take().expect("stdin");
    let d = data.clone();
    let t0 = Instant::now();
    let writer = tokio::spawn(async move {
        for c in d.chunks(64 * 1024) {
            stdin.write_all(c).await.expect("write stdin");
        }
        // Dropping stdin is the EOF.
    });
    tokio::time::timeout(Duration::from_secs(60), writer)
        .await
        .expect("stdin written")
        .expect("writer");
    let status = p.wait_exit(Duration::from_secs(60)).await;
    let stats = sim.stats(&id).unwrap();
    eprintln!("2 MiB flushed in {:?}", t0.elapsed());
    assert_eq!(status.code(), Some(0), "{}", p.dump());
    assert_eq!(
        stats.input_payload_bytes,
        n as u64,
        "the plugin exited before the agent had everything{}",
        p.dump()
    );
    let r = tokio::time::timeout(Duration::from_secs(10), results.recv())
        .await
        .expect("sink result")
        .expect("sink result");
    assert_eq!(r.bytes, n as u64);
    assert_eq!(r.sha256, sha256(&data), "the target got different bytes");
    assert_eq!(p.stdout.text(), starting_line(&id), "{}", p.dump());
    assert!(stats.netem_lost > 0, "the network was lossy");
}

// ---- real OpenSSH -------------------------------------------------------------------

const SSHD: &str = "/usr/sbin/sshd";

struct Sshd {
    child: tokio::process::Child,
    port: u16,
    dir: TempDir,
}

impl Sshd {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sshd.log")).unwrap_or_default()
    }
}

async fn keygen(path: &Path) {
    let mut cmd = Command::new("ssh-keygen");
    cmd.args(["-q", "-t", "ed25519", "-N", "", "-C", "e2e", "-f"])
        .arg(path);
    let out = run_cmd(cmd, Duration::from_secs(20)).await;
    assert!(
        out.status.success(),
        "ssh-keygen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Why sshd cannot run here, if it cannot.
fn sshd_unavailable() -> Option<String> {
    if !Path::new(SSHD).exists() {
        return Some(format!(
            "{SSHD} missing (apt-get install -y openssh-server)"
        ));
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("sshd needs root to run with its own config".into());
    }
    for tool in ["ssh", "scp", "ssh-keygen", "curl"] {
        let found = std::env::var("PATH")
            .unwrap_or_default()
            .split(':')
            .any(|d| Path::new(d).join(tool).exists());
        if !found {
            return Some(format!("{tool} not found in PATH"));
        }
    }
    None
}

/// A loopback sshd with its own host key, accepting `client_key` for root.
async fn start_sshd(client_pub: &Path) -> Sshd {
    let dir = TempDir::new("sshd");
    keygen(&dir.join("host_key")).await;
    std::fs::copy(client_pub, dir.join("authorized_keys")).expect("authorized_keys");
    // Privilege separation directory (normally created by the service unit).
    let _ = std::fs::create_dir_all("/run/sshd");
    let port = free_port();
    let cfg = format!(
        "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n\
         StrictModes no\nPidFile {d}/sshd.pid\nUsePAM no\nPermitRootLogin prohibit-password\n\
         PasswordAuthentication no\nKbdInteractiveAuthentication no\n\
         Subsystem sftp internal-sftp\nLogLevel VERBOSE\n",
        d = dir.path().display()
    );
    let cfg_path = dir.join("sshd_config");
    std::fs::write(&cfg_path, cfg).expect("sshd_config");
    let log = std::fs::File::create(dir.join("sshd.log")).expect("sshd log");
    let child = Command::new(SSHD)
        .arg("-D")
        .arg("-e")
        .arg("-f")
        .arg(&cfg_path)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn sshd");
    let mut sshd = Sshd { child, port, dir };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return sshd;
        }
        if let Ok(Some(s)) = sshd.child.try_wait() {
            panic!("sshd exited with {s}: {}", sshd.log());
        }
        if tokio::time::Instant::now() > deadline {
            panic!("sshd did not listen on {port}: {}", sshd.log());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The ProxyCommand script: what `aws ssm start-session --target %h --document-name
/// AWS-StartSSHSession --parameters portNumber=%p` does — StartSession against the
/// simulator's SSM endpoint, then exec the plugin with the response in the environment
/// variable, argv exactly as the CLI builds it.
fn write_proxy_script(sim: &ssm_sim::Simulator, dir: &TempDir, extra_env: &str) -> String {
    let ca = sim.ca_pem_path().expect("CA").display().to_string();
    let endpoint = sim.endpoint_url();
    let home = dir.join("home");
    std::fs::create_dir_all(&home).expect("home");
    let script = format!(
        r#"#!/bin/sh
set -e
target="$1"; port="$2"
params="{{\"Target\": \"$target\", \"DocumentName\": \"AWS-StartSSHSession\", \"Parameters\": {{\"portNumber\": [\"$port\"]}}}}"
resp=$(curl -sS --fail --cacert '{ca}' -H 'X-Amz-Target: AmazonSSM.StartSession' \
  -H 'Content-Type: application/x-amz-json-1.1' --data "$params" '{endpoint}/')
exec env -i PATH="$PATH" HOME='{home}' AWS_CA_BUNDLE='{ca}' AWS_ACCESS_KEY_ID=test \
  AWS_SECRET_ACCESS_KEY=test AWS_REGION={region} AWS_EC2_METADATA_DISABLED=true \
  SSM_PLUGIN_LOG=info SSM_PLUGIN_LOG_FILE='{log}' {extra_env} \
  AWS_SSM_START_SESSION_RESPONSE="$resp" \
  '{plugin}' AWS_SSM_START_SESSION_RESPONSE {region} StartSession '' "$params" '{endpoint}'
"#,
        home = home.display(),
        region = REGION,
        log = dir.join("plugin.log").display(),
        plugin = PLUGIN,
    );
    let path = dir.join("proxy.sh");
    std::fs::write(&path, script).expect("proxy script");
    format!("sh {} %h %p", path.display())
}

fn ssh_opts(key: &Path, proxy: &str) -> Vec<String> {
    vec![
        "-F".into(),
        "/dev/null".into(),
        "-i".into(),
        key.display().to_string(),
        "-o".into(),
        "IdentitiesOnly=yes".into(),
        "-o".into(),
        "BatchMode=yes".into(),
        "-o".into(),
        "StrictHostKeyChecking=no".into(),
        "-o".into(),
        "UserKnownHostsFile=/dev/null".into(),
        "-o".into(),
        "LogLevel=ERROR".into(),
        "-o".into(),
        format!("ProxyCommand={proxy}"),
    ]
}

fn file_sha(path: &Path) -> String {
    hex(&sha256(&std::fs::read(path).expect("read file")))
}

/// Real OpenSSH through the plugin as ProxyCommand: a remote command, then scp of a
/// random 20 MB file up and back (sha256 compared: no tail is lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssh_command_and_scp_roundtrip() {
    if let Some(why) = sshd_unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let sim = start_sim().await;
    let dir = TempDir::new("ssh");
    let key = dir.join("client_key");
    keygen(&key).await;
    let sshd = start_sshd(&dir.join("client_key.pub")).await;
    let proxy = write_proxy_script(&sim, &dir, "SSM_PLUGIN_PACKETS_PER_SECOND=10000");
    let plugin_log = || std::fs::read_to_string(dir.join("plugin.log")).unwrap_or_default();

    // 1. A remote command.
    let mut cmd = Command::new("ssh");
    cmd.args(ssh_opts(&key, &proxy))
        .args(["-p", &sshd.port.to_string()])
        .arg(format!("root@{TARGET}"))
        .arg("echo ok; cat /proc/version");
    let out = run_cmd(cmd, Duration::from_secs(30)).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.starts_with("ok\n") && stdout.contains("Linux version"),
        "ssh failed ({}): stdout {stdout:?} stderr {:?}\nsshd: {}\nplugin log: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        sshd.log(),
        plugin_log()
    );
    let ids = sim.session_ids();
    assert_eq!(ids.len(), 1, "one session per ssh run");
    // Like the official plugin, stdin EOF ends the plugin without a TerminateSession flag,
    // so the agent side ends only when the target closes (or the service times it out).
    let stats = sim.stats(&ids[0]).unwrap();
    assert_eq!(stats.port_mode.as_deref(), Some("stdio"));
    assert!(stats.input_payload_bytes > 0 && stats.output_payload_bytes > 0);

    // 2. scp up and back.
    let size = 20 << 20;
    let src = dir.join("src.bin");
    std::fs::write(&src, random_bytes(size, 23)).expect("write src");
    let want = file_sha(&src);
    let remote = dir.join("remote.bin");
    let back = dir.join("back.bin");
    let scp = |from: String, to: String| {
        let mut cmd = Command::new("scp");
        cmd.args(ssh_opts(&key, &proxy))
            .args(["-q", "-P", &sshd.port.to_string()])
            .arg(from)
            .arg(to);
        cmd
    };
    for (label, from, to, check) in [
        (
            "up",
            src.display().to_string(),
            format!("root@{TARGET}:{}", remote.display()),
            remote.clone(),
        ),
        (
            "down",
            format!("root@{TARGET}:{}", remote.display()),
            back.display().to_string(),
            back.clone(),
        ),
    ] {
        let t0 = Instant::now();
        let out = run_cmd(scp(from, to), Duration::from_secs(120)).await;
        eprintln!("scp {label} 20 MiB: {:?}", t0.elapsed());
        assert!(
            out.status.success(),
            "scp {label} failed ({}): {}\nsshd: {}\nplugin log: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            sshd.log(),
            plugin_log()
        );
        assert_eq!(
            std::fs::metadata(&check).map(|m| m.len()).unwrap_or(0),
            size as u64,
            "scp {label}: size"
        );
        assert_eq!(file_sha(&check), want, "scp {label}: sha256");
    }
    assert_eq!(sim.session_ids().len(), 3);
    drop(sshd);
}
