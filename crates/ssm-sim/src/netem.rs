//! Network emulation between the client's WebSocket and the agent: a pipelined delay
//! queue with seeded loss, duplication and reordering.
//!
//! Every item enters a [`Link`] with a flag saying whether it may be impaired (stream
//! frames and acks may; text frames, `channel_closed`, publication messages and injected
//! malformed frames are only delayed). Each item is released `latency` after it entered,
//! independently of the others, so a high-latency link still carries many frames in
//! flight. A reordered item gets an extra random delay so later items overtake it.
//! Items released at the same instant keep their arrival order.
//!
//! Delays are kept by a thread of the link's own, which sleeps with the operating
//! system's precision (tens of microseconds) rather than on tokio's millisecond timer:
//! otherwise every frame would arrive up to a millisecond late and the simulator, not the
//! plugin, would dominate every latency measured through it. A link with nothing to delay
//! forwards frames straight from its task, with no timer at all.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::Rng;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::session::SessionShared;

/// Most items held in one direction's delay queue; the link stops taking input beyond it.
const QUEUE_BOUND: usize = 16 * 1024;

/// How long before an item is due the link's thread stops sleeping and spins.
const SPIN: Duration = Duration::from_micros(80);

/// Impairment parameters of one direction.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Impairment {
    pub latency: Duration,
    pub loss: f64,
    pub duplicate: f64,
    pub reorder: f64,
}

impl Impairment {
    /// Whether any item can be held back (latency, reordering or a duplicate's lag).
    fn delays(&self) -> bool {
        !self.latency.is_zero() || self.duplicate > 0.0 || self.reorder > 0.0
    }
}

struct Pending<T> {
    at: Instant,
    order: u64,
    item: T,
    _slot: OwnedSemaphorePermit,
}

impl<T> PartialEq for Pending<T> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.order) == (other.at, other.order)
    }
}
impl<T> Eq for Pending<T> {}
impl<T> PartialOrd for Pending<T> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Pending<T> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.order).cmp(&(other.at, other.order))
    }
}

/// Spawns one direction of emulated network. Items sent into the returned sender come out
/// of `output` after the configured delay. The link ends when the input is closed and the
/// queue drained, or when `output` is closed.
pub(crate) fn spawn_link<T: Clone + Send + 'static>(
    imp: Impairment,
    mut rng: StdRng,
    session: Option<Arc<SessionShared>>,
    output: mpsc::Sender<T>,
    input_capacity: usize,
) -> mpsc::Sender<(T, bool)> {
    let (tx, mut rx) = mpsc::channel::<(T, bool)>(input_capacity);
    if !imp.delays() {
        tokio::spawn(async move {
            while let Some((item, impairable)) = rx.recv().await {
                if impairable && imp.loss > 0.0 && rng.gen_bool(imp.loss.min(1.0)) {
                    count(&session, |s| s.netem_lost += 1);
                    continue;
                }
                if output.send(item).await.is_err() {
                    return;
                }
            }
        });
        return tx;
    }
    let (timed_tx, timed_rx) = std::sync::mpsc::channel::<Pending<T>>();
    let slots = Arc::new(Semaphore::new(QUEUE_BOUND));
    std::thread::Builder::new()
        .name("netem-link".into())
        .spawn(move || release_loop(timed_rx, output))
        .expect("spawning a netem thread");
    tokio::spawn(async move {
        let mut order = 0u64;
        while let Some((item, impairable)) = rx.recv().await {
            let now = Instant::now();
            let mut copies = 1;
            let mut extra = Duration::ZERO;
            if impairable {
                if imp.loss > 0.0 && rng.gen_bool(imp.loss.min(1.0)) {
                    count(&session, |s| s.netem_lost += 1);
                    continue;
                }
                if imp.duplicate > 0.0 && rng.gen_bool(imp.duplicate.min(1.0)) {
                    count(&session, |s| s.netem_duplicated += 1);
                    copies = 2;
                }
                if imp.reorder > 0.0 && rng.gen_bool(imp.reorder.min(1.0)) {
                    count(&session, |s| s.netem_reordered += 1);
                    let max_extra = 10 + imp.latency.as_millis().min(1000) as u64;
                    extra = Duration::from_millis(rng.gen_range(2..=max_extra));
                }
            }
            for copy in 0..copies {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                // The duplicate trails the original by a millisecond.
                let at = now + imp.latency + extra + Duration::from_millis(copy);
                let p = Pending {
                    at,
                    order,
                    item: item.clone(),
                    _slot: slot,
                };
                order += 1;
                if timed_tx.send(p).is_err() {
                    return;
                }
            }
        }
    });
    tx
}

fn count(session: &Option<Arc<SessionShared>>, f: impl FnOnce(&mut crate::SessionStats)) {
    if let Some(s) = session {
        s.update_stats(f);
    }
}

/// The simulator's own share of a delayed link's latency on this machine: `samples`
/// items sent one at a time through a link of `latency` (as the gateway's links run),
/// each timed from entering the link to reaching the task that reads its output, less
/// `latency`. Sorted.
pub async fn link_overshoot(latency: Duration, samples: usize) -> Vec<Duration> {
    use rand::SeedableRng;
    let imp = Impairment {
        latency,
        loss: 0.0,
        duplicate: 0.0,
        reorder: 0.0,
    };
    let (out_tx, mut out_rx) = mpsc::channel::<Instant>(4);
    let link = spawn_link(imp, StdRng::seed_from_u64(0), None, out_tx, 4);
    let mut over = Vec::with_capacity(samples);
    for _ in 0..samples {
        if link.send((Instant::now(), false)).await.is_err() {
            break;
        }
        let Some(sent) = out_rx.recv().await else {
            break;
        };
        over.push(sent.elapsed().saturating_sub(latency));
    }
    over.sort();
    over
}

/// The link's thread: holds items until their instant, then hands them to `output`.
fn release_loop<T>(input: std::sync::mpsc::Receiver<Pending<T>>, output: mpsc::Sender<T>) {
    use std::sync::mpsc::RecvTimeoutError;
    let mut heap: BinaryHeap<Reverse<Pending<T>>> = BinaryHeap::new();
    let mut input_open = true;
    loop {
        let now = Instant::now();
        while heap.peek().is_some_and(|p| p.0.at <= now) {
            if let Some(Reverse(p)) = heap.pop() {
                if output.blocking_send(p.item).is_err() {
                    return;
                }
            }
        }
        let next = heap.peek().map(|p| p.0.at);
        let received = match (next, input_open) {
            (None, false) => return,
            (Some(at), false) => {
                std::thread::sleep(at.saturating_duration_since(Instant::now()));
                continue;
            }
            (None, true) => input.recv().map_err(|_| RecvTimeoutError::Disconnected),
            (Some(at), true) => {
                let left = at.saturating_duration_since(Instant::now());
                if left <= SPIN {
                    // The last stretch is spun: a sleep would overshoot by the kernel's
                    // timer slack (about 50 µs) on every frame.
                    while Instant::now() < at {
                        std::hint::spin_loop();
                    }
                    continue;
                }
                input.recv_timeout(left - SPIN)
            }
        };
        match received {
            Ok(p) => heap.push(Reverse(p)),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => input_open = false,
        }
    }
}
