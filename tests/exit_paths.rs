//! How sessions end, end to end through the built plugin against ssm-sim: whatever stdin
//! is, the process exits as soon as the session has ended, with the right status.

mod common;

use std::time::Duration;

use common::*;
use ssm_sim::{SimConfig, StartSessionRequest};

const EXIT: Duration = Duration::from_secs(20);

/// The real agent's order at the end of a command: ExitCode, then its own WebSocket dies
/// and the gateway sends channel_closed while the client's WebSocket stays open. stdin is
/// a pipe the test keeps open for the whole session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_with_stdin_left_open_exits_with_its_code() {
    let sim = start_sim().await;
    let req = StartSessionRequest::non_interactive_command("echo out; exit 3");
    let cfg = SimConfig {
        abrupt_exit: true,
        ..SimConfig::default()
    };
    let mut p = start_plugin(&sim, &req, Some(cfg), &[], true);
    let _stdin = p.stdin.take().expect("stdin pipe");
    let status = p.wait_exit(EXIT).await;
    assert_eq!(status.code(), Some(3), "exit status{}", p.dump());
    let out = p.stdout.text();
    assert!(out.contains("out\n"), "{}", p.dump());
    assert!(
        out.ends_with(&format!(
            "\n\nExiting session with sessionId: {}.\n\n",
            p.session_id
        )),
        "{}",
        p.dump()
    );
}

/// The same with a shell session whose stdin stays open: the remote shell exits on its
/// own (the command asks it to) and the plugin follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interactive_command_with_stdin_left_open_exits() {
    let sim = start_sim().await;
    let req = StartSessionRequest::interactive_command("echo done; exit 5");
    let cfg = SimConfig {
        abrupt_exit: true,
        ..SimConfig::default()
    };
    let mut p = start_plugin(&sim, &req, Some(cfg), &[], true);
    let _stdin = p.stdin.take().expect("stdin pipe");
    let status = p.wait_exit(EXIT).await;
    assert!(p.stdout.text().contains("done"), "{}", p.dump());
    // InteractiveCommands carry no exit code (the remote side is a pty): status 0.
    assert_eq!(status.code(), Some(0), "exit status{}", p.dump());
}
