//! Listeners and the process lifecycle: bind with socket2, accept under a
//! connection limit, swap config on reload, drain on shutdown.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::certs::internal::Leaves;
use crate::certs::store::CertStore;
use crate::certs::watch::FileWatch;
use crate::config::{Config, ConfigError};
use crate::limits::{HelloSlots, SourceLimits};
use crate::listen::Inherited;
use crate::metrics::{CONFIG_RELOADS, REJECTED};
use crate::peers::PeerHealth;
use crate::state::{Admission, Arrival, Live, Shared, Stats};
use crate::tls::terminate::Resumption;
use std::sync::atomic::AtomicBool;
use tokio::sync::watch;

/// Where the config comes from, so a reload reads the same place.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    /// `None`: the embedded default, which cannot change.
    pub path: Option<PathBuf>,
    pub node: Option<String>,
}

impl ConfigSource {
    pub fn load(&self) -> Result<Config, ConfigError> {
        match &self.path {
            Some(path) => Config::load(path, self.node.as_deref()),
            None => Config::parse(
                crate::config::EMBEDDED,
                crate::config::EMBEDDED_PATH,
                self.node.as_deref(),
            ),
        }
    }
}

/// Controls a running server from another task (signals, tests).
#[derive(Clone)]
pub struct Handle {
    pub shared: Arc<Shared>,
    shutdown: CancellationToken,
}

impl Handle {
    /// Swaps in a new config; live connections keep the one they started with.
    pub fn reload(&self, config: Config) {
        let live = match self.shared.build(config) {
            Ok(live) => live,
            Err(e) => {
                tracing::error!(error = %e, "reload failed building TLS contexts, keeping the running config");
                return;
            }
        };
        let config = &live.config;
        let old = self.shared.live.load();
        let old_binds: Vec<SocketAddr> = old.config.listeners.iter().map(|l| l.bind).collect();
        let new_binds: Vec<SocketAddr> = config.listeners.iter().map(|l| l.bind).collect();
        if old_binds != new_binds {
            tracing::warn!(
                ?old_binds,
                ?new_binds,
                "listener addresses changed: they take effect at restart"
            );
        }
        tracing::info!(
            source = %config.source,
            sites = config.sites.len(),
            digest = %config.digest,
            "config reloaded"
        );
        self.shared.live.store(Arc::new(live));
        metrics::counter!(CONFIG_RELOADS, "outcome" => "ok").increment(1);
        crate::metrics::config_loaded();
        self.shared
            .reloaded
            .send_modify(|generation| *generation += 1);
    }

    /// Stops accepting and starts the drain.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }
}

#[derive(Debug, thiserror::Error)]
#[error("binding {addr}: {source}")]
pub struct BindError {
    pub addr: SocketAddr,
    #[source]
    pub source: io::Error,
}

pub struct Server {
    handle: Handle,
    admin: Option<TcpListener>,
    /// The listening sockets of each address (one, or one per worker):
    /// TLS listeners in `config.listeners` order, then the HTTP listener.
    listeners: Vec<Vec<TcpListener>>,
    certs: FileWatch,
    /// With every internal site's leaf live, and when the first falls due.
    leaves: (Leaves, Option<SystemTime>),
    /// With every stored ACME certificate already live.
    acme: crate::acme::Manager,
}

/// This node's listeners, TLS in `config.listeners` order then HTTP, and
/// the admin one: taken from `inherited` where it holds one, else bound.
fn listen(
    config: &Config,
    inherited: &mut Inherited,
) -> Result<(Vec<Vec<TcpListener>>, Option<TcpListener>), ServeError> {
    let mut listeners = Vec::new();
    let http = config.this().http_bind;
    let (backlog, defer) = (config.limits.backlog, Some(config.timeouts.hello));
    let sockets = config.sockets_per_address();
    for addr in config.listeners.iter().map(|l| l.bind).chain([http]) {
        let bound = crate::listen::open(addr, backlog, defer, sockets, inherited)
            .map_err(|source| BindError { addr, source })?;
        listeners.push(bound);
    }
    let admin = match config.admin {
        Some(addr) => crate::listen::open(addr, 64, None, 1, inherited)
            .map_err(|source| BindError { addr, source })?
            .into_iter()
            .next(),
        None => None,
    };
    inherited.close_unclaimed();
    Ok((listeners, admin))
}

impl Server {
    /// Loads certificates and binds every TLS listener of this node.
    pub fn bind(config: Config) -> Result<Server, ServeError> {
        Server::bind_with(config, &mut Inherited::default())
    }

    /// Like [`Server::bind`], taking each listener from `inherited` when it
    /// holds one for the address (systemd, or the process this one
    /// replaces).
    ///
    /// Every certificate this node has (files, the internal CA's leaves,
    /// stored ACME certificates) is live before a socket listens: a
    /// listening socket takes connections into its queue, and peers judge
    /// a node by whether it answers them.
    pub fn bind_with(config: Config, inherited: &mut Inherited) -> Result<Server, ServeError> {
        // The recorder first: the live config holds handles taken from it.
        if config.admin.is_some() {
            crate::metrics::install();
        }
        let certs = Arc::new(CertStore::default());
        let mut watch = FileWatch::default();
        watch.sync(&config, &certs);
        let mut leaves = Leaves::default();
        let due = leaves.sync(&config, &certs);
        let resumption = Resumption::new()?;
        let live = Live::build(config, &certs, &resumption)?;
        let limits = live.config.limits.clone();
        let workers = live.config.worker_threads();
        let shared = Arc::new(Shared {
            live: Arc::new(ArcSwap::from_pointee(live)),
            certs,
            challenges: Arc::default(),
            peers: PeerHealth::default(),
            health: Default::default(),
            acme: Arc::default(),
            ready: AtomicBool::new(false),
            hello_slots: HelloSlots::new(limits.max_pending_hellos),
            sources: SourceLimits::new(limits.max_per_source, limits.new_per_source_per_second),
            stats: Stats::default(),
            resumption,
            reloaded: watch::Sender::new(0),
            tasks: TaskTracker::new(),
            #[cfg(target_os = "linux")]
            engines: crate::splice::engine::Engines::new(workers),
        });
        let mut acme = crate::acme::Manager::new(crate::acme::Inputs {
            live: shared.live.clone(),
            reloads: shared.reloaded.subscribe(),
            certs: shared.certs.clone(),
            challenges: shared.challenges.clone(),
            report: shared.acme.clone(),
        });
        acme.load_stored();
        let (listeners, admin) = listen(&shared.live().config, inherited)?;
        Ok(Server {
            handle: Handle {
                shared,
                shutdown: CancellationToken::new(),
            },
            listeners,
            certs: watch,
            leaves: (leaves, due),
            admin,
            acme,
        })
    }

    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Every listening descriptor (TLS, HTTP, admin), for an upgrade to
    /// hand on. Valid while the server runs: its accept loops own them.
    pub fn listening_fds(&self) -> Vec<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.listeners
            .iter()
            .flatten()
            .chain(&self.admin)
            .map(AsRawFd::as_raw_fd)
            .collect()
    }

    /// The addresses actually bound: TLS listeners in `config.listeners`
    /// order, then the HTTP listener.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|group| group.first()?.local_addr().ok())
            .collect()
    }

    /// Accepts until shutdown, then waits up to the drain period for
    /// in-flight connections.
    pub async fn run(self) {
        let Server {
            handle,
            listeners,
            certs,
            leaves,
            admin,
            acme,
        } = self;
        // The recorder goes in before the first accept, so no count is lost.
        let admin = admin.map(|listener| (listener, crate::metrics::install()));
        crate::metrics::config_loaded();
        let max = handle.shared.live().config.limits.max_connections;
        metrics::gauge!(crate::metrics::CONNECTIONS_MAX).set(max as f64);
        let background = [
            tokio::spawn(watch_certificates(handle.shared.clone(), certs)),
            tokio::spawn(acme.run()),
            tokio::spawn(issue_leaves(handle.shared.clone(), leaves)),
            tokio::spawn(check_targets(handle.shared.clone())),
        ];
        #[cfg(target_os = "linux")]
        handle.shared.engines.start();
        let accept_loops = start_accepting(&handle, listeners);
        handle.shared.ready.store(true, Ordering::Relaxed);
        // Served after `ready`, so the first /readyz answered is true. Peer
        // probes feed only the status page, so they run with it.
        let admin = admin.map(|(listener, metrics)| {
            let serve = crate::admin::serve(listener, handle.shared.clone(), metrics);
            [
                tokio::spawn(serve),
                tokio::spawn(probe_peers(handle.shared.clone())),
            ]
        });
        handle.shutdown.cancelled().await;
        handle.shared.ready.store(false, Ordering::Relaxed);
        // Each loop returns on shutdown and drops its listener, so new
        // connections are refused from here on.
        for accept_loop in accept_loops {
            let _ = accept_loop.await;
        }
        for task in background.iter().chain(admin.iter().flatten()) {
            task.abort();
        }
        drain(&handle.shared).await;
    }
}

/// One accept loop per listening socket: TLS listeners in
/// `config.listeners` order, then the HTTP listener.
fn start_accepting(handle: &Handle, listeners: Vec<Vec<TcpListener>>) -> Vec<JoinHandle<()>> {
    let live = handle.shared.live();
    let limit = Arc::new(Semaphore::new(live.config.limits.max_connections));
    let http = listeners.len().saturating_sub(1);
    let mut accept_loops = Vec::new();
    for (index, group) in listeners.into_iter().enumerate() {
        let addr = group.first().and_then(|l| l.local_addr().ok());
        let label: Arc<str> = addr.map_or_else(|| "unknown".into(), |a| a.to_string().into());
        let port = if index == http {
            Port::Http
        } else {
            Port::Tls(index)
        };
        let tls = matches!(port, Port::Tls(_));
        let metrics = Arc::new(crate::metrics::ListenerMetrics::new(label, tls));
        let siblings = group.len();
        for listener in group {
            let ctx = AcceptLoop {
                bound: addr.filter(|a| !a.ip().is_unspecified()),
                metrics: metrics.clone(),
                port,
                listener,
                siblings,
                handle: handle.clone(),
                limit: limit.clone(),
                tracker: handle.shared.tasks.clone(),
            };
            accept_loops.push(tokio::spawn(ctx.run()));
        }
    }
    accept_loops
}

/// Waits up to `timeouts.drain` for the connections in flight; those still
/// open then are cut, each logged and counted with `end=drain_deadline`:
/// pairs in the splice engines here, tasks as the runtime drops them.
async fn drain(shared: &Shared) {
    let tracker = &shared.tasks;
    tracker.close();
    let drain = shared.live().config.timeouts.drain;
    tracing::info!(
        in_flight = tracker.len(),
        ?drain,
        "shutting down: draining connections"
    );
    if tokio::time::timeout(drain, tracker.wait()).await.is_err() {
        tracing::warn!(
            left = tracker.len(),
            "drain period over: closing remaining connections"
        );
        #[cfg(target_os = "linux")]
        shared.engines.end_all();
    }
}

#[derive(Clone, Copy)]
enum Port {
    /// Index into `config.listeners`.
    Tls(usize),
    Http,
}

struct AcceptLoop {
    port: Port,
    metrics: Arc<crate::metrics::ListenerMetrics>,
    /// The bound address, unless it is a wildcard.
    bound: Option<SocketAddr>,
    listener: TcpListener,
    /// This process's sockets on the address, this one included.
    siblings: usize,
    handle: Handle,
    limit: Arc<Semaphore>,
    tracker: TaskTracker,
}

/// How long a stopping process keeps accepting from a listener that a
/// newer process shares, after the last connection it found queued: the
/// newer process takes every new connection, so only handshakes already
/// under way (one round trip) still land here.
const SETTLE: Duration = Duration::from_millis(500);

impl AcceptLoop {
    async fn run(self) {
        let mut backoff = Duration::from_millis(5);
        loop {
            tokio::select! {
                () = self.accept_one(&mut backoff) => {}
                () = self.handle.shutdown.cancelled() => break,
            }
        }
        // Closing the listener resets what waits in its queue. When a newer
        // process listens beside this one (a restart by hand), it now gets
        // every new connection: serve what is queued here first.
        if !crate::listen::successor_listening(&self.listener, self.siblings) {
            return;
        }
        let cap = self.handle.shared.live().config.timeouts.drain;
        let lingering = async {
            let mut accepted = 0u64;
            while tokio::time::timeout(SETTLE, self.accept_one(&mut backoff))
                .await
                .is_ok()
            {
                accepted += 1;
            }
            accepted
        };
        let accepted = tokio::time::timeout(cap, lingering).await;
        tracing::info!(
            listener = %self.metrics.label,
            accepted = ?accepted.ok(),
            "a newer process listens here: accepted what was still queued"
        );
    }

    /// Accepts one connection (or one error) and starts its task.
    async fn accept_one(&self, backoff: &mut Duration) {
        // Waiting for a permit before accepting leaves excess clients in
        // the kernel backlog instead of holding them here.
        let Ok(permit) = self.limit.clone().acquire_owned().await else {
            return std::future::pending().await;
        };
        let (stream, peer) = match self.listener.accept().await {
            Ok(accepted) => {
                *backoff = Duration::from_millis(5);
                accepted
            }
            Err(e) if is_per_connection(&e) => return,
            Err(e) => {
                // EMFILE/ENFILE/ENOBUFS: back off rather than spin.
                tracing::error!(error = %e, ?backoff, "accept failed");
                tokio::time::sleep(*backoff).await;
                *backoff = (*backoff * 2).min(Duration::from_secs(1));
                return;
            }
        };
        let live = self.handle.shared.live();
        // Nodes and trusted proxies carry many clients' connections: the
        // per-source limits apply to the clients the holders see in the
        // PROXY headers, not to them.
        let may_send_proxy = live.config.may_send_proxy(peer.ip());
        let source_guard = if may_send_proxy {
            None
        } else {
            let sources = &self.handle.shared.sources;
            if !sources.admit_new(peer.ip(), std::time::Instant::now()) {
                metrics::counter!(REJECTED, "reason" => "per_source_rate").increment(1);
                return;
            }
            let Ok(guard) = sources.acquire(peer.ip()) else {
                metrics::counter!(REJECTED, "reason" => "per_source_limit").increment(1);
                return;
            };
            guard
        };
        // A listener bound to one address needs no getsockname per connection.
        let local = match self.bound {
            Some(bound) => bound,
            None => stream.local_addr().unwrap_or_else(|_| unspecified()),
        };
        if !crate::sockopt::ACCEPTED_INHERIT_NODELAY {
            let _ = stream.set_nodelay(true);
        }
        let shared = self.handle.shared.clone();
        shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
        let metrics = self.metrics.clone();
        metrics.accepted.increment(1);
        let active = metrics.active.clone();
        active.increment(1.0);
        let admission = Admission {
            _permit: permit,
            _source: source_guard,
            active,
        };
        // Each port's handler future is spawned as it is, not inside a
        // wrapping block that would hold its arguments twice. The TLS one
        // is boxed: tokio moves a task's whole future when it spawns it
        // and at each change of stage (a memcpy of half a kilobyte, three
        // or four times a task), and behind a box each move is a pointer;
        // the allocation costs less (docs/benchmarks.md).
        let from = Arrival {
            peer,
            local,
            may_send_proxy,
        };
        match self.port {
            Port::Tls(listener) => {
                let accepted = crate::tls::handler::Accepted {
                    shared,
                    live,
                    listener,
                    metrics,
                    from,
                    admission,
                };
                self.tracker
                    .spawn(Box::pin(crate::tls::handler::handle(accepted, stream)));
            }
            Port::Http => {
                self.tracker.spawn(async move {
                    Box::pin(crate::http::handler::handle(shared, live, stream, from)).await;
                    drop(admission);
                });
            }
        }
    }
}

/// Probes every other node of the live config, for the status page.
async fn check_targets(shared: Arc<Shared>) {
    crate::health::check(&shared.health, || {
        let config = &shared.live().config;
        let targets = crate::health::checked_targets(config);
        let addrs = targets.into_iter().map(|(_, addr)| addr).collect();
        (addrs, config.timeouts.connect)
    })
    .await
}

async fn probe_peers(shared: Arc<Shared>) {
    crate::peers::probe(&shared.peers, || {
        crate::peers::targets(&shared.live().config)
    })
    .await
}

/// Keeps the internal CA's leaves current: each at its due time, and all
/// at once after a reload.
async fn issue_leaves(shared: Arc<Shared>, (mut leaves, mut due): (Leaves, Option<SystemTime>)) {
    const IDLE: Duration = Duration::from_secs(3600);
    let mut reloads = shared.reloaded.subscribe();
    loop {
        let wait = match due {
            Some(at) => at.duration_since(SystemTime::now()).unwrap_or_default(),
            None => IDLE,
        };
        tokio::select! {
            () = tokio::time::sleep(wait.min(IDLE)) => {}
            _ = reloads.changed() => {}
        }
        due = leaves.sync(&shared.live().config, &shared.certs);
    }
}

/// Re-checks certificate files every `certs.poll`, and at once after a reload.
async fn watch_certificates(shared: Arc<Shared>, mut watch: FileWatch) {
    let mut reloads = shared.reloaded.subscribe();
    loop {
        let poll = shared.live().config.cert_poll;
        tokio::select! {
            () = tokio::time::sleep(poll) => {}
            // A reload re-reads every file, changed or not: it is also how an
            // operator retries after fixing, say, a key file's permissions.
            _ = reloads.changed() => watch.forget(),
        }
        let live = shared.live();
        watch.sync(&live.config, &shared.certs);
    }
}

fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

fn unspecified() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}

/// Runs a server until SIGTERM/SIGINT, reloading on SIGHUP.
///
/// `inherited`: listening sockets from systemd or from the process this
/// one replaces. SIGUSR2 starts the binary on disk with every listening
/// socket ([`crate::upgrade`]); once it listens, this process stops
/// accepting and drains.
pub async fn serve(
    source: ConfigSource,
    config: Config,
    mut inherited: Inherited,
) -> Result<(), ServeError> {
    use tokio::signal::unix::{SignalKind, signal};
    // Handlers first: a SIGHUP that arrives while we bind must not kill us
    // (its default action), since the listeners already accept.
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut usr2 = signal(SignalKind::user_defined2())?;
    let server = Server::bind_with(config, &mut inherited)?;
    for addr in server.local_addrs() {
        tracing::info!(%addr, "listening");
    }
    let fds = server.listening_fds();
    let handle = server.handle();
    let running = tokio::spawn(server.run());
    // After an upgrade the old process tells systemd who the main process
    // is now; a READY=1 from here would come from a process systemd does
    // not yet listen to.
    if !inherited.tell_predecessor() {
        crate::notify::notify("READY=1");
    }
    let mut handed_over = false;
    loop {
        tokio::select! {
            _ = hup.recv() => match source.load() {
                Ok(config) => handle.reload(config),
                Err(e) => {
                    metrics::counter!(CONFIG_RELOADS, "outcome" => "error").increment(1);
                    tracing::error!("reload failed, keeping the running config:\n{e}");
                }
            },
            _ = usr2.recv() => match crate::upgrade::start_successor(&fds).await {
                Ok(pid) => {
                    tracing::info!(pid, "upgrade: the new process listens; this one stops accepting and drains");
                    crate::notify::notify(&format!("MAINPID={pid}"));
                    handed_over = true;
                    break;
                }
                Err(e) => tracing::error!(error = %e, "upgrade failed: this process carries on serving"),
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    if !handed_over {
        crate::notify::notify("STOPPING=1");
    }
    handle.shutdown();
    let _ = running.await;
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("building TLS contexts: {0}")]
    Tls(#[from] rustls::Error),
    #[error("installing signal handler: {0}")]
    Signal(#[from] io::Error),
}
