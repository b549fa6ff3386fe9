//! Settings from `SSM_PLUGIN_*` environment variables. Every one is optional; unset means
//! the official plugin's behaviour (or a safe default the README states).

use std::net::IpAddr;
use std::time::Duration;

use ssm_wire::channel::ChannelConfig;

use crate::stream_url::TrustedHosts;

/// Prefix shared by every variable.
pub const PREFIX: &str = "SSM_PLUGIN_";

/// New frames queued in front of the pacer when pacing is on.
const PACED_QUEUE: usize = 1;

/// Parsed settings.
#[derive(Clone, Debug)]
pub struct Options {
    /// `SSM_PLUGIN_QUIET=1`: status lines to stderr, stdout carries only session data.
    pub quiet: bool,
    /// `SSM_PLUGIN_LISTEN_ADDRESS`: address the port-forwarding listener binds
    /// (default 127.0.0.1, as the official plugin's `localhost`).
    pub listen_address: IpAddr,
    /// `SSM_PLUGIN_PACKETS_PER_SECOND`: pacing budget (0 disables pacing).
    pub packets_per_second: Option<f64>,
    /// `SSM_PLUGIN_PAYLOAD_SIZE`: bytes per stream message (default 1024).
    pub payload_size: usize,
    /// `SSM_PLUGIN_WINDOW_PACKETS`: stream messages in flight.
    pub window_packets: usize,
    /// `SSM_PLUGIN_RECONNECT_TIMEOUT` (seconds): how long to keep trying to resume.
    pub reconnect_timeout: Duration,
    /// `SSM_PLUGIN_FLUSH_TIMEOUT` (seconds): how long to wait for acknowledgements before
    /// exiting.
    pub flush_timeout: Duration,
    /// `SSM_PLUGIN_PING_INTERVAL` (seconds): WebSocket ping interval (official: 300).
    pub ping_interval: Duration,
    /// `SSM_PLUGIN_TRUSTED_STREAM_HOSTS`: StreamUrl hosts trusted besides the Session
    /// Manager endpoints and loopback (names or `*.suffix`, comma-separated).
    pub trusted_stream_hosts: TrustedHosts,
}

/// A variable that is set but unusable.
#[derive(Debug, thiserror::Error)]
#[error("{name}={value:?}: {why}")]
pub struct OptionError {
    pub name: String,
    pub value: String,
    pub why: &'static str,
}

impl Default for Options {
    fn default() -> Self {
        let ch = ChannelConfig::default();
        Options {
            quiet: false,
            listen_address: IpAddr::from([127, 0, 0, 1]),
            packets_per_second: ch.packets_per_second,
            payload_size: ch.max_payload,
            window_packets: ch.window_packets,
            reconnect_timeout: Duration::from_secs(600),
            flush_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(300),
            trusted_stream_hosts: TrustedHosts::default(),
        }
    }
}

fn secs(name: &str, value: &str) -> Result<Duration, OptionError> {
    value
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| OptionError {
            name: name.to_owned(),
            value: value.to_owned(),
            why: "expected a number of seconds",
        })
}

impl Options {
    /// Reads the variables through `get` (the process environment in `main`).
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Options, OptionError> {
        let mut o = Options::default();
        let var = |suffix: &str| {
            let name = format!("{PREFIX}{suffix}");
            get(&name).filter(|v| !v.is_empty()).map(|v| (name, v))
        };
        if let Some((_, v)) = var("QUIET") {
            o.quiet = !matches!(v.as_str(), "0" | "false" | "no" | "off");
        }
        if let Some((name, v)) = var("LISTEN_ADDRESS") {
            o.listen_address = v
                .trim_matches(|c| c == '[' || c == ']')
                .parse()
                .map_err(|_| OptionError {
                    name,
                    value: v.clone(),
                    why: "expected an IPv4 or IPv6 address",
                })?;
        }
        if let Some((name, v)) = var("PACKETS_PER_SECOND") {
            let pps: f64 = v
                .parse()
                .ok()
                .filter(|p: &f64| p.is_finite() && *p >= 0.0)
                .ok_or(OptionError {
                    name,
                    value: v.clone(),
                    why: "expected a number (0 disables pacing)",
                })?;
            o.packets_per_second = (pps > 0.0).then_some(pps);
        }
        if let Some((name, v)) = var("PAYLOAD_SIZE") {
            o.payload_size =
                v.parse()
                    .ok()
                    .filter(|n| (64..=65536).contains(n))
                    .ok_or(OptionError {
                        name,
                        value: v.clone(),
                        why: "expected 64 to 65536 bytes",
                    })?;
        }
        if let Some((name, v)) = var("WINDOW_PACKETS") {
            o.window_packets =
                v.parse()
                    .ok()
                    .filter(|n| (1..=100_000).contains(n))
                    .ok_or(OptionError {
                        name,
                        value: v.clone(),
                        why: "expected 1 to 100000 messages",
                    })?;
        }
        if let Some((name, v)) = var("RECONNECT_TIMEOUT") {
            o.reconnect_timeout = secs(&name, &v)?;
        }
        if let Some((name, v)) = var("FLUSH_TIMEOUT") {
            o.flush_timeout = secs(&name, &v)?;
        }
        if let Some((name, v)) = var("PING_INTERVAL") {
            o.ping_interval = secs(&name, &v)?.max(Duration::from_secs(1));
        }
        if let Some((name, v)) = var("TRUSTED_STREAM_HOSTS") {
            o.trusted_stream_hosts = TrustedHosts::parse(&v).map_err(|e| OptionError {
                name,
                value: v.clone(),
                why: e.why,
            })?;
        }
        Ok(o)
    }

    /// The channel configuration these options describe.
    pub fn channel_config(&self, seed: u64) -> ChannelConfig {
        ChannelConfig {
            max_payload: self.payload_size,
            packets_per_second: self.packets_per_second,
            window_packets: self.window_packets,
            window_bytes: self.window_packets.saturating_mul(self.payload_size),
            // Paced, a frame waiting for a token is all the queue needs: anything more is
            // latency for the next keystroke. Unpaced, a few frames keep the writer busy.
            max_queued: if self.packets_per_second.is_some() {
                PACED_QUEUE
            } else {
                ChannelConfig::default().max_queued
            },
            seed,
            ..ChannelConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse(vars: &[(&str, &str)]) -> Result<Options, OptionError> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Options::from_env(|k| m.get(k).cloned())
    }

    #[test]
    fn defaults_and_overrides() {
        let o = parse(&[]).unwrap();
        assert!(!o.quiet);
        assert_eq!(o.listen_address.to_string(), "127.0.0.1");
        let o = parse(&[
            ("SSM_PLUGIN_QUIET", "1"),
            ("SSM_PLUGIN_LISTEN_ADDRESS", "[::1]"),
            ("SSM_PLUGIN_PACKETS_PER_SECOND", "0"),
            ("SSM_PLUGIN_RECONNECT_TIMEOUT", "30"),
        ])
        .unwrap();
        assert!(o.quiet);
        assert_eq!(o.listen_address.to_string(), "::1");
        assert_eq!(o.packets_per_second, None);
        assert_eq!(o.reconnect_timeout, Duration::from_secs(30));
    }

    #[test]
    fn bad_values_are_errors_naming_the_variable() {
        let e = parse(&[("SSM_PLUGIN_LISTEN_ADDRESS", "nowhere")]).unwrap_err();
        assert!(e
            .to_string()
            .starts_with("SSM_PLUGIN_LISTEN_ADDRESS=\"nowhere\""));
        assert!(parse(&[("SSM_PLUGIN_PAYLOAD_SIZE", "10")]).is_err());
        assert!(parse(&[("SSM_PLUGIN_FLUSH_TIMEOUT", "-1")]).is_err());
    }
}
