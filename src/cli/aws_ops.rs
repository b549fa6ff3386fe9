//! The AWS operations of the standalone client, hand-built over [`AwsContext`]'s signed
//! calls (the SDK's credential chain and SigV4; see the README's "AWS SDK crates or
//! hand-built calls" for the measurement behind this choice): SSM `StartSession` and
//! `DescribeInstanceInformation`, EC2 `DescribeInstances` (query protocol, XML) and EC2
//! Instance Connect `SendSSHPublicKey`.

use std::collections::BTreeMap;

use serde_json::{json, Value};
use ssm_wire::payload::StartSessionResponse;

use crate::aws::{AwsContext, AwsError, Service};

/// A StartSession request as the AWS CLI builds it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StartRequest {
    pub target: String,
    pub document_name: Option<String>,
    pub parameters: BTreeMap<String, Vec<String>>,
    pub reason: Option<String>,
}

impl StartRequest {
    pub fn new(target: String, document: Option<&str>) -> StartRequest {
        StartRequest {
            target,
            document_name: document.map(str::to_owned),
            ..Default::default()
        }
    }

    pub fn param(mut self, key: &str, value: impl Into<String>) -> StartRequest {
        self.parameters.insert(key.to_owned(), vec![value.into()]);
        self
    }

    fn body(&self) -> Value {
        let mut body = json!({ "Target": self.target });
        if let Some(d) = &self.document_name {
            body["DocumentName"] = json!(d);
        }
        if !self.parameters.is_empty() {
            body["Parameters"] = json!(self.parameters);
        }
        if let Some(r) = &self.reason {
            body["Reason"] = json!(r);
        }
        body
    }
}

fn invalid(operation: &'static str, message: impl Into<String>) -> AwsError {
    AwsError::InvalidResponse {
        operation,
        message: message.into(),
    }
}

/// SSM `StartSession`.
pub async fn start_session(
    aws: &AwsContext,
    req: &StartRequest,
) -> Result<StartSessionResponse, AwsError> {
    const OP: &str = "StartSession";
    let out = aws
        .call_json(Service::Ssm, OP, "AmazonSSM.StartSession", &req.body())
        .await?;
    let field = |name: &str| {
        out.get(name)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| invalid(OP, format!("no {name} in the response")))
    };
    Ok(StartSessionResponse {
        session_id: field("SessionId")?,
        token_value: field("TokenValue")?,
        stream_url: field("StreamUrl")?,
    })
}

/// A managed node as DescribeInstanceInformation reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub instance_id: String,
    pub ping_status: String,
    pub computer_name: String,
    pub ip_address: String,
    pub platform: String,
    /// The activation name of a hybrid node.
    pub name: String,
}

/// SSM `DescribeInstanceInformation`, every page; `ids` (when not empty) filters by id.
pub async fn describe_instance_information(
    aws: &AwsContext,
    ids: &[String],
) -> Result<Vec<NodeInfo>, AwsError> {
    const OP: &str = "DescribeInstanceInformation";
    let mut nodes = Vec::new();
    let mut next: Option<String> = None;
    // Bounded: 200 pages of 50 is 10 000 nodes.
    for _ in 0..200 {
        let mut body = json!({ "MaxResults": 50 });
        if !ids.is_empty() {
            body["Filters"] = json!([{ "Key": "InstanceIds", "Values": ids }]);
        }
        if let Some(t) = &next {
            body["NextToken"] = json!(t);
        }
        let out = aws
            .call_json(
                Service::Ssm,
                OP,
                "AmazonSSM.DescribeInstanceInformation",
                &body,
            )
            .await?;
        let list = out
            .get("InstanceInformationList")
            .and_then(Value::as_array)
            .ok_or_else(|| invalid(OP, "no InstanceInformationList in the response"))?;
        for item in list {
            let s = |name: &str| {
                item.get(name)
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned()
            };
            let platform = match (s("PlatformName"), s("PlatformType")) {
                (n, t) if n.is_empty() => t,
                (n, _) => n,
            };
            nodes.push(NodeInfo {
                instance_id: s("InstanceId"),
                ping_status: s("PingStatus"),
                computer_name: s("ComputerName"),
                ip_address: s("IPAddress"),
                platform,
                name: s("Name"),
            });
        }
        next = out
            .get("NextToken")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .map(str::to_owned);
        if next.is_none() {
            break;
        }
    }
    Ok(nodes)
}

/// An EC2 instance as DescribeInstances reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ec2Instance {
    pub instance_id: String,
    /// The `Name` tag.
    pub name: String,
    pub private_dns: String,
    pub private_ip: String,
    pub state: String,
    pub platform: String,
    pub vpc_id: String,
    pub subnet_id: String,
}

/// EC2 `DescribeInstances` with `filters` (name, values), every page.
pub async fn describe_instances(
    aws: &AwsContext,
    filters: &[(&str, Vec<String>)],
) -> Result<Vec<Ec2Instance>, AwsError> {
    ec2_pages(aws, "DescribeInstances", filters, parse_describe_instances).await
}

/// One page of an EC2 listing: its items and the NextToken, or why its XML is unusable.
type Ec2Page<T> = Result<(Vec<T>, Option<String>), String>;

/// The most pages one EC2 listing call follows (a runaway NextToken loop ends there).
const MAX_EC2_PAGES: usize = 200;

/// One EC2 query-protocol listing `op` with `filters` (`Filter.N.Name` /
/// `Filter.N.Value.M`), following NextToken; `parse` turns a page's XML into its items
/// and the next token.
async fn ec2_pages<T>(
    aws: &AwsContext,
    op: &'static str,
    filters: &[(&str, Vec<String>)],
    parse: fn(&str) -> Ec2Page<T>,
) -> Result<Vec<T>, AwsError> {
    let mut out = Vec::new();
    let mut next: Option<String> = None;
    for _ in 0..MAX_EC2_PAGES {
        let mut params = Vec::new();
        for (i, (name, values)) in filters.iter().enumerate() {
            params.push((format!("Filter.{}.Name", i + 1), (*name).to_owned()));
            for (j, v) in values.iter().enumerate() {
                params.push((format!("Filter.{}.Value.{}", i + 1, j + 1), v.clone()));
            }
        }
        if let Some(t) = &next {
            params.push(("NextToken".to_owned(), t.clone()));
        }
        let xml = aws.call_ec2(op, &params).await?;
        let (page, token) = parse(&xml).map_err(|e| invalid(op, e))?;
        out.extend(page);
        next = token;
        if next.is_none() {
            break;
        }
    }
    Ok(out)
}

/// The instances and the NextToken of one DescribeInstances response.
fn parse_describe_instances(xml: &str) -> Ec2Page<Ec2Instance> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("invalid XML: {e}"))?;
    let root = doc.root_element();
    if root.tag_name().name() != "DescribeInstancesResponse" {
        return Err(format!(
            "unexpected root element <{}>",
            root.tag_name().name()
        ));
    }
    let mut out = Vec::new();
    for reservation in items(child(root, "reservationSet")) {
        for inst in items(child(reservation, "instancesSet")) {
            let name = items(child(inst, "tagSet"))
                .into_iter()
                .find(|t| text(*t, "key") == "Name")
                .map(|t| text(t, "value"))
                .unwrap_or_default();
            let state = child(inst, "instanceState")
                .map(|s| text(s, "name"))
                .unwrap_or_default();
            let platform = match text(inst, "platformDetails") {
                p if p.is_empty() => text(inst, "platform"),
                p => p,
            };
            out.push(Ec2Instance {
                instance_id: text(inst, "instanceId"),
                name,
                private_dns: text(inst, "privateDnsName"),
                private_ip: text(inst, "privateIpAddress"),
                state,
                platform,
                vpc_id: text(inst, "vpcId"),
                subnet_id: text(inst, "subnetId"),
            });
        }
    }
    let token = Some(text(root, "nextToken")).filter(|t| !t.is_empty());
    Ok((out, token))
}

type Node<'a, 'i> = roxmltree::Node<'a, 'i>;

fn child<'a, 'i>(n: Node<'a, 'i>, name: &str) -> Option<Node<'a, 'i>> {
    n.children()
        .find(|c| c.is_element() && c.tag_name().name() == name)
}

fn text(n: Node<'_, '_>, name: &str) -> String {
    child(n, name)
        .and_then(|c| c.text())
        .unwrap_or("")
        .trim()
        .to_owned()
}

/// The `<item>` children of `n` (EC2's list encoding).
fn items<'a, 'i>(n: Option<Node<'a, 'i>>) -> Vec<Node<'a, 'i>> {
    n.into_iter()
        .flat_map(|n| n.children())
        .filter(|c| c.is_element() && c.tag_name().name() == "item")
        .collect()
}

/// An EC2 Instance Connect Endpoint as DescribeInstanceConnectEndpoints reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnectEndpoint {
    pub id: String,
    pub vpc_id: String,
    pub subnet_id: String,
    pub state: String,
    pub dns_name: String,
    pub fips_dns_name: String,
}

/// The endpoint states a tunnel can be opened through (the AWS CLI's list).
pub const USABLE_ENDPOINT_STATES: [&str; 4] = [
    "create-complete",
    "update-in-progress",
    "update-failed",
    "update-complete",
];

/// EC2 `DescribeInstanceConnectEndpoints` with `filters`, every page.
pub async fn describe_instance_connect_endpoints(
    aws: &AwsContext,
    filters: &[(&str, Vec<String>)],
) -> Result<Vec<ConnectEndpoint>, AwsError> {
    ec2_pages(
        aws,
        "DescribeInstanceConnectEndpoints",
        filters,
        parse_connect_endpoints,
    )
    .await
}

fn parse_connect_endpoints(xml: &str) -> Ec2Page<ConnectEndpoint> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("invalid XML: {e}"))?;
    let root = doc.root_element();
    if root.tag_name().name() != "DescribeInstanceConnectEndpointsResponse" {
        return Err(format!(
            "unexpected root element <{}>",
            root.tag_name().name()
        ));
    }
    let out = items(child(root, "instanceConnectEndpointSet"))
        .into_iter()
        .map(|e| ConnectEndpoint {
            id: text(e, "instanceConnectEndpointId"),
            vpc_id: text(e, "vpcId"),
            subnet_id: text(e, "subnetId"),
            state: text(e, "state"),
            dns_name: text(e, "dnsName"),
            fips_dns_name: text(e, "fipsDnsName"),
        })
        .collect();
    let token = Some(text(root, "nextToken")).filter(|t| !t.is_empty());
    Ok((out, token))
}

/// EC2 Instance Connect `SendSSHPublicKey`: the key is accepted by the instance for 60 s.
pub async fn send_ssh_public_key(
    aws: &AwsContext,
    instance_id: &str,
    os_user: &str,
    public_key: &str,
) -> Result<(), AwsError> {
    const OP: &str = "SendSSHPublicKey";
    let body = json!({
        "InstanceId": instance_id,
        "InstanceOSUser": os_user,
        "SSHPublicKey": public_key,
    });
    let out = aws
        .call_json(
            Service::Ec2InstanceConnect,
            OP,
            "AWSEC2InstanceConnectService.SendSSHPublicKey",
            &body,
        )
        .await?;
    match out.get("Success").and_then(Value::as_bool) {
        Some(false) => Err(invalid(OP, "the service answered Success: false")),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_describe_instances() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<DescribeInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
  <requestId>r</requestId>
  <reservationSet><item><instancesSet>
    <item><instanceId>i-1</instanceId><privateDnsName>ip-10-0-0-1.ec2.internal</privateDnsName>
      <privateIpAddress>10.0.0.1</privateIpAddress><instanceState><code>16</code><name>running</name></instanceState>
      <tagSet><item><key>env</key><value>x</value></item><item><key>Name</key><value>web-1</value></item></tagSet>
      <platformDetails>Linux/UNIX</platformDetails></item>
    <item><instanceId>i-2</instanceId><instanceState><name>stopped</name></instanceState></item>
  </instancesSet></item></reservationSet>
  <nextToken>more</nextToken>
</DescribeInstancesResponse>"#;
        let (v, next) = parse_describe_instances(xml).unwrap();
        assert_eq!(next.as_deref(), Some("more"));
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].name, "web-1");
        assert_eq!(v[0].private_ip, "10.0.0.1");
        assert_eq!(v[0].private_dns, "ip-10-0-0-1.ec2.internal");
        assert_eq!(v[0].state, "running");
        assert_eq!(v[0].platform, "Linux/UNIX");
        assert_eq!(v[1].instance_id, "i-2");
        assert_eq!(v[1].name, "");
        assert!(parse_describe_instances("<Response><Errors/></Response>").is_err());
        assert!(parse_describe_instances("not xml").is_err());
    }

    #[test]
    fn parses_connect_endpoints() {
        let xml = r#"<DescribeInstanceConnectEndpointsResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
  <requestId>r</requestId><instanceConnectEndpointSet><item>
  <instanceConnectEndpointId>eice-1</instanceConnectEndpointId><state>create-complete</state>
  <dnsName>eice-1.x.amazonaws.com</dnsName><fipsDnsName>eice-1.fips.x.amazonaws.com</fipsDnsName>
  <subnetId>subnet-1</subnetId><vpcId>vpc-1</vpcId></item></instanceConnectEndpointSet>
</DescribeInstanceConnectEndpointsResponse>"#;
        let (v, next) = parse_connect_endpoints(xml).unwrap();
        assert_eq!(next, None);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].dns_name, "eice-1.x.amazonaws.com");
        assert_eq!(v[0].fips_dns_name, "eice-1.fips.x.amazonaws.com");
        assert_eq!(
            (v[0].vpc_id.as_str(), v[0].subnet_id.as_str()),
            ("vpc-1", "subnet-1")
        );
        assert!(parse_connect_endpoints("<Response/>").is_err());
    }

    #[test]
    fn request_body_is_the_cli_shape() {
        let r =
            StartRequest::new("i-1".into(), Some("AWS-StartSSHSession")).param("portNumber", "22");
        assert_eq!(
            r.body(),
            json!({"Target": "i-1", "DocumentName": "AWS-StartSSHSession",
                   "Parameters": {"portNumber": ["22"]}})
        );
    }
}
