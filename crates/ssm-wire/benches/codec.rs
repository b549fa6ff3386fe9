//! Codec micro-benchmarks: `cargo bench -p ssm-wire` (divan; about 20 s).
//!
//! - `frame`: encode / decode+validate of a 1024-byte-payload `ClientMessage` (the agent's
//!   chunk size, so one frame per KiB of port-forwarding data).
//! - `channel`: one stream message through two [`Channel`]s and its acknowledgement back:
//!   `send` + `poll_transmit` on the sender, `handle_frame` + ack `poll_transmit` +
//!   `poll_event` on the receiver, `handle_frame(ack)` on the sender.
//! - `smux`: 32 KiB written through a client [`Mux`], drained and fed to a server `Mux`.
//!
//! The allocation profiler prints allocations per iteration beside the times, which shows
//! where the hot path allocates per frame.

use std::time::Instant;

use bytes::Bytes;
use divan::counter::BytesCount;
use divan::{AllocProfiler, Bencher};
use ssm_wire::channel::{Channel, ChannelConfig, Role};
use ssm_wire::smux::{Mux, MuxConfig, MuxEvent, Role as MuxRole};
use ssm_wire::{ClientMessage, MessageType, PayloadType};
use uuid::Uuid;

#[global_allocator]
static ALLOC: AllocProfiler = AllocProfiler::system();

const PAYLOAD: usize = 1024;
const UNIX_MS: u64 = 1_700_000_000_000;

fn main() {
    divan::main();
}

fn message(seq: i64) -> ClientMessage {
    ClientMessage::new(
        MessageType::InputStreamData,
        seq,
        0,
        PayloadType::Output,
        Bytes::from(vec![0x5au8; PAYLOAD]),
        UNIX_MS,
        Uuid::from_u128(0xc0ffee00_0000_4000_8000_000000000001),
    )
}

mod frame {
    use super::*;

    /// `ClientMessage::new` (SHA-256 of the payload) + `encode` into a fresh `Vec`: what
    /// `Channel::send` does per message.
    #[divan::bench]
    fn new_and_encode(b: Bencher) {
        let payload = Bytes::from(vec![0x5au8; PAYLOAD]);
        let id = Uuid::from_u128(7);
        b.counter(BytesCount::new(PAYLOAD)).bench_local(|| {
            let m = ClientMessage::new(
                MessageType::InputStreamData,
                divan::black_box(1),
                0,
                PayloadType::Output,
                payload.clone(),
                UNIX_MS,
                id,
            );
            m.encode().unwrap()
        });
    }

    /// `encode_into` a reused buffer (digest already computed): the copy alone.
    #[divan::bench]
    fn encode_into_reused(b: Bencher) {
        let m = message(1);
        let mut out = Vec::with_capacity(m.encoded_len());
        b.counter(BytesCount::new(PAYLOAD)).bench_local(|| {
            out.clear();
            divan::black_box(&m).encode_into(&mut out).unwrap();
            out.len()
        });
    }

    /// `decode` (zero-copy payload slice) without validation.
    #[divan::bench]
    fn decode(b: Bencher) {
        let frame = Bytes::from(message(1).encode().unwrap());
        b.counter(BytesCount::new(PAYLOAD))
            .bench_local(|| ClientMessage::decode(divan::black_box(frame.clone())).unwrap());
    }

    /// `decode` + `validate` (SHA-256 digest check): what every received frame costs.
    #[divan::bench]
    fn decode_validate(b: Bencher) {
        let frame = Bytes::from(message(1).encode().unwrap());
        b.counter(BytesCount::new(PAYLOAD)).bench_local(|| {
            let m = ClientMessage::decode(divan::black_box(frame.clone())).unwrap();
            m.validate().unwrap();
            m
        });
    }
}

mod channel {
    use super::*;

    fn pair(now: Instant) -> (Channel, Channel) {
        let config = ChannelConfig {
            packets_per_second: None,
            ..ChannelConfig::default()
        };
        let client = Channel::new(Role::Client, config.clone(), now, UNIX_MS);
        let agent = Channel::new(Role::Agent, config, now, UNIX_MS);
        (client, agent)
    }

    /// One 1024-byte message client -> agent and its ack back, as the drivers do it
    /// (`poll_timeout` each turn, as the plugin's loop calls it).
    #[divan::bench]
    fn message_and_ack(b: Bencher) {
        let now = Instant::now();
        let (mut client, mut agent) = pair(now);
        let payload = Bytes::from(vec![0x5au8; PAYLOAD]);
        b.counter(BytesCount::new(PAYLOAD)).bench_local(|| {
            client
                .send(now, PayloadType::Output, payload.clone())
                .unwrap();
            let frame = client.poll_transmit(now).unwrap();
            agent.handle_frame(now, frame).unwrap();
            let ack = agent.poll_transmit(now).unwrap();
            while agent.poll_event().is_some() {}
            client.handle_frame(now, ack).unwrap();
            client.poll_timeout()
        });
    }

    /// The receiving half alone: `handle_frame` of an in-order data frame and the ack it
    /// produces (ack generation). Frames are encoded beforehand.
    #[divan::bench]
    fn receive_and_ack(b: Bencher) {
        let now = Instant::now();
        let (_, mut agent) = pair(now);
        let mut seq = 0i64;
        b.counter(BytesCount::new(PAYLOAD))
            .with_inputs(|| {
                let f = Bytes::from(message(seq).encode().unwrap());
                seq += 1;
                f
            })
            .bench_local_values(|frame| {
                agent.handle_frame(now, frame).unwrap();
                let ack = agent.poll_transmit(now).unwrap();
                while agent.poll_event().is_some() {}
                ack
            });
    }
}

mod smux {
    use super::*;

    const WRITE: usize = 32 * 1024;

    /// 32 KiB written on one stream, drained, and parsed by the peer (events drained).
    #[divan::bench]
    fn write_32k_and_feed(b: Bencher) {
        let mut client = Mux::new(MuxRole::Client, MuxConfig::default());
        let mut server = Mux::new(MuxRole::Server, MuxConfig::default());
        let sid = client.open_stream().unwrap();
        server.feed_bytes(client.poll_output().unwrap()).unwrap();
        assert!(matches!(server.poll_event(), Some(MuxEvent::Opened(_))));
        let data = vec![0x5au8; WRITE];
        b.counter(BytesCount::new(WRITE)).bench_local(|| {
            let mut rest = &data[..];
            while !rest.is_empty() {
                let n = client.write(sid, rest).unwrap();
                rest = &rest[n..];
                while let Some(out) = client.poll_output() {
                    server.feed_bytes(out).unwrap();
                }
            }
            let mut got = 0;
            while let Some(ev) = server.poll_event() {
                if let MuxEvent::Data(_, d) = ev {
                    got += d.len();
                }
            }
            got
        });
    }

    /// The same 32 KiB delivered to the peer in 1024-byte pieces (how it arrives when
    /// every channel message carries 1 KiB).
    #[divan::bench]
    fn feed_32k_in_1k_pieces(b: Bencher) {
        let mut client = Mux::new(MuxRole::Client, MuxConfig::default());
        let mut server = Mux::new(MuxRole::Server, MuxConfig::default());
        let sid = client.open_stream().unwrap();
        server.feed_bytes(client.poll_output().unwrap()).unwrap();
        while server.poll_event().is_some() {}
        let data = vec![0x5au8; WRITE];
        client.write(sid, &data).unwrap();
        let wire = client.poll_output().unwrap();
        b.counter(BytesCount::new(WRITE)).bench_local(|| {
            let mut off = 0;
            while off < wire.len() {
                let end = (off + PAYLOAD).min(wire.len());
                server.feed_bytes(wire.slice(off..end)).unwrap();
                off = end;
            }
            let mut got = 0;
            while let Some(ev) = server.poll_event() {
                if let MuxEvent::Data(_, d) = ev {
                    got += d.len();
                }
            }
            got
        });
    }
}
