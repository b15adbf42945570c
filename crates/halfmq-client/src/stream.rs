//! Moving frames between a socket and memory, shared by the server and the client: a read
//! buffer that hands out complete frames without moving the bytes behind them, and a writer
//! that sends whatever frames are queued in one write.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::frame;
use halfmq_types::error::Result;

/// Bytes asked of the socket per read (at least).
const READ_CHUNK: usize = 64 * 1024;
/// A read buffer that grew past this for a large frame is given back once it is empty.
const READ_KEEP_BYTES: usize = 1024 * 1024;
/// Most bytes one write gathers from queued frames. A larger frame is written alone.
pub const WRITE_BATCH_BYTES: usize = 256 * 1024;

/// Bytes read from a socket and not yet taken as frames. Frames are taken from the front by
/// moving a cursor; the unread rest moves to the front once per read (not once per frame).
/// It holds at most one read beyond one frame: less than `frame_bytes_max + READ_CHUNK`.
pub struct ReadBuf {
    buf: Vec<u8>,
    start: usize,
}

impl Default for ReadBuf {
    fn default() -> Self {
        ReadBuf::new()
    }
}

impl ReadBuf {
    pub fn new() -> ReadBuf {
        ReadBuf {
            buf: Vec::with_capacity(READ_CHUNK),
            start: 0,
        }
    }

    /// The bytes not yet taken.
    pub fn pending(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.buf.len()
    }

    /// The length of the complete frame at the front, if there is one (see [`frame::check`]).
    pub fn next_frame(&self, frame_bytes_max: u32) -> Result<Option<usize>> {
        frame::check(self.pending(), frame_bytes_max)
    }

    /// Take `n` bytes (a frame measured by [`ReadBuf::next_frame`]) from the front.
    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.buf.len());
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
            if self.buf.capacity() > READ_KEEP_BYTES {
                self.buf = Vec::with_capacity(READ_CHUNK);
            }
        }
    }

    /// Read once from `rd` straight into the buffer; `Ok(0)` at the end of the stream.
    pub async fn read_from<R: AsyncRead + Unpin>(&mut self, rd: &mut R) -> io::Result<usize> {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.reserve(READ_CHUNK);
        rd.read_buf(&mut self.buf).await
    }
}

/// Write the frames `rx` yields to `wr` until the channel closes or a write fails. After
/// each wait for a frame, if `more_may_come` says other frames may be made ready by the same
/// event (the server: requests of the connection not answered yet; the client: other
/// requests outstanding, or a read that released several answers), the writer yields once
/// to the tasks that are ready to run, then the frames queued behind the first go out in the
/// same write (up to [`WRITE_BATCH_BYTES`]), so a burst of answers costs one system call, not
/// one each. Otherwise a lone frame is written at once: the yield would cost a trip through
/// the scheduler and an `epoll_wait` of the runtime's driver, all of it latency for a lone
/// producer, with nothing to join its write. A frame with nothing queued behind it is
/// written as it is, without a copy.
///
/// A frame is any owner of its bytes (`F: AsRef<[u8]>`); each is dropped only once its
/// bytes are written (or the write failed), so a frame type that releases something on drop
/// (the server's room for outgoing bytes) releases it then.
pub async fn write_frames_gathering<W: AsyncWrite + Unpin, F: AsRef<[u8]>>(
    wr: &mut W,
    rx: &mut mpsc::Receiver<F>,
    more_may_come: impl Fn() -> bool,
) -> io::Result<()> {
    let mut batch: Vec<u8> = Vec::new();
    let mut batched: Vec<F> = Vec::new();
    let mut held: Option<F> = None;
    loop {
        let first = match held.take() {
            Some(f) => f,
            None => match rx.recv().await {
                Some(f) => f,
                None => return Ok(()),
            },
        };
        let second = if first.as_ref().len() < WRITE_BATCH_BYTES {
            match rx.try_recv().ok() {
                Some(f) => Some(f),
                None if !more_may_come() => None,
                None => {
                    // The task that queued `first` woke this one, and tokio runs a task woken
                    // this way next: the other answers (or requests) made ready by the same
                    // event have not run yet. Let them run first and join this write.
                    tokio::task::yield_now().await;
                    rx.try_recv().ok()
                }
            }
        } else {
            None
        };
        let Some(second) = second else {
            wr.write_all(first.as_ref()).await?;
            continue;
        };
        batch.clear();
        batch.extend_from_slice(first.as_ref());
        batched.push(first);
        let mut next = Some(second);
        while let Some(f) = next.take() {
            if batch.len() + f.as_ref().len() > WRITE_BATCH_BYTES {
                held = Some(f);
                break;
            }
            batch.extend_from_slice(f.as_ref());
            batched.push(f);
            next = rx.try_recv().ok();
        }
        wr.write_all(&batch).await?;
        batched.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::FrameKind;

    fn frame_of(id: u64, body_len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        frame::encode_into(
            &mut out,
            FrameKind::Response,
            id,
            &vec![7; body_len],
            1 << 24,
        )
        .unwrap();
        out
    }

    /// Frames of the given (id, body length) sent through a writer all arrive, whole and in
    /// order, whether it yields for more frames (`more_may_come`) or writes each at once.
    async fn arrive_whole_and_in_order(frames: &[(u64, usize)], more_may_come: bool) {
        let (tx, mut rx) = mpsc::channel(1000);
        let mut want = Vec::new();
        for &(id, len) in frames {
            let f = frame_of(id, len);
            want.extend_from_slice(&f);
            tx.send(f).await.unwrap();
        }
        drop(tx);
        let (mut a, mut b) = tokio::io::duplex(64 * 1024);
        let writer = tokio::spawn(async move {
            write_frames_gathering(&mut a, &mut rx, move || more_may_come).await
        });
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap().unwrap();
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn frames_are_batched_in_order_and_within_the_limit() {
        let frames = [(1, 10), (2, 100_000), (3, 200_000), (4, 300_000), (5, 5)];
        arrive_whole_and_in_order(&frames, true).await;
    }

    #[tokio::test]
    async fn frames_written_without_waiting_for_company_arrive_whole_and_in_order() {
        let frames = [(1, 10), (2, 300_000), (3, 5), (4, 70_000), (5, 1)];
        arrive_whole_and_in_order(&frames, false).await;
    }

    #[tokio::test]
    async fn read_buf_takes_frames_across_reads() {
        let mut all = Vec::new();
        for id in 0..100 {
            all.extend_from_slice(&frame_of(id, (id as usize * 37) % 3000));
        }
        let (mut a, mut b) = tokio::io::duplex(1000);
        let bytes = all.clone();
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            a.write_all(&bytes).await.unwrap();
        });
        let mut rb = ReadBuf::new();
        let mut seen = 0;
        loop {
            while let Some(n) = rb.next_frame(1 << 24).unwrap() {
                let f = frame::parse_ref(&rb.pending()[..n]).unwrap();
                assert_eq!(f.correlation, seen);
                assert_eq!(f.body.len(), (seen as usize * 37) % 3000);
                seen += 1;
                rb.consume(n);
            }
            if rb.read_from(&mut b).await.unwrap() == 0 {
                break;
            }
        }
        assert_eq!(seen, 100);
        assert!(rb.is_empty());
    }
}
