//! `bench-client`: start-up cost of the plugin's standalone client against the AWS CLI
//! path, same simulator, same run (issue 12's Performance section).
//!
//! ```text
//! cargo build --release -p session-manager-plugin -p ssm-sim
//! target/release/bench-client [--plugin PATH] [--aws PATH] [--runs N]
//! ```
//!
//! Two figures, each the wall time of a whole command, runs alternating between the two
//! paths, median (min–max) of `--runs` (default 10):
//! - `run`: `session-manager-plugin run i-… -- true` against
//!   `aws ssm start-session --target i-… --document-name AWS-StartNonInteractiveCommand
//!   --parameters command=true` (the CLI runs this plugin: a directory with a
//!   `session-manager-plugin` link to it is first on its PATH);
//! - `ssh` (root and /usr/sbin/sshd needed, else skipped): `ssh … root@i-… true` with
//!   `ProxyCommand session-manager-plugin ssh-proxy %h %p` against AWS's documented
//!   `ProxyCommand sh -c "aws ssm start-session --target %h --document-name
//!   AWS-StartSSHSession --parameters portNumber=%p"`; in the same turn, the same login
//!   straight to sshd's port (no proxy: what ssh and sshd cost by themselves), and each
//!   path's time above that floor.
//!
//! The simulator serves TLS in this process (its CA in `AWS_CA_BUNDLE`); credentials are
//! dummies; nothing leaves loopback.

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use ssm_sim::{SimConfig, Simulator, DEFAULT_TARGET};
use tokio::process::Command;

const USAGE: &str = "usage: bench-client [--plugin PATH] [--aws PATH] [--runs N]";

struct Opts {
    plugin: PathBuf,
    aws: String,
    runs: usize,
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        plugin: PathBuf::from("target/release/session-manager-plugin"),
        aws: "aws".to_owned(),
        runs: 10,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().cloned().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--plugin" => o.plugin = PathBuf::from(value()?),
            "--aws" => o.aws = value()?,
            "--runs" => {
                o.runs = value()?
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or("--runs needs a positive number")?
            }
            _ => return Err(USAGE.to_owned()),
        }
    }
    o.plugin = std::fs::canonicalize(&o.plugin)
        .map_err(|e| format!("--plugin {}: {e}", o.plugin.display()))?;
    Ok(o)
}

/// A directory removed on drop.
struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The environment both paths get.
fn env(sim: &Simulator, dir: &Path, bin: &Path) -> Vec<(String, String)> {
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let ca = sim.ca_pem_path().unwrap_or_default();
    vec![
        ("PATH".into(), path),
        ("HOME".into(), dir.display().to_string()),
        ("AWS_CA_BUNDLE".into(), ca.display().to_string()),
        ("AWS_ACCESS_KEY_ID".into(), "test".into()),
        ("AWS_SECRET_ACCESS_KEY".into(), "test".into()),
        ("AWS_REGION".into(), "us-east-1".into()),
        ("AWS_DEFAULT_REGION".into(), "us-east-1".into()),
        ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
        ("AWS_ENDPOINT_URL_SSM".into(), sim.endpoint_url()),
        ("AWS_ENDPOINT_URL".into(), sim.endpoint_url()),
        (
            "AWS_CONFIG_FILE".into(),
            dir.join("none").display().to_string(),
        ),
        (
            "AWS_SHARED_CREDENTIALS_FILE".into(),
            dir.join("none").display().to_string(),
        ),
    ]
}

/// Runs `argv` to its end; its wall time, or why it failed.
async fn timed(argv: &[String], env: &[(String, String)]) -> Result<f64, String> {
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let t0 = Instant::now();
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .map_err(|_| format!("{} did not finish within 60 s", argv[0]))?
        .map_err(|e| format!("{}: {e}", argv[0]))?;
    let secs = t0.elapsed().as_secs_f64();
    if !out.status.success() {
        return Err(format!(
            "{:?} exited with {}: {}",
            argv,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(secs)
}

fn stat(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let median = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    (median, v[0], v[v.len() - 1])
}

fn cell(v: &[f64]) -> String {
    let (m, min, max) = stat(v.to_vec());
    format!("{:.1} ms ({:.1}–{:.1})", m * 1e3, min * 1e3, max * 1e3)
}

/// Runs both argvs alternately `runs` times and prints one table row. With `floor`
/// (the same work without any proxy), that is timed in the same turn and two more rows
/// follow: the floor itself, and each path's time above it (run by run).
async fn compare(
    name: &str,
    ours: &[String],
    cli: &[String],
    floor: Option<&[String]>,
    env: &[(String, String)],
    runs: usize,
) -> Result<(), String> {
    let (mut a, mut b, mut f) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        a.push(timed(ours, env).await?);
        b.push(timed(cli, env).await?);
        if let Some(argv) = floor {
            f.push(timed(argv, env).await?);
        }
        eprintln!("{name} run {}: {:.3} s / {:.3} s", i + 1, a[i], b[i]);
    }
    let ratio = stat(a.clone()).0 / stat(b.clone()).0;
    println!("| {name} | {} | {} | {ratio:.3} |", cell(&a), cell(&b));
    if !f.is_empty() {
        println!("| {name}: no proxy at all (the floor) | {} | | |", cell(&f));
        let above = |v: &[f64]| v.iter().zip(&f).map(|(x, y)| x - y).collect::<Vec<_>>();
        let (aa, ba) = (above(&a), above(&b));
        let ratio = stat(aa.clone()).0 / stat(ba.clone()).0;
        println!(
            "| {name}: time above the floor | {} | {} | {ratio:.3} |",
            cell(&aa),
            cell(&ba)
        );
    }
    Ok(())
}

async fn sshd(dir: &Path, key_pub: &Path) -> Result<(tokio::process::Child, u16), String> {
    let host_key = dir.join("host_key");
    keygen(&host_key).await?;
    std::fs::copy(key_pub, dir.join("authorized_keys")).map_err(|e| e.to_string())?;
    let _ = std::fs::create_dir_all("/run/sshd");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port();
    let cfg = format!(
        "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n\
         StrictModes no\nPidFile {d}/sshd.pid\nUsePAM no\nPermitRootLogin prohibit-password\n\
         PasswordAuthentication no\nKbdInteractiveAuthentication no\n",
        d = dir.display()
    );
    std::fs::write(dir.join("sshd_config"), cfg).map_err(|e| e.to_string())?;
    let child = Command::new("/usr/sbin/sshd")
        .arg("-D")
        .arg("-f")
        .arg(dir.join("sshd_config"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("sshd: {e}"))?;
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok((child, port));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err("sshd did not listen".into())
}

async fn keygen(path: &Path) -> Result<(), String> {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .output()
        .await
        .map_err(|e| format!("ssh-keygen: {e}"))?;
    out.status
        .success()
        .then_some(())
        .ok_or_else(|| "ssh-keygen failed".to_owned())
}

async fn run(o: Opts) -> Result<(), String> {
    let sim = Simulator::start(SimConfig {
        tls: true,
        ..SimConfig::default()
    })
    .await
    .map_err(|e| e.to_string())?;
    let dir = Dir(std::env::temp_dir().join(format!("bench-client-{}", std::process::id())));
    let bin = dir.0.join("bin");
    std::fs::create_dir_all(&bin).map_err(|e| e.to_string())?;
    std::os::unix::fs::symlink(&o.plugin, bin.join("session-manager-plugin"))
        .map_err(|e| e.to_string())?;
    let env = env(&sim, &dir.0, &bin);
    let plugin = o.plugin.display().to_string();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();

    println!("| figure | session-manager-plugin | AWS CLI + plugin | ratio |");
    println!("| --- | --- | --- | --- |");
    let ours = s(&[&plugin, "run", DEFAULT_TARGET, "--", "true"]);
    let cli = s(&[
        &o.aws,
        "ssm",
        "start-session",
        "--target",
        DEFAULT_TARGET,
        "--document-name",
        "AWS-StartNonInteractiveCommand",
        "--parameters",
        "command=true",
        "--endpoint-url",
        &sim.endpoint_url(),
    ]);
    compare("`run TARGET -- true`", &ours, &cli, None, &env, o.runs).await?;

    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || !Path::new("/usr/sbin/sshd").exists() {
        eprintln!("ssh figure skipped: needs root and /usr/sbin/sshd");
        return Ok(());
    }
    let key = dir.0.join("id");
    keygen(&key).await?;
    let (_sshd, port) = sshd(&dir.0, &dir.0.join("id.pub")).await?;
    let ssh = |proxy: Option<String>| {
        let mut v = s(&[
            "ssh",
            "-F",
            "/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-i",
        ]);
        v.push(key.display().to_string());
        v.extend(s(&["-p", &port.to_string()]));
        match proxy {
            Some(p) => {
                v.push("-o".into());
                v.push(format!("ProxyCommand={p}"));
                v.push(format!("root@{DEFAULT_TARGET}"));
            }
            // The same login straight to sshd's loopback port.
            None => v.push("root@127.0.0.1".into()),
        }
        v.push("true".into());
        v
    };
    let ours = ssh(Some(format!("{plugin} ssh-proxy %h %p")));
    let cli = ssh(Some(format!(
        "sh -c \"{} ssm start-session --target %h --document-name AWS-StartSSHSession --parameters portNumber=%p --endpoint-url {}\"",
        o.aws,
        sim.endpoint_url()
    )));
    let direct = ssh(None);
    let name = "ssh connect and run `true`";
    compare(name, &ours, &cli, Some(&direct), &env, o.runs).await
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match parse(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench-client: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-client: {e}");
            ExitCode::from(1)
        }
    }
}
