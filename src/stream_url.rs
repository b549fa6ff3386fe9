//! Which hosts the data channel may be opened to (issue 14, item 6).
//!
//! The StreamUrl comes from the StartSession response, and the plugin sends the session
//! token (and a SigV4 signature made with the user's credentials) to it. Like the official
//! plugin since 1.2.889.0, the URL is checked before anything connects: only a `wss://`
//! Session Manager endpoint is accepted —
//!
//! - `ssmmessages.<region>.amazonaws.com` and `ssmmessages-fips.<region>.amazonaws.com`,
//! - the same under `.amazonaws.com.cn` (the China partition),
//! - dual-stack names: `ssmmessages[-fips].dualstack.<region>.amazonaws.com[.cn]`,
//!   `ssmmessages[-fips].<region>.api.aws` and `ssmmessages.<region>.api.amazonwebservices.com.cn`,
//! - interface VPC endpoint names: `vpce-….ssmmessages.<region>.vpce.amazonaws.com[.cn]`
//!   (regional and zonal),
//!
//! plus loopback hosts (`localhost`, `127.0.0.0/8`, `::1`; `ws://` allowed there too) for
//! local simulators, plus whatever `SSM_PLUGIN_TRUSTED_STREAM_HOSTS` lists (exact names, or
//! `*.suffix` for every name under a suffix) for private DNS set-ups. The check looks at
//! the URL text only: no name is resolved.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

/// Names and suffixes trusted in addition to the Session Manager endpoints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustedHosts {
    /// Exact names, lower case, without a trailing dot.
    names: Vec<String>,
    /// Suffixes from `*.suffix` entries, lower case, with their leading dot (".corp.example").
    suffixes: Vec<String>,
}

/// Why a `SSM_PLUGIN_TRUSTED_STREAM_HOSTS` entry is unusable.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("entry {entry:?}: {why}")]
pub struct BadTrustedHost {
    pub entry: String,
    pub why: &'static str,
}

impl TrustedHosts {
    /// Parses a comma-separated list; blanks around entries and empty entries are ignored.
    pub fn parse(list: &str) -> Result<TrustedHosts, BadTrustedHost> {
        let mut t = TrustedHosts::default();
        for raw in list.split(',') {
            let entry = raw.trim();
            if entry.is_empty() {
                continue;
            }
            let bad = |why| BadTrustedHost {
                entry: entry.to_owned(),
                why,
            };
            let (wildcard, name) = match entry.strip_prefix("*.") {
                Some(rest) => (true, rest),
                None => (false, entry),
            };
            let name = normalize(name);
            if name.contains('*') {
                return Err(bad("a wildcard is allowed only as a leading \"*.\""));
            }
            if !is_host_name(&name) && name.parse::<IpAddr>().is_err() {
                return Err(bad("not a host name"));
            }
            if wildcard {
                if !name.contains('.') {
                    return Err(bad("a wildcard needs a suffix of at least two labels"));
                }
                t.suffixes.push(format!(".{name}"));
            } else {
                t.names.push(name);
            }
        }
        Ok(t)
    }

    fn contains(&self, host: &str) -> bool {
        self.names.iter().any(|n| n == host) || self.suffixes.iter().any(|s| host.ends_with(s))
    }
}

/// A StreamUrl the plugin will not connect to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Not a URL with a host.
    Malformed,
    /// A scheme other than `wss` (`ws` is allowed for loopback hosts only).
    Scheme { scheme: String, host: String },
    /// A host that is no Session Manager endpoint, loopback or trusted name.
    Host(String),
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refused::Malformed => f.write_str("StreamUrl is not a valid wss:// URL"),
            Refused::Scheme { scheme, host } => write!(
                f,
                "StreamUrl for host {host} uses {scheme}://; a Session Manager endpoint needs wss://"
            ),
            Refused::Host(host) => {
                write!(f, "StreamUrl host {host} is not a Session Manager endpoint")
            }
        }
    }
}

impl std::error::Error for Refused {}

/// Accepts `url` if the plugin may open its data channel there.
pub fn check(url: &str, trusted: &TrustedHosts) -> Result<(), Refused> {
    let uri: http::Uri = url.trim().parse().map_err(|_| Refused::Malformed)?;
    let scheme = uri
        .scheme_str()
        .ok_or(Refused::Malformed)?
        .to_ascii_lowercase();
    let raw_host = uri.host().ok_or(Refused::Malformed)?;
    let host = normalize(raw_host.trim_start_matches('[').trim_end_matches(']'));
    if host.is_empty() {
        return Err(Refused::Malformed);
    }
    let loopback = is_loopback(&host);
    match scheme.as_str() {
        "wss" => {}
        "ws" if loopback => {}
        _ => {
            return Err(Refused::Scheme {
                scheme,
                host: raw_host.to_owned(),
            })
        }
    }
    if loopback || is_session_manager_endpoint(&host) || trusted.contains(&host) {
        Ok(())
    } else {
        Err(Refused::Host(raw_host.to_owned()))
    }
}

/// Lower case, one trailing dot (an absolute DNS name) removed.
fn normalize(host: &str) -> String {
    let h = host.to_ascii_lowercase();
    h.strip_suffix('.').map(str::to_owned).unwrap_or(h)
}

fn is_loopback(host: &str) -> bool {
    if host == "localhost" {
        return true;
    }
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => v4.is_loopback(),
        Ok(IpAddr::V6(v6)) => {
            v6 == Ipv6Addr::LOCALHOST || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
        Err(_) => false,
    }
}

/// LDH labels of 1 to 63 characters, 253 characters at most.
fn is_host_name(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// `us-east-1`, `us-gov-west-1`, `cn-north-1`, `eu-isoe-west-1`: letters, dashes, then a
/// dash and a number.
fn is_region(label: &str) -> bool {
    let Some((name, number)) = label.rsplit_once('-') else {
        return false;
    };
    !number.is_empty()
        && number.bytes().all(|b| b.is_ascii_digit())
        && name.len() >= 2
        && name.split('-').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
        && name.as_bytes()[0].is_ascii_lowercase()
}

/// `vpce-<id>-<suffix>` or its zonal form `vpce-<id>-<suffix>-<az>`.
fn is_vpce_label(label: &str) -> bool {
    label.strip_prefix("vpce-").is_some_and(|rest| {
        rest.len() >= 8
            && !rest.ends_with('-')
            && rest
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    })
}

fn is_session_manager_endpoint(host: &str) -> bool {
    if !is_host_name(host) {
        return false;
    }
    let labels: Vec<&str> = host.split('.').collect();
    let service = |l: &str| l == "ssmmessages" || l == "ssmmessages-fips";
    match labels.as_slice() {
        // ssmmessages.us-east-1.amazonaws.com, ssmmessages-fips.us-gov-west-1.amazonaws.com
        [s, r, "amazonaws", "com"] | [s, r, "amazonaws", "com", "cn"] => service(s) && is_region(r),
        // ssmmessages.dualstack.us-east-1.amazonaws.com[.cn]
        [s, "dualstack", r, "amazonaws", "com"] | [s, "dualstack", r, "amazonaws", "com", "cn"] => {
            service(s) && is_region(r)
        }
        // ssmmessages.us-east-1.api.aws, ssmmessages.cn-north-1.api.amazonwebservices.com.cn
        [s, r, "api", "aws"] | [s, r, "api", "amazonwebservices", "com", "cn"] => {
            service(s) && is_region(r)
        }
        // vpce-0abc-1xyz.ssmmessages.us-east-1.vpce.amazonaws.com[.cn]
        [v, "ssmmessages", r, "vpce", "amazonaws", "com"]
        | [v, "ssmmessages", r, "vpce", "amazonaws", "com", "cn"] => {
            is_vpce_label(v) && is_region(r)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(url: &str) -> bool {
        check(url, &TrustedHosts::default()).is_ok()
    }

    #[test]
    fn session_manager_endpoints_are_accepted() {
        for url in [
            "wss://ssmmessages.us-east-1.amazonaws.com/v1/data-channel/s-1?role=publish_subscribe",
            "wss://ssmmessages.ap-southeast-5.amazonaws.com/v1/data-channel/s-1",
            "wss://ssmmessages-fips.us-gov-west-1.amazonaws.com/v1/data-channel/s-1",
            "wss://ssmmessages.cn-north-1.amazonaws.com.cn/v1/data-channel/s-1",
            "wss://ssmmessages.dualstack.eu-west-1.amazonaws.com/v1/x",
            "wss://ssmmessages.eu-west-1.api.aws/v1/x",
            "wss://ssmmessages-fips.us-east-2.api.aws/v1/x",
            "wss://ssmmessages.cn-northwest-1.api.amazonwebservices.com.cn/v1/x",
            "wss://vpce-0123456789abcdef0-abcdefgh.ssmmessages.eu-central-1.vpce.amazonaws.com/v1/x",
            "wss://vpce-0123456789abcdef0-abcdefgh-eu-central-1a.ssmmessages.eu-central-1.vpce.amazonaws.com/v1/x",
            "wss://vpce-0123456789abcdef0-abcdefgh.ssmmessages.cn-north-1.vpce.amazonaws.com.cn/v1/x",
            "WSS://SSMMessages.US-East-1.AmazonAWS.com./v1/x",
            "wss://ssmmessages.us-east-1.amazonaws.com:443/v1/x",
        ] {
            assert!(ok(url), "{url} should be accepted");
        }
    }

    #[test]
    fn loopback_is_accepted_with_ws_or_wss() {
        for url in [
            "wss://127.0.0.1:4443/v1/data-channel/sim-1",
            "ws://127.0.0.1:8080/v1/data-channel/sim-1",
            "ws://127.1.2.3:1/x",
            "wss://[::1]:4443/v1/x",
            "ws://[::ffff:127.0.0.1]:1/x",
            "wss://localhost:4443/v1/x",
            "ws://LOCALHOST:1/x",
        ] {
            assert!(ok(url), "{url} should be accepted");
        }
    }

    #[test]
    fn other_hosts_are_refused_naming_the_host() {
        for (url, host) in [
            (
                "wss://example.invalid/v1/data-channel/s-1",
                "example.invalid",
            ),
            (
                "wss://ssmmessages.us-east-1.amazonaws.com.evil.example/v1",
                "ssmmessages.us-east-1.amazonaws.com.evil.example",
            ),
            (
                "wss://evil.example/ssmmessages.us-east-1.amazonaws.com",
                "evil.example",
            ),
            (
                "wss://ssm.us-east-1.amazonaws.com/v1",
                "ssm.us-east-1.amazonaws.com",
            ),
            (
                "wss://ssmmessages.amazonaws.com/v1",
                "ssmmessages.amazonaws.com",
            ),
            (
                "wss://ssmmessages.us-east.amazonaws.com/v1",
                "ssmmessages.us-east.amazonaws.com",
            ),
            (
                "wss://x.ssmmessages.us-east-1.amazonaws.com/v1",
                "x.ssmmessages.us-east-1.amazonaws.com",
            ),
            (
                "wss://vpce-1.ssmmessages.us-east-1.vpce.amazonaws.com/v1",
                "vpce-1.ssmmessages.us-east-1.vpce.amazonaws.com",
            ),
            (
                "wss://vpce-0123456789abcdef0-abcdefgh.ssm.us-east-1.vpce.amazonaws.com/v1",
                "vpce-0123456789abcdef0-abcdefgh.ssm.us-east-1.vpce.amazonaws.com",
            ),
            ("wss://10.0.0.1/v1", "10.0.0.1"),
            ("wss://[fd00::1]/v1", "[fd00::1]"),
            ("wss://localhost.evil.example/v1", "localhost.evil.example"),
            ("wss://user@evil.example/v1", "evil.example"),
        ] {
            let e = check(url, &TrustedHosts::default()).unwrap_err();
            assert_eq!(e, Refused::Host(host.to_owned()), "{url}");
            assert_eq!(
                e.to_string(),
                format!("StreamUrl host {host} is not a Session Manager endpoint")
            );
        }
    }

    #[test]
    fn only_wss_except_on_loopback() {
        for url in [
            "ws://ssmmessages.us-east-1.amazonaws.com/v1",
            "https://ssmmessages.us-east-1.amazonaws.com/v1",
            "http://127.0.0.1/v1",
            "ftp://localhost/v1",
        ] {
            assert!(
                matches!(
                    check(url, &TrustedHosts::default()),
                    Err(Refused::Scheme { .. })
                ),
                "{url}"
            );
        }
        for url in ["", "not a url", "wss://", "/v1/data-channel", "wss:///v1"] {
            assert!(check(url, &TrustedHosts::default()).is_err(), "{url:?}");
        }
    }

    #[test]
    fn trusted_hosts_extend_the_rule() {
        let t = TrustedHosts::parse(" ssm-messages.corp.example , *.vpce.corp.example,,").unwrap();
        assert!(check("wss://ssm-messages.corp.example/v1", &t).is_ok());
        assert!(check("wss://SSM-Messages.Corp.Example./v1", &t).is_ok());
        assert!(check("wss://a.vpce.corp.example/v1", &t).is_ok());
        assert!(check("wss://a.b.vpce.corp.example/v1", &t).is_ok());
        // A suffix entry trusts names under it, not the suffix itself.
        assert!(check("wss://vpce.corp.example/v1", &t).is_err());
        assert!(check("wss://xvpce.corp.example/v1", &t).is_err());
        assert!(check("wss://other.corp.example/v1", &t).is_err());
        // Trust does not relax the scheme.
        assert!(check("ws://ssm-messages.corp.example/v1", &t).is_err());
        // Without the list, the same names are refused.
        assert!(check(
            "wss://ssm-messages.corp.example/v1",
            &TrustedHosts::default()
        )
        .is_err());
        let ip = TrustedHosts::parse("10.1.2.3").unwrap();
        assert!(check("wss://10.1.2.3:8443/v1", &ip).is_ok());
    }

    #[test]
    fn bad_trusted_entries_are_errors() {
        for list in [
            "*",
            "*.com",
            "a.*.example",
            "*x.example",
            "bad_name.example",
            "-a.example",
            "a..b",
        ] {
            assert!(TrustedHosts::parse(list).is_err(), "{list:?}");
        }
        assert_eq!(TrustedHosts::parse(" , ").unwrap(), TrustedHosts::default());
    }
}
