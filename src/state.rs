//! What every connection and background task shares: the live config and
//! what is built from it, the certificate and challenge stores, peer health,
//! counters, limits and the task tracker. Below the handlers and the ACME
//! manager, which take it as an argument; above only leaf types. The
//! server (listeners, signals, drain) builds it and wires the rest.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use arc_swap::ArcSwap;
use tokio::sync::{OwnedSemaphorePermit, watch};
use tokio_util::task::TaskTracker;

use crate::acme::status::Report;
use crate::certs::store::CertStore;
use crate::config::Config;
use crate::http::challenge::ChallengeStore;
use crate::http::guard::ForwardGuard;
use crate::limits::{HelloSlots, SourceGuard, SourceLimits};
use crate::peers::PeerHealth;
use crate::tls::route::DecisionKind;
use crate::tls::terminate::{Contexts, Resumption};

/// Counts since start, for `/status` (and the tests that run a router in
/// process, where no Prometheus recorder is installed); the metrics are
/// recorded alongside.
#[derive(Debug, Default)]
pub struct Stats {
    pub accepted: AtomicU64,
    pub finished: AtomicU64,
    pub rejected: AtomicU64,
    /// Held sites spliced to a peer for want of a valid certificate here.
    pub fallbacks: AtomicU64,
    /// Requests read on the HTTP port.
    pub http_requests: AtomicU64,
    /// Challenge requests forwarded to holders.
    pub http_forwarded: AtomicU64,
}

impl Stats {
    pub fn finished(&self, decision: DecisionKind) {
        self.finished.fetch_add(1, Ordering::Relaxed);
        if decision == DecisionKind::Reject {
            self.rejected.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A config with everything built from it; swapped whole on reload so a
/// connection never mixes two versions.
#[derive(Debug)]
pub struct Live {
    pub config: Config,
    pub tls: Contexts,
    pub guard: ForwardGuard,
    /// Per-site counters for this config's sites.
    pub sites: crate::metrics::SiteMetrics,
}

/// Who connected, and to which of our addresses: what both ports' handlers
/// start from.
#[derive(Debug, Clone, Copy)]
pub struct Arrival {
    pub peer: std::net::SocketAddr,
    pub local: std::net::SocketAddr,
    /// Whether `peer` is a node or trusted proxy, asked once at accept.
    pub may_send_proxy: bool,
}

/// What an accepted connection holds until it ends, wherever it ends: its
/// place under the connection limit and the per-source cap, and in the
/// active-connections gauge.
pub struct Admission {
    pub(crate) _permit: OwnedSemaphorePermit,
    pub(crate) _source: Option<SourceGuard>,
    pub(crate) active: metrics::Gauge,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.active.decrement(1.0);
    }
}

/// State every connection task can reach.
#[derive(Debug)]
pub struct Shared {
    pub live: Arc<ArcSwap<Live>>,
    pub certs: Arc<CertStore>,
    pub challenges: Arc<ChallengeStore>,
    pub stats: Stats,
    pub peers: PeerHealth,
    /// Which targets (nodes, backends, upstreams) failed lately.
    pub health: crate::health::TargetHealth,
    /// What the ACME manager has done, for the status page.
    pub acme: Arc<Report>,
    /// Listeners bound and accepting (false before start and while draining).
    pub ready: AtomicBool,
    pub hello_slots: Arc<HelloSlots>,
    pub sources: Arc<SourceLimits>,
    pub(crate) resumption: Resumption,
    /// Bumped on every reload; background tasks watch it.
    pub reloaded: watch::Sender<u64>,
    /// Every connection task, so shutdown can wait for them to drain.
    pub tasks: TaskTracker,
    /// Where routed TCP pairs live once joined.
    #[cfg(target_os = "linux")]
    pub engines: crate::splice::engine::Engines,
}

impl Live {
    pub(crate) fn build(
        config: Config,
        certs: &Arc<CertStore>,
        resumption: &Resumption,
    ) -> Result<Live, rustls::Error> {
        let tls = Contexts::build(&config, certs, resumption)?;
        let guard = ForwardGuard::new(config.http.forward_per_second);
        let sites = crate::metrics::SiteMetrics::new(config.sites.iter().map(|s| s.label.as_str()));
        Ok(Live {
            config,
            tls,
            guard,
            sites,
        })
    }
}

impl Shared {
    pub(crate) fn build(&self, config: Config) -> Result<Live, rustls::Error> {
        Live::build(config, &self.certs, &self.resumption)
    }

    /// The live config, as a connection or a background task takes it:
    /// one snapshot for all it does.
    pub fn live(&self) -> Arc<Live> {
        self.live.load_full()
    }
}
