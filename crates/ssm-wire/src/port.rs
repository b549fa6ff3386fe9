//! Multiplexed port forwarding (PROTOCOL.md §8.4) as a sans-I/O state machine.
//!
//! A [`PortSession`] owns the smux client ([`Mux`]), one upload buffer and one download
//! account per local connection, and the order in which connections take turns for the
//! channel. Its I/O shell (the binary's port mode) accepts connections, reads from them
//! when the session grants a read, writes what the session yields, and hands the session
//! the channel's Output payloads while it wants them:
//!
//! - [`PortSession::open`] for an accepted connection; [`PortSession::handle_read`],
//!   [`PortSession::handle_read_eof`] and [`PortSession::handle_local_gone`] for what its
//!   reader saw; [`PortSession::handle_written`] when bytes reached the local socket.
//! - [`PortSession::handle_remote`] for each Output payload, while
//!   [`PortSession::wants_remote`] says so.
//! - [`PortSession::poll_transmit`] for the next channel payload, called only when the
//!   channel has room and a pacer token for it: the one place that decides which
//!   connection sends next.
//! - [`PortSession::poll_event`] for what the shell must do: grant a read, write bytes to a
//!   local connection, shut one down.
//!
//! # Turn order
//!
//! Each turn is one piece (at most one channel frame's worth) of one connection, round
//! robin. A connection that had nothing waiting when its data came goes before the ones
//! that have been busy all along (fq_codel's new-flow rule), so a keystroke waits behind at
//! most one frame however many bulk uploads run. Pieces are joined across reads, so frames
//! stay full whatever sizes the reads had.
//!
//! # Bounds
//!
//! A connection holds at most two reads' worth of upload (the rest waits in the kernel).
//! Downloads are counted from the moment the session yields them until the shell reports
//! them written. smux v1 has no per-stream window, so a local reader that stops reading can
//! only be absorbed: until its connection has [`PortConfig::max_conn_buffered`] bytes
//! unwritten (or all connections together [`PortConfig::max_total_buffered`]), every other
//! connection keeps flowing; past that, [`PortSession::wants_remote`] turns false and the
//! shell stops taking Output, which backs up into the channel and the WebSocket.

use std::collections::{HashMap, VecDeque};

use bytes::{Bytes, BytesMut};

use crate::smux::{Mux, MuxConfig, MuxEvent, Role, SmuxError, StreamId, HEADER_LEN};

/// Identifies a local connection: its smux stream id.
pub type ConnId = StreamId;

/// Limits of a [`PortSession`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortConfig {
    /// Most mux bytes one [`PortSession::poll_transmit`] returns: one channel frame's data
    /// when paced. At least `HEADER_LEN + 1`.
    pub chunk: usize,
    /// Bytes the shell reads from a local connection at a time; a connection is granted
    /// another read once less than this waits in its upload buffer.
    pub read_size: usize,
    /// Download bytes one connection may have unwritten before the session stops taking
    /// Output.
    pub max_conn_buffered: usize,
    /// Download bytes all connections together may have unwritten.
    pub max_total_buffered: usize,
}

impl Default for PortConfig {
    fn default() -> PortConfig {
        PortConfig {
            chunk: 1024,
            read_size: 4096,
            max_conn_buffered: 16 * 1024 * 1024,
            max_total_buffered: 64 * 1024 * 1024,
        }
    }
}

/// What the shell must do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortEvent {
    /// Read once more from this connection (at most `read_size` bytes) and hand the result
    /// to [`PortSession::handle_read`] or [`PortSession::handle_read_eof`].
    Read(ConnId),
    /// Write these bytes to the connection, after those yielded before; report them with
    /// [`PortSession::handle_written`].
    Write(ConnId, Bytes),
    /// The remote side closed the stream: shut down the connection's write half once the
    /// writes before this one are done.
    Shutdown(ConnId),
    /// The connection is finished in both directions: drop its handles.
    Finished(ConnId),
}

/// Errors of [`PortSession`] operations.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    /// The agent's smux bytes broke the protocol: the session cannot go on.
    #[error("port forwarding stream error: {0}")]
    Mux(#[from] SmuxError),
    #[error("unknown connection {0}")]
    UnknownConnection(ConnId),
}

#[derive(Debug, Default)]
struct Conn {
    /// Upload bytes waiting for their turn.
    pending: VecDeque<Bytes>,
    pending_len: usize,
    /// A read was granted and has not come back yet.
    reading: bool,
    /// The local side reached EOF: close the stream once `pending` is out.
    eof: bool,
    /// The stream's FIN is queued (or the stream is gone): nothing more goes up.
    up_done: bool,
    /// The remote side closed the stream (or the local side is gone): nothing more comes
    /// down.
    down_done: bool,
    /// The local connection failed: its writes are discarded.
    gone: bool,
    /// Download bytes yielded and not yet reported written.
    unwritten: usize,
    /// In the turn order already.
    queued: bool,
}

/// The multiplexed port-forwarding session. See the [module documentation](self).
#[derive(Debug)]
pub struct PortSession {
    config: PortConfig,
    mux: Mux,
    conns: HashMap<ConnId, Conn>,
    /// Connections with something to send that were idle when it came, then the busy ones.
    fresh: VecDeque<ConnId>,
    busy: VecDeque<ConnId>,
    events: VecDeque<PortEvent>,
    total_unwritten: usize,
    /// Connections whose unwritten downloads reached `max_conn_buffered`.
    over_bound: usize,
    /// Why the session can no longer send (see [`PortSession::error`]).
    failed: Option<PortError>,
}

impl PortSession {
    pub fn new(mut config: PortConfig) -> PortSession {
        config.chunk = config.chunk.max(HEADER_LEN + 1);
        config.read_size = config.read_size.max(1);
        PortSession {
            config,
            mux: Mux::new(Role::Client, MuxConfig::default()),
            conns: HashMap::new(),
            fresh: VecDeque::new(),
            busy: VecDeque::new(),
            events: VecDeque::new(),
            total_unwritten: 0,
            over_bound: 0,
            failed: None,
        }
    }

    pub fn config(&self) -> &PortConfig {
        &self.config
    }

    /// Data bytes of one connection per turn.
    fn piece(&self) -> usize {
        self.config.chunk - HEADER_LEN
    }

    /// A new local connection: opens its stream and grants its first read.
    pub fn open(&mut self) -> Result<ConnId, PortError> {
        let id = self.mux.open_stream()?;
        self.conns.insert(
            id,
            Conn {
                reading: true,
                ..Conn::default()
            },
        );
        self.events.push_back(PortEvent::Read(id));
        Ok(id)
    }

    /// Local connections not yet finished.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Download bytes yielded and not yet written, over all connections.
    pub fn buffered_down(&self) -> usize {
        self.total_unwritten
    }

    /// Upload bytes waiting for their turn, over all connections.
    pub fn buffered_up(&self) -> usize {
        self.conns.values().map(|c| c.pending_len).sum()
    }

    /// What one connection has unwritten (None: unknown or finished).
    pub fn conn_buffered_down(&self, id: ConnId) -> Option<usize> {
        self.conns.get(&id).map(|c| c.unwritten)
    }

    /// Bytes the connection's reader returned.
    pub fn handle_read(&mut self, id: ConnId, data: Bytes) -> Result<(), PortError> {
        let conn = self
            .conns
            .get_mut(&id)
            .ok_or(PortError::UnknownConnection(id))?;
        conn.reading = false;
        if conn.up_done || conn.gone {
            return Ok(());
        }
        let was_idle = conn.pending.is_empty();
        if !data.is_empty() {
            conn.pending_len += data.len();
            conn.pending.push_back(data);
        }
        if was_idle && !conn.queued && !conn.pending.is_empty() {
            conn.queued = true;
            self.fresh.push_back(id);
        }
        self.refill(id);
        Ok(())
    }

    /// The connection's reader saw EOF: FIN after what is pending, like the official plugin.
    pub fn handle_read_eof(&mut self, id: ConnId) -> Result<(), PortError> {
        let conn = self
            .conns
            .get_mut(&id)
            .ok_or(PortError::UnknownConnection(id))?;
        conn.reading = false;
        if conn.eof || conn.up_done {
            return Ok(());
        }
        conn.eof = true;
        if !conn.queued {
            conn.queued = true;
            self.fresh.push_back(id);
        }
        Ok(())
    }

    /// The local connection failed (reset, vanished): its stream is closed at once, what
    /// it had not sent yet is dropped, and downloads for it are discarded.
    pub fn handle_local_gone(&mut self, id: ConnId) -> Result<(), PortError> {
        let conn = self
            .conns
            .get_mut(&id)
            .ok_or(PortError::UnknownConnection(id))?;
        conn.gone = true;
        conn.reading = false;
        conn.pending.clear();
        conn.pending_len = 0;
        conn.down_done = true;
        let unwritten = std::mem::take(&mut conn.unwritten);
        let was_over = unwritten >= self.config.max_conn_buffered;
        if !conn.up_done {
            conn.up_done = true;
            if self.mux.is_open(id) {
                self.mux.close(id)?;
            }
        }
        self.total_unwritten -= unwritten;
        if was_over {
            self.over_bound -= 1;
        }
        self.finish_if_done(id);
        Ok(())
    }

    /// The shell wrote `n` bytes of the connection's downloads to its local socket.
    pub fn handle_written(&mut self, id: ConnId, n: usize) -> Result<(), PortError> {
        let conn = self
            .conns
            .get_mut(&id)
            .ok_or(PortError::UnknownConnection(id))?;
        let n = n.min(conn.unwritten);
        let was_over = conn.unwritten >= self.config.max_conn_buffered;
        conn.unwritten -= n;
        self.total_unwritten -= n;
        if was_over && conn.unwritten < self.config.max_conn_buffered {
            self.over_bound -= 1;
        }
        self.finish_if_done(id);
        Ok(())
    }

    /// Whether the shell should hand over the channel's next Output: false while one
    /// connection or all of them together hold their bound of unwritten downloads.
    pub fn wants_remote(&self) -> bool {
        self.over_bound == 0 && self.total_unwritten < self.config.max_total_buffered
    }

    /// One Output payload from the channel (smux bytes, split anywhere).
    pub fn handle_remote(&mut self, data: Bytes) -> Result<(), PortError> {
        let fed = self.mux.feed_bytes(data);
        // Events of every complete frame before an error are still delivered.
        while let Some(ev) = self.mux.poll_event() {
            match ev {
                MuxEvent::Data(id, data) => self.on_remote_data(id, data),
                MuxEvent::Closed(id) => {
                    if let Some(conn) = self.conns.get_mut(&id) {
                        if !conn.down_done {
                            conn.down_done = true;
                            self.events.push_back(PortEvent::Shutdown(id));
                        }
                        // The remote will send nothing more; a reader still waiting for a
                        // local EOF keeps the stream open for the upload direction.
                        self.finish_if_done(id);
                    }
                }
                // The agent never opens streams; smux's server would accept it, we ignore it.
                MuxEvent::Opened(_) => {}
            }
        }
        fed.map_err(PortError::from)
    }

    fn on_remote_data(&mut self, id: ConnId, data: Bytes) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        if conn.gone || conn.down_done || data.is_empty() {
            return;
        }
        let was_over = conn.unwritten >= self.config.max_conn_buffered;
        conn.unwritten += data.len();
        self.total_unwritten += data.len();
        if !was_over && conn.unwritten >= self.config.max_conn_buffered {
            self.over_bound += 1;
        }
        self.events.push_back(PortEvent::Write(id, data));
    }

    /// Whether [`PortSession::poll_transmit`] has something to give.
    pub fn has_transmit(&self) -> bool {
        self.failed.is_none()
            && (self.mux.pending_output_len() > 0
                || !self.fresh.is_empty()
                || !self.busy.is_empty())
    }

    /// Why the session cannot send any more: set when the mux refused a connection's data,
    /// which then stays where it was instead of being dropped. The shell must end the
    /// session with this error.
    pub fn error(&self) -> Option<&PortError> {
        self.failed.as_ref()
    }

    /// The next channel payload: queued smux frames (SYN, FIN), else one piece of the next
    /// connection in turn. At most `chunk` bytes. Call it only when the channel can send it
    /// now: what this returns has left every connection's buffer.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        if self.failed.is_some() {
            return None;
        }
        if self.mux.pending_output_len() == 0 {
            self.next_turn();
        }
        self.mux.poll_output_max(self.config.chunk)
    }

    /// Gives the next connection in turn one piece (or its FIN) in the mux; it goes to the
    /// back of the busy line while it has more.
    fn next_turn(&mut self) {
        let piece = self.piece();
        while let Some(id) = self.fresh.pop_front().or_else(|| self.busy.pop_front()) {
            let Some(conn) = self.conns.get_mut(&id) else {
                continue;
            };
            conn.queued = false;
            if conn.up_done {
                continue;
            }
            let mut wrote = false;
            if let Some(data) = take(conn, piece) {
                // The mux's output was drained before this turn, so it takes the piece.
                match self.mux.write(id, &data) {
                    Ok(n) if n < data.len() => {
                        conn.pending_len += data.len() - n;
                        conn.pending.push_front(data.slice(n..));
                    }
                    Ok(_) => {}
                    // The mux is dead (a protocol error from the agent): the data cannot
                    // go anywhere. Keep it, stop taking turns, and say so.
                    Err(e) => {
                        conn.pending.push_front(data);
                        conn.pending_len += conn.pending.front().map_or(0, Bytes::len);
                        self.failed = Some(PortError::Mux(e));
                        self.fresh.clear();
                        self.busy.clear();
                        return;
                    }
                }
                wrote = true;
            }
            if !conn.pending.is_empty() {
                conn.queued = true;
                self.busy.push_back(id);
            } else if conn.eof && !conn.up_done {
                // smux has no half-close: after this end's FIN the mux drops whatever the
                // agent still sends for the stream (the agent closes its side too), so the
                // download direction ends here as well.
                conn.up_done = true;
                if self.mux.is_open(id) {
                    let _ = self.mux.close(id);
                }
                if !conn.down_done {
                    conn.down_done = true;
                    self.events.push_back(PortEvent::Shutdown(id));
                }
                wrote = true;
            }
            self.refill(id);
            self.finish_if_done(id);
            if wrote {
                return;
            }
        }
    }

    /// Grants the reader another read once little is left, so a bulk connection always has
    /// its next piece ready while holding at most two reads' worth.
    fn refill(&mut self, id: ConnId) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        if !conn.reading
            && !conn.eof
            && !conn.up_done
            && !conn.gone
            && conn.pending_len < self.config.read_size
        {
            conn.reading = true;
            self.events.push_back(PortEvent::Read(id));
        }
    }

    fn finish_if_done(&mut self, id: ConnId) {
        let done = self
            .conns
            .get(&id)
            .is_some_and(|c| c.up_done && c.down_done && c.unwritten == 0 && !c.reading);
        if done {
            self.conns.remove(&id);
            self.events.push_back(PortEvent::Finished(id));
        }
    }

    /// The next thing the shell must do.
    pub fn poll_event(&mut self) -> Option<PortEvent> {
        self.events.pop_front()
    }
}

/// What the basic-mode session sends up, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BasicTransmit {
    /// Bytes read from the local connection.
    Data(Bytes),
    /// The local connection ended: the agent closes its side and redials on the next data.
    DisconnectToPort,
}

/// Port forwarding for agents up to 3.0.196.0 (PROTOCOL.md §8.5): one local connection at
/// a time, its bytes straight into the channel, `DisconnectToPort` when it ends.
///
/// The shell accepts a connection only while [`BasicPortSession::is_connected`] is false,
/// reads when [`BasicPortSession::take_read_grant`] says so (one read per grant, and the
/// next only once the last one has gone up), and writes every Output to the connection,
/// counting it with [`BasicPortSession::handle_remote`] until it is written; Output waits in
/// the channel while the connection has `max_buffered` bytes unwritten.
#[derive(Debug)]
pub struct BasicPortSession {
    max_buffered: usize,
    connected: bool,
    reading: bool,
    grant: bool,
    disconnected: bool,
    up: VecDeque<BasicTransmit>,
    unwritten: usize,
}

impl BasicPortSession {
    pub fn new(max_buffered: usize) -> BasicPortSession {
        BasicPortSession {
            max_buffered: max_buffered.max(1),
            connected: false,
            reading: false,
            grant: false,
            disconnected: false,
            up: VecDeque::new(),
            unwritten: 0,
        }
    }

    /// A local connection is being served.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// A connection was accepted: its first read is granted.
    pub fn handle_accept(&mut self) {
        self.connected = true;
        self.disconnected = false;
        self.reading = true;
        self.grant = true;
        self.unwritten = 0;
    }

    /// Whether the shell should issue one read now (once per grant).
    pub fn take_read_grant(&mut self) -> bool {
        std::mem::take(&mut self.grant)
    }

    /// Whether the connection ended since the last call: drop its handles.
    pub fn take_disconnected(&mut self) -> bool {
        std::mem::take(&mut self.disconnected)
    }

    /// One granted read returned data.
    pub fn handle_read(&mut self, data: Bytes) {
        if !self.connected {
            return;
        }
        self.reading = false;
        if !data.is_empty() {
            self.up.push_back(BasicTransmit::Data(data));
        }
        self.regrant();
    }

    /// The local connection reached EOF or failed.
    pub fn handle_local_closed(&mut self) {
        if !self.connected {
            return;
        }
        self.connected = false;
        self.reading = false;
        self.grant = false;
        self.disconnected = true;
        self.unwritten = 0;
        self.up.push_back(BasicTransmit::DisconnectToPort);
    }

    /// Output of `n` bytes handed to the connection's writer.
    pub fn handle_remote(&mut self, n: usize) {
        if self.connected {
            self.unwritten += n;
        }
    }

    /// `n` bytes reached the local socket.
    pub fn handle_written(&mut self, n: usize) {
        self.unwritten = self.unwritten.saturating_sub(n);
    }

    /// Whether the shell should take the channel's next Output.
    pub fn wants_remote(&self) -> bool {
        self.unwritten < self.max_buffered
    }

    pub fn has_transmit(&self) -> bool {
        !self.up.is_empty()
    }

    /// The next thing to send; call it only when the channel can take it.
    pub fn poll_transmit(&mut self) -> Option<BasicTransmit> {
        let next = self.up.pop_front();
        self.regrant();
        next
    }

    fn regrant(&mut self) {
        if self.connected && !self.reading && self.up.is_empty() {
            self.reading = true;
            self.grant = true;
        }
    }
}

/// Takes up to `max` bytes from the front: a slice of one read when it has enough, so full
/// frames cost no copy, else the ends of consecutive reads joined, so frames stay full.
fn take(conn: &mut Conn, max: usize) -> Option<Bytes> {
    let front = conn.pending.front_mut()?;
    let piece = if front.len() > max {
        front.split_to(max)
    } else if front.len() == max || conn.pending.len() == 1 {
        conn.pending.pop_front()?
    } else {
        let mut joined = BytesMut::with_capacity(max.min(conn.pending_len));
        while joined.len() < max {
            let Some(front) = conn.pending.front_mut() else {
                break;
            };
            let n = front.len().min(max - joined.len());
            joined.extend_from_slice(&front.split_to(n));
            if front.is_empty() {
                conn.pending.pop_front();
            }
        }
        joined.freeze()
    };
    conn.pending_len -= piece.len();
    Some(piece)
}

#[cfg(test)]
mod tests;
