//! Joining two TCP sockets (passthrough and node splices): readiness-driven,
//! zero-copy through `splice(2)` on Linux, a borrowed buffer elsewhere or if
//! splicing fails. Written as plain poll functions rather than nested async
//! fns, so an idle joined connection holds a few hundred bytes of state and
//! no buffer or pipe at all.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;

use super::{End, Side, Transfer};

/// Bytes moved per read when copying.
const CHUNK: usize = 64 * 1024;

/// How one direction moves bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `splice(2)` through a pooled pipe.
    Splice,
    /// `read`/`write` through a buffer borrowed per burst.
    Copy,
}

impl Mode {
    pub fn default_for_platform() -> Mode {
        if cfg!(target_os = "linux") {
            Mode::Splice
        } else {
            Mode::Copy
        }
    }
}

/// `send(2)`, with `MSG_MORE` where Linux has it.
fn send(to: &TcpStream, bytes: &[u8], more: bool) -> io::Result<usize> {
    #[cfg(target_os = "linux")]
    let flags = if more { libc::MSG_MORE } else { 0 };
    #[cfg(not(target_os = "linux"))]
    let flags = {
        let _ = more;
        0
    };
    socket2::SockRef::from(to).send_with_flags(bytes, flags)
}

/// Whether `stream`'s readiness already carries the peer's FIN. Only asked
/// right after `poll_read_ready` was ready, so the readiness future answers
/// at once and registers no waiter.
fn peer_has_closed(stream: &TcpStream) -> bool {
    let ready = std::pin::pin!(stream.ready(Interest::READABLE));
    let mut cx = Context::from_waker(std::task::Waker::noop());
    matches!(ready.poll(&mut cx), Poll::Ready(Ok(r)) if r.is_read_closed())
}

/// Bytes read but not yet written, and where they wait.
enum Held {
    Nothing,
    #[cfg(target_os = "linux")]
    Pipe(super::pipe::Pipe, usize),
    Buffer(Vec<u8>, usize, usize),
}

/// One direction's state.
struct Direction {
    from: Side,
    mode: Mode,
    held: Held,
    moved: u64,
    /// `from` has sent its FIN; what is held is the last of it.
    eof: bool,
    done: bool,
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

impl Direction {
    fn new(from: Side, mode: Mode) -> Self {
        Direction {
            from,
            mode,
            held: Held::Nothing,
            moved: 0,
            eof: false,
            done: false,
        }
    }

    /// Moves bytes `from` -> `to` until both would block (Pending), EOF
    /// (Ready(Ok), after half-closing `to` unless `last`), or an error.
    /// `progress` is set when any byte moved.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        (from, to): (&TcpStream, &TcpStream),
        last: bool,
        progress: &mut bool,
    ) -> Poll<Result<(), (Side, io::Error)>> {
        let to_side = self.from.other();
        loop {
            // First write out what is held.
            if !self.holds_nothing() {
                ready!(to.poll_write_ready(cx)).map_err(|e| (to_side, e))?;
                match self.flush(to) {
                    Ok(n) => {
                        self.moved += n as u64;
                        *progress = true;
                    }
                    Err(e) if would_block(&e) => {}
                    Err(e) => return Poll::Ready(Err((to_side, e))),
                }
                continue;
            }
            if self.eof {
                self.release();
                // Half-close: pass the EOF on; the other direction keeps
                // flowing. The last direction to end leaves it to close,
                // which sends the same FIN: one syscall fewer.
                if !last {
                    let _ = socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write);
                }
                return Poll::Ready(Ok(()));
            }
            // Nothing held: wait to read, returning any pipe or buffer first.
            if from
                .poll_read_ready(cx)
                .map_err(|e| (self.from, e))?
                .is_pending()
            {
                self.release();
                return Poll::Pending;
            }
            match from.try_io(Interest::READABLE, || self.fill(from)) {
                Ok(0) => self.eof = true,
                Ok(_) => {
                    *progress = true;
                    if peer_has_closed(from) {
                        self.read_to_fin(from).map_err(|e| (self.from, e))?;
                    }
                }
                Err(e) if would_block(&e) => {}
                Err(e) => return Poll::Ready(Err((self.from, e))),
            }
        }
    }

    /// The peer's FIN is queued behind what was just read: read on to it,
    /// so the last bytes go out corked and leave with our FIN in one
    /// segment. Costs no syscall, as the read that meets EOF has to happen
    /// anyway. A socket past its FIN never would block, so a `WouldBlock`
    /// here means the pipe is full (and must not clear the readiness).
    fn read_to_fin(&mut self, from: &TcpStream) -> io::Result<()> {
        while self.has_room() {
            match self.fill(from) {
                Ok(0) => {
                    self.eof = true;
                    break;
                }
                Ok(_) => {}
                Err(e) if would_block(&e) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Whether another read fits after what is held.
    fn has_room(&self) -> bool {
        match &self.held {
            Held::Nothing => true,
            #[cfg(target_os = "linux")]
            Held::Pipe(pipe, pending) => *pending < pipe.capacity,
            Held::Buffer(buf, _, end) => *end < buf.len(),
        }
    }

    /// Reads what is available after what is already held, without
    /// touching tokio's readiness.
    fn fill(&mut self, from: &TcpStream) -> io::Result<usize> {
        #[cfg(target_os = "linux")]
        if self.mode == Mode::Splice {
            if matches!(self.held, Held::Nothing) {
                match super::pipe::take() {
                    Ok(pipe) => self.held = Held::Pipe(pipe, 0),
                    Err(_) => self.mode = Mode::Copy,
                }
            }
            if let Held::Pipe(pipe, pending) = &mut self.held {
                match super::pipe::fill(from, pipe, pipe.capacity - *pending) {
                    Ok(n) => {
                        *pending += n;
                        return Ok(n);
                    }
                    // E.g. an exotic socket: fall back to copying for good,
                    // once nothing spliced waits in the pipe.
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) && *pending == 0 => {
                        self.release();
                        self.mode = Mode::Copy;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        if !matches!(self.held, Held::Buffer(..)) {
            self.held = Held::Buffer(vec![0u8; CHUNK], 0, 0);
        }
        let Held::Buffer(buf, start, end) = &mut self.held else {
            return Ok(0);
        };
        if start == end {
            (*start, *end) = (0, 0);
        }
        // A plain read: the caller decides whether a `WouldBlock` clears
        // the readiness (see `read_to_fin`).
        let n = std::io::Read::read(
            &mut &*socket2::SockRef::from(from),
            buf.get_mut(*end..).unwrap_or_default(),
        )?;
        *end += n;
        Ok(n)
    }

    /// Writes out what is held, corked when our FIN follows at once.
    fn flush(&mut self, to: &TcpStream) -> io::Result<usize> {
        let more = self.eof;
        match &mut self.held {
            Held::Nothing => Ok(0),
            #[cfg(target_os = "linux")]
            Held::Pipe(pipe, pending) => to
                .try_io(Interest::WRITABLE, || {
                    super::pipe::drain(pipe, to, *pending, more)
                })
                .inspect(|n| *pending -= n),
            Held::Buffer(buf, start, end) => {
                let pending = buf.get(*start..*end).unwrap_or_default();
                to.try_io(Interest::WRITABLE, || send(to, pending, more))
                    .inspect(|n| *start += n)
            }
        }
    }

    /// True when no bytes wait to be written.
    fn holds_nothing(&self) -> bool {
        match &self.held {
            Held::Nothing => true,
            #[cfg(target_os = "linux")]
            Held::Pipe(_, pending) => *pending == 0,
            Held::Buffer(_, start, end) => start >= end,
        }
    }

    /// Gives back an empty pipe or buffer while nothing moves.
    fn release(&mut self) {
        match std::mem::replace(&mut self.held, Held::Nothing) {
            #[cfg(target_os = "linux")]
            Held::Pipe(pipe, 0) => super::pipe::give(pipe),
            #[cfg(target_os = "linux")]
            held @ Held::Pipe(..) => self.held = held,
            Held::Buffer(buf, start, end) if start < end => {
                self.held = Held::Buffer(buf, start, end)
            }
            _ => {}
        }
    }
}

pin_project_lite::pin_project! {
    /// Both directions and the idle deadline of one joined pair: everything
    /// a joined connection holds besides its sockets.
    struct State {
        up: Direction,
        down: Direction,
        #[pin]
        deadline: super::IdleDeadline,
    }
}

impl State {
    fn new(idle: Duration, mode: Mode) -> Self {
        State {
            up: Direction::new(Side::Client, mode),
            down: Direction::new(Side::Target, mode),
            deadline: super::IdleDeadline::new(idle),
        }
    }

    fn moved(&self) -> super::Moved {
        super::Moved {
            to_target: self.up.moved,
            to_client: self.down.moved,
        }
    }

    fn poll(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        client: &TcpStream,
        target: &TcpStream,
    ) -> Poll<Transfer> {
        let this = self.project();
        let mut progress = false;
        let mut end = None;
        for upward in [true, false] {
            let (dir, other, ends) = if upward {
                (&mut *this.up, &*this.down, (client, target))
            } else {
                (&mut *this.down, &*this.up, (target, client))
            };
            if dir.done {
                continue;
            }
            match dir.poll(cx, ends, other.done, &mut progress) {
                Poll::Ready(Ok(())) => dir.done = true,
                Poll::Ready(Err((side, e))) => {
                    end = Some(End::Error(side, e));
                    break;
                }
                Poll::Pending => {}
            }
        }
        let can_quiet = this.up.holds_nothing() && this.down.holds_nothing();
        let turn = super::Turn {
            both_done: this.up.done && this.down.done,
            progress,
            can_quiet,
        };
        let moved = super::Moved {
            to_target: this.up.moved,
            to_client: this.down.moved,
        };
        this.deadline.settle(cx, end, turn, moved)
    }
}

/// Joins two sockets until both directions end, one fails, or nothing moves
/// for `idle`.
pub async fn join(client: &TcpStream, target: &TcpStream, idle: Duration, mode: Mode) -> Transfer {
    let state = State::new(idle, mode);
    tokio::pin!(state);
    std::future::poll_fn(|cx| state.as_mut().poll(cx, client, target)).await
}

pin_project_lite::pin_project! {
    /// A joined pair that owns its sockets: a future small enough (a few
    /// hundred bytes) to be a connection's whole task once routing is done.
    /// With a quiet time set, it hands its sockets back once nothing has
    /// moved for that long and nothing waits to be written ([`JoinEnd::QuietPair`]).
    pub struct TcpJoin {
        // Taken only when the pair goes quiet.
        sockets: Option<(TcpStream, TcpStream)>,
        #[pin]
        state: State,
    }
}

/// How a [`TcpJoin`] pair left its task.
pub enum JoinEnd {
    Ended(Transfer),
    /// Nothing moved for the quiet time: the sockets and what they carried.
    Quiet(QuietPair),
}

/// A quiet pair, handed on with everything needed to carry on joining it.
pub struct QuietPair {
    pub client: TcpStream,
    pub target: TcpStream,
    /// Bytes moved so far.
    pub moved: super::Moved,
    pub done: super::Done,
    /// How long nothing has moved.
    pub quiet_for: Duration,
    /// The pair's idle time, counted from its last byte.
    pub idle: Duration,
}

impl From<Transfer> for JoinEnd {
    fn from(transfer: Transfer) -> JoinEnd {
        JoinEnd::Ended(transfer)
    }
}

impl TcpJoin {
    pub fn new(client: TcpStream, target: TcpStream, idle: Duration, mode: Mode) -> Self {
        TcpJoin {
            sockets: Some((client, target)),
            state: State::new(idle, mode),
        }
    }

    /// Ends the join with [`JoinEnd::QuietPair`] after `quiet` without a byte.
    pub fn quiet_after(mut self, quiet: Duration) -> Self {
        self.state.deadline = self.state.deadline.with_quiet(quiet);
        self
    }
}

impl super::Progress for TcpJoin {
    fn moved(&self) -> super::Moved {
        self.state.moved()
    }
}

impl Future for TcpJoin {
    type Output = JoinEnd;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<JoinEnd> {
        let mut this = self.project();
        let Some((client, target)) = this.sockets.as_ref() else {
            return Poll::Pending;
        };
        if let Poll::Ready(transfer) = this.state.as_mut().poll(cx, client, target) {
            return Poll::Ready(JoinEnd::Ended(transfer));
        }
        if !this.state.deadline.went_quiet {
            return Poll::Pending;
        }
        let Some((client, target)) = this.sockets.take() else {
            return Poll::Pending;
        };
        let state = &*this.state;
        Poll::Ready(JoinEnd::Quiet(QuietPair {
            client,
            target,
            moved: state.moved(),
            done: super::Done {
                up: state.up.done,
                down: state.down.done,
            },
            quiet_for: state.deadline.last.elapsed(),
            idle: state.deadline.idle,
        }))
    }
}
