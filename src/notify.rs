//! systemd's readiness protocol (`sd_notify`): under `Type=notify`,
//! `systemctl start` returns once the listeners are bound, and fails when
//! they cannot be, instead of reporting a router that exits at once as
//! started. One datagram to `$NOTIFY_SOCKET`; nothing when it is unset.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Where `$NOTIFY_SOCKET` points: a path, or an abstract name after `@`.
fn address(value: &str) -> Option<SocketAddr> {
    match value.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes()).ok(),
        None if value.starts_with('/') => SocketAddr::from_pathname(value).ok(),
        None => None,
    }
}

/// Tells systemd `state` (`READY=1`, `STOPPING=1`) when it asked to know.
pub fn notify(state: &str) {
    let Some(value) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = value
        .to_str()
        .and_then(address)
        .ok_or_else(|| io::Error::other("not a path or an abstract socket name"))
        .and_then(|addr| UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr));
    if let Err(e) = sent {
        tracing::warn!(socket = ?value, error = %e, "cannot tell systemd {state}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_abstract_names_are_understood() {
        let path = address("/run/systemd/notify").unwrap();
        assert_eq!(
            path.as_pathname().unwrap().to_str(),
            Some("/run/systemd/notify")
        );
        let name = address("@/org/freedesktop/systemd1/notify/1").unwrap();
        assert_eq!(
            name.as_abstract_name(),
            Some(&b"/org/freedesktop/systemd1/notify/1"[..])
        );
        assert!(address("vsock:2:1234").is_none());
        assert!(address("relative").is_none());
    }

    #[test]
    fn the_state_arrives_as_one_datagram() {
        let dir = std::env::temp_dir().join(format!("sni-router-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let systemd = UnixDatagram::bind(&path).unwrap();
        let addr = address(path.to_str().unwrap()).unwrap();
        UnixDatagram::unbound()
            .unwrap()
            .send_to_addr(b"READY=1", &addr)
            .unwrap();
        let mut buf = [0; 64];
        let n = systemd.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
