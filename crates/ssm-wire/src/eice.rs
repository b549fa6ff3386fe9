//! EC2 Instance Connect Endpoint (EICE) tunnels, without I/O: the `openTunnel` URL (before
//! presigning), the frame size, the meaning of a close frame and of a refused handshake.
//!
//! The tunnel itself has no protocol of its own: one WebSocket per TCP connection, the
//! connection's bytes as binary frames in both directions, no framing, acknowledgements or
//! sequence numbers, and no resume. What remains to decide is here, so that the binary is
//! only the I/O around it.

/// Largest binary frame either side sends (the service's limit).
pub const MAX_FRAME: usize = 65_000;

/// Range of `maxTunnelDuration`, in seconds (the service's default is its maximum).
pub const MAX_TUNNEL_DURATION: std::ops::RangeInclusive<u32> = 1..=3600;

/// The signing name of the service (`ec2-instance-connect`).
pub const SIGNING_NAME: &str = "ec2-instance-connect";

/// How long a presigned `openTunnel` URL is valid (`X-Amz-Expires`).
pub const URL_EXPIRES_SECS: u64 = 60;

/// The close code of a tunnel that ended normally.
pub const CLOSE_NORMAL: u16 = 1000;

/// What a tunnel needs to be opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TunnelTarget {
    /// `DnsName` (or `FipsDnsName`) of the endpoint; may carry a `:port` (test endpoints).
    pub dns_name: String,
    pub endpoint_id: String,
    pub private_ip: String,
    pub remote_port: u16,
    pub max_tunnel_duration: Option<u32>,
}

/// RFC 3986 percent-encoding of a query value (unreserved characters kept), as SigV4
/// canonicalizes it.
pub fn query_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl TunnelTarget {
    /// `wss://<dns>/openTunnel?instanceConnectEndpointId=…&remotePort=…&privateIpAddress=…
    /// [&maxTunnelDuration=…]`, unsigned.
    pub fn url(&self) -> String {
        let mut url = format!(
            "wss://{}/openTunnel?instanceConnectEndpointId={}&remotePort={}&privateIpAddress={}",
            self.dns_name,
            query_encode(&self.endpoint_id),
            self.remote_port,
            query_encode(&self.private_ip)
        );
        if let Some(d) = self.max_tunnel_duration {
            url.push_str(&format!("&maxTunnelDuration={d}"));
        }
        url
    }
}

/// Checks `--max-tunnel-duration`.
pub fn check_max_tunnel_duration(secs: u32) -> Result<u32, String> {
    if MAX_TUNNEL_DURATION.contains(&secs) {
        Ok(secs)
    } else {
        Err(format!(
            "the maximum tunnel duration must be between {} and {} seconds, not {secs}",
            MAX_TUNNEL_DURATION.start(),
            MAX_TUNNEL_DURATION.end()
        ))
    }
}

/// How a tunnel's WebSocket ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TunnelEnd {
    /// Close code 1000 (or our own close): the tunnel is over.
    Normal,
    /// Any other close code: an error with the service's reason.
    Error { code: u16, reason: String },
    /// The connection dropped without a close frame.
    Dropped,
}

impl TunnelEnd {
    /// Classifies a received close frame (`None`: a close frame without a code).
    pub fn from_close(frame: Option<(u16, &str)>) -> TunnelEnd {
        match frame {
            None => TunnelEnd::Normal,
            Some((CLOSE_NORMAL, _)) => TunnelEnd::Normal,
            Some((code, reason)) => TunnelEnd::Error {
                code,
                reason: reason.to_owned(),
            },
        }
    }

    /// A message for the user, `None` for a normal end.
    pub fn message(&self) -> Option<String> {
        match self {
            TunnelEnd::Normal => None,
            TunnelEnd::Error { code, reason } if reason.is_empty() => {
                Some(format!("the tunnel was closed with code {code}"))
            }
            TunnelEnd::Error { code, reason } => {
                Some(format!("the tunnel was closed with code {code}: {reason}"))
            }
            TunnelEnd::Dropped => Some("the tunnel's connection dropped".to_owned()),
        }
    }
}

/// The user's message for a refused handshake: the HTTP status, the JSON body's
/// `ErrorCode` and `Message` when there is one, and the request id.
pub fn refusal_message(status: u16, body: &[u8], request_id: Option<&str>) -> String {
    let json: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let field = |names: &[&str]| -> Option<String> {
        let obj = json.as_ref()?.as_object()?;
        names
            .iter()
            .find_map(|n| obj.get(*n).and_then(|v| v.as_str()))
            .map(str::to_owned)
    };
    let code = field(&["ErrorCode", "errorCode", "__type", "code"]);
    let message = field(&["Message", "message"]);
    let mut out = format!("the endpoint refused the tunnel (HTTP {status})");
    match (code, message) {
        (Some(c), Some(m)) => out.push_str(&format!(": {c}: {m}")),
        (Some(c), None) => out.push_str(&format!(": {c}")),
        (None, Some(m)) => out.push_str(&format!(": {m}")),
        (None, None) => {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            if !text.is_empty() && text.len() <= 512 {
                out.push_str(&format!(": {text}"));
            }
        }
    }
    if let Some(id) = request_id.filter(|i| !i.is_empty()) {
        out.push_str(&format!(" (request id {id})"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_shape() {
        let t = TunnelTarget {
            dns_name: "eice-1.ec2-instance-connect-endpoint.us-east-1.amazonaws.com".into(),
            endpoint_id: "eice-0123".into(),
            private_ip: "10.0.0.5".into(),
            remote_port: 22,
            max_tunnel_duration: None,
        };
        assert_eq!(
            t.url(),
            "wss://eice-1.ec2-instance-connect-endpoint.us-east-1.amazonaws.com/openTunnel?\
             instanceConnectEndpointId=eice-0123&remotePort=22&privateIpAddress=10.0.0.5"
        );
        let t = TunnelTarget {
            private_ip: "fd00::1".into(),
            max_tunnel_duration: Some(30),
            ..t
        };
        assert!(t
            .url()
            .ends_with("privateIpAddress=fd00%3A%3A1&maxTunnelDuration=30"));
    }

    #[test]
    fn durations() {
        assert!(check_max_tunnel_duration(0).is_err());
        assert_eq!(check_max_tunnel_duration(1), Ok(1));
        assert_eq!(check_max_tunnel_duration(3600), Ok(3600));
        assert!(check_max_tunnel_duration(3601).is_err());
    }

    #[test]
    fn close_frames() {
        assert_eq!(TunnelEnd::from_close(Some((1000, ""))), TunnelEnd::Normal);
        assert_eq!(TunnelEnd::from_close(None), TunnelEnd::Normal);
        let e = TunnelEnd::from_close(Some((1011, "Unable to connect to target")));
        assert_eq!(
            e.message().as_deref(),
            Some("the tunnel was closed with code 1011: Unable to connect to target")
        );
    }

    #[test]
    fn refusals() {
        let m = refusal_message(
            400,
            br#"{"ErrorCode":"InvalidParameter","Message":"Only ports 22 and 3389 are allowed"}"#,
            Some("req-1"),
        );
        assert_eq!(
            m,
            "the endpoint refused the tunnel (HTTP 400): InvalidParameter: Only ports 22 and 3389 \
             are allowed (request id req-1)"
        );
        assert_eq!(
            refusal_message(502, b"", None),
            "the endpoint refused the tunnel (HTTP 502)"
        );
    }
}
