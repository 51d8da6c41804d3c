//! Configuration: one TOML file can describe the whole fleet; each node picks
//! itself out with `this_node` (or `--node`). The file is parsed into the
//! types below once; nothing downstream re-checks it.

mod access;
mod build;
mod digest;
mod file;
mod pool;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::names::{NameTable, Pattern};

pub use access::{Access, Denial};
pub use digest::FleetDigest;
pub use pool::{Ordered, Pool, PoolTarget};

/// The default config, shipped in the binary for `cargo run`.
pub const EMBEDDED: &str = include_str!("../../config/sni-router.toml");
pub const EMBEDDED_PATH: &str = "config/sni-router.toml";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub usize);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SiteId(pub usize);

#[derive(Debug, Clone)]
pub struct Config {
    /// Where this config came from, for messages.
    pub source: String,
    pub this_node: NodeId,
    pub nodes: Vec<Node>,
    pub sites: Vec<Site>,
    pub names: NameTable<SiteId>,
    pub default_site: Option<SiteId>,
    /// This node's TLS listeners: its own `tls` address first, then extras.
    pub listeners: Vec<Listener>,
    /// Addresses besides nodes allowed to send a PROXY header.
    pub trusted_proxies: Vec<IpAddr>,
    /// Every address a node may connect from, and which node it is; see
    /// [`Config::is_node_address`].
    node_addresses: HashMap<IpAddr, NodeId>,
    /// The fleet-wide part of this config (nodes and sites), which every
    /// node should share; sent to peers so drift shows.
    pub digest: FleetDigest,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub workers: Option<usize>,
    pub accept: Accept,
    /// How often certificate files are checked for changes.
    pub cert_poll: Duration,
    pub http: Http,
    pub acme: Option<Acme>,
    /// Where the router keeps what it makes: ACME state, the internal CA
    /// and its leaves.
    pub state_dir: Option<PathBuf>,
    pub internal_ca: InternalCa,
    /// DNS-01 through RFC 2136 updates, when `[dns01]` exists.
    pub dns01: Option<Dns01>,
    /// Where /metrics, /healthz, /readyz and /status are served; off when absent.
    pub admin: Option<SocketAddr>,
    /// Not errors, but worth an operator's look (printed by `check`, logged at start).
    pub warnings: Vec<Problem>,
}

/// Certificates by ACME for held sites that have no `cert_file`.
#[derive(Debug, Clone)]
pub struct Acme {
    pub directory: String,
    pub contact: Vec<String>,
    pub state_dir: PathBuf,
    /// Extra roots for the ACME server's own HTTPS.
    pub ca_file: Option<PathBuf>,
    pub profile: Option<String>,
    /// External account binding: key id and the decoded HMAC key.
    pub eab: Option<(String, Vec<u8>)>,
    /// The account key in `state_dir` is the same on every node: any node
    /// answers any token with `token.thumbprint`.
    pub shared_account: bool,
    pub key_type: KeyType,
    /// Backoff after a failed order: first delay, and the cap.
    pub retry_min: Duration,
    pub retry_max: Duration,
}

/// Where and how DNS-01 records are written: RFC 2136 updates signed with
/// TSIG, sent to one primary server.
#[derive(Clone)]
pub struct Dns01 {
    pub server: SocketAddr,
    /// The TSIG key's name, as the server knows it (`acme-update.`).
    pub key_name: String,
    pub algorithm: TsigAlgorithm,
    /// The decoded secret, read from `tsig_secret_file`.
    pub secret: Vec<u8>,
    /// The zone to update; found by SOA lookup at `server` when absent.
    pub zone: Option<String>,
    /// How long to wait for `server` to answer the TXT before telling the CA.
    pub propagation_timeout: Duration,
    pub ttl: u32,
}

impl std::fmt::Debug for Dns01 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dns01")
            .field("server", &self.server)
            .field("key_name", &self.key_name)
            .field("algorithm", &self.algorithm)
            .field("zone", &self.zone)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TsigAlgorithm {
    HmacSha256,
    HmacSha384,
    HmacSha512,
}

/// How an ACME CA validates a site's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Challenge {
    /// A token on port 80, answered here or by another holder.
    Http01,
    /// A TXT record written through `[dns01]`; the only way for wildcards.
    Dns01,
}

impl Challenge {
    pub fn as_str(self) -> &'static str {
        match self {
            Challenge::Http01 => "http-01",
            Challenge::Dns01 => "dns-01",
        }
    }
}

/// A CA of the router's own, for names no public CA signs.
#[derive(Debug, Clone)]
pub struct InternalCa {
    /// An existing CA to issue from (`[internal_ca] cert_file/key_file`);
    /// without it, `state_dir/ca/`, created on first use.
    pub files: Option<CertFiles>,
    /// How long a leaf is valid; it is renewed with a third of that left.
    pub lifetime: Duration,
}

/// Where a held site's certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Issuer {
    /// PEM files the operator keeps current (`cert_file`/`key_file`).
    Files(CertFiles),
    /// ACME, when `[acme]` exists.
    Acme,
    /// The router's internal CA.
    Internal,
}

impl Issuer {
    pub fn as_str(&self) -> &'static str {
        match self {
            Issuer::Files(_) => "files",
            Issuer::Acme => "acme",
            Issuer::Internal => "internal",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    EcdsaP256,
    EcdsaP384,
    Rsa2048,
}

#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    /// Where peers splice TLS to.
    pub tls: SocketAddr,
    pub http: SocketAddr,
    /// What this node binds, when it differs from the advertised address.
    pub tls_bind: SocketAddr,
    pub http_bind: SocketAddr,
    /// A name of this node's own, added to each of its ACME orders so that
    /// holders of the same site never order identical identifier sets.
    pub acme_name: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Site {
    /// Its position among the file's `[[sites]]`, for messages.
    pub index: usize,
    /// The first name: how logs and metrics refer to the site.
    pub label: String,
    pub names: Vec<Pattern>,
    pub route: SiteRoute,
    /// What we send to passthrough backends and upstreams.
    pub proxy_protocol: Option<ProxyVersion>,
    /// What port 80 does with requests for this site (besides challenges).
    pub http: HttpMode,
    /// Which clients may reach it, on both ports (never refusing a CA's
    /// challenge requests).
    pub access: Access,
}

/// How the workers take new connections off a listening address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accept {
    /// One listening socket, whose accept loop hands connections to every
    /// worker.
    #[default]
    Shared,
    /// A listening socket per worker in the address's `SO_REUSEPORT`
    /// group: the kernel spreads new connections over their queues.
    PerWorker,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpMode {
    /// 308 to the same URL on https.
    Redirect,
    /// Splice plain HTTP to the upstream (or to a holder node).
    Upstream,
}

/// Port 80 settings.
#[derive(Debug, Clone)]
pub struct Http {
    /// Serves `.well-known/acme-challenge/{token}` from here (certbot --webroot, lego --http.webroot).
    pub webroot: Option<PathBuf>,
    /// Ask holder nodes for tokens this node does not have.
    pub forward: bool,
    pub forward_timeout: Duration,
    pub forward_per_second: u32,
}

#[derive(Debug, Clone)]
pub enum SiteRoute {
    /// Nodes terminate TLS and send plaintext to a target of `upstream`.
    Held {
        holders: Vec<NodeId>,
        upstream: Pool,
        issuer: Issuer,
        /// How ACME validates the names, when `issuer` is ACME.
        challenge: Challenge,
        /// ALPN protocols offered after termination, in preference order.
        alpn: Vec<Vec<u8>>,
    },
    /// Raw TLS goes to a backend of the pool; they have their own certificate.
    Passthrough { backend: Pool },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyVersion {
    V1,
    V2,
}

#[derive(Debug, Clone)]
pub struct Listener {
    pub bind: SocketAddr,
    pub default_site: Option<SiteId>,
}

#[derive(Debug, Clone)]
pub struct Timeouts {
    pub hello: Duration,
    pub connect: Duration,
    pub idle: Duration,
    /// Grace period for in-flight connections at shutdown.
    pub drain: Duration,
    /// A TLS handshake we terminate must finish within this.
    pub handshake: Duration,
    /// A complete HTTP request head must arrive within this.
    pub http_head: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            hello: Duration::from_secs(5),
            connect: Duration::from_secs(3),
            idle: Duration::from_secs(300),
            drain: Duration::from_secs(30),
            handshake: Duration::from_secs(10),
            http_head: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Limits {
    /// listen(2)'s backlog; the kernel caps it at `net.core.somaxconn`.
    /// 4096 (that cap's default since Linux 5.4, and HAProxy's backlog at
    /// its usual `maxconn`): a burst past it drops SYNs, which clients
    /// retry only after a second.
    pub backlog: u32,
    pub max_connections: usize,
    /// Connections still sending a ClientHello or request head; past this
    /// the oldest pending one is closed.
    pub max_pending_hellos: usize,
    /// Connections one source address may hold; 0 is no cap.
    pub max_per_source: usize,
    /// New connections one source may open a second (a token bucket of
    /// one second's worth); 0 = no limit.
    pub new_per_source_per_second: u32,
    /// Move spliced bytes with `splice(2)` (Linux) instead of read/write.
    pub zero_copy: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            backlog: 4096,
            max_connections: 20_000,
            max_pending_hellos: 4096,
            max_per_source: 0,
            new_per_source_per_second: 0,
            zero_copy: true,
        }
    }
}

/// Everything wrong with a config file, each problem naming its field.
#[derive(Debug, thiserror::Error)]
#[error("{}", self.render())]
pub struct ConfigError {
    pub source_name: String,
    pub problems: Vec<Problem>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub field: String,
    pub message: String,
}

impl ConfigError {
    fn render(&self) -> String {
        let lines: Vec<String> = self
            .problems
            .iter()
            .map(|p| format!("{}: {}: {}", self.source_name, p.field, p.message))
            .collect();
        lines.join("\n")
    }
}

impl Config {
    /// The runtime's worker threads: `workers`, or one per CPU.
    pub fn worker_threads(&self) -> usize {
        self.workers.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
        })
    }

    /// Listening sockets wanted per data-path address (TLS and HTTP).
    pub fn sockets_per_address(&self) -> usize {
        match self.accept {
            Accept::Shared => 1,
            Accept::PerWorker => self.worker_threads(),
        }
    }

    /// Reads and parses a config file.
    pub fn load(path: &Path, node: Option<&str>) -> Result<Config, ConfigError> {
        let source = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            source_name: source.clone(),
            problems: vec![Problem {
                field: "(file)".into(),
                message: format!("cannot read: {e}"),
            }],
        })?;
        Config::parse(&text, &source, node)
    }

    /// Parses config text; `source` names it in errors.
    pub fn parse(text: &str, source: &str, node: Option<&str>) -> Result<Config, ConfigError> {
        build::build(text, source, node)
    }

    // Ids are made by `build` from these very vectors and never outlive
    // their Config: indexing cannot fail.
    #[allow(clippy::indexing_slicing)]
    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id.0]
    }

    #[allow(clippy::indexing_slicing)]
    pub fn site(&self, id: SiteId) -> &Site {
        &self.sites[id.0]
    }

    pub fn this(&self) -> &Node {
        self.node(self.this_node)
    }

    /// Whether `ip` is an address a node of the fleet connects from. Alone
    /// it says only who may send a PROXY header or a forwarding mark: a
    /// client running on a node's host is an ordinary client (see
    /// [`crate::preface::Ends::via_node`]).
    pub fn is_node_address(&self, ip: IpAddr) -> bool {
        self.node_addresses.contains_key(&canonical(ip))
    }

    /// The node that connects from `ip`, if any.
    pub fn node_at(&self, ip: IpAddr) -> Option<NodeId> {
        self.node_addresses.get(&canonical(ip)).copied()
    }

    /// Whether `ip` may send a PROXY header.
    pub fn may_send_proxy(&self, ip: IpAddr) -> bool {
        self.is_node_address(ip) || self.trusted_proxies.contains(&canonical(ip))
    }

    /// Sites this node holds whose certificates come from ACME.
    pub fn acme_sites(&self) -> Vec<SiteId> {
        if self.acme.is_none() {
            return Vec::new();
        }
        self.held_from(&Issuer::Acme)
    }

    /// Sites this node holds whose certificates come from the internal CA.
    pub fn internal_sites(&self) -> Vec<SiteId> {
        self.held_from(&Issuer::Internal)
    }

    /// Sites this node holds whose certificates come from files, with them.
    pub fn held_with_files(&self) -> Vec<(&Site, &CertFiles)> {
        (0..self.sites.len())
            .map(SiteId)
            .filter(|id| self.holds(*id))
            .filter_map(|id| match &self.site(id).route {
                SiteRoute::Held {
                    issuer: Issuer::Files(files),
                    ..
                } => Some((self.site(id), files)),
                _ => None,
            })
            .collect()
    }

    /// Sites this node holds with `issuer` (ACME or the internal CA).
    fn held_from(&self, issuer: &Issuer) -> Vec<SiteId> {
        (0..self.sites.len())
            .map(SiteId)
            .filter(|id| {
                self.holds(*id)
                    && matches!(&self.site(*id).route, SiteRoute::Held { issuer: i, .. } if i == issuer)
            })
            .collect()
    }

    /// How ACME validates the site `label` (HTTP-01 for a site it does
    /// not know).
    pub fn challenge_of(&self, label: &str) -> Challenge {
        self.sites
            .iter()
            .find(|s| s.label == label)
            .and_then(|s| match &s.route {
                SiteRoute::Held { challenge, .. } => Some(*challenge),
                SiteRoute::Passthrough { .. } => None,
            })
            .unwrap_or(Challenge::Http01)
    }

    /// Holders of a site other than this node.
    pub fn other_holders(&self, site: SiteId) -> Vec<NodeId> {
        match &self.site(site).route {
            SiteRoute::Held { holders, .. } => holders
                .iter()
                .copied()
                .filter(|h| *h != self.this_node)
                .collect(),
            SiteRoute::Passthrough { .. } => Vec::new(),
        }
    }

    /// Whether this node is among a held site's holders.
    pub fn holds(&self, site: SiteId) -> bool {
        match &self.site(site).route {
            SiteRoute::Held { holders, .. } => holders.contains(&self.this_node),
            SiteRoute::Passthrough { .. } => false,
        }
    }

    /// The route table of this node, one line per name, for `check` and logs.
    pub fn route_table(&self) -> String {
        let mut out = String::new();
        let this = &self.this().name;
        out.push_str(&format!("node {this} ({})\n", self.source));
        out.push_str(&format!("  fleet digest {}\n", self.digest));
        for listener in &self.listeners {
            let default = listener
                .default_site
                .or(self.default_site)
                .map(|s| self.site(s).label.clone())
                .unwrap_or_else(|| "reject".into());
            out.push_str(&format!(
                "  listen {} (no SNI -> {default})\n",
                listener.bind
            ));
        }
        for site in &self.sites {
            let action = match &site.route {
                SiteRoute::Held {
                    holders,
                    upstream,
                    issuer,
                    ..
                } if holders.contains(&self.this_node) => {
                    let source = match (issuer, &self.acme) {
                        (Issuer::Files(_), _) => "cert_file",
                        (Issuer::Acme, Some(_)) => "ACME",
                        (Issuer::Acme, None) => "no certificate source",
                        (Issuer::Internal, _) => "internal CA",
                    };
                    format!("terminate -> {upstream} ({source}; until valid, splice to peers)")
                }
                SiteRoute::Held { holders, .. } => {
                    let names: Vec<String> = holders
                        .iter()
                        .map(|h| format!("{}@{}", self.node(*h).name, self.node(*h).tls))
                        .collect();
                    format!("splice -> {}", names.join(", "))
                }
                SiteRoute::Passthrough { backend } => format!("passthrough -> {backend}"),
            };
            for name in &site.names {
                out.push_str(&format!("  {:<32} {action}\n", name.to_string()));
            }
        }
        out
    }
}

/// IPv4-mapped IPv6 addresses compare as their IPv4 form.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}
