//! `run TARGET -- COMMAND…`: AWS-StartNonInteractiveCommand. The remote stdout and stderr
//! go to ours, kept apart; the remote exit code is the exit status. Status lines
//! (`Starting session…`) go to stderr, so stdout holds only the command's output.

use super::aws_ops::StartRequest;
use super::{run_one, AwsArgs, Failure};
use crate::console::Console;

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Example:\n  session-manager-plugin run web-1 -- df -h /\n\n\
One COMMAND word is passed to the remote shell as it is (`run web-1 -- 'ls | wc -l'`); \
several are quoted for a POSIX shell and joined."
)]
pub struct Args {
    /// Instance id or name.
    pub target: String,
    /// The command (after `--`).
    #[arg(required = true, last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
    #[command(flatten)]
    pub aws: AwsArgs,
}

/// POSIX sh quoting of one word (unchanged when it needs none).
pub fn sh_quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%^".contains(&b));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// The remote command line for COMMAND….
pub fn command_line(words: &[String]) -> String {
    match words {
        [one] => one.clone(),
        many => many
            .iter()
            .map(|w| sh_quote(w))
            .collect::<Vec<_>>()
            .join(" "),
    }
}

pub fn main(a: Args) -> Result<u8, Failure> {
    let command = command_line(&a.command);
    run_one(
        &a.aws,
        &a.target,
        Console { quiet: true },
        |mut o| {
            o.quiet = true;
            o
        },
        move |id| {
            StartRequest::new(id, Some("AWS-StartNonInteractiveCommand")).param("command", command)
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        let w = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(command_line(&w(&["ls | wc -l"])), "ls | wc -l");
        assert_eq!(command_line(&w(&["sh", "-c", "exit 3"])), "sh -c 'exit 3'");
        assert_eq!(command_line(&w(&["echo", "it's"])), r"echo 'it'\''s'");
        assert_eq!(command_line(&w(&["printf", ""])), "printf ''");
    }
}
