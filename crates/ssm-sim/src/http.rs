//! A small, strict HTTP/1.1 server side: enough for AWS JSON 1.1 calls (POST with a
//! Content-Length body, keep-alive) and for WebSocket upgrades on the same listener.
//!
//! Bounds: request heads up to 64 KiB, bodies up to 4 MiB; anything else is answered with
//! an error status and the connection is closed.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const MAX_HEAD: usize = 64 * 1024;
const MAX_BODY: usize = 4 * 1024 * 1024;

/// A parsed request head.
#[derive(Clone, Debug)]
pub(crate) struct RequestHead {
    pub method: String,
    /// The request target as sent (path and query).
    pub target: String,
    /// Header names are lowercased; values trimmed; order preserved.
    pub headers: Vec<(String, String)>,
    pub http10: bool,
}

impl RequestHead {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(k, _)| k == name)
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    pub(crate) fn is_websocket_upgrade(&self) -> bool {
        self.method == "GET"
            && self.header_has_token("connection", "upgrade")
            && self.header_has_token("upgrade", "websocket")
    }

    pub(crate) fn wants_close(&self) -> bool {
        self.header_has_token("connection", "close")
            || (self.http10 && !self.header_has_token("connection", "keep-alive"))
    }

    /// The path without the query string.
    pub(crate) fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }
}

/// Why a request could not be read.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The peer closed the connection between requests.
    Eof,
    Io,
    /// Malformed or over-long request: answer with this status and close.
    Bad(u16, &'static str),
}

/// Buffered reader of requests on one connection.
pub(crate) struct Conn<S> {
    pub stream: S,
    pub buf: Vec<u8>,
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    pub(crate) fn new(stream: S) -> Self {
        Conn {
            stream,
            buf: Vec::with_capacity(8192),
        }
    }

    async fn fill(&mut self) -> Result<usize, ReadError> {
        let mut chunk = [0u8; 8192];
        let n = self
            .stream
            .read(&mut chunk)
            .await
            .map_err(|_| ReadError::Io)?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// Reads the next request head. Bytes after it stay in `self.buf`.
    pub(crate) async fn read_head(&mut self) -> Result<RequestHead, ReadError> {
        let end = loop {
            if let Some(end) = find_head_end(&self.buf) {
                break end;
            }
            if self.buf.len() > MAX_HEAD {
                return Err(ReadError::Bad(431, "request head too large"));
            }
            if self.fill().await? == 0 {
                return Err(if self.buf.is_empty() {
                    ReadError::Eof
                } else {
                    ReadError::Bad(400, "truncated request head")
                });
            }
        };
        let head: Vec<u8> = self.buf.drain(..end).collect();
        parse_head(&head)
    }

    /// Reads a body of the length given by the head (none when absent).
    pub(crate) async fn read_body(&mut self, head: &RequestHead) -> Result<Vec<u8>, ReadError> {
        if head.header_has_token("transfer-encoding", "chunked") {
            return Err(ReadError::Bad(411, "chunked bodies are not supported"));
        }
        let len = match head.header("content-length") {
            None => 0,
            Some(v) => v
                .parse::<usize>()
                .map_err(|_| ReadError::Bad(400, "bad Content-Length"))?,
        };
        if len > MAX_BODY {
            return Err(ReadError::Bad(413, "body too large"));
        }
        while self.buf.len() < len {
            if self.fill().await? == 0 {
                return Err(ReadError::Bad(400, "truncated body"));
            }
        }
        Ok(self.buf.drain(..len).collect())
    }

    /// Writes a complete response.
    pub(crate) async fn respond(
        &mut self,
        status: u16,
        content_type: &str,
        extra_headers: &[(&str, String)],
        body: &[u8],
        close: bool,
    ) -> std::io::Result<()> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n",
            status,
            reason(status),
            content_type,
            body.len()
        );
        for (k, v) in extra_headers {
            out.push_str(k);
            out.push_str(": ");
            out.push_str(v);
            out.push_str("\r\n");
        }
        if close {
            out.push_str("Connection: close\r\n");
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(body);
        self.stream.write_all(&bytes).await?;
        self.stream.flush().await
    }
}

fn parse_head(head: &[u8]) -> Result<RequestHead, ReadError> {
    let text = std::str::from_utf8(head).map_err(|_| ReadError::Bad(400, "head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or("");
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ReadError::Bad(400, "bad request line"));
    };
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return Err(ReadError::Bad(505, "unsupported HTTP version")),
    };
    let mut headers = Vec::new();
    for line in lines {
        if line.is_empty() {
            continue;
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(ReadError::Bad(400, "bad header line"));
        };
        if name.is_empty() || name.contains(' ') {
            return Err(ReadError::Bad(400, "bad header name"));
        }
        headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
    }
    Ok(RequestHead {
        method: method.to_owned(),
        target: target.to_owned(),
        headers,
        http10,
    })
}

pub(crate) fn reason(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_botocore_style_head() {
        let h = parse_head(
            b"POST / HTTP/1.1\r\nHost: 127.0.0.1:1\r\nX-Amz-Target: AmazonSSM.StartSession\r\nContent-Length: 2\r\n\r\n",
        )
        .unwrap();
        assert_eq!(h.method, "POST");
        assert_eq!(h.header("x-amz-target"), Some("AmazonSSM.StartSession"));
        assert!(!h.wants_close());
        assert!(matches!(
            parse_head(b"GARBAGE\r\n\r\n"),
            Err(ReadError::Bad(400, _))
        ));
    }
}
