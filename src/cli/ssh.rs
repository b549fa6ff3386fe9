//! `ssh-proxy HOST PORT [--user USER] [--push-key PUBKEY]`, for
//! `ProxyCommand session-manager-plugin ssh-proxy %h %p --user %r`: resolves HOST as a
//! target, optionally pushes a public key with EC2 Instance Connect (valid for 60 s, so
//! none needs to live on the instance), then runs AWS-StartSSHSession with stdin/stdout
//! carried byte-exact; nothing else is written to stdout. `ssh-config` prints a ready
//! `~/.ssh/config` block.

use std::path::PathBuf;

use super::aws_ops::{self, StartRequest};
use super::{load_config, runtime, target, AwsArgs, Client, Failure};
use crate::console::Console;

#[derive(clap::Args, Debug)]
#[command(after_help = "Example (~/.ssh/config):\n  Host web-* i-* mi-*\n    \
ProxyCommand session-manager-plugin ssh-proxy %h %p --user %r --push-key ~/.ssh/id_ed25519.pub")]
pub struct ProxyArgs {
    /// Instance id or name (ssh's %h).
    pub host: String,
    /// Port on the instance (ssh's %p).
    pub port: u16,
    /// Remote user (ssh's %r): the user --push-key authorizes.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// Push this OpenSSH public key with EC2 Instance Connect first (needs --user).
    #[arg(long = "push-key", value_name = "PUBKEY", requires = "user")]
    pub push_key: Option<PathBuf>,
    /// The path: Session Manager (`ssm`), an EC2 Instance Connect Endpoint (`eice`), or
    /// Session Manager when the node is online in SSM, else the endpoint (`auto`).
    #[arg(long, value_enum, default_value_t = Via::Ssm)]
    pub via: Via,
    #[command(flatten)]
    pub aws: AwsArgs,
}

/// How `ssh-proxy` reaches the instance.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    Ssm,
    Eice,
    Auto,
}

/// `--via auto`: Session Manager when the one matching node's agent is online, else
/// the endpoint (for an EC2 instance). Returns the path and, when known, the id.
async fn pick_path(aws: &crate::aws::AwsContext, host: &str) -> Result<(Via, String), Failure> {
    if target::is_id(host) {
        let online = aws_ops::describe_instance_information(aws, &[host.to_owned()])
            .await
            .map(|nodes| {
                nodes
                    .iter()
                    .any(|n| n.instance_id == host && n.ping_status == "Online")
            })
            .unwrap_or(false);
        let via = if online || !host.starts_with("i-") {
            Via::Ssm
        } else {
            Via::Eice
        };
        return Ok((via, host.to_owned()));
    }
    let found = target::find(aws, host).await?;
    match found.as_slice() {
        [one] if one.online() => Ok((Via::Ssm, one.id.clone())),
        [one] if one.id.starts_with("i-") => Ok((Via::Eice, one.id.clone())),
        _ => target::choose(host, found, false).map(|id| (Via::Ssm, id)),
    }
}

pub fn proxy_main(a: ProxyArgs) -> Result<u8, Failure> {
    let key = match &a.push_key {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| Failure::usage(format!("--push-key {}: {e}", path.display())))?;
            let key = text.trim().to_owned();
            if key.is_empty() || key.contains('\n') || key.starts_with("-----") {
                return Err(Failure::usage(format!(
                    "--push-key {}: not a one-line OpenSSH public key (the .pub file)",
                    path.display()
                )));
            }
            Some(key)
        }
        None => None,
    };
    let cfg = load_config(&a.aws)?;
    let client = Client::new(&a.aws, &cfg.defaults)?;
    let rt = runtime()?;
    let (via, host) = match a.via {
        Via::Auto => rt.block_on(pick_path(&client.aws, &a.host))?,
        via => (via, a.host.clone()),
    };
    if via == Via::Eice {
        let (id, ip, endpoint, dns) = rt.block_on(super::eice::resolve(
            &client.aws,
            Some(&host),
            None,
            None,
            None,
        ))?;
        let id = id.unwrap_or(host);
        if let (Some(key), Some(user)) = (&key, &a.user) {
            rt.block_on(aws_ops::send_ssh_public_key(&client.aws, &id, user, key))?;
        }
        let tunnel = super::eice::tunnel(&client, ip, endpoint, dns, a.port);
        let code = rt.block_on(super::eice::stdio(&tunnel));
        rt.shutdown_background();
        return code;
    }
    let id = target::resolve(&rt, &client.aws, &host)?;
    if let (Some(key), Some(user)) = (&key, &a.user) {
        rt.block_on(aws_ops::send_ssh_public_key(&client.aws, &id, user, key))?;
    }
    let req =
        StartRequest::new(id, Some("AWS-StartSSHSession")).param("portNumber", a.port.to_string());
    let mut options = client.options.clone();
    options.quiet = true;
    let code = rt.block_on(client.start_and_run(&req, Console { quiet: true }, options));
    rt.shutdown_background();
    code
}

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Example:\n  session-manager-plugin ssh-config 'web-*' --user ec2-user \
--push-key ~/.ssh/id_ed25519.pub >> ~/.ssh/config"
)]
pub struct ConfigArgs {
    /// Host patterns the block applies to.
    #[arg(default_values_t = ["i-*".to_string(), "mi-*".to_string()])]
    pub hosts: Vec<String>,
    /// User to log in as (ssh's User).
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// Public key to push before each connection (its private half becomes IdentityFile).
    #[arg(long = "push-key", value_name = "PUBKEY")]
    pub push_key: Option<PathBuf>,
    /// Profile the ProxyCommand uses.
    #[arg(long, value_name = "NAME")]
    pub profile: Option<String>,
    /// Region the ProxyCommand uses.
    #[arg(long, value_name = "REGION")]
    pub region: Option<String>,
    /// The path the ProxyCommand takes (`ssh-proxy --via`).
    #[arg(long, value_enum, default_value_t = Via::Ssm)]
    pub via: Via,
}

/// Quotes a word for the shell ssh runs ProxyCommand with, when it needs quoting.
fn q(s: &str) -> String {
    super::run::sh_quote(s)
}

pub fn config_main(a: ConfigArgs) -> Result<u8, Failure> {
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "session-manager-plugin".to_owned());
    print!("{}", config_block(&a, &exe));
    Ok(crate::exit::OK)
}

fn config_block(a: &ConfigArgs, exe: &str) -> String {
    let mut proxy = format!("{} ssh-proxy %h %p --user %r", q(exe));
    if let Some(k) = &a.push_key {
        proxy.push_str(&format!(" --push-key {}", q(&k.display().to_string())));
    }
    if let Some(p) = &a.profile {
        proxy.push_str(&format!(" --profile {}", q(p)));
    }
    if let Some(r) = &a.region {
        proxy.push_str(&format!(" --region {}", q(r)));
    }
    let mut out = String::from(match a.via {
        Via::Ssm => {
            "# ssh through AWS Systems Manager Session Manager (session-manager-plugin ssh-config)\n"
        }
        Via::Eice => {
            proxy.push_str(" --via eice");
            "# ssh through an EC2 Instance Connect Endpoint (session-manager-plugin ssh-config)\n"
        }
        Via::Auto => {
            proxy.push_str(" --via auto");
            "# ssh through Session Manager, or an EC2 Instance Connect Endpoint when the node is offline in SSM (session-manager-plugin ssh-config)\n"
        }
    });
    out.push_str(&format!("Host {}\n", a.hosts.join(" ")));
    out.push_str(&format!("    ProxyCommand {proxy}\n"));
    if let Some(u) = &a.user {
        out.push_str(&format!("    User {u}\n"));
    }
    if let Some(k) = &a.push_key {
        let text = k.display().to_string();
        if let Some(private) = text.strip_suffix(".pub") {
            if private.contains(char::is_whitespace) {
                out.push_str(&format!("    IdentityFile \"{private}\"\n"));
            } else {
                out.push_str(&format!("    IdentityFile {private}\n"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block() {
        let a = ConfigArgs {
            hosts: vec!["web-*".into()],
            user: Some("ec2-user".into()),
            push_key: Some("/home/me/.ssh/id ed.pub".into()),
            profile: Some("dev".into()),
            region: None,
            via: Via::Ssm,
        };
        assert_eq!(
            config_block(&a, "/usr/bin/session-manager-plugin"),
            "# ssh through AWS Systems Manager Session Manager (session-manager-plugin ssh-config)\n\
             Host web-*\n    \
             ProxyCommand /usr/bin/session-manager-plugin ssh-proxy %h %p --user %r \
             --push-key '/home/me/.ssh/id ed.pub' --profile dev\n    \
             User ec2-user\n    \
             IdentityFile \"/home/me/.ssh/id ed\"\n"
        );
        let eice = ConfigArgs {
            hosts: vec!["i-*".into()],
            user: None,
            push_key: None,
            profile: None,
            region: None,
            via: Via::Eice,
        };
        assert_eq!(
            config_block(&eice, "smp"),
            "# ssh through an EC2 Instance Connect Endpoint (session-manager-plugin ssh-config)\n\
             Host i-*\n    \
             ProxyCommand smp ssh-proxy %h %p --user %r --via eice\n"
        );
    }
}
