//! In-place upgrade on `SIGUSR2` (nginx's convention): the running router
//! starts the binary now on disk, with the same arguments, and hands it
//! every listening socket. The new process loads its config, takes the
//! sockets ([`crate::listen::Inherited`]) and writes one byte to a pipe
//! once it listens; only then does this process stop accepting and drain.
//! A new process that fails to start, to load its config or to listen is
//! logged and stopped, and this one carries on as if nothing happened.
//!
//! The sockets are the same kernel sockets, shared, so nothing queued in
//! them is lost whichever process accepts it.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::AsyncReadExt;

use crate::listen::{HANDED_FDS, READY_FD};

/// How long the new process has to load its config and listen.
pub const READY_WITHIN: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("finding this binary on disk: {0}")]
    Binary(io::Error),
    #[error("creating the readiness pipe: {0}")]
    Pipe(io::Error),
    #[error("starting {path}: {source}")]
    Spawn {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the new process exited before it was ready ({0}); its log lines say why")]
    Exited(ExitStatus),
    #[error("the new process closed its readiness pipe without being ready")]
    Silent,
    #[error("the new process was not ready within {0:?}: stopped it")]
    Timeout(Duration),
}

/// Starts the successor with `fds` (every listening socket) and waits until
/// it listens; returns its pid. On any failure the successor is stopped.
pub async fn start_successor(fds: &[RawFd]) -> Result<u32, UpgradeError> {
    let path = binary_on_disk().map_err(UpgradeError::Binary)?;
    let (ready, write) = pipe().map_err(UpgradeError::Pipe)?;
    let list: Vec<String> = fds.iter().map(ToString::to_string).collect();
    let mut handed = fds.to_vec();
    handed.push(write.as_raw_fd());
    let mut command = tokio::process::Command::new(&path);
    command
        .args(std::env::args_os().skip(1))
        .env(HANDED_FDS, list.join(","))
        .env(READY_FD, write.as_raw_fd().to_string())
        // systemd's sockets, if any, are among `fds` now; these name
        // this process.
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDNAMES")
        .stdin(Stdio::null());
    // SAFETY: runs in the forked child before exec, where only
    // async-signal-safe calls are allowed: fcntl is one, and `handed` was
    // allocated before the fork. Clearing FD_CLOEXEC lets exactly these
    // descriptors through exec.
    unsafe {
        command.pre_exec(move || {
            for fd in &handed {
                if libc::fcntl(*fd, libc::F_SETFD, 0) == -1 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(|source| UpgradeError::Spawn {
        path: path.clone(),
        source,
    })?;
    // Only the child may hold the write end, so its exit reads as EOF.
    drop(write);
    let pid = child.id().unwrap_or(0);
    tracing::info!(pid, binary = %path.display(), "upgrade: started the new process");
    let mut ready =
        tokio::net::unix::pipe::Receiver::from_owned_fd(ready).map_err(UpgradeError::Pipe)?;
    let mut byte = [0u8; 1];
    let failed = tokio::select! {
        read = ready.read(&mut byte) => match read {
            Ok(1) => return Ok(pid),
            // EOF: the child exited (or closed the pipe); say how it ended.
            _ => match tokio::time::timeout(Duration::from_secs(1), child.wait()).await {
                Ok(Ok(status)) => UpgradeError::Exited(status),
                _ => UpgradeError::Silent,
            },
        },
        status = child.wait() => match status {
            Ok(status) => UpgradeError::Exited(status),
            Err(_) => UpgradeError::Silent,
        },
        () = tokio::time::sleep(READY_WITHIN) => UpgradeError::Timeout(READY_WITHIN),
    };
    let _ = child.start_kill();
    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    Err(failed)
}

/// The binary at the path this process was started from: after a package
/// upgrade it is the new one. (`/proc/self/exe` names the old file,
/// marked deleted once replaced.)
fn binary_on_disk() -> io::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut text: OsString = exe.into_os_string();
    if let Some(path) = text.to_str().and_then(|t| t.strip_suffix(" (deleted)")) {
        text = path.into();
    }
    Ok(PathBuf::from(text))
}

/// A pipe, both ends close-on-exec: (read, write).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let [read, write] = fds;
    // SAFETY: pipe2 succeeded: both are open descriptors owned by no one else.
    Ok(unsafe { (OwnedFd::from_raw_fd(read), OwnedFd::from_raw_fd(write)) })
}
