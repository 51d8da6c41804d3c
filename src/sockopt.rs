//! Socket options socket2 does not offer, each a saved syscall or wake-up
//! per connection. No-ops off Linux.

use std::io;
use std::time::Duration;

#[cfg(target_os = "linux")]
fn set_int(fd: &impl std::os::fd::AsRawFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a valid descriptor and a pointer to a c_int that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(&value).cast(),
            len,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `TCP_DEFER_ACCEPT`: the kernel hands a connection to `accept` only once
/// its first bytes arrive (or `wait` passes), so the router is not woken for
/// a client that has said nothing yet. Every protocol we listen for speaks
/// first (a TLS ClientHello, an HTTP request).
pub fn defer_accept(listener: &socket2::Socket, wait: Duration) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        let secs = i32::try_from(wait.as_secs().max(1)).unwrap_or(i32::MAX);
        set_int(listener, libc::IPPROTO_TCP, libc::TCP_DEFER_ACCEPT, secs)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (listener, wait);
        Ok(())
    }
}

/// `IP_BIND_ADDRESS_NO_PORT`: binding a source address before `connect`
/// leaves the port to `connect`, so the kernel may reuse a source port
/// toward different destinations instead of reserving one per socket.
pub fn bind_address_no_port(socket: &impl std::os::fd::AsRawFd) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        set_int(socket, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = socket;
        Ok(())
    }
}

/// `TCP_QUICKACK` off before `connect`: the kernel holds back the ACK of
/// the SYN-ACK and sends it with the ClientHello we replay at once, one
/// packet fewer per outbound connection (HAProxy's `tcp-smart-connect`).
/// On a listener it would do nothing: Linux acknowledges a fresh
/// connection's first bytes at once whatever the listener says.
pub fn delay_acks(socket: &impl std::os::fd::AsRawFd) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        set_int(socket, libc::IPPROTO_TCP, libc::TCP_QUICKACK, 0)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = socket;
        Ok(())
    }
}

/// Whether sockets accepted from a listener with `TCP_NODELAY` inherit it,
/// which saves a `setsockopt` per connection. True on Linux.
pub const ACCEPTED_INHERIT_NODELAY: bool = cfg!(target_os = "linux");

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay_from_the_listener() {
        let listener = crate::listen::open(
            "127.0.0.1:0".parse().unwrap(),
            8,
            Some(Duration::from_secs(1)),
            1,
            &mut crate::listen::Inherited::default(),
        )
        .unwrap()
        .remove(0);
        let addr = listener.local_addr().unwrap();
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        // Deferred accept: the listener hands it over once bytes arrive.
        tokio::io::AsyncWriteExt::write_all(&mut client, b"x")
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert_eq!(accepted.nodelay().unwrap(), super::ACCEPTED_INHERIT_NODELAY);
    }
}
