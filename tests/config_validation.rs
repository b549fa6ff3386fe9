//! Bad `SSM_PLUGIN_*` values end to end (issue 14, item 1): the built plugin prints
//! `Cannot perform start session: SSM_PLUGIN_X: <why> (allowed: …)` and exits 2, before
//! the session starts (no "Starting session" line) and before any connection: the
//! StreamUrl points at a loopback listener that must see nothing.

mod plugin_cli;

use std::io::ErrorKind;
use std::net::TcpListener;

use plugin_cli::*;

fn refused(name: &str, value: &str, why: &str, allowed: &str) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!(
        "wss://127.0.0.1:{}/v1/data-channel/s-0123456789abcdef0",
        listener.local_addr().expect("addr").port()
    );
    let home = Home::new("config");
    let out = run(&home, &url, &[(name, value)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{name}={value:?}: status {:?}, stderr: {stderr}",
        out.status
    );
    let want = format!("Cannot perform start session: {name}: {why} (allowed: {allowed})\n");
    assert_eq!(stderr, want, "{name}={value:?}");
    assert!(out.stdout.is_empty(), "stdout: {:?}", out.stdout);
    listener.set_nonblocking(true).expect("nonblocking");
    assert!(
        matches!(listener.accept(), Err(e) if e.kind() == ErrorKind::WouldBlock),
        "{name}={value:?}: the plugin connected"
    );
}

const SECONDS: &str = "0 to 86400 seconds";

#[test]
fn huge_and_non_finite_durations_are_refused_without_a_panic() {
    // 1e30 used to panic in Duration::from_secs_f64 (exit 101).
    for value in ["1e30", "86401", "1.7976931348623157e308"] {
        refused(
            "SSM_PLUGIN_RECONNECT_TIMEOUT",
            value,
            &format!("{value} is too large"),
            SECONDS,
        );
    }
    for value in ["inf", "nan", "-inf", "1e400", "0x10", "ten"] {
        refused(
            "SSM_PLUGIN_RECONNECT_TIMEOUT",
            value,
            &format!("{value:?} is not a number"),
            SECONDS,
        );
    }
    refused("SSM_PLUGIN_FLUSH_TIMEOUT", "-1", "-1 is too small", SECONDS);
    refused(
        "SSM_PLUGIN_PING_INTERVAL",
        "0",
        "0 is too small",
        "1 to 86400 seconds",
    );
}

#[test]
fn sizes_rates_addresses_and_flags_are_checked() {
    refused(
        "SSM_PLUGIN_PAYLOAD_SIZE",
        "65537",
        "65537 is too large",
        "64 to 65536 bytes",
    );
    refused(
        "SSM_PLUGIN_PAYLOAD_SIZE",
        "18446744073709551616",
        "18446744073709551616 is too large",
        "64 to 65536 bytes",
    );
    refused(
        "SSM_PLUGIN_WINDOW_PACKETS",
        "0",
        "0 is too small",
        "1 to 100000 messages, and at most 64 MiB in flight (WINDOW_PACKETS × PAYLOAD_SIZE)",
    );
    refused(
        "SSM_PLUGIN_PACKETS_PER_SECOND",
        "1e-300",
        "1e-300 is too small",
        "0 to disable pacing, or 1 to 1000000 frames per second",
    );
    refused(
        "SSM_PLUGIN_LISTEN_ADDRESS",
        "localhost",
        "\"localhost\" is not an IP address",
        "an IPv4 or IPv6 address, e.g. 127.0.0.1, 0.0.0.0, ::1 or [::1]",
    );
    refused(
        "SSM_PLUGIN_QUIET",
        "sometimes",
        "\"sometimes\" is not a boolean",
        "1, true, yes, on, 0, false, no, off",
    );
}
