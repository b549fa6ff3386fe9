//! `Port` without a `type` (`AWS-StartSSHSession`): one connection to the target, bytes
//! both ways; the target closing the connection ends the session (after the agent got
//! every byte acknowledged).

use ssm_wire::payload::Flag;
use ssm_wire::PayloadType;
use tokio::io::AsyncWriteExt;

use super::{dial, pump, AbortOnDrop, PluginContext, PluginEvent};

pub(crate) async fn run(mut ctx: PluginContext, host: String, port: String) {
    ctx.session
        .update_stats(|s| s.port_mode = Some("stdio".to_owned()));
    let stream = match dial(&host, &port).await {
        Ok(s) => s,
        Err(e) => {
            let _ = ctx
                .output
                .send(PluginEvent::Exit(format!(
                    "Unable to connect to specified port: {e}"
                )))
                .await;
            return;
        }
    };
    let (rd, mut wr) = stream.into_split();
    let out = ctx.output.clone();
    let delay = ctx.chunk_delay();
    let mut reader = AbortOnDrop(tokio::spawn(async move {
        let _ = pump(rd, PayloadType::Output, &out, delay).await;
    }));
    loop {
        tokio::select! {
            input = ctx.input.recv() => {
                let Some(input) = input else { return };
                match input.payload_type {
                    PayloadType::Output => {
                        tokio::select! {
                            r = wr.write_all(&input.data) => if r.is_err() { break },
                            _ = &mut reader.0 => break,
                        }
                    }
                    PayloadType::Flag if Flag::decode(&input.data) == Some(Flag::TerminateSession) => break,
                    _ => {}
                }
            }
            _ = &mut reader.0 => break,
        }
    }
    let _ = ctx.output.send(PluginEvent::Exit(String::new())).await;
}
