//! The standalone client against two real services: EC2 through moto's server (instances
//! with `Name` tags), SSM and EC2 Instance Connect through ssm-sim. Target names, the
//! picker (tmux), `list`, `forward` with three listeners, `tunnel`, and `ssh-proxy` with
//! real OpenSSH whose sshd accepts only keys pushed in the last 60 s.

mod common;
mod standalone;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::Value;
use ssm_sim::ManagedNode;
use standalone::*;
use tokio::process::Command;

fn targets(sim: &ssm_sim::Simulator) -> Vec<String> {
    start_calls(sim)
        .iter()
        .map(|c| c["Target"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Names resolve through moto (Name tag, private DNS, private IP) and the simulator
/// (computer name of a hybrid node); ambiguity without a terminal is a table and status 2,
/// offline nodes are marked and not used, no match is status 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_resolve_through_ec2_and_ssm() {
    let sim = start_sim().await;
    let moto = Moto::start().await;
    let home = TempDir::new("cli");
    let made = moto.create(&["web-1", "app", "app", "lonely", "old"]).await;
    let (web, app1, app2, lonely, old) = (&made[0], &made[1], &made[2], &made[3], &made[4]);
    moto.stop(&old.id).await;
    sim.add_managed_node(ManagedNode::online(&web.id, &web.dns, &web.ip));
    sim.add_managed_node(ManagedNode::online(&app1.id, &app1.dns, &app1.ip));
    sim.add_managed_node(ManagedNode {
        ping_status: "ConnectionLost".into(),
        ..ManagedNode::online(&app2.id, &app2.dns, &app2.ip)
    });
    sim.add_managed_node(ManagedNode::online(
        "mi-0123456789abcdef1",
        "onprem-db.corp",
        "192.168.7.7",
    ));
    sim.add_managed_node(ManagedNode::online(&old.id, &old.dns, &old.ip));

    let run = |target: &str| {
        cli(
            &sim,
            Some(&moto),
            home.path(),
            &["run", target, "--", "echo resolved"],
        )
    };
    for (name, want) in [
        (web.name.as_str(), web.id.as_str()),
        (web.ip.as_str(), web.id.as_str()),
        (web.dns.as_str(), web.id.as_str()),
        ("onprem-db", "mi-0123456789abcdef1"),
        ("ONPREM-DB.corp", "mi-0123456789abcdef1"),
    ] {
        let (code, out, err) = output(run(name)).await;
        assert_eq!(
            (code, out.as_str()),
            (Some(0), "resolved\n"),
            "{name}: {err}\n{}",
            moto.log()
        );
        assert_eq!(
            targets(&sim).last().map(String::as_str),
            Some(want),
            "{name}"
        );
    }
    let sessions = start_calls(&sim).len();

    // Two instances named "app": the table, status 2, nothing started.
    let (code, _, err) = output(run("app")).await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("2 instances match \"app\""), "{err}");
    assert!(err.contains("ID ") && err.contains("PING STATUS"), "{err}");
    let row = |i: &Instance| {
        err.lines()
            .find(|l| l.starts_with(&i.id))
            .unwrap_or_else(|| panic!("no row for {}: {err}", i.id))
            .to_owned()
    };
    assert!(
        row(app1).contains(&app1.ip) && row(app1).ends_with("Online"),
        "{err}"
    );
    assert!(row(app2).ends_with("ConnectionLost (offline)"), "{err}");
    // One match that SSM does not know: marked, not used.
    let (code, _, err) = output(run("lonely")).await;
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&lonely.id) && err.contains("not managed by SSM"),
        "{err}"
    );
    // A stopped instance does not match; an unknown name neither.
    for name in ["old", "nosuch"] {
        let (code, _, err) = output(run(name)).await;
        assert_eq!(code, Some(2), "{err}");
        assert!(err.contains("no instance or managed node matches"), "{err}");
    }
    assert_eq!(start_calls(&sim).len(), sessions, "nothing started");
}

/// On a terminal, several matches open a picker: typing filters, Enter chooses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn picker_on_a_terminal() {
    let sim = start_sim().await;
    let moto = Moto::start().await;
    let home = TempDir::new("cli");
    let made = moto.create(&["app", "app", "app"]).await;
    for i in &made {
        sim.add_managed_node(ManagedNode::online(&i.id, &i.dns, &i.ip));
    }
    let env = cli_env(&sim, Some(&moto), home.path());
    let script = pane_script(home.path(), &env, &["run", "app", "--", "echo picked"]);
    let tmux = Tmux::start(home.path(), &script, 120, 30).await;
    tmux.wait("the picker", |s| {
        s.contains("3 instances match \"app\"") && s.contains(&made[2].id)
    })
    .await;
    // Filter down to the second instance by its id, then choose it.
    tmux.send_text(&made[1].id).await;
    tmux.wait("the filtered list", |s| {
        !s.contains(&made[0].id) && !s.contains(&made[2].id)
    })
    .await;
    tmux.send_key("Enter").await;
    let screen = tmux
        .wait("the command", |s| s.contains("exit-status="))
        .await;
    assert!(
        screen.contains("picked") && screen.contains("exit-status=0"),
        "{screen}"
    );
    assert_eq!(targets(&sim), vec![made[1].id.clone()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_table_and_json() {
    let sim = start_sim().await;
    let moto = Moto::start().await;
    let home = TempDir::new("cli");
    let made = moto.create(&["web-1"]).await;
    sim.add_managed_node(ManagedNode::online(&made[0].id, &made[0].dns, &made[0].ip));
    sim.add_managed_node(ManagedNode {
        ping_status: "ConnectionLost".into(),
        platform_type: "Windows".into(),
        platform_name: "Microsoft Windows Server 2022".into(),
        ..ManagedNode::online("mi-0123456789abcdef1", "OFFICE-PC", "192.168.7.8")
    });
    let (code, out, err) = output(cli(&sim, Some(&moto), home.path(), &["list"])).await;
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        lines[0].starts_with("ID") && lines[0].ends_with("PING STATUS"),
        "{out}"
    );
    let cells = |l: &str| {
        l.split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        cells(lines[1]),
        vec![
            made[0].id.clone(),
            "web-1".into(),
            made[0].ip.clone(),
            "Amazon Linux".into(),
            "Online".into()
        ]
    );
    assert_eq!(
        cells(lines[2]),
        vec![
            "mi-0123456789abcdef1",
            "OFFICE-PC",
            "192.168.7.8",
            "Microsoft Windows Server 2022",
            "ConnectionLost"
        ]
    );
    let (code, out, _) = output(cli(&sim, Some(&moto), home.path(), &["list", "--json"])).await;
    assert_eq!(code, Some(0));
    let v: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v[0]["Name"], "web-1");
    assert_eq!(v[1]["PingStatus"], "ConnectionLost");
    assert_eq!(v.as_array().map(Vec::len), Some(2));
}

async fn curl_sha(port: u16) -> Option<String> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--fail", "--max-time", "20"])
        .arg(format!("http://127.0.0.1:{port}/"));
    let out = run_cmd(cmd, Duration::from_secs(30)).await;
    out.status.success().then(|| hex(&sha256(&out.stdout)))
}

/// Three -L in one process, each its own session: two reach their servers (one through
/// the ToRemoteHost document), the third's target refuses; the two keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_three_listeners_one_refusing() {
    let sim = start_sim().await;
    let home = TempDir::new("cli");
    let (a, b) = (
        Arc::new(random_bytes(3 << 20, 31)),
        Arc::new(random_bytes(1 << 20, 32)),
    );
    let (srv_a, srv_b) = (http_server(a.clone()).await, http_server(b.clone()).await);
    let refused = free_port();
    let (la, lb, lr) = (free_port(), free_port(), free_port());
    let specs = [
        format!("{la}:{}", srv_a.port),
        format!("127.0.0.1:{lb}:127.0.0.1:{}", srv_b.port),
        format!("{lr}:{refused}"),
    ];
    let mut cmd = cli(&sim, None, home.path(), &["forward", TARGET]);
    for s in &specs {
        cmd.args(["-L", s]);
    }
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let pid = child.id().expect("pid") as i32;
    let stdout = child.stdout.take().expect("stdout");
    let collected = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut s = stdout;
        let mut v = Vec::new();
        let _ = s.read_to_end(&mut v).await;
        v
    });
    for port in [la, lb, lr] {
        connect_retry(port).await;
    }
    let want_a = hex(&sha256(&a));
    let want_b = hex(&sha256(&b));
    assert_eq!(curl_sha(la).await.as_deref(), Some(want_a.as_str()));
    assert_eq!(curl_sha(lb).await.as_deref(), Some(want_b.as_str()));
    assert_eq!(
        curl_sha(lr).await,
        None,
        "the refusing target gave a response"
    );
    // The refusal ended nothing: both others still work, the process runs.
    assert_eq!(curl_sha(lb).await.as_deref(), Some(want_b.as_str()));
    assert_eq!(curl_sha(la).await.as_deref(), Some(want_a.as_str()));
    assert!(child.try_wait().expect("try_wait").is_none());
    let calls = start_calls(&sim);
    assert_eq!(calls.len(), 3);
    let docs: Vec<&str> = calls
        .iter()
        .filter_map(|c| c["DocumentName"].as_str())
        .collect();
    assert_eq!(
        docs.iter()
            .filter(|d| **d == "AWS-StartPortForwardingSessionToRemoteHost")
            .count(),
        1,
        "{calls:?}"
    );
    // Ctrl-C ends all three cleanly.
    // SAFETY: kill(2) on the child we spawned.
    unsafe { libc::kill(pid, libc::SIGINT) };
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("forward exited")
        .expect("wait");
    let out = String::from_utf8_lossy(&collected.await.expect("stdout")).into_owned();
    assert_eq!(status.code(), Some(0), "{out}");
    assert_eq!(count(&out, " opened for sessionId "), 3, "{out}");
    for p in [la, lb, lr] {
        assert!(out.contains(&format!("Port {p} opened")), "{out}");
    }
    for id in sim.session_ids() {
        let stats = sim
            .wait_closed(&id, Duration::from_secs(20))
            .await
            .expect("closed");
        assert!(stats.terminate_called || stats.closed, "{id}");
    }
}

/// A config-file tunnel by name: its target is a name (moto), its forward a list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_from_the_config_file() {
    let sim = start_sim().await;
    let moto = Moto::start().await;
    let home = TempDir::new("cli");
    let made = moto.create(&["bastion"]).await;
    sim.add_managed_node(ManagedNode::online(&made[0].id, &made[0].dns, &made[0].ip));
    let body = Arc::new(random_bytes(200_000, 33));
    let srv = http_server(body.clone()).await;
    let local = free_port();
    let dir = home.join("config/session-manager-plugin");
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(
        dir.join("config.toml"),
        format!(
            "[tunnels.web]\ntarget = \"bastion\"\nforward = [\"{local}:127.0.0.1:{}\"]\n",
            srv.port
        ),
    )
    .expect("config");
    let mut cmd = cli(&sim, Some(&moto), home.path(), &["tunnel", "web"]);
    cmd.stdout(std::process::Stdio::null());
    let mut child = cmd.spawn().expect("spawn");
    connect_retry(local).await;
    assert_eq!(curl_sha(local).await, Some(hex(&sha256(&body))));
    assert_eq!(targets(&sim), vec![made[0].id.clone()]);
    // SAFETY: kill(2) on the child we spawned.
    unsafe { libc::kill(child.id().expect("pid") as i32, libc::SIGINT) };
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("exit")
        .expect("wait");
    assert_eq!(status.code(), Some(0));
}

fn ssh_args(key: &std::path::Path, proxy: &str, port: u16) -> Vec<String> {
    [
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
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        "-i".into(),
        key.display().to_string(),
        "-o".into(),
        format!("ProxyCommand={proxy}"),
        "-o".into(),
        format!("Port={port}"),
    ])
    .collect()
}

/// `ssh -o ProxyCommand='… ssh-proxy %h %p --user %r --push-key KEY.pub' web-1`: sshd
/// accepts only keys the simulator says were pushed in the last 60 s, so the login proves
/// the push; without --push-key it is refused. Then scp 10 MiB up and back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_proxy_pushes_the_key_for_real_openssh() {
    if let Some(why) = sshd_unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let sim = start_sim().await;
    let moto = Moto::start().await;
    let home = TempDir::new("cli");
    let made = moto.create(&["web-1"]).await;
    let web = &made[0];
    sim.add_managed_node(ManagedNode::online(&web.id, &web.dns, &web.ip));
    let sshd = start_sshd_instance_connect(&sim, &web.id).await;
    let key = home.join("id");
    keygen(&key).await;
    let pubkey = home.join("id.pub");
    let env = cli_env(&sim, Some(&moto), home.path());
    let ssh = |program: &str, proxy: &str, rest: &[String]| {
        let mut c = Command::new(program);
        c.env_clear()
            .envs(env.clone())
            .args(ssh_args(&key, proxy, sshd.port))
            .args(rest);
        c
    };
    let without = format!("{PLUGIN} ssh-proxy %h %p --user %r");
    let with = format!("{without} --push-key {}", pubkey.display());

    let (code, _, err) = output(ssh("ssh", &without, &["root@web-1".into(), "true".into()])).await;
    assert_ne!(code, Some(0), "logged in without a pushed key: {err}");
    assert!(sim.pushed_keys().is_empty());

    let (code, out, err) = output(ssh(
        "ssh",
        &with,
        &["root@web-1".into(), "echo in-$((40+2))".into()],
    ))
    .await;
    assert_eq!(code, Some(0), "ssh: {err}\nsshd: {}", sshd.log());
    assert_eq!(out, "in-42\n");
    let pushed = sim.pushed_keys();
    assert_eq!(pushed.len(), 1);
    assert_eq!(
        (pushed[0].instance_id.as_str(), pushed[0].os_user.as_str()),
        (web.id.as_str(), "root")
    );
    let public = std::fs::read_to_string(&pubkey).expect("pub");
    assert_eq!(pushed[0].public_key, public.trim());
    assert!(targets(&sim).iter().all(|t| *t == web.id));

    let size = 10 << 20;
    let src = home.join("src.bin");
    std::fs::write(&src, random_bytes(size, 34)).expect("src");
    let want = hex(&sha256(&std::fs::read(&src).expect("src")));
    let remote = home.join("remote.bin");
    let back = home.join("back.bin");
    for (from, to, check) in [
        (
            src.display().to_string(),
            format!("root@web-1:{}", remote.display()),
            &remote,
        ),
        (
            format!("root@web-1:{}", remote.display()),
            back.display().to_string(),
            &back,
        ),
    ] {
        let (code, _, err) = output(ssh("scp", &with, &["-q".into(), from, to])).await;
        assert_eq!(code, Some(0), "scp: {err}");
        assert_eq!(hex(&sha256(&std::fs::read(check).expect("copied"))), want);
    }
}
