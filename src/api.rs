//! The [`SessionApi`] the driver uses, over the AWS SDK (temporary stand-in).
use std::sync::Arc;

use crate::invocation::StartSessionArgs;
use crate::session::{ApiError, BoxFuture, DataKeyResult, ResumeResult, SessionApi, SignResult};

struct Unavailable;

fn unavailable<T>() -> Result<T, ApiError> {
    Err(ApiError {
        message: "AWS API calls are not available in this build".to_owned(),
        retryable: false,
    })
}

impl SessionApi for Unavailable {
    fn sign<'a>(&'a self, _url: &'a str) -> BoxFuture<'a, SignResult> {
        Box::pin(async { unavailable() })
    }
    fn resume<'a>(&'a self, _id: &'a str) -> BoxFuture<'a, ResumeResult> {
        Box::pin(async { unavailable() })
    }
    fn terminate<'a>(&'a self, _id: &'a str) -> BoxFuture<'a, Result<(), ApiError>> {
        Box::pin(async { unavailable() })
    }
    fn data_key<'a>(
        &'a self,
        _k: &'a str,
        _s: &'a str,
        _t: &'a str,
    ) -> BoxFuture<'a, DataKeyResult> {
        Box::pin(async { unavailable() })
    }
}

pub fn new(args: &StartSessionArgs) -> Arc<dyn SessionApi> {
    tracing::debug!(region = %args.region, profile = %args.profile, endpoint = %args.endpoint, "AWS context");
    Arc::new(Unavailable)
}
