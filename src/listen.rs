//! Listening sockets, and how a restart loses none of their connections.
//!
//! A listener is bound here, or inherited: from systemd (socket activation,
//! `LISTEN_FDS`) or from the process this one replaces (`SIGUSR2`, see
//! [`crate::upgrade`]). An inherited socket is the very socket the kernel
//! queues connections on, so nothing waiting in it is lost when the old
//! process lets go of its copy.
//!
//! A process started by hand beside a running one binds sockets of its own
//! in the same `SO_REUSEPORT` group. Closing the old process's sockets would
//! reset whatever waits in their queues, so the newest process attaches a
//! classic BPF program to the group that sends every new connection to its
//! own socket ([`steer_here`]), and the old process, when it stops, accepts
//! what is still queued before it closes ([`successor_listening`]).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

/// Set by [`crate::upgrade`] for the new process: the descriptor numbers of
/// the listening sockets it hands over, comma-separated.
pub const HANDED_FDS: &str = "SNI_ROUTER_LISTEN_FDS";
/// Set by [`crate::upgrade`]: a pipe to write one byte to once listening.
pub const READY_FD: &str = "SNI_ROUTER_READY_FD";
/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const SD_LISTEN_FDS_START: RawFd = 3;

/// Who handed this process its listening sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Giver {
    Systemd,
    /// The router this process replaces, on `SIGUSR2`.
    Predecessor,
}

impl Giver {
    pub fn as_str(self) -> &'static str {
        match self {
            Giver::Systemd => "systemd",
            Giver::Predecessor => "the previous process",
        }
    }
}

/// Listening sockets this process was given, until each is claimed by
/// address.
#[derive(Debug, Default)]
pub struct Inherited {
    pub giver: Option<Giver>,
    sockets: Vec<(SocketAddr, Socket)>,
    /// The predecessor's readiness pipe.
    ready: Option<OwnedFd>,
}

impl Inherited {
    /// Takes the sockets named by `LISTEN_FDS` (when `LISTEN_PID` is this
    /// process) or by [`HANDED_FDS`]. Call once, before anything else opens
    /// descriptors this process should own.
    pub fn from_env() -> Inherited {
        let var = |name| std::env::var(name).ok();
        let me = std::process::id().to_string();
        let (giver, fds): (Option<Giver>, Vec<RawFd>) = if var("LISTEN_PID") == Some(me) {
            let count: RawFd = var("LISTEN_FDS").and_then(|n| n.parse().ok()).unwrap_or(0);
            let fds = (SD_LISTEN_FDS_START..SD_LISTEN_FDS_START.saturating_add(count)).collect();
            (Some(Giver::Systemd), fds)
        } else if let Some(list) = var(HANDED_FDS) {
            let fds = list
                .split(',')
                .filter_map(|f| f.trim().parse().ok())
                .collect();
            (Some(Giver::Predecessor), fds)
        } else {
            (None, Vec::new())
        };
        let mut inherited = Inherited {
            giver,
            ..Inherited::default()
        };
        for fd in fds.into_iter().filter(|fd| is_open(*fd)) {
            // SAFETY: systemd (sd_listen_fds(3)) or our predecessor handed
            // this descriptor to this process to own, and nothing here has
            // taken it before: this runs once, at start.
            let socket = unsafe { Socket::from_raw_fd(fd) };
            match listening_addr(&socket) {
                Ok(addr) => inherited.sockets.push((addr, socket)),
                Err(e) => {
                    tracing::warn!(fd, error = %e, "an inherited descriptor is not a listening TCP socket: closed");
                }
            }
        }
        if inherited.sockets.is_empty() {
            inherited.giver = None;
        }
        if let Some(fd) = var(READY_FD)
            .and_then(|f| f.parse::<RawFd>().ok())
            .filter(|fd| is_open(*fd))
        {
            // SAFETY: as above, handed over for this process alone.
            inherited.ready = Some(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        inherited
    }

    /// Every inherited socket bound to exactly `addr`: one, or one per
    /// worker of the process that handed them over.
    fn take(&mut self, addr: SocketAddr) -> Vec<Socket> {
        let (taken, kept) = std::mem::take(&mut self.sockets)
            .into_iter()
            .partition(|(a, _)| *a == addr);
        self.sockets = kept;
        taken.into_iter().map(|(_, socket)| socket).collect()
    }

    /// Closes the sockets no listener of the config claimed.
    pub fn close_unclaimed(&mut self) {
        for (addr, _) in self.sockets.drain(..) {
            tracing::warn!(%addr, "an inherited listening socket is not in the config: closed");
        }
    }

    /// Tells the process this one replaces that it is listening; true if
    /// there was one to tell.
    pub fn tell_predecessor(&mut self) -> bool {
        let Some(fd) = self.ready.take() else {
            return false;
        };
        let mut pipe = std::fs::File::from(fd);
        if let Err(e) = io::Write::write_all(&mut pipe, b"1") {
            tracing::warn!(error = %e, "cannot tell the previous process that this one is ready");
        }
        true
    }
}

/// Whether `fd` is an open descriptor: a variable naming one that is not
/// must not become an owner that closes it (std aborts on that).
fn is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only reads the descriptor's flags.
    fd >= 0 && unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1
}

fn listening_addr(socket: &Socket) -> io::Result<SocketAddr> {
    if socket.r#type()? != Type::STREAM || !socket.is_listener()? {
        return Err(io::Error::other("not a listening stream socket"));
    }
    // A socket we keep must not leak into processes we start, unless the
    // upgrade hands it on explicitly.
    socket.set_cloexec(true)?;
    socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("not an IP socket"))
}

/// The listeners on `addr`, up to `wanted` of them in one `SO_REUSEPORT`
/// group (a socket per worker): every socket inherited for the address,
/// else a new one, steered to this process when it joins another
/// process's listeners on the address; then new sockets up to `wanted`,
/// unless systemd holds the address's socket.
///
/// Beside another process there is one socket only. The steering program
/// names a socket by its index in the group, and the kernel moves sockets
/// to other indices as others leave the group, so the index of one of
/// several sockets of ours could come to name one of theirs.
///
/// With `defer`, for protocols whose client speaks first, a connection
/// reaches `accept` only with its first bytes or after `defer`.
pub fn open(
    addr: SocketAddr,
    backlog: u32,
    defer: Option<Duration>,
    wanted: usize,
    inherited: &mut Inherited,
) -> io::Result<Vec<TcpListener>> {
    let backlog = backlog.min(i32::MAX as u32) as i32;
    let mut sockets = inherited.take(addr);
    for socket in &sockets {
        // Already listening, with the backlog its giver chose (systemd's
        // `Backlog=`, or this router's own before an upgrade).
        configure(socket, defer)?;
        let from = inherited.giver.map_or("-", Giver::as_str);
        tracing::info!(%addr, from, "took over a listening socket");
    }
    if sockets.is_empty() {
        let socket = bind(addr, backlog, defer)?;
        let alone = steer_here(&socket, addr);
        sockets.push(socket);
        if !alone {
            return sockets.into_iter().map(listener).collect();
        }
    }
    // Sockets systemd holds outlive a restart of this process; more of
    // our own would not, and would reset what waits in them. (A socket
    // without `SO_REUSEPORT` takes no second one anyway.) The bound
    // address, since port 0 asked the kernel to choose.
    let Some(bound) = sockets
        .first()
        .filter(|_| inherited.giver != Some(Giver::Systemd))
        .filter(|s| s.reuse_port().unwrap_or(false))
        .and_then(|s| s.local_addr().ok()?.as_socket())
    else {
        return sockets.into_iter().map(listener).collect();
    };
    while sockets.len() < wanted {
        match bind(bound, backlog, defer) {
            Ok(socket) => sockets.push(socket),
            Err(e) => {
                tracing::warn!(%addr, error = %e, sockets = sockets.len(), "cannot open another listening socket for a worker");
                break;
            }
        }
    }
    sockets.into_iter().map(listener).collect()
}

fn listener(socket: Socket) -> io::Result<TcpListener> {
    TcpListener::from_std(socket.into())
}

/// A new listening socket on `addr`, in its `SO_REUSEPORT` group.
fn bind(addr: SocketAddr, backlog: i32, defer: Option<Duration>) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    // Lets a new process bind beside an old one during a restart, and a
    // worker beside another.
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        // Explicit, so behaviour does not depend on the host's bindv6only.
        socket.set_only_v6(true)?;
    }
    configure(&socket, defer)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    Ok(socket)
}

fn configure(socket: &Socket, defer: Option<Duration>) -> io::Result<()> {
    socket.set_nonblocking(true)?;
    // Accepted sockets inherit it (see the accept loop).
    socket.set_tcp_nodelay(true)?;
    if let Some(wait) = defer {
        crate::sockopt::defer_accept(socket, wait)?;
    }
    Ok(())
}

/// When other listeners share `addr` (a router still running beside this
/// new one), sends every new connection for the group to `socket`. True
/// when `socket` is alone on the address; false beside another process,
/// or when counting failed (then one socket is all that is safe). The
/// kernel appends a socket to its reuseport group when it starts
/// listening, so this socket's index is the group's size less one; when an
/// older socket leaves, an index past the end falls back to the kernel's
/// usual hash, which then has only the remaining sockets to choose from.
fn steer_here(socket: &Socket, addr: SocketAddr) -> bool {
    let count = match listeners_on(addr) {
        Ok(count) => count,
        Err(e) => {
            tracing::warn!(%addr, error = %e, "cannot count the listeners sharing this address: not steering");
            return false;
        }
    };
    if count < 2 {
        return true;
    }
    let index = u32::try_from(count - 1).unwrap_or(u32::MAX);
    match attach_steering(socket, index) {
        Ok(()) => tracing::info!(
            %addr,
            listeners = count,
            "another process listens here: new connections now come to this one"
        ),
        Err(e) => tracing::warn!(%addr, error = %e, "cannot steer new connections to this process"),
    }
    false
}

/// `SO_ATTACH_REUSEPORT_CBPF` (asm-generic/socket.h; libc does not name
/// it for every target).
#[cfg(target_os = "linux")]
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;

/// A one-instruction classic BPF program: "return `index`".
#[cfg(target_os = "linux")]
fn attach_steering(socket: &Socket, index: u32) -> io::Result<()> {
    let mut code = [libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: index,
    }];
    let program = libc::sock_fprog {
        len: 1,
        filter: code.as_mut_ptr(),
    };
    // SAFETY: a valid descriptor and a program that outlives the call; the
    // kernel copies it.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            std::ptr::from_ref(&program).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn attach_steering(_: &Socket, _: u32) -> io::Result<()> {
    Err(io::Error::other("steering needs Linux"))
}

/// Whether a listener besides this process's `ours` on `listener`'s
/// address (another process's, in the same reuseport group) listens
/// there: then a stopping process accepts what is queued before it
/// closes. A socket shared with a successor (an upgrade) or with systemd
/// counts once.
pub fn successor_listening(listener: &TcpListener, ours: usize) -> bool {
    listener
        .local_addr()
        .and_then(listeners_on)
        .is_ok_and(|count| count > ours)
}

/// Sockets listening on exactly `addr` in this network namespace: asked
/// of the kernel's socket diagnostics, which walk only the listening
/// sockets. `/proc/net/tcp` lists every socket of the host, and on a host
/// holding tens of thousands of connections reading it took half a second
/// per listener, while the listener just bound already queued connections
/// that nobody accepted yet.
fn listeners_on(addr: SocketAddr) -> io::Result<usize> {
    #[cfg(target_os = "linux")]
    if let Ok(count) = diag::listeners_on(addr) {
        return Ok(count);
    }
    let table = match addr {
        SocketAddr::V4(_) => "/proc/self/net/tcp",
        SocketAddr::V6(_) => "/proc/self/net/tcp6",
    };
    let text = std::fs::read_to_string(table)?;
    Ok(listening(&text).filter(|a| *a == addr).count())
}

/// Linux socket diagnostics (`NETLINK_SOCK_DIAG`, linux/inet_diag.h): a
/// dump of the TCP sockets in state LISTEN, as `ss -ltn` asks for it.
#[cfg(target_os = "linux")]
mod diag {
    use std::io;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    const NETLINK_SOCK_DIAG: libc::c_int = 4;
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    const TCP_LISTEN: u32 = 10;
    /// `struct nlmsghdr`.
    const HEADER: usize = 16;
    /// `struct inet_diag_msg`, up to and with its `inet_diag_sockid`.
    const MESSAGE: usize = 4 + 48;

    pub fn listeners_on(addr: SocketAddr) -> io::Result<usize> {
        // SAFETY: plain socket(2); the descriptor is owned at once.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and is ours alone.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        let timeout = libc::timeval {
            tv_sec: 1,
            tv_usec: 0,
        };
        // SAFETY: a valid descriptor and a timeval that outlives the call.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                std::ptr::from_ref(&timeout).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
        }
        let request = request(addr);
        // SAFETY: sending a buffer we own; the kernel is the default
        // destination of an unconnected netlink socket only with an
        // address, so one is given (all zero: the kernel).
        let sent = unsafe {
            let mut kernel: libc::sockaddr_nl = std::mem::zeroed();
            kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
            libc::sendto(
                socket.as_raw_fd(),
                request.as_ptr().cast(),
                request.len(),
                0,
                std::ptr::from_ref(&kernel).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; 32 * 1024];
        let mut count = 0;
        // Bounded: a dump of listeners is a few datagrams.
        for _ in 0..10_000 {
            // SAFETY: receiving into a buffer we own, of its length.
            let n =
                unsafe { libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            let Ok(n) = usize::try_from(n) else {
                return Err(io::Error::last_os_error());
            };
            match count_in(buf.get(..n).unwrap_or_default(), addr)? {
                Dump::More(found) => count += found,
                Dump::Done(found) => return Ok(count + found),
            }
        }
        Err(io::Error::other(
            "socket diagnostics did not end their dump",
        ))
    }

    /// A dump request for `addr`'s family: TCP sockets in state LISTEN.
    fn request(addr: SocketAddr) -> Vec<u8> {
        let family = match addr {
            SocketAddr::V4(_) => libc::AF_INET,
            SocketAddr::V6(_) => libc::AF_INET6,
        };
        let len = HEADER + 8 + 48;
        let mut out = Vec::with_capacity(len);
        out.extend_from_slice(&(len as u32).to_ne_bytes());
        out.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
        out.extend_from_slice(&flags.to_ne_bytes());
        out.extend_from_slice(&1u32.to_ne_bytes()); // sequence
        out.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        out.extend_from_slice(&[family as u8, libc::IPPROTO_TCP as u8, 0, 0]);
        out.extend_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
        out.resize(len, 0); // any socket id
        out
    }

    pub enum Dump {
        More(usize),
        Done(usize),
    }

    /// How many sockets in one datagram of the dump listen on `addr`.
    pub fn count_in(mut datagram: &[u8], addr: SocketAddr) -> io::Result<Dump> {
        let mut found = 0;
        while datagram.len() >= HEADER {
            let word = |at: usize| {
                datagram
                    .get(at..at + 4)
                    .and_then(|b| <[u8; 4]>::try_from(b).ok())
                    .map_or(0, u32::from_ne_bytes)
            };
            let len = word(0) as usize;
            let kind = u16::try_from(word(4) & 0xffff).unwrap_or(0);
            if len < HEADER || len > datagram.len() {
                return Err(io::Error::other("a malformed socket diagnostics message"));
            }
            match kind {
                NLMSG_DONE => return Ok(Dump::Done(found)),
                NLMSG_ERROR => {
                    let errno = i32::from_ne_bytes(word(HEADER).to_ne_bytes());
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                SOCK_DIAG_BY_FAMILY => {
                    let body = datagram.get(HEADER..len).unwrap_or_default();
                    if body.len() >= MESSAGE && listens_on(body, addr) {
                        found += 1;
                    }
                }
                _ => {}
            }
            // Messages are aligned to 4 bytes.
            let next = (len + 3) & !3;
            datagram = datagram.get(next..).unwrap_or_default();
        }
        Ok(Dump::More(found))
    }

    /// Whether an `inet_diag_msg` is a listener on `addr`: its state, and
    /// its source port and address (network byte order).
    fn listens_on(msg: &[u8], addr: SocketAddr) -> bool {
        let byte = |at: usize| msg.get(at).copied().unwrap_or(0);
        if u32::from(byte(1)) != TCP_LISTEN {
            return false;
        }
        let port = u16::from_be_bytes([byte(4), byte(5)]);
        let src = |n: usize| msg.get(8..8 + n).unwrap_or_default();
        let ip = match i32::from(byte(0)) {
            libc::AF_INET => <[u8; 4]>::try_from(src(4))
                .ok()
                .map(|b| IpAddr::V4(Ipv4Addr::from(b))),
            libc::AF_INET6 => <[u8; 16]>::try_from(src(16))
                .ok()
                .map(|b| IpAddr::V6(Ipv6Addr::from(b))),
            _ => None,
        };
        ip.is_some_and(|ip| SocketAddr::new(ip, port) == addr)
    }
}

/// The local addresses of the LISTEN sockets in a `/proc/net/tcp{,6}`
/// table: `sl local_address rem_address st ...`, with addresses as the
/// kernel's 32-bit words in hex (host byte order) and the state `0A`.
fn listening(table: &str) -> impl Iterator<Item = SocketAddr> + '_ {
    table.lines().skip(1).filter_map(|line| {
        let mut fields = line.split_whitespace();
        let local = fields.nth(1)?;
        let state = fields.nth(1)?;
        if state != "0A" {
            return None;
        }
        let (ip, port) = local.split_once(':')?;
        let port = u16::from_str_radix(port, 16).ok()?;
        let mut bytes = Vec::with_capacity(16);
        for word in ip.as_bytes().chunks(8) {
            let word = u32::from_str_radix(std::str::from_utf8(word).ok()?, 16).ok()?;
            bytes.extend_from_slice(&word.to_ne_bytes());
        }
        let ip = match bytes.len() {
            4 => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(bytes).ok()?)),
            16 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?)),
            _ => return None,
        };
        Some(SocketAddr::new(ip, port))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_endian = "little")]
    fn the_kernels_tables_are_read() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:20FB 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0100007F:20FB 0200007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 20 4 30 10 -1
   2: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3 1 0 100 0 0 10 0
";
        let found: Vec<SocketAddr> = listening(v4).collect();
        assert_eq!(
            found,
            [
                "127.0.0.1:8443".parse().unwrap(),
                "0.0.0.0:80".parse().unwrap()
            ]
        );
        let v6 = "  sl  local_address                         remote_address                        st
   0: 00000000000000000000000001000000:20FB 00000000000000000000000000000000:0000 0A 00000000:00000000
";
        let found: Vec<SocketAddr> = listening(v6).collect();
        assert_eq!(found, ["[::1]:8443".parse().unwrap()]);
    }

    /// A variable naming a descriptor that is not open must not make an
    /// owner of it: closing it would abort the process.
    #[test]
    fn only_open_descriptors_are_taken() {
        let file = std::fs::File::open("/proc/self/stat").unwrap();
        assert!(is_open(file.as_raw_fd()));
        assert!(!is_open(-1));
        assert!(!is_open(1_000_000));
    }

    /// The kernel's socket diagnostics and `/proc/net/tcp{,6}` agree, and
    /// a dump datagram is read message by message.
    #[test]
    #[cfg(target_os = "linux")]
    fn listeners_are_counted_by_socket_diagnostics() {
        for addr in ["127.0.0.1:0", "[::1]:0"] {
            let mut none = Inherited::default();
            let addr: SocketAddr = addr.parse().unwrap();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let _guard = runtime.enter();
            let first = open(addr, 16, None, 1, &mut none).unwrap();
            let addr = first[0].local_addr().unwrap();
            let second = open(addr, 16, None, 1, &mut none).unwrap();
            assert_eq!(diag::listeners_on(addr).unwrap(), 2, "{addr}");
            let table = if addr.is_ipv4() {
                "/proc/self/net/tcp"
            } else {
                "/proc/self/net/tcp6"
            };
            let text = std::fs::read_to_string(table).unwrap();
            assert_eq!(listening(&text).filter(|a| *a == addr).count(), 2);
            drop((first, second));
            assert_eq!(diag::listeners_on(addr).unwrap(), 0);
        }
        // Two messages, the second a listener on 127.0.0.1:8443, then DONE.
        let message = |state: u8, port: u16| {
            let mut m = Vec::new();
            m.extend_from_slice(&88u32.to_ne_bytes());
            m.extend_from_slice(&20u16.to_ne_bytes());
            m.extend_from_slice(&[0; 10]);
            m.extend_from_slice(&[libc::AF_INET as u8, state, 0, 0]);
            m.extend_from_slice(&port.to_be_bytes());
            m.extend_from_slice(&[0, 0, 127, 0, 0, 1]);
            m.resize(88, 0);
            m
        };
        let mut datagram = [message(1, 8443), message(10, 8443), message(10, 8444)].concat();
        let addr: SocketAddr = "127.0.0.1:8443".parse().unwrap();
        assert!(matches!(
            diag::count_in(&datagram, addr),
            Ok(diag::Dump::More(1))
        ));
        let mut done = vec![0u8; 20];
        done[..4].copy_from_slice(&20u32.to_ne_bytes());
        done[4..6].copy_from_slice(&3u16.to_ne_bytes());
        datagram.extend_from_slice(&done);
        assert!(matches!(
            diag::count_in(&datagram, addr),
            Ok(diag::Dump::Done(1))
        ));
        // A length past the datagram is refused, not read past.
        datagram[..4].copy_from_slice(&9999u32.to_ne_bytes());
        assert!(diag::count_in(&datagram, addr).is_err());
    }

    #[tokio::test]
    async fn a_listener_beside_another_is_counted_and_takes_new_connections() {
        let mut none = Inherited::default();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let first = open(any, 16, None, 1, &mut none).unwrap().remove(0);
        let addr = first.local_addr().unwrap();
        assert!(!successor_listening(&first, 1));
        let second = open(addr, 16, None, 1, &mut none).unwrap().remove(0);
        assert!(successor_listening(&first, 1));
        // Every new connection goes to the newest listener.
        for _ in 0..20 {
            let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (_, _) = tokio::time::timeout(Duration::from_secs(5), second.accept())
                .await
                .unwrap()
                .unwrap();
        }
        let nothing = tokio::time::timeout(Duration::from_millis(50), first.accept()).await;
        assert!(nothing.is_err(), "the old listener got a new connection");
        drop(first);
        assert!(!successor_listening(&second, 1));
    }

    #[tokio::test]
    async fn a_socket_per_worker_alone_and_one_beside_another_process() {
        let mut none = Inherited::default();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let workers = open(any, 128, None, 3, &mut none).unwrap();
        assert_eq!(workers.len(), 3);
        let addr = workers[0].local_addr().unwrap();
        assert!(workers.iter().all(|l| l.local_addr().unwrap() == addr));
        assert_eq!(listeners_on(addr).unwrap(), 3);
        assert!(!successor_listening(&workers[0], 3));
        // The kernel spreads new connections over the group.
        let mut served = [0usize; 3];
        let mut clients = Vec::new();
        for _ in 0..60 {
            let connect = tokio::net::TcpStream::connect(addr);
            let client = tokio::time::timeout(Duration::from_secs(5), connect).await;
            clients.push(client.unwrap().unwrap());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        for (i, listener) in workers.iter().enumerate() {
            while let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_millis(20), listener.accept()).await
            {
                served[i] += 1;
            }
        }
        assert_eq!(served.iter().sum::<usize>(), 60);
        assert!(served.iter().all(|n| *n > 0), "{served:?}");
        // A process started beside them takes one socket, and every new
        // connection.
        let beside = open(addr, 128, None, 3, &mut none).unwrap();
        assert_eq!(beside.len(), 1);
        assert!(successor_listening(&workers[0], 3));
        for _ in 0..20 {
            let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
            tokio::time::timeout(Duration::from_secs(5), beside[0].accept())
                .await
                .unwrap()
                .unwrap();
        }
    }
}
