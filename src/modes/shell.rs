//! Shell sessions (temporary stand-in while the terminal mode is written).
use super::{ModeContext, ModeOutcome};
pub async fn run(ctx: ModeContext) -> ModeOutcome {
    super::stdio::run(ctx).await
}
