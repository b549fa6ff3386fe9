//! Runs the built plugin binary as the AWS CLI does (response JSON in argv 1), with a
//! clean environment and no AWS configuration, for the checks that end a session before
//! anything connects (tests/config_validation.rs, tests/stream_url.rs).

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};

pub const PLUGIN: &str = env!("CARGO_BIN_EXE_session-manager-plugin");
pub const TOKEN: &str = "secret-token-value-1234";

/// A scratch HOME, removed on drop.
pub struct Home(pub PathBuf);

impl Home {
    pub fn new(tag: &str) -> Home {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("smp-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&p).expect("create home");
        Home(p)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.0.join("plugin.log")).unwrap_or_default()
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The command for a port session to `stream_url` with `env` on top of a clean base.
pub fn command(home: &Home, stream_url: &str, env: &[(&str, &str)]) -> Command {
    let response = serde_json::json!({
        "SessionId": "s-0123456789abcdef0",
        "TokenValue": TOKEN,
        "StreamUrl": stream_url,
    })
    .to_string();
    let params = r#"{"Target":"i-0123456789abcdef0","DocumentName":"AWS-StartPortForwardingSession","Parameters":{"portNumber":["22"],"localPortNumber":["0"]}}"#;
    let mut cmd = Command::new(PLUGIN);
    cmd.args([
        response.as_str(),
        "us-east-1",
        "StartSession",
        "",
        params,
        "https://ssm.us-east-1.amazonaws.com",
    ])
    .env_clear()
    .env("PATH", std::env::var("PATH").unwrap_or_default())
    .env("HOME", &home.0)
    .env("AWS_ACCESS_KEY_ID", "test")
    .env("AWS_SECRET_ACCESS_KEY", "test")
    .env("AWS_REGION", "us-east-1")
    .env("AWS_EC2_METADATA_DISABLED", "true")
    .env("AWS_CONFIG_FILE", home.0.join("no-config"))
    .env("AWS_SHARED_CREDENTIALS_FILE", home.0.join("no-credentials"))
    .env("SSM_PLUGIN_LOG", "debug")
    .env("SSM_PLUGIN_LOG_FILE", home.0.join("plugin.log"))
    .envs(env.iter().copied())
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    cmd
}

/// Runs to completion (the checks under test end the process at once).
pub fn run(home: &Home, stream_url: &str, env: &[(&str, &str)]) -> Output {
    command(home, stream_url, env)
        .output()
        .expect("run session-manager-plugin")
}

/// Starts the plugin without waiting (for a run that is expected to connect).
pub fn spawn(home: &Home, stream_url: &str, env: &[(&str, &str)]) -> Child {
    command(home, stream_url, env)
        .spawn()
        .expect("spawn session-manager-plugin")
}
