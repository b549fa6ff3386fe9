//! The config file: `config.toml` in the platform's config directory
//! (`$XDG_CONFIG_HOME/session-manager-plugin/` or `~/.config/session-manager-plugin/` on
//! Linux, `~/Library/Application Support/session-manager-plugin/` on macOS,
//! `%APPDATA%\session-manager-plugin\` on Windows), or the file given with `--config`.
//!
//! ```toml
//! [defaults]
//! profile = "dev"        # when neither --profile nor AWS_PROFILE is given
//! region = "eu-west-1"   # when neither --region nor AWS_REGION is given
//!
//! [tunnels.db]           # session-manager-plugin tunnel db
//! target = "bastion"
//! forward = ["5432:db.internal:5432", "6379:cache.internal:6379"]
//! profile = "prod"       # optional, per tunnel
//! region = "eu-west-1"   # optional, per tunnel
//! sessions = 4           # optional: sessions per forward (README, "Several sessions")
//! idle_timeout = 300     # optional: seconds before an idle extra session closes
//! ```
//!
//! Unknown keys are errors. Every error names the file, the line and the field.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use super::{forward, AwsArgs, Failure};

/// `[defaults]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    pub profile: Option<String>,
    pub region: Option<String>,
}

/// `[tunnels.NAME]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tunnel {
    pub target: Spanned<String>,
    pub forward: Spanned<Vec<Spanned<String>>>,
    pub profile: Option<String>,
    pub region: Option<String>,
    /// Sessions per forward (1 to 64).
    pub sessions: Option<Spanned<usize>>,
    /// Seconds an extra session may stay idle before it is closed.
    pub idle_timeout: Option<u64>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub defaults: Defaults,
    #[serde(default)]
    pub tunnels: BTreeMap<String, Tunnel>,
    /// Where it was read from (and its text, for line numbers).
    #[serde(skip)]
    pub source: Option<(PathBuf, String)>,
}

/// `config.toml` in the platform's config directory.
pub fn default_path() -> Option<PathBuf> {
    dirs::config_dir().map(|d| d.join("session-manager-plugin").join("config.toml"))
}

impl Config {
    /// Reads `explicit` (which must exist), else the default file (absent means empty).
    pub fn load(explicit: Option<&Path>) -> Result<Config, Failure> {
        let path = match explicit {
            Some(p) => p.to_path_buf(),
            None => match default_path() {
                Some(p) if p.exists() => p,
                _ => return Ok(Config::default()),
            },
        };
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Failure::usage(format!("config file {}: {e}", path.display())))?;
        Config::parse(&path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Config, Failure> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| {
            let at = e
                .span()
                .map(|s| format!(":{}", line_of(text, s.start)))
                .unwrap_or_default();
            Failure::usage(format!(
                "config file {}{at}: {}",
                path.display(),
                e.message()
            ))
        })?;
        cfg.source = Some((path.to_path_buf(), text.to_owned()));
        for (name, t) in &cfg.tunnels {
            if t.target.get_ref().trim().is_empty() {
                return Err(cfg.error(
                    t.target.span().start,
                    &format!("tunnels.{name}.target"),
                    "is empty",
                ));
            }
            if t.forward.get_ref().is_empty() {
                return Err(cfg.error(
                    t.forward.span().start,
                    &format!("tunnels.{name}.forward"),
                    "needs at least one forward",
                ));
            }
            if let Some(n) = &t.sessions {
                if !(1..=forward::MAX_SESSIONS).contains(n.get_ref()) {
                    return Err(cfg.error(
                        n.span().start,
                        &format!("tunnels.{name}.sessions"),
                        &format!("must be 1 to {}", forward::MAX_SESSIONS),
                    ));
                }
            }
            for (i, f) in t.forward.get_ref().iter().enumerate() {
                if let Err(e) = forward::parse_spec(f.get_ref()) {
                    return Err(cfg.error(
                        f.span().start,
                        &format!("tunnels.{name}.forward[{i}]"),
                        &e,
                    ));
                }
            }
        }
        Ok(cfg)
    }

    fn error(&self, offset: usize, field: &str, what: &str) -> Failure {
        match &self.source {
            Some((path, text)) => Failure::usage(format!(
                "config file {}:{}: {field}: {what}",
                path.display(),
                line_of(text, offset)
            )),
            None => Failure::usage(format!("config: {field}: {what}")),
        }
    }
}

/// 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Example (config.toml):\n  [tunnels.db]\n  target = \"bastion\"\n  \
forward = [\"5432:db.internal:5432\"]\n\nthen:  session-manager-plugin tunnel db"
)]
pub struct TunnelArgs {
    /// The tunnel's name ([tunnels.NAME] in the config file).
    pub name: String,
    #[command(flatten)]
    pub aws: AwsArgs,
}

pub fn tunnel_main(a: TunnelArgs) -> Result<u8, Failure> {
    let cfg = Config::load(a.aws.config.as_deref())?;
    let Some(t) = cfg.tunnels.get(&a.name) else {
        let known: Vec<&str> = cfg.tunnels.keys().map(String::as_str).collect();
        let file = match &cfg.source {
            Some((p, _)) => p.display().to_string(),
            None => default_path()
                .map(|p| format!("{} (absent)", p.display()))
                .unwrap_or_else(|| "no config file".to_owned()),
        };
        return Err(Failure::usage(format!(
            "no tunnel {:?} in {file}{}",
            a.name,
            if known.is_empty() {
                String::new()
            } else {
                format!("; defined: {}", known.join(", "))
            }
        )));
    };
    let mut aws = a.aws.clone();
    aws.profile = aws.profile.or_else(|| t.profile.clone());
    aws.region = aws.region.or_else(|| t.region.clone());
    let forwards: Vec<String> = t
        .forward
        .get_ref()
        .iter()
        .map(|f| f.get_ref().clone())
        .collect();
    let pool = forward::PoolArgs {
        sessions: t.sessions.as_ref().map_or(1, |n| *n.get_ref()),
        idle_timeout: t.idle_timeout.unwrap_or(forward::DEFAULT_IDLE_SECS),
    };
    forward::run_forwards(&aws, t.target.get_ref(), &forwards, pool)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, Failure> {
        Config::parse(Path::new("/c/config.toml"), text)
    }

    #[test]
    fn good() {
        let c = parse(
            "[defaults]\nprofile = \"dev\"\n\n[tunnels.db]\ntarget = \"bastion\"\nforward = [\"5432:db:5432\"]\n",
        )
        .unwrap();
        assert_eq!(c.defaults.profile.as_deref(), Some("dev"));
        assert_eq!(c.tunnels["db"].target.get_ref(), "bastion");
        assert!(parse("").unwrap().tunnels.is_empty());
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let e = parse("[defaults]\nprofile = \"dev\"\nregoin = \"x\"\n").unwrap_err();
        assert!(
            e.message.starts_with("config file /c/config.toml:3: "),
            "{}",
            e.message
        );
        assert!(e.message.contains("regoin"), "{}", e.message);
        let e = parse("[tunnels.db]\ntarget = \"b\"\nforward = [\n  \"1:2\",\n  \"oops\",\n]\n")
            .unwrap_err();
        assert!(
            e.message
                .starts_with("config file /c/config.toml:5: tunnels.db.forward[1]: -L oops"),
            "{}",
            e.message
        );
        let e = parse("[tunnels.db]\nforward = [\"1:2\"]\n").unwrap_err();
        assert!(e.message.contains("target"), "{}", e.message);
        let e = parse("[tunnels.db]\ntarget = 5\nforward = []\n").unwrap_err();
        assert!(
            e.message.starts_with("config file /c/config.toml:2: "),
            "{}",
            e.message
        );
        assert_eq!(e.code, 2);
    }
}
