//! `shell TARGET [--record FILE]`: an interactive shell (the default session document).
//! With `--record`, the session runs under a pseudo-terminal of ours and everything the
//! terminal showed is written to FILE as an asciicast v2 transcript ([`super::record`]).

use std::path::PathBuf;

use super::aws_ops::StartRequest;
use super::{record, run_one, AwsArgs, Failure};
use crate::console::Console;

#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:\n  session-manager-plugin shell web-1\n  \
session-manager-plugin shell web-1 --record web-1.cast && asciinema play web-1.cast")]
pub struct Args {
    /// Instance id or name.
    pub target: String,
    /// Write an asciicast v2 transcript of the terminal to FILE.
    #[arg(long, value_name = "FILE")]
    pub record: Option<PathBuf>,
    #[command(flatten)]
    pub aws: AwsArgs,
}

pub fn main(a: Args) -> Result<u8, Failure> {
    if let Some(file) = &a.record {
        return record::record(file, &a.target);
    }
    let quiet = crate::options::Options::from_env(|k| std::env::var(k).ok())
        .map(|o| o.quiet)
        .unwrap_or(false);
    run_one(
        &a.aws,
        &a.target,
        Console { quiet },
        |o| o,
        |id| StartRequest::new(id, None),
    )
}
