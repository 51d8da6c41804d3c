//! Linux zero-copy: `splice(2)` moves bytes socket -> pipe -> socket inside
//! the kernel. Pipes are borrowed from a small per-thread pool only while
//! data moves, so an idle connection holds no pipe (and no descriptors
//! beyond its two sockets).

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Empty pipes kept per worker thread for the next burst.
const POOL_PER_THREAD: usize = 16;

/// Asked-for pipe capacity. The default 64 KiB costs twice the router CPU
/// per byte in bulk transfers (see docs/benchmarks.md); a pipe only pins
/// pages while bytes are in flight, so an empty pooled pipe costs a slot
/// array, not its capacity.
const PIPE_SIZE: usize = 1024 * 1024;

pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// What the kernel granted: less than [`PIPE_SIZE`] when the per-user
    /// pipe limit is reached.
    pub capacity: usize,
}

thread_local! {
    static POOL: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

/// An empty pipe from the pool, or a new one.
pub fn take() -> io::Result<Pipe> {
    if let Some(pipe) = POOL.with(|pool| pool.borrow_mut().pop()) {
        return Ok(pipe);
    }
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` is a valid array of two descriptors for pipe2 to fill.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open and ours alone.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: F_SETPIPE_SZ/F_GETPIPE_SZ on a pipe descriptor we own.
    let granted = unsafe {
        match libc::fcntl(
            write.as_raw_fd(),
            libc::F_SETPIPE_SZ,
            PIPE_SIZE as libc::c_int,
        ) {
            n if n > 0 => n,
            // Refused (a per-user limit): keep the default capacity.
            _ => libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ),
        }
    };
    let capacity = usize::try_from(granted).unwrap_or(0).max(4096);
    Ok(Pipe {
        read,
        write,
        capacity,
    })
}

/// Returns an empty pipe to the pool (a pipe still holding bytes is closed).
pub fn give(pipe: Pipe) {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() < POOL_PER_THREAD {
            pool.push(pipe);
        }
    });
}

fn splice(from: RawFd, to: RawFd, len: usize, more: bool) -> io::Result<usize> {
    let mut flags = libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK;
    if more {
        flags |= libc::SPLICE_F_MORE;
    }
    // SAFETY: both descriptors are open for the duration of the call (owned
    // by live streams and pipes); null offsets are valid for sockets and pipes.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            flags,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Socket -> pipe, at most `len` bytes.
pub fn fill(socket: &impl AsRawFd, pipe: &Pipe, len: usize) -> io::Result<usize> {
    splice(socket.as_raw_fd(), pipe.write.as_raw_fd(), len, false)
}

/// Pipe -> socket, at most `len` bytes; with `more`, held back (like
/// `MSG_MORE`) for a FIN or further bytes that follow at once.
pub fn drain(pipe: &Pipe, socket: &impl AsRawFd, len: usize, more: bool) -> io::Result<usize> {
    splice(pipe.read.as_raw_fd(), socket.as_raw_fd(), len, more)
}
