//! smux protocol version 1 (PROTOCOL.md §9): the 8-byte frame header, frames, and [`Mux`],
//! a sans-I/O multiplexer session for either end.
//!
//! Port-forwarding sessions in mux mode carry many TCP connections over one data channel.
//! The plugin runs an smux *client* and the agent an smux *server*; their frames travel as a
//! byte stream inside `Output` payloads, split and merged arbitrarily. This module is
//! byte-compatible with xtaci/smux v1 as vendored by the official plugin and agent.
//!
//! ```text
//! off size field
//!   0   1  version   always 1
//!   1   1  cmd       0 SYN (open), 1 FIN (close), 2 PSH (data), 3 NOP (keepalive), 4 UPD (v2 only)
//!   2   2  length    u16 little-endian, bytes of data after the header (0 for SYN/FIN/NOP)
//!   4   4  stream id u32 little-endian
//!   8   …  data
//! ```
//!
//! [`Mux`] owns the session rules and nothing else: it never reads a socket or a clock.
//! The caller feeds inbound bytes ([`Mux::feed`]), takes events ([`Mux::poll_event`]), asks
//! for streams and data to be sent ([`Mux::open_stream`], [`Mux::write`], [`Mux::close`]), and
//! drains the outbound bytes ([`Mux::poll_output`]). Receiver rules follow smux:
//!
//! - a wrong version byte or an unknown command is a protocol error; the session is dead
//!   and every later call returns the same error. So are SYN/FIN/NOP frames with data and
//!   UPD frames (window updates exist only in protocol version 2).
//! - SYN for a stream id that is already open is ignored;
//! - PSH for an unknown (or already closed) stream is consumed and dropped, as is an empty PSH;
//! - NOP is consumed silently.
//!
//! A stream is forgotten when this end closes it ([`Mux::close`] sends FIN), as in smux:
//! data the peer still sends for it is dropped. A peer FIN ([`MuxEvent::Closed`]) means the
//! peer will send no more; this end may still write until it closes the stream itself.
//!
//! Memory is bounded: inbound reassembly keeps at most one partial frame (≤ 65 543 bytes),
//! and outbound bytes are limited by [`MuxConfig::max_pending_output`] ([`Mux::write`]
//! accepts only what fits and says how much). Events hold zero-copy slices of what was fed.

use std::collections::{HashMap, VecDeque};

use bytes::{BufMut, Bytes, BytesMut};

/// The protocol version byte this implementation speaks.
pub const VERSION: u8 = 1;
/// Size of a frame header.
pub const HEADER_LEN: usize = 8;
/// Largest data length one frame can carry (the length field is a u16).
pub const MAX_FRAME_DATA: usize = u16::MAX as usize;
/// smux's default MaxFrameSize: larger writes are split into frames of at most this size.
pub const DEFAULT_MAX_FRAME_SIZE: usize = 32_768;
/// Default limit for queued outbound bytes (smux's MaxReceiveBuffer).
pub const DEFAULT_MAX_PENDING_OUTPUT: usize = 4 * 1024 * 1024;
/// Default limit for simultaneously open streams.
pub const DEFAULT_MAX_STREAMS: usize = 65_536;

/// A stream identifier. Clients open odd ids (3, 5, 7, …), servers even ones (2, 4, …).
pub type StreamId = u32;

/// The command byte of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cmd {
    /// Open a stream.
    Syn,
    /// Close a stream (the sender will write no more to it).
    Fin,
    /// Stream data.
    Psh,
    /// Keepalive, no stream.
    Nop,
    /// Window update; protocol version 2 only.
    Upd,
}

impl Cmd {
    /// The command for a wire byte, if it is one of the five known commands.
    pub fn from_u8(b: u8) -> Option<Cmd> {
        match b {
            0 => Some(Cmd::Syn),
            1 => Some(Cmd::Fin),
            2 => Some(Cmd::Psh),
            3 => Some(Cmd::Nop),
            4 => Some(Cmd::Upd),
            _ => None,
        }
    }

    /// The wire byte.
    pub fn as_u8(self) -> u8 {
        match self {
            Cmd::Syn => 0,
            Cmd::Fin => 1,
            Cmd::Psh => 2,
            Cmd::Nop => 3,
            Cmd::Upd => 4,
        }
    }
}

/// Why bytes are not smux v1, or why a [`Mux`] operation cannot be done.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SmuxError {
    #[error("smux header needs {HEADER_LEN} bytes, got {len}")]
    TruncatedHeader { len: usize },
    #[error("smux protocol error: version byte {0}, expected {VERSION}")]
    BadVersion(u8),
    #[error("smux protocol error: unknown command {0}")]
    UnknownCommand(u8),
    #[error("smux protocol error: {0:?} frame is not allowed in protocol version {VERSION}")]
    UnexpectedCommand(Cmd),
    #[error("smux protocol error: {cmd:?} frame carries {length} data bytes")]
    UnexpectedData { cmd: Cmd, length: u16 },
    #[error("smux frame data of {len} bytes exceeds {MAX_FRAME_DATA}")]
    FrameTooLarge { len: usize },
    #[error("peer opened more than {limit} smux streams")]
    TooManyStreams { limit: usize },
    #[error("smux stream {0} is not open")]
    UnknownStream(StreamId),
    #[error("smux stream ids are exhausted")]
    StreamIdsExhausted,
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Header {
    pub cmd: Cmd,
    pub length: u16,
    pub stream_id: StreamId,
}

impl Header {
    /// Encodes the header with version byte [`VERSION`].
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let l = self.length.to_le_bytes();
        let s = self.stream_id.to_le_bytes();
        [
            VERSION,
            self.cmd.as_u8(),
            l[0],
            l[1],
            s[0],
            s[1],
            s[2],
            s[3],
        ]
    }

    /// Decodes the first [`HEADER_LEN`] bytes of `bytes` (the rest is ignored). Checks the
    /// version byte and that the command is known; whether the command and length are
    /// acceptable in a session is [`Mux`]'s call.
    pub fn decode(bytes: &[u8]) -> Result<Header, SmuxError> {
        let h: [u8; HEADER_LEN] = match bytes.get(..HEADER_LEN) {
            Some(h) => h
                .try_into()
                .map_err(|_| SmuxError::TruncatedHeader { len: bytes.len() })?,
            None => return Err(SmuxError::TruncatedHeader { len: bytes.len() }),
        };
        let [version, cmd, l0, l1, s0, s1, s2, s3] = h;
        if version != VERSION {
            return Err(SmuxError::BadVersion(version));
        }
        let cmd = Cmd::from_u8(cmd).ok_or(SmuxError::UnknownCommand(cmd))?;
        Ok(Header {
            cmd,
            length: u16::from_le_bytes([l0, l1]),
            stream_id: u32::from_le_bytes([s0, s1, s2, s3]),
        })
    }
}

/// One frame: header fields and data.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Frame {
    pub cmd: Cmd,
    pub stream_id: StreamId,
    pub data: Bytes,
}

impl Frame {
    pub fn syn(stream_id: StreamId) -> Frame {
        Frame {
            cmd: Cmd::Syn,
            stream_id,
            data: Bytes::new(),
        }
    }

    pub fn fin(stream_id: StreamId) -> Frame {
        Frame {
            cmd: Cmd::Fin,
            stream_id,
            data: Bytes::new(),
        }
    }

    pub fn psh(stream_id: StreamId, data: Bytes) -> Frame {
        Frame {
            cmd: Cmd::Psh,
            stream_id,
            data,
        }
    }

    /// A keepalive (stream id 0, as smux sends it).
    pub fn nop() -> Frame {
        Frame {
            cmd: Cmd::Nop,
            stream_id: 0,
            data: Bytes::new(),
        }
    }

    /// Header plus data length.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.data.len()
    }

    /// Appends header and data to `out`. Errors if the data does not fit a u16 length.
    pub fn encode_into(&self, out: &mut impl BufMut) -> Result<(), SmuxError> {
        let length = u16::try_from(self.data.len()).map_err(|_| SmuxError::FrameTooLarge {
            len: self.data.len(),
        })?;
        let h = Header {
            cmd: self.cmd,
            length,
            stream_id: self.stream_id,
        };
        out.put_slice(&h.encode());
        out.put_slice(&self.data);
        Ok(())
    }
}

/// Which end of the session this is; decides the stream ids it opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Opens odd ids 3, 5, 7, … (the plugin).
    Client,
    /// Opens even ids 2, 4, … (the agent accepts streams and never opens one).
    Server,
}

/// Limits of a [`Mux`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MuxConfig {
    /// Writes are split into PSH frames of at most this many data bytes. Clamped to
    /// 1..=65535; smux's default is 32768.
    pub max_frame_size: usize,
    /// [`Mux::write`] queues data only while fewer bytes than this wait to be drained.
    pub max_pending_output: usize,
    /// A peer SYN beyond this many open streams is a protocol error.
    pub max_streams: usize,
}

impl Default for MuxConfig {
    fn default() -> MuxConfig {
        MuxConfig {
            max_frame_size: DEFAULT_MAX_FRAME_SIZE,
            max_pending_output: DEFAULT_MAX_PENDING_OUTPUT,
            max_streams: DEFAULT_MAX_STREAMS,
        }
    }
}

/// What the peer did.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum MuxEvent {
    /// The peer opened a stream (SYN).
    Opened(StreamId),
    /// Data for an open stream: the data of one PSH frame.
    Data(StreamId, Bytes),
    /// The peer closed a stream (FIN): no more data will arrive for it. This end should
    /// [`close`](Mux::close) it when done writing.
    Closed(StreamId),
}

#[derive(Debug, Clone, Copy, Default)]
struct StreamState {
    /// The peer sent FIN.
    remote_closed: bool,
}

/// A sans-I/O smux v1 session. See the [module documentation](self).
#[derive(Debug)]
pub struct Mux {
    role: Role,
    config: MuxConfig,
    /// The last stream id this end opened (smux: starts at 1 for clients, 0 for servers,
    /// and adds 2 before each use).
    last_opened: u32,
    /// Streams this end has not closed.
    streams: HashMap<StreamId, StreamState>,
    /// An incomplete inbound frame (header and as much data as has arrived).
    partial: BytesMut,
    events: VecDeque<MuxEvent>,
    output: BytesMut,
    /// Set on the first protocol error; the session is unusable afterwards.
    failed: Option<SmuxError>,
    /// A frame arrived since [`Mux::take_activity`] was last called.
    activity: bool,
}

impl Mux {
    pub fn new(role: Role, mut config: MuxConfig) -> Mux {
        config.max_frame_size = config.max_frame_size.clamp(1, MAX_FRAME_DATA);
        Mux {
            role,
            config,
            last_opened: match role {
                Role::Client => 1,
                Role::Server => 0,
            },
            streams: HashMap::new(),
            partial: BytesMut::new(),
            events: VecDeque::new(),
            output: BytesMut::new(),
            failed: None,
            activity: false,
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn config(&self) -> &MuxConfig {
        &self.config
    }

    /// The protocol error that ended this session, if any.
    pub fn error(&self) -> Option<&SmuxError> {
        self.failed.as_ref()
    }

    fn check_alive(&self) -> Result<(), SmuxError> {
        match &self.failed {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    // ---- outbound -------------------------------------------------------------------------

    fn queue(&mut self, cmd: Cmd, stream_id: StreamId, data: &[u8]) {
        // Callers keep `data` within `max_frame_size` ≤ u16::MAX.
        let length = u16::try_from(data.len()).unwrap_or(u16::MAX);
        let h = Header {
            cmd,
            length,
            stream_id,
        };
        self.output.reserve(HEADER_LEN + data.len());
        self.output.put_slice(&h.encode());
        self.output
            .put_slice(data.get(..usize::from(length)).unwrap_or(data));
    }

    /// Opens a stream: picks the next id of this role and queues its SYN.
    pub fn open_stream(&mut self) -> Result<StreamId, SmuxError> {
        self.check_alive()?;
        let sid = self
            .last_opened
            .checked_add(2)
            .ok_or(SmuxError::StreamIdsExhausted)?;
        self.last_opened = sid;
        self.streams.insert(sid, StreamState::default());
        self.queue(Cmd::Syn, sid, &[]);
        Ok(sid)
    }

    /// Queues `data` for stream `sid` as PSH frames of at most `max_frame_size` bytes.
    ///
    /// Accepts only as much as fits below [`MuxConfig::max_pending_output`] and returns how
    /// many bytes it took; `Ok(0)` for non-empty data means "drain the output first". To
    /// keep streams fair, write a bounded amount per stream in turn. Writing after the peer
    /// closed the stream is allowed (as in smux); writing to a stream this end closed, or
    /// never had, is [`SmuxError::UnknownStream`].
    pub fn write(&mut self, sid: StreamId, data: &[u8]) -> Result<usize, SmuxError> {
        self.check_alive()?;
        if !self.streams.contains_key(&sid) {
            return Err(SmuxError::UnknownStream(sid));
        }
        let room = self
            .config
            .max_pending_output
            .saturating_sub(self.output.len());
        let take = data.len().min(room);
        let data = data.get(..take).unwrap_or(data);
        for chunk in data.chunks(self.config.max_frame_size) {
            self.queue(Cmd::Psh, sid, chunk);
        }
        Ok(take)
    }

    /// Closes stream `sid`: queues FIN and forgets the stream (later peer data for it is
    /// dropped).
    pub fn close(&mut self, sid: StreamId) -> Result<(), SmuxError> {
        self.check_alive()?;
        if self.streams.remove(&sid).is_none() {
            return Err(SmuxError::UnknownStream(sid));
        }
        self.queue(Cmd::Fin, sid, &[]);
        Ok(())
    }

    /// The keepalive frame (NOP, stream 0).
    pub const fn nop_frame() -> [u8; HEADER_LEN] {
        [VERSION, 3, 0, 0, 0, 0, 0, 0]
    }

    /// Queues a keepalive NOP.
    pub fn send_nop(&mut self) {
        self.queue(Cmd::Nop, 0, &[]);
    }

    /// Bytes queued for the transport and not yet drained.
    pub fn pending_output_len(&self) -> usize {
        self.output.len()
    }

    /// Takes everything queued for the transport.
    pub fn poll_output(&mut self) -> Option<Bytes> {
        if self.output.is_empty() {
            None
        } else {
            Some(self.output.split().freeze())
        }
    }

    /// Takes at most `max` queued bytes (frames may be cut anywhere; the peer reassembles).
    pub fn poll_output_max(&mut self, max: usize) -> Option<Bytes> {
        let n = self.output.len().min(max);
        if n == 0 {
            None
        } else {
            Some(self.output.split_to(n).freeze())
        }
    }

    /// Appends everything queued for the transport to `out`.
    pub fn take_output(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.output);
        self.output.clear();
    }

    // ---- streams --------------------------------------------------------------------------

    /// Whether `sid` is open on this end (opened by either side, not yet closed here).
    pub fn is_open(&self, sid: StreamId) -> bool {
        self.streams.contains_key(&sid)
    }

    /// Whether the peer sent FIN for `sid` (and this end has not closed it yet).
    pub fn is_peer_closed(&self, sid: StreamId) -> bool {
        self.streams.get(&sid).is_some_and(|s| s.remote_closed)
    }

    /// Number of streams open on this end.
    pub fn stream_count(&self) -> usize {
        self.streams.len()
    }

    /// The ids of the streams open on this end, in no particular order.
    pub fn stream_ids(&self) -> impl Iterator<Item = StreamId> + '_ {
        self.streams.keys().copied()
    }

    // ---- inbound --------------------------------------------------------------------------

    /// The next thing the peer did, in arrival order.
    pub fn poll_event(&mut self) -> Option<MuxEvent> {
        self.events.pop_front()
    }

    /// Events waiting in [`poll_event`](Self::poll_event). A caller that cannot keep up
    /// should stop feeding while this is large.
    pub fn pending_events(&self) -> usize {
        self.events.len()
    }

    /// Bytes of an incomplete frame held back until the rest arrives (≤ 65 543).
    pub fn buffered_input_len(&self) -> usize {
        self.partial.len()
    }

    /// Whether any frame (NOP included) arrived since the last call; resets the flag. For a
    /// keepalive timeout kept by the caller.
    pub fn take_activity(&mut self) -> bool {
        std::mem::take(&mut self.activity)
    }

    /// Feeds inbound bytes, split or merged anywhere. Copies `data` once; event data are
    /// slices of that copy.
    pub fn feed(&mut self, data: &[u8]) -> Result<(), SmuxError> {
        self.check_alive()?;
        if data.is_empty() {
            return Ok(());
        }
        self.feed_bytes(Bytes::copy_from_slice(data))
    }

    /// Feeds inbound bytes without copying frames that lie wholly inside `data`.
    ///
    /// Events for every complete frame before a protocol error are still delivered; the
    /// error is returned, and by every later call.
    pub fn feed_bytes(&mut self, mut data: Bytes) -> Result<(), SmuxError> {
        self.check_alive()?;
        let result = self.feed_inner(&mut data);
        if let Err(e) = &result {
            self.failed = Some(e.clone());
            self.partial = BytesMut::new();
        }
        result
    }

    fn feed_inner(&mut self, data: &mut Bytes) -> Result<(), SmuxError> {
        while !data.is_empty() {
            if self.partial.is_empty() {
                // Fast path: frames wholly inside `data` are sliced out of it.
                if data.len() < HEADER_LEN {
                    self.partial.extend_from_slice(data);
                    return Ok(());
                }
                let header = self.check_header(data)?;
                let need = HEADER_LEN + usize::from(header.length);
                if data.len() < need {
                    self.partial.extend_from_slice(data);
                    return Ok(());
                }
                let frame = data.split_to(need);
                self.dispatch(header, frame.slice(HEADER_LEN..))?;
            } else {
                // Complete the held-back frame: header first, then its data.
                if self.partial.len() < HEADER_LEN {
                    let take = (HEADER_LEN - self.partial.len()).min(data.len());
                    self.partial.extend_from_slice(&data.split_to(take));
                    if self.partial.len() < HEADER_LEN {
                        return Ok(());
                    }
                }
                let header = self.check_header(&self.partial)?;
                let need = HEADER_LEN + usize::from(header.length);
                let take = need.saturating_sub(self.partial.len()).min(data.len());
                self.partial.extend_from_slice(&data.split_to(take));
                if self.partial.len() < need {
                    return Ok(());
                }
                let frame = self.partial.split().freeze();
                self.dispatch(header, frame.slice(HEADER_LEN..))?;
            }
        }
        Ok(())
    }

    /// Decodes a header and applies the v1 session rules that do not depend on state.
    fn check_header(&self, bytes: &[u8]) -> Result<Header, SmuxError> {
        let header = Header::decode(bytes)?;
        match header.cmd {
            Cmd::Upd => Err(SmuxError::UnexpectedCommand(Cmd::Upd)),
            Cmd::Syn | Cmd::Fin | Cmd::Nop if header.length != 0 => {
                Err(SmuxError::UnexpectedData {
                    cmd: header.cmd,
                    length: header.length,
                })
            }
            _ => Ok(header),
        }
    }

    fn dispatch(&mut self, header: Header, data: Bytes) -> Result<(), SmuxError> {
        self.activity = true;
        let sid = header.stream_id;
        match header.cmd {
            Cmd::Nop | Cmd::Upd => {}
            Cmd::Syn => {
                if !self.streams.contains_key(&sid) {
                    if self.streams.len() >= self.config.max_streams {
                        return Err(SmuxError::TooManyStreams {
                            limit: self.config.max_streams,
                        });
                    }
                    self.streams.insert(sid, StreamState::default());
                    self.events.push_back(MuxEvent::Opened(sid));
                }
            }
            Cmd::Fin => {
                if let Some(s) = self.streams.get_mut(&sid) {
                    if !s.remote_closed {
                        s.remote_closed = true;
                        self.events.push_back(MuxEvent::Closed(sid));
                    }
                }
            }
            Cmd::Psh => {
                let live = self.streams.get(&sid).is_some_and(|s| !s.remote_closed);
                if live && !data.is_empty() {
                    self.events.push_back(MuxEvent::Data(sid, data));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn drain(m: &mut Mux) -> Vec<MuxEvent> {
        std::iter::from_fn(|| m.poll_event()).collect()
    }

    /// Fixture 24: the official smux client's SYN(3) + PSH(3, 18 bytes).
    const FIXTURE_24: &str = "01000000030000000102120003000000474554202f20485454502f312e300d0a0d0a";
    /// Fixture 25: the official smux server's PSH(3) + FIN(3).
    fn fixture_25() -> Vec<u8> {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../fixtures/frames/25_output_output_smux_psh_fin.bin"
        );
        let frame = std::fs::read(path).unwrap();
        frame[120..].to_vec()
    }

    #[test]
    fn header_codec_matches_captured_bytes() {
        let syn = Header {
            cmd: Cmd::Syn,
            length: 0,
            stream_id: 3,
        };
        assert_eq!(syn.encode(), [1, 0, 0, 0, 3, 0, 0, 0]);
        let psh = Header {
            cmd: Cmd::Psh,
            length: 18,
            stream_id: 3,
        };
        assert_eq!(psh.encode(), [1, 2, 0x12, 0, 3, 0, 0, 0]);
        assert_eq!(Header::decode(&psh.encode()).unwrap(), psh);
        assert_eq!(Mux::nop_frame().to_vec(), hex("0103000000000000"));
        let mut fin = Vec::new();
        Frame::fin(3).encode_into(&mut fin).unwrap();
        assert_eq!(fin, hex("0101000003000000"));
        let big = Header {
            cmd: Cmd::Psh,
            length: 0xBEEF,
            stream_id: 0x0102_0304,
        };
        assert_eq!(big.encode(), [1, 2, 0xEF, 0xBE, 4, 3, 2, 1]);
    }

    #[test]
    fn header_errors() {
        assert_eq!(
            Header::decode(&[1, 0, 0]),
            Err(SmuxError::TruncatedHeader { len: 3 })
        );
        assert_eq!(
            Header::decode(&[2, 0, 0, 0, 3, 0, 0, 0]),
            Err(SmuxError::BadVersion(2))
        );
        assert_eq!(
            Header::decode(&[1, 5, 0, 0, 3, 0, 0, 0]),
            Err(SmuxError::UnknownCommand(5))
        );
        assert_eq!(
            Frame::psh(1, Bytes::from(vec![0; 65536])).encode_into(&mut Vec::new()),
            Err(SmuxError::FrameTooLarge { len: 65536 })
        );
    }

    #[test]
    fn fixture_24_as_server() {
        let mut m = Mux::new(Role::Server, MuxConfig::default());
        m.feed(&hex(FIXTURE_24)).unwrap();
        assert_eq!(
            drain(&mut m),
            vec![
                MuxEvent::Opened(3),
                MuxEvent::Data(3, Bytes::from_static(b"GET / HTTP/1.0\r\n\r\n")),
            ]
        );
        assert_eq!(m.buffered_input_len(), 0);
    }

    #[test]
    fn fixture_24_byte_at_a_time() {
        let mut m = Mux::new(Role::Server, MuxConfig::default());
        for b in hex(FIXTURE_24) {
            m.feed(&[b]).unwrap();
        }
        assert_eq!(
            drain(&mut m),
            vec![
                MuxEvent::Opened(3),
                MuxEvent::Data(3, Bytes::from_static(b"GET / HTTP/1.0\r\n\r\n")),
            ]
        );
    }

    #[test]
    fn client_reproduces_fixture_24_and_reads_fixture_25() {
        let mut c = Mux::new(Role::Client, MuxConfig::default());
        let sid = c.open_stream().unwrap();
        assert_eq!(sid, 3);
        assert_eq!(c.write(sid, b"GET / HTTP/1.0\r\n\r\n").unwrap(), 18);
        assert_eq!(c.poll_output().unwrap().to_vec(), hex(FIXTURE_24));
        assert_eq!(c.poll_output(), None);

        let payload = fixture_25();
        // PSH(3, …) then FIN(3).
        assert_eq!(&payload[..2], &[1, 2]);
        assert_eq!(&payload[payload.len() - 8..], &hex("0101000003000000")[..]);
        for b in &payload {
            c.feed(std::slice::from_ref(b)).unwrap();
        }
        let ev = drain(&mut c);
        assert_eq!(ev.len(), 2, "{ev:?}");
        let MuxEvent::Data(3, data) = &ev[0] else {
            panic!("{ev:?}")
        };
        assert_eq!(data[..], payload[8..payload.len() - 8]);
        assert_eq!(ev[1], MuxEvent::Closed(3));
        assert!(c.is_peer_closed(3));
        // Writing after the peer's FIN is allowed; closing forgets the stream.
        assert_eq!(c.write(3, b"x").unwrap(), 1);
        c.close(3).unwrap();
        assert!(!c.is_open(3));
        assert_eq!(c.write(3, b"x"), Err(SmuxError::UnknownStream(3)));
        assert_eq!(c.close(3), Err(SmuxError::UnknownStream(3)));
    }

    #[test]
    fn stream_ids_follow_smux() {
        let mut c = Mux::new(Role::Client, MuxConfig::default());
        let ids: Vec<_> = (0..4).map(|_| c.open_stream().unwrap()).collect();
        assert_eq!(ids, [3, 5, 7, 9]);
        let mut s = Mux::new(Role::Server, MuxConfig::default());
        assert_eq!(s.open_stream().unwrap(), 2);
        assert_eq!(s.open_stream().unwrap(), 4);
        c.last_opened = u32::MAX - 2;
        assert_eq!(c.open_stream().unwrap(), u32::MAX);
        assert_eq!(c.open_stream(), Err(SmuxError::StreamIdsExhausted));
    }

    #[test]
    fn receiver_rules() {
        let mut m = Mux::new(Role::Server, MuxConfig::default());
        let mut input = Vec::new();
        for f in [
            Frame::nop(),
            Frame::psh(9, Bytes::from_static(b"unknown")),
            Frame::syn(9),
            Frame::syn(9),
            Frame::psh(9, Bytes::new()),
            Frame::psh(9, Bytes::from_static(b"a")),
            Frame::fin(9),
            Frame::fin(9),
            Frame::psh(9, Bytes::from_static(b"after fin")),
            Frame::fin(11),
        ] {
            f.encode_into(&mut input).unwrap();
        }
        m.feed(&input).unwrap();
        assert!(m.take_activity());
        assert!(!m.take_activity());
        assert_eq!(
            drain(&mut m),
            vec![
                MuxEvent::Opened(9),
                MuxEvent::Data(9, Bytes::from_static(b"a")),
                MuxEvent::Closed(9),
            ]
        );
        // Locally closed streams drop data; a new SYN reopens the id.
        m.close(9).unwrap();
        let mut input = Vec::new();
        Frame::psh(9, Bytes::from_static(b"late"))
            .encode_into(&mut input)
            .unwrap();
        Frame::syn(9).encode_into(&mut input).unwrap();
        m.feed(&input).unwrap();
        assert_eq!(drain(&mut m), vec![MuxEvent::Opened(9)]);
    }

    #[test]
    fn protocol_errors_are_sticky() {
        let mut m = Mux::new(Role::Server, MuxConfig::default());
        let mut input = Vec::new();
        Frame::syn(3).encode_into(&mut input).unwrap();
        input.extend_from_slice(&[2, 0, 0, 0, 5, 0, 0, 0]);
        assert_eq!(m.feed(&input), Err(SmuxError::BadVersion(2)));
        assert_eq!(drain(&mut m), vec![MuxEvent::Opened(3)]);
        assert_eq!(m.feed(&[1]), Err(SmuxError::BadVersion(2)));
        assert_eq!(m.write(3, b"x"), Err(SmuxError::BadVersion(2)));
        assert_eq!(m.error(), Some(&SmuxError::BadVersion(2)));

        for (bytes, err) in [
            ([1u8, 9, 0, 0, 0, 0, 0, 0], SmuxError::UnknownCommand(9)),
            (
                [1, 4, 8, 0, 3, 0, 0, 0],
                SmuxError::UnexpectedCommand(Cmd::Upd),
            ),
            (
                [1, 3, 1, 0, 0, 0, 0, 0],
                SmuxError::UnexpectedData {
                    cmd: Cmd::Nop,
                    length: 1,
                },
            ),
            (
                [1, 0, 2, 0, 3, 0, 0, 0],
                SmuxError::UnexpectedData {
                    cmd: Cmd::Syn,
                    length: 2,
                },
            ),
        ] {
            // Whole and split at every point: the error shows as soon as the header is in.
            let mut m = Mux::new(Role::Server, MuxConfig::default());
            assert_eq!(m.feed(&bytes), Err(err.clone()));
            for split in 1..HEADER_LEN {
                let mut m = Mux::new(Role::Server, MuxConfig::default());
                m.feed(&bytes[..split]).unwrap();
                assert_eq!(m.feed(&bytes[split..]), Err(err.clone()));
            }
        }
    }

    #[test]
    fn too_many_streams() {
        let mut m = Mux::new(
            Role::Server,
            MuxConfig {
                max_streams: 2,
                ..MuxConfig::default()
            },
        );
        let mut input = Vec::new();
        for sid in [1, 3, 3, 5] {
            Frame::syn(sid).encode_into(&mut input).unwrap();
        }
        assert_eq!(m.feed(&input), Err(SmuxError::TooManyStreams { limit: 2 }));
        assert_eq!(
            drain(&mut m),
            vec![MuxEvent::Opened(1), MuxEvent::Opened(3)]
        );
    }

    #[test]
    fn writes_split_at_max_frame_size_and_respect_output_limit() {
        let mut c = Mux::new(
            Role::Client,
            MuxConfig {
                max_frame_size: 10,
                max_pending_output: 40,
                ..MuxConfig::default()
            },
        );
        let sid = c.open_stream().unwrap();
        let data: Vec<u8> = (0..100).collect();
        // 8 bytes (SYN) pending ⇒ room for 32 data bytes.
        assert_eq!(c.write(sid, &data).unwrap(), 32);
        assert_eq!(c.write(sid, &data).unwrap(), 0);
        assert_eq!(c.pending_output_len(), 8 + 4 * 8 + 32);
        let mut out = Vec::new();
        c.take_output(&mut out);
        assert_eq!(c.pending_output_len(), 0);
        let mut s = Mux::new(Role::Server, MuxConfig::default());
        s.feed(&out).unwrap();
        let ev = drain(&mut s);
        assert_eq!(ev[0], MuxEvent::Opened(3));
        let lens: Vec<usize> = ev[1..]
            .iter()
            .map(|e| match e {
                MuxEvent::Data(3, d) => d.len(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(lens, [10, 10, 10, 2]);
        assert_eq!(c.write(sid, &[]).unwrap(), 0);
        assert_eq!(c.pending_output_len(), 0);
    }

    #[test]
    fn poll_output_max_cuts_anywhere() {
        let mut c = Mux::new(Role::Client, MuxConfig::default());
        let sid = c.open_stream().unwrap();
        c.write(sid, &[7u8; 3000]).unwrap();
        c.send_nop();
        let mut s = Mux::new(Role::Server, MuxConfig::default());
        while let Some(chunk) = c.poll_output_max(1024) {
            assert!(chunk.len() <= 1024);
            s.feed_bytes(chunk).unwrap();
        }
        assert_eq!(
            drain(&mut s),
            vec![
                MuxEvent::Opened(3),
                MuxEvent::Data(3, Bytes::from(vec![7u8; 3000]))
            ]
        );
    }

    #[test]
    fn many_streams_round_trip() {
        let mut client = Mux::new(Role::Client, MuxConfig::default());
        let mut server = Mux::new(Role::Server, MuxConfig::default());
        let n = 200u32;
        let mut sids = Vec::new();
        for i in 0..n {
            let sid = client.open_stream().unwrap();
            let msg = vec![i as u8; (i as usize * 397) % 70_000];
            assert_eq!(client.write(sid, &msg).unwrap(), msg.len());
            sids.push((sid, msg));
            // Drain in odd-sized pieces to split frames across chunks.
            while let Some(chunk) = client.poll_output_max(1000 + i as usize) {
                server.feed_bytes(chunk).unwrap();
            }
        }
        for (sid, _) in &sids {
            client.close(*sid).unwrap();
        }
        let mut wire = Vec::new();
        client.take_output(&mut wire);
        for piece in wire.chunks(7) {
            server.feed(piece).unwrap();
        }

        let mut got: HashMap<StreamId, (bool, Vec<u8>, bool)> = HashMap::new();
        let mut echoes = Vec::new();
        while let Some(ev) = server.poll_event() {
            match ev {
                MuxEvent::Opened(sid) => {
                    assert!(got.insert(sid, (true, Vec::new(), false)).is_none());
                }
                MuxEvent::Data(sid, d) => {
                    let e = got.get_mut(&sid).unwrap();
                    assert!(d.len() <= DEFAULT_MAX_FRAME_SIZE);
                    e.1.extend_from_slice(&d);
                }
                MuxEvent::Closed(sid) => {
                    let e = got.get_mut(&sid).unwrap();
                    e.2 = true;
                    echoes.push(sid);
                }
            }
        }
        assert_eq!(got.len(), n as usize);
        for (sid, msg) in &sids {
            let (opened, data, closed) = &got[sid];
            assert!(*opened && *closed);
            assert_eq!(data, msg, "stream {sid}");
        }
        // Server answers on each stream and closes; the client, which already forgot the
        // streams, drops it all without events.
        for sid in echoes {
            server.write(sid, b"bye").unwrap();
            server.close(sid).unwrap();
        }
        assert_eq!(server.stream_count(), 0);
        let mut back = Vec::new();
        server.take_output(&mut back);
        client.feed(&back).unwrap();
        assert_eq!(client.poll_event(), None);
    }

    #[test]
    fn server_to_client_data_and_close() {
        let mut client = Mux::new(Role::Client, MuxConfig::default());
        let mut server = Mux::new(Role::Server, MuxConfig::default());
        let a = client.open_stream().unwrap();
        let b = client.open_stream().unwrap();
        server.feed_bytes(client.poll_output().unwrap()).unwrap();
        assert_eq!(
            drain(&mut server),
            vec![MuxEvent::Opened(a), MuxEvent::Opened(b)]
        );
        server.write(b, b"to b").unwrap();
        server.write(a, b"to a").unwrap();
        server.close(a).unwrap();
        client.feed_bytes(server.poll_output().unwrap()).unwrap();
        assert_eq!(
            drain(&mut client),
            vec![
                MuxEvent::Data(b, Bytes::from_static(b"to b")),
                MuxEvent::Data(a, Bytes::from_static(b"to a")),
                MuxEvent::Closed(a),
            ]
        );
        assert!(client.is_peer_closed(a));
        assert!(!client.is_peer_closed(b));
        assert_eq!(client.stream_count(), 2);
    }
}
