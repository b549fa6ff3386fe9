//! The plugin's own status lines on stdout (`Starting session with SessionId: …`,
//! `Port N opened …`, `Exiting session …`), byte-for-byte as the official plugin prints
//! them, and the quiet mode that keeps them off stdout for scripts that pipe it.

use std::io::Write;

/// Where status lines go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Console {
    /// `SSM_PLUGIN_QUIET`: status lines go to stderr instead of stdout.
    pub quiet: bool,
}

impl Console {
    /// Writes a status line exactly as given and flushes it.
    pub fn status(&self, text: &str) {
        if self.quiet {
            let mut err = std::io::stderr().lock();
            let _ = err.write_all(text.as_bytes());
            let _ = err.flush();
        } else {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
        }
    }

    /// An error for the user, always on stderr.
    pub fn error(&self, text: &str) {
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{text}");
        let _ = err.flush();
    }
}
