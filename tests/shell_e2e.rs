//! Shell and command sessions end to end (issue 4, items 1–2), through a real terminal.
//!
//! The built plugin runs against ssm-sim over TLS, invoked exactly as the AWS CLI invokes
//! it (env-var form, `AWS_CA_BUNDLE`, dummy credentials, a throwaway HOME). Interactive
//! sessions run inside tmux on a private server socket: keys are typed with `send-keys`,
//! the screen is read with `capture-pane`, and a small wrapper script records `stty -g`
//! of the pane before and after the plugin plus the plugin's exit status, so that raw
//! mode, its restoration and the exit status are observed from the outside. Command
//! sessions and piped stdin use plain pipes (tests/common).
//!
//! Every wait is a poll with a deadline; a failure prints the screen and the plugin log.
//! Linux only (tmux, `/proc`).

#![cfg(target_os = "linux")]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use ssm_sim::{cli_response_json, SimConfig, Simulator, StartSessionRequest};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tokio::time::Instant;

/// From plugin start to the first prompt.
const START: Duration = Duration::from_secs(30);
/// One command's round trip.
const STEP: Duration = Duration::from_secs(15);
/// From the last key to the plugin's exit.
const EXIT: Duration = Duration::from_secs(20);
/// The remote shell's prompt (set through PS1, so it cannot be confused with output).
const PROMPT: &str = "simsh$";
/// The tmux session name (each test has its own tmux server).
const TMUX_TARGET: &str = "e2e";

/// A simulator whose shell sessions run `/bin/sh` with a recognisable prompt.
async fn shell_sim(kms_key_id: Option<&str>) -> Simulator {
    start_sim_with(shell_config(kms_key_id)).await
}

fn shell_config(kms_key_id: Option<&str>) -> SimConfig {
    SimConfig {
        shell: vec![
            "/usr/bin/env".into(),
            format!("PS1={PROMPT} "),
            "/bin/sh".into(),
        ],
        kms_key_id: kms_key_id.map(str::to_owned),
        ..Default::default()
    }
}

/// Single-quotes `s` for sh.
fn sq(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Whether some line of `screen` is exactly `line` (trailing blanks ignored).
fn has_line(screen: &str, line: &str) -> bool {
    screen.lines().any(|l| l.trim_end() == line)
}

// ---- tmux -----------------------------------------------------------------------------

/// A private tmux server (own socket and config) with one session; killed on drop.
struct Tmux {
    sock: PathBuf,
    conf: PathBuf,
    home: PathBuf,
}

impl Tmux {
    /// Starts a detached `cols` × `rows` session running `command` (status line off, so the
    /// pane is exactly that size; the dead pane stays readable after `command` ends).
    async fn start(dir: &Path, command: &str, cols: u16, rows: u16) -> Tmux {
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
            TMUX_TARGET,
            "-x",
            &cols,
            "-y",
            &rows,
            command,
        ])
        .await;
        t
    }

    fn command(&self) -> Command {
        let mut c = Command::new("tmux");
        c.arg("-S")
            .arg(&self.sock)
            .arg("-f")
            .arg(&self.conf)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", &self.home)
            .kill_on_drop(true);
        c
    }

    /// Runs one tmux command and returns its stdout; panics if it fails or hangs.
    async fn run(&self, args: &[&str]) -> String {
        let mut c = self.command();
        c.args(args);
        let out = match tokio::time::timeout(STEP, c.output()).await {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => panic!("cannot run tmux (is it installed?): {e}"),
            Err(_) => panic!("tmux {args:?} hung for {STEP:?}"),
        };
        assert!(
            out.status.success(),
            "tmux {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Types `text` literally (no key names).
    async fn send_text(&self, text: &str) {
        self.run(&["send-keys", "-t", TMUX_TARGET, "-l", text])
            .await;
    }

    /// Presses one named key (`Enter`, `C-c`).
    async fn send_key(&self, key: &str) {
        self.run(&["send-keys", "-t", TMUX_TARGET, key]).await;
    }

    /// Types `text` and presses Enter.
    async fn type_line(&self, text: &str) {
        self.send_text(text).await;
        self.send_key("Enter").await;
    }

    /// The whole pane: history and visible screen, wrapped lines joined.
    async fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-J", "-S", "-", "-t", TMUX_TARGET])
            .await
    }

    /// A tmux format value of the pane (`#{pane_tty}`, ...).
    async fn display(&self, format: &str) -> String {
        self.run(&["display-message", "-p", "-t", TMUX_TARGET, format])
            .await
            .trim()
            .to_owned()
    }

    async fn resize(&self, cols: u16, rows: u16) {
        let (cols, rows) = (cols.to_string(), rows.to_string());
        self.run(&["resize-window", "-t", TMUX_TARGET, "-x", &cols, "-y", &rows])
            .await;
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        // Blocking on purpose: drop cannot await, and kill-server returns at once. The
        // panes get SIGHUP, which ends a plugin still running.
        let _ = std::process::Command::new("tmux")
            .arg("-S")
            .arg(&self.sock)
            .arg("kill-server")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

// ---- a plugin in a terminal -----------------------------------------------------------

/// A session whose plugin runs in a tmux pane through a wrapper script that records
/// `stty -g` before (`before.stty`) and after (`after.stty`), the plugin's pid
/// (`plugin.pid`) and its exit status (`status`, written last).
struct TermSession {
    // Field order is drop order: the tmux server (and the plugin) first, the simulator last.
    tmux: Tmux,
    dir: TempDir,
    sim: Simulator,
    id: String,
}

impl TermSession {
    async fn start(sim: Simulator, req: StartSessionRequest) -> TermSession {
        TermSession::start_with(sim, req, &[]).await
    }

    /// With extra environment for the plugin.
    async fn start_with(
        sim: Simulator,
        req: StartSessionRequest,
        env: &[(&str, &str)],
    ) -> TermSession {
        let resp = sim.start_session(req.clone()).expect("StartSession");
        let dir = TempDir::new("sh");
        let d = dir.path();
        std::fs::write(d.join("resp.json"), cli_response_json(&resp)).expect("write resp.json");
        let mut script = String::from("#!/bin/sh\n");
        let extra = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned()));
        for (k, v) in base_env(&sim, d).into_iter().chain(extra) {
            script.push_str(&format!("export {k}={}\n", sq(&v)));
        }
        script.push_str(&format!(
            "export AWS_SSM_START_SESSION_RESPONSE=\"$(cat {})\"\n",
            sq(&d.join("resp.json").display().to_string())
        ));
        script.push_str(&format!("cd {} || exit 99\n", sq(&d.display().to_string())));
        // As under `aws ssm start-session`: the plugin starts with these ignored.
        script.push_str("trap '' INT QUIT TSTP\n");
        script.push_str("stty -g > before.stty\n");
        let mut argv = vec![sq(PLUGIN)];
        argv.extend(plugin_args(&sim, &req).iter().map(|a| sq(a)));
        // The inner sh records its pid and becomes the plugin (exec), in the foreground.
        script.push_str(&format!(
            "sh -c 'echo $$ > plugin.pid; exec \"$@\"' sh {}\n",
            argv.join(" ")
        ));
        script.push_str(
            "rc=$?\nstty -g > after.stty\necho \"$rc\" > status.tmp\nmv status.tmp status\n",
        );
        let script_path = d.join("run.sh");
        std::fs::write(&script_path, script).expect("write run.sh");
        let tmux = Tmux::start(
            d,
            &format!("sh {}", sq(&script_path.display().to_string())),
            100,
            30,
        )
        .await;
        TermSession {
            tmux,
            dir,
            sim,
            id: resp.session_id,
        }
    }

    fn file(&self, name: &str) -> Option<String> {
        std::fs::read_to_string(self.dir.join(name)).ok()
    }

    /// Screen, files and plugin log, for failure messages.
    async fn dump(&self) -> String {
        let log = self.file("plugin.log").unwrap_or_default();
        let tail = log
            .char_indices()
            .rev()
            .nth(6000)
            .map_or(&log[..], |(i, _)| &log[i..]);
        format!(
            "\n--- screen:\n{}\n--- status: {:?}\n--- sim stats: {:?}\n--- plugin log tail:\n{tail}\n",
            self.tmux.screen().await,
            self.file("status"),
            self.sim.stats(&self.id)
        )
    }

    /// Polls the screen until `pred` holds; panics with a dump after `timeout`.
    async fn wait_screen(&self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(&self.tmux.screen().await) {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {what}{}",
                    self.dump().await
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until some screen line is exactly `line`.
    async fn wait_line(&self, line: &str, timeout: Duration) {
        self.wait_screen(&format!("the line {line:?}"), timeout, |s| {
            has_line(s, line)
        })
        .await;
    }

    /// Waits for the starting line and the first prompt.
    async fn wait_started(&self) {
        let starting = format!("Starting session with SessionId: {}", self.id);
        self.wait_screen("the starting line and a prompt", START, |s| {
            s.contains(&starting) && s.lines().any(|l| l.trim_end().starts_with(PROMPT))
        })
        .await;
    }

    /// Waits for the wrapper to record the plugin's exit status.
    async fn wait_status(&self, timeout: Duration) -> i32 {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.file("status") {
                return s
                    .trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("bad status file {s:?}"));
            }
            if Instant::now() >= deadline {
                panic!(
                    "the plugin did not exit within {timeout:?}{}",
                    self.dump().await
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn plugin_pid(&self) -> i32 {
        let pid: i32 = self
            .file("plugin.pid")
            .and_then(|s| s.trim().parse().ok())
            .expect("plugin.pid written by the wrapper");
        let argv = cmdline(pid).expect("the plugin process is running");
        assert_eq!(argv.first().map(String::as_str), Some(PLUGIN), "{argv:?}");
        pid
    }

    /// `stty -a` of the pane's terminal, read from outside while the plugin runs.
    async fn pane_stty(&self) -> Vec<String> {
        let tty = self.tmux.display("#{pane_tty}").await;
        let out = tokio::time::timeout(
            STEP,
            Command::new("stty")
                .arg("-a")
                .arg("-F")
                .arg(&tty)
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("stty -F hung")
        .expect("run stty");
        assert!(
            out.status.success(),
            "stty -a -F {tty}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    }

    /// The pane's terminal is in raw mode (no echo, no line editing, no signal keys).
    async fn assert_raw(&self) {
        let flags = self.pane_stty().await;
        for f in ["-icanon", "-echo", "-isig"] {
            assert!(
                flags.iter().any(|x| x == f),
                "terminal not in raw mode during the session: {f} missing from {flags:?}"
            );
        }
    }

    /// `stty -g` after the plugin equals `stty -g` before it.
    fn assert_restored(&self) {
        let before = self.file("before.stty").expect("before.stty");
        let after = self.file("after.stty").expect("after.stty");
        assert!(!before.trim().is_empty(), "no stty -g recorded");
        assert_eq!(
            before, after,
            "the terminal settings were not restored after the plugin exited"
        );
    }
}

/// argv of a process, `None` if it is gone.
fn cmdline(pid: i32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// Pids of processes whose argv is exactly `argv`.
fn find_processes(argv: &[&str]) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| cmdline(pid).is_some_and(|a| a == argv))
        .collect()
}

// ---- shell sessions in a terminal -----------------------------------------------------

/// Prompt, a command, the remote terminal size before and after a resize (SIGWINCH),
/// `exit` with the closing line and status 0, and the terminal restored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_runs_commands_follows_resizes_and_exits_cleanly() {
    let s = TermSession::start(shell_sim(None).await, StartSessionRequest::shell()).await;
    s.wait_started().await;
    s.assert_raw().await;

    s.tmux.type_line("echo $((6*7))").await;
    s.wait_line("42", STEP).await;

    s.tmux.type_line("echo sz-$(stty size)").await;
    s.wait_line("sz-30 100", STEP).await;

    s.tmux.resize(120, 40).await;
    // The new size must reach the agent on its own (SIGWINCH); type only once it has, so
    // the `stty size` below cannot race the Size message.
    let sized = poll_until(STEP, || {
        s.sim
            .stats(&s.id)
            .filter(|st| st.sizes_received.last() == Some(&(120, 40)))
    })
    .await;
    if sized.is_none() {
        panic!("no Size 120x40 after the resize{}", s.dump().await);
    }
    s.tmux.type_line("echo sz-$(stty size)").await;
    s.wait_line("sz-40 120", STEP).await;

    s.tmux.type_line("exit").await;
    let status = s.wait_status(EXIT).await;
    let screen = s.tmux.screen().await;
    assert!(
        has_line(
            &screen,
            &format!("Exiting session with sessionId: {}.", s.id)
        ),
        "no closing line{}",
        s.dump().await
    );
    assert_eq!(status, 0, "exit status{}", s.dump().await);
    s.assert_restored();
    let stats = s
        .sim
        .wait_closed(&s.id, STEP)
        .await
        .expect("session closed");
    assert_eq!(stats.sizes_received.first(), Some(&(100, 30)), "{stats:?}");
}

/// Ctrl-C typed locally interrupts a remote `sleep` (its status is 130, SIGINT) and the
/// shell takes commands again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_interrupts_a_remote_command() {
    let s = TermSession::start(shell_sim(None).await, StartSessionRequest::shell()).await;
    s.wait_started().await;
    // A duration no other test uses, to find this sleep among the machine's processes.
    let secs = (100_000 + std::process::id() % 100_000).to_string();
    s.tmux.type_line(&format!("sleep {secs}")).await;
    let running = poll_until(STEP, || {
        let p = find_processes(&["sleep", &secs]);
        (!p.is_empty()).then_some(p)
    })
    .await;
    let Some(pids) = running else {
        panic!("the remote sleep did not start{}", s.dump().await);
    };
    s.tmux.send_key("C-c").await;
    let gone = poll_until(STEP, || {
        pids.iter()
            .all(|&p| cmdline(p).is_none_or(|a| a != ["sleep", secs.as_str()]))
            .then_some(())
    })
    .await;
    if gone.is_none() {
        panic!("Ctrl-C did not end the remote sleep{}", s.dump().await);
    }
    s.tmux.type_line("echo rc-$?").await;
    s.wait_line("rc-130", STEP).await;
    s.tmux.type_line("exit").await;
    assert_eq!(s.wait_status(EXIT).await, 0, "{}", s.dump().await);
    s.assert_restored();
}

/// `~?` after Enter prints the help locally, the session goes on, `~.` ends it with
/// status 0 and the terminal restored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escape_help_then_tilde_dot_ends_the_session() {
    let s = TermSession::start(shell_sim(None).await, StartSessionRequest::shell()).await;
    s.wait_started().await;
    s.tmux.send_key("Enter").await;
    s.tmux.send_text("~?").await;
    s.wait_line("Supported escape sequence commands:", STEP)
        .await;
    let screen = s.tmux.screen().await;
    for line in [
        "  ~? - this help message",
        "  ~~ - send the ~ character to the remote target",
        "  ~- - disable escape sequences for the rest of this session",
        "  ~. - disconnect and terminate session",
        "(Note that escapes are only recognized immediately after newline.)",
    ] {
        assert!(has_line(&screen, line), "help lacks {line:?}:\n{screen}");
    }
    // Still connected; the escape reached nobody remote.
    s.tmux.type_line("echo still-$((1+2))").await;
    s.wait_line("still-3", STEP).await;
    let screen = s.tmux.screen().await;
    assert!(
        !screen.contains(&format!("{PROMPT} ~")) && !screen.contains("not found"),
        "the escape was sent to the remote shell{}",
        s.dump().await
    );
    s.assert_raw().await;
    // The Enter of the line above armed the escape.
    s.tmux.send_text("~.").await;
    assert_eq!(s.wait_status(EXIT).await, 0, "{}", s.dump().await);
    s.assert_restored();
}

/// `~.` calls TerminateSession (the simulator records it and ends the session).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tilde_dot_calls_terminate_session() {
    let s = TermSession::start(shell_sim(None).await, StartSessionRequest::shell()).await;
    s.wait_started().await;
    s.tmux.send_key("Enter").await;
    s.tmux.send_text("~.").await;
    assert_eq!(s.wait_status(EXIT).await, 0, "{}", s.dump().await);
    s.assert_restored();
    let stats = s.sim.stats(&s.id).expect("stats");
    assert!(
        stats.terminate_called,
        "TerminateSession was not called{}",
        s.dump().await
    );
    assert!(
        s.sim
            .api_calls()
            .iter()
            .any(|c| c.target == "AmazonSSM.TerminateSession" && c.status == 200),
        "no TerminateSession API call: {:?}",
        s.sim.api_calls()
    );
    s.sim.wait_closed(&s.id, STEP).await.expect("session ended");
}

/// An agent that stopped acknowledging holds the plugin's send window full (one frame
/// here): `~.` still ends the session at once through TerminateSession, and SIGTERM still
/// exits 143 (after the bounded flush), instead of both waiting behind the typed data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tilde_dot_and_sigterm_work_while_the_agent_is_stalled() {
    for sigterm in [false, true] {
        let sim = start_sim_with(SimConfig {
            stall_input_after: Some(0),
            ..shell_config(None)
        })
        .await;
        let s = TermSession::start_with(
            sim,
            StartSessionRequest::shell(),
            &[
                ("SSM_PLUGIN_WINDOW_PACKETS", "1"),
                ("SSM_PLUGIN_FLUSH_TIMEOUT", "1"),
            ],
        )
        .await;
        s.wait_started().await;
        // The first keystroke takes the window; the rest waits in the plugin.
        s.tmux.send_text("typed while stalled").await;
        s.tmux.send_key("Enter").await;
        let stalled = Instant::now() + STEP;
        while s.sim.stats(&s.id).expect("stats").stalled_frames_ignored == 0 {
            assert!(
                Instant::now() < stalled,
                "the agent never stalled{}",
                s.dump().await
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if sigterm {
            let pid = s.plugin_pid();
            // SAFETY: kill(2) on the pid of the plugin this test started.
            let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
            assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
            assert_eq!(s.wait_status(EXIT).await, 143, "{}", s.dump().await);
        } else {
            s.tmux.send_text("~.").await;
            assert_eq!(s.wait_status(EXIT).await, 0, "{}", s.dump().await);
            assert!(
                s.sim.stats(&s.id).expect("stats").terminate_called,
                "TerminateSession was not called{}",
                s.dump().await
            );
        }
        s.assert_restored();
    }
}

/// SIGTERM: the terminal is restored and the plugin exits with 128 + 15.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_restores_the_terminal_and_exits_143() {
    let s = TermSession::start(shell_sim(None).await, StartSessionRequest::shell()).await;
    s.wait_started().await;
    s.assert_raw().await;
    let pid = s.plugin_pid();
    // SAFETY: kill(2) on the pid of the plugin this test started (checked by its argv).
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    assert_eq!(s.wait_status(EXIT).await, 143, "{}", s.dump().await);
    s.assert_restored();
}

// ---- command sessions and piped stdin (no terminal) -----------------------------------

/// NonInteractiveCommands: stdout and stderr on their own pipes, the remote exit code as
/// the plugin's exit status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_interactive_command_separates_streams_and_returns_exit_code() {
    let sim = start_sim().await;
    let req = StartSessionRequest::non_interactive_command("echo out; echo err >&2; exit 7");
    let mut p = start_plugin(&sim, &req, None, &[], false);
    let status = p.wait_exit(EXIT).await;
    let (out, err) = (p.stdout.text(), p.stderr.text());
    let id = &p.session_id;
    assert_eq!(
        out,
        format!(
            "\nStarting session with SessionId: {id}\nout\n\n\nExiting session with sessionId: {id}.\n\n"
        ),
        "stdout{}",
        p.dump()
    );
    assert_eq!(err, "err\n", "stderr{}", p.dump());
    assert_eq!(status.code(), Some(7), "exit status{}", p.dump());
}

/// InteractiveCommands: the command runs in a pty on the remote side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interactive_command_runs_in_a_pty() {
    let sim = start_sim().await;
    let req = StartSessionRequest::interactive_command("tty; test -t 0 && echo stdin-is-a-tty");
    let mut p = start_plugin(&sim, &req, None, &[], false);
    let status = p.wait_exit(EXIT).await;
    let out = p.stdout.text();
    assert!(
        out.lines().any(|l| l.trim_end().starts_with("/dev/pts/")),
        "`tty` did not print a pts path{}",
        p.dump()
    );
    assert!(out.contains("stdin-is-a-tty"), "{}", p.dump());
    assert!(!out.contains("not a tty"), "{}", p.dump());
    assert_eq!(status.code(), Some(0), "{}", p.dump());
}

/// Piped stdin to a shell session: the commands run, and EOF (sent as EOT) ends the
/// remote shell and with it the plugin, with status 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn piped_stdin_runs_and_ends_the_shell_session() {
    let sim = shell_sim(None).await;
    let mut p = start_plugin(&sim, &StartSessionRequest::shell(), None, &[], true);
    let mut stdin = p.stdin.take().expect("stdin");
    stdin
        .write_all(b"echo piped-$((1+1))\n")
        .await
        .expect("write stdin");
    drop(stdin);
    p.expect_stdout("piped-2", STEP).await;
    let status = p.wait_exit(EXIT).await;
    assert_eq!(status.code(), Some(0), "{}", p.dump());
    assert!(
        p.stdout.text().contains(&format!(
            "Exiting session with sessionId: {}.",
            p.session_id
        )),
        "{}",
        p.dump()
    );
}

/// A KMS-encrypted shell session: the handshake's customer message is printed and the
/// session works. The plugin calls GenerateDataKey at the KMS endpoint of the SDK
/// configuration (not the SSM endpoint of argv), pointed at the simulator here with
/// `AWS_ENDPOINT_URL_KMS`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_encrypted_shell_session() {
    let sim = shell_sim(Some("alias/test")).await;
    let kms = sim.endpoint_url();
    let env = [("AWS_ENDPOINT_URL_KMS", kms.as_str())];
    let mut p = start_plugin(&sim, &StartSessionRequest::shell(), None, &env, true);
    p.expect_stdout("This session is encrypted using AWS KMS.\n", START)
        .await;
    let mut stdin = p.stdin.take().expect("stdin");
    stdin
        .write_all(b"echo kms-$((2+3))\n")
        .await
        .expect("write stdin");
    drop(stdin);
    p.expect_stdout("kms-5", STEP).await;
    let status = p.wait_exit(EXIT).await;
    assert_eq!(status.code(), Some(0), "{}", p.dump());
    let stats = sim.stats(&p.session_id).expect("stats");
    assert!(stats.encrypted, "{stats:?}");
    // GenerateDataKey named this session and target (the official encryption context).
    assert_eq!(
        stats.kms_encryption_contexts.len(),
        1,
        "{:?}",
        stats.kms_encryption_contexts
    );
    let ctx = &stats.kms_encryption_contexts[0];
    assert_eq!(ctx.get("aws:ssm:SessionId"), Some(&p.session_id), "{ctx:?}");
    assert_eq!(
        ctx.get("aws:ssm:TargetId").map(String::as_str),
        Some(TARGET),
        "{ctx:?}"
    );
    assert_eq!(sim.kms_requests().len(), 1, "{:?}", sim.kms_requests());
}
