//! The AWS edge of the plugin: credentials, the SigV4-signed data-channel upgrade, and the
//! three API calls a session makes (SSM `ResumeSession` / `TerminateSession`, KMS
//! `GenerateDataKey`).
//!
//! Everything here acts as the identity the user's `aws` command used: the region (argv 2)
//! and profile (argv 4) the CLI passed, resolved through [`aws-config`]. Credential
//! resolution and SigV4 are the SDK's ([`aws-config`], [`aws-sigv4`]); this module only
//! builds three small AWS JSON 1.1 requests, which keeps the full `aws-sdk-ssm` crate (and
//! its hundreds of operations) out of the build.
//!
//! # Credentials
//!
//! Resolved lazily, on the first call that needs them, and again on every later call: a
//! reconnect an hour into a tunnel signs with fresh credentials. Temporary credentials
//! (SSO, assume-role, web identity, `credential_process`, containers, IMDS) are reused until
//! five minutes before they expire; static keys are re-read every time, so a rotated
//! credentials file is picked up.
//!
//! * **No profile in argv** (`--profile` not given): the SDK default chain, in this order:
//!   environment variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//!   `AWS_SESSION_TOKEN`); the profile named by `AWS_PROFILE` (default `default`) in the
//!   shared config and credentials files (`AWS_CONFIG_FILE`, `AWS_SHARED_CREDENTIALS_FILE`,
//!   default `~/.aws/config` and `~/.aws/credentials`), including static keys, `role_arn`
//!   with `source_profile` or `credential_source`, SSO (`sso_session` / legacy `sso_*` keys,
//!   token cache of `aws sso login`), `credential_process` and `web_identity_token_file`;
//!   web identity from `AWS_WEB_IDENTITY_TOKEN_FILE` + `AWS_ROLE_ARN`; the ECS/EKS container
//!   endpoint (`AWS_CONTAINER_CREDENTIALS_RELATIVE_URI` / `_FULL_URI`); EC2 instance metadata
//!   (IMDSv2, disabled by `AWS_EC2_METADATA_DISABLED=true`).
//! * **A profile in argv** (`--profile NAME`): that profile first, then the container
//!   endpoint and instance metadata. Credentials in environment variables are *not* used, as
//!   with the AWS CLI and the official plugin (an explicit `--profile` beats
//!   `AWS_ACCESS_KEY_ID`); signing with a different identity than the CLI's would make the
//!   service refuse the session.
//!
//! When nothing yields credentials, [`AwsContext::sign_websocket`] returns an error; the
//! caller logs it and connects unsigned, as the official plugin does (programs that call
//! StartSession themselves and hand the plugin only the response have no credentials).
//!
//! # Region
//!
//! argv 2; when empty, the SDK default region chain (`AWS_REGION`, `AWS_DEFAULT_REGION`,
//! the profile's `region`, instance metadata). It is the signing region of all three
//! services, `ssmmessages` included.
//!
//! # Endpoints
//!
//! SSM (`ResumeSession`, `TerminateSession`), first match wins:
//! 1. argv 6, the endpoint the AWS CLI used for StartSession (its `--endpoint-url`, or the
//!    regional endpoint, which already honours the CLI's own endpoint configuration), as the
//!    official plugin does. Exception: `aws ecs execute-command` passes the **ECS**
//!    endpoint (host `ecs.<region>…` / `ecs-fips.…`, or an ECS VPC endpoint); ECS does not
//!    serve `AmazonSSM.*` operations (the official plugin's ResumeSession/TerminateSession
//!    simply fail there), so such a URL is skipped and the rules below apply.
//! 2. `AWS_ENDPOINT_URL_SSM`, then `AWS_ENDPOINT_URL`;
//! 3. the profile's `services` section (`ssm = \n endpoint_url = …`), then its
//!    `endpoint_url` (steps 2–3 are off when `AWS_IGNORE_CONFIGURED_ENDPOINT_URLS=true` or
//!    the profile's `ignore_configured_endpoint_urls = true`);
//! 4. `https://ssm.<region>.<partition domain>` (`ssm-fips.` with `AWS_USE_FIPS_ENDPOINT`,
//!    the `api.aws` dual-stack domain with `AWS_USE_DUALSTACK_ENDPOINT`).
//!
//! KMS (`GenerateDataKey`): steps 2–4 with `AWS_ENDPOINT_URL_KMS` and `kms`.
//!
//! # HTTPS
//!
//! rustls with the `ring` provider. Trusted roots: the system store plus every certificate
//! in the PEM file named by `AWS_CA_BUNDLE` (an unreadable or malformed bundle is an error,
//! not silently ignored). `HTTPS_PROXY` / `HTTP_PROXY` / `NO_PROXY` (and lowercase forms)
//! apply to API calls and to the credential providers' own requests (STS, SSO, containers,
//! IMDS), as in the Go SDK the official plugin uses.
//!
//! # Retries
//!
//! The SDK's standard retry policy, applied to each API call: `max_attempts` from
//! `AWS_MAX_ATTEMPTS` / the profile's `max_attempts` (default 3 attempts in total),
//! exponential backoff with full jitter from 1 s (capped at 20 s), retrying transport
//! errors, timeouts, HTTP 5xx/429 and throttling or transient error codes. Each attempt is
//! signed afresh and bounded by a 30 s timeout.
//!
//! # Secrets
//!
//! Tokens, keys and credentials are never logged. The KMS data key is returned in a
//! [`Zeroizing`] buffer, and the response body and intermediate copies that held it are
//! zeroized as well.
//!
//! [`aws-config`]: https://docs.rs/aws-config
//! [`aws-sigv4`]: https://docs.rs/aws-sigv4

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aws_config::meta::credentials::CredentialsProviderChain;
use aws_config::provider_config::ProviderConfig;
use aws_config::BehaviorVersion;
use aws_credential_types::provider::error::CredentialsError;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_credential_types::Credentials;
use aws_runtime::env_config::file::EnvConfigFiles;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4::SigningParams;
use aws_smithy_async::rt::sleep::{SharedAsyncSleep, TokioSleep};
use aws_smithy_http_client::proxy::ProxyConfig;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode, TlsContext, TrustStore};
use aws_smithy_http_client::Connector;
use aws_smithy_runtime_api::client::http::{
    http_client_fn, HttpConnector, HttpConnectorSettings, SharedHttpClient, SharedHttpConnector,
};
use aws_smithy_types::body::SdkBody;
use aws_smithy_types::byte_stream::ByteStream;
use aws_smithy_types::retry::RetryConfig;
use aws_types::region::Region;
use aws_types::service_config::ServiceConfigKey;
use aws_types::SdkConfig;
use base64::Engine;
use rustls::pki_types::pem::PemObject;
use serde::Deserialize;
use tokio::sync::OnceCell;
use zeroize::Zeroizing;

/// Signing name of the message gateway (the data-channel WebSocket).
const SSMMESSAGES: &str = "ssmmessages";
const JSON_11: &str = "application/x-amz-json-1.1";
/// Query parameters whose presence marks a StreamUrl as presigned (never signed again).
const PRESIGN_PARAMS: [&str; 7] = [
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Signature",
    "X-Amz-Security-Token",
];
/// Bytes of the KMS data key a session uses (PROTOCOL.md §7.1).
const DATA_KEY_BYTES: usize = 64;
/// Temporary credentials are refreshed this long before they expire.
const REFRESH_MARGIN: Duration = Duration::from_secs(5 * 60);
/// Bound on one API request attempt (connect, send, whole response).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
/// TCP/TLS connect timeout when the configuration sets none (the SDK's default).
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_millis(3100);
/// Largest API response body accepted.
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

/// Why an AWS operation failed. Every message names what failed and, where it helps, what
/// to do about it.
#[derive(Clone, Debug, thiserror::Error)]
pub enum AwsError {
    #[error("no AWS credentials found for {}: {message}", describe_profile(.profile))]
    NoCredentials {
        profile: String,
        message: String,
        /// The provider failed in a way that may pass (timeout, STS/SSO/IMDS error).
        transient: bool,
    },
    #[error("no AWS region: the AWS CLI passed none and none is configured (set AWS_REGION or the profile's region)")]
    NoRegion,
    #[error("invalid AWS region {0:?}")]
    InvalidRegion(String),
    #[error("AWS_CA_BUNDLE {path}: {message}")]
    CaBundle { path: String, message: String },
    #[error("invalid URL {url:?}: {message}")]
    InvalidUrl { url: String, message: String },
    #[error("could not sign the request: {0}")]
    Signing(String),
    #[error("could not build the {operation} request: {message}")]
    Request {
        operation: &'static str,
        message: String,
    },
    /// The service answered with an error (`code` is the AWS error type, e.g.
    /// `AccessDeniedException`).
    #[error("{operation} failed: {code}: {message}")]
    Service {
        operation: &'static str,
        status: u16,
        code: String,
        message: String,
    },
    /// The request did not get an answer (connect, TLS, timeout, connection reset).
    #[error("{operation} failed: {endpoint}: {message}")]
    Transport {
        operation: &'static str,
        endpoint: String,
        message: String,
    },
    #[error("{operation} failed: unexpected response: {message}")]
    InvalidResponse {
        operation: &'static str,
        message: String,
    },
}

impl AwsError {
    /// Whether the same call may succeed later: transport failures, throttling and server
    /// errors, transient credential-provider failures. The caller decides how long to keep
    /// trying (each call already made the standard retry attempts).
    pub fn is_retryable(&self) -> bool {
        match self {
            AwsError::Transport { .. } => true,
            AwsError::Service { status, code, .. } => {
                *status >= 500 || *status == 429 || is_retryable_code(code)
            }
            AwsError::NoCredentials { transient, .. } => *transient,
            _ => false,
        }
    }
}

fn describe_profile(profile: &str) -> String {
    if profile.is_empty() {
        "the default credential chain".to_owned()
    } else {
        format!("profile {profile}")
    }
}

/// AWS access for one session: lazily resolved configuration, credentials, endpoints and
/// an HTTPS client. Cheap to clone.
#[derive(Clone)]
pub struct AwsContext {
    inner: Arc<Inner>,
}

struct Inner {
    options: Options,
    loaded: OnceCell<Loaded>,
    /// Temporary credentials, reused until shortly before they expire.
    cached: Mutex<Option<Credentials>>,
}

/// What the context is built from.
struct Options {
    /// argv 2 (may be empty).
    region: String,
    /// argv 4 (empty: the default chain).
    profile: String,
    /// argv 6 (may be empty).
    ssm_endpoint: String,
    /// Extra trusted roots: `AWS_CA_BUNDLE`.
    ca_bundle: Option<CaBundle>,
    /// Ignore the process environment, the default profile files, system roots and proxies
    /// (tests).
    isolated: bool,
    /// Replaces the shared config/credentials files (tests).
    profile_files: Option<EnvConfigFiles>,
    /// Replaces the credential chain (tests).
    credentials: Option<Credentials>,
}

enum CaBundle {
    Path(String),
    #[cfg(test)]
    Pem(Vec<u8>),
}

/// Configuration resolved on first use.
struct Loaded {
    region: Option<String>,
    credentials: Option<SharedCredentialsProvider>,
    ssm: Result<Endpoint, AwsError>,
    kms: Result<Endpoint, AwsError>,
    /// EC2 (`DescribeInstances`, for the standalone client's target names).
    ec2: Result<Endpoint, AwsError>,
    /// EC2 Instance Connect (`SendSSHPublicKey`).
    ec2_instance_connect: Result<Endpoint, AwsError>,
    connector: Connector,
    /// `AWS_USE_FIPS_ENDPOINT` / the profile's `use_fips_endpoint`.
    fips: bool,
    max_attempts: u32,
    initial_backoff: Duration,
    max_backoff: Duration,
}

/// A service endpoint: where requests go and how they are signed.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Endpoint {
    /// Full URL requests are POSTed to.
    url: String,
    /// `Host` header value (authority without a default port).
    host: String,
}

impl fmt::Debug for AwsContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.inner.options;
        f.debug_struct("AwsContext")
            .field("region", &o.region)
            .field("profile", &o.profile)
            .field("ssm_endpoint", &o.ssm_endpoint)
            .finish_non_exhaustive()
    }
}

/// The services this module calls (AWS JSON 1.1, EC2 alone speaks the EC2 query
/// protocol).
#[derive(Clone, Copy, Debug)]
pub enum Service {
    Ssm,
    Kms,
    Ec2,
    Ec2InstanceConnect,
}

impl Service {
    fn signing_name(self) -> &'static str {
        match self {
            Service::Ssm => "ssm",
            Service::Kms => "kms",
            Service::Ec2 => "ec2",
            Service::Ec2InstanceConnect => "ec2-instance-connect",
        }
    }
}

/// Content type of EC2 query-protocol requests.
const FORM: &str = "application/x-www-form-urlencoded; charset=utf-8";

impl AwsContext {
    /// A context for the region, profile and SSM endpoint the AWS CLI passed (argv 2, 4, 6).
    /// Nothing is resolved until the first call; `AWS_CA_BUNDLE` is read from the process
    /// environment.
    pub fn new(region: &str, profile: &str, ssm_endpoint: &str) -> AwsContext {
        let ca_bundle = std::env::var("AWS_CA_BUNDLE")
            .ok()
            .filter(|p| !p.trim().is_empty())
            .map(CaBundle::Path);
        AwsContext::from_options(Options {
            region: region.trim().to_owned(),
            profile: profile.trim().to_owned(),
            ssm_endpoint: ssm_endpoint.trim().to_owned(),
            ca_bundle,
            isolated: false,
            profile_files: None,
            credentials: None,
        })
    }

    fn from_options(options: Options) -> AwsContext {
        AwsContext {
            inner: Arc::new(Inner {
                options,
                loaded: OnceCell::new(),
                cached: Mutex::new(None),
            }),
        }
    }

    /// SigV4 headers (`authorization`, `x-amz-date` and, with temporary credentials,
    /// `x-amz-security-token`) for the WebSocket upgrade GET to `stream_url`: service
    /// `ssmmessages`, the session's region, empty body, `host` signed.
    ///
    /// `Ok(None)` when the URL is presigned (carries any `X-Amz-*` signing query parameter).
    /// `Err` when no credentials can be resolved or the URL cannot be parsed; the caller then
    /// connects unsigned, as the official plugin does.
    pub async fn sign_websocket(
        &self,
        stream_url: &str,
    ) -> Result<Option<Vec<(String, String)>>, AwsError> {
        let uri: http::Uri = stream_url.parse().map_err(|e| AwsError::InvalidUrl {
            url: redact_query(stream_url),
            message: format!("{e}"),
        })?;
        if uri.host().is_none() {
            return Err(AwsError::InvalidUrl {
                url: redact_query(stream_url),
                message: "no host".to_owned(),
            });
        }
        if is_presigned(stream_url) {
            return Ok(None);
        }
        let loaded = self.loaded().await?;
        let region = loaded.region()?;
        let credentials = self.credentials(loaded).await?;
        let headers = sign_request(
            "GET",
            stream_url,
            &[],
            b"",
            &credentials,
            region,
            SSMMESSAGES,
        )?;
        tracing::debug!(
            service = SSMMESSAGES,
            region,
            "signed the data-channel upgrade"
        );
        Ok(Some(headers))
    }

    /// `url` presigned for a GET with SigV4 query authentication (`X-Amz-Expires` =
    /// `expires`, `host` signed, the empty-payload hash, the session token signed): the
    /// EC2 Instance Connect Endpoint's `openTunnel` URL, fresh for every connection.
    pub async fn presign_get(
        &self,
        url: &str,
        service: &str,
        expires: Duration,
    ) -> Result<String, AwsError> {
        let loaded = self.loaded().await?;
        let region = loaded.region()?;
        let credentials = self.credentials(loaded).await?;
        let identity = credentials.into();
        let mut settings = SigningSettings::default();
        settings.signature_location = aws_sigv4::http_request::SignatureLocation::QueryParams;
        settings.expires_in = Some(expires);
        let params = SigningParams::builder()
            .identity(&identity)
            .region(region)
            .name(service)
            .time(SystemTime::now())
            .settings(settings)
            .build()
            .map_err(|e| AwsError::Signing(e.to_string()))?
            .into();
        let invalid = |message: String| AwsError::InvalidUrl {
            url: redact_query(url),
            message,
        };
        let mut request = http::Request::builder()
            .method("GET")
            .uri(url)
            .body(())
            .map_err(|e| invalid(e.to_string()))?;
        let signable =
            SignableRequest::new("GET", url, std::iter::empty(), SignableBody::Bytes(b""))
                .map_err(|e| AwsError::Signing(e.to_string()))?;
        let (instructions, _signature) = sign(signable, &params)
            .map_err(|e| AwsError::Signing(e.to_string()))?
            .into_parts();
        instructions.apply_to_request_http1x(&mut request);
        Ok(request.uri().to_string())
    }

    /// Whether FIPS endpoints are asked for (`AWS_USE_FIPS_ENDPOINT`, the profile).
    pub async fn use_fips(&self) -> Result<bool, AwsError> {
        Ok(self.loaded().await?.fips)
    }

    /// SSM `ResumeSession{SessionId}`: `Some((token, stream_url))` with the new token (and the
    /// new StreamUrl when the service returns one), `None` when the token is null, absent or
    /// empty: the session has ended or timed out.
    pub async fn resume_session(
        &self,
        session_id: &str,
    ) -> Result<Option<(String, Option<String>)>, AwsError> {
        #[derive(Deserialize)]
        struct Output {
            #[serde(rename = "TokenValue")]
            token_value: Option<String>,
            #[serde(rename = "StreamUrl")]
            stream_url: Option<String>,
        }
        const OP: &str = "ResumeSession";
        let body = serde_json::json!({ "SessionId": session_id });
        let response = self
            .call(Service::Ssm, OP, "AmazonSSM.ResumeSession", &body)
            .await?;
        let out: Output = parse_output(OP, &response)?;
        Ok(out.token_value.filter(|t| !t.is_empty()).map(|token| {
            let url = out.stream_url.filter(|u| !u.is_empty());
            (token, url)
        }))
    }

    /// SSM `TerminateSession{SessionId}`.
    pub async fn terminate_session(&self, session_id: &str) -> Result<(), AwsError> {
        let body = serde_json::json!({ "SessionId": session_id });
        self.call(
            Service::Ssm,
            "TerminateSession",
            "AmazonSSM.TerminateSession",
            &body,
        )
        .await?;
        Ok(())
    }

    /// KMS `GenerateDataKey{KeyId, NumberOfBytes: 64, EncryptionContext:
    /// {"aws:ssm:SessionId": session_id, "aws:ssm:TargetId": target_id}}`: the 64-byte
    /// plaintext data key (zeroized on drop; `ssm_wire::crypto::DataKey::from_slice` takes
    /// it) and the CiphertextBlob for the agent.
    pub async fn generate_data_key(
        &self,
        key_id: &str,
        session_id: &str,
        target_id: &str,
    ) -> Result<(Zeroizing<Vec<u8>>, Vec<u8>), AwsError> {
        #[derive(Deserialize)]
        struct Output {
            #[serde(rename = "Plaintext")]
            plaintext: Option<String>,
            #[serde(rename = "CiphertextBlob")]
            ciphertext_blob: Option<String>,
        }
        const OP: &str = "GenerateDataKey";
        let body = serde_json::json!({
            "KeyId": key_id,
            "NumberOfBytes": DATA_KEY_BYTES,
            "EncryptionContext": {
                "aws:ssm:SessionId": session_id,
                "aws:ssm:TargetId": target_id,
            },
        });
        let response = self
            .call(Service::Kms, OP, "TrentService.GenerateDataKey", &body)
            .await?;
        let out: Output = parse_output(OP, &response)?;
        let invalid = |message: String| AwsError::InvalidResponse {
            operation: OP,
            message,
        };
        let plaintext_b64 = Zeroizing::new(
            out.plaintext
                .ok_or_else(|| invalid("no Plaintext in the response".to_owned()))?,
        );
        let blob_b64 = out
            .ciphertext_blob
            .ok_or_else(|| invalid("no CiphertextBlob in the response".to_owned()))?;
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut plaintext = Zeroizing::new(Vec::with_capacity(DATA_KEY_BYTES));
        b64.decode_vec(plaintext_b64.as_bytes(), &mut plaintext)
            .map_err(|e| invalid(format!("Plaintext is not base64: {e}")))?;
        if plaintext.len() != DATA_KEY_BYTES {
            return Err(invalid(format!(
                "the data key has {} bytes, expected {DATA_KEY_BYTES}",
                plaintext.len()
            )));
        }
        let blob = b64
            .decode(blob_b64.as_bytes())
            .map_err(|e| invalid(format!("CiphertextBlob is not base64: {e}")))?;
        if blob.is_empty() {
            return Err(invalid("empty CiphertextBlob".to_owned()));
        }
        Ok((plaintext, blob))
    }

    /// The resolved configuration (loaded on first use; a failed load is retried next time).
    async fn loaded(&self) -> Result<&Loaded, AwsError> {
        self.inner
            .loaded
            .get_or_try_init(|| load(&self.inner.options))
            .await
    }

    /// Current credentials: cached temporary ones while fresh, otherwise from the provider.
    async fn credentials(&self, loaded: &Loaded) -> Result<Credentials, AwsError> {
        let profile = &self.inner.options.profile;
        if let Some(c) = lock(&self.inner.cached).as_ref() {
            if is_fresh(c, SystemTime::now()) {
                return Ok(c.clone());
            }
        }
        let provider = loaded
            .credentials
            .as_ref()
            .ok_or_else(|| AwsError::NoCredentials {
                profile: profile.clone(),
                message: "no credential provider is configured".to_owned(),
                transient: false,
            })?;
        let credentials = provider.provide_credentials().await.map_err(|e| {
            let transient = matches!(
                e,
                CredentialsError::ProviderTimedOut(_) | CredentialsError::ProviderError(_)
            );
            AwsError::NoCredentials {
                profile: profile.clone(),
                message: error_chain(&e),
                transient,
            }
        })?;
        if credentials.expiry().is_some() {
            *lock(&self.inner.cached) = Some(credentials.clone());
        }
        Ok(credentials)
    }

    /// One AWS JSON 1.1 call with the standard retry policy; returns the response body.
    async fn call(
        &self,
        service: Service,
        operation: &'static str,
        target: &'static str,
        body: &serde_json::Value,
    ) -> Result<Zeroizing<Vec<u8>>, AwsError> {
        let payload = serde_json::to_vec(body).map_err(|e| AwsError::Request {
            operation,
            message: e.to_string(),
        })?;
        self.call_raw(service, operation, JSON_11, Some(target), payload)
            .await
    }

    /// An AWS JSON 1.1 call for the standalone client (`X-Amz-Target` is `target`); the
    /// response body as JSON.
    pub async fn call_json(
        &self,
        service: Service,
        operation: &'static str,
        target: &'static str,
        body: &serde_json::Value,
    ) -> Result<serde_json::Value, AwsError> {
        let response = self.call(service, operation, target, body).await?;
        if response.is_empty() {
            return Ok(serde_json::Value::Object(Default::default()));
        }
        parse_output(operation, &response)
    }

    /// An EC2 query-protocol call (`Action=operation&Version=2016-11-15&…`, form-encoded
    /// POST); the response body (XML).
    pub async fn call_ec2(
        &self,
        operation: &'static str,
        params: &[(String, String)],
    ) -> Result<String, AwsError> {
        let mut form = format!("Action={operation}&Version=2016-11-15");
        for (k, v) in params {
            form.push('&');
            form.push_str(&form_encode(k));
            form.push('=');
            form.push_str(&form_encode(v));
        }
        let body = self
            .call_raw(Service::Ec2, operation, FORM, None, form.into_bytes())
            .await?;
        String::from_utf8(body.to_vec()).map_err(|_| AwsError::InvalidResponse {
            operation,
            message: "the response is not UTF-8".to_owned(),
        })
    }

    async fn call_raw(
        &self,
        service: Service,
        operation: &'static str,
        content_type: &'static str,
        target: Option<&'static str>,
        payload: Vec<u8>,
    ) -> Result<Zeroizing<Vec<u8>>, AwsError> {
        let loaded = self.loaded().await?;
        let region = loaded.region()?.to_owned();
        let endpoint = match service {
            Service::Ssm => &loaded.ssm,
            Service::Kms => &loaded.kms,
            Service::Ec2 => &loaded.ec2,
            Service::Ec2InstanceConnect => &loaded.ec2_instance_connect,
        };
        let endpoint = endpoint.clone()?;
        let credentials = self.credentials(loaded).await?;
        let mut attempt = 1u32;
        loop {
            let result = self
                .attempt(
                    loaded,
                    service,
                    operation,
                    (content_type, target),
                    &endpoint,
                    &region,
                    &credentials,
                    &payload,
                )
                .await;
            let e = match result {
                Err(e) if e.is_retryable() && attempt < loaded.max_attempts => e,
                other => return other,
            };
            let delay = backoff(attempt, loaded.initial_backoff, loaded.max_backoff);
            tracing::debug!(
                operation,
                attempt,
                delay_ms = delay.as_millis() as u64,
                "retrying after: {e}"
            );
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn attempt(
        &self,
        loaded: &Loaded,
        service: Service,
        operation: &'static str,
        (content_type, target): (&'static str, Option<&'static str>),
        endpoint: &Endpoint,
        region: &str,
        credentials: &Credentials,
        payload: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, AwsError> {
        let mut fixed = vec![
            ("host", endpoint.host.as_str()),
            ("content-type", content_type),
        ];
        if let Some(target) = target {
            fixed.push(("x-amz-target", target));
        }
        let signed = sign_request(
            "POST",
            &endpoint.url,
            &fixed,
            payload,
            credentials,
            region,
            service.signing_name(),
        )?;
        let mut request = aws_smithy_runtime_api::http::Request::new(SdkBody::from(payload));
        let header_error = |e: &dyn fmt::Display| AwsError::Request {
            operation,
            message: e.to_string(),
        };
        request.set_method("POST").map_err(|e| header_error(&e))?;
        request
            .set_uri(endpoint.url.as_str())
            .map_err(|e| header_error(&e))?;
        let headers = request.headers_mut();
        for (name, value) in fixed
            .iter()
            .map(|(n, v)| (*n, *v))
            .chain(signed.iter().map(|(n, v)| (n.as_str(), v.as_str())))
        {
            headers
                .try_insert(name.to_owned(), value.to_owned())
                .map_err(|e| header_error(&e))?;
        }
        headers
            .try_insert("user-agent", user_agent())
            .map_err(|e| header_error(&e))?;
        headers
            .try_insert("content-length", payload.len().to_string())
            .map_err(|e| header_error(&e))?;

        let transport = |message: String| AwsError::Transport {
            operation,
            endpoint: endpoint.url.clone(),
            message,
        };
        let exchange = async {
            let response = loaded
                .connector
                .call(request)
                .await
                .map_err(|e| transport(error_chain(&e)))?;
            let status = response.status().as_u16();
            let error_type = response
                .headers()
                .get("x-amzn-errortype")
                .map(str::to_owned);
            let body = read_body(response.into_body()).await.map_err(transport)?;
            Ok::<_, AwsError>((status, error_type, body))
        };
        let (status, error_type, body) = tokio::time::timeout(ATTEMPT_TIMEOUT, exchange)
            .await
            .map_err(|_| {
            transport(format!(
                "no response within {} s",
                ATTEMPT_TIMEOUT.as_secs()
            ))
        })??;
        tracing::debug!(operation, status, "AWS API response");
        if (200..300).contains(&status) {
            return Ok(body);
        }
        let (code, message) = parse_error(status, error_type.as_deref(), &body);
        Err(AwsError::Service {
            operation,
            status,
            code,
            message,
        })
    }
}

impl Loaded {
    fn region(&self) -> Result<&str, AwsError> {
        self.region.as_deref().ok_or(AwsError::NoRegion)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Temporary credentials stay usable until [`REFRESH_MARGIN`] before they expire; static
/// ones (no expiry) are re-resolved every time.
fn is_fresh(c: &Credentials, now: SystemTime) -> bool {
    match c.expiry() {
        Some(expiry) => expiry
            .duration_since(now)
            .map(|left| left > REFRESH_MARGIN)
            .unwrap_or(false),
        None => false,
    }
}

/// An error and its sources, joined with `: ` (a source already quoted by its parent is
/// skipped). Unlike the SDK's `DisplayErrorContext`, no `Debug` dump (which can include raw
/// responses) is appended.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !text.is_empty() && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

fn user_agent() -> String {
    format!(
        "session-manager-plugin-rs/{} os/{} lang/rust",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::OS
    )
}

/// Signs a request with SigV4 (signature in headers, security token included in the
/// canonical request, no `x-amz-content-sha256` header) and returns the headers to add.
fn sign_request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    credentials: &Credentials,
    region: &str,
    service: &str,
) -> Result<Vec<(String, String)>, AwsError> {
    let identity = credentials.clone().into();
    let params = SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(service)
        .time(SystemTime::now())
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| AwsError::Signing(e.to_string()))?
        .into();
    let request = SignableRequest::new(
        method,
        url,
        headers.iter().copied(),
        SignableBody::Bytes(body),
    )
    .map_err(|e| AwsError::Signing(e.to_string()))?;
    let (instructions, _signature) = sign(request, &params)
        .map_err(|e| AwsError::Signing(e.to_string()))?
        .into_parts();
    let (headers, _params) = instructions.into_parts();
    Ok(headers
        .into_iter()
        .map(|h| (h.name().to_owned(), h.value().to_owned()))
        .collect())
}

/// Whether the URL carries presigning query parameters (names compared case-insensitively,
/// after percent-decoding).
fn is_presigned(url: &str) -> bool {
    let Some((_, rest)) = url.split_once('?') else {
        return false;
    };
    let query = rest.split('#').next().unwrap_or("");
    query.split('&').any(|pair| {
        let name = percent_decode(pair.split('=').next().unwrap_or(""));
        PRESIGN_PARAMS.iter().any(|p| p.eq_ignore_ascii_case(&name))
    })
}

/// `application/x-www-form-urlencoded` value encoding: RFC 3986 unreserved characters
/// kept, the same encoding as a presigned URL's query values.
fn form_encode(s: &str) -> String {
    ssm_wire::eice::query_encode(s)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' && i + 2 < bytes.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(if b == b'+' { b' ' } else { b });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The URL without its query (which may hold a token), for error messages.
fn redact_query(url: &str) -> String {
    match url.split_once('?') {
        Some((base, _)) => format!("{base}?…"),
        None => url.to_owned(),
    }
}

/// Delay before attempt `attempt + 1`: full jitter over `initial · 2^(attempt-1)`, capped.
fn backoff(attempt: u32, initial: Duration, max: Duration) -> Duration {
    let exp = initial.saturating_mul(1u32 << (attempt.saturating_sub(1)).min(16));
    exp.min(max).mul_f64(jitter())
}

/// A uniformly distributed number in [0, 1) from the OS random source (via uuid v4).
fn jitter() -> f64 {
    const BITS: u32 = 52;
    let random = uuid::Uuid::new_v4().as_u128() as u64 & ((1u64 << BITS) - 1);
    random as f64 / (1u64 << BITS) as f64
}

/// Error codes the SDK's standard retry policy treats as throttling or transient.
fn is_retryable_code(code: &str) -> bool {
    matches!(
        code,
        "Throttling"
            | "ThrottlingException"
            | "ThrottledException"
            | "RequestThrottledException"
            | "TooManyRequestsException"
            | "ProvisionedThroughputExceededException"
            | "TransactionInProgressException"
            | "RequestLimitExceeded"
            | "BandwidthLimitExceeded"
            | "LimitExceededException"
            | "RequestThrottled"
            | "SlowDown"
            | "PriorRequestNotComplete"
            | "EC2ThrottledException"
            | "RequestTimeout"
            | "RequestTimeoutException"
            | "InternalError"
            | "InternalFailure"
            | "ServiceUnavailable"
    )
}

/// `(code, message)` of an AWS JSON error response: the code from `x-amzn-ErrorType` or
/// `__type` / `code` (namespace and `:…` suffix removed), the message from `message` /
/// `Message`.
fn parse_error(status: u16, error_type: Option<&str>, body: &[u8]) -> (String, String) {
    let json: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let field = |names: &[&str]| -> Option<String> {
        let obj = json.as_ref()?.as_object()?;
        names
            .iter()
            .find_map(|n| obj.get(*n).and_then(|v| v.as_str()))
            .map(str::to_owned)
    };
    // EC2 query-protocol errors are XML: `<Errors><Error><Code>…</Code><Message>…`.
    let xml = |tag: &str| -> Option<String> {
        let text = std::str::from_utf8(body).ok()?;
        let open = format!("<{tag}>");
        let start = text.find(&open)? + open.len();
        let end = text[start..].find(&format!("</{tag}>"))? + start;
        Some(text[start..end].trim().to_owned())
    };
    let raw_code = error_type
        .map(str::to_owned)
        .or_else(|| field(&["__type", "code", "Code"]))
        .or_else(|| xml("Code"))
        .unwrap_or_default();
    let code = sanitize_error_code(&raw_code);
    let code = if code.is_empty() {
        format!("HTTP {status}")
    } else {
        code
    };
    let message = field(&["message", "Message", "errorMessage"])
        .or_else(|| xml("Message"))
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| format!("HTTP status {status}"));
    (code, message)
}

fn sanitize_error_code(raw: &str) -> String {
    let code = raw.split(':').next().unwrap_or("");
    let code = code.rsplit('#').next().unwrap_or("");
    code.trim().to_owned()
}

fn parse_output<T: serde::de::DeserializeOwned>(
    operation: &'static str,
    body: &[u8],
) -> Result<T, AwsError> {
    serde_json::from_slice(body).map_err(|e| AwsError::InvalidResponse {
        operation,
        message: format!("invalid JSON: {e}"),
    })
}

/// Reads a response body (bounded by [`MAX_RESPONSE_BYTES`]) into a zeroizing buffer.
async fn read_body(body: SdkBody) -> Result<Zeroizing<Vec<u8>>, String> {
    let mut stream = ByteStream::new(body);
    let mut out = Zeroizing::new(Vec::new());
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| format!("reading the response: {}", error_chain(&e)))?;
        if out.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(format!("response larger than {MAX_RESPONSE_BYTES} bytes"));
        }
        // Grow without leaving unzeroized copies behind.
        if out.capacity() < out.len() + chunk.len() {
            let mut bigger = Zeroizing::new(Vec::with_capacity((out.len() + chunk.len()) * 2));
            bigger.extend_from_slice(&out);
            out = bigger;
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// Builds the configuration: HTTPS client, region, credential provider, endpoints, retries.
async fn load(options: &Options) -> Result<Loaded, AwsError> {
    // AWS_CA_BUNDLE is checked now, so a bad one fails the session with its own error;
    // the system roots are loaded only when a connector is first needed (most sessions
    // sign with local credentials and make no API call).
    let bundle = ca_bundle_pem(options)?;
    let http = HttpFactory {
        tls: Arc::default(),
        bundle: bundle.map(Arc::new),
        native: !options.isolated,
        proxy: !options.isolated,
    };
    let shared_client = http.shared_client();

    let mut loader =
        aws_config::defaults(BehaviorVersion::latest()).http_client(shared_client.clone());
    if !options.region.is_empty() {
        loader = loader.region(Region::new(options.region.clone()));
    }
    if !options.profile.is_empty() {
        loader = loader.profile_name(options.profile.clone());
    }
    if options.isolated {
        loader = loader.empty_test_environment();
    }
    if let Some(files) = &options.profile_files {
        loader = loader.profile_files(files.clone());
    }
    let explicit_profile = !options.profile.is_empty();
    if let Some(c) = &options.credentials {
        loader = loader.credentials_provider(c.clone());
    } else if explicit_profile {
        // Built below, once the region is known.
        loader = loader.no_credentials();
    }
    let sdk = loader.load().await;

    let region = sdk.region().map(|r| r.as_ref().to_owned());
    if let Some(r) = &region {
        if !is_valid_region(r) {
            return Err(AwsError::InvalidRegion(r.clone()));
        }
    }
    let credentials = if options.credentials.is_none() && explicit_profile {
        Some(explicit_profile_chain(options, &sdk, shared_client))
    } else {
        sdk.credentials_provider()
    };

    let fips = sdk.use_fips().unwrap_or(false);
    let dual_stack = sdk.use_dual_stack().unwrap_or(false);
    let configured = |service_id: &str| {
        sdk.service_config().and_then(|c| {
            c.load_config(
                ServiceConfigKey::builder()
                    .service_id(service_id)
                    .env("AWS_ENDPOINT_URL")
                    .profile("endpoint_url")
                    .build()
                    .ok()?,
            )
        })
    };
    let ssm = resolve_endpoint(
        "ssm",
        Some(options.ssm_endpoint.as_str()),
        configured("SSM"),
        region.as_deref(),
        fips,
        dual_stack,
    );
    let kms = resolve_endpoint(
        "kms",
        None,
        configured("KMS"),
        region.as_deref(),
        fips,
        dual_stack,
    );
    let ec2 = resolve_endpoint(
        "ec2",
        None,
        configured("EC2"),
        region.as_deref(),
        fips,
        dual_stack,
    );
    let ec2_instance_connect = resolve_endpoint(
        "ec2-instance-connect",
        None,
        configured("EC2 Instance Connect"),
        region.as_deref(),
        fips,
        dual_stack,
    );
    if let Ok(e) = &ssm {
        tracing::debug!(endpoint = %e.url, "SSM endpoint");
    }
    if let Ok(e) = &kms {
        tracing::debug!(endpoint = %e.url, "KMS endpoint");
    }

    let retry = sdk
        .retry_config()
        .cloned()
        .unwrap_or_else(RetryConfig::standard);
    let connect_timeout = sdk
        .timeout_config()
        .and_then(|t| t.connect_timeout())
        .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    let settings = HttpConnectorSettings::builder()
        .connect_timeout(connect_timeout)
        .build();
    Ok(Loaded {
        region,
        credentials,
        ssm,
        kms,
        ec2,
        ec2_instance_connect,
        connector: http.connector(&settings, None),
        fips,
        max_attempts: retry.max_attempts().max(1),
        initial_backoff: retry.initial_backoff(),
        max_backoff: retry.max_backoff(),
    })
}

/// The chain for an explicit `--profile`: the profile, then container credentials and
/// instance metadata; environment-variable credentials are skipped (AWS CLI semantics).
fn explicit_profile_chain(
    options: &Options,
    sdk: &SdkConfig,
    client: SharedHttpClient,
) -> SharedCredentialsProvider {
    let mut conf = ProviderConfig::without_region()
        .with_region(sdk.region().cloned())
        .with_http_client(client)
        .with_sleep_impl(TokioSleep::new())
        .with_behavior_version(Some(BehaviorVersion::latest()));
    if let Some(retry) = sdk.retry_config() {
        conf = conf.with_retry_config(retry.clone());
    }
    if let Some(timeouts) = sdk.timeout_config() {
        conf = conf.with_timeout_config(timeouts.clone());
    }
    let mut profile = aws_config::profile::ProfileFileCredentialsProvider::builder()
        .configure(&conf)
        .profile_name(options.profile.clone());
    if let Some(files) = &options.profile_files {
        profile = profile.profile_files(files.clone());
    }
    let mut chain = CredentialsProviderChain::first_try("Profile", profile.build());
    // Isolated (tests): the container and IMDS providers would read the real environment.
    if !options.isolated {
        chain = chain
            .or_else(
                "EcsContainer",
                aws_config::ecs::EcsCredentialsProvider::builder()
                    .configure(&conf)
                    .build(),
            )
            .or_else(
                "Ec2InstanceMetadata",
                aws_config::imds::credentials::ImdsCredentialsProvider::builder()
                    .configure(&conf)
                    .build(),
            );
    }
    SharedCredentialsProvider::new(chain)
}

/// Region names end up in host names: allow only what AWS region names use.
fn is_valid_region(region: &str) -> bool {
    !region.is_empty()
        && region.len() <= 64
        && region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !region.starts_with('-')
        && !region.ends_with('-')
}

/// Endpoint precedence (module docs): `argv` (unless it is an ECS endpoint), then the
/// configured URL (service env > global env > service profile > global profile, already
/// merged by the SDK), then the regional default.
fn resolve_endpoint(
    service: &str,
    argv: Option<&str>,
    configured: Option<String>,
    region: Option<&str>,
    fips: bool,
    dual_stack: bool,
) -> Result<Endpoint, AwsError> {
    if let Some(url) = argv.filter(|u| !u.is_empty()) {
        match parse_endpoint(url) {
            Ok(e) if is_ecs_host(&e.host) => {
                tracing::debug!(
                    "argv endpoint {url} is an ECS endpoint (aws ecs execute-command); using the SSM endpoint instead"
                );
            }
            Ok(e) => return Ok(e),
            Err(e) => tracing::warn!("ignoring the SSM endpoint passed by the AWS CLI: {e}"),
        }
    }
    if let Some(url) = configured.filter(|u| !u.trim().is_empty()) {
        return parse_endpoint(url.trim());
    }
    let region = region.ok_or(AwsError::NoRegion)?;
    parse_endpoint(&default_endpoint(service, region, fips, dual_stack))
}

fn parse_endpoint(url: &str) -> Result<Endpoint, AwsError> {
    let invalid = |message: &str| AwsError::InvalidUrl {
        url: url.to_owned(),
        message: message.to_owned(),
    };
    let uri: http::Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| invalid(&e.to_string()))?;
    let scheme = uri.scheme_str().ok_or_else(|| invalid("no scheme"))?;
    if scheme != "https" && scheme != "http" {
        return Err(invalid("the scheme must be https or http"));
    }
    let authority = uri.authority().ok_or_else(|| invalid("no host"))?;
    let host = match authority.port_u16() {
        Some(443) if scheme == "https" => authority.host().to_owned(),
        Some(80) if scheme == "http" => authority.host().to_owned(),
        _ => authority.as_str().to_owned(),
    };
    if host.contains('@') {
        return Err(invalid("credentials in endpoint URLs are not supported"));
    }
    let path = match uri.path() {
        "" => "/",
        p => p,
    };
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    Ok(Endpoint {
        url: format!("{scheme}://{}{path}{query}", authority.as_str()),
        host,
    })
}

/// `ecs.<region>.amazonaws.com`, `ecs-fips.…`, or an ECS interface VPC endpoint
/// (`vpce-….ecs.<region>.vpce.amazonaws.com`).
fn is_ecs_host(host: &str) -> bool {
    let host = host.split(':').next().unwrap_or("").to_ascii_lowercase();
    let first = host.split('.').next().unwrap_or("");
    first == "ecs" || first == "ecs-fips" || (host.contains(".ecs.") && host.contains(".vpce."))
}

/// The regional endpoint of `service` (`ssm`, `kms`) by partition.
fn default_endpoint(service: &str, region: &str, fips: bool, dual_stack: bool) -> String {
    let (domain, dual_domain) = if region.starts_with("cn-") {
        ("amazonaws.com.cn", Some("api.amazonwebservices.com.cn"))
    } else if region.starts_with("us-isob-") {
        ("sc2s.sgov.gov", None)
    } else if region.starts_with("us-isof-") {
        ("csp.hci.ic.gov", None)
    } else if region.starts_with("us-iso-") {
        ("c2s.ic.gov", None)
    } else if region.starts_with("eu-isoe-") {
        ("cloud.adc-e.uk", None)
    } else if region.starts_with("eusc-") {
        ("amazonaws.eu", None)
    } else {
        ("amazonaws.com", Some("api.aws"))
    };
    let domain = if dual_stack {
        dual_domain.unwrap_or(domain)
    } else {
        domain
    };
    let fips = if fips { "-fips" } else { "" };
    format!("https://{service}{fips}.{region}.{domain}")
}

/// The PEM of `AWS_CA_BUNDLE`, validated (the HTTP client panics on malformed
/// certificates).
fn ca_bundle_pem(options: &Options) -> Result<Option<Vec<u8>>, AwsError> {
    let Some(bundle) = &options.ca_bundle else {
        return Ok(None);
    };
    let (name, pem) = match bundle {
        CaBundle::Path(path) => (
            path.clone(),
            std::fs::read(path).map_err(|e| AwsError::CaBundle {
                path: path.clone(),
                message: e.to_string(),
            })?,
        ),
        #[cfg(test)]
        CaBundle::Pem(pem) => ("(test bundle)".to_owned(), pem.clone()),
    };
    let ca_error = |message: String| AwsError::CaBundle {
        path: name.clone(),
        message,
    };
    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ca_error(format!("not a PEM certificate bundle: {e}")))?;
    if certs.is_empty() {
        return Err(ca_error("no certificates in the file".to_owned()));
    }
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert)
            .map_err(|e| ca_error(format!("unusable certificate: {e}")))?;
    }
    Ok(Some(pem))
}

/// Builds HTTPS connectors (rustls/ring, our roots, proxies from the environment) for this
/// module's calls and, through [`SharedHttpClient`], for the credential providers.
#[derive(Clone, Debug)]
struct HttpFactory {
    /// Built on the first connector.
    tls: Arc<std::sync::OnceLock<TlsContext>>,
    /// `AWS_CA_BUNDLE`, validated.
    bundle: Option<Arc<Vec<u8>>>,
    /// Trust the system roots too.
    native: bool,
    proxy: bool,
}

impl HttpFactory {
    /// Trusted roots for API calls: the system roots from the process-wide loader (read
    /// once, shared with the data channel, where the SDK's own would read them again)
    /// plus `AWS_CA_BUNDLE`.
    fn tls(&self) -> TlsContext {
        self.tls
            .get_or_init(|| {
                let mut store = TrustStore::empty().with_native_roots(false);
                if self.native {
                    store = store.with_pem_certificate(crate::roots::system().pem.clone());
                }
                if let Some(pem) = &self.bundle {
                    store = store.with_pem_certificate(pem.as_slice().to_vec());
                }
                TlsContext::builder()
                    .with_trust_store(store)
                    .build()
                    .unwrap_or_default()
            })
            .clone()
    }

    fn connector(
        &self,
        settings: &HttpConnectorSettings,
        sleep: Option<SharedAsyncSleep>,
    ) -> Connector {
        let mut builder = Connector::builder()
            .connector_settings(settings.clone())
            .enable_tcp_nodelay(true)
            .proxy_config(if self.proxy {
                ProxyConfig::from_env()
            } else {
                ProxyConfig::disabled()
            });
        builder.set_sleep_impl(Some(
            sleep.unwrap_or_else(|| SharedAsyncSleep::new(TokioSleep::new())),
        ));
        builder
            .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
            .tls_context(self.tls())
            .build()
    }

    /// An [`SharedHttpClient`] that caches one connector per timeout setting (so the
    /// providers' connection pools survive between calls).
    fn shared_client(&self) -> SharedHttpClient {
        type Key = (Option<Duration>, Option<Duration>);
        let factory = self.clone();
        let cache: Arc<Mutex<HashMap<Key, SharedHttpConnector>>> = Arc::default();
        http_client_fn(move |settings, components| {
            let key = (settings.connect_timeout(), settings.read_timeout());
            lock(&cache)
                .entry(key)
                .or_insert_with(|| {
                    SharedHttpConnector::new(factory.connector(settings, components.sleep_impl()))
                })
                .clone()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_runtime::env_config::file::EnvConfigFileKind;
    use ssm_sim::{SimConfig, Simulator, StartSessionRequest};

    const AKID: &str = "AKIDEXAMPLE";
    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
    const TOKEN: &str = "session-token-example";

    /// Test setup: nothing from the process environment, the default profile files, the
    /// system roots or proxies; IMDS pointed at a closed loopback port.
    struct Setup {
        region: &'static str,
        profile: &'static str,
        ssm_endpoint: String,
        config: String,
        credentials: Option<Credentials>,
        ca_pem: Option<Vec<u8>>,
    }

    impl Setup {
        fn new(sim: &Simulator) -> Setup {
            Setup {
                region: "us-east-1",
                profile: "",
                ssm_endpoint: sim.endpoint_url(),
                // KMS (and SSM without argv) reach the simulator through the profile's
                // endpoint_url; IMDS, should the chain get that far, fails fast on loopback.
                config: format!(
                    "[default]\nendpoint_url = {}\nec2_metadata_service_endpoint = http://127.0.0.1:9\n",
                    sim.endpoint_url()
                ),
                credentials: Some(Credentials::new(AKID, SECRET, Some(TOKEN.into()), None, "test")),
                ca_pem: sim
                    .ca_pem_path()
                    .map(|p| std::fs::read(p).expect("sim CA")),
            }
        }

        fn build(self) -> AwsContext {
            let files = EnvConfigFiles::builder()
                .with_contents(EnvConfigFileKind::Config, self.config)
                .with_contents(EnvConfigFileKind::Credentials, "")
                .build();
            AwsContext::from_options(Options {
                region: self.region.to_owned(),
                profile: self.profile.to_owned(),
                ssm_endpoint: self.ssm_endpoint,
                ca_bundle: self.ca_pem.map(CaBundle::Pem),
                isolated: true,
                profile_files: Some(files),
                credentials: self.credentials,
            })
        }
    }

    async fn sim() -> Simulator {
        Simulator::start(SimConfig {
            tls: true,
            ..Default::default()
        })
        .await
        .expect("simulator")
    }

    fn credential_scope(authorization: &str) -> String {
        // AWS4-HMAC-SHA256 Credential=AKID/20250101/us-east-1/ssm/aws4_request, SignedHeaders=…
        let cred = authorization
            .split("Credential=")
            .nth(1)
            .and_then(|s| s.split(',').next())
            .unwrap_or("");
        cred.split_once('/')
            .map(|(_, s)| s.to_owned())
            .unwrap_or_default()
    }

    fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    #[tokio::test]
    async fn signs_the_websocket_upgrade() {
        let sim = sim().await;
        let resp = sim.start_session(StartSessionRequest::shell()).unwrap();
        let ctx = Setup::new(&sim).build();
        let headers = ctx
            .sign_websocket(&resp.stream_url)
            .await
            .expect("signing works")
            .expect("not presigned");
        let auth = header(&headers, "authorization").expect("authorization");
        assert!(
            auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/"),
            "{auth}"
        );
        let scope = credential_scope(auth);
        assert!(
            scope.ends_with("/us-east-1/ssmmessages/aws4_request"),
            "{scope}"
        );
        assert!(
            auth.contains("SignedHeaders=host;x-amz-date;x-amz-security-token"),
            "{auth}"
        );
        assert!(header(&headers, "x-amz-date").is_some());
        assert_eq!(header(&headers, "x-amz-security-token"), Some(TOKEN));
        assert!(header(&headers, "x-amz-content-sha256").is_none());
        assert!(!auth.contains(SECRET));
    }

    #[tokio::test]
    async fn signing_uses_profile_credentials_and_region() {
        let sim = sim().await;
        let mut setup = Setup::new(&sim);
        setup.region = "eu-west-3";
        setup.profile = "dev";
        setup.credentials = None;
        setup.config.push_str(
            "[profile dev]\naws_access_key_id = AKIDPROFILE\naws_secret_access_key = secret\n",
        );
        let ctx = setup.build();
        let headers = ctx
            .sign_websocket("wss://ssmmessages.eu-west-3.amazonaws.com/v1/data-channel/s-1?role=publish_subscribe&cell-number=AAEA")
            .await
            .expect("profile credentials")
            .expect("not presigned");
        let auth = header(&headers, "authorization").unwrap();
        assert!(auth.contains("Credential=AKIDPROFILE/"), "{auth}");
        assert!(credential_scope(auth).ends_with("/eu-west-3/ssmmessages/aws4_request"));
        // Static keys: no session token.
        assert!(header(&headers, "x-amz-security-token").is_none());
        assert!(auth.contains("SignedHeaders=host;x-amz-date,"), "{auth}");
    }

    #[tokio::test]
    async fn presigned_urls_are_left_alone() {
        let sim = sim().await;
        let ctx = Setup::new(&sim).build();
        for url in [
            "wss://ssmmessages.us-east-1.amazonaws.com/v1/data-channel/s-1?role=publish_subscribe&X-Amz-Algorithm=AWS4-HMAC-SHA256",
            "wss://h/v1/data-channel/s-1?X-Amz-Signature=abc",
            "wss://h/v1/data-channel/s-1?a=b&x-amz-security-token=t",
            "wss://h/v1/data-channel/s-1?X-Amz-Expires",
            "wss://h/v1/data-channel/s-1?X%2DAmz-Credential=x",
        ] {
            assert_eq!(ctx.sign_websocket(url).await.unwrap(), None, "{url}");
        }
        assert!(!is_presigned(
            "wss://h/p?role=publish_subscribe&cell-number=X-Amz-Date"
        ));
        assert!(!is_presigned("wss://h/X-Amz-Date"));
        // Presigned URLs are not signed, so no credentials are needed for them.
        assert!(sim.api_calls().is_empty());
    }

    #[tokio::test]
    async fn no_credentials_is_an_error() {
        let sim = sim().await;
        let mut setup = Setup::new(&sim);
        setup.credentials = None;
        let ctx = setup.build();
        let started = std::time::Instant::now();
        let err = ctx
            .sign_websocket("wss://ssmmessages.us-east-1.amazonaws.com/v1/data-channel/s-1")
            .await
            .expect_err("no credentials anywhere");
        assert!(matches!(err, AwsError::NoCredentials { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.starts_with("no AWS credentials found for the default credential chain: "),
            "{text}"
        );
        // Readable: the chain's attempts, no Debug dump.
        assert!(text.contains("Ec2InstanceMetadata"), "{text}");
        assert!(!text.contains("CredentialsNotLoaded("), "{text}");
        assert!(!err.is_retryable());
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "took {:?}",
            started.elapsed()
        );

        // An explicit profile that does not exist names the profile.
        let mut setup = Setup::new(&sim);
        setup.credentials = None;
        setup.profile = "missing";
        let err = setup
            .build()
            .sign_websocket("wss://ssmmessages.us-east-1.amazonaws.com/v1/data-channel/s-1")
            .await
            .expect_err("unknown profile");
        let text = err.to_string();
        assert!(
            text.starts_with("no AWS credentials found for profile missing: "),
            "{text}"
        );
        assert!(text.contains("missing"), "{text}");
    }

    #[tokio::test]
    async fn resume_session_returns_token_and_url() {
        let sim = sim().await;
        let resp = sim.start_session(StartSessionRequest::shell()).unwrap();
        let ctx = Setup::new(&sim).build();
        let (token, url) = ctx
            .resume_session(&resp.session_id)
            .await
            .expect("ResumeSession")
            .expect("session is alive");
        assert!(!token.is_empty());
        assert!(url.expect("stream url").contains(&resp.session_id));

        let calls = sim.api_calls();
        let call = calls.last().unwrap();
        assert_eq!(call.target, "AmazonSSM.ResumeSession");
        assert_eq!(call.status, 200);
        let body: serde_json::Value = serde_json::from_str(&call.body).unwrap();
        assert_eq!(body, serde_json::json!({ "SessionId": resp.session_id }));
        assert_eq!(call.header("content-type"), Some(JSON_11));
        assert_eq!(call.header("x-amz-security-token"), Some(TOKEN));
        assert!(call.header("x-amz-date").is_some());
        let auth = call.header("authorization").unwrap();
        assert!(
            credential_scope(auth).ends_with("/us-east-1/ssm/aws4_request"),
            "{auth}"
        );
        assert!(
            auth.contains("content-type;host;x-amz-date;x-amz-security-token;x-amz-target"),
            "{auth}"
        );
    }

    #[tokio::test]
    async fn resume_of_ended_session_is_none_and_terminate_is_recorded() {
        let sim = sim().await;
        let resp = sim.start_session(StartSessionRequest::shell()).unwrap();
        let ctx = Setup::new(&sim).build();
        ctx.terminate_session(&resp.session_id)
            .await
            .expect("TerminateSession");
        let calls = sim.api_calls();
        let call = calls.last().unwrap();
        assert_eq!(call.target, "AmazonSSM.TerminateSession");
        assert_eq!(call.status, 200);
        assert!(call.body.contains(&resp.session_id));
        assert_eq!(ctx.resume_session(&resp.session_id).await.unwrap(), None);
        assert_eq!(ctx.resume_session("unknown-session").await.unwrap(), None);
    }

    #[tokio::test]
    async fn generate_data_key_sends_the_encryption_context() {
        let sim = sim().await;
        let resp = sim.start_session(StartSessionRequest::shell()).unwrap();
        let ctx = Setup::new(&sim).build();
        let (plaintext, blob) = ctx
            .generate_data_key("alias/session-key", &resp.session_id, "i-0123456789abcdef0")
            .await
            .expect("GenerateDataKey");
        assert_eq!(plaintext.len(), 64);
        let requests = sim.kms_requests();
        assert_eq!(requests.len(), 1);
        let req = &requests[0];
        assert_eq!(req.key_id, "alias/session-key");
        assert_eq!(req.number_of_bytes, 64);
        assert_eq!(req.ciphertext_blob, blob);
        let context: Vec<(&str, &str)> = req
            .encryption_context
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            context,
            [
                ("aws:ssm:SessionId", resp.session_id.as_str()),
                ("aws:ssm:TargetId", "i-0123456789abcdef0")
            ]
        );
        let call = sim.api_calls().pop().unwrap();
        assert_eq!(call.target, "TrentService.GenerateDataKey");
        let auth = call.header("authorization").unwrap();
        assert!(
            credential_scope(auth).ends_with("/us-east-1/kms/aws4_request"),
            "{auth}"
        );
    }

    #[tokio::test]
    async fn service_errors_are_readable() {
        let sim = sim().await;
        let ctx = Setup::new(&sim).build();
        let err = ctx
            .generate_data_key("", "s-1", "i-1")
            .await
            .expect_err("empty key id is refused");
        assert_eq!(
            err.to_string(),
            "GenerateDataKey failed: ValidationException: KeyId is required"
        );
        // Client errors are not retried.
        assert_eq!(sim.api_calls().len(), 1);
    }

    #[tokio::test]
    async fn ca_bundle_is_required_for_the_simulator() {
        let sim = sim().await;
        let mut setup = Setup::new(&sim);
        setup.ca_pem = None;
        let err = setup
            .build()
            .terminate_session("s-1")
            .await
            .expect_err("untrusted certificate");
        assert!(
            matches!(
                err,
                AwsError::Transport {
                    operation: "TerminateSession",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(sim.api_calls().is_empty());

        let mut setup = Setup::new(&sim);
        setup.ca_pem = Some(b"not a certificate".to_vec());
        let err = setup
            .build()
            .terminate_session("s-1")
            .await
            .expect_err("bad bundle");
        assert!(matches!(err, AwsError::CaBundle { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn connection_errors_are_reported() {
        // A closed port: every attempt fails to connect.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let sim = sim().await;
        let mut setup = Setup::new(&sim);
        setup.ssm_endpoint = format!("http://127.0.0.1:{port}");
        setup.config = "[default]\nmax_attempts = 2\n".to_owned();
        let err = setup
            .build()
            .terminate_session("s-1")
            .await
            .expect_err("nothing listens");
        assert!(matches!(err, AwsError::Transport { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.starts_with(&format!(
                "TerminateSession failed: http://127.0.0.1:{port}/: "
            )),
            "{text}"
        );
        assert!(
            text.contains("Connection refused") && !text.contains("ConnectorError {"),
            "{text}"
        );
        assert!(err.is_retryable());
    }

    /// A loopback HTTP server answering every request with `status` and `body`; counts
    /// requests.
    async fn fixed_server(
        status: &'static str,
        body: &'static str,
    ) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = count.clone();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        // One request per connection: head plus Content-Length body.
                        let Ok(n) = tcp.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let text = String::from_utf8_lossy(&buf).to_string();
                        if let Some(end) = text.find("\r\n\r\n") {
                            let len = text[..end]
                                .lines()
                                .find_map(|l| {
                                    let (k, v) = l.split_once(':')?;
                                    k.eq_ignore_ascii_case("content-length")
                                        .then(|| v.trim().parse::<usize>().ok())?
                                })
                                .unwrap_or(0);
                            if buf.len() >= end + 4 + len {
                                break;
                            }
                        }
                    }
                    counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let response = format!(
                        "HTTP/1.1 {status}\r\ncontent-type: {JSON_11}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = tcp.write_all(response.as_bytes()).await;
                    let _ = tcp.shutdown().await;
                });
            }
        });
        (url, count)
    }

    #[tokio::test]
    async fn throttling_and_server_errors_are_retried() {
        let sim = sim().await;
        for (status, body, code) in [
            (
                "503 Service Unavailable",
                r#"{"__type":"ServiceUnavailable","message":"try later"}"#,
                "ServiceUnavailable",
            ),
            (
                "400 Bad Request",
                r#"{"__type":"ThrottlingException","message":"Rate exceeded"}"#,
                "ThrottlingException",
            ),
        ] {
            let (url, count) = fixed_server(status, body).await;
            let mut setup = Setup::new(&sim);
            setup.ssm_endpoint = url;
            // max_attempts from the profile, as AWS_MAX_ATTEMPTS would set it.
            setup.config = "[default]\nmax_attempts = 2\n".to_owned();
            let err = setup
                .build()
                .resume_session("s-1")
                .await
                .expect_err("the server always fails");
            assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 2, "{err}");
            assert!(
                matches!(&err, AwsError::Service { code: c, .. } if c == code),
                "{err:?}"
            );
            assert!(err.is_retryable());
        }

        // Client errors are final: one attempt.
        let (url, count) = fixed_server(
            "400 Bad Request",
            r#"{"__type":"com.amazonaws.ssm#InvalidParameters","message":"bad id"}"#,
        )
        .await;
        let mut setup = Setup::new(&sim);
        setup.ssm_endpoint = url;
        let err = setup.build().terminate_session("s-1").await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "TerminateSession failed: InvalidParameters: bad id"
        );
        assert!(!err.is_retryable());
        assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn endpoint_precedence() {
        let ep = |argv: Option<&str>, configured: Option<&str>| {
            resolve_endpoint(
                "ssm",
                argv,
                configured.map(str::to_owned),
                Some("us-west-2"),
                false,
                false,
            )
            .unwrap()
            .url
        };
        assert_eq!(
            ep(Some("http://127.0.0.1:4566"), Some("https://x")),
            "http://127.0.0.1:4566/"
        );
        assert_eq!(
            ep(Some(""), Some("https://vpce.example")),
            "https://vpce.example/"
        );
        assert_eq!(ep(None, None), "https://ssm.us-west-2.amazonaws.com/");
        // aws ecs execute-command passes the ECS endpoint: skipped.
        assert_eq!(
            ep(Some("https://ecs.us-west-2.amazonaws.com"), None),
            "https://ssm.us-west-2.amazonaws.com/"
        );
        assert_eq!(
            ep(
                Some("https://ecs-fips.us-west-2.amazonaws.com"),
                Some("https://ssm.example/")
            ),
            "https://ssm.example/"
        );
        assert!(is_ecs_host(
            "vpce-0abc-1234.ecs.us-west-2.vpce.amazonaws.com"
        ));
        assert!(!is_ecs_host("ssm.us-west-2.amazonaws.com"));
        assert!(!is_ecs_host("ecsx.example.com"));
        // A malformed argv URL falls back.
        assert_eq!(
            ep(Some("not a url"), None),
            "https://ssm.us-west-2.amazonaws.com/"
        );
        assert_eq!(
            default_endpoint("kms", "cn-north-1", false, false),
            "https://kms.cn-north-1.amazonaws.com.cn"
        );
        assert_eq!(
            default_endpoint("ssm", "us-gov-west-1", true, false),
            "https://ssm-fips.us-gov-west-1.amazonaws.com"
        );
        assert_eq!(
            default_endpoint("ssm", "eu-west-1", false, true),
            "https://ssm.eu-west-1.api.aws"
        );
        let e = parse_endpoint("https://ssm.us-east-1.amazonaws.com:443/base").unwrap();
        assert_eq!(e.host, "ssm.us-east-1.amazonaws.com");
        assert_eq!(e.url, "https://ssm.us-east-1.amazonaws.com:443/base");
        assert!(parse_endpoint("ftp://x").is_err());
        assert!(resolve_endpoint("ssm", None, None, None, false, false).is_err());
        assert!(is_valid_region("us-east-1"));
        assert!(!is_valid_region("us-east-1.evil.com/"));
    }

    #[test]
    fn error_codes_are_sanitized() {
        let (code, msg) = parse_error(
            400,
            None,
            br#"{"__type":"com.amazonaws.ssm#InvalidParameters:http://internal","message":"bad"}"#,
        );
        assert_eq!((code.as_str(), msg.as_str()), ("InvalidParameters", "bad"));
        let (code, msg) = parse_error(
            403,
            Some("AccessDeniedException:http://x"),
            b"{\"Message\":\"no\"}",
        );
        assert_eq!(
            (code.as_str(), msg.as_str()),
            ("AccessDeniedException", "no")
        );
        let (code, msg) = parse_error(502, None, b"<html>bad gateway</html>");
        assert_eq!(
            (code.as_str(), msg.as_str()),
            ("HTTP 502", "HTTP status 502")
        );
        assert!(is_retryable_code("ThrottlingException"));
        assert!(!is_retryable_code("AccessDeniedException"));
    }

    #[test]
    fn backoff_is_bounded() {
        for attempt in 1..40 {
            let d = backoff(attempt, Duration::from_secs(1), Duration::from_secs(20));
            assert!(d <= Duration::from_secs(20));
        }
        let j = jitter();
        assert!((0.0..1.0).contains(&j));
    }

    #[test]
    fn credential_freshness() {
        let now = SystemTime::now();
        let soon = Credentials::new("a", "b", None, Some(now + Duration::from_secs(60)), "t");
        let later = Credentials::new("a", "b", None, Some(now + Duration::from_secs(3600)), "t");
        let static_keys = Credentials::new("a", "b", None, None, "t");
        assert!(!is_fresh(&soon, now));
        assert!(is_fresh(&later, now));
        assert!(!is_fresh(&static_keys, now));
    }
}
