//! `session-manager-plugin`: argv → [`invocation::Invocation`] → run → exit status.

mod api;
mod aws;
mod cli;
mod console;
mod invocation;
mod logging;
mod modes;
mod options;
mod roots;
mod session;
mod stream_url;
mod terminal;
mod transport;

use std::io::Write;
use std::process::ExitCode;

use invocation::{Invocation, InvocationError, RESPONSE_ENV_PREFIX};

/// Exit statuses (documented in the README).
pub mod exit {
    /// Success, or the remote command exited 0.
    pub const OK: u8 = 0;
    /// The session failed: connection, handshake, local listener, channel errors.
    pub const SESSION_FAILED: u8 = 1;
    /// Malformed invocation: bad argv JSON, missing fields, unknown operation.
    pub const USAGE: u8 = 2;
}

fn main() -> ExitCode {
    let _log = logging::init();
    let args: Vec<String> = std::env::args().collect();
    // The standalone client only for its own subcommand names (and --help); every other
    // argv is the AWS CLI's contract, handled exactly as before.
    if cli::handles(&args) {
        let code = cli::main(args);
        drop(_log);
        exit_now(code);
    }
    // The env-var form: read the response, then remove it from our environment at once, so
    // no child process or crash report can see the token. This runs before any thread exists.
    let parsed = invocation::parse(&args, |name| {
        let value = std::env::var(name).ok();
        if name.starts_with(RESPONSE_ENV_PREFIX) {
            std::env::remove_var(name);
        }
        value
    });
    let mut out = std::io::stdout().lock();
    let code = match parsed {
        Ok(Invocation::InstallCheck) => {
            let _ = out.write_all(
                b"\nThe Session Manager plugin was installed successfully. Use the AWS CLI to start a session.\n\n",
            );
            exit::OK
        }
        Ok(Invocation::Version) => {
            let _ = writeln!(out, "{}", invocation::version());
            exit::OK
        }
        Ok(Invocation::UnknownOperation(op)) => {
            let _ = write!(
                out,
                "\nUnknown operation {op}. \nUse session-manager-plugin --version to check the version.\n\n"
            );
            exit::USAGE
        }
        Ok(Invocation::InvalidOperation(op)) => {
            let _ = out.write_all(b"Invalid Operation");
            let _ = out.flush();
            eprintln!("\nsession-manager-plugin: operation {op:?} is not supported; the AWS CLI passes StartSession");
            exit::USAGE
        }
        Err(e) => {
            report_start_error(&e);
            exit::USAGE
        }
        Ok(Invocation::StartSession(args)) => {
            drop(out);
            let code = session_main(*args);
            drop(_log);
            exit_now(code);
        }
    };
    let _ = out.flush();
    ExitCode::from(code)
}

/// Exits at once after a session: a thread still blocked reading stdin (a pipe that stays
/// open) or writing to a terminal must not keep a finished session's process alive.
fn exit_now(code: u8) -> ! {
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    std::process::exit(i32::from(code))
}

fn report_start_error(e: &InvocationError) {
    eprintln!("Cannot perform start session: {e}");
}

fn session_main(args: invocation::StartSessionArgs) -> u8 {
    let options = match options::Options::from_env(|k| std::env::var(k).ok()) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("Cannot perform start session: {e}");
            return exit::USAGE;
        }
    };
    // Before anything connects or the token leaves the process (README "Security").
    if let Err(e) = stream_url::check(&args.response.stream_url, &options.trusted_stream_hosts) {
        eprintln!("Cannot perform start session: {e}");
        return exit::SESSION_FAILED;
    }
    let console = console::Console {
        quiet: options.quiet,
    };
    let ca_bundle = std::env::var("AWS_CA_BUNDLE").ok();
    let tls = match transport::TlsSettings::new(ca_bundle.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            console.error(&format!("Cannot perform start session: {e}"));
            return exit::SESSION_FAILED;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            console.error(&format!("Cannot perform start session: {e}"));
            return exit::SESSION_FAILED;
        }
    };
    let params = session::SessionParams {
        session_id: args.response.session_id.clone(),
        token: args.response.token_value.clone(),
        stream_url: args.response.stream_url.clone(),
        target: args.target.clone(),
        legacy_cli: args.legacy_cli,
        client_version: invocation::version(),
        options,
        tls,
        console,
    };
    let api = api::new(&args);
    let code = runtime.block_on(session::run(params, api));
    // Blocking reads of stdin cannot be cancelled; do not wait for them.
    runtime.shutdown_background();
    code
}
