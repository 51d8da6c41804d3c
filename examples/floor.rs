//! The floor under the CPU a spliced connection costs: the least a Rust
//! program does to relay one bench connection (read the hello, connect to
//! the backend, send the hello on, copy both ways until both ends close),
//! once on tokio and once on a bare mio event loop. No routing, limits,
//! deadlines, metrics or log line, and plain copies through a buffer.
//! `benches/cpu-per-conn.sh` runs them beside sni-router and sniproxy:
//! what the tokio one costs over the mio one is the runtime's share
//! (docs/benchmarks.md, "Where the CPU per connection goes").
//!
//!   floor tokio|mio|mio-rw LISTEN BACKEND
//!
//! `mio-rw` registers each socket as tokio does: for reading and writing
//! both, and deregistered before it is closed.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = || {
        io::Error::new(
            ErrorKind::InvalidInput,
            "usage: floor tokio|mio|mio-rw LISTEN BACKEND",
        )
    };
    let (Some(kind), Some(listen), Some(backend)) = (args.get(1), args.get(2), args.get(3)) else {
        return Err(usage());
    };
    let parse = |s: &str| s.parse::<SocketAddr>().map_err(|_| usage());
    let (listen, backend) = (parse(listen)?, parse(backend)?);
    match kind.as_str() {
        "tokio" => on_tokio(listen, backend),
        "mio" => on_mio(listen, backend, false),
        "mio-rw" => on_mio(listen, backend, true),
        _ => Err(usage()),
    }
}

/// One worker, as the benches run sni-router: a task per connection.
fn on_tokio(listen: SocketAddr, backend: SocketAddr) -> io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        loop {
            let (mut client, _) = listener.accept().await?;
            tokio::spawn(async move {
                let _ = client.set_nodelay(true);
                let mut hello = [0u8; 2048];
                let n = match client.read(&mut hello).await {
                    Ok(n) if n > 0 => n,
                    _ => return,
                };
                let Ok(mut target) = tokio::net::TcpStream::connect(backend).await else {
                    return;
                };
                let _ = target.set_nodelay(true);
                if target.write_all(&hello[..n]).await.is_ok() {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut target).await;
                }
            });
        }
    })
}

/// A connection on the mio loop: the client, and the target once the
/// hello has come.
struct Relay {
    client: mio::net::TcpStream,
    target: Option<mio::net::TcpStream>,
    /// The hello, until the target's connect completes.
    hello: Vec<u8>,
    client_eof: bool,
    target_eof: bool,
}

const LISTENER: mio::Token = mio::Token(usize::MAX);

/// One thread, edge-triggered epoll: token 2k is relay k's client, 2k + 1
/// its target. Unless `as_tokio`, a client is registered for reading only
/// and sockets are closed without deregistering them (as sniproxy does).
fn on_mio(listen: SocketAddr, backend: SocketAddr, as_tokio: bool) -> io::Result<()> {
    use mio::Interest;
    let client_interest = if as_tokio {
        Interest::READABLE | Interest::WRITABLE
    } else {
        Interest::READABLE
    };
    let mut poll = mio::Poll::new()?;
    let mut listener = mio::net::TcpListener::bind(listen)?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let mut relays = slab::Slab::<Relay>::new();
    let mut events = mio::Events::with_capacity(1024);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        poll.poll(&mut events, None)?;
        for event in events.iter() {
            if event.token() == LISTENER {
                while let Ok((mut client, _)) = listener.accept() {
                    let _ = client.set_nodelay(true);
                    let entry = relays.vacant_entry();
                    let token = mio::Token(entry.key() * 2);
                    poll.registry()
                        .register(&mut client, token, client_interest)?;
                    entry.insert(Relay {
                        client,
                        target: None,
                        hello: Vec::new(),
                        client_eof: false,
                        target_eof: false,
                    });
                }
                continue;
            }
            let key = event.token().0 / 2;
            let Some(relay) = relays.get_mut(key) else {
                continue;
            };
            // Done or failed: dropping closes both sockets, which takes
            // them out of epoll.
            if !matches!(step(relay, key, &poll, backend, &mut buf), Ok(false)) {
                let mut relay = relays.remove(key);
                if as_tokio {
                    let _ = poll.registry().deregister(&mut relay.client);
                    if let Some(target) = relay.target.as_mut() {
                        let _ = poll.registry().deregister(target);
                    }
                }
            }
        }
    }
}

/// Moves relay `key` on as far as it goes; whether it is done (both ends
/// have sent their EOF).
fn step(
    relay: &mut Relay,
    key: usize,
    poll: &mio::Poll,
    backend: SocketAddr,
    buf: &mut [u8],
) -> io::Result<bool> {
    let Some(target) = relay.target.as_mut() else {
        match relay.client.read(buf) {
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => relay
                .hello
                .extend_from_slice(buf.get(..n).unwrap_or_default()),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
        let mut target = mio::net::TcpStream::connect(backend)?;
        let _ = target.set_nodelay(true);
        let interest = mio::Interest::READABLE | mio::Interest::WRITABLE;
        poll.registry()
            .register(&mut target, mio::Token(key * 2 + 1), interest)?;
        relay.target = Some(target);
        return Ok(false);
    };
    if !relay.hello.is_empty() {
        match target.write(&relay.hello) {
            Ok(n) if n == relay.hello.len() => relay.hello = Vec::new(),
            Ok(_) => return Err(ErrorKind::WriteZero.into()),
            // Not connected yet: the target's writable event comes back here.
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::NotConnected => {
                return Ok(false);
            }
            Err(e) => return Err(e),
        }
    }
    if !relay.target_eof {
        relay.target_eof = pump(target, &mut relay.client, buf)?;
    }
    if !relay.client_eof {
        relay.client_eof = pump(&mut relay.client, target, buf)?;
    }
    Ok(relay.client_eof && relay.target_eof)
}

/// Copies what `from` has to `to`; true at EOF, passed on as a half-close.
fn pump(
    from: &mut mio::net::TcpStream,
    to: &mut mio::net::TcpStream,
    buf: &mut [u8],
) -> io::Result<bool> {
    loop {
        match from.read(buf) {
            Ok(0) => {
                let _ = to.shutdown(Shutdown::Write);
                return Ok(true);
            }
            Ok(n) => to.write_all(buf.get(..n).unwrap_or_default())?,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
    }
}
