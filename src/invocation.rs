//! The process contract: the only code that knows argv positions and the env-var form.
//!
//! The AWS CLI runs the plugin as
//! `session-manager-plugin <response|ENV_NAME> <region> StartSession <profile> <params> <endpoint>`
//! (PROTOCOL.md §1.1). Arguments are positional; nothing but a lone `--version` is a flag.

use ssm_wire::payload::{StartSessionResponse, StartSessionResponseError};

/// Prefix of the environment variable through which the CLI hands over the response.
pub const RESPONSE_ENV_PREFIX: &str = "AWS_SSM_START_SESSION_RESPONSE";

/// The four-part version the AWS CLI parses (it must compare above 1.2.764.0).
pub fn version() -> String {
    format!("{}.0", env!("CARGO_PKG_VERSION"))
}

/// What argv asks for.
#[derive(Debug)]
pub enum Invocation {
    /// No arguments: the install check (`aws ecs execute-command` runs it first).
    InstallCheck,
    /// `--version`.
    Version,
    /// One or two arguments that are not `--version`.
    UnknownOperation(String),
    /// The operation argument is not `StartSession`.
    InvalidOperation(String),
    StartSession(Box<StartSessionArgs>),
}

/// Everything a session needs from argv.
#[derive(Debug, Clone)]
pub struct StartSessionArgs {
    pub response: StartSessionResponse,
    pub region: String,
    /// Empty when the user gave no `--profile`.
    pub profile: String,
    /// `Target` from the parameters (needed for the KMS encryption context).
    pub target: Option<String>,
    /// SSM (or, for `aws ecs execute-command`, ECS) endpoint for Resume/TerminateSession.
    pub endpoint: String,
    /// The 4-argument form of old CLIs: encryption must be refused.
    pub legacy_cli: bool,
}

/// Why argv could not start a session.
#[derive(Debug, thiserror::Error)]
pub enum InvocationError {
    #[error("environment variable {0} is not set or empty: unexpected end of JSON input")]
    EmptyEnvResponse(String),
    #[error("invalid StartSession response: {0}")]
    Response(#[from] StartSessionResponseError),
}

/// Parses argv (`args[0]` is the program name). `getenv` reads (and the caller removes)
/// the response variable of the env-var form.
pub fn parse(
    args: &[String],
    getenv: impl FnOnce(&str) -> Option<String>,
) -> Result<Invocation, InvocationError> {
    match args.len() {
        0 | 1 => return Ok(Invocation::InstallCheck),
        2 if args[1] == "--version" => return Ok(Invocation::Version),
        2 | 3 => return Ok(Invocation::UnknownOperation(args[1].clone())),
        _ => {}
    }
    let operation = &args[3];
    if operation != "StartSession" {
        return Ok(Invocation::InvalidOperation(operation.clone()));
    }
    let response_json = if args[1].starts_with(RESPONSE_ENV_PREFIX) {
        match getenv(&args[1]) {
            Some(v) if !v.is_empty() => v,
            _ => return Err(InvocationError::EmptyEnvResponse(args[1].clone())),
        }
    } else {
        args[1].clone()
    };
    let response = StartSessionResponse::parse(&response_json)?;
    let legacy_cli = args.len() == 4;
    let profile = args.get(4).cloned().unwrap_or_default();
    let parameters: Option<serde_json::Value> = args
        .get(5)
        .and_then(|p| serde_json::from_str(p).ok())
        .filter(|v: &serde_json::Value| v.is_object());
    let target = parameters
        .as_ref()
        .and_then(|p| p.get("Target"))
        .and_then(|t| t.as_str())
        .map(str::to_owned);
    Ok(Invocation::StartSession(Box::new(StartSessionArgs {
        response,
        region: args[2].clone(),
        profile,
        target,
        endpoint: args.get(6).cloned().unwrap_or_default(),
        legacy_cli,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    const RESP: &str =
        r#"{"SessionId": "s-1", "TokenValue": "tok", "StreamUrl": "wss://h/v1/data-channel/s-1"}"#;

    #[test]
    fn forms() {
        assert!(matches!(
            parse(&argv(&["p"]), |_| None),
            Ok(Invocation::InstallCheck)
        ));
        assert!(matches!(
            parse(&argv(&["p", "--version"]), |_| None),
            Ok(Invocation::Version)
        ));
        assert!(matches!(
            parse(&argv(&["p", "x", "y"]), |_| None),
            Ok(Invocation::UnknownOperation(o)) if o == "x"
        ));
        assert!(matches!(
            parse(&argv(&["p", RESP, "r", "Other"]), |_| None),
            Ok(Invocation::InvalidOperation(o)) if o == "Other"
        ));
        let Ok(Invocation::StartSession(s)) =
            parse(&argv(&["p", RESP, "r", "StartSession"]), |_| None)
        else {
            panic!("legacy form not parsed")
        };
        assert!(s.legacy_cli);
        assert_eq!(s.target, None);
        let full = argv(&[
            "p",
            "AWS_SSM_START_SESSION_RESPONSE",
            "eu-west-1",
            "StartSession",
            "prof",
            r#"{"Target": "i-1"}"#,
            "https://ssm.eu-west-1.amazonaws.com",
            "extra",
        ]);
        let Ok(Invocation::StartSession(s)) = parse(&full, |n| {
            assert_eq!(n, "AWS_SSM_START_SESSION_RESPONSE");
            Some(RESP.to_string())
        }) else {
            panic!("full form not parsed")
        };
        assert!(!s.legacy_cli);
        assert_eq!(s.response.token_value, "tok");
        assert_eq!(s.region, "eu-west-1");
        assert_eq!(s.profile, "prof");
        assert_eq!(s.target.as_deref(), Some("i-1"));
        assert_eq!(s.endpoint, "https://ssm.eu-west-1.amazonaws.com");
    }

    #[test]
    fn errors() {
        let a = argv(&["p", "AWS_SSM_START_SESSION_RESPONSE_X", "r", "StartSession"]);
        assert!(matches!(
            parse(&a, |_| None),
            Err(InvocationError::EmptyEnvResponse(_))
        ));
        assert!(parse(&argv(&["p", "{", "r", "StartSession"]), |_| None).is_err());
    }

    #[test]
    fn version_is_four_numeric_parts_above_minimum() {
        let v = version();
        let parts: Vec<u64> = v.split('.').map(|p| p.parse().unwrap()).collect();
        assert_eq!(parts.len(), 4);
        assert!(parts > vec![1, 2, 764, 0]);
    }
}
