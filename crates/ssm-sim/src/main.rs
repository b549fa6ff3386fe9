//! `ssm-sim`: run the simulator standalone.
//!
//! ```text
//! ssm-sim serve [--tls] [--listen ADDR] [--latency-ms N] [--pps-cap N] [--loss P]
//!               [--duplicate P] [--reorder P] [--agent-version V] [--seed N]
//!               [--kms-key-id ID] [--agent-chunk-delay-ms N] [--malformed-every N]
//!               [--drop-after-frames N] [--start-publication-quirk] [--resume-changes-cell]
//!     Prints one JSON line {"endpoint_url": ..., "ca_pem_path": ...} and serves until
//!     interrupted (SIGINT/SIGTERM). On SIGUSR1 it prints one `STATS <session stats>` line
//!     per session (Rust debug format) and an `END` line to stderr.
//!
//! ssm-sim demo [--plugin PATH] [--document NAME] [--command CMD] [--parameters JSON]
//!              [--no-tls]
//!     Starts a TLS simulator in-process, calls StartSession (by default a
//!     NonInteractiveCommands session running a short command) and runs the plugin
//!     exactly as the AWS CLI v1 does; exits with the plugin's exit status. The plugin
//!     gets the throwaway CA through AWS_CA_BUNDLE; with --no-tls the simulator serves
//!     plain http/ws instead (for plugins that trust only the system roots, like the
//!     official one) and AWS_CA_BUNDLE is not set. Without --plugin it runs the
//!     session-manager-plugin beside its own executable, building it first when it is
//!     missing (so `cargo run --release -p ssm-sim -- demo` works on a fresh checkout).
//! ```

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;
use ssm_sim::{cli_response_json, DropWebSocket, SimConfig, Simulator, StartSessionRequest};

const USAGE: &str = "usage:
  ssm-sim serve [--tls] [--listen ADDR] [--latency-ms N] [--pps-cap N] [--loss P]
                [--duplicate P] [--reorder P] [--agent-version V] [--seed N]
                [--kms-key-id ID] [--agent-chunk-delay-ms N] [--malformed-every N]
                [--drop-after-frames N] [--start-publication-quirk] [--resume-changes-cell]
  ssm-sim demo [--plugin PATH] [--document NAME] [--command CMD] [--parameters JSON]
               [--no-tls]";

const DEMO_COMMAND: &str = "uname -a; echo \"hello from the simulated instance\"";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ssm-sim: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = match args.first().map(String::as_str) {
        Some("serve") => runtime.block_on(serve(&args[1..])),
        Some("demo") => runtime.block_on(demo(&args[1..])),
        Some("-h" | "--help") => {
            println!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        _ => Err(USAGE.to_owned()),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ssm-sim: {e}");
            ExitCode::from(2)
        }
    }
}

/// Splits `--name value` / `--flag` arguments.
struct Args<'a> {
    rest: std::slice::Iter<'a, String>,
}

impl<'a> Args<'a> {
    fn next_flag(&mut self) -> Option<&'a str> {
        self.rest.next().map(String::as_str)
    }

    fn value<T: std::str::FromStr>(&mut self, flag: &str) -> Result<T, String> {
        let v = self
            .rest
            .next()
            .ok_or_else(|| format!("{flag} needs a value"))?;
        v.parse()
            .map_err(|_| format!("invalid value {v:?} for {flag}"))
    }
}

fn parse_serve(args: &[String]) -> Result<SimConfig, String> {
    let mut cfg = SimConfig::default();
    let mut it = Args { rest: args.iter() };
    while let Some(flag) = it.next_flag() {
        match flag {
            "--tls" => cfg.tls = true,
            "--listen" => cfg.listen = it.value(flag)?,
            "--latency-ms" => cfg.latency = Duration::from_millis(it.value(flag)?),
            "--pps-cap" => cfg.pps_cap = Some(it.value(flag)?),
            "--loss" => cfg.loss = it.value(flag)?,
            "--duplicate" => cfg.duplicate = it.value(flag)?,
            "--reorder" => cfg.reorder = it.value(flag)?,
            "--agent-version" => cfg.agent_version = it.value(flag)?,
            "--seed" => cfg.seed = it.value(flag)?,
            "--kms-key-id" => cfg.kms_key_id = Some(it.value(flag)?),
            "--agent-chunk-delay-ms" => {
                cfg.agent_chunk_delay = Duration::from_millis(it.value(flag)?)
            }
            "--malformed-every" => cfg.malformed_every = Some(it.value(flag)?),
            "--drop-after-frames" => {
                cfg.drop_websocket_after = Some(DropWebSocket::after_frames(it.value(flag)?))
            }
            "--start-publication-quirk" => cfg.start_publication_quirk = true,
            "--resume-changes-cell" => cfg.resume_changes_cell = true,
            other => return Err(format!("unknown option {other}\n{USAGE}")),
        }
    }
    for (name, p) in [
        ("--loss", cfg.loss),
        ("--duplicate", cfg.duplicate),
        ("--reorder", cfg.reorder),
    ] {
        if !(0.0..=1.0).contains(&p) {
            return Err(format!("{name} must be a probability between 0 and 1"));
        }
    }
    Ok(cfg)
}

/// Serves until SIGINT/SIGTERM; prints every session's stats to stderr on SIGUSR1.
async fn wait_for_termination(sim: &Simulator) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    let mut usr1 = signal(SignalKind::user_defined1()).ok();
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return,
            _ = term.recv() => return,
            Some(()) = async {
                match usr1.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                for id in sim.session_ids() {
                    if let Some(mut s) = sim.stats(&id) {
                        s.upgrade_headers.clear();
                        s.open_inputs.clear();
                        eprintln!("STATS {s:?}");
                    }
                }
                eprintln!("END");
            }
        }
    }
}

async fn serve(args: &[String]) -> Result<ExitCode, String> {
    let cfg = parse_serve(args)?;
    let sim = Simulator::start(cfg).await.map_err(|e| e.to_string())?;
    let line = serde_json::json!({
        "endpoint_url": sim.endpoint_url(),
        "ca_pem_path": sim.ca_pem_path().map(|p| p.display().to_string()),
    });
    println!("{line}");
    wait_for_termination(&sim).await;
    drop(sim);
    Ok(ExitCode::SUCCESS)
}

/// `json.dumps` with Python's default separators (", " and ": "), as the CLI prints it.
fn python_json(v: &Value) -> String {
    match v {
        Value::Array(items) => format!(
            "[{}]",
            items.iter().map(python_json).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(map) => format!(
            "{{{}}}",
            map.iter()
                .map(|(k, v)| format!("{}: {}", Value::String(k.clone()), python_json(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => other.to_string(),
    }
}

/// The plugin `demo` runs without `--plugin`: `session-manager-plugin` beside this
/// executable (`target/release/` when started by `cargo run --release -p ssm-sim`),
/// built there first with `cargo build` of the same profile when it is missing and this
/// executable sits in the workspace's target directory.
fn default_plugin() -> Result<String, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot locate ssm-sim: {e}"))?;
    let dir = exe
        .parent()
        .ok_or("cannot locate ssm-sim's directory; pass --plugin PATH")?;
    let name = format!("session-manager-plugin{}", std::env::consts::EXE_SUFFIX);
    let beside = dir.join(&name);
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let profile = dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if !beside.exists() && workspace.join("Cargo.toml").exists() && !profile.is_empty() {
        // cargo names the dev profile's directory `debug`.
        let profile_arg = if profile == "debug" { "dev" } else { profile };
        eprintln!(
            "ssm-sim: {} is missing; building it (cargo build --profile {profile_arg} -p session-manager-plugin)",
            beside.display()
        );
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let mut cmd = std::process::Command::new(cargo);
        cmd.current_dir(&workspace).args([
            "build",
            "--profile",
            profile_arg,
            "-p",
            "session-manager-plugin",
        ]);
        if let Some(target_dir) = dir.parent() {
            cmd.env("CARGO_TARGET_DIR", target_dir);
        }
        let status = cmd.status().map_err(|e| {
            format!("cannot run cargo to build the plugin: {e}; pass --plugin PATH")
        })?;
        if !status.success() {
            return Err(format!(
                "building the plugin failed ({status}); pass --plugin PATH"
            ));
        }
    }
    if !beside.exists() {
        return Err(format!(
            "no plugin at {}; build it (cargo build --release -p session-manager-plugin) or pass --plugin PATH\n{USAGE}",
            beside.display()
        ));
    }
    Ok(beside.display().to_string())
}

async fn demo(args: &[String]) -> Result<ExitCode, String> {
    let mut plugin = None;
    let mut document = "AWS-StartNonInteractiveCommand".to_owned();
    let mut command = None;
    let mut parameters: Option<BTreeMap<String, Vec<String>>> = None;
    let mut tls = true;
    let mut it = Args { rest: args.iter() };
    while let Some(flag) = it.next_flag() {
        match flag {
            "--plugin" => plugin = Some(it.value::<String>(flag)?),
            "--document" => document = it.value(flag)?,
            "--command" => command = Some(it.value::<String>(flag)?),
            "--no-tls" => tls = false,
            "--parameters" => {
                let raw: String = it.value(flag)?;
                parameters = Some(serde_json::from_str(&raw).map_err(|e| {
                    format!("--parameters must be a JSON map of string lists: {e}")
                })?);
            }
            other => return Err(format!("unknown option {other}\n{USAGE}")),
        }
    }
    let plugin = match plugin {
        Some(p) => p,
        None => default_plugin()?,
    };
    let mut parameters = parameters.unwrap_or_default();
    let needs_command = matches!(
        document.as_str(),
        "AWS-StartNonInteractiveCommand" | "AWS-StartInteractiveCommand"
    );
    if needs_command && !parameters.contains_key("command") {
        let cmd = command.unwrap_or_else(|| DEMO_COMMAND.to_owned());
        parameters.insert("command".to_owned(), vec![cmd]);
    }
    let document_name = (!document.is_empty() && document != "SSM-SessionManagerRunShell")
        .then(|| document.clone());

    let sim = Simulator::start(SimConfig {
        tls,
        ..Default::default()
    })
    .await
    .map_err(|e| e.to_string())?;
    let request = StartSessionRequest {
        target: ssm_sim::DEFAULT_TARGET.to_owned(),
        document_name: document_name.clone(),
        parameters: parameters.clone(),
    };
    let resp = sim.start_session(request).map_err(|e| e.to_string())?;

    let mut params = serde_json::Map::new();
    params.insert(
        "Target".into(),
        Value::String(ssm_sim::DEFAULT_TARGET.into()),
    );
    if let Some(d) = &document_name {
        params.insert("DocumentName".into(), Value::String(d.clone()));
    }
    if !parameters.is_empty() {
        params.insert(
            "Parameters".into(),
            serde_json::to_value(&parameters).map_err(|e| e.to_string())?,
        );
    }
    let params = python_json(&Value::Object(params));
    let ca = sim.ca_pem_path().map(|p| p.display().to_string());

    // The AWS CLI ignores these signals while the plugin runs; SIG_IGN survives exec, so
    // the plugin starts with them ignored, exactly as under `aws ssm start-session`.
    for sig in [libc::SIGINT, libc::SIGQUIT, libc::SIGTSTP] {
        // SAFETY: setting a signal disposition to SIG_IGN has no memory-safety impact.
        unsafe {
            libc::signal(sig, libc::SIG_IGN);
        }
    }
    let mut cmd = tokio::process::Command::new(&plugin);
    if let Some(ca) = &ca {
        cmd.env("AWS_CA_BUNDLE", ca);
    } else {
        cmd.env_remove("AWS_CA_BUNDLE");
    }
    let status = cmd
        .arg("AWS_SSM_START_SESSION_RESPONSE")
        .arg("us-east-1")
        .arg("StartSession")
        .arg("")
        .arg(&params)
        .arg(sim.endpoint_url())
        .env("AWS_SSM_START_SESSION_RESPONSE", cli_response_json(&resp))
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .status()
        .await
        .map_err(|e| format!("cannot run {plugin}: {e}"))?;
    let _ = sim
        .wait_closed(&resp.session_id, Duration::from_secs(2))
        .await;
    Ok(match status.code() {
        Some(c) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
        None => ExitCode::from(1),
    })
}
