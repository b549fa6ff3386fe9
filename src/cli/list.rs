//! `list`: managed nodes (SSM DescribeInstanceInformation) with id, name (the EC2 `Name`
//! tag, else the activation name or computer name), private IP, platform and ping status,
//! as a table or `--json`.

use serde_json::json;

use super::aws_ops::{self, NodeInfo};
use super::target::format_table;
use super::{load_config, runtime, AwsArgs, Client, Failure};

#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:\n  session-manager-plugin list\n  \
session-manager-plugin list --json | jq -r '.[] | select(.PingStatus == \"Online\") | .InstanceId'")]
pub struct Args {
    /// A JSON array instead of the table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub aws: AwsArgs,
}

/// One row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub id: String,
    pub name: String,
    pub private_ip: String,
    pub platform: String,
    pub ping: String,
}

pub fn main(a: Args) -> Result<u8, Failure> {
    let cfg = load_config(&a.aws)?;
    let client = Client::new(&a.aws, &cfg.defaults)?;
    let rt = runtime()?;
    let rows = rt.block_on(rows(&client))?;
    if a.json {
        let v: Vec<_> = rows
            .iter()
            .map(|r| {
                json!({
                    "InstanceId": r.id,
                    "Name": r.name,
                    "PrivateIpAddress": r.private_ip,
                    "Platform": r.platform,
                    "PingStatus": r.ping,
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(v));
    } else {
        let cells: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                vec![
                    r.id.clone(),
                    r.name.clone(),
                    r.private_ip.clone(),
                    r.platform.clone(),
                    r.ping.clone(),
                ]
            })
            .collect();
        print!(
            "{}",
            format_table(
                &["ID", "NAME", "PRIVATE IP", "PLATFORM", "PING STATUS"],
                &cells
            )
        );
    }
    Ok(crate::exit::OK)
}

async fn rows(client: &Client) -> Result<Vec<Row>, Failure> {
    let nodes = aws_ops::describe_instance_information(&client.aws, &[]).await?;
    let ec2_ids: Vec<String> = nodes
        .iter()
        .filter(|n| n.instance_id.starts_with("i-"))
        .map(|n| n.instance_id.clone())
        .collect();
    let mut names = std::collections::HashMap::new();
    for chunk in ec2_ids.chunks(100) {
        match aws_ops::describe_instances(&client.aws, &[("instance-id", chunk.to_vec())]).await {
            Ok(found) => {
                for i in found {
                    let name = if i.name.is_empty() {
                        i.private_dns
                    } else {
                        i.name
                    };
                    names.insert(i.instance_id.clone(), (name, i.private_ip, i.platform));
                }
            }
            Err(e) => {
                eprintln!("session-manager-plugin: warning: {e}; showing computer names");
                break;
            }
        }
    }
    Ok(nodes
        .iter()
        .map(|n| row(n, names.get(&n.instance_id)))
        .collect())
}

fn row(n: &NodeInfo, ec2: Option<&(String, String, String)>) -> Row {
    let (tag, ip, platform) = ec2.cloned().unwrap_or_default();
    let name = [tag, n.name.clone(), n.computer_name.clone()]
        .into_iter()
        .find(|s| !s.is_empty())
        .unwrap_or_default();
    Row {
        id: n.instance_id.clone(),
        name,
        private_ip: if ip.is_empty() {
            n.ip_address.clone()
        } else {
            ip
        },
        platform: if n.platform.is_empty() {
            platform
        } else {
            n.platform.clone()
        },
        ping: n.ping_status.clone(),
    }
}
