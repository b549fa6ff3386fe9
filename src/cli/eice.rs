//! `open-tunnel`: a TCP tunnel to an EC2 instance through an EC2 Instance Connect
//! Endpoint (EICE), with the AWS CLI v2's flags (`aws ec2-instance-connect open-tunnel`),
//! and the EICE path of `ssh-proxy --via eice|auto`.
//!
//! Discovery (when no private IP is given): EC2 DescribeInstances gives the instance's
//! VPC, subnet and private IP; DescribeInstanceConnectEndpoints (usable states, the VPC)
//! the endpoint, the one in the instance's subnet first. Each TCP connection (or the one
//! stdio stream) gets its own WebSocket to a freshly presigned `openTunnel` URL
//! ([`crate::aws::AwsContext::presign_get`]); bytes go as binary frames of at most
//! [`MAX_FRAME`] both ways. The rules (URL, close codes, refusals) are in
//! [`ssm_wire::eice`]; this module is their I/O.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use ssm_wire::eice::{
    check_max_tunnel_duration, refusal_message, TunnelEnd, TunnelTarget, MAX_FRAME, SIGNING_NAME,
    URL_EXPIRES_SECS,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use super::aws_ops::{self, ConnectEndpoint, USABLE_ENDPOINT_STATES};
use super::{load_config, runtime, target, AwsArgs, Client, Failure};
use crate::aws::AwsContext;
use crate::transport::{self, TlsSettings, TransportError};

#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "Examples:\n  \
session-manager-plugin open-tunnel --instance-id web-1 --local-port 2222\n  \
ssh -o ProxyCommand='session-manager-plugin open-tunnel --instance-id %h' ec2-user@i-0123456789abcdef0")]
pub struct OpenTunnelArgs {
    /// Instance id or name (Name tag, private DNS name, private IPv4).
    #[arg(long = "instance-id", value_name = "TARGET")]
    pub instance_id: Option<String>,
    /// Port on the instance (the service allows 22 and 3389).
    #[arg(long = "remote-port", value_name = "PORT", default_value_t = 22)]
    pub remote_port: u16,
    /// Listen on this local port (0: any), a tunnel per connection; without it, stdin and
    /// stdout carry one tunnel (ProxyCommand).
    #[arg(long = "local-port", value_name = "PORT")]
    pub local_port: Option<u16>,
    /// The instance's private IP (skips DescribeInstances; needs the endpoint id).
    #[arg(long = "private-ip-address", value_name = "IP")]
    pub private_ip_address: Option<String>,
    /// The endpoint to use (default: found in the instance's VPC).
    #[arg(long = "instance-connect-endpoint-id", value_name = "ID")]
    pub endpoint_id: Option<String>,
    /// The endpoint's DNS name (skips DescribeInstanceConnectEndpoints; needs the id).
    #[arg(long = "instance-connect-endpoint-dns-name", value_name = "DNS")]
    pub endpoint_dns_name: Option<String>,
    /// Seconds after which the service ends each tunnel (1..3600; its default is 3600).
    #[arg(long = "max-tunnel-duration", value_name = "SECONDS")]
    pub max_tunnel_duration: Option<u32>,
    /// Most tunnels open at once in listener mode; further connections are closed.
    #[arg(
        long = "max-websocket-connections",
        value_name = "N",
        default_value_t = 10
    )]
    pub max_websocket_connections: usize,
    #[command(flatten)]
    pub aws: AwsArgs,
}

impl OpenTunnelArgs {
    /// The AWS CLI's rules for the flags.
    fn validate(&self) -> Result<(), Failure> {
        if self.instance_id.is_none() && self.private_ip_address.is_none() {
            return Err(Failure::usage(
                "specify --instance-id or --private-ip-address",
            ));
        }
        if self.endpoint_dns_name.is_some() && self.endpoint_id.is_none() {
            return Err(Failure::usage(
                "--instance-connect-endpoint-dns-name needs --instance-connect-endpoint-id",
            ));
        }
        if self.private_ip_address.is_some() && self.endpoint_id.is_none() {
            return Err(Failure::usage(
                "--private-ip-address needs --instance-connect-endpoint-id",
            ));
        }
        if let Some(d) = self.max_tunnel_duration {
            check_max_tunnel_duration(d).map_err(Failure::usage)?;
        }
        if self.max_websocket_connections == 0 {
            return Err(Failure::usage(
                "--max-websocket-connections must be at least 1",
            ));
        }
        Ok(())
    }
}

/// Everything a tunnel needs: where to, and how to sign and connect.
#[derive(Clone)]
pub struct Tunnel {
    pub aws: AwsContext,
    pub tls: TlsSettings,
    pub target: TunnelTarget,
}

impl Tunnel {
    /// Presigns a fresh URL and opens the WebSocket.
    pub async fn open(&self) -> Result<transport::Ws, String> {
        let url = self
            .aws
            .presign_get(
                &self.target.url(),
                SIGNING_NAME,
                Duration::from_secs(URL_EXPIRES_SECS),
            )
            .await
            .map_err(|e| format!("cannot sign the tunnel URL: {e}"))?;
        transport::connect(&url, &[], &self.tls, |k| std::env::var(k).ok())
            .await
            .map_err(describe_connect_error)
    }

    /// One tunnel between `r`/`w` and a new WebSocket, until either side ends it.
    pub async fn run<R, W>(&self, r: R, w: W) -> Result<(), String>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let ws = self.open().await?;
        bridge(ws, r, w).await
    }
}

fn describe_connect_error(e: TransportError) -> String {
    use tokio_tungstenite::tungstenite::Error;
    if let TransportError::Handshake { source, host } = &e {
        if let Error::Http(resp) = source.as_ref() {
            let request_id = resp
                .headers()
                .get("x-amzn-requestid")
                .and_then(|v| v.to_str().ok());
            let body = resp.body().as_deref().unwrap_or_default();
            return format!(
                "{host}: {}",
                refusal_message(resp.status().as_u16(), body, request_id)
            );
        }
    }
    e.to_string()
}

/// Carries bytes between the local stream and the WebSocket; `Err` with the reason when
/// the service ends the tunnel with an error or the connection fails.
pub async fn bridge<R, W>(ws: transport::Ws, mut r: R, mut w: W) -> Result<(), String>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (mut sink, mut stream) = ws.split();
    let mut buf = vec![0u8; MAX_FRAME];
    let mut local_open = true;
    loop {
        tokio::select! {
            n = r.read(&mut buf), if local_open => match n {
                Ok(0) | Err(_) => {
                    // No half-close in EICE: the local end is done, so is the tunnel.
                    local_open = false;
                    let _ = sink
                        .send(Message::Close(Some(CloseFrame {
                            code: CloseCode::Normal,
                            reason: "".into(),
                        })))
                        .await;
                }
                Ok(n) => {
                    sink.send(Message::binary(buf[..n].to_vec()))
                        .await
                        .map_err(|e| format!("sending to the tunnel: {e}"))?;
                }
            },
            msg = stream.next() => match msg {
                Some(Ok(Message::Binary(b))) => {
                    if w.write_all(&b).await.is_err() || w.flush().await.is_err() {
                        // The local side went away: end the tunnel.
                        let _ = sink.send(Message::Close(None)).await;
                        return Ok(());
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    let _ = w.flush().await;
                    let end = TunnelEnd::from_close(
                        frame.as_ref().map(|f| (u16::from(f.code), f.reason.as_str())),
                    );
                    return match end.message() {
                        Some(m) if local_open => Err(m),
                        _ => Ok(()),
                    };
                }
                Some(Ok(_)) => {}
                Some(Err(e)) if local_open => return Err(format!("the tunnel failed: {e}")),
                None if local_open => {
                    return Err(TunnelEnd::Dropped.message().unwrap_or_default())
                }
                Some(Err(_)) | None => return Ok(()),
            },
        }
    }
}

/// Finds what the tunnel goes to (see the module docs).
pub async fn resolve(
    aws: &AwsContext,
    instance: Option<&str>,
    private_ip: Option<&str>,
    endpoint_id: Option<&str>,
    endpoint_dns: Option<&str>,
) -> Result<(Option<String>, String, String, String), Failure> {
    let fips = aws.use_fips().await.map_err(Failure::from)?;
    let dns_of = |e: &ConnectEndpoint| {
        if fips && !e.fips_dns_name.is_empty() {
            e.fips_dns_name.clone()
        } else {
            e.dns_name.clone()
        }
    };
    let by_id = |id: String| async move {
        let found = aws_ops::describe_instance_connect_endpoints(
            aws,
            &[("instance-connect-endpoint-id", vec![id.clone()])],
        )
        .await
        .map_err(|e| Failure::failed(format!("cannot look the endpoint {id} up: {e}")))?;
        found
            .into_iter()
            .find(|e| e.id == id)
            .ok_or_else(|| Failure::usage(format!("no EC2 Instance Connect Endpoint {id}")))
    };
    if let Some(ip) = private_ip {
        let id = endpoint_id.unwrap_or_default().to_owned();
        let dns = match endpoint_dns {
            Some(d) => d.to_owned(),
            None => dns_of(&by_id(id.clone()).await?),
        };
        return Ok((instance.map(str::to_owned), ip.to_owned(), id, dns));
    }
    let name = instance.unwrap_or_default();
    let inst = target::resolve_ec2(aws, name).await?;
    if inst.private_ip.is_empty() {
        return Err(Failure::usage(format!(
            "{} has no private IPv4 address; pass --private-ip-address",
            inst.instance_id
        )));
    }
    let (id, dns) = match (endpoint_id, endpoint_dns) {
        (Some(id), Some(dns)) => (id.to_owned(), dns.to_owned()),
        (Some(id), None) => {
            let e = by_id(id.to_owned()).await?;
            (e.id.clone(), dns_of(&e))
        }
        _ => {
            let states = USABLE_ENDPOINT_STATES
                .iter()
                .map(|s| s.to_string())
                .collect();
            let found = aws_ops::describe_instance_connect_endpoints(
                aws,
                &[("state", states), ("vpc-id", vec![inst.vpc_id.clone()])],
            )
            .await
            .map_err(|e| Failure::failed(format!("cannot look for an endpoint: {e}")))?;
            let chosen = found
                .iter()
                .find(|e| e.subnet_id == inst.subnet_id)
                .or_else(|| found.first())
                .ok_or_else(|| {
                    Failure::usage(format!(
                        "no usable EC2 Instance Connect Endpoint in {} ({}'s VPC)",
                        if inst.vpc_id.is_empty() {
                            "?"
                        } else {
                            &inst.vpc_id
                        },
                        inst.instance_id
                    ))
                })?;
            (chosen.id.clone(), dns_of(chosen))
        }
    };
    Ok((Some(inst.instance_id), inst.private_ip, id, dns))
}

pub fn open_tunnel_main(a: OpenTunnelArgs) -> Result<u8, Failure> {
    a.validate()?;
    if a.local_port.is_none() {
        use std::io::IsTerminal;
        if std::io::stdin().is_terminal() {
            return Err(Failure::usage(
                "without --local-port the tunnel is carried on stdin and stdout (a ProxyCommand); \
                 pass --local-port to listen instead",
            ));
        }
    }
    let cfg = load_config(&a.aws)?;
    let client = Client::new(&a.aws, &cfg.defaults)?;
    let rt = runtime()?;
    let (_id, ip, endpoint_id, dns) = rt.block_on(resolve(
        &client.aws,
        a.instance_id.as_deref(),
        a.private_ip_address.as_deref(),
        a.endpoint_id.as_deref(),
        a.endpoint_dns_name.as_deref(),
    ))?;
    let tunnel = Tunnel {
        aws: client.aws.clone(),
        tls: client.tls.clone(),
        target: TunnelTarget {
            dns_name: dns,
            endpoint_id,
            private_ip: ip,
            remote_port: a.remote_port,
            max_tunnel_duration: a.max_tunnel_duration,
        },
    };
    let result = match a.local_port {
        None => rt.block_on(stdio(&tunnel)),
        Some(port) => rt.block_on(listen(tunnel, port, a.max_websocket_connections)),
    };
    rt.shutdown_background();
    result
}

/// One tunnel on stdin/stdout; nothing else is written to stdout.
pub async fn stdio(tunnel: &Tunnel) -> Result<u8, Failure> {
    tunnel
        .run(tokio::io::stdin(), tokio::io::stdout())
        .await
        .map(|()| crate::exit::OK)
        .map_err(Failure::failed)
}

/// Listener mode: a tunnel per accepted connection, at most `max` at once; until Ctrl-C.
async fn listen(tunnel: Tunnel, port: u16, max: usize) -> Result<u8, Failure> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .map_err(|e| Failure::failed(format!("cannot listen on 127.0.0.1:{port}: {e}")))?;
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(port);
    println!("Listening for connections on port {port}.");
    let active = Arc::new(AtomicUsize::new(0));
    let mut counter = 0u64;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let (conn, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("session-manager-plugin: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut ctrl_c => return Ok(crate::exit::OK),
        };
        if active.load(Ordering::SeqCst) >= max {
            eprintln!(
                "session-manager-plugin: {max} tunnels are open (--max-websocket-connections); \
                 closing the new connection"
            );
            drop(conn);
            continue;
        }
        counter += 1;
        let n = counter;
        let _ = conn.set_nodelay(true);
        active.fetch_add(1, Ordering::SeqCst);
        let (tunnel, active) = (tunnel.clone(), active.clone());
        tokio::spawn(async move {
            let (r, w) = conn.into_split();
            if let Err(e) = tunnel.run(r, w).await {
                eprintln!("session-manager-plugin: [{n}] {e}");
            }
            active.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

/// The tunnel to `private_ip`'s `port` through the endpoint (`id`, `dns`).
pub fn tunnel(client: &Client, private_ip: String, id: String, dns: String, port: u16) -> Tunnel {
    Tunnel {
        aws: client.aws.clone(),
        tls: client.tls.clone(),
        target: TunnelTarget {
            dns_name: dns,
            endpoint_id: id,
            private_ip,
            remote_port: port,
            max_tunnel_duration: None,
        },
    }
}
