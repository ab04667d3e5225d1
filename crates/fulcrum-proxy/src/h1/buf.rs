//! The read buffer of a connection, shared by the upstream client and the client-side server.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::TcpStream;

/// A read buffer: initialized bytes, `start..end` holding data not consumed yet. It starts
/// at `initial` bytes and grows (doubling) up to `max` when a message head needs it.
pub(crate) struct InBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    initial: usize,
    max: usize,
}

impl InBuf {
    pub(crate) fn new(initial: usize, max: usize) -> InBuf {
        InBuf { buf: vec![0; initial], start: 0, end: 0, initial, max }
    }

    pub(crate) fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub(crate) fn len(&self) -> usize {
        self.end - self.start
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub(crate) fn consume(&mut self, n: usize) {
        self.start += n;
        debug_assert!(self.start <= self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Takes everything not consumed yet, leaving the buffer empty.
    pub(crate) fn take_all(&mut self) -> bytes::Bytes {
        let out = bytes::Bytes::copy_from_slice(self.data());
        self.start = 0;
        self.end = 0;
        out
    }

    /// Gives back the memory a long head made it grow by, once it holds nothing.
    pub(crate) fn shrink_if_empty(&mut self) {
        if self.is_empty() && self.buf.len() > self.initial {
            self.buf = vec![0; self.initial];
        }
    }

    /// Whether there is (or can be made) room for more bytes.
    pub(crate) fn has_room(&mut self) -> bool {
        self.make_room()
    }

    /// Makes free space at the end if there is none (moving data to the front, or growing up
    /// to `max`); false when the buffer is full at `max`.
    fn make_room(&mut self) -> bool {
        if self.end < self.buf.len() {
            return true;
        }
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            true
        } else if self.buf.len() < self.max {
            let len = (self.buf.len() * 2).min(self.max);
            self.buf.resize(len, 0);
            true
        } else {
            false
        }
    }

    /// Reads once from `stream` into the free space (making some if needed); `Ok(0)` is the
    /// end of the stream.
    pub(crate) fn poll_fill<S: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        stream: &mut S,
    ) -> Poll<io::Result<usize>> {
        if !self.make_room() {
            // The head parsers refuse a head this long before it gets here.
            return Poll::Ready(Err(io::Error::other("read buffer full")));
        }
        let mut rb = ReadBuf::new(&mut self.buf[self.end..]);
        ready!(Pin::new(stream).poll_read(cx, &mut rb))?;
        let n = rb.filled().len();
        self.end += n;
        Poll::Ready(Ok(n))
    }

    /// Reads what `stream` holds without waiting (`WouldBlock` when nothing), if there is
    /// room; `None` when the buffer is full.
    pub(crate) fn try_fill(&mut self, stream: &TcpStream) -> Option<io::Result<usize>> {
        if !self.make_room() {
            return None;
        }
        let r = stream.try_read(&mut self.buf[self.end..]);
        if let Ok(n) = r {
            self.end += n;
        }
        Some(r)
    }
}
