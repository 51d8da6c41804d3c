//! Quiet joined socket pairs without a task each (Linux). Once a spliced
//! pair has moved nothing for a moment, both sockets leave tokio for an
//! engine's own epoll set, and the connection becomes a slab entry of about
//! a hundred bytes plus what its log line needs. A tokio task and two
//! socket registrations cost well over a kilobyte per idle connection; this
//! is how a router holds tens of thousands of quiet connections in a few
//! megabytes (docs/benchmarks.md).
//!
//! One task per engine waits on the epoll descriptor (itself registered
//! with tokio), moves bytes with `splice(2)` for every pair the kernel
//! reports ready, and sweeps idle pairs at the earliest idle deadline.
//! Readiness is edge-triggered and tracked per socket as tokio does, so a
//! pair costs the same splice calls and none while it is quiet. Each wake-up
//! costs one more `epoll_wait` than a task's would: with every pair here
//! from the start, bulk transfers ran 13% slower, hence the hand-over only
//! once a pair is quiet.

use std::io;
use std::net::TcpStream as StdTcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Token};
use slab::Slab;
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

use super::pipe::{self, Pipe};
use super::{End, QuietPair, Side, Transfer};

/// Readiness events taken per `epoll_wait`.
const EVENTS: usize = 256;

/// The shortest gap between two idle sweeps, in milliseconds.
const SWEEP_EVERY_MS: u64 = 100;

const READ: u8 = 1;
const WRITE: u8 = 2;

/// Called once with the pair's transfer when it ends, outside the engine's
/// lock; it owns what the connection's log line and limits need.
pub type Finish = Box<dyn FnOnce(Transfer) + Send>;

/// One engine per worker thread; pairs are dealt out in turn.
pub struct Engines {
    engines: Vec<Arc<Engine>>,
    next: AtomicUsize,
}

impl std::fmt::Debug for Engines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engines")
            .field("count", &self.engines.len())
            .finish()
    }
}

impl Engines {
    /// `count` engines; none if the kernel refuses an epoll set, in which
    /// case callers join pairs in tasks of their own.
    pub fn new(count: usize) -> Engines {
        let engines = (0..count.max(1))
            .map(|_| Engine::new().map(Arc::new))
            .collect::<io::Result<Vec<_>>>()
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "no epoll set for joined connections: one task each");
                Vec::new()
            });
        Engines {
            engines,
            next: AtomicUsize::new(0),
        }
    }

    /// Has the current runtime watch each engine's epoll set, and starts
    /// its task. An engine tokio cannot watch takes no pairs: they stay in
    /// tasks of their own rather than stall in a set nobody polls.
    pub fn start(&self) {
        for engine in &self.engines {
            match engine.clone().watch() {
                Ok(epoll) => {
                    engine.watched.store(true, Ordering::Release);
                    tokio::spawn(engine.clone().run(epoll));
                }
                Err(e) => tracing::error!(
                    error = %e,
                    "cannot watch an epoll set for quiet connections: they stay in their tasks"
                ),
            }
        }
    }

    /// Whether pairs can be handed over at all: some engine is watched.
    pub fn available(&self) -> bool {
        self.engines.iter().any(|e| e.is_watched())
    }

    /// The next watched engine in turn, if there is one.
    pub fn pick(&self) -> Option<&Arc<Engine>> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let count = self.engines.len();
        (0..count)
            .filter_map(|i| self.engines.get((n + i) % count))
            .find(|e| e.is_watched())
    }

    /// Ends every pair the engines hold, as cut by the drain deadline: each
    /// still gets its log line and metrics.
    pub fn end_all(&self) {
        for engine in &self.engines {
            let cut: Vec<(Finish, Transfer)> = {
                let mut inner = engine.lock();
                inner
                    .pairs
                    .drain()
                    .map(|pair| pair.end(End::Drained))
                    .collect()
            };
            for (finish, transfer) in cut {
                finish(transfer);
            }
        }
    }

    /// Pairs held across all engines (for tests: the `connections_quiet`
    /// gauge is what production reads).
    #[cfg(any(test, feature = "test-helpers"))]
    pub fn len(&self) -> usize {
        self.engines.iter().map(|e| e.lock().pairs.len()).sum()
    }

    #[cfg(any(test, feature = "test-helpers"))]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub struct Engine {
    registry: mio::Registry,
    epoll: RawFd,
    /// Tokio watches `epoll` and the engine's task runs.
    watched: AtomicBool,
    inner: Mutex<Inner>,
    /// Wakes the task when a new pair's idle deadline is earlier than the
    /// sweep it sleeps towards.
    rearm: Notify,
}

struct Inner {
    poll: mio::Poll,
    events: Events,
    pairs: Slab<Pair>,
    started: Instant,
    /// Milliseconds since `started` of the next idle sweep.
    next_sweep: u64,
}

/// One joined connection.
struct Pair {
    client: Socket,
    target: Socket,
    /// Client to target.
    up: Flow,
    /// Target to client.
    down: Flow,
    /// Milliseconds since the engine started of the last byte moved.
    last: u64,
    idle: u32,
    finish: Finish,
}

struct Socket {
    stream: StdTcpStream,
    /// `READ` and `WRITE` as epoll last reported them, cleared on EAGAIN.
    ready: u8,
    side: Side,
}

struct Flow {
    /// Held only while bytes wait in it.
    pipe: Option<Pipe>,
    pending: usize,
    moved: u64,
    done: bool,
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

impl Flow {
    fn carried(moved: u64, done: bool) -> Flow {
        Flow {
            pipe: None,
            pending: 0,
            moved,
            done,
        }
    }

    /// Moves bytes `from` -> `to` until the socket that must act next is not
    /// ready. EOF half-closes `to` unless this is the last flow to end.
    /// True if any byte moved.
    fn pump(
        &mut self,
        from: &mut Socket,
        to: &mut Socket,
        last: bool,
    ) -> Result<bool, (Side, io::Error)> {
        let mut progress = false;
        loop {
            if let Some(pipe) = self.pipe.as_ref().filter(|_| self.pending > 0) {
                if to.ready & WRITE == 0 {
                    return Ok(progress);
                }
                match pipe::drain(pipe, &to.stream, self.pending, false) {
                    Ok(n) => {
                        self.pending -= n;
                        self.moved += n as u64;
                        progress = true;
                        continue;
                    }
                    Err(e) if would_block(&e) => {
                        to.ready &= !WRITE;
                        return Ok(progress);
                    }
                    Err(e) => return Err((to.side, e)),
                }
            }
            if from.ready & READ == 0 {
                self.release();
                return Ok(progress);
            }
            let pipe = match self.pipe.take() {
                Some(pipe) => pipe,
                None => pipe::take().map_err(|e| (from.side, e))?,
            };
            let filled = pipe::fill(&from.stream, &pipe, pipe.capacity);
            self.pipe = Some(pipe);
            match filled {
                Ok(0) => {
                    self.done = true;
                    self.release();
                    if !last {
                        let _ = to.stream.shutdown(std::net::Shutdown::Write);
                    }
                    return Ok(progress);
                }
                Ok(n) => self.pending = n,
                Err(e) if would_block(&e) => {
                    from.ready &= !READ;
                    self.release();
                    return Ok(progress);
                }
                Err(e) => return Err((from.side, e)),
            }
        }
    }

    /// Gives an empty pipe back to the pool.
    fn release(&mut self) {
        if self.pending == 0
            && let Some(pipe) = self.pipe.take()
        {
            pipe::give(pipe);
        }
    }
}

impl Pair {
    /// Pumps both flows; `Some` once the pair has ended.
    fn drive(&mut self, now: u64) -> Option<End> {
        let Pair {
            client,
            target,
            up,
            down,
            ..
        } = self;
        let mut progress = false;
        if !up.done {
            match up.pump(client, target, down.done) {
                Ok(moved) => progress |= moved,
                Err((side, e)) => return Some(End::Error(side, e)),
            }
        }
        if !down.done {
            match down.pump(target, client, up.done) {
                Ok(moved) => progress |= moved,
                Err((side, e)) => return Some(End::Error(side, e)),
            }
        }
        if progress {
            self.last = now;
        }
        (self.up.done && self.down.done).then_some(End::Closed)
    }

    fn deadline(&self) -> u64 {
        self.last + u64::from(self.idle)
    }

    fn end(self, end: End) -> (Finish, Transfer) {
        let transfer = Transfer {
            to_target: self.up.moved,
            to_client: self.down.moved,
            end,
        };
        (self.finish, transfer)
    }
}

/// The engine's epoll descriptor, as tokio watches it: holding the engine
/// keeps the descriptor open for as long as tokio has it registered.
struct EpollFd(Arc<Engine>);

impl AsRawFd for EpollFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.epoll
    }
}

impl Engine {
    fn new() -> io::Result<Engine> {
        let poll = mio::Poll::new()?;
        Ok(Engine {
            registry: poll.registry().try_clone()?,
            epoll: poll.as_raw_fd(),
            inner: Mutex::new(Inner {
                poll,
                events: Events::with_capacity(EVENTS),
                pairs: Slab::new(),
                started: Instant::now(),
                next_sweep: u64::MAX,
            }),
            rearm: Notify::new(),
            watched: AtomicBool::new(false),
        })
    }

    fn is_watched(&self) -> bool {
        self.watched.load(Ordering::Acquire)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock would be a bug here, not bad input;
        // the pairs are still consistent between syscalls.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes over a quiet pair; `finish` is called when it ends, or at once
    /// if the sockets cannot be moved here.
    pub fn adopt(&self, quiet: QuietPair, finish: Finish) {
        let moved = quiet.moved;
        if let Err(e) = self.insert(quiet, finish) {
            let (finish, e) = *e;
            finish(Transfer {
                to_target: moved.to_target,
                to_client: moved.to_client,
                end: End::Error(Side::Client, e),
            });
        }
    }

    fn insert(&self, quiet: QuietPair, finish: Finish) -> Result<(), Box<(Finish, io::Error)>> {
        let (client, target) = match (quiet.client.into_std(), quiet.target.into_std()) {
            (Ok(client), Ok(target)) => (client, target),
            (Err(e), _) | (_, Err(e)) => return Err(Box::new((finish, e))),
        };
        let mut inner = self.lock();
        let inner = &mut *inner;
        let now = inner.started.elapsed().as_millis() as u64;
        let last = now.saturating_sub(quiet.quiet_for.as_millis() as u64);
        let entry = inner.pairs.vacant_entry();
        let key = entry.key();
        for (index, socket) in [&client, &target].into_iter().enumerate() {
            let token = Token(key << 1 | index);
            let interest = Interest::READABLE | Interest::WRITABLE;
            if let Err(e) =
                self.registry
                    .register(&mut SourceFd(&socket.as_raw_fd()), token, interest)
            {
                // Closing the sockets takes them out of the epoll set.
                return Err(Box::new((finish, e)));
            }
        }
        let idle = u32::try_from(quiet.idle.as_millis()).unwrap_or(u32::MAX);
        let socket = |stream, side| Socket {
            stream,
            ready: 0,
            side,
        };
        let pair = entry.insert(Pair {
            client: socket(client, Side::Client),
            target: socket(target, Side::Target),
            up: Flow::carried(quiet.moved.to_target, quiet.done.up),
            down: Flow::carried(quiet.moved.to_client, quiet.done.down),
            last,
            idle,
            finish,
        });
        let deadline = pair.deadline();
        if deadline < inner.next_sweep {
            inner.next_sweep = deadline;
            self.rearm.notify_one();
        }
        Ok(())
    }

    /// Registers the epoll set with the current runtime.
    fn watch(self: Arc<Self>) -> io::Result<AsyncFd<EpollFd>> {
        let watched = EpollFd(self);
        // SAFETY: `EpollFd` holds the engine, which owns the descriptor and
        // closes it only when dropped, after this registration is gone.
        unsafe { AsyncFd::register_with_interest(watched, tokio::io::Interest::READABLE) }
            .map_err(io::Error::from)
    }

    async fn run(self: Arc<Self>, epoll: AsyncFd<EpollFd>) {
        loop {
            let sweep = {
                let inner = self.lock();
                let wait = inner
                    .next_sweep
                    .saturating_sub(inner.started.elapsed().as_millis() as u64);
                tokio::time::Instant::now() + Duration::from_millis(wait.min(3_600_000))
            };
            tokio::select! {
                ready = epoll.readable() => {
                    // Only a runtime shutting down refuses: polling on
                    // would spin.
                    let Ok(mut guard) = ready else { return };
                    let (drained, finished) = self.turn();
                    if drained {
                        guard.clear_ready();
                    }
                    for (finish, transfer) in finished {
                        finish(transfer);
                    }
                }
                () = tokio::time::sleep_until(sweep) => {
                    for (finish, transfer) in self.sweep() {
                        finish(transfer);
                    }
                }
                () = self.rearm.notified() => {}
            }
        }
    }

    /// Handles one batch of readiness; true if the epoll set is drained.
    fn turn(&self) -> (bool, Vec<(Finish, Transfer)>) {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let mut finished = Vec::new();
        if let Err(e) = inner.poll.poll(&mut inner.events, Some(Duration::ZERO)) {
            if e.kind() != io::ErrorKind::Interrupted {
                tracing::warn!(error = %e, "epoll_wait on joined connections");
            }
            return (false, finished);
        }
        let now = inner.started.elapsed().as_millis() as u64;
        let mut count = 0;
        for event in inner.events.iter() {
            count += 1;
            let key = event.token().0 >> 1;
            let index = event.token().0 & 1;
            let Some(pair) = inner.pairs.get_mut(key) else {
                continue;
            };
            let mut bits = 0;
            if event.is_readable() || event.is_read_closed() || event.is_error() {
                bits |= READ;
            }
            if event.is_writable() || event.is_write_closed() || event.is_error() {
                bits |= WRITE;
            }
            let socket = if index == 0 {
                &mut pair.client
            } else {
                &mut pair.target
            };
            socket.ready |= bits;
            if let Some(end) = pair.drive(now) {
                finished.push(inner.pairs.remove(key).end(end));
            }
        }
        (count < EVENTS, finished)
    }

    /// Ends pairs idle past their deadline and schedules the next sweep.
    fn sweep(&self) -> Vec<(Finish, Transfer)> {
        let mut inner = self.lock();
        let now = inner.started.elapsed().as_millis() as u64;
        let expired: Vec<usize> = inner
            .pairs
            .iter()
            .filter(|(_, pair)| pair.deadline() <= now)
            .map(|(key, _)| key)
            .collect();
        let finished = expired
            .into_iter()
            .map(|key| inner.pairs.remove(key).end(End::Idle))
            .collect();
        // A sweep reads every pair: pairs expiring one after another must
        // not each cost one, so idle times are kept to this granularity.
        inner.next_sweep = inner
            .pairs
            .iter()
            .map(|(_, pair)| pair.deadline().max(now + SWEEP_EVERY_MS))
            .min()
            .unwrap_or(u64::MAX);
        finished
    }
}
