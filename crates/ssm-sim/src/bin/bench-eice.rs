//! `bench-eice`: throughput and connection set-up of the two bastion-less paths in the
//! same run, through the same simulator (issue 13's Performance section):
//! - EICE: `session-manager-plugin open-tunnel --instance-id i-… --local-port P` (one
//!   WebSocket per TCP connection, raw binary frames, no acknowledgements or pacing);
//! - SSM: `session-manager-plugin forward i-… -L P:PORT` (AWS-StartPortForwardingSession,
//!   the data channel with its acknowledgements and the plugin's default pacing).
//!
//! ```text
//! cargo build --release -p session-manager-plugin -p ssm-sim
//! target/release/bench-eice [--plugin PATH] [--mib N] [--runs N]
//! ```
//!
//! Per path and run: set-up (TCP connect to the local port until a one-byte round trip
//! through the tunnel has come back: the presign + WebSocket for EICE, the smux stream for
//! SSM; all set-ups are measured before the bulk transfers), upload (N MiB to the target, until the target has counted them all) and download
//! (N MiB from the target), each a fresh connection. Medians (min–max) of `--runs`
//! (default 5). Loopback, TLS, dummy credentials; the simulator runs in this process.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use ssm_sim::{Ec2InstanceSim, SimConfig, Simulator, DEFAULT_TARGET};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

const USAGE: &str = "usage: bench-eice [--plugin PATH] [--mib N] [--runs N]";

struct Opts {
    plugin: PathBuf,
    mib: usize,
    runs: usize,
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        plugin: PathBuf::from("target/release/session-manager-plugin"),
        mib: 64,
        runs: 5,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().cloned().ok_or(format!("{flag} needs a value"));
        let positive = |v: String| v.parse::<usize>().ok().filter(|n| *n > 0);
        match flag.as_str() {
            "--plugin" => o.plugin = PathBuf::from(value()?),
            "--mib" => o.mib = positive(value()?).ok_or("--mib needs a positive number")?,
            "--runs" => o.runs = positive(value()?).ok_or("--runs needs a positive number")?,
            _ => return Err(USAGE.to_owned()),
        }
    }
    o.plugin = std::fs::canonicalize(&o.plugin)
        .map_err(|e| format!("plugin {}: {e}", o.plugin.display()))?;
    Ok(o)
}

/// The target: per connection one command byte. `p`: echo one byte. `u` + 8-byte length:
/// read that many bytes, then answer one byte. `d` + 8-byte length: send that many bytes.
async fn target() -> std::io::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut cmd = [0u8; 1];
                if s.read_exact(&mut cmd).await.is_err() {
                    return;
                }
                let mut len = [0u8; 8];
                if cmd[0] != b'p' && s.read_exact(&mut len).await.is_err() {
                    return;
                }
                let n = u64::from_be_bytes(len);
                match cmd[0] {
                    b'p' => {
                        let _ = s.write_all(b"p").await;
                    }
                    b'u' => {
                        let mut buf = vec![0u8; 256 * 1024];
                        let mut got = 0u64;
                        while got < n {
                            match s.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(k) => got += k as u64,
                            }
                        }
                        let _ = s.write_all(b"k").await;
                    }
                    _ => {
                        let buf = vec![0x5au8; 256 * 1024];
                        let mut sent = 0u64;
                        while sent < n {
                            let k = buf.len().min((n - sent) as usize);
                            if s.write_all(&buf[..k]).await.is_err() {
                                return;
                            }
                            sent += k as u64;
                        }
                    }
                }
                // Hold the connection until the client closes it.
                let mut sink = [0u8; 1024];
                while let Ok(k) = s.read(&mut sink).await {
                    if k == 0 {
                        break;
                    }
                }
            });
        }
    });
    Ok(addr)
}

async fn connect(port: u16) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect(("127.0.0.1", port)).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Set-up: connect until the first byte of a round trip is back.
async fn setup(port: u16) -> std::io::Result<Duration> {
    let t = Instant::now();
    let mut s = connect(port).await?;
    s.write_all(b"p").await?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await?;
    Ok(t.elapsed())
}

async fn upload(port: u16, bytes: u64) -> std::io::Result<Duration> {
    let mut s = connect(port).await?;
    // The set-up is not part of the figure: a ping first.
    s.write_all(b"u").await?;
    s.write_all(&bytes.to_be_bytes()).await?;
    let t = Instant::now();
    let chunk = vec![0xa5u8; 256 * 1024];
    let mut sent = 0u64;
    while sent < bytes {
        let k = chunk.len().min((bytes - sent) as usize);
        s.write_all(&chunk[..k]).await?;
        sent += k as u64;
    }
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await?;
    Ok(t.elapsed())
}

async fn download(port: u16, bytes: u64) -> std::io::Result<Duration> {
    let mut s = connect(port).await?;
    s.write_all(b"d").await?;
    s.write_all(&bytes.to_be_bytes()).await?;
    let t = Instant::now();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    while got < bytes {
        match s.read(&mut buf).await? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            k => got += k as u64,
        }
    }
    Ok(t.elapsed())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

fn spawn(opts: &Opts, sim: &Simulator, home: &std::path::Path, args: &[String]) -> Child {
    let ca = sim.ca_pem_path().unwrap_or_default();
    Command::new(&opts.plugin)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env("AWS_CA_BUNDLE", ca)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", home.join("none"))
        .env("AWS_SHARED_CREDENTIALS_FILE", home.join("none"))
        .env("AWS_ENDPOINT_URL_SSM", sim.endpoint_url())
        .env("AWS_ENDPOINT_URL_EC2", sim.endpoint_url())
        .env("SSM_PLUGIN_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", opts.plugin.display()))
}

async fn wait_listening(port: u16) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(format!("nothing listens on {port}"))
}

#[derive(Default)]
struct Figures {
    setup: Vec<f64>,
    up: Vec<f64>,
    down: Vec<f64>,
}

fn summary(v: &[f64]) -> String {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return "-".to_owned();
    }
    format!("{:.1} ({:.1}–{:.1})", s[s.len() / 2], s[0], s[s.len() - 1])
}

async fn bench() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = parse(&args)?;
    let sim = Simulator::start(SimConfig {
        tls: true,
        ..Default::default()
    })
    .await
    .map_err(|e| e.to_string())?;
    let target = target().await.map_err(|e| e.to_string())?;
    let mut inst = Ec2InstanceSim::running(DEFAULT_TARGET, "bench", "10.0.0.10", target);
    inst.ports = BTreeMap::from([(22, target)]);
    sim.add_ec2_instance(inst);
    sim.add_instance_connect_endpoint(sim.instance_connect_endpoint(
        "eice-0bench00000000000",
        "vpc-0sim",
        "subnet-0a",
        None,
    ));
    let home = std::env::temp_dir().join(format!("bench-eice-{}", std::process::id()));
    std::fs::create_dir_all(&home).map_err(|e| e.to_string())?;
    let bytes = (opts.mib as u64) << 20;
    let (eice_port, ssm_port) = (free_port(), free_port());
    let _eice = spawn(
        &opts,
        &sim,
        &home,
        &[
            "open-tunnel".into(),
            "--instance-id".into(),
            DEFAULT_TARGET.into(),
            "--local-port".into(),
            eice_port.to_string(),
        ],
    );
    let _ssm = spawn(
        &opts,
        &sim,
        &home,
        &[
            "forward".into(),
            DEFAULT_TARGET.into(),
            "-L".into(),
            format!("{ssm_port}:{}", target.port()),
        ],
    );
    wait_listening(eice_port).await?;
    wait_listening(ssm_port).await?;
    let mut figures: [(&str, u16, Figures); 2] = [
        ("EICE (open-tunnel)", eice_port, Figures::default()),
        ("SSM (forward)", ssm_port, Figures::default()),
    ];
    let io = |e: std::io::Error| e.to_string();
    // Set-ups first, before any bulk transfer has gone through the tunnels.
    for _ in 0..opts.runs {
        for (_, port, f) in figures.iter_mut() {
            f.setup
                .push(setup(*port).await.map_err(io)?.as_secs_f64() * 1000.0);
        }
    }
    for _ in 0..opts.runs {
        for (_, port, f) in figures.iter_mut() {
            let mib = opts.mib as f64;
            f.up.push(mib / upload(*port, bytes).await.map_err(io)?.as_secs_f64());
            f.down
                .push(mib / download(*port, bytes).await.map_err(io)?.as_secs_f64());
        }
    }
    println!(
        "\nsession-manager-plugin: EICE and SSM tunnels through ssm-sim (TLS, loopback), {} MiB \
         each way, median (min–max) of {} runs\n",
        opts.mib, opts.runs
    );
    println!("| path | set-up (ms) | upload (MiB/s) | download (MiB/s) |\n|---|---|---|---|");
    for (name, _, f) in &figures {
        println!(
            "| {name} | {} | {} | {} |",
            summary(&f.setup),
            summary(&f.up),
            summary(&f.down)
        );
    }
    let _ = std::fs::remove_dir_all(&home);
    Ok(())
}

fn main() -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench-eice: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(bench()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-eice: {e}");
            ExitCode::FAILURE
        }
    }
}
