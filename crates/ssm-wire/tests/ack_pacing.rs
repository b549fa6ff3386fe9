//! The acknowledgement policy (issue 15, item 3) on explicit time: which frames the pacer
//! holds back, and what each policy lets through in any one-second window.
//!
//! A client channel talks to an unpaced agent channel over a zero-latency link, stepped
//! in 1 ms ticks. The agent sends stream messages at a fixed rate (a download); the client
//! always has data to upload. Every frame the client writes is recorded with its kind.

use std::time::{Duration, Instant};

use bytes::Bytes;
use ssm_wire::channel::{AckPacing, Channel, ChannelConfig, Role};
use ssm_wire::frame::{ClientMessage, MessageType, PayloadType};

const RATE: f64 = 100.0;
const BURST: u32 = 4;

fn client_config(policy: AckPacing) -> ChannelConfig {
    ChannelConfig {
        packets_per_second: Some(RATE),
        pacing_burst: BURST,
        ack_pacing: policy,
        ..ChannelConfig::default()
    }
}

fn agent_config() -> ChannelConfig {
    ChannelConfig {
        packets_per_second: None,
        window_packets: 1_000_000,
        window_bytes: usize::MAX,
        max_queued: 1_000_000,
        ..ChannelConfig::default()
    }
}

fn is_ack(frame: &Bytes) -> bool {
    ClientMessage::decode(frame.clone()).unwrap().message_type == MessageType::Acknowledge
}

/// Most items of `times` (sorted) inside any window of `len`.
fn max_in_window(times: &[Instant], len: Duration) -> usize {
    let mut best = 0;
    let mut lo = 0;
    for hi in 0..times.len() {
        while times[hi].duration_since(times[lo]) >= len {
            lo += 1;
        }
        best = best.max(hi - lo + 1);
    }
    best
}

struct Run {
    /// Client frames written: (when, is an ack).
    sent: Vec<(Instant, bool)>,
    /// Agent messages the client received and delivered.
    downloaded: usize,
}

/// `secs` seconds of a download at `peer_rate` messages/s (0: none) while the client
/// uploads whenever the pacer allows.
fn simulate(policy: AckPacing, peer_rate: f64, secs: u64, upload: bool) -> Run {
    let start = Instant::now();
    let mut client = Channel::new(Role::Client, client_config(policy), start, 1);
    let mut agent = Channel::new(Role::Agent, agent_config(), start, 2);
    let mut run = Run {
        sent: Vec::new(),
        downloaded: 0,
    };
    let period = (peer_rate > 0.0).then(|| Duration::from_secs_f64(1.0 / peer_rate));
    let mut next_peer = start;
    let tick = Duration::from_millis(1);
    let mut now = start;
    let end = start + Duration::from_secs(secs);
    while now < end {
        if let Some(p) = period {
            while next_peer <= now {
                agent
                    .send(now, PayloadType::Output, Bytes::from_static(b"down"))
                    .unwrap();
                next_peer += p;
            }
        }
        while let Some(f) = agent.poll_transmit(now) {
            client.handle_frame(now, f).unwrap();
        }
        while client.poll_event().is_some() {
            run.downloaded += 1;
        }
        loop {
            if upload && client.can_send() && client.next_send_at(now).is_none() {
                client
                    .send(now, PayloadType::Output, Bytes::from_static(b"up"))
                    .unwrap();
            }
            let Some(f) = client.poll_transmit(now) else {
                break;
            };
            run.sent.push((now, is_ack(&f)));
            agent.handle_frame(now, f).unwrap();
            while agent.poll_event().is_some() {}
            while let Some(f) = agent.poll_transmit(now) {
                client.handle_frame(now, f).unwrap();
            }
        }
        now += tick;
    }
    run
}

fn counts(run: &Run) -> (usize, usize, usize) {
    let times: Vec<Instant> = run.sent.iter().map(|(t, _)| *t).collect();
    let acks = run.sent.iter().filter(|(_, a)| *a).count();
    (
        max_in_window(&times, Duration::from_secs(1)),
        acks,
        run.sent.len() - acks,
    )
}

/// Charged (the default): acks never wait, data takes what the acks leave, and the total
/// in any second stays within the budget plus two bursts.
#[test]
fn charged_acks_share_the_budget_without_waiting() {
    assert_eq!(ChannelConfig::default().ack_pacing, AckPacing::Charged);
    let run = simulate(AckPacing::Charged, 80.0, 10, true);
    let (peak, acks, data) = counts(&run);
    assert_eq!(run.downloaded, 800, "every download message delivered");
    assert_eq!(acks, 800, "one ack per message, none held back");
    let bound = RATE as usize + 2 * BURST as usize;
    assert!(peak <= bound, "peak {peak} frames/s over {bound}");
    // 10 s × 100 frames + the initial burst, less the 800 acks: about 200 for data.
    assert!(
        (190..=210).contains(&data),
        "data got {data} frames, not the budget's remainder"
    );
}

/// Exempt: acks cost nothing, data keeps the whole budget (the official plugin's way).
#[test]
fn exempt_acks_leave_the_whole_budget_to_data() {
    let run = simulate(AckPacing::Exempt, 80.0, 10, true);
    let (peak, acks, data) = counts(&run);
    assert_eq!(acks, 800);
    assert!((1000..=1010).contains(&data), "data got {data} frames");
    assert!(peak > RATE as usize + 60, "acks were paced: peak {peak}");
}

/// Paced: every frame waits for a token; the strict budget over all frames holds.
#[test]
fn paced_acks_keep_every_frame_within_the_budget() {
    let run = simulate(AckPacing::Paced, 80.0, 10, true);
    let (peak, acks, data) = counts(&run);
    let bound = RATE as usize + BURST as usize;
    assert!(peak <= bound, "peak {peak} frames/s over {bound}");
    assert!(acks >= 790, "acks {acks}");
    assert!(data + acks <= 1000 + BURST as usize);
}

/// The reason for the policy: with paced acks, a download from an agent that does not
/// pause between chunks is capped at the pacing rate (one ack per message); charged or
/// exempt acks let it run at the agent's rate.
#[test]
fn a_fast_download_is_not_capped_by_the_budget_unless_acks_are_paced() {
    const PEER: f64 = 2000.0; // 20 × the client's budget
    for policy in [AckPacing::Charged, AckPacing::Exempt] {
        let run = simulate(policy, PEER, 5, false);
        // 2000/s for 5 s in 1 ms ticks: messages 0 ms to 4999 ms.
        assert_eq!(run.downloaded, 9_999, "{policy:?}: delivered");
        let (peak, acks, _) = counts(&run);
        assert_eq!(acks, 9_999, "{policy:?}: every message acked at once");
        assert!(peak >= 1900, "{policy:?}: peak {peak}");
    }
    let run = simulate(AckPacing::Paced, PEER, 5, false);
    let (peak, acks, _) = counts(&run);
    assert!(peak <= RATE as usize + BURST as usize, "paced peak {peak}");
    assert!(
        acks <= 5 * RATE as usize + BURST as usize,
        "paced acks {acks}"
    );
}

/// A burst of acks leaves a bounded debt: data waits at most (burst + 1) tokens' time.
#[test]
fn charged_debt_is_bounded() {
    let start = Instant::now();
    let mut client = Channel::new(Role::Client, client_config(AckPacing::Charged), start, 1);
    let mut agent = Channel::new(Role::Agent, agent_config(), start, 2);
    for _ in 0..1000 {
        agent
            .send(start, PayloadType::Output, Bytes::from_static(b"x"))
            .unwrap();
    }
    while let Some(f) = agent.poll_transmit(start) {
        client.handle_frame(start, f).unwrap();
    }
    let mut acks = 0;
    while let Some(f) = client.poll_transmit(start) {
        assert!(is_ack(&f));
        acks += 1;
    }
    assert_eq!(acks, 1000, "all acks written at once");
    assert_eq!(client.poll_timeout(), None, "nothing waits for the pacer");
    client
        .send(start, PayloadType::Output, Bytes::from_static(b"up"))
        .unwrap();
    assert!(
        client.poll_transmit(start).is_none(),
        "data waits for the debt"
    );
    let due = client.next_send_at(start).expect("a token comes later");
    let wait = due - start;
    let most = Duration::from_secs_f64(f64::from(BURST + 1) / RATE);
    assert!(
        wait <= most + Duration::from_micros(1),
        "{wait:?} > {most:?}"
    );
    assert!(client
        .poll_transmit(due - Duration::from_millis(1))
        .is_none());
    let f = client
        .poll_transmit(due)
        .expect("data once the debt is repaid");
    assert!(!is_ack(&f));
}

#[test]
fn policy_names_parse() {
    for p in [AckPacing::Charged, AckPacing::Exempt, AckPacing::Paced] {
        assert_eq!(AckPacing::parse(p.as_str()), Some(p));
    }
    assert_eq!(AckPacing::parse(" Paced "), Some(AckPacing::Paced));
    assert_eq!(AckPacing::parse("fast"), None);
}
