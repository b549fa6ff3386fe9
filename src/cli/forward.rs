//! `forward TARGET -L [BIND:]LOCALPORT:[HOST:]PORT …`: one port-forwarding session per
//! `-L`, all in this process, concurrently. Each has its own StartSession
//! (`AWS-StartPortForwardingSession`, or `…ToRemoteHost` when HOST is given), its own
//! listener and its own reconnects (ResumeSession); one that fails is reported on stderr
//! and the others go on. LOCALPORT 0 picks a free port; each listener prints the plugin's
//! `Port N opened for sessionId …` line. Ctrl-C ends them all. The exit status is the
//! highest of the sessions' statuses.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use tokio::net::TcpListener;

use super::pool::Pool;

use super::aws_ops::{self, StartRequest};
use super::{load_config, runtime, target, AwsArgs, Client, Failure};
use crate::console::Console;

#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:\n  \
session-manager-plugin forward web-1 -L 8080:80\n  \
session-manager-plugin forward bastion -L 5432:db.internal:5432 -L 0.0.0.0:6379:cache.internal:6379\n  \
session-manager-plugin forward web-1 -L 0:80   # a free local port, printed")]
pub struct Args {
    /// Instance id or name.
    pub target: String,
    /// A forward: [BIND:]LOCALPORT:[HOST:]PORT (repeatable).
    #[arg(
        short = 'L',
        long = "local",
        required = true,
        value_name = "[BIND:]LOCALPORT:[HOST:]PORT"
    )]
    pub forwards: Vec<String>,
    #[command(flatten)]
    pub pool: PoolArgs,
    #[command(flatten)]
    pub aws: AwsArgs,
}

/// Most sessions one forward may pool.
pub const MAX_SESSIONS: usize = 64;
/// Seconds an extra pooled session may stay idle by default.
pub const DEFAULT_IDLE_SECS: u64 = 300;

/// Several sessions per forward (README, "Several sessions per tunnel").
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct PoolArgs {
    /// Sessions per forward; each new local connection goes to the least-loaded one.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=MAX_SESSIONS as u64))]
    pub sessions: usize,
    /// Seconds an extra session (beyond the first) may carry nothing before it closes.
    #[arg(long = "idle-timeout", value_name = "SECONDS", default_value_t = DEFAULT_IDLE_SECS)]
    pub idle_timeout: u64,
}

/// One `-L`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    pub text: String,
    pub bind: Option<IpAddr>,
    pub local_port: u16,
    pub host: Option<String>,
    pub port: u16,
}

impl Spec {
    fn request(&self, target: String) -> StartRequest {
        let r = match &self.host {
            Some(h) => {
                StartRequest::new(target, Some("AWS-StartPortForwardingSessionToRemoteHost"))
                    .param("host", h.clone())
            }
            None => StartRequest::new(target, Some("AWS-StartPortForwardingSession")),
        };
        r.param("portNumber", self.port.to_string())
            .param("localPortNumber", self.local_port.to_string())
    }
}

/// Splits at `:` outside `[…]` (IPv6 literals).
fn split_colons(s: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut bracket = false;
    for c in s.chars() {
        match c {
            '[' if cur.is_empty() => bracket = true,
            ']' if bracket => bracket = false,
            ':' if !bracket => parts.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    parts.push(cur);
    parts
}

fn port(s: &str, what: &str, zero_ok: bool) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(0) if !zero_ok => Err(format!("{what} must be 1..65535")),
        Ok(p) => Ok(p),
        Err(_) => Err(format!("{what} {s:?} is not a port number")),
    }
}

fn bind(s: &str) -> Result<IpAddr, String> {
    match s {
        "localhost" => Ok(IpAddr::from([127, 0, 0, 1])),
        "*" => Ok(IpAddr::from([0, 0, 0, 0])),
        s => s
            .parse()
            .map_err(|_| format!("bind address {s:?} is not an IP address")),
    }
}

/// Parses `[BIND:]LOCALPORT:[HOST:]PORT`. With three parts, a numeric first part is
/// LOCALPORT (`8080:db:5432`), anything else is BIND (`127.0.0.2:8080:80`).
pub fn parse_spec(text: &str) -> Result<Spec, String> {
    let parts = split_colons(text.trim());
    let p: Vec<&str> = parts.iter().map(String::as_str).collect();
    let err = |e: String| format!("-L {text}: {e}");
    let (b, l, h, r) = match p.as_slice() {
        [l, r] => (None, *l, None, *r),
        [a, l, r] if a.parse::<u16>().is_ok() => (None, *a, Some(*l), *r),
        [b, l, r] => (Some(*b), *l, None, *r),
        [b, l, h, r] => (Some(*b), *l, Some(*h), *r),
        _ => {
            return Err(err(
                "expected [BIND:]LOCALPORT:[HOST:]PORT, e.g. 8080:80 or 5432:db.internal:5432"
                    .into(),
            ))
        }
    };
    let host = match h {
        Some("") => return Err(err("empty HOST".into())),
        Some(h) if h.contains(char::is_whitespace) => return Err(err("HOST has a space".into())),
        h => h.map(str::to_owned),
    };
    Ok(Spec {
        text: text.trim().to_owned(),
        bind: b.map(bind).transpose().map_err(err)?,
        local_port: port(l, "LOCALPORT", true).map_err(err)?,
        host,
        port: port(r, "PORT", false).map_err(err)?,
    })
}

pub fn main(a: Args) -> Result<u8, Failure> {
    run_forwards(&a.aws, &a.target, &a.forwards, a.pool)
}

/// Resolves the target once, then runs every forward until all have ended.
pub fn run_forwards(
    aws: &AwsArgs,
    target_name: &str,
    forwards: &[String],
    pool: PoolArgs,
) -> Result<u8, Failure> {
    let specs = forwards
        .iter()
        .map(|f| parse_spec(f))
        .collect::<Result<Vec<_>, _>>()
        .map_err(Failure::usage)?;
    let cfg = load_config(aws)?;
    let client = Arc::new(Client::new(aws, &cfg.defaults)?);
    let rt = runtime()?;
    let id = target::resolve(&rt, &client.aws, target_name)?;
    let console = Console {
        quiet: client.options.quiet,
    };
    let runs = specs.iter().map(|s| one(&client, &id, s, console, pool));
    let codes = rt.block_on(join_all(runs));
    rt.shutdown_background();
    Ok(codes.into_iter().max().unwrap_or(0))
}

async fn one(client: &Arc<Client>, id: &str, spec: &Spec, console: Console, pool: PoolArgs) -> u8 {
    let req = spec.request(id.to_owned());
    if pool.sessions > 1 {
        let addr = SocketAddr::new(
            spec.bind.unwrap_or(client.options.listen_address),
            spec.local_port,
        );
        let listener = match TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                console.error(&format!(
                    "session-manager-plugin: forward {}: listen tcp {addr}: {e}",
                    spec.text
                ));
                return crate::exit::SESSION_FAILED;
            }
        };
        let p = Pool::new(
            client.clone(),
            id.to_owned(),
            req,
            pool.sessions,
            Duration::from_secs(pool.idle_timeout),
            super::pool::MAX_START_FAILURES,
        );
        let code = super::pool::serve(p, listener, console).await;
        console.error(&format!(
            "session-manager-plugin: forward {} (a pool of {} sessions) ended with status {code}",
            spec.text, pool.sessions
        ));
        return code;
    }
    let resp = match aws_ops::start_session(&client.aws, &req).await {
        Ok(r) => r,
        Err(e) => {
            console.error(&format!(
                "session-manager-plugin: forward {}: {e}",
                spec.text
            ));
            return crate::exit::SESSION_FAILED;
        }
    };
    let mut options = client.options.clone();
    if let Some(b) = spec.bind {
        options.listen_address = b;
    }
    let session_id = resp.session_id.clone();
    let code = client.run_session(resp, id, console, options).await;
    console.error(&format!(
        "session-manager-plugin: forward {} (session {session_id}) ended with status {code}",
        spec.text
    ));
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        let s = parse_spec("8080:80").unwrap();
        assert_eq!(
            (s.bind, s.local_port, s.host, s.port),
            (None, 8080, None, 80)
        );
        let s = parse_spec("5432:db.internal:5432").unwrap();
        assert_eq!(s.host.as_deref(), Some("db.internal"));
        assert_eq!(s.local_port, 5432);
        let s = parse_spec("127.0.0.2:0:80").unwrap();
        assert_eq!(s.bind, Some(IpAddr::from([127, 0, 0, 2])));
        assert_eq!((s.local_port, s.port), (0, 80));
        let s = parse_spec("[::1]:9000:[fd00::5]:22").unwrap();
        assert_eq!(s.bind, Some("::1".parse().unwrap()));
        assert_eq!(s.host.as_deref(), Some("fd00::5"));
        let s = parse_spec("localhost:1:h:2").unwrap();
        assert_eq!(s.bind, Some(IpAddr::from([127, 0, 0, 1])));
        let r = s.request("i-1".into());
        assert_eq!(
            r.document_name.as_deref(),
            Some("AWS-StartPortForwardingSessionToRemoteHost")
        );
        assert_eq!(r.parameters["host"], vec!["h".to_string()]);
        assert_eq!(r.parameters["localPortNumber"], vec!["1".to_string()]);
        for bad in [
            "80",
            "a:b",
            "8080:0",
            "x:1:2:3",
            "1:2:3:4:5",
            "8080::80",
            "70000:80",
        ] {
            assert!(parse_spec(bad).is_err(), "{bad} accepted");
        }
    }
}
