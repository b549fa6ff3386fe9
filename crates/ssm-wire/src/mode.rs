//! Which session mode a handshake selects (PROTOCOL.md §8.2), as pure functions: the
//! session type, the port-forwarding `type` property and the agent's version decide.

use crate::session::{SessionInfo, SessionKind};

/// How the client runs a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModeKind {
    /// `Standard_Stream`, `InteractiveCommands`, `NonInteractiveCommands`: the terminal
    /// or the command's streams.
    Shell,
    /// A Port session that is not local port forwarding (`AWS-StartSSHSession`, ssh
    /// ProxyCommand): stdin and stdout.
    Stdio,
    /// Local port forwarding with an agent up to 3.0.196.0: one connection at a time.
    BasicPort,
    /// Local port forwarding with a newer agent: smux streams.
    MuxPort,
}

/// Picks the mode from the handshake.
pub fn select(info: &SessionInfo) -> ModeKind {
    match info.kind {
        SessionKind::Stream => ModeKind::Shell,
        SessionKind::Port => {
            if info.property("type") != Some("LocalPortForwarding") {
                ModeKind::Stdio
            } else if version_greater(&info.agent_version, "3.0.196.0") {
                ModeKind::MuxPort
            } else {
                ModeKind::BasicPort
            }
        }
    }
}

/// Dotted-version "strictly greater than", as the official gates compare: the component
/// counts must match and every component must be numeric, else `false`.
pub fn version_greater(version: &str, than: &str) -> bool {
    let parse = |v: &str| -> Option<Vec<u64>> { v.split('.').map(|p| p.parse().ok()).collect() };
    match (parse(version), parse(than)) {
        (Some(a), Some(b)) if a.len() == b.len() => a > b,
        _ => false,
    }
}

/// Agents after this version understand the TerminateSession flag in basic port mode;
/// older ones need the TerminateSession API.
pub fn basic_port_uses_terminate_flag(agent_version: &str) -> bool {
    version_greater(agent_version, "2.3.722.0")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn info(kind: SessionKind, props: serde_json::Value, agent: &str) -> SessionInfo {
        SessionInfo {
            session_type: "Port".to_owned(),
            kind,
            properties: props,
            agent_version: agent.to_owned(),
            encrypted: false,
        }
    }

    #[test]
    fn version_gates() {
        assert!(version_greater("3.3.987.0", "3.0.196.0"));
        assert!(!version_greater("3.0.196.0", "3.0.196.0"));
        assert!(!version_greater("2.3.722.0", "3.0.196.0"));
        assert!(
            !version_greater("3.3", "3.0.196.0"),
            "component counts differ"
        );
        assert!(!version_greater("", "3.0.196.0"));
        assert!(!version_greater("3.x.1.0", "3.0.196.0"));
        assert!(basic_port_uses_terminate_flag("2.3.723.0"));
        assert!(!basic_port_uses_terminate_flag("2.3.722.0"));
    }

    #[test]
    fn modes_from_the_handshake() {
        let lpf = json!({"type": "LocalPortForwarding", "portNumber": "80"});
        assert_eq!(
            select(&info(SessionKind::Stream, json!(null), "")),
            ModeKind::Shell
        );
        assert_eq!(
            select(&info(
                SessionKind::Port,
                json!({"portNumber": "22"}),
                "3.3.987.0"
            )),
            ModeKind::Stdio
        );
        assert_eq!(
            select(&info(SessionKind::Port, lpf.clone(), "3.3.987.0")),
            ModeKind::MuxPort
        );
        assert_eq!(
            select(&info(SessionKind::Port, lpf.clone(), "3.0.196.0")),
            ModeKind::BasicPort
        );
        assert_eq!(
            select(&info(SessionKind::Port, lpf, "")),
            ModeKind::BasicPort,
            "no handshake version: the old behaviour"
        );
    }
}
