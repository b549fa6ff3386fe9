//! Shared state of one simulated session: identity, current token, counters, and the
//! handle to its agent task. Owned jointly by the API, the gateway connections and the
//! agent.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::sync::{mpsc, watch};

use crate::agent::AgentEvent;
use crate::config::SimConfig;
use crate::plugins::SessionKind;
use crate::stats::SessionStats;

pub(crate) struct SessionShared {
    pub id: String,
    pub target: String,
    pub config: SimConfig,
    pub kind: SessionKind,
    /// Creation index within the simulator (for seeding).
    pub index: u64,
    /// The token a client must present in OpenDataChannelInput.
    pub token: Mutex<String>,
    /// Opaque cell number used in StreamUrls.
    pub cell: Mutex<String>,
    pub stats: Mutex<SessionStats>,
    /// Events to the agent task.
    pub events: mpsc::Sender<AgentEvent>,
    /// Becomes `true` once the session has ended.
    pub closed: watch::Sender<bool>,
    /// WebSockets accepted so far (also the connection id source).
    pub connections: AtomicU32,
}

impl SessionShared {
    pub(crate) fn update_stats(&self, f: impl FnOnce(&mut SessionStats)) {
        let mut guard = match self.stats.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut guard);
    }

    pub(crate) fn stats_snapshot(&self) -> SessionStats {
        let guard = match self.stats.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        guard.clone()
    }

    pub(crate) fn token(&self) -> String {
        lock(&self.token).clone()
    }

    pub(crate) fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Marks the session ended (idempotent).
    pub(crate) fn mark_closed(&self, output: &str) {
        self.update_stats(|s| {
            if !s.closed {
                s.closed = true;
                s.close_output = Some(output.to_owned());
            }
        });
        self.closed.send_replace(true);
    }

    /// A generator derived from the simulator seed, this session and a purpose/stream id.
    pub(crate) fn rng(&self, stream: u64) -> StdRng {
        let mixed = self
            .config
            .seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(self.index.wrapping_mul(0xBF58_476D_1CE4_E5B9))
            .wrapping_add(stream.wrapping_mul(0x94D0_49BB_1331_11EB));
        StdRng::seed_from_u64(mixed)
    }

    pub(crate) fn next_connection(&self) -> u32 {
        self.connections.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// Locks a mutex, ignoring poisoning (the data are counters and strings).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}
