//! The one place that joins two streams: both directions copied with
//! half-close (one side's EOF shuts down the other side's write while the
//! reverse direction keeps flowing), an idle timeout, and byte counts.
//! [`join`] takes any streams (TLS terminated here); [`join_tcp`] takes two
//! sockets and moves bytes without copying them through user space.

#[cfg(target_os = "linux")]
mod pipe;
pub mod tcp;

pub use tcp::{Joined, Mode};

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Per-direction copy buffer. Large enough that bulk transfers need few
/// syscalls; small enough that thousands of active connections stay cheap.
const BUF_LEN: usize = 16 * 1024;

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
}

impl End {
    pub fn kind(&self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::Idle => "idle_timeout",
            End::Error(Side::Client, _) => "client_error",
            End::Error(Side::Target, _) => "target_error",
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

#[derive(Debug)]
pub struct Transfer {
    /// Bytes copied from client to target (not counting any replayed prefix).
    pub to_target: u64,
    pub to_client: u64,
    pub end: End,
}

/// Copies between `client` and `target` until both directions are done, one
/// side fails, or nothing moves for `idle`.
pub async fn join<C, T>(client: C, target: T, idle: Duration) -> Transfer
where
    C: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    let last_activity = AtomicU64::new(0);
    let to_target = AtomicU64::new(0);
    let to_client = AtomicU64::new(0);
    let (client_read, client_write) = tokio::io::split(client);
    let (target_read, target_write) = tokio::io::split(target);
    let activity = Activity {
        start,
        last: &last_activity,
    };
    let up = pump(
        client_read,
        target_write,
        Side::Client,
        &to_target,
        activity,
    );
    let down = pump(
        target_read,
        client_write,
        Side::Target,
        &to_client,
        activity,
    );
    let end = both_directions(up, down, activity, idle).await;
    Transfer {
        to_target: to_target.load(Ordering::Relaxed),
        to_client: to_client.load(Ordering::Relaxed),
        end,
    }
}

/// Joins two borrowed sockets; see [`tcp`] for how bytes move, and
/// [`Joined`] for a pair that owns its sockets.
pub async fn join_tcp(
    client: &TcpStream,
    target: &TcpStream,
    idle: Duration,
    mode: Mode,
) -> Transfer {
    tcp::join(client, target, idle, mode).await
}

/// Runs both directions until both finish, one fails, or nothing moves for
/// `idle`.
async fn both_directions(
    up: impl Future<Output = Result<(), (Side, io::Error)>>,
    down: impl Future<Output = Result<(), (Side, io::Error)>>,
    activity: Activity<'_>,
    idle: Duration,
) -> End {
    tokio::select! {
        result = async { tokio::try_join!(up, down) } => match result {
            Ok(_) => End::Closed,
            Err((side, e)) => End::Error(side, e),
        },
        () = idle_watch(activity, idle) => End::Idle,
    }
}

#[derive(Clone, Copy)]
struct Activity<'a> {
    start: Instant,
    /// Milliseconds since `start` of the last byte moved.
    last: &'a AtomicU64,
}

impl Activity<'_> {
    fn touch(&self) {
        let now = self.start.elapsed().as_millis() as u64;
        self.last.store(now, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last.load(Ordering::Relaxed))
    }
}

async fn idle_watch(activity: Activity<'_>, idle: Duration) {
    loop {
        let deadline = activity.last() + idle;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

/// Copies one direction; `from` names the side being read, so a read error
/// blames it and a write error blames the other side.
async fn pump<R, W>(
    mut reader: R,
    mut writer: W,
    from: Side,
    count: &AtomicU64,
    activity: Activity<'_>,
) -> Result<(), (Side, io::Error)>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let to = from.other();
    let mut buf = vec![0u8; BUF_LEN];
    loop {
        let n = reader.read(&mut buf).await.map_err(|e| (from, e))?;
        if n == 0 {
            // Half-close: pass the EOF on; the other direction keeps flowing.
            // A peer that already went away is not an error at this point.
            let _ = writer.shutdown().await;
            return Ok(());
        }
        activity.touch();
        let read = buf.get(..n).unwrap_or_default();
        writer.write_all(read).await.map_err(|e| (to, e))?;
        count.fetch_add(n as u64, Ordering::Relaxed);
        activity.touch();
    }
}
