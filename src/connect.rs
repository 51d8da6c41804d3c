//! Outbound connections: a deadline on every connect, an optional source
//! address (so peers recognise node-to-node traffic), and the first bytes
//! sent the moment the connection is up.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {0} timed out after {1:?}")]
    Timeout(SocketAddr, Duration),
    #[error("connect to {0}: {1}")]
    Io(SocketAddr, io::Error),
}

impl ConnectError {
    pub fn kind(&self) -> &'static str {
        match self {
            ConnectError::Timeout(..) => "connect_timeout",
            ConnectError::Io(..) => "connect_error",
        }
    }
}

/// Connects to `target` within `timeout`, from `source` when that address
/// is local (it may not be, e.g. a public address behind 1:1 NAT).
pub async fn connect(
    target: SocketAddr,
    source: Option<IpAddr>,
    timeout: Duration,
) -> Result<TcpStream, ConnectError> {
    connect_sending(target, source, timeout, &[])
        .await
        .map(|(stream, _)| stream)
}

/// As [`connect`], and sends what it can of `early` as soon as the
/// connection is up; returns the rest, for the caller to write.
///
/// A connection to a nearby host (a backend on the same machine or LAN
/// segment, loopback above all) is often established before `connect`
/// returns, because the kernel runs the handshake's receive path inside
/// the call. Sending at once then saves a trip through the event loop and
/// the `SO_ERROR` check per connection; a handshake still under way costs
/// one `send` that would block.
pub async fn connect_sending(
    target: SocketAddr,
    source: Option<IpAddr>,
    timeout: Duration,
    early: &[u8],
) -> Result<(TcpStream, &[u8]), ConnectError> {
    let attempt = async {
        let socket = socket_from(target, source)?;
        let _ = crate::sockopt::delay_acks(&socket);
        socket.set_tcp_nodelay(true)?;
        match socket.connect(&target.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        let sent = if early.is_empty() {
            None
        } else {
            match socket.send_with_flags(early, SEND_FLAGS) {
                Ok(n) => Some(n),
                Err(e) if still_connecting(&e) => None,
                Err(e) => return Err(e),
            }
        };
        let stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
        if sent.is_none() {
            stream.writable().await?;
            if let Some(e) = stream.take_error()? {
                return Err(e);
            }
        }
        let rest = early.get(sent.unwrap_or(0)..).unwrap_or_default();
        Ok::<_, io::Error>((stream, rest))
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(opened)) => Ok(opened),
        Ok(Err(e)) => Err(ConnectError::Io(target, e)),
        Err(_) => Err(ConnectError::Timeout(target, timeout)),
    }
}

/// A send on a socket whose handshake is under way: Linux says EAGAIN,
/// other systems ENOTCONN.
fn still_connecting(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock || e.raw_os_error() == Some(libc::ENOTCONN)
}

#[cfg(target_os = "linux")]
const SEND_FLAGS: libc::c_int = libc::MSG_NOSIGNAL;
#[cfg(not(target_os = "linux"))]
const SEND_FLAGS: libc::c_int = 0;

fn socket_from(target: SocketAddr, source: Option<IpAddr>) -> io::Result<Socket> {
    let fresh = || {
        #[cfg(target_os = "linux")]
        let socket = Socket::new(
            Domain::for_address(target),
            Type::STREAM.nonblocking(),
            Some(Protocol::TCP),
        )?;
        #[cfg(not(target_os = "linux"))]
        let socket = {
            let socket = Socket::new(
                Domain::for_address(target),
                Type::STREAM,
                Some(Protocol::TCP),
            )?;
            socket.set_nonblocking(true)?;
            socket
        };
        Ok::<_, io::Error>(socket)
    };
    let socket = fresh()?;
    if let Some(ip) = source.filter(|ip| ip.is_ipv4() == target.is_ipv4() && !ip.is_unspecified()) {
        // Many splices to one holder from one source address: let connect
        // pick the port per destination rather than bind reserve it.
        let _ = crate::sockopt::bind_address_no_port(&socket);
        if socket.bind(&SocketAddr::new(ip, 0).into()).is_ok() {
            return Ok(socket);
        }
        return fresh();
    }
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const WAIT: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn the_first_bytes_go_out_with_the_connect_and_the_rest_after() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hello = vec![7u8; 1500];
        let mut at_once = 0;
        for _ in 0..10 {
            let (mut stream, rest) = connect_sending(addr, None, WAIT, &hello).await.unwrap();
            at_once += usize::from(rest.is_empty());
            stream.write_all(rest).await.unwrap();
            stream.write_all(b"more").await.unwrap();
            drop(stream);
            let (mut accepted, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            tokio::time::timeout(WAIT, accepted.read_to_end(&mut got))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(got.len(), hello.len() + 4);
            assert!(got.ends_with(b"more"));
        }
        // Loopback completes the handshake inside connect, unless the
        // kernel defers its packet processing under load.
        assert!(at_once > 0, "no connect sent its first bytes at once");
    }

    #[tokio::test]
    async fn bytes_wait_for_a_handshake_that_is_still_under_way() {
        // A listener whose accept queue is full drops SYNs, so the connect
        // is still under way when the early send is tried.
        let listener = socket2::Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        listener
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        listener.listen(0).unwrap();
        let addr = listener.local_addr().unwrap().as_socket().unwrap();
        let queued = std::net::TcpStream::connect(addr).unwrap();
        let listener = std::net::TcpListener::from(listener);
        let hello = b"hello".to_vec();
        let short = Duration::from_millis(300);
        let err = connect_sending(addr, None, short, &hello)
            .await
            .unwrap_err();
        assert!(matches!(err, ConnectError::Timeout(..)), "{err}");

        // Once the queue has room the connection completes, on a
        // retransmitted SYN if the first was dropped, and the bytes follow.
        let accepting = std::thread::spawn(move || {
            let first = listener.accept().unwrap();
            let (mut second, _) = listener.accept().unwrap();
            second.set_read_timeout(Some(WAIT)).unwrap();
            let mut got = Vec::new();
            std::io::Read::read_to_end(&mut second, &mut got).unwrap();
            drop((first, queued));
            got
        });
        let (mut stream, rest) = connect_sending(addr, None, WAIT, &hello).await.unwrap();
        stream.write_all(rest).await.unwrap();
        drop(stream);
        assert_eq!(accepting.join().unwrap(), hello);
    }

    #[tokio::test]
    async fn a_refused_connect_is_an_error_whether_or_not_bytes_wait() {
        let closed = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap()
        };
        for early in [&b""[..], &b"hello"[..]] {
            let err = connect_sending(closed, None, WAIT, early)
                .await
                .unwrap_err();
            assert!(
                matches!(&err, ConnectError::Io(addr, e) if *addr == closed && e.kind() == io::ErrorKind::ConnectionRefused),
                "{err}"
            );
        }
    }

    #[tokio::test]
    async fn the_source_address_is_used_when_it_is_local() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let source: IpAddr = "127.0.0.7".parse().unwrap();
        let stream = connect(addr, Some(source), WAIT).await.unwrap();
        assert!(stream.nodelay().unwrap());
        let (_, peer) = listener.accept().await.unwrap();
        assert_eq!(peer.ip(), source);
    }
}
