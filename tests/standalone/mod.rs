//! Harness of the standalone-client tests: moto's EC2 server on loopback (instances
//! created with `Name` tags through boto3, moto's own dependency), the plugin run with its
//! subcommands against ssm-sim (SSM, EC2 Instance Connect) and moto (EC2), a private
//! tmux server, and an sshd that accepts only keys pushed in the last 60 s.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use ssm_sim::Simulator;
use tokio::process::{Child, Command};

use crate::common::*;

// ---- moto -----------------------------------------------------------------------------

/// A moto server (killed on drop).
pub struct Moto {
    child: Child,
    pub url: String,
    dir: TempDir,
}

/// An instance moto created.
#[derive(Debug, Clone)]
pub struct Instance {
    pub id: String,
    pub name: String,
    pub ip: String,
    pub dns: String,
}

impl Moto {
    /// Starts `moto_server` on a free loopback port (installed by .ci/install-deps).
    pub async fn start() -> Moto {
        let dir = TempDir::new("moto");
        let port = free_port();
        let log = std::fs::File::create(dir.join("moto.log")).expect("moto log");
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("moto_server not found: pip install 'moto[server]' (see .ci/install-deps)");
        let mut m = Moto {
            child,
            url: format!("http://127.0.0.1:{port}"),
            dir,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return m;
            }
            if let Ok(Some(s)) = m.child.try_wait() {
                panic!("moto_server exited with {s}: {}", m.log());
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "moto_server did not listen: {}",
                m.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("moto.log")).unwrap_or_default()
    }

    /// Runs a boto3 snippet against the server; `ec2` is the client. Returns stdout.
    async fn python(&self, code: &str) -> String {
        let script = format!(
            "import boto3, json, sys\nec2 = boto3.client('ec2', endpoint_url='{}', region_name='{REGION}', \
             aws_access_key_id='test', aws_secret_access_key='test')\n{code}\n",
            self.url
        );
        let mut cmd = Command::new("python3");
        cmd.arg("-c").arg(script);
        let out = run_cmd(cmd, Duration::from_secs(60)).await;
        assert!(
            out.status.success(),
            "boto3 against moto failed: {}\nmoto: {}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Creates one running instance per name (its `Name` tag).
    pub async fn create(&self, names: &[&str]) -> Vec<Instance> {
        let names = serde_json::to_string(names).expect("names");
        let out = self
            .python(&format!(
                "out = []\nfor n in {names}:\n    i = ec2.run_instances(ImageId='ami-12c6146b', MinCount=1, MaxCount=1, \
                 TagSpecifications=[{{'ResourceType': 'instance', 'Tags': [{{'Key': 'Name', 'Value': n}}]}}])['Instances'][0]\n    \
                 out.append({{'id': i['InstanceId'], 'name': n, 'ip': i['PrivateIpAddress'], 'dns': i['PrivateDnsName']}})\n\
                 print(json.dumps(out))"
            ))
            .await;
        let v: Vec<Value> = serde_json::from_str(out.trim()).expect("instances JSON");
        v.iter()
            .map(|i| Instance {
                id: i["id"].as_str().unwrap_or_default().to_owned(),
                name: i["name"].as_str().unwrap_or_default().to_owned(),
                ip: i["ip"].as_str().unwrap_or_default().to_owned(),
                dns: i["dns"].as_str().unwrap_or_default().to_owned(),
            })
            .collect()
    }

    /// Stops an instance (it then no longer matches: only running ones do).
    pub async fn stop(&self, id: &str) {
        self.python(&format!("ec2.stop_instances(InstanceIds=['{id}'])"))
            .await;
    }
}

// ---- the plugin's subcommands ---------------------------------------------------------

/// The environment of a standalone-client run: the plugin's usual test environment, SSM
/// and EC2 Instance Connect at the simulator, EC2 at moto (when given), the config
/// directory in `home`.
pub fn cli_env(sim: &Simulator, moto: Option<&Moto>, home: &Path) -> Vec<(String, String)> {
    let mut env = base_env(sim, home);
    env.push(("AWS_ENDPOINT_URL_SSM".into(), sim.endpoint_url()));
    env.push((
        "AWS_ENDPOINT_URL_EC2_INSTANCE_CONNECT".into(),
        sim.endpoint_url(),
    ));
    // Without moto, EC2 goes to a closed port (fails fast).
    let ec2 = moto
        .map(|m| m.url.clone())
        .unwrap_or_else(|| "http://127.0.0.1:9".into());
    env.push(("AWS_ENDPOINT_URL_EC2".into(), ec2));
    env.push((
        "XDG_CONFIG_HOME".into(),
        home.join("config").display().to_string(),
    ));
    env
}

/// `session-manager-plugin ARGS…` with [`cli_env`], stdin from /dev/null.
pub fn cli(sim: &Simulator, moto: Option<&Moto>, home: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(PLUGIN);
    cmd.args(args)
        .env_clear()
        .envs(cli_env(sim, moto, home))
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// Runs a command to its end; returns (status code, stdout, stderr).
pub async fn output(cmd: Command) -> (Option<i32>, String, String) {
    let out = run_cmd(cmd, Duration::from_secs(60)).await;
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The StartSession calls the simulator received, as JSON bodies.
pub fn start_calls(sim: &Simulator) -> Vec<Value> {
    sim.api_calls()
        .iter()
        .filter(|c| c.target == "AmazonSSM.StartSession")
        .map(|c| serde_json::from_str(&c.body).unwrap_or(Value::Null))
        .collect()
}

// ---- tmux -----------------------------------------------------------------------------

/// A private tmux server with one detached session; killed on drop.
pub struct Tmux {
    sock: PathBuf,
    conf: PathBuf,
    home: PathBuf,
}

const STEP: Duration = Duration::from_secs(20);

impl Tmux {
    pub async fn start(dir: &Path, command: &str, cols: u16, rows: u16) -> Tmux {
        let t = Tmux {
            sock: dir.join("tmux.sock"),
            conf: dir.join("tmux.conf"),
            home: dir.to_path_buf(),
        };
        std::fs::write(
            &t.conf,
            "set -g status off\nset -g remain-on-exit on\nset -g history-limit 5000\n",
        )
        .expect("write tmux.conf");
        let (cols, rows) = (cols.to_string(), rows.to_string());
        t.run(&[
            "new-session",
            "-d",
            "-s",
            "t",
            "-x",
            &cols,
            "-y",
            &rows,
            command,
        ])
        .await;
        t
    }

    pub async fn run(&self, args: &[&str]) -> String {
        let mut c = Command::new("tmux");
        c.arg("-S")
            .arg(&self.sock)
            .arg("-f")
            .arg(&self.conf)
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", &self.home)
            .env("TERM", "xterm")
            .kill_on_drop(true);
        let out = match tokio::time::timeout(STEP, c.output()).await {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => panic!("cannot run tmux: {e}"),
            Err(_) => panic!("tmux {args:?} hung"),
        };
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub async fn send_text(&self, text: &str) {
        self.run(&["send-keys", "-t", "t", "-l", text]).await;
    }

    pub async fn send_key(&self, key: &str) {
        self.run(&["send-keys", "-t", "t", key]).await;
    }

    pub async fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-J", "-S", "-", "-t", "t"])
            .await
    }

    /// Waits until the screen satisfies `pred`; panics with the screen on timeout.
    pub async fn wait(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let s = self.screen().await;
            if pred(&s) {
                return s;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; screen:\n{s}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = std::process::Command::new("tmux")
            .arg("-S")
            .arg(&self.sock)
            .arg("kill-server")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A shell script that runs `plugin args…` with `env`, then prints its exit status, so a
/// tmux pane shows it.
pub fn pane_script(dir: &Path, env: &[(String, String)], args: &[&str]) -> String {
    let q = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let mut line = String::from("env -i");
    for (k, v) in env {
        line.push_str(&format!(" {k}={}", q(v)));
    }
    line.push_str(" TERM=xterm ");
    line.push_str(&q(PLUGIN));
    for a in args {
        line.push(' ');
        line.push_str(&q(a));
    }
    let script = format!("#!/bin/sh\n{line}\necho \"exit-status=$?\"\n");
    let path = dir.join("pane.sh");
    std::fs::write(&path, script).expect("pane script");
    format!("sh {}", path.display())
}

// ---- sshd -----------------------------------------------------------------------------

pub const SSHD: &str = "/usr/sbin/sshd";

/// Why sshd cannot run here, if it cannot.
pub fn sshd_unavailable() -> Option<String> {
    if !Path::new(SSHD).exists() {
        return Some(format!(
            "{SSHD} missing (apt-get install -y openssh-server)"
        ));
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("sshd needs root to run with its own config".into());
    }
    None
}

pub async fn keygen(path: &Path) {
    let mut cmd = Command::new("ssh-keygen");
    cmd.args(["-q", "-t", "ed25519", "-N", "", "-C", "e2e", "-f"])
        .arg(path);
    let out = run_cmd(cmd, Duration::from_secs(20)).await;
    assert!(out.status.success(), "ssh-keygen failed");
}

pub struct Sshd {
    child: Child,
    pub port: u16,
    pub dir: TempDir,
}

impl Sshd {
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sshd.log")).unwrap_or_default()
    }
}

/// A loopback sshd whose only source of authorized keys is the simulator: its
/// `AuthorizedKeysCommand` asks for the keys pushed for `instance_id` and the user in the
/// last 60 seconds.
pub async fn start_sshd_instance_connect(sim: &Simulator, instance_id: &str) -> Sshd {
    let dir = TempDir::new("sshd");
    keygen(&dir.join("host_key")).await;
    let _ = std::fs::create_dir_all("/run/sshd");
    let port = free_port();
    let ca = sim.ca_pem_path().expect("CA").display().to_string();
    let keys_url = format!(
        "{}/ec2-instance-connect/keys?instance={instance_id}&user=%u",
        sim.endpoint_url()
    );
    let cfg = format!(
        "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nAuthorizedKeysFile none\n\
         AuthorizedKeysCommand /usr/bin/curl -sS --fail --cacert {ca} {keys_url}\n\
         AuthorizedKeysCommandUser root\n\
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
        .stdin(Stdio::null())
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
        assert!(
            tokio::time::Instant::now() < deadline,
            "sshd did not listen: {}",
            sshd.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
