//! `Standard_Stream` and `InteractiveCommands`: a command in a real pty.
//!
//! Client Output bytes are typed into the terminal, Size payloads resize it (TIOCSWINSZ,
//! so the program gets SIGWINCH), Flag payloads are ignored, and everything the terminal
//! prints goes back as Output in chunks of at most 1024 bytes. When the program exits and
//! the terminal is drained, the session ends normally.

use bytes::Bytes;
use ssm_wire::payload::SizeData;
use ssm_wire::PayloadType;

use super::{AbortOnDrop, PluginContext, PluginEvent, CHUNK};
use crate::pty;

/// Initial terminal size until the client sends one.
const DEFAULT_SIZE: (u16, u16) = (80, 24);

pub(crate) async fn run(mut ctx: PluginContext, argv: Vec<String>) {
    let (pty, mut child) = match pty::spawn(&argv, DEFAULT_SIZE.0, DEFAULT_SIZE.1) {
        Ok(x) => x,
        Err(e) => {
            let msg = format!("Unable to start shell: {e}\r\n");
            let _ = ctx
                .output
                .send(PluginEvent::Data(PayloadType::Output, Bytes::from(msg)))
                .await;
            let _ = ctx.output.send(PluginEvent::Exit(String::new())).await;
            return;
        }
    };

    let reader_pty = pty.clone();
    let output = ctx.output.clone();
    let delay = ctx.chunk_delay();
    let mut reader = AbortOnDrop(tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match reader_pty.read(&mut buf).await {
                Ok(0) | Err(_) => return true,
                Ok(n) => {
                    let data = Bytes::copy_from_slice(&buf[..n]);
                    if output
                        .send(PluginEvent::Data(PayloadType::Output, data))
                        .await
                        .is_err()
                    {
                        return false;
                    }
                    super::agent_pause(delay).await;
                }
            }
        }
    }));

    loop {
        tokio::select! {
            input = ctx.input.recv() => {
                let Some(input) = input else { return };
                match input.payload_type {
                    PayloadType::Output => {
                        tokio::select! {
                            r = pty.write_all(&input.data) => {
                                if r.is_err() {
                                    // The terminal is going away; the reader sees EOF.
                                }
                            }
                            _ = &mut reader.0 => break,
                        }
                    }
                    PayloadType::Size => {
                        if let Ok(size) = serde_json::from_slice::<SizeData>(&input.data) {
                            let cols = u16::try_from(size.cols).unwrap_or(u16::MAX).max(1);
                            let rows = u16::try_from(size.rows).unwrap_or(u16::MAX).max(1);
                            let _ = pty.resize(cols, rows);
                        }
                    }
                    _ => {}
                }
            }
            _ = &mut reader.0 => break,
        }
    }
    // The terminal is drained; reap the program (it has exited or closed the terminal).
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), child.wait()).await;
    let _ = ctx.output.send(PluginEvent::Exit(String::new())).await;
}
