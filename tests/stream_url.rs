//! The StreamUrl check end to end (issue 14, item 6): the built plugin refuses a host that
//! is no Session Manager endpoint with exit status 1, before any connection is opened or
//! the token is sent. Every connection the plugin would open to a non-loopback host goes
//! through the HTTPS_PROXY listener here, so an empty listener backlog after the plugin
//! has exited shows that nothing connected (a TCP connect completes into the backlog
//! before the connecting process goes on); the control run shows the same listener does
//! see the connection when the host is trusted.

mod plugin_cli;

use std::io::{ErrorKind, Read};
use std::net::TcpListener;
use std::time::Duration;

use plugin_cli::*;

fn proxy_listener() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", l.local_addr().expect("addr"));
    (l, url)
}

fn nothing_connected(l: &TcpListener) -> bool {
    l.set_nonblocking(true).expect("nonblocking");
    matches!(l.accept(), Err(e) if e.kind() == ErrorKind::WouldBlock)
}

#[test]
fn a_host_that_is_no_endpoint_is_refused_before_connecting() {
    let (proxy, proxy_url) = proxy_listener();
    let home = Home::new("streamurl");
    let out = run(
        &home,
        "wss://example.invalid/v1/data-channel/s-0123456789abcdef0?role=publish_subscribe",
        &[("HTTPS_PROXY", &proxy_url)],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        stderr.contains(
            "Cannot perform start session: StreamUrl host example.invalid is not a Session Manager endpoint"
        ),
        "stderr: {stderr}"
    );
    assert!(!stderr.contains(TOKEN));
    assert!(nothing_connected(&proxy), "the plugin connected");
    // Refused before the session starts: no "Starting session" line, no dial in the log.
    assert!(out.stdout.is_empty(), "stdout: {:?}", out.stdout);
    assert!(!home.log().contains("data channel"), "{}", home.log());
}

#[test]
fn plain_ws_to_an_endpoint_is_refused() {
    let (proxy, proxy_url) = proxy_listener();
    let home = Home::new("streamurl-ws");
    let out = run(
        &home,
        "ws://ssmmessages.us-east-1.amazonaws.com/v1/data-channel/s-0123456789abcdef0",
        &[("HTTP_PROXY", &proxy_url), ("HTTPS_PROXY", &proxy_url)],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains("needs wss://"), "stderr: {stderr}");
    assert!(nothing_connected(&proxy), "the plugin connected");
}

/// The control: with the host trusted, the same set-up sees the plugin's CONNECT.
#[test]
fn a_trusted_host_is_dialled() {
    let (proxy, proxy_url) = proxy_listener();
    let home = Home::new("streamurl-trusted");
    let mut child = spawn(
        &home,
        "wss://example.invalid/v1/data-channel/s-0123456789abcdef0",
        &[
            ("HTTPS_PROXY", &proxy_url),
            (
                "SSM_PLUGIN_TRUSTED_STREAM_HOSTS",
                "other.example, example.invalid",
            ),
        ],
    );
    // Wait for the connection, or for the plugin to exit without making one.
    proxy.set_nonblocking(true).expect("nonblocking");
    let mut conn = loop {
        match proxy.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("accept: {e}"),
        }
        if let Some(status) = child.try_wait().expect("try_wait") {
            let mut err = String::new();
            if let Some(mut s) = child.stderr.take() {
                let _ = s.read_to_string(&mut err);
            }
            panic!("the plugin exited ({status}) without connecting: {err}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    conn.set_nonblocking(false).expect("blocking");
    conn.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 4096 {
        match conn.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let head = String::from_utf8_lossy(&head);
    assert!(
        head.starts_with("CONNECT example.invalid:443 HTTP/1.1\r\n"),
        "{head}"
    );
}

#[test]
fn a_bad_trusted_hosts_entry_is_a_usage_error() {
    let home = Home::new("streamurl-badlist");
    let out = run(
        &home,
        "wss://ssmmessages.us-east-1.amazonaws.com/v1/data-channel/s-1",
        &[("SSM_PLUGIN_TRUSTED_STREAM_HOSTS", "*")],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(
        stderr.contains("Cannot perform start session: SSM_PLUGIN_TRUSTED_STREAM_HOSTS"),
        "stderr: {stderr}"
    );
}
