//! `NonInteractiveCommands`: `sh -c <command>` with pipes, output kept separate.
//!
//! stdout goes out as Output (PayloadType 1), stderr as StdErr (11), each read at most
//! 1024 bytes; after both pipes are drained and the command exited, `EXIT_CODE: <n>`
//! (ExitCode, 12), then the session ends. Client input is ignored except the bytes 0x03
//! (SIGINT) and 0x1c (SIGQUIT), which are sent to the command's process group; Size is
//! ignored.

use std::process::Stdio;

use bytes::Bytes;
use ssm_wire::PayloadType;
use tokio::process::Command;

use super::{pump, AbortOnDrop, PluginContext, PluginEvent};

pub(crate) async fn run(mut ctx: PluginContext, command: String) {
    let spawned = Command::new("sh")
        .arg("-c")
        .arg(&command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let msg = format!("failed to run commands: {e}");
            let _ = ctx
                .output
                .send(PluginEvent::Data(PayloadType::StdErr, Bytes::from(msg)))
                .await;
            let _ = ctx
                .output
                .send(PluginEvent::Data(
                    PayloadType::ExitCode,
                    Bytes::from_static(b"EXIT_CODE: 127"),
                ))
                .await;
            let _ = ctx.output.send(PluginEvent::Exit(String::new())).await;
            return;
        }
    };
    let pid = child.id().and_then(|p| i32::try_from(p).ok());
    let delay = ctx.chunk_delay();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let out = ctx.output.clone();
    let mut out_task = AbortOnDrop(tokio::spawn(async move {
        if let Some(s) = stdout {
            let _ = pump(s, PayloadType::Output, &out, delay).await;
        }
    }));
    let err = ctx.output.clone();
    let mut err_task = AbortOnDrop(tokio::spawn(async move {
        if let Some(s) = stderr {
            let _ = pump(s, PayloadType::StdErr, &err, delay).await;
        }
    }));

    let status = loop {
        tokio::select! {
            input = ctx.input.recv() => {
                let Some(input) = input else { return };
                if input.payload_type != PayloadType::Output {
                    continue;
                }
                for b in input.data.iter() {
                    let sig = match b {
                        0x03 => libc::SIGINT,
                        0x1c => libc::SIGQUIT,
                        _ => continue,
                    };
                    if let Some(pid) = pid {
                        // SAFETY: kill(2) with a negative pid signals the process group the
                        // command leads (process_group(0) above); no memory is involved.
                        unsafe {
                            libc::kill(-pid, sig);
                        }
                    }
                }
            }
            status = child.wait() => break status,
        }
    };
    let _ = (&mut out_task.0).await;
    let _ = (&mut err_task.0).await;
    let code = match status {
        Ok(s) => {
            use std::os::unix::process::ExitStatusExt;
            s.code()
                .or_else(|| s.signal().map(|sig| 128 + sig))
                .unwrap_or(1)
        }
        Err(_) => 1,
    };
    let _ = ctx
        .output
        .send(PluginEvent::Data(
            PayloadType::ExitCode,
            Bytes::from(format!("EXIT_CODE: {code}")),
        ))
        .await;
    let _ = ctx.output.send(PluginEvent::Exit(String::new())).await;
}
