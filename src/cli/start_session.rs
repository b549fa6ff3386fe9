//! `start-session`: `aws ssm start-session` without the AWS CLI, with its flags.

use super::aws_ops::StartRequest;
use super::{params, run_one, AwsArgs, Failure};
use crate::console::Console;

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Example:\n  session-manager-plugin start-session --target web-1 \\\n    \
--document-name AWS-StartPortForwardingSession --parameters portNumber=80,localPortNumber=8080"
)]
pub struct Args {
    /// Instance id (i-…, mi-…), ECS target, or a name (Name tag, private DNS name, private
    /// IPv4, managed node computer name).
    #[arg(long, value_name = "TARGET")]
    pub target: String,
    /// SSM document (default: the shell, Standard_Stream).
    #[arg(long = "document-name", value_name = "NAME")]
    pub document_name: Option<String>,
    /// Document parameters: JSON, shorthand (k=v,k2=v2) or file://PATH.
    #[arg(long, value_name = "PARAMS")]
    pub parameters: Option<String>,
    /// Reason recorded with the session.
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,
    #[command(flatten)]
    pub aws: AwsArgs,
}

pub fn main(a: Args) -> Result<u8, Failure> {
    let parameters = match &a.parameters {
        Some(p) => params::parse(p).map_err(Failure::usage)?,
        None => Default::default(),
    };
    let quiet = crate::options::Options::from_env(|k| std::env::var(k).ok())
        .map(|o| o.quiet)
        .unwrap_or(false);
    let document = a.document_name.clone();
    let reason = a.reason.clone();
    run_one(
        &a.aws,
        &a.target,
        Console { quiet },
        |o| o,
        move |id| StartRequest {
            target: id,
            document_name: document,
            parameters,
            reason,
        },
    )
}
