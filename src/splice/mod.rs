//! The one place that joins two streams: both directions copied with
//! half-close (one side's EOF shuts down the other side's write while the
//! reverse direction keeps flowing), an idle timeout, and byte counts.
//! [`StreamJoin`] takes any streams (TLS terminated here; see [`streams`]);
//! [`join_tcp`] and [`TcpJoin`] take two sockets and move bytes without
//! copying them through user space (see [`tcp`]); on Linux an [`engine`]
//! holds routed pairs without a task each.

#[cfg(target_os = "linux")]
pub mod engine;
#[cfg(target_os = "linux")]
mod pipe;
mod streams;
pub mod tcp;

pub use streams::StreamJoin;
pub use tcp::{JoinEnd, Mode, QuietPair, TcpJoin};

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Target,
}

impl Side {
    fn other(self) -> Side {
        match self {
            Side::Client => Side::Target,
            Side::Target => Side::Client,
        }
    }
}

/// How a joined connection ended.
#[derive(Debug)]
pub enum End {
    /// Both directions reached EOF.
    Closed,
    /// Nothing moved either way for the idle timeout.
    Idle,
    /// An I/O error on one side ended both directions.
    Error(Side, io::Error),
    /// Still open when the drain period after SIGTERM or an upgrade ran
    /// out: cut by this process's exit.
    Drained,
}

impl End {
    pub fn kind(&self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::Idle => "idle_timeout",
            End::Error(Side::Client, _) => "client_error",
            End::Error(Side::Target, _) => "target_error",
            End::Drained => "drain_deadline",
        }
    }
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Error(side, e) => write!(f, "{} ({side:?}: {e})", self.kind()),
            _ => f.write_str(self.kind()),
        }
    }
}

/// Bytes moved each way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Moved {
    pub to_target: u64,
    pub to_client: u64,
}

/// What a join has moved so far, for a connection cut before its join ends.
pub trait Progress {
    fn moved(&self) -> Moved;
}

/// What one poll of both directions found.
struct Turn {
    /// Both directions reached EOF.
    both_done: bool,
    /// A byte moved.
    progress: bool,
    /// Nothing waits to be written: the pair may be handed on.
    can_quiet: bool,
}

/// Which directions of a pair already reached EOF (and passed it on).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Done {
    pub up: bool,
    pub down: bool,
}

#[derive(Debug)]
pub struct Transfer {
    /// Bytes copied from client to target (not counting any replayed prefix).
    pub to_target: u64,
    pub to_client: u64,
    pub end: End,
}

/// Joins two borrowed sockets; see [`tcp`] for how bytes move, and
/// [`TcpJoin`] for a pair that owns its sockets.
pub async fn join_tcp(
    client: &TcpStream,
    target: &TcpStream,
    idle: Duration,
    mode: Mode,
) -> Transfer {
    tcp::join(client, target, idle, mode).await
}

pin_project_lite::pin_project! {
    /// The one timer of a joined pair: its idle time and, for a pair that
    /// may go quiet, its quiet time. Bytes moving only note the time; the
    /// timer is moved on when it fires early, since resetting a tokio timer
    /// at every burst cost bulk transfers several per cent.
    struct IdleDeadline {
        idle: Duration,
        // When the last byte moved.
        last: Instant,
        quiet: Option<Duration>,
        // Set once nothing has moved for `quiet` and nothing waits.
        went_quiet: bool,
        #[pin]
        sleep: tokio::time::Sleep,
    }
}

impl IdleDeadline {
    fn new(idle: Duration) -> Self {
        let last = Instant::now();
        IdleDeadline {
            idle,
            last,
            quiet: None,
            went_quiet: false,
            sleep: tokio::time::sleep_until(last + idle),
        }
    }

    /// Also watch for `quiet` without a byte (see `went_quiet`).
    fn with_quiet(mut self, quiet: Duration) -> Self {
        self.quiet = Some(quiet);
        self.sleep = tokio::time::sleep_until(self.last + quiet.min(self.idle));
        self
    }

    /// Ends a poll of both directions: with `end` if one failed, `Closed`
    /// once both are done, `Idle` when nothing has moved for `idle`; else
    /// Pending, having set `went_quiet` if the pair may now be handed on
    /// (`can_quiet`: nothing waits to be written).
    fn settle(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        end: Option<End>,
        Turn {
            both_done,
            progress,
            can_quiet,
        }: Turn,
        Moved {
            to_target,
            to_client,
        }: Moved,
    ) -> Poll<Transfer> {
        let mut this = self.project();
        if progress {
            *this.last = Instant::now();
        }
        let end = end
            .or_else(|| both_done.then_some(End::Closed))
            .or_else(|| {
                // At most twice: a timer moved on fires no sooner than its
                // new deadline.
                for _ in 0..2 {
                    this.sleep.as_mut().poll(cx).is_ready().then_some(())?;
                    let now = Instant::now();
                    let idle_due = *this.last + *this.idle;
                    if idle_due <= now {
                        return Some(End::Idle);
                    }
                    let mut next = idle_due;
                    if let Some(quiet) = *this.quiet {
                        let quiet_due = *this.last + quiet;
                        if quiet_due <= now && can_quiet {
                            *this.went_quiet = true;
                            return None;
                        }
                        next = next.min(quiet_due.max(now + quiet));
                    }
                    this.sleep.as_mut().reset(next);
                }
                None
            });
        match end {
            Some(end) => Poll::Ready(Transfer {
                to_target,
                to_client,
                end,
            }),
            None => Poll::Pending,
        }
    }
}
