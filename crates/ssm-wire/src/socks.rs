//! The server side of a SOCKS5 handshake (RFC 1928, CONNECT only) with optional
//! username/password authentication (RFC 1929), and of an HTTP `CONNECT` request on the
//! same listener, as a sans-I/O state machine.
//!
//! The I/O shell reads from the client into a buffer and calls [`Handshake::input`] with
//! everything not yet consumed; each call says how many bytes it consumed, what to write
//! back, and whether the handshake is over. Once it asks for a connection
//! ([`Outcome::Connect`]), the shell opens it and writes [`Handshake::connect_reply`] with
//! the result; bytes after the request belong to the tunnelled stream.
//!
//! Domain names are passed through unresolved: the remote side resolves them, so names
//! only the far network knows work.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

const VERSION: u8 = 5;
const METHOD_NONE: u8 = 0x00;
const METHOD_USERPASS: u8 = 0x02;
const METHOD_UNACCEPTABLE: u8 = 0xff;
const USERPASS_VERSION: u8 = 1;
const CMD_CONNECT: u8 = 1;
const ATYP_V4: u8 = 1;
const ATYP_DOMAIN: u8 = 3;
const ATYP_V6: u8 = 4;
/// Longest HTTP request head accepted before the blank line.
const MAX_HTTP_HEAD: usize = 8 * 1024;

/// Where the client wants to go.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Destination {
    /// An IP literal (v6 without brackets) or a domain name, as the client sent it.
    pub host: String,
    pub port: u16,
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// SOCKS5 reply codes (RFC 1928 §6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Reply {
    Succeeded = 0,
    GeneralFailure = 1,
    NotAllowed = 2,
    NetworkUnreachable = 3,
    HostUnreachable = 4,
    ConnectionRefused = 5,
    TtlExpired = 6,
    CommandNotSupported = 7,
    AddressTypeNotSupported = 8,
}

/// Which protocol the client spoke.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Socks5,
    HttpConnect,
}

/// What a call to [`Handshake::input`] decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// More bytes are needed.
    Continue,
    /// Open a connection to this destination, then write [`Handshake::connect_reply`].
    Connect(Destination),
    /// The handshake failed: write what was returned (if anything) and close.
    Refused(String),
}

/// The result of one [`Handshake::input`] call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Bytes of the input consumed; the rest is offered again with more data.
    pub consumed: usize,
    /// Bytes to write to the client now.
    pub write: Vec<u8>,
    pub outcome: Outcome,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Start,
    /// SOCKS5 greeting answered with username/password.
    Auth,
    Request,
    /// Waiting for the shell to report the connection.
    Connecting(Protocol),
    Done,
}

/// One client's handshake. `credentials`: `Some((user, password))` requires RFC 1929
/// authentication (and refuses HTTP CONNECT without matching `Proxy-Authorization`);
/// `None` accepts clients without authentication.
#[derive(Debug)]
pub struct Handshake {
    credentials: Option<(Vec<u8>, Vec<u8>)>,
    state: State,
}

fn progress(consumed: usize, write: Vec<u8>, outcome: Outcome) -> Progress {
    Progress {
        consumed,
        write,
        outcome,
    }
}

fn need_more() -> Progress {
    progress(0, Vec::new(), Outcome::Continue)
}

fn refused(write: Vec<u8>, why: impl Into<String>) -> Progress {
    progress(0, write, Outcome::Refused(why.into()))
}

/// A SOCKS5 reply with an unspecified bound address (0.0.0.0:0).
pub fn socks_reply(code: Reply) -> Vec<u8> {
    vec![VERSION, code as u8, 0, ATYP_V4, 0, 0, 0, 0, 0, 0]
}

fn http_reply(code: Reply) -> Vec<u8> {
    let status = match code {
        Reply::Succeeded => "200 Connection established",
        Reply::NotAllowed => "403 Forbidden",
        Reply::HostUnreachable | Reply::NetworkUnreachable | Reply::ConnectionRefused => {
            "502 Bad Gateway"
        }
        Reply::TtlExpired => "504 Gateway Timeout",
        _ => "500 Internal Server Error",
    };
    format!("HTTP/1.1 {status}\r\n\r\n").into_bytes()
}

impl Handshake {
    pub fn new(credentials: Option<(String, String)>) -> Handshake {
        Handshake {
            credentials: credentials.map(|(u, p)| (u.into_bytes(), p.into_bytes())),
            state: State::Start,
        }
    }

    /// The protocol, once the request was read.
    pub fn protocol(&self) -> Option<Protocol> {
        match self.state {
            State::Connecting(p) => Some(p),
            _ => None,
        }
    }

    /// The reply to the client once the connection was tried; `Reply::Succeeded` if it
    /// is open. Only valid after [`Outcome::Connect`].
    pub fn connect_reply(&mut self, code: Reply) -> Vec<u8> {
        let proto = self.protocol().unwrap_or(Protocol::Socks5);
        self.state = State::Done;
        match proto {
            Protocol::Socks5 => socks_reply(code),
            Protocol::HttpConnect => http_reply(code),
        }
    }

    /// Feeds everything received and not yet consumed.
    pub fn input(&mut self, buf: &[u8]) -> Progress {
        match self.state {
            State::Start => match buf.first() {
                None => need_more(),
                Some(&VERSION) => self.greeting(buf),
                Some(b) if b.is_ascii_uppercase() => self.http(buf),
                Some(b) => refused(Vec::new(), format!("not SOCKS5 (first byte {b:#04x})")),
            },
            State::Auth => self.userpass(buf),
            State::Request => self.request(buf),
            State::Connecting(_) | State::Done => progress(0, Vec::new(), Outcome::Continue),
        }
    }

    fn greeting(&mut self, buf: &[u8]) -> Progress {
        let Some(&n) = buf.get(1) else {
            return need_more();
        };
        let len = 2 + usize::from(n);
        let Some(methods) = buf.get(2..len) else {
            return need_more();
        };
        let want = if self.credentials.is_some() {
            METHOD_USERPASS
        } else {
            METHOD_NONE
        };
        if !methods.contains(&want) {
            return refused(
                vec![VERSION, METHOD_UNACCEPTABLE],
                if want == METHOD_USERPASS {
                    "the client does not offer username/password authentication"
                } else {
                    "the client does not offer the no-authentication method"
                },
            );
        }
        self.state = if want == METHOD_USERPASS {
            State::Auth
        } else {
            State::Request
        };
        progress(len, vec![VERSION, want], Outcome::Continue)
    }

    fn userpass(&mut self, buf: &[u8]) -> Progress {
        let (Some(&ver), Some(&ulen)) = (buf.first(), buf.get(1)) else {
            return need_more();
        };
        if ver != USERPASS_VERSION {
            return refused(vec![USERPASS_VERSION, 1], "bad authentication version");
        }
        let u_end = 2 + usize::from(ulen);
        let Some(&plen) = buf.get(u_end) else {
            return need_more();
        };
        let p_end = u_end + 1 + usize::from(plen);
        if buf.len() < p_end {
            return need_more();
        }
        let (user, pass) = (&buf[2..u_end], &buf[u_end + 1..p_end]);
        let ok = self
            .credentials
            .as_ref()
            .is_some_and(|(u, p)| ct_eq(u, user) & ct_eq(p, pass));
        if !ok {
            return refused(vec![USERPASS_VERSION, 1], "wrong username or password");
        }
        self.state = State::Request;
        progress(p_end, vec![USERPASS_VERSION, 0], Outcome::Continue)
    }

    fn request(&mut self, buf: &[u8]) -> Progress {
        if buf.len() < 5 {
            return need_more();
        }
        if buf[0] != VERSION {
            return refused(socks_reply(Reply::GeneralFailure), "bad request version");
        }
        if buf[1] != CMD_CONNECT {
            return refused(
                socks_reply(Reply::CommandNotSupported),
                format!("command {} not supported (CONNECT only)", buf[1]),
            );
        }
        let (host, addr_end) = match buf[3] {
            ATYP_V4 => {
                let Some(a) = buf.get(4..8) else {
                    return need_more();
                };
                (Ipv4Addr::new(a[0], a[1], a[2], a[3]).to_string(), 8)
            }
            ATYP_V6 => {
                let Some(a) = buf.get(4..20) else {
                    return need_more();
                };
                let mut o = [0u8; 16];
                o.copy_from_slice(a);
                (Ipv6Addr::from(o).to_string(), 20)
            }
            ATYP_DOMAIN => {
                let n = usize::from(buf[4]);
                let Some(name) = buf.get(5..5 + n) else {
                    return need_more();
                };
                match std::str::from_utf8(name) {
                    Ok(s) if valid_host(s) => (s.to_owned(), 5 + n),
                    _ => {
                        return refused(
                            socks_reply(Reply::HostUnreachable),
                            "the domain name is not a host name",
                        )
                    }
                }
            }
            t => {
                return refused(
                    socks_reply(Reply::AddressTypeNotSupported),
                    format!("address type {t} not supported"),
                )
            }
        };
        let Some(p) = buf.get(addr_end..addr_end + 2) else {
            return need_more();
        };
        let port = u16::from_be_bytes([p[0], p[1]]);
        if port == 0 {
            return refused(socks_reply(Reply::GeneralFailure), "port 0");
        }
        self.state = State::Connecting(Protocol::Socks5);
        progress(
            addr_end + 2,
            Vec::new(),
            Outcome::Connect(Destination { host, port }),
        )
    }

    fn http(&mut self, buf: &[u8]) -> Progress {
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            if buf.len() > MAX_HTTP_HEAD {
                return refused(
                    b"HTTP/1.1 431 Request Header Fields Too Large\r\n\r\n".to_vec(),
                    "HTTP request head too long",
                );
            }
            return need_more();
        };
        let head = String::from_utf8_lossy(&buf[..end]);
        let mut lines = head.split("\r\n");
        let first = lines.next().unwrap_or_default();
        let mut parts = first.split(' ');
        let (Some("CONNECT"), Some(target), Some(v)) = (parts.next(), parts.next(), parts.next())
        else {
            return refused(
                b"HTTP/1.1 405 Method Not Allowed\r\nAllow: CONNECT\r\n\r\n".to_vec(),
                "only HTTP CONNECT is proxied",
            );
        };
        if !v.starts_with("HTTP/1.") {
            return refused(
                b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec(),
                "bad HTTP version",
            );
        }
        if let Some((u, p)) = &self.credentials {
            let want = basic_credentials(u, p);
            let given = lines.find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case("proxy-authorization")
                    .then(|| v.trim().to_owned())
            });
            if !given.is_some_and(|g| ct_eq(g.as_bytes(), want.as_bytes())) {
                return refused(
                    b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"session-manager-plugin\"\r\n\r\n".to_vec(),
                    "missing or wrong Proxy-Authorization",
                );
            }
        }
        let Some(dest) = parse_authority(target) else {
            return refused(
                b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec(),
                format!("bad CONNECT target {target:?}"),
            );
        };
        self.state = State::Connecting(Protocol::HttpConnect);
        progress(end + 4, Vec::new(), Outcome::Connect(dest))
    }
}

/// `host:port` or `[v6]:port`.
fn parse_authority(s: &str) -> Option<Destination> {
    if let Ok(SocketAddr::V6(a)) = s.parse::<SocketAddr>() {
        return Some(Destination {
            host: a.ip().to_string(),
            port: a.port(),
        });
    }
    let (host, port) = s.rsplit_once(':')?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    if host.parse::<IpAddr>().is_ok() || valid_host(host) {
        Some(Destination {
            host: host.to_owned(),
            port,
        })
    } else {
        None
    }
}

/// A DNS name (letters, digits, `-`, `_`, dots), at most 253 bytes.
fn valid_host(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

fn basic_credentials(user: &[u8], pass: &[u8]) -> String {
    use base64::Engine;
    let mut raw = user.to_vec();
    raw.push(b':');
    raw.extend_from_slice(pass);
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

/// Comparison whose time does not depend on where the inputs differ.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dest(host: &str, port: u16) -> Destination {
        Destination {
            host: host.to_owned(),
            port,
        }
    }

    /// Feeds `input` one byte at a time, as a slow client would, collecting writes.
    fn drive(h: &mut Handshake, input: &[u8]) -> (Vec<u8>, Outcome, usize) {
        let mut written = Vec::new();
        let mut pos = 0;
        let mut avail = 0;
        loop {
            let p = h.input(&input[pos..avail]);
            written.extend_from_slice(&p.write);
            pos += p.consumed;
            match p.outcome {
                Outcome::Continue if p.consumed > 0 => continue,
                Outcome::Continue if avail < input.len() => avail += 1,
                o => return (written, o, pos),
            }
        }
    }

    #[test]
    fn no_auth_domain_ipv4_ipv6() {
        let mut h = Handshake::new(None);
        let mut req = vec![5, 1, 0, 5, 1, 0, 3, 11];
        req.extend_from_slice(b"db.internal");
        req.extend_from_slice(&5432u16.to_be_bytes());
        req.extend_from_slice(b"early data");
        let (w, o, used) = drive(&mut h, &req);
        assert_eq!(w, vec![5, 0]);
        assert_eq!(o, Outcome::Connect(dest("db.internal", 5432)));
        assert_eq!(&req[used..], b"early data");
        assert_eq!(h.protocol(), Some(Protocol::Socks5));
        assert_eq!(
            h.connect_reply(Reply::Succeeded),
            vec![5, 0, 0, 1, 0, 0, 0, 0, 0, 0]
        );

        let mut h = Handshake::new(None);
        let (_, o, _) = drive(&mut h, &[5, 2, 2, 0, 5, 1, 0, 1, 10, 0, 0, 7, 0, 80]);
        assert_eq!(o, Outcome::Connect(dest("10.0.0.7", 80)));
        assert_eq!(h.connect_reply(Reply::ConnectionRefused)[1], 5);

        let mut h = Handshake::new(None);
        let mut req = vec![5, 1, 0, 5, 1, 0, 4];
        req.extend_from_slice(&"fd00::5".parse::<Ipv6Addr>().unwrap().octets());
        req.extend_from_slice(&22u16.to_be_bytes());
        let (_, o, _) = drive(&mut h, &req);
        assert_eq!(o, Outcome::Connect(dest("fd00::5", 22)));
        assert_eq!(dest("fd00::5", 22).to_string(), "[fd00::5]:22");
    }

    #[test]
    fn username_password() {
        let creds = Some(("alice".to_owned(), "s3cret".to_owned()));
        let mut h = Handshake::new(creds.clone());
        let mut req = vec![5, 2, 0, 2, 1, 5];
        req.extend_from_slice(b"alice");
        req.push(6);
        req.extend_from_slice(b"s3cret");
        req.extend_from_slice(&[5, 1, 0, 1, 127, 0, 0, 1, 0, 22]);
        let (w, o, _) = drive(&mut h, &req);
        assert_eq!(w, vec![5, 2, 1, 0]);
        assert_eq!(o, Outcome::Connect(dest("127.0.0.1", 22)));

        let mut h = Handshake::new(creds.clone());
        let mut bad = vec![5, 1, 2, 1, 5];
        bad.extend_from_slice(b"alice");
        bad.push(5);
        bad.extend_from_slice(b"wrong");
        let (w, o, _) = drive(&mut h, &bad);
        assert_eq!(w, vec![5, 2, 1, 1]);
        assert!(matches!(o, Outcome::Refused(_)));

        // A client that only offers "no authentication" is turned away.
        let mut h = Handshake::new(creds);
        let (w, o, _) = drive(&mut h, &[5, 1, 0]);
        assert_eq!(w, vec![5, 0xff]);
        assert!(matches!(o, Outcome::Refused(_)));
    }

    #[test]
    fn refusals_carry_the_right_codes() {
        // BIND.
        let mut h = Handshake::new(None);
        let (w, o, _) = drive(&mut h, &[5, 1, 0, 5, 2, 0, 1, 1, 2, 3, 4, 0, 80]);
        assert_eq!(&w[2..], &socks_reply(Reply::CommandNotSupported)[..]);
        assert!(matches!(o, Outcome::Refused(_)));
        // Unknown address type.
        let mut h = Handshake::new(None);
        let (w, _, _) = drive(&mut h, &[5, 1, 0, 5, 1, 0, 9, 0, 0]);
        assert_eq!(w[2 + 1], Reply::AddressTypeNotSupported as u8);
        // A "domain" that is no host name.
        let mut h = Handshake::new(None);
        let (w, _, _) = drive(&mut h, &[5, 1, 0, 5, 1, 0, 3, 3, b'a', b' ', b'b', 0, 80]);
        assert_eq!(w[2 + 1], Reply::HostUnreachable as u8);
        // Not SOCKS at all.
        let mut h = Handshake::new(None);
        assert!(matches!(h.input(&[4, 1]).outcome, Outcome::Refused(_)));
    }

    #[test]
    fn http_connect() {
        let mut h = Handshake::new(None);
        let req = b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n\r\nhello";
        let (w, o, used) = drive(&mut h, req);
        assert!(w.is_empty());
        assert_eq!(o, Outcome::Connect(dest("db.internal", 5432)));
        assert_eq!(&req[used..], b"hello");
        assert_eq!(
            h.connect_reply(Reply::Succeeded),
            b"HTTP/1.1 200 Connection established\r\n\r\n"
        );
        let mut h = Handshake::new(None);
        let (_, o, _) = drive(&mut h, b"CONNECT [fd00::1]:443 HTTP/1.1\r\n\r\n");
        assert_eq!(o, Outcome::Connect(dest("fd00::1", 443)));
        let mut h = Handshake::new(None);
        let (w, o, _) = drive(&mut h, b"GET / HTTP/1.1\r\n\r\n");
        assert!(w.starts_with(b"HTTP/1.1 405"));
        assert!(matches!(o, Outcome::Refused(_)));

        let creds = Some(("u".to_owned(), "p".to_owned()));
        let mut h = Handshake::new(creds.clone());
        let (w, _, _) = drive(&mut h, b"CONNECT h:1 HTTP/1.1\r\n\r\n");
        assert!(w.starts_with(b"HTTP/1.1 407"));
        let mut h = Handshake::new(creds);
        let (_, o, _) = drive(
            &mut h,
            b"CONNECT h:1 HTTP/1.1\r\nProxy-Authorization: Basic dTpw\r\n\r\n",
        );
        assert_eq!(o, Outcome::Connect(dest("h", 1)));
    }

    #[test]
    fn arbitrary_input_never_panics() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        for _ in 0..20_000 {
            let n = rng.gen_range(0..64);
            let mut buf: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
            if rng.gen_bool(0.5) && !buf.is_empty() {
                buf[0] = 5;
            }
            let creds = rng.gen_bool(0.5).then(|| ("u".to_owned(), "p".to_owned()));
            let mut h = Handshake::new(creds);
            let mut pos = 0;
            for _ in 0..8 {
                let p = h.input(&buf[pos..]);
                assert!(p.consumed <= buf.len() - pos);
                pos += p.consumed;
                if p.consumed == 0 {
                    break;
                }
            }
        }
    }
}
