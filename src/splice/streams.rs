//! Joining any two streams (a terminated TLS stream and its upstream):
//! poll-driven like [`super::tcp`], with a copy buffer borrowed from a
//! per-thread pool only while bytes wait to be written. An idle terminated
//! connection holds no copy buffer, only what its TLS session keeps.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{End, Side, Transfer};

/// Per-direction copy buffer while data moves: one TLS record's plaintext.
const BUF_LEN: usize = 16 * 1024;

/// Spare buffers kept per worker thread for the next burst.
const POOL_PER_THREAD: usize = 32;

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

fn take() -> Box<[u8]> {
    POOL.with(|pool| pool.borrow_mut().pop())
        .unwrap_or_else(|| vec![0u8; BUF_LEN].into_boxed_slice())
}

fn give(buf: Box<[u8]>) {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() < POOL_PER_THREAD {
            pool.push(buf);
        }
    });
}

/// One direction's state.
struct Direction {
    from: Side,
    /// Read but not yet written: the buffer and the unwritten range.
    held: Option<(Box<[u8]>, usize, usize)>,
    /// Written since the last flush.
    unflushed: bool,
    /// EOF read; shutting the writer down.
    eof: bool,
    done: bool,
    moved: u64,
}

impl Direction {
    fn new(from: Side) -> Self {
        Direction {
            from,
            held: None,
            unflushed: false,
            eof: false,
            done: false,
            moved: 0,
        }
    }

    /// Moves bytes until both sides would block (Pending), the EOF has been
    /// passed on (Ready(Ok)), or an error.
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
        progress: &mut bool,
    ) -> Poll<Result<(), (Side, io::Error)>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let to = self.from.other();
        loop {
            if let Some((buf, start, end)) = &mut self.held {
                let pending = buf.get(*start..*end).unwrap_or_default();
                let n =
                    ready!(Pin::new(&mut *writer).poll_write(cx, pending)).map_err(|e| (to, e))?;
                if n == 0 {
                    return Poll::Ready(Err((to, io::ErrorKind::WriteZero.into())));
                }
                *start += n;
                self.moved += n as u64;
                self.unflushed = true;
                *progress = true;
                if start >= end
                    && let Some((buf, ..)) = self.held.take()
                {
                    give(buf);
                }
                continue;
            }
            if self.eof {
                // Half-close: pass the EOF on; the other direction keeps flowing.
                ready!(Pin::new(&mut *writer).poll_shutdown(cx)).map_err(|e| (to, e))?;
                return Poll::Ready(Ok(()));
            }
            let mut buf = take();
            let mut read = ReadBuf::new(&mut buf);
            match Pin::new(&mut *reader).poll_read(cx, &mut read) {
                Poll::Pending => {
                    give(buf);
                    if self.unflushed {
                        ready!(Pin::new(&mut *writer).poll_flush(cx)).map_err(|e| (to, e))?;
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => {
                    give(buf);
                    return Poll::Ready(Err((self.from, e)));
                }
                Poll::Ready(Ok(())) => {
                    let n = read.filled().len();
                    if n == 0 {
                        give(buf);
                        self.eof = true;
                    } else {
                        self.held = Some((buf, 0, n));
                        *progress = true;
                    }
                }
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// Two streams copied into each other until both directions are done,
    /// one side fails, or nothing moves for `idle`. A plain future that owns
    /// its streams, so it can be a connection's whole task.
    pub struct StreamJoin<C, T> {
        client: C,
        target: T,
        up: Direction,
        down: Direction,
        #[pin]
        deadline: super::IdleDeadline,
    }

    impl<C, T> PinnedDrop for StreamJoin<C, T> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            for dir in [this.up, this.down] {
                if let Some((buf, ..)) = dir.held.take() {
                    give(buf);
                }
            }
        }
    }
}

impl<C, T> StreamJoin<C, T> {
    pub fn new(client: C, target: T, idle: Duration) -> Self {
        StreamJoin {
            client,
            target,
            up: Direction::new(Side::Client),
            down: Direction::new(Side::Target),
            deadline: super::IdleDeadline::new(idle),
        }
    }
}

impl<C, T> super::Progress for StreamJoin<C, T> {
    fn moved(&self) -> super::Moved {
        super::Moved {
            to_target: self.up.moved,
            to_client: self.down.moved,
        }
    }
}

impl<C, T> Future for StreamJoin<C, T>
where
    C: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    type Output = Transfer;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Transfer> {
        let this = self.project();
        let mut progress = false;
        let mut end = None;
        if !this.up.done {
            match this.up.poll(cx, this.client, this.target, &mut progress) {
                Poll::Ready(Ok(())) => this.up.done = true,
                Poll::Ready(Err((side, e))) => end = Some(End::Error(side, e)),
                Poll::Pending => {}
            }
        }
        if end.is_none() && !this.down.done {
            match this.down.poll(cx, this.target, this.client, &mut progress) {
                Poll::Ready(Ok(())) => this.down.done = true,
                Poll::Ready(Err((side, e))) => end = Some(End::Error(side, e)),
                Poll::Pending => {}
            }
        }
        // Terminated TLS never goes quiet: it stays in its task.
        let turn = super::Turn {
            both_done: this.up.done && this.down.done,
            progress,
            can_quiet: false,
        };
        let moved = super::Moved {
            to_target: this.up.moved,
            to_client: this.down.moved,
        };
        this.deadline.settle(cx, end, turn, moved)
    }
}
