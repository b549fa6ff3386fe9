//! Settings from `SSM_PLUGIN_*` environment variables. Every one is optional; unset means
//! the official plugin's behaviour (or a safe default the README states).

use std::net::IpAddr;
use std::time::Duration;

use ssm_wire::channel::{AckPacing, ChannelConfig};

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
    /// `SSM_PLUGIN_ACK_PACING`: how acknowledgements use that budget (`charged`, the
    /// default; `exempt`; `paced`). README, "Acknowledgement policy".
    pub ack_pacing: AckPacing,
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
    /// `SSM_PLUGIN_CONNECTION_BUFFER` (bytes): downloads one local connection may hold
    /// unwritten before the session stops reading the WebSocket (port forwarding).
    pub connection_buffer: usize,
    /// `SSM_PLUGIN_SESSION_BUFFER` (bytes): the same for all connections together.
    pub session_buffer: usize,
    /// `SSM_PLUGIN_MAX_CONNECTIONS`: local connections served at once per listener; more
    /// wait in the kernel's accept queue.
    pub max_connections: usize,
}

const MIB: usize = 1024 * 1024;

/// Longest accepted duration (one day): far below what `Instant + d` can hold on any
/// platform, and longer than a Session Manager session may last.
pub const MAX_SECONDS: f64 = 86_400.0;
/// Highest accepted pacing budget (frames per second).
pub const MAX_PACKETS_PER_SECOND: f64 = 1_000_000.0;
/// Most payload bytes in flight that the window may allow (`WINDOW_PACKETS` ×
/// `PAYLOAD_SIZE`): what the plugin may hold unacknowledged.
pub const MAX_WINDOW_BYTES: usize = 64 << 20;

/// A variable that is set but unusable: `SSM_PLUGIN_X: <why> (allowed: …)`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{name}: {why} (allowed: {allowed})")]
pub struct OptionError {
    pub name: String,
    pub why: String,
    pub allowed: &'static str,
}

const BOOL: &str = "1, true, yes, on, 0, false, no, off";
const ADDRESS: &str = "an IPv4 or IPv6 address, e.g. 127.0.0.1, 0.0.0.0, ::1 or [::1]";
const PPS: &str = "0 to disable pacing, or 1 to 1000000 frames per second";
const PAYLOAD: &str = "64 to 65536 bytes";
const ACK_PACING: &str = "charged, exempt or paced";
const WINDOW: &str =
    "1 to 100000 messages, and at most 64 MiB in flight (WINDOW_PACKETS × PAYLOAD_SIZE)";
const RECONNECT: &str = "0 to 86400 seconds";
const FLUSH: &str = "0 to 86400 seconds";
const PING: &str = "1 to 86400 seconds";
const HOSTS: &str = "comma-separated host names or *.suffix entries";
const CONN_BUFFER: &str = "65536 to 1073741824 bytes";
const SESSION_BUFFER: &str = "65536 to 4294967296 bytes (at least the connection buffer is used)";
const MAX_CONNECTIONS: &str = "1 to 65535 connections";

impl Default for Options {
    fn default() -> Self {
        let ch = ChannelConfig::default();
        Options {
            quiet: false,
            listen_address: IpAddr::from([127, 0, 0, 1]),
            packets_per_second: ch.packets_per_second,
            ack_pacing: ch.ack_pacing,
            payload_size: ch.max_payload,
            window_packets: ch.window_packets,
            reconnect_timeout: Duration::from_secs(600),
            flush_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(300),
            trusted_stream_hosts: TrustedHosts::default(),
            connection_buffer: 16 * MIB,
            session_buffer: 64 * MIB,
            max_connections: 512,
        }
    }
}

/// One set variable: its full name and trimmed value.
struct Var {
    name: String,
    value: String,
}

impl Var {
    fn err(&self, why: impl Into<String>, allowed: &'static str) -> OptionError {
        OptionError {
            name: self.name.clone(),
            why: why.into(),
            allowed,
        }
    }

    /// Not understood at all: quotes the value (shortened: it may be anything).
    fn not_a(&self, what: &str, allowed: &'static str) -> OptionError {
        let mut shown: String = self.value.chars().take(40).collect();
        if shown.len() < self.value.len() {
            shown.push('…');
        }
        self.err(format!("{shown:?} is not {what}"), allowed)
    }

    fn boolean(&self) -> Result<bool, OptionError> {
        match self.value.to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(true),
            "0" | "false" | "no" | "off" => Ok(false),
            _ => Err(self.not_a("a boolean", BOOL)),
        }
    }

    /// A whole number in `range`.
    fn integer(
        &self,
        range: std::ops::RangeInclusive<usize>,
        allowed: &'static str,
    ) -> Result<usize, OptionError> {
        if self.value.is_empty() || !self.value.bytes().all(|b| b.is_ascii_digit()) {
            return Err(self.not_a("a whole number", allowed));
        }
        // All digits: the only failure left is overflow.
        let n: usize = self
            .value
            .parse()
            .map_err(|_| self.err(format!("{} is too large", self.value), allowed))?;
        if n < *range.start() {
            return Err(self.err(format!("{n} is too small"), allowed));
        }
        if n > *range.end() {
            return Err(self.err(format!("{n} is too large"), allowed));
        }
        Ok(n)
    }

    /// A finite decimal number in `min..=max` (no `inf`, `nan` or hex).
    fn number(&self, min: f64, max: f64, allowed: &'static str) -> Result<f64, OptionError> {
        let plain = self
            .value
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'+' | b'e' | b'E'));
        let x: f64 = match self.value.parse::<f64>() {
            Ok(x) if plain && x.is_finite() => x,
            _ => return Err(self.not_a("a number", allowed)),
        };
        if x < min {
            return Err(self.err(format!("{} is too small", self.value), allowed));
        }
        if x > max {
            return Err(self.err(format!("{} is too large", self.value), allowed));
        }
        Ok(x)
    }

    /// Seconds in `min..=MAX_SECONDS`, as a duration.
    fn seconds(&self, min: f64, allowed: &'static str) -> Result<Duration, OptionError> {
        let s = self.number(min, MAX_SECONDS, allowed)?;
        // In range, so finite, non-negative and small: from_secs_f64 cannot panic.
        Ok(Duration::from_secs_f64(s))
    }
}

impl Options {
    /// Reads the variables through `get` (the process environment in `main`). Every
    /// value is range-checked; the first unusable one is the error. Set-but-empty
    /// variables count as unset.
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Options, OptionError> {
        let mut o = Options::default();
        let var = |suffix: &str| {
            let name = format!("{PREFIX}{suffix}");
            get(&name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
                .map(|value| Var { name, value })
        };
        if let Some(v) = var("QUIET") {
            o.quiet = v.boolean()?;
        }
        if let Some(v) = var("LISTEN_ADDRESS") {
            let bare = match v.value.strip_prefix('[') {
                Some(rest) => rest.strip_suffix(']').filter(|a| a.contains(':')),
                None => Some(v.value.as_str()),
            };
            o.listen_address = bare
                .and_then(|a| a.parse().ok())
                .ok_or_else(|| v.not_a("an IP address", ADDRESS))?;
        }
        if let Some(v) = var("PACKETS_PER_SECOND") {
            let pps = v.number(0.0, MAX_PACKETS_PER_SECOND, PPS)?;
            if pps > 0.0 && pps < 1.0 {
                return Err(v.err(format!("{} is too small", v.value), PPS));
            }
            o.packets_per_second = (pps > 0.0).then_some(pps);
        }
        if let Some(v) = var("ACK_PACING") {
            o.ack_pacing =
                AckPacing::parse(&v.value).ok_or_else(|| v.not_a("a policy", ACK_PACING))?;
        }
        if let Some(v) = var("PAYLOAD_SIZE") {
            o.payload_size = v.integer(64..=65536, PAYLOAD)?;
        }
        if let Some(v) = var("WINDOW_PACKETS") {
            o.window_packets = v.integer(1..=100_000, WINDOW)?;
        }
        if o.window_packets.saturating_mul(o.payload_size) > MAX_WINDOW_BYTES {
            let v = var("WINDOW_PACKETS").unwrap_or(Var {
                name: format!("{PREFIX}WINDOW_PACKETS"),
                value: o.window_packets.to_string(),
            });
            return Err(v.err(
                format!(
                    "{} messages of {} bytes exceed 64 MiB in flight",
                    o.window_packets, o.payload_size
                ),
                WINDOW,
            ));
        }
        if let Some(v) = var("RECONNECT_TIMEOUT") {
            o.reconnect_timeout = v.seconds(0.0, RECONNECT)?;
        }
        if let Some(v) = var("FLUSH_TIMEOUT") {
            o.flush_timeout = v.seconds(0.0, FLUSH)?;
        }
        if let Some(v) = var("PING_INTERVAL") {
            o.ping_interval = v.seconds(1.0, PING)?;
        }
        if let Some(v) = var("TRUSTED_STREAM_HOSTS") {
            o.trusted_stream_hosts =
                TrustedHosts::parse(&v.value).map_err(|e| v.err(e.to_string(), HOSTS))?;
        }
        if let Some(v) = var("CONNECTION_BUFFER") {
            o.connection_buffer = v.integer(64 * 1024..=1024 * MIB, CONN_BUFFER)?;
        }
        if let Some(v) = var("SESSION_BUFFER") {
            o.session_buffer = v.integer(64 * 1024..=4096 * MIB, SESSION_BUFFER)?;
        }
        if let Some(v) = var("MAX_CONNECTIONS") {
            o.max_connections = v.integer(1..=65_535, MAX_CONNECTIONS)?;
        }
        Ok(o)
    }

    /// The channel configuration these options describe.
    pub fn channel_config(&self, seed: u64) -> ChannelConfig {
        ChannelConfig {
            max_payload: self.payload_size,
            packets_per_second: self.packets_per_second,
            ack_pacing: self.ack_pacing,
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

    fn err(name: &str, value: &str) -> String {
        parse(&[(name, value)])
            .expect_err(&format!("{name}={value:?} should be refused"))
            .to_string()
    }

    #[test]
    fn bad_values_are_errors_naming_the_variable_and_the_range() {
        assert_eq!(
            err("SSM_PLUGIN_LISTEN_ADDRESS", "nowhere"),
            format!(
                "SSM_PLUGIN_LISTEN_ADDRESS: \"nowhere\" is not an IP address (allowed: {ADDRESS})"
            )
        );
        assert_eq!(
            err("SSM_PLUGIN_PAYLOAD_SIZE", "10"),
            format!("SSM_PLUGIN_PAYLOAD_SIZE: 10 is too small (allowed: {PAYLOAD})")
        );
        assert_eq!(
            err("SSM_PLUGIN_RECONNECT_TIMEOUT", "1e30"),
            format!("SSM_PLUGIN_RECONNECT_TIMEOUT: 1e30 is too large (allowed: {RECONNECT})")
        );
        assert_eq!(
            err("SSM_PLUGIN_FLUSH_TIMEOUT", "-1"),
            format!("SSM_PLUGIN_FLUSH_TIMEOUT: -1 is too small (allowed: {FLUSH})")
        );
        for (name, value) in [
            ("SSM_PLUGIN_QUIET", "maybe"),
            ("SSM_PLUGIN_LISTEN_ADDRESS", "[127.0.0.1]"),
            ("SSM_PLUGIN_LISTEN_ADDRESS", "[::1"),
            ("SSM_PLUGIN_PACKETS_PER_SECOND", "nan"),
            ("SSM_PLUGIN_PACKETS_PER_SECOND", "inf"),
            ("SSM_PLUGIN_PACKETS_PER_SECOND", "0.001"),
            ("SSM_PLUGIN_PACKETS_PER_SECOND", "1e7"),
            ("SSM_PLUGIN_PAYLOAD_SIZE", "65537"),
            ("SSM_PLUGIN_PAYLOAD_SIZE", "-1024"),
            ("SSM_PLUGIN_PAYLOAD_SIZE", "1k"),
            ("SSM_PLUGIN_PAYLOAD_SIZE", "99999999999999999999999999"),
            ("SSM_PLUGIN_WINDOW_PACKETS", "0"),
            ("SSM_PLUGIN_WINDOW_PACKETS", "100001"),
            ("SSM_PLUGIN_RECONNECT_TIMEOUT", "inf"),
            ("SSM_PLUGIN_RECONNECT_TIMEOUT", "NaN"),
            ("SSM_PLUGIN_RECONNECT_TIMEOUT", "infinity"),
            ("SSM_PLUGIN_RECONNECT_TIMEOUT", "86401"),
            ("SSM_PLUGIN_RECONNECT_TIMEOUT", "0x10"),
            ("SSM_PLUGIN_FLUSH_TIMEOUT", "1e309"),
            ("SSM_PLUGIN_PING_INTERVAL", "0"),
            ("SSM_PLUGIN_PING_INTERVAL", "0.5"),
            ("SSM_PLUGIN_TRUSTED_STREAM_HOSTS", "*"),
            ("SSM_PLUGIN_ACK_PACING", "fast"),
            ("SSM_PLUGIN_ACK_PACING", "1"),
        ] {
            let e = err(name, value);
            assert!(e.starts_with(&format!("{name}: ")), "{e}");
            assert!(e.ends_with(')') && e.contains(" (allowed: "), "{e}");
        }
    }

    #[test]
    fn the_window_is_bounded_in_bytes() {
        let o = parse(&[
            ("SSM_PLUGIN_PAYLOAD_SIZE", "65536"),
            ("SSM_PLUGIN_WINDOW_PACKETS", "1024"),
        ])
        .unwrap();
        assert_eq!(o.window_packets * o.payload_size, MAX_WINDOW_BYTES);
        let e = parse(&[
            ("SSM_PLUGIN_PAYLOAD_SIZE", "65536"),
            ("SSM_PLUGIN_WINDOW_PACKETS", "1025"),
        ])
        .unwrap_err();
        assert_eq!(e.name, "SSM_PLUGIN_WINDOW_PACKETS");
        // The default window with the largest payload is too big as well.
        let e = parse(&[
            ("SSM_PLUGIN_PAYLOAD_SIZE", "65536"),
            ("SSM_PLUGIN_WINDOW_PACKETS", "100000"),
        ])
        .unwrap_err();
        assert!(e.why.contains("exceed 64 MiB"), "{e}");
    }

    #[test]
    fn accepted_forms() {
        let o = parse(&[
            ("SSM_PLUGIN_QUIET", " Off "),
            ("SSM_PLUGIN_LISTEN_ADDRESS", "0.0.0.0"),
            ("SSM_PLUGIN_PACKETS_PER_SECOND", "950.5"),
            ("SSM_PLUGIN_RECONNECT_TIMEOUT", "86400"),
            ("SSM_PLUGIN_FLUSH_TIMEOUT", "0.25"),
            ("SSM_PLUGIN_PING_INTERVAL", "1"),
            ("SSM_PLUGIN_PAYLOAD_SIZE", ""),
        ])
        .unwrap();
        assert!(!o.quiet);
        assert_eq!(o.listen_address.to_string(), "0.0.0.0");
        assert_eq!(o.packets_per_second, Some(950.5));
        assert_eq!(o.reconnect_timeout, Duration::from_secs(86_400));
        assert_eq!(o.flush_timeout, Duration::from_millis(250));
        assert_eq!(o.ping_interval, Duration::from_secs(1));
        assert_eq!(o.payload_size, 1024);
    }

    #[test]
    fn ack_pacing_policy() {
        assert_eq!(parse(&[]).unwrap().ack_pacing, AckPacing::Charged);
        for (v, want) in [
            ("charged", AckPacing::Charged),
            (" Exempt ", AckPacing::Exempt),
            ("PACED", AckPacing::Paced),
        ] {
            let o = parse(&[("SSM_PLUGIN_ACK_PACING", v)]).unwrap();
            assert_eq!(o.ack_pacing, want);
            assert_eq!(o.channel_config(1).ack_pacing, want);
        }
        assert_eq!(
            err("SSM_PLUGIN_ACK_PACING", "fast"),
            format!("SSM_PLUGIN_ACK_PACING: \"fast\" is not a policy (allowed: {ACK_PACING})")
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        const NAMES: &[&str] = &[
            "QUIET",
            "LISTEN_ADDRESS",
            "PACKETS_PER_SECOND",
            "PAYLOAD_SIZE",
            "WINDOW_PACKETS",
            "RECONNECT_TIMEOUT",
            "FLUSH_TIMEOUT",
            "PING_INTERVAL",
            "TRUSTED_STREAM_HOSTS",
            "ACK_PACING",
        ];

        /// Values near the interesting edges as well as arbitrary text.
        fn value() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<String>(),
                "[-+0-9.eE]{0,24}",
                any::<f64>().prop_map(|f| f.to_string()),
                any::<f64>().prop_map(|f| format!("{f:e}")),
                any::<u128>().prop_map(|n| n.to_string()),
                any::<i64>().prop_map(|n| n.to_string()),
                prop::sample::select(vec![
                    "inf",
                    "-inf",
                    "nan",
                    "NaN",
                    "1e30",
                    "1e-30",
                    "-0",
                    "0",
                    "1",
                    "86400",
                    "86400.0000001",
                    "4e-324",
                    "1.7976931348623157e308",
                    "[::1]",
                    "*",
                    "*.a.b",
                    " 5 ",
                    "0x10",
                    "1_000",
                ])
                .prop_map(str::to_owned),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

            /// Any values for any variables: an `Options` within the documented bounds, or
            /// an error naming one of the variables; never a panic.
            #[test]
            fn any_environment_parses_or_is_refused(
                vars in prop::collection::vec((prop::sample::select(NAMES), value()), 0..6)
            ) {
                let vars: Vec<(String, String)> =
                    vars.into_iter().map(|(n, v)| (format!("{PREFIX}{n}"), v)).collect();
                let refs: Vec<(&str, &str)> =
                    vars.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
                match parse(&refs) {
                    Ok(o) => {
                        let max = Duration::from_secs_f64(MAX_SECONDS);
                        prop_assert!(o.reconnect_timeout <= max);
                        prop_assert!(o.flush_timeout <= max);
                        prop_assert!(o.ping_interval <= max);
                        prop_assert!(o.ping_interval >= Duration::from_secs(1));
                        prop_assert!((64..=65536).contains(&o.payload_size));
                        prop_assert!((1..=100_000).contains(&o.window_packets));
                        prop_assert!(o.window_packets * o.payload_size <= MAX_WINDOW_BYTES);
                        if let Some(p) = o.packets_per_second {
                            prop_assert!(p.is_finite() && (1.0..=MAX_PACKETS_PER_SECOND).contains(&p));
                        }
                        // What the driver does with them later must not overflow either.
                        let now = std::time::Instant::now();
                        prop_assert!(now.checked_add(o.reconnect_timeout).is_some());
                        prop_assert!(now.checked_add(o.flush_timeout).is_some());
                        let _ = o.channel_config(1);
                    }
                    Err(e) => {
                        prop_assert!(vars.iter().any(|(n, _)| *n == e.name), "{}", e);
                        let text = e.to_string();
                        let prefix = format!("{}: ", e.name);
                        prop_assert!(text.starts_with(&prefix), "{}", text);
                        prop_assert!(text.contains(" (allowed: "));
                    }
                }
            }

            /// Every in-range number of seconds is accepted as that duration.
            #[test]
            fn in_range_seconds_are_kept(ms in 0u64..=86_400_000) {
                let value = format!("{}.{:03}", ms / 1000, ms % 1000);
                let o = parse(&[("SSM_PLUGIN_RECONNECT_TIMEOUT", &value)]).unwrap();
                prop_assert_eq!(o.reconnect_timeout, Duration::from_millis(ms));
            }
        }
    }
}
