//! stdio forwarding: `AWS-StartSSHSession` and every `ssh` ProxyCommand (PROTOCOL.md §8.3).
//!
//! stdin is carried to the remote port byte for byte and Output comes back on stdout.
//! Unlike the official plugin, nothing but Output payloads reaches stdout (StdErr goes to
//! stderr, flags are not data), and on stdin EOF the plugin waits until every byte it
//! sent has been acknowledged before it exits, so the tail of an `scp` is never lost.
//! No signal handlers are installed: started by the AWS CLI, SIGINT stays ignored as with
//! the official plugin, and ssh owns the terminal.

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Down, ModeContext, ModeOutcome, Up};
use crate::exit;

/// Bytes read from stdin at a time.
const READ_SIZE: usize = 16 * 1024;

pub async fn run(ctx: ModeContext) -> ModeOutcome {
    let ModeContext { up, mut down, .. } = ctx;
    let reader = tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = BytesMut::with_capacity(READ_SIZE);
        loop {
            buf.reserve(READ_SIZE);
            match stdin.read_buf(&mut buf).await {
                Ok(0) => break,
                Ok(_) => {
                    if up.send(Up::Data(buf.split().freeze())).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!("reading stdin: {e}");
                    break;
                }
            }
        }
        // EOF: flush what was sent, then end the session.
        let _ = up.send(Up::Finish(exit::OK)).await;
    });
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let mut outcome = ModeOutcome::default();
    while let Some(d) = down.recv().await {
        match d {
            Down::Output(b) => {
                if let Err(e) = write_all_flush(&mut stdout, &b).await {
                    tracing::warn!("writing stdout: {e}");
                    break;
                }
            }
            Down::StdErr(b) => {
                let _ = write_all_flush(&mut stderr, &b).await;
            }
            Down::ExitCode(c) => outcome.exit_code = Some(c),
            Down::Flag(f) => tracing::debug!("flag {f:?} ignored in stdio mode"),
        }
    }
    let _ = stdout.flush().await;
    reader.abort();
    outcome
}

async fn write_all_flush<W: AsyncWriteExt + Unpin>(w: &mut W, b: &[u8]) -> std::io::Result<()> {
    w.write_all(b).await?;
    w.flush().await
}
