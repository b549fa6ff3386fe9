//! Managed nodes and EC2 Instance Connect, for the plugin's standalone client:
//! `AmazonSSM.DescribeInstanceInformation` over a registry the test fills
//! ([`crate::Simulator::add_managed_node`]), `AWSEC2InstanceConnectService.SendSSHPublicKey`
//! recording each pushed key, and `GET /ec2-instance-connect/keys?instance=ID&user=NAME`
//! listing the keys pushed in the last 60 seconds (one per line, authorized_keys format),
//! for an sshd `AuthorizedKeysCommand`: a key counts only while the service would honour it.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::session::lock;
use crate::Inner;

/// How long a pushed key is valid (the EC2 Instance Connect service's 60 seconds).
pub const KEY_LIFETIME: Duration = Duration::from_secs(60);

/// A node as DescribeInstanceInformation reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManagedNode {
    /// `i-…` (EC2) or `mi-…` (hybrid).
    pub instance_id: String,
    /// `Online`, `ConnectionLost` or `Inactive`.
    pub ping_status: String,
    pub computer_name: String,
    pub ip_address: String,
    /// `Linux`, `Windows`, `MacOS`.
    pub platform_type: String,
    pub platform_name: String,
    /// `EC2Instance` or `ManagedInstance`.
    pub resource_type: String,
    /// The activation name of a hybrid node (`Name`).
    pub name: Option<String>,
}

impl ManagedNode {
    /// An online Amazon Linux EC2 node.
    pub fn online(instance_id: &str, computer_name: &str, ip_address: &str) -> ManagedNode {
        ManagedNode {
            instance_id: instance_id.to_owned(),
            ping_status: "Online".to_owned(),
            computer_name: computer_name.to_owned(),
            ip_address: ip_address.to_owned(),
            platform_type: "Linux".to_owned(),
            platform_name: "Amazon Linux".to_owned(),
            resource_type: if instance_id.starts_with("mi-") {
                "ManagedInstance".to_owned()
            } else {
                "EC2Instance".to_owned()
            },
            name: None,
        }
    }

    fn to_json(&self) -> Value {
        let mut v = json!({
            "InstanceId": self.instance_id,
            "PingStatus": self.ping_status,
            "LastPingDateTime": 1.7e9,
            "AgentVersion": crate::DEFAULT_AGENT_VERSION,
            "IsLatestVersion": true,
            "PlatformType": self.platform_type,
            "PlatformName": self.platform_name,
            "PlatformVersion": "2023",
            "ResourceType": self.resource_type,
            "IPAddress": self.ip_address,
            "ComputerName": self.computer_name,
        });
        if let (Some(name), Some(obj)) = (&self.name, v.as_object_mut()) {
            obj.insert("Name".to_owned(), json!(name));
        }
        v
    }
}

/// One SendSSHPublicKey call that was accepted.
#[derive(Clone, Debug)]
pub struct PushedKey {
    pub instance_id: String,
    pub os_user: String,
    pub public_key: String,
    pub at: Instant,
}

fn error(code: &str, message: &str) -> (u16, Vec<u8>) {
    let body = json!({ "__type": code, "message": message });
    (400, body.to_string().into_bytes())
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// `DescribeInstanceInformation`: `Filters` (InstanceIds, PingStatus, PlatformTypes,
/// ResourceType), `InstanceInformationFilterList` (the same keys, lower camel case),
/// `MaxResults` (5..=50, default 50) and `NextToken`.
pub(crate) fn describe_instance_information(inner: &Inner, v: &Value) -> (u16, Vec<u8>) {
    describe(&lock(&inner.nodes), v)
}

fn describe(nodes: &[ManagedNode], v: &Value) -> (u16, Vec<u8>) {
    let mut filters: Vec<(String, Vec<String>)> = Vec::new();
    for f in v
        .get("Filters")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let key = f.get("Key").and_then(Value::as_str).unwrap_or("");
        filters.push((key.to_ascii_lowercase(), strings(f.get("Values"))));
    }
    let list = v
        .get("InstanceInformationFilterList")
        .and_then(Value::as_array);
    for f in list.into_iter().flatten() {
        let key = f.get("key").and_then(Value::as_str).unwrap_or("");
        filters.push((key.to_ascii_lowercase(), strings(f.get("valueSet"))));
    }
    for (key, values) in &filters {
        if !matches!(
            key.as_str(),
            "instanceids" | "pingstatus" | "platformtypes" | "resourcetype"
        ) {
            return error(
                "InvalidInstanceInformationFilterValue",
                &format!("filter key {key} is not simulated"),
            );
        }
        if values.is_empty() {
            return error(
                "InvalidInstanceInformationFilterValue",
                "a filter needs at least one value",
            );
        }
    }
    let max = match v.get("MaxResults").map(Value::as_u64) {
        None => 50,
        Some(Some(n)) if (5..=50).contains(&n) => n as usize,
        Some(_) => return error("ValidationException", "MaxResults must be between 5 and 50"),
    };
    let start = match v.get("NextToken").and_then(Value::as_str) {
        None => 0,
        Some(t) => match t
            .strip_prefix("page-")
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(n) => n,
            None => return error("InvalidNextToken", "the NextToken is not valid"),
        },
    };
    let matching: Vec<&ManagedNode> = nodes
        .iter()
        .filter(|n| {
            filters.iter().all(|(key, values)| {
                let field = match key.as_str() {
                    "instanceids" => &n.instance_id,
                    "pingstatus" => &n.ping_status,
                    "platformtypes" => &n.platform_type,
                    _ => &n.resource_type,
                };
                values.iter().any(|want| want == field)
            })
        })
        .collect();
    let page: Vec<Value> = matching
        .iter()
        .skip(start)
        .take(max)
        .map(|n| n.to_json())
        .collect();
    let mut out = json!({ "InstanceInformationList": page });
    if start + max < matching.len() {
        out["NextToken"] = json!(format!("page-{}", start + max));
    }
    (200, out.to_string().into_bytes())
}

/// `SendSSHPublicKey{InstanceId, InstanceOSUser, SSHPublicKey[, AvailabilityZone]}`.
pub(crate) fn send_ssh_public_key(inner: &Inner, v: &Value) -> (u16, Vec<u8>) {
    let field = |name: &str| v.get(name).and_then(Value::as_str).unwrap_or("").trim();
    let (id, user, key) = (
        field("InstanceId"),
        field("InstanceOSUser"),
        field("SSHPublicKey"),
    );
    if !id.starts_with("i-") && !id.starts_with("mi-") {
        return error("ValidationException", "InstanceId must be an instance id");
    }
    if user.is_empty() || user.len() > 32 {
        return error("ValidationException", "InstanceOSUser is required");
    }
    let mut words = key.split_whitespace();
    let well_formed = matches!(
        (words.next(), words.next()),
        (Some(t), Some(_)) if t.starts_with("ssh-") || t.starts_with("ecdsa-")
    );
    if !well_formed || key.contains('\n') {
        return error(
            "InvalidArgsException",
            "SSHPublicKey is not an OpenSSH public key",
        );
    }
    lock(&inner.pushed_keys).push(PushedKey {
        instance_id: id.to_owned(),
        os_user: user.to_owned(),
        public_key: key.to_owned(),
        at: Instant::now(),
    });
    let out = json!({ "RequestId": uuid::Uuid::new_v4().to_string(), "Success": true });
    (200, out.to_string().into_bytes())
}

/// `GET /ec2-instance-connect/keys?instance=ID&user=NAME`: the still-valid keys.
pub(crate) fn valid_keys(inner: &Inner, query: &str) -> String {
    keys_text(&lock(&inner.pushed_keys), query, Instant::now())
}

fn keys_text(keys: &[PushedKey], query: &str, now: Instant) -> String {
    let mut instance = None;
    let mut user = None;
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("instance", v)) => instance = Some(v.to_owned()),
            Some(("user", v)) => user = Some(v.to_owned()),
            _ => {}
        }
    }
    let mut out = String::new();
    for k in keys
        .iter()
        .filter(|k| now.saturating_duration_since(k.at) < KEY_LIFETIME)
    {
        if instance.as_ref().is_some_and(|i| *i != k.instance_id)
            || user.as_ref().is_some_and(|u| *u != k.os_user)
        {
            continue;
        }
        out.push_str(&k.public_key);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_filters_and_pages() {
        let mut nodes: Vec<ManagedNode> = (0..7)
            .map(|i| ManagedNode::online(&format!("i-{i:017x}"), &format!("host{i}"), "10.0.0.1"))
            .collect();
        nodes[3].ping_status = "ConnectionLost".into();
        let page = |v: Value| -> Value {
            let (status, body) = describe(&nodes, &v);
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
            serde_json::from_slice(&body).unwrap()
        };
        let first = page(json!({"MaxResults": 5}));
        assert_eq!(
            first["InstanceInformationList"].as_array().unwrap().len(),
            5
        );
        let token = first["NextToken"].as_str().unwrap().to_owned();
        let second = page(json!({"MaxResults": 5, "NextToken": token}));
        assert_eq!(
            second["InstanceInformationList"].as_array().unwrap().len(),
            2
        );
        assert!(second.get("NextToken").is_none());
        let lost = page(json!({"Filters": [{"Key": "PingStatus", "Values": ["ConnectionLost"]}]}));
        assert_eq!(lost["InstanceInformationList"][0]["ComputerName"], "host3");
        let by_id = page(json!({"InstanceInformationFilterList":
            [{"key": "InstanceIds", "valueSet": [nodes[6].instance_id]}]}));
        assert_eq!(
            by_id["InstanceInformationList"].as_array().unwrap().len(),
            1
        );
        for bad in [
            json!({"MaxResults": 51}),
            json!({"NextToken": "x"}),
            json!({"Filters": [{"Key": "Bogus", "Values": ["x"]}]}),
        ] {
            assert_eq!(describe(&nodes, &bad).0, 400, "{bad}");
        }
    }

    #[test]
    fn keys_expire_after_60_seconds() {
        let now = Instant::now();
        let key = |id: &str, user: &str, key: &str, age: u64| PushedKey {
            instance_id: id.into(),
            os_user: user.into(),
            public_key: key.into(),
            at: now
                .checked_sub(Duration::from_secs(age))
                .expect("the monotonic clock is past a minute"),
        };
        let keys = vec![
            key("i-1", "root", "ssh-ed25519 AAAA old", 61),
            key("i-1", "root", "ssh-ed25519 BBBB new", 59),
            key("i-1", "admin", "ssh-ed25519 CCCC other-user", 1),
            key("i-2", "root", "ssh-ed25519 DDDD other-instance", 1),
        ];
        assert_eq!(
            keys_text(&keys, "instance=i-1&user=root", now),
            "ssh-ed25519 BBBB new\n"
        );
        assert_eq!(keys_text(&keys, "user=root", now).lines().count(), 2);
    }
}
