//! The data-channel WebSocket: TLS with rustls, the system's roots plus `AWS_CA_BUNDLE`,
//! HTTP CONNECT proxies from `HTTPS_PROXY` / `HTTP_PROXY` / `NO_PROXY`, TCP_NODELAY.
//!
//! Trust: the platform's certificate store ([`crate::roots`], which also honours
//! `SSL_CERT_FILE` and `SSL_CERT_DIR`) plus every certificate in the PEM file named by
//! `AWS_CA_BUNDLE`. Proxies follow the conventions of the official plugin (Go's
//! `ProxyFromEnvironment`): `wss://` uses `HTTPS_PROXY`/`https_proxy`, `ws://` uses
//! `HTTP_PROXY`/`http_proxy`, a value without a scheme means `http://`, credentials in the
//! proxy URL are sent as `Proxy-Authorization: Basic`, `NO_PROXY` lists hosts or domain
//! suffixes (`*` for all), and loopback addresses are never proxied.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue, Uri};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

/// The connected WebSocket.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long the TCP connect, proxy exchange, TLS and upgrade may take together
/// (the official dialer's handshake timeout).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(45);

/// Largest stream payload the plugin can be configured to send (`SSM_PLUGIN_PAYLOAD_SIZE`).
pub const MAX_PAYLOAD_SIZE: usize = 65_536;

/// Largest legal data-channel message: the ClientMessage header and payload length
/// ([`ssm_wire::frame::PAYLOAD_OFFSET`]) plus the largest payload, sealed
/// ([`ssm_wire::crypto::OVERHEAD`]). The agent's own messages are far smaller (1024-byte
/// payloads); JSON control messages (acknowledgements, handshake) are a few hundred bytes.
pub const MAX_MESSAGE_LEN: usize =
    ssm_wire::frame::PAYLOAD_OFFSET + MAX_PAYLOAD_SIZE + ssm_wire::crypto::OVERHEAD;

/// The WebSocket limits: a message or frame over [`MAX_MESSAGE_LEN`] fails the connection
/// as soon as its header announces it (tungstenite's default would buffer up to 64 MiB).
pub fn websocket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE_LEN))
        .max_frame_size(Some(MAX_MESSAGE_LEN))
}

/// Why the WebSocket could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("invalid stream URL {0:?}")]
    BadUrl(String),
    #[error("cannot read CA bundle {path}: {why}")]
    CaBundle { path: String, why: String },
    #[error("no trusted root certificates found (set AWS_CA_BUNDLE or SSL_CERT_FILE)")]
    NoRoots,
    #[error("invalid proxy URL {0:?}")]
    BadProxy(String),
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("proxy {proxy} refused CONNECT: {status}")]
    ProxyRefused { proxy: String, status: String },
    #[error("WebSocket handshake with {host} failed: {source}")]
    Handshake {
        host: String,
        source: Box<tokio_tungstenite::tungstenite::Error>,
    },
    #[error("opening the data channel timed out after {0:?}")]
    Timeout(Duration),
}

/// TLS settings. `AWS_CA_BUNDLE` is read and checked up front; the system roots are
/// loaded, and the configuration built, on the first `wss://` connection.
#[derive(Clone)]
pub struct TlsSettings {
    extra: Arc<Vec<CertificateDer<'static>>>,
    config: Arc<std::sync::OnceLock<Arc<rustls::ClientConfig>>>,
}

impl TlsSettings {
    /// System roots plus `ca_bundle` (the value of `AWS_CA_BUNDLE`).
    pub fn new(ca_bundle: Option<&str>) -> Result<TlsSettings, TransportError> {
        let mut extra = Vec::new();
        if let Some(path) = ca_bundle.filter(|p| !p.is_empty()) {
            let bad = |why: String| TransportError::CaBundle {
                path: path.to_owned(),
                why,
            };
            let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
            let mut check = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| bad(e.to_string()))?;
                check.add(cert.clone()).map_err(|e| bad(e.to_string()))?;
                extra.push(cert);
            }
            if extra.is_empty() {
                return Err(bad("no PEM certificates in the file".to_owned()));
            }
        }
        Ok(TlsSettings {
            extra: Arc::new(extra),
            config: Arc::default(),
        })
    }

    /// The client configuration, built on first use.
    fn config(&self) -> Result<Arc<rustls::ClientConfig>, TransportError> {
        if let Some(c) = self.config.get() {
            return Ok(c.clone());
        }
        let mut roots = rustls::RootCertStore::empty();
        roots.add_parsable_certificates(crate::roots::system().certs.iter().cloned());
        for cert in self.extra.iter() {
            // Checked in `new`.
            let _ = roots.add(cert.clone());
        }
        if roots.is_empty() {
            return Err(TransportError::NoRoots);
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TransportError::CaBundle {
                path: String::new(),
                why: e.to_string(),
            })?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(self.config.get_or_init(|| Arc::new(config)).clone())
    }
}

/// A proxy to tunnel through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proxy {
    pub host: String,
    pub port: u16,
    pub authorization: Option<String>,
}

/// The proxy for `uri` from the environment (read through `get`), or `None`.
pub fn proxy_for(
    uri: &Uri,
    get: impl Fn(&str) -> Option<String>,
) -> Result<Option<Proxy>, TransportError> {
    let secure = uri.scheme_str() == Some("wss") || uri.scheme_str() == Some("https");
    let names: &[&str] = if secure {
        &["HTTPS_PROXY", "https_proxy"]
    } else {
        &["HTTP_PROXY", "http_proxy"]
    };
    let Some(value) = names
        .iter()
        .find_map(|n| get(n))
        .filter(|v| !v.trim().is_empty())
    else {
        return Ok(None);
    };
    let host = uri
        .host()
        .unwrap_or_default()
        .trim_matches(|c| c == '[' || c == ']');
    if is_loopback(host) {
        return Ok(None);
    }
    let no_proxy = get("NO_PROXY")
        .or_else(|| get("no_proxy"))
        .unwrap_or_default();
    if no_proxy_matches(&no_proxy, host) {
        return Ok(None);
    }
    parse_proxy(value.trim()).map(Some)
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

fn no_proxy_matches(list: &str, host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    list.split(',')
        .map(|e| e.trim().to_ascii_lowercase())
        .filter(|e| !e.is_empty())
        .any(|e| {
            if e == "*" {
                return true;
            }
            // Entries may carry a port (host:443); the data channel is always on 443.
            let e = e.split(':').next().unwrap_or_default();
            let e = e.trim_start_matches('*');
            let bare = e.trim_start_matches('.');
            host == bare || host.ends_with(&format!(".{bare}"))
        })
}

fn parse_proxy(value: &str) -> Result<Proxy, TransportError> {
    let with_scheme = if value.contains("://") {
        value.to_owned()
    } else {
        format!("http://{value}")
    };
    let bad = || TransportError::BadProxy(value.to_owned());
    let (scheme, rest) = with_scheme.split_once("://").ok_or_else(bad)?;
    if !scheme.eq_ignore_ascii_case("http") {
        // The official plugin supports http CONNECT proxies (and socks5, not offered here).
        return Err(TransportError::BadProxy(format!(
            "{value} (only http:// proxies are supported)"
        )));
    }
    let authority = rest.split('/').next().unwrap_or_default();
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || hostport.starts_with('[') => {
            (h.to_owned(), p.parse::<u16>().map_err(|_| bad())?)
        }
        _ => (hostport.to_owned(), 80),
    };
    let host = host.trim_matches(|c| c == '[' || c == ']').to_owned();
    if host.is_empty() {
        return Err(bad());
    }
    let authorization = userinfo.map(|u| {
        let decoded = percent_decode(u);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(decoded)
        )
    });
    Ok(Proxy {
        host,
        port,
        authorization,
    })
}

fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            if let Some(Ok(v)) = s.get(i + 1..i + 3).map(|h| u8::from_str_radix(h, 16)) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

async fn connect_tcp(host: &str, port: u16) -> Result<TcpStream, TransportError> {
    let addr = format!("{host}:{port}");
    let target = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        addr.clone()
    };
    let tcp = TcpStream::connect(&target)
        .await
        .map_err(|source| TransportError::Connect { addr, source })?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

async fn proxy_connect(proxy: &Proxy, host: &str, port: u16) -> Result<TcpStream, TransportError> {
    let mut tcp = connect_tcp(&proxy.host, proxy.port).await?;
    let authority = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let mut req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
    if let Some(auth) = &proxy.authorization {
        req.push_str(&format!("Proxy-Authorization: {auth}\r\n"));
    }
    req.push_str("\r\n");
    let io_err = |source| TransportError::Connect {
        addr: format!("{}:{}", proxy.host, proxy.port),
        source,
    };
    tcp.write_all(req.as_bytes()).await.map_err(io_err)?;
    // Read the response head byte by byte so no tunnelled byte is consumed.
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 16 * 1024 {
            return Err(TransportError::ProxyRefused {
                proxy: proxy.host.clone(),
                status: "response header too long".to_owned(),
            });
        }
        let n = tcp.read(&mut byte).await.map_err(io_err)?;
        if n == 0 {
            return Err(TransportError::ProxyRefused {
                proxy: proxy.host.clone(),
                status: "connection closed".to_owned(),
            });
        }
        head.push(byte[0]);
    }
    let status_line = String::from_utf8_lossy(&head)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    let code = status_line.split_whitespace().nth(1).unwrap_or_default();
    if !code.starts_with('2') {
        return Err(TransportError::ProxyRefused {
            proxy: format!("{}:{}", proxy.host, proxy.port),
            status: status_line,
        });
    }
    Ok(tcp)
}

/// Opens the WebSocket to `url` with extra request `headers` (SigV4).
pub async fn connect(
    url: &str,
    headers: &[(String, String)],
    tls: &TlsSettings,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Ws, TransportError> {
    let fut = connect_inner(url, headers, tls, env);
    tokio::time::timeout(HANDSHAKE_TIMEOUT, fut)
        .await
        .map_err(|_| TransportError::Timeout(HANDSHAKE_TIMEOUT))?
}

async fn connect_inner(
    url: &str,
    headers: &[(String, String)],
    tls: &TlsSettings,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Ws, TransportError> {
    let bad = || TransportError::BadUrl(url.to_owned());
    let mut request = url.into_client_request().map_err(|_| bad())?;
    for (k, v) in headers {
        let name = HeaderName::from_bytes(k.as_bytes()).map_err(|_| bad())?;
        let value = HeaderValue::from_str(v).map_err(|_| bad())?;
        request.headers_mut().insert(name, value);
    }
    let uri = request.uri().clone();
    let secure = match uri.scheme_str() {
        Some("wss") | Some("https") => true,
        Some("ws") | Some("http") => false,
        _ => return Err(bad()),
    };
    let host = uri
        .host()
        .ok_or_else(bad)?
        .trim_matches(|c| c == '[' || c == ']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
    let tcp = match proxy_for(&uri, env)? {
        Some(proxy) => proxy_connect(&proxy, &host, port).await?,
        None => connect_tcp(&host, port).await?,
    };
    let connector = if secure {
        Some(Connector::Rustls(tls.config()?))
    } else {
        Some(Connector::Plain)
    };
    let (ws, _response) = tokio_tungstenite::client_async_tls_with_config(
        request,
        tcp,
        Some(websocket_config()),
        connector,
    )
    .await
    .map_err(|e| TransportError::Handshake {
        host: host.clone(),
        source: Box::new(e),
    })?;
    Ok(ws)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    fn uri(s: &str) -> Uri {
        s.parse().unwrap()
    }

    #[test]
    fn proxy_selection_follows_scheme_no_proxy_and_loopback() {
        let e = env(&[
            ("HTTPS_PROXY", "user:p%40ss@proxy.corp:3128"),
            ("HTTP_PROXY", "http://plain:8080"),
            ("NO_PROXY", "internal.corp,.vpce.amazonaws.com"),
        ]);
        let p = proxy_for(&uri("wss://ssmmessages.us-east-1.amazonaws.com/v1"), &e)
            .unwrap()
            .unwrap();
        assert_eq!(p.host, "proxy.corp");
        assert_eq!(p.port, 3128);
        assert_eq!(
            p.authorization.as_deref(),
            Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode("user:p@ss")
            ))
            .as_deref()
        );
        let p = proxy_for(&uri("ws://example.com/x"), &e).unwrap().unwrap();
        assert_eq!((p.host.as_str(), p.port), ("plain", 8080));
        assert_eq!(proxy_for(&uri("wss://internal.corp/x"), &e).unwrap(), None);
        assert_eq!(
            proxy_for(&uri("wss://a.b.vpce.amazonaws.com/x"), &e).unwrap(),
            None
        );
        assert_eq!(proxy_for(&uri("wss://127.0.0.1:9/x"), &e).unwrap(), None);
        assert_eq!(proxy_for(&uri("wss://localhost:9/x"), &e).unwrap(), None);
        assert_eq!(proxy_for(&uri("wss://[::1]:9/x"), &e).unwrap(), None);
        assert!(proxy_for(&uri("wss://h/x"), env(&[("HTTPS_PROXY", "https://p:1")])).is_err());
        assert_eq!(proxy_for(&uri("wss://h/x"), env(&[])).unwrap(), None);
    }

    #[tokio::test]
    async fn connect_through_an_http_connect_proxy() {
        // A one-shot CONNECT proxy that records the request and tunnels to a peer that
        // answers the WebSocket upgrade.
        use tokio::net::TcpListener;
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server_addr = server.local_addr().unwrap();
        tokio::spawn(async move {
            let (s, _) = server.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_async(s).await.unwrap();
            use futures_util::SinkExt;
            ws.send(tokio_tungstenite::tungstenite::Message::text("hi"))
                .await
                .unwrap();
        });
        let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy_addr = proxy.local_addr().unwrap();
        let seen = tokio::spawn(async move {
            let (mut c, _) = proxy.accept().await.unwrap();
            let mut buf = vec![0u8; 1024];
            let n = c.read(&mut buf).await.unwrap();
            let head = String::from_utf8_lossy(&buf[..n]).to_string();
            let mut up = TcpStream::connect(server_addr).await.unwrap();
            c.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await
                .unwrap();
            let _ = tokio::io::copy_bidirectional(&mut c, &mut up).await;
            head
        });
        let proxy_url = format!("http://u:p@{proxy_addr}");
        // Use a non-loopback-looking host name that resolves nowhere: the proxy decides.
        let tls = TlsSettings::new(None).unwrap();
        let get = move |k: &str| (k == "HTTP_PROXY").then(|| proxy_url.clone());
        let mut ws = connect("ws://data-channel.test:80/v1/x", &[], &tls, get)
            .await
            .unwrap();
        use futures_util::StreamExt;
        let msg = ws.next().await.unwrap().unwrap();
        assert_eq!(msg.into_text().unwrap().as_str(), "hi");
        drop(ws);
        let head = seen.await.unwrap();
        assert!(
            head.starts_with("CONNECT data-channel.test:80 HTTP/1.1\r\n"),
            "{head}"
        );
        assert!(
            head.contains("Proxy-Authorization: Basic dTpw\r\n"),
            "{head}"
        );
    }

    /// A peer that sends one binary message of `len` bytes, as a single frame or split
    /// into `frames` continuation frames, after the upgrade; returns the client's URL.
    async fn peer_sending(len: usize, frames: usize) -> String {
        use futures_util::SinkExt;
        use tokio::net::TcpListener;
        use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
        use tokio_tungstenite::tungstenite::protocol::frame::{Frame, FrameHeader};
        use tokio_tungstenite::tungstenite::Message;
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        tokio::spawn(async move {
            let (s, _) = server.accept().await.unwrap();
            // The server side itself has no limit, so it can send what the client refuses.
            let config = WebSocketConfig::default()
                .max_message_size(None)
                .max_frame_size(None);
            let mut ws = tokio_tungstenite::accept_async_with_config(s, Some(config))
                .await
                .unwrap();
            let body = vec![0x5au8; len];
            if frames <= 1 {
                let _ = ws.send(Message::binary(body)).await;
            } else {
                let piece = len.div_ceil(frames);
                for (i, chunk) in body.chunks(piece).enumerate() {
                    let header = FrameHeader {
                        is_final: (i + 1) * piece >= len,
                        opcode: if i == 0 {
                            OpCode::Data(Data::Binary)
                        } else {
                            OpCode::Data(Data::Continue)
                        },
                        ..FrameHeader::default()
                    };
                    let frame = Frame::from_payload(header, chunk.to_vec().into());
                    if ws.send(Message::Frame(frame)).await.is_err() {
                        return;
                    }
                }
            }
            // Keep the connection open until the client is done with it.
            use futures_util::StreamExt;
            while ws.next().await.is_some() {}
        });
        format!("ws://{addr}/v1/data-channel/s-1")
    }

    async fn first_message(
        url: &str,
    ) -> Result<tokio_tungstenite::tungstenite::Message, tokio_tungstenite::tungstenite::Error>
    {
        use futures_util::StreamExt;
        let tls = TlsSettings::new(None).unwrap();
        let mut ws = connect(url, &[], &tls, |_: &str| None).await.unwrap();
        ws.next().await.expect("a message or an error")
    }

    #[test]
    fn the_limit_covers_the_largest_legal_frame() {
        // A sealed 65536-byte payload in a ClientMessage: header 120 + 65536 + 28.
        assert_eq!(MAX_MESSAGE_LEN, 120 + 65_536 + 12 + 16);
    }

    #[tokio::test]
    async fn a_message_at_the_limit_is_received() {
        let url = peer_sending(MAX_MESSAGE_LEN, 1).await;
        let msg = first_message(&url).await.expect("message at the limit");
        assert_eq!(msg.into_data().len(), MAX_MESSAGE_LEN);
        let url = peer_sending(MAX_MESSAGE_LEN, 16).await;
        let msg = first_message(&url)
            .await
            .expect("fragmented message at the limit");
        assert_eq!(msg.into_data().len(), MAX_MESSAGE_LEN);
    }

    #[tokio::test]
    async fn a_larger_message_fails_the_connection() {
        use tokio_tungstenite::tungstenite::error::{CapacityError, Error};
        // One frame announcing more than the limit: refused from its header.
        let url = peer_sending(MAX_MESSAGE_LEN + 1, 1).await;
        match first_message(&url).await {
            Err(Error::Capacity(CapacityError::MessageTooLong { size, max_size })) => {
                assert_eq!((size, max_size), (MAX_MESSAGE_LEN + 1, MAX_MESSAGE_LEN));
            }
            other => panic!("expected MessageTooLong, got {other:?}"),
        }
        // Small frames adding up to more than the limit: refused when the sum passes it.
        let url = peer_sending(4 * MAX_MESSAGE_LEN, 64).await;
        match first_message(&url).await {
            Err(Error::Capacity(CapacityError::MessageTooLong { max_size, .. })) => {
                assert_eq!(max_size, MAX_MESSAGE_LEN);
            }
            other => panic!("expected MessageTooLong, got {other:?}"),
        }
    }
}
