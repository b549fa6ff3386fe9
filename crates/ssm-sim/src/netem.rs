//! Network emulation between the client's WebSocket and the agent: a pipelined delay
//! queue with seeded loss, duplication and reordering.
//!
//! Every item enters a [`Link`] with a flag saying whether it may be impaired (stream
//! frames and acks may; text frames, `channel_closed`, publication messages and injected
//! malformed frames are only delayed). Each item is released `latency` after it entered,
//! independently of the others, so a high-latency link still carries many frames in
//! flight. A reordered item gets an extra random delay so later items overtake it.
//! Items released at the same instant keep their arrival order.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::Rng;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::session::SessionShared;

/// Most items held in one direction's delay queue; the link stops taking input beyond it.
const QUEUE_BOUND: usize = 16 * 1024;

/// Impairment parameters of one direction.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Impairment {
    pub latency: Duration,
    pub loss: f64,
    pub duplicate: f64,
    pub reorder: f64,
}

struct Pending<T> {
    at: Instant,
    order: u64,
    item: T,
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
/// of `output` after the configured delay. The task ends when the input is closed and the
/// queue drained, or when `output` is closed.
pub(crate) fn spawn_link<T: Clone + Send + 'static>(
    imp: Impairment,
    mut rng: StdRng,
    session: Arc<SessionShared>,
    output: mpsc::Sender<T>,
    input_capacity: usize,
) -> mpsc::Sender<(T, bool)> {
    let (tx, mut rx) = mpsc::channel::<(T, bool)>(input_capacity);
    tokio::spawn(async move {
        let mut heap: BinaryHeap<Reverse<Pending<T>>> = BinaryHeap::new();
        let mut order = 0u64;
        let mut input_open = true;
        loop {
            if !input_open && heap.is_empty() {
                return;
            }
            let next = heap.peek().map(|p| p.0.at);
            tokio::select! {
                biased;
                _ = sleep_until_opt(next), if next.is_some() => {
                    let now = Instant::now();
                    while heap.peek().is_some_and(|p| p.0.at <= now) {
                        if let Some(Reverse(p)) = heap.pop() {
                            if output.send(p.item).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                item = rx.recv(), if input_open && heap.len() < QUEUE_BOUND => {
                    let Some((item, impairable)) = item else {
                        input_open = false;
                        continue;
                    };
                    let now = Instant::now();
                    let mut copies = 1;
                    let mut extra = Duration::ZERO;
                    if impairable {
                        if imp.loss > 0.0 && rng.gen_bool(imp.loss.min(1.0)) {
                            session.update_stats(|s| s.netem_lost += 1);
                            continue;
                        }
                        if imp.duplicate > 0.0 && rng.gen_bool(imp.duplicate.min(1.0)) {
                            session.update_stats(|s| s.netem_duplicated += 1);
                            copies = 2;
                        }
                        if imp.reorder > 0.0 && rng.gen_bool(imp.reorder.min(1.0)) {
                            session.update_stats(|s| s.netem_reordered += 1);
                            let max_extra = 10 + imp.latency.as_millis().min(1000) as u64;
                            extra = Duration::from_millis(rng.gen_range(2..=max_extra));
                        }
                    }
                    for copy in 0..copies {
                        // The duplicate trails the original by a millisecond.
                        let at = now + imp.latency + extra + Duration::from_millis(copy);
                        heap.push(Reverse(Pending { at, order, item: item.clone() }));
                        order += 1;
                    }
                }
            }
        }
    });
    tx
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
