//! Local connections of the port modes: one reader and one writer task per accepted
//! connection, each blocking only on its own socket.
//!
//! The mode never awaits a connection: it grants the reader one read at a time
//! ([`Conn::grant_read`]), queues writes without waiting ([`Conn::write`]) and learns what
//! happened from [`LocalEvent`]s on one queue. What is queued for the writer is bounded by
//! the mode's accounting ([`ssm_wire::port::PortSession`] counts bytes until the writer
//! reports them written), not by the queue, so a local client that stops reading stalls
//! its own writer task and nothing else.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::debug;

pub type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
pub type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// What a connection's tasks report, tagged with the mode's id for it.
#[derive(Debug)]
pub enum LocalEvent<Id> {
    /// One granted read returned data.
    Read(Id, Bytes),
    /// One granted read returned EOF: the local side will send nothing more.
    Eof(Id),
    /// Bytes reached the local socket.
    Written(Id, usize),
    /// The local connection failed (reset, vanished) in either direction.
    Gone(Id),
    /// The writer finished: everything queued was written and the write half shut down.
    Closed(Id),
}

enum WriteCmd {
    Data(Bytes),
    Shutdown,
}

/// The mode's handle on one local connection. Dropping it stops both tasks.
pub struct Conn {
    reads: mpsc::UnboundedSender<()>,
    writes: mpsc::UnboundedSender<WriteCmd>,
    reader: JoinHandle<()>,
    writer: Option<JoinHandle<()>>,
}

impl Conn {
    /// Starts the connection's reader and writer; they report on `events`.
    pub fn spawn<Id: Copy + Send + 'static>(
        id: Id,
        r: BoxRead,
        w: BoxWrite,
        read_size: usize,
        events: mpsc::UnboundedSender<LocalEvent<Id>>,
    ) -> Conn {
        let (reads, reads_rx) = mpsc::unbounded_channel();
        let (writes, writes_rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(read_loop(id, r, read_size, reads_rx, events.clone()));
        let writer = tokio::spawn(write_loop(id, w, writes_rx, events));
        Conn {
            reads,
            writes,
            reader,
            writer: Some(writer),
        }
    }

    /// Lets the reader take one more read.
    pub fn grant_read(&self) {
        let _ = self.reads.send(());
    }

    /// Queues bytes for the local socket, after those queued before.
    pub fn write(&self, data: Bytes) {
        let _ = self.writes.send(WriteCmd::Data(data));
    }

    /// Shuts the write half down once what is queued is written.
    pub fn shutdown(&self) {
        let _ = self.writes.send(WriteCmd::Shutdown);
    }

    /// Stops reading; the writer goes on with what is queued and then shuts down. Returns
    /// the writer, for a bounded wait at the end of the session.
    pub fn finish(mut self) -> Option<JoinHandle<()>> {
        self.reader.abort();
        let _ = self.writes.send(WriteCmd::Shutdown);
        self.writer.take()
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
        if let Some(w) = &self.writer {
            w.abort();
        }
    }
}

async fn read_loop<Id: Copy>(
    id: Id,
    mut r: BoxRead,
    read_size: usize,
    mut grants: mpsc::UnboundedReceiver<()>,
    events: mpsc::UnboundedSender<LocalEvent<Id>>,
) {
    let mut buf = BytesMut::with_capacity(read_size);
    while grants.recv().await.is_some() {
        buf.reserve(read_size);
        let ev = match r.read_buf(&mut buf).await {
            Ok(0) => LocalEvent::Eof(id),
            Ok(_) => LocalEvent::Read(id, buf.split().freeze()),
            Err(e) => {
                debug!("local read: {e}");
                LocalEvent::Gone(id)
            }
        };
        let last = !matches!(ev, LocalEvent::Read(..));
        if events.send(ev).is_err() || last {
            return;
        }
    }
}

async fn write_loop<Id: Copy>(
    id: Id,
    mut w: BoxWrite,
    mut cmds: mpsc::UnboundedReceiver<WriteCmd>,
    events: mpsc::UnboundedSender<LocalEvent<Id>>,
) {
    while let Some(cmd) = cmds.recv().await {
        match cmd {
            WriteCmd::Data(b) => {
                if let Err(e) = w.write_all(&b).await {
                    debug!("local write: {e}");
                    let _ = events.send(LocalEvent::Gone(id));
                    return;
                }
                if events.send(LocalEvent::Written(id, b.len())).is_err() {
                    return;
                }
            }
            WriteCmd::Shutdown => break,
        }
    }
    let _ = w.shutdown().await;
    let _ = events.send(LocalEvent::Closed(id));
}
