//! sni-router: a layer-4 SNI router for a fleet of edge nodes.
//!
//! # Layout, in the order a connection flows
//!
//! ```text
//! config ──► server: listen (bind, or inherit from systemd or the process
//!              │    being replaced), accept under a limit, reload, drain,
//!              │    upgrade (SIGUSR2: hand every listener to the new binary)
//!              │
//!              ▼  port 443
//!            preface ── PROXY header (trusted peers only) + ClientHello bytes
//!              │            └─ tls::client_hello: pure, bounded parser
//!              ▼
//!            tls::route::decide ── pure: the site's allow/deny lists, then
//!              │    terminate | splice | passthrough | reject
//!              │
//!              ├─ terminate: tls::terminate (rustls over the replayed hello,
//!              │    certificate from certs::store, suite order from
//!              │    tls::suites) -> upstream, splice::StreamJoin
//!              ├─ splice / passthrough: forward::open (one engine for holders,
//!              │    backend pools and upstreams: connect with deadline, failover,
//!              │    health) -> replay PROXY header + peeked bytes, splice::TcpJoin
//!              └─ reject: unrecognized_name (or access_denied) alert, close
//!
//! Routing runs in the accept's task; a joined connection then lives in a
//! small task of its own (tls::handler::ConnectionTask). A spliced pair quiet
//! for a second moves on to a splice::engine (Linux: an epoll set, no task
//! per pair). None holds a buffer while idle.
//!
//! certs::watch (PEM files on disk) ──► certs::store ◄── read by every handshake
//! certs::internal (the internal CA's leaves) ──┤
//! acme (one task: order, renew by site schedule and ARI) ──┘
//!   ├─ tokens ──► http (port 80: answer, ask holders, redirect)
//!   └─ TXT records ──► acme::dns01 (RFC 2136 updates to one DNS server)
//! ```
//!
//! `state` is what connections and background tasks share (the live
//! config, stores, counters): the handlers and the ACME manager take it as
//! an argument (the ACME manager only the parts it uses: `acme::Inputs`),
//! and nothing below `server` imports `server`.
//! `names` normalizes names and holds the exact/wildcard lookup shared by
//! config and routing; `forward` connects with failover in rendezvous order
//! for both ports, and `health` remembers which targets failed lately and
//! runs the `health = "tcp"` checks;
//! `proxy_protocol` encodes and decodes PROXY v1/v2; `sockopt` sets the
//! socket options socket2 lacks; `splice` is the one place two streams are
//! joined; `probe` is the `sni-router probe` command; `notify` tells
//! systemd when the listeners are bound and when draining starts; `listen`
//! opens or inherits listening sockets and steers a reuseport group to the
//! newest process; `upgrade` starts the successor on SIGUSR2;
//! `test_helpers` (tests and the `test-helpers` feature only) is the one
//! home of helpers that unit tests, integration tests and benches share.

// Nothing that handles network bytes may panic; tests may.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod config;
pub mod names;
pub mod state;
pub mod server;
pub mod listen;
pub mod upgrade;
pub mod limits;
pub mod log_sink;
pub mod conn_log;
pub mod preface;
pub mod tls;
pub mod http;
pub mod proxy_protocol;
pub mod forward;
pub mod health;
pub mod connect;
pub mod sockopt;
pub mod splice;
pub mod certs;
pub mod acme;
pub mod metrics;
pub mod peers;
pub mod admin;
pub mod probe;
pub mod notify;
#[cfg(any(test, feature = "test-helpers"))]
pub mod test_helpers;
