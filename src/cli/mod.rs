//! The standalone client: subcommands of the same binary that start sessions without the
//! AWS CLI (`start-session`, `shell`, `run`, `forward`, `ssh-proxy`, `ssh-config`, `socks`,
//! `list`, `tunnel`, `open-tunnel`, `completions`).
//!
//! `main` sends argv here only when argv[1] is one of [`SUBCOMMANDS`] or `--help`/`-h`;
//! everything else (the AWS CLI's positional contract, `--version`, no arguments) takes the
//! unchanged [`crate::invocation`] path. Each subcommand calls SSM StartSession itself with
//! the same credential chain and signing as the plugin's own calls ([`crate::aws`]) and runs
//! the session in-process through [`crate::session::run`]; the exit status is the session's
//! (a remote command's exit code), never the AWS CLI's 255.

mod aws_ops;
mod config;
mod eice;
mod forward;
mod list;
mod params;
mod pool;
mod record;
mod run;
mod shell;
mod socks;
mod ssh;
mod start_session;
mod target;

use std::path::PathBuf;

use clap::{CommandFactory, Parser, Subcommand};
use ssm_wire::payload::StartSessionResponse;

use crate::aws::{AwsContext, AwsError};
use crate::console::Console;
use crate::options::Options;
use crate::transport::TlsSettings;
use crate::{api, exit, invocation, session};

/// argv[1] values that select the standalone client.
pub const SUBCOMMANDS: &[&str] = &[
    "start-session",
    "shell",
    "run",
    "forward",
    "ssh-proxy",
    "ssh-config",
    "socks",
    "list",
    "tunnel",
    "open-tunnel",
    "completions",
    "help",
];

/// Whether argv belongs to the standalone client (and not to the AWS CLI contract).
pub fn handles(args: &[String]) -> bool {
    match args.get(1).map(String::as_str) {
        Some(a) => SUBCOMMANDS.contains(&a) || a == "--help" || a == "-h",
        None => false,
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "session-manager-plugin",
    about = "AWS Session Manager plugin and standalone client: shells, commands, port forwarding and ssh over SSM",
    disable_version_flag = true,
    after_help = "Run by the AWS CLI (`aws ssm start-session`), the plugin takes the CLI's positional \
arguments as before; `session-manager-plugin --version` prints its version."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start a session like `aws ssm start-session`, without the AWS CLI.
    StartSession(start_session::Args),
    /// An interactive shell on TARGET (the default session document).
    Shell(shell::Args),
    /// Run COMMAND on TARGET; its stdout, stderr and exit code become ours.
    Run(run::Args),
    /// Forward one or more local ports to TARGET (one session per -L).
    Forward(forward::Args),
    /// ssh ProxyCommand: carry stdin/stdout to HOST's PORT (AWS-StartSSHSession).
    SshProxy(ssh::ProxyArgs),
    /// Print a ~/.ssh/config block that uses `ssh-proxy`.
    SshConfig(ssh::ConfigArgs),
    /// A SOCKS5 (and HTTP CONNECT) proxy into TARGET's network: one port-forwarding
    /// session per destination, names resolved by TARGET.
    Socks(socks::Args),
    /// List managed nodes: id, name, private IP, platform, ping status.
    List(list::Args),
    /// Run a tunnel defined in the config file ([tunnels.NAME]).
    Tunnel(config::TunnelArgs),
    /// A TCP tunnel through an EC2 Instance Connect Endpoint (like `aws ec2-instance-connect open-tunnel`).
    OpenTunnel(eice::OpenTunnelArgs),
    /// Print a shell completion script.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// The AWS identity and endpoint flags every AWS-calling subcommand takes (the AWS CLI's
/// own names; the standard environment applies when they are absent).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct AwsArgs {
    /// Named profile (default: AWS_PROFILE, then the config file's [defaults] profile).
    #[arg(long, value_name = "NAME")]
    pub profile: Option<String>,
    /// Region (default: AWS_REGION / AWS_DEFAULT_REGION, the config file, the profile).
    #[arg(long, value_name = "REGION")]
    pub region: Option<String>,
    /// SSM endpoint (default: AWS_ENDPOINT_URL_SSM, AWS_ENDPOINT_URL, the profile, the
    /// regional endpoint).
    #[arg(long = "endpoint-url", value_name = "URL")]
    pub endpoint_url: Option<String>,
    /// Config file (default: config.toml in the platform's config directory).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// Why a subcommand stopped before (or instead of) a session: its message and status.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    /// Bad input or an unusable target: status 2.
    pub fn usage(message: impl Into<String>) -> Failure {
        Failure {
            code: exit::USAGE,
            message: message.into(),
        }
    }

    /// An AWS call or local setup failed: status 1.
    pub fn failed(message: impl Into<String>) -> Failure {
        Failure {
            code: exit::SESSION_FAILED,
            message: message.into(),
        }
    }
}

impl From<AwsError> for Failure {
    fn from(e: AwsError) -> Failure {
        Failure::failed(e.to_string())
    }
}

/// Runs the standalone client for argv; returns the exit status.
pub fn main(args: Vec<String>) -> u8 {
    let cli = match Cli::try_parse_from(&args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            };
        }
    };
    let result = match cli.command {
        Command::StartSession(a) => start_session::main(a),
        Command::Shell(a) => shell::main(a),
        Command::Run(a) => run::main(a),
        Command::Forward(a) => forward::main(a),
        Command::SshProxy(a) => ssh::proxy_main(a),
        Command::SshConfig(a) => ssh::config_main(a),
        Command::Socks(a) => socks::main(a),
        Command::List(a) => list::main(a),
        Command::Tunnel(a) => config::tunnel_main(a),
        Command::OpenTunnel(a) => eice::open_tunnel_main(a),
        Command::Completions { shell } => {
            let mut cmd = Cli::command();
            clap_complete::generate(
                shell,
                &mut cmd,
                "session-manager-plugin",
                &mut std::io::stdout(),
            );
            Ok(exit::OK)
        }
    };
    match result {
        Ok(code) => code,
        Err(f) => {
            eprintln!("session-manager-plugin: {}", f.message);
            f.code
        }
    }
}

/// A current-thread runtime, as the plugin path uses.
pub fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::failed(format!("cannot start the runtime: {e}")))
}

/// Everything sessions of one invocation share: the AWS context (credentials are resolved
/// once), the TLS roots and the `SSM_PLUGIN_*` options.
pub struct Client {
    pub aws: AwsContext,
    pub options: Options,
    tls: TlsSettings,
}

impl Client {
    /// Builds the client from the flags, the environment and the config file's defaults.
    pub fn new(a: &AwsArgs, defaults: &config::Defaults) -> Result<Client, Failure> {
        let env_set = |names: &[&str]| {
            names
                .iter()
                .any(|n| std::env::var(n).is_ok_and(|v| !v.trim().is_empty()))
        };
        // Precedence: flag, then the standard environment (resolved by the SDK chain when
        // we pass nothing), then the config file.
        let profile = match &a.profile {
            Some(p) => p.clone(),
            None if env_set(&["AWS_PROFILE"]) => String::new(),
            None => defaults.profile.clone().unwrap_or_default(),
        };
        let region = match &a.region {
            Some(r) => r.clone(),
            None if env_set(&["AWS_REGION", "AWS_DEFAULT_REGION"]) => String::new(),
            None => defaults.region.clone().unwrap_or_default(),
        };
        let endpoint = a.endpoint_url.clone().unwrap_or_default();
        let options = Options::from_env(|k| std::env::var(k).ok())
            .map_err(|e| Failure::usage(e.to_string()))?;
        let ca_bundle = std::env::var("AWS_CA_BUNDLE").ok();
        let tls =
            TlsSettings::new(ca_bundle.as_deref()).map_err(|e| Failure::failed(e.to_string()))?;
        Ok(Client {
            aws: AwsContext::new(&region, &profile, &endpoint),
            options,
            tls,
        })
    }

    /// The session parameters of a StartSession response this client obtained.
    fn session_params(
        &self,
        resp: StartSessionResponse,
        target: &str,
        console: Console,
        options: Options,
    ) -> session::SessionParams {
        session::SessionParams {
            session_id: resp.session_id,
            token: resp.token_value,
            stream_url: resp.stream_url,
            target: Some(target.to_owned()),
            legacy_cli: false,
            client_version: invocation::version(),
            options,
            tls: self.tls.clone(),
            console,
        }
    }

    /// Runs one session to its end; returns its exit status.
    pub async fn run_session(
        &self,
        resp: StartSessionResponse,
        target: &str,
        console: Console,
        options: Options,
    ) -> u8 {
        let params = self.session_params(resp, target, console, options);
        session::run(params, api::from_context(self.aws.clone())).await
    }

    /// [`Client::run_session`] with the session mode started by `modes` (the SOCKS
    /// proxy hands its connections to a port session this way).
    pub async fn run_session_with_modes(
        &self,
        resp: StartSessionResponse,
        target: &str,
        console: Console,
        options: Options,
        modes: session::ModeStarter,
    ) -> u8 {
        let params = self.session_params(resp, target, console, options);
        let mut env = session::Env::real(&self.tls);
        env.modes = modes;
        session::run_with(params, api::from_context(self.aws.clone()), env).await
    }

    /// StartSession, then the session: the common path of most subcommands.
    pub async fn start_and_run(
        &self,
        req: &aws_ops::StartRequest,
        console: Console,
        options: Options,
    ) -> Result<u8, Failure> {
        let resp = aws_ops::start_session(&self.aws, req).await?;
        Ok(self.run_session(resp, &req.target, console, options).await)
    }
}

/// Loads the config file named by `--config` or the default location.
pub fn load_config(a: &AwsArgs) -> Result<config::Config, Failure> {
    config::Config::load(a.config.as_deref())
}

/// The usual shape of a session subcommand: config, client, target resolution (which may
/// ask the user to pick), then one session on a fresh runtime. `build` turns the resolved
/// instance id into the StartSession request.
pub fn run_one(
    aws: &AwsArgs,
    target: &str,
    console: Console,
    options: impl FnOnce(Options) -> Options,
    build: impl FnOnce(String) -> aws_ops::StartRequest,
) -> Result<u8, Failure> {
    let cfg = load_config(aws)?;
    let client = Client::new(aws, &cfg.defaults)?;
    let rt = runtime()?;
    let id = target::resolve(&rt, &client.aws, target)?;
    let req = build(id);
    let options = options(client.options.clone());
    let code = rt.block_on(client.start_and_run(&req, console, options));
    // Blocking reads of stdin cannot be cancelled; do not wait for them.
    rt.shutdown_background();
    code
}
