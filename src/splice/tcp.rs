//! Joining two TCP sockets (passthrough and node splices): readiness-driven,
//! zero-copy through `splice(2)` on Linux, a borrowed buffer elsewhere or if
//! splicing fails. Nothing is held per direction while no data moves.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::Interest;
use tokio::net::TcpStream;

use super::{Activity, Side};

/// Bytes moved per splice or read: one pipe's default capacity.
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

/// Copies `from` -> `to` until EOF, then half-closes `to`.
pub(super) async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    from_side: Side,
    mode: Mode,
    count: &AtomicU64,
    activity: Activity<'_>,
) -> Result<(), (Side, io::Error)> {
    let to_side = from_side.other();
    let mut mode = mode;
    loop {
        from.readable().await.map_err(|e| (from_side, e))?;
        let burst = match mode {
            #[cfg(target_os = "linux")]
            Mode::Splice => match spliced_burst(from, to, count, activity).await {
                Err(Burst::Unsupported) => {
                    // E.g. EINVAL from an exotic socket: fall back for good.
                    mode = Mode::Copy;
                    continue;
                }
                other => other,
            },
            _ => copied_burst(from, to, count, activity).await,
        };
        match burst {
            Ok(BurstEnd::Idle) => continue,
            Ok(BurstEnd::Eof) => {
                // Half-close: pass the EOF on; the other direction keeps flowing.
                let _ = socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write);
                return Ok(());
            }
            Err(Burst::Read(e)) => return Err((from_side, e)),
            Err(Burst::Write(e)) => return Err((to_side, e)),
            Err(Burst::Unsupported) => mode = Mode::Copy,
        }
    }
}

enum BurstEnd {
    /// Nothing more to read for now.
    Idle,
    Eof,
}

enum Burst {
    Read(io::Error),
    Write(io::Error),
    Unsupported,
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

/// Moves what is readable now, through a pipe held only for this burst.
#[cfg(target_os = "linux")]
async fn spliced_burst(
    from: &TcpStream,
    to: &TcpStream,
    count: &AtomicU64,
    activity: Activity<'_>,
) -> Result<BurstEnd, Burst> {
    use super::pipe;
    let pipe = pipe::take().map_err(|_| Burst::Unsupported)?;
    loop {
        let n = match from.try_io(Interest::READABLE, || pipe::fill(from, &pipe, CHUNK)) {
            Ok(0) => {
                pipe::give(pipe);
                return Ok(BurstEnd::Eof);
            }
            Ok(n) => n,
            Err(e) if would_block(&e) => {
                pipe::give(pipe);
                return Ok(BurstEnd::Idle);
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Err(Burst::Unsupported),
            Err(e) => return Err(Burst::Read(e)),
        };
        activity.touch();
        let mut left = n;
        while left > 0 {
            to.writable().await.map_err(Burst::Write)?;
            match to.try_io(Interest::WRITABLE, || pipe::drain(&pipe, to, left)) {
                Ok(m) => left -= m,
                Err(e) if would_block(&e) => {}
                // The pipe still holds bytes: it is dropped, not pooled.
                Err(e) => return Err(Burst::Write(e)),
            }
        }
        count.fetch_add(n as u64, Ordering::Relaxed);
        activity.touch();
    }
}

/// Moves what is readable now through a buffer allocated for this burst.
async fn copied_burst(
    from: &TcpStream,
    to: &TcpStream,
    count: &AtomicU64,
    activity: Activity<'_>,
) -> Result<BurstEnd, Burst> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match from.try_read(&mut buf) {
            Ok(0) => return Ok(BurstEnd::Eof),
            Ok(n) => n,
            Err(e) if would_block(&e) => return Ok(BurstEnd::Idle),
            Err(e) => return Err(Burst::Read(e)),
        };
        activity.touch();
        let mut written = 0;
        while written < n {
            to.writable().await.map_err(Burst::Write)?;
            match to.try_write(buf.get(written..n).unwrap_or_default()) {
                Ok(m) => written += m,
                Err(e) if would_block(&e) => {}
                Err(e) => return Err(Burst::Write(e)),
            }
        }
        count.fetch_add(n as u64, Ordering::Relaxed);
        activity.touch();
    }
}
