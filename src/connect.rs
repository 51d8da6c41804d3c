//! Outbound connections: a deadline on every connect, an optional source
//! address (so peers recognise node-to-node traffic).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};

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
    let attempt = async {
        let socket = socket_from(target, source)?;
        let _ = crate::sockopt::delay_acks(&socket);
        let stream = socket.connect(target).await?;
        stream.set_nodelay(true)?;
        Ok::<_, io::Error>(stream)
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(ConnectError::Io(target, e)),
        Err(_) => Err(ConnectError::Timeout(target, timeout)),
    }
}

fn socket_from(target: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpSocket> {
    let fresh = || match target {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    };
    let socket = fresh()?;
    if let Some(ip) = source.filter(|ip| ip.is_ipv4() == target.is_ipv4() && !ip.is_unspecified()) {
        // Many splices to one holder from one source address: let connect
        // pick the port per destination rather than bind reserve it.
        let _ = crate::sockopt::bind_address_no_port(&socket);
        if socket.bind(SocketAddr::new(ip, 0)).is_ok() {
            return Ok(socket);
        }
        return fresh();
    }
    Ok(socket)
}
