//! TARGET resolution: an instance id (`i-…`, `mi-…`) or ECS target (`ecs:…`) is used as
//! given, without any API call. Anything else is a name, looked up at once in
//! - EC2 DescribeInstances (running instances): the `Name` tag, the private DNS name, or
//!   the private IPv4 address;
//! - SSM DescribeInstanceInformation: the computer name (or its first label), a hybrid
//!   node's activation name, or its IP address.
//!
//! One match is used (unless its agent is not `Online`: offline nodes are never used
//! silently). Several: an interactive picker when stdin and stderr are terminals, else the
//! candidates as a table and status 2. None: a clear error and status 2.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::net::Ipv4Addr;

use super::aws_ops::{self, Ec2Instance, NodeInfo};
use super::Failure;
use crate::aws::{AwsContext, AwsError};

/// One instance or managed node that matched.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Candidate {
    pub id: String,
    pub name: String,
    pub private_ip: String,
    /// The SSM agent's ping status; `None` when SSM does not know the instance.
    pub ping: Option<String>,
}

impl Candidate {
    pub fn online(&self) -> bool {
        self.ping.as_deref() == Some("Online")
    }

    fn ping_text(&self) -> String {
        match &self.ping {
            Some(p) if p == "Online" => p.clone(),
            Some(p) => format!("{p} (offline)"),
            None => "not managed by SSM (offline)".to_owned(),
        }
    }
}

/// Whether `target` is an id the service takes as it is.
pub fn is_id(target: &str) -> bool {
    if target.starts_with("ecs:") {
        return true;
    }
    let hex = |s: &str| {
        (8..=17).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    match target.split_once('-') {
        Some(("i" | "mi", rest)) => hex(rest),
        _ => false,
    }
}

/// Resolves TARGET to an id (asking the user to pick when that is possible and needed).
pub fn resolve(
    rt: &tokio::runtime::Runtime,
    aws: &AwsContext,
    target: &str,
) -> Result<String, Failure> {
    let target = target.trim();
    if target.is_empty() {
        return Err(Failure::usage("the target is empty"));
    }
    if is_id(target) {
        return Ok(target.to_owned());
    }
    let candidates = rt.block_on(find(aws, target))?;
    choose(target, candidates, interactive())
}

fn interactive() -> bool {
    std::io::stdin().is_terminal() && std::io::stderr().is_terminal()
}

/// Resolves TARGET to a running EC2 instance (with its VPC, subnet and private IP) for
/// an EC2 Instance Connect Endpoint tunnel: an id is looked up by id, a name by the `Name`
/// tag, private DNS name or private IPv4. The SSM agent plays no part (EICE needs none).
pub async fn resolve_ec2(aws: &AwsContext, target: &str) -> Result<Ec2Instance, Failure> {
    let target = target.trim();
    if target.is_empty() {
        return Err(Failure::usage("the target is empty"));
    }
    if target.starts_with("mi-") || target.starts_with("ecs:") {
        return Err(Failure::usage(format!(
            "{target} is not an EC2 instance: EC2 Instance Connect Endpoints reach EC2 instances only"
        )));
    }
    let matches = if is_id(target) {
        let running = ("instance-state-name", vec!["running".to_owned()]);
        aws_ops::describe_instances(aws, &[running, ("instance-id", vec![target.to_owned()])])
            .await
            .map_err(|e| Failure::failed(format!("cannot look {target} up: {e}")))?
    } else {
        ec2_matches(aws, target)
            .await
            .map_err(|e| Failure::failed(format!("cannot look {target:?} up: {e}")))?
    };
    let mut by_id: BTreeMap<String, Ec2Instance> = BTreeMap::new();
    for i in matches {
        if !i.instance_id.is_empty() && (i.state.is_empty() || i.state == "running") {
            by_id.insert(i.instance_id.clone(), i);
        }
    }
    let found: Vec<Ec2Instance> = by_id.into_values().collect();
    match found.as_slice() {
        [] => Err(Failure::usage(format!(
            "no running EC2 instance matches {target:?} (searched the instance id, Name tag, \
             private DNS name and private IPv4)"
        ))),
        [one] => Ok(one.clone()),
        many => {
            let rows: Vec<Vec<String>> = many
                .iter()
                .map(|i| vec![i.instance_id.clone(), i.name.clone(), i.private_ip.clone()])
                .collect();
            Err(Failure::usage(format!(
                "{} instances match {target:?}; use an id or a more specific name:\n{}",
                many.len(),
                format_table(&["ID", "NAME", "PRIVATE IP"], &rows)
            )))
        }
    }
}

/// Picks among the candidates (see the module docs).
pub fn choose(target: &str, candidates: Vec<Candidate>, tty: bool) -> Result<String, Failure> {
    match candidates.as_slice() {
        [] => Err(Failure::usage(format!(
            "no instance or managed node matches {target:?} (searched the Name tag, private DNS \
             name and private IPv4 of running EC2 instances, and the computer name of managed nodes)"
        ))),
        [one] if one.online() => Ok(one.id.clone()),
        [one] => Err(Failure::usage(format!(
            "{target:?} is {} {}, whose SSM agent is {}; pass the id to try anyway",
            one.id,
            one.name.as_str(),
            one.ping_text()
        ))),
        many if tty => pick(target, many),
        many => Err(Failure::usage(format!(
            "{} instances match {target:?}; use an id or a more specific name:\n{}",
            many.len(),
            table(many)
        ))),
    }
}

/// The candidates as a table: id, name, private IP, ping status.
pub fn table(candidates: &[Candidate]) -> String {
    let rows: Vec<Vec<String>> = candidates
        .iter()
        .map(|c| {
            vec![
                c.id.clone(),
                c.name.clone(),
                c.private_ip.clone(),
                c.ping_text(),
            ]
        })
        .collect();
    format_table(&["ID", "NAME", "PRIVATE IP", "PING STATUS"], &rows)
}

/// Left-aligned columns separated by two spaces; every line ends with `\n`.
pub fn format_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                l.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(headers.to_vec(), &mut out);
    for row in rows {
        line(row.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

fn pick(target: &str, candidates: &[Candidate]) -> Result<String, Failure> {
    // The table's rows (id, name, private IP, ping status), aligned.
    let labels: Vec<String> = table(candidates)
        .lines()
        .skip(1)
        .map(str::to_owned)
        .collect();
    let chosen = dialoguer::FuzzySelect::new()
        .with_prompt(format!(
            "{} instances match {target:?} (type to filter, Enter to choose, Esc to cancel)",
            candidates.len()
        ))
        .items(&labels)
        .default(0)
        .interact_opt()
        .map_err(|e| Failure::failed(format!("the picker failed: {e}")))?;
    match chosen.and_then(|i| candidates.get(i)) {
        Some(c) => Ok(c.id.clone()),
        None => Err(Failure::usage("no target chosen")),
    }
}

/// Looks the name up in EC2 and SSM at once and merges what matched by id.
pub async fn find(aws: &AwsContext, target: &str) -> Result<Vec<Candidate>, Failure> {
    let ec2 = ec2_matches(aws, target);
    let ssm = aws_ops::describe_instance_information(aws, &[]);
    let (ec2, ssm) = tokio::join!(ec2, ssm);
    let (ec2, nodes) = match (ec2, ssm) {
        (Err(a), Err(b)) => {
            return Err(Failure::failed(format!(
                "cannot look {target:?} up: {a}; and {b}"
            )))
        }
        (Err(e), Ok(n)) => {
            eprintln!("session-manager-plugin: warning: {e}; searching managed nodes only");
            (Vec::new(), n)
        }
        (Ok(i), Err(e)) => {
            eprintln!(
                "session-manager-plugin: warning: {e}; the ping status of EC2 matches is unknown"
            );
            (i, Vec::new())
        }
        (Ok(i), Ok(n)) => (i, n),
    };
    Ok(merge(target, &ec2, &nodes))
}

async fn ec2_matches(aws: &AwsContext, target: &str) -> Result<Vec<Ec2Instance>, AwsError> {
    let running = ("instance-state-name", vec!["running".to_owned()]);
    let by = |name: &'static str| vec![running.clone(), (name, vec![target.to_owned()])];
    if target.parse::<Ipv4Addr>().is_ok() {
        return aws_ops::describe_instances(aws, &by("private-ip-address")).await;
    }
    let (by_tag, by_dns) = (by("tag:Name"), by("private-dns-name"));
    let (tags, dns) = tokio::join!(
        aws_ops::describe_instances(aws, &by_tag),
        aws_ops::describe_instances(aws, &by_dns),
    );
    let mut all = tags?;
    all.extend(dns?);
    Ok(all)
}

/// Merges EC2 matches and matching managed nodes (ping statuses from SSM), by id.
fn merge(target: &str, ec2: &[Ec2Instance], nodes: &[NodeInfo]) -> Vec<Candidate> {
    let mut by_id: BTreeMap<String, Candidate> = BTreeMap::new();
    let ping: BTreeMap<&str, &str> = nodes
        .iter()
        .map(|n| (n.instance_id.as_str(), n.ping_status.as_str()))
        .collect();
    let running = ec2
        .iter()
        .filter(|i| !i.instance_id.is_empty() && (i.state.is_empty() || i.state == "running"));
    for i in running {
        by_id.insert(
            i.instance_id.clone(),
            Candidate {
                id: i.instance_id.clone(),
                name: if i.name.is_empty() {
                    i.private_dns.clone()
                } else {
                    i.name.clone()
                },
                private_ip: i.private_ip.clone(),
                ping: ping.get(i.instance_id.as_str()).map(|p| (*p).to_owned()),
            },
        );
    }
    let eq = |a: &str| !a.is_empty() && a.eq_ignore_ascii_case(target);
    for n in nodes {
        let short = n.computer_name.split('.').next().unwrap_or("");
        if !(eq(&n.computer_name) || eq(short) || eq(&n.name) || eq(&n.ip_address)) {
            continue;
        }
        by_id
            .entry(n.instance_id.clone())
            .or_insert_with(|| Candidate {
                id: n.instance_id.clone(),
                name: if n.name.is_empty() {
                    n.computer_name.clone()
                } else {
                    n.name.clone()
                },
                private_ip: n.ip_address.clone(),
                ping: Some(n.ping_status.clone()),
            });
    }
    by_id.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(is_id("i-0123456789abcdef0"));
        assert!(is_id("i-01234567"));
        assert!(is_id("mi-0123456789abcdef0"));
        assert!(is_id("ecs:cluster_task_container"));
        assert!(!is_id("web-1"));
        assert!(!is_id("i-xyz"));
        assert!(!is_id("i-0123456789ABCDEF0"));
    }

    fn node(id: &str, computer: &str, ping: &str) -> NodeInfo {
        NodeInfo {
            instance_id: id.into(),
            ping_status: ping.into(),
            computer_name: computer.into(),
            ip_address: "10.0.0.9".into(),
            ..Default::default()
        }
    }

    #[test]
    fn merge_and_choose() {
        let ec2 = vec![Ec2Instance {
            instance_id: "i-1".into(),
            name: "web".into(),
            private_ip: "10.0.0.1".into(),
            ..Default::default()
        }];
        let nodes = vec![
            node("i-1", "ip-10-0-0-1.ec2.internal", "Online"),
            node("mi-2", "WEB.corp.example", "ConnectionLost"),
            node("mi-3", "db", "Online"),
        ];
        let c = merge("web", &ec2, &nodes);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].ping.as_deref(), Some("Online"));
        assert_eq!(c[1].id, "mi-2");
        let err = choose("web", c.clone(), false).unwrap_err();
        assert_eq!(err.code, 2);
        assert!(
            err.message.lines().any(|l| l.starts_with("i-1   web ")
                && l.contains(" 10.0.0.1 ")
                && l.ends_with("Online")),
            "{}",
            err.message
        );
        assert!(
            err.message.contains("ConnectionLost (offline)"),
            "{}",
            err.message
        );
        assert_eq!(
            choose("db", merge("db", &[], &nodes), false).unwrap(),
            "mi-3"
        );
        let offline = choose("x", vec![c[1].clone()], false).unwrap_err();
        assert!(
            offline.message.contains("ConnectionLost"),
            "{}",
            offline.message
        );
        assert_eq!(choose("x", vec![], false).unwrap_err().code, 2);
    }
}
