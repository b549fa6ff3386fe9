//! The standalone client's session subcommands (`start-session`, `run`, `shell
//! --record`) and its local ones (`--help`, `completions`, `ssh-config`, config errors),
//! the built binary against ssm-sim over TLS. Targets here are ids (no EC2 involved).

mod common;
mod standalone;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use standalone::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn help_lists_every_subcommand_and_the_contract_is_untouched() {
    let sim = start_sim().await;
    let home = TempDir::new("cli");
    let (code, out, _) = output(cli(&sim, None, home.path(), &["--help"])).await;
    assert_eq!(code, Some(0));
    for sub in [
        "start-session",
        "shell",
        "run",
        "forward",
        "ssh-proxy",
        "ssh-config",
        "list",
        "tunnel",
        "completions",
    ] {
        assert!(
            out.contains(&format!("  {sub} ")),
            "{sub} missing from --help:\n{out}"
        );
    }
    for sub in ["start-session", "run", "forward", "ssh-proxy", "tunnel"] {
        let (code, out, _) = output(cli(&sim, None, home.path(), &[sub, "--help"])).await;
        assert_eq!(code, Some(0), "{sub} --help");
        assert!(
            out.contains("Usage: session-manager-plugin"),
            "{sub}: {out}"
        );
    }
    // The AWS CLI's argv forms are still the plugin's: --version, no arguments, and an
    // unknown first argument.
    let (code, out, _) = output(cli(&sim, None, home.path(), &["--version"])).await;
    assert_eq!((code, out.as_str()), (Some(0), "1.3.0.0\n"));
    let (code, out, _) = output(cli(&sim, None, home.path(), &[])).await;
    assert_eq!(code, Some(0));
    assert!(out.contains("installed successfully"), "{out}");
    let (code, out, _) = output(cli(&sim, None, home.path(), &["shells"])).await;
    assert_eq!(code, Some(2));
    assert!(out.contains("Unknown operation shells"), "{out}");
    // A bad flag is a usage error (2), not a session failure.
    let (code, _, err) = output(cli(&sim, None, home.path(), &["run", "--bogus"])).await;
    assert_eq!(code, Some(2), "{err}");
}

/// `run`: the remote exit code is the status (not 255), stdout and stderr kept apart,
/// stdout holds only the command's output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_keeps_streams_apart_and_returns_the_exit_code() {
    let sim = start_sim().await;
    let home = TempDir::new("cli");
    let args = [
        "run",
        TARGET,
        "--",
        "sh",
        "-c",
        "echo to-out; echo to-err >&2; exit 3",
    ];
    let (code, out, err) = output(cli(&sim, None, home.path(), &args)).await;
    assert_eq!(code, Some(3), "stdout {out:?} stderr {err:?}");
    assert_eq!(out, "to-out\n", "stderr: {err}");
    assert!(err.contains("to-err\n"), "{err}");
    assert!(!err.contains("to-out"), "{err}");
    let calls = start_calls(&sim);
    assert_eq!(calls.len(), 1);
    assert_eq!(
        calls[0],
        json!({"Target": TARGET, "DocumentName": "AWS-StartNonInteractiveCommand",
               "Parameters": {"command": ["sh -c 'echo to-out; echo to-err >&2; exit 3'"]}})
    );
    // Signed as SSM with the caller's region.
    let call = &sim.api_calls()[0];
    let auth = call.header("authorization").unwrap_or_default();
    assert!(auth.contains("/us-east-1/ssm/aws4_request"), "{auth}");

    let (code, out, _) = output(cli(&sim, None, home.path(), &["run", TARGET, "--", "true"])).await;
    assert_eq!((code, out.as_str()), (Some(0), ""));
}

/// `start-session` with the AWS CLI's flags: JSON, shorthand and file:// parameters,
/// --reason, and --endpoint-url in place of AWS_ENDPOINT_URL_SSM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_session_takes_the_cli_flags() {
    let sim = start_sim().await;
    let home = TempDir::new("cli");
    let params_file = home.join("params.json");
    std::fs::write(&params_file, r#"{"command": ["echo from-file"]}"#).expect("params");
    let file_arg = format!("file://{}", params_file.display());
    for (params, want) in [
        (r#"{"command":["echo from-json"]}"#, "from-json"),
        (r#"command="echo from-shorthand""#, "from-shorthand"),
        (file_arg.as_str(), "from-file"),
    ] {
        let mut cmd = cli(
            &sim,
            None,
            home.path(),
            &[
                "start-session",
                "--target",
                TARGET,
                "--document-name",
                "AWS-StartNonInteractiveCommand",
                "--parameters",
                params,
                "--reason",
                "ticket 42",
                "--endpoint-url",
                &sim.endpoint_url(),
            ],
        );
        cmd.env_remove("AWS_ENDPOINT_URL_SSM");
        let (code, out, err) = output(cmd).await;
        assert_eq!(code, Some(0), "{params}: {err}");
        assert!(out.contains(&format!("{want}\n")), "{params}: {out}");
        // Like the plugin under the AWS CLI: the status lines are on stdout.
        assert!(
            out.contains("Starting session with SessionId: sim-"),
            "{out}"
        );
    }
    let calls = start_calls(&sim);
    assert_eq!(calls.len(), 3);
    assert!(
        calls.iter().all(|c| c["Reason"] == "ticket 42"),
        "{calls:?}"
    );
    assert_eq!(
        calls[2]["Parameters"],
        json!({"command": ["echo from-file"]})
    );

    // Bad parameters: status 2 and no StartSession.
    let (code, _, err) = output(cli(
        &sim,
        None,
        home.path(),
        &["start-session", "--target", TARGET, "--parameters", "{nope"],
    ))
    .await;
    assert_eq!(code, Some(2));
    assert!(err.contains("--parameters: invalid JSON"), "{err}");
    // The service refusing: its error, status 1.
    let (code, _, err) = output(cli(
        &sim,
        None,
        home.path(),
        &[
            "start-session",
            "--target",
            TARGET,
            "--document-name",
            "AWS-NoSuchDocument",
        ],
    ))
    .await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("StartSession failed"), "{err}");
    assert_eq!(start_calls(&sim).len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_and_ssh_config() {
    let sim = start_sim().await;
    let home = TempDir::new("cli");
    for shell in ["bash", "zsh", "fish", "powershell"] {
        let (code, out, err) = output(cli(&sim, None, home.path(), &["completions", shell])).await;
        assert_eq!(code, Some(0), "{shell}: {err}");
        assert!(
            out.contains("ssh-proxy") && out.contains("session-manager-plugin"),
            "{shell}: {out}"
        );
    }
    let (code, _, _) = output(cli(&sim, None, home.path(), &["completions", "tcsh"])).await;
    assert_eq!(code, Some(2));
    // The bash script loads in bash and completes the subcommand names.
    let (_, script, _) = output(cli(&sim, None, home.path(), &["completions", "bash"])).await;
    let path = home.join("c.bash");
    std::fs::write(&path, script).expect("script");
    let mut bash = tokio::process::Command::new("bash");
    bash.arg("-c").arg(format!(
        "source {}; COMP_WORDS=(session-manager-plugin ssh-); COMP_CWORD=1; \
         _session__manager__plugin session-manager-plugin ssh- session-manager-plugin; echo \"${{COMPREPLY[@]}}\"",
        path.display()
    ));
    let (code, out, err) = output(bash).await;
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.trim(), "ssh-proxy ssh-config", "{err}");

    let (code, out, _) = output(cli(
        &sim,
        None,
        home.path(),
        &[
            "ssh-config",
            "--user",
            "ec2-user",
            "--push-key",
            "/k/id.pub",
        ],
    ))
    .await;
    assert_eq!(code, Some(0));
    assert!(out.contains("Host i-* mi-*\n"), "{out}");
    assert!(
        out.contains(&format!(
            "    ProxyCommand {PLUGIN} ssh-proxy %h %p --user %r --push-key /k/id.pub\n"
        )),
        "{out}"
    );
    assert!(
        out.contains("    User ec2-user\n    IdentityFile /k/id\n"),
        "{out}"
    );
}

/// A bad config file fails every AWS subcommand with the file, the line and the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_config_names_file_line_and_field() {
    let sim = start_sim().await;
    let home = TempDir::new("cli");
    let dir = home.join("config/session-manager-plugin");
    std::fs::create_dir_all(&dir).expect("config dir");
    let file = dir.join("config.toml");
    std::fs::write(
        &file,
        "[defaults]\nregion = \"eu-west-3\"\n\n[tunnels.db]\ntarget = \"x\"\nfrward = []\n",
    )
    .expect("config");
    let (code, _, err) = output(cli(&sim, None, home.path(), &["run", TARGET, "--", "true"])).await;
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!("config file {}:6: ", file.display())) && err.contains("frward"),
        "{err}"
    );
    assert!(start_calls(&sim).is_empty());

    // Fixed, its [defaults] region applies when neither --region nor AWS_REGION is set.
    std::fs::write(&file, "[defaults]\nregion = \"eu-west-3\"\n").expect("config");
    let mut cmd = cli(&sim, None, home.path(), &["run", TARGET, "--", "true"]);
    cmd.env_remove("AWS_REGION");
    let (code, _, err) = output(cmd).await;
    assert_eq!(code, Some(0), "{err}");
    let auth = sim.api_calls()[0]
        .header("authorization")
        .unwrap_or_default()
        .to_owned();
    assert!(auth.contains("/eu-west-3/ssm/aws4_request"), "{auth}");
    let (code, _, err) = output(cli(&sim, None, home.path(), &["tunnel", "nope"])).await;
    assert_eq!(code, Some(2));
    assert!(err.contains("no tunnel \"nope\""), "{err}");
}

/// `shell --record`: the session in tmux; the transcript is asciicast v2 and its output
/// events hold what the terminal showed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_record_writes_asciicast_v2() {
    let sim = start_sim().await;
    let home = TempDir::new("cli");
    let cast = home.join("s.cast");
    let env = cli_env(&sim, None, home.path());
    let cast_arg = cast.display().to_string();
    let script = pane_script(home.path(), &env, &["shell", TARGET, "--record", &cast_arg]);
    let tmux = Tmux::start(home.path(), &script, 100, 30).await;
    tmux.wait("the shell prompt", |s| {
        s.contains("Starting session with SessionId")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    tmux.send_text("echo rec-$((6*7))").await;
    tmux.send_key("Enter").await;
    tmux.wait("the command's output", |s| {
        s.lines().any(|l| l.trim() == "rec-42")
    })
    .await;
    tmux.send_text("exit").await;
    tmux.send_key("Enter").await;
    let screen = tmux
        .wait("the exit status", |s| s.contains("exit-status="))
        .await;
    assert!(screen.contains("exit-status=0"), "{screen}");

    let text = std::fs::read_to_string(&cast).expect("the transcript");
    let mut lines = text.lines();
    let header: Value = serde_json::from_str(lines.next().expect("header")).expect("header JSON");
    assert_eq!(header["version"], 2);
    assert_eq!(
        (header["width"].as_u64(), header["height"].as_u64()),
        (Some(100), Some(30))
    );
    let mut output = String::new();
    let mut last = 0.0;
    for l in lines {
        let e: Value = serde_json::from_str(l).expect("event JSON");
        let t = e[0].as_f64().expect("time");
        assert!(t >= last, "events in time order");
        last = t;
        if e[1] == "o" {
            output.push_str(e[2].as_str().expect("data"));
        }
    }
    assert!(
        output.contains("Starting session with SessionId"),
        "{output}"
    );
    assert!(
        output.contains("echo rec-$((6*7))"),
        "the echoed input: {output}"
    );
    assert!(output.contains("rec-42"), "{output}");
}
