//! The driver's [`SessionApi`] over [`AwsContext`]: SigV4 for the data channel,
//! ResumeSession, TerminateSession and KMS GenerateDataKey with the identity the AWS CLI
//! used (region argv 2, profile argv 4, endpoint argv 6).

use std::sync::Arc;

use crate::aws::{AwsContext, AwsError};
use crate::invocation::StartSessionArgs;
use crate::session::{ApiError, BoxFuture, DataKeyResult, ResumeResult, SessionApi, SignResult};

impl From<AwsError> for ApiError {
    fn from(e: AwsError) -> ApiError {
        ApiError {
            retryable: e.is_retryable(),
            message: e.to_string(),
        }
    }
}

struct Aws(AwsContext);

impl SessionApi for Aws {
    fn sign<'a>(&'a self, url: &'a str) -> BoxFuture<'a, SignResult> {
        Box::pin(async move { Ok(self.0.sign_websocket(url).await?) })
    }

    fn resume<'a>(&'a self, session_id: &'a str) -> BoxFuture<'a, ResumeResult> {
        Box::pin(async move { Ok(self.0.resume_session(session_id).await?) })
    }

    fn terminate<'a>(&'a self, session_id: &'a str) -> BoxFuture<'a, Result<(), ApiError>> {
        Box::pin(async move { Ok(self.0.terminate_session(session_id).await?) })
    }

    fn data_key<'a>(
        &'a self,
        key_id: &'a str,
        session_id: &'a str,
        target: &'a str,
    ) -> BoxFuture<'a, DataKeyResult> {
        Box::pin(async move {
            let (mut plaintext, blob) =
                self.0.generate_data_key(key_id, session_id, target).await?;
            // Move the key out; the emptied wrapper is wiped on drop, the moved-out buffer
            // is wiped by `GeneratedDataKey`'s drop.
            Ok((std::mem::take(&mut *plaintext), blob))
        })
    }
}

/// The API over an existing context (the standalone client shares one among sessions).
pub fn from_context(context: AwsContext) -> Arc<dyn SessionApi> {
    Arc::new(Aws(context))
}

/// The API for this invocation.
pub fn new(args: &StartSessionArgs) -> Arc<dyn SessionApi> {
    Arc::new(Aws(AwsContext::new(
        &args.region,
        &args.profile,
        &args.endpoint,
    )))
}
