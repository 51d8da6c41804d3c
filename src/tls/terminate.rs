//! Local TLS termination: one rustls context per held site, the handshake
//! under a deadline over the replayed hello, then a connected upstream for
//! the plaintext (the caller joins the two: see [`crate::splice::StreamJoin`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::server::{
    ProducesTickets, ResolvesServerCert, ServerSessionMemoryCache, StoresServerSessions,
};
use rustls::{ServerConfig, version};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use super::prefixed::Prefixed;
use super::suites;
use crate::certs::store::{CertStore, SiteResolver};
use crate::config::{Config, SiteId, SiteRoute};
use crate::forward::{self, Answer, ForwardError, Target, Via};
use crate::preface::Ends;
use crate::proxy_protocol;

/// Session cache entries shared by every site: enough for the resumption
/// of recent clients, bounded so a flood of new clients cannot grow it.
const SESSION_CACHE_ENTRIES: usize = 4096;

/// Resumption state that outlives config reloads.
#[derive(Clone)]
pub struct Resumption {
    sessions: Arc<dyn StoresServerSessions>,
    tickets: Arc<dyn ProducesTickets>,
}

impl std::fmt::Debug for Resumption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Resumption")
    }
}

impl Resumption {
    pub fn new() -> Result<Self, rustls::Error> {
        Ok(Resumption {
            sessions: ServerSessionMemoryCache::new(SESSION_CACHE_ENTRIES),
            tickets: rustls::crypto::aws_lc_rs::Ticketer::new()?,
        })
    }
}

/// rustls contexts for the sites this node holds: per site one preferring
/// AES-128-GCM, and one preferring ChaCha20 (see [`suites`]) built on the
/// first client that asks for it. Few clients do, and a context costs
/// about 460 bytes of heap, which adds up over thousands of sites.
pub struct Contexts {
    by_site: HashMap<SiteId, SiteContexts>,
    chacha: Arc<CryptoProvider>,
}

struct SiteContexts {
    aes: TlsAcceptor,
    chacha: OnceLock<TlsAcceptor>,
}

impl std::fmt::Debug for Contexts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Contexts({} sites)", self.by_site.len())
    }
}

impl Contexts {
    pub fn build(
        config: &Config,
        store: &Arc<CertStore>,
        resumption: &Resumption,
    ) -> Result<Self, rustls::Error> {
        let mut by_site = HashMap::new();
        let aes = Arc::new(suites::preferring(false));
        for (index, site) in config.sites.iter().enumerate() {
            let id = SiteId(index);
            let SiteRoute::Held { alpn, .. } = &site.route else {
                continue;
            };
            if !config.holds(id) {
                continue;
            }
            let resolver = Arc::new(SiteResolver {
                store: store.clone(),
                site: site.label.clone(),
            });
            let tls = server_config(aes.clone(), resolver, alpn.clone(), resumption.clone())?;
            let contexts = SiteContexts {
                aes: TlsAcceptor::from(Arc::new(tls)),
                chacha: OnceLock::new(),
            };
            by_site.insert(id, contexts);
        }
        Ok(Contexts {
            by_site,
            chacha: Arc::new(suites::preferring(true)),
        })
    }

    fn get(&self, site: SiteId, chacha_first: bool) -> Option<&TlsAcceptor> {
        let contexts = self.by_site.get(&site)?;
        if !chacha_first {
            return Some(&contexts.aes);
        }
        Some(contexts.chacha.get_or_init(|| {
            let aes = contexts.aes.config();
            let resumption = Resumption {
                sessions: aes.session_storage.clone(),
                tickets: aes.ticketer.clone(),
            };
            let resolver = aes.cert_resolver.clone();
            let alpn = aes.alpn_protocols.clone();
            match server_config(self.chacha.clone(), resolver, alpn, resumption) {
                Ok(tls) => TlsAcceptor::from(Arc::new(tls)),
                // The same versions were accepted with the same suites in
                // another order, so this does not happen; AES serves anyway.
                Err(_) => contexts.aes.clone(),
            }
        }))
    }
}

/// A site's server context, with the suite order of `provider` chosen by
/// the server.
fn server_config(
    provider: Arc<CryptoProvider>,
    resolver: Arc<dyn ResolvesServerCert>,
    alpn: Vec<Vec<u8>>,
    resumption: Resumption,
) -> Result<ServerConfig, rustls::Error> {
    // TLS 1.2 and 1.3 only: rustls implements nothing older.
    let mut tls = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&version::TLS13, &version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    tls.ignore_client_order = true;
    tls.alpn_protocols = alpn;
    tls.session_storage = resumption.sessions;
    tls.ticketer = resumption.tickets;
    Ok(tls)
}

#[derive(Debug, thiserror::Error)]
pub enum TerminateError {
    #[error("no TLS context for this site")]
    NoContext,
    #[error("TLS handshake not finished within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("TLS handshake failed: {0}")]
    Handshake(std::io::Error),
    #[error("upstream: {0}")]
    Upstream(#[from] ForwardError),
}

impl TerminateError {
    pub fn is_handshake(&self) -> bool {
        matches!(
            self,
            TerminateError::HandshakeTimeout(_) | TerminateError::Handshake(_)
        )
    }

    pub fn kind(&self) -> &'static str {
        match self {
            TerminateError::NoContext => "no_context",
            TerminateError::HandshakeTimeout(_) => "handshake_timeout",
            TerminateError::Handshake(_) => "handshake_error",
            TerminateError::Upstream(e) => e.kind(),
        }
    }
}

/// A finished handshake and its connected upstream, ready to be joined.
pub struct Terminated {
    pub tls: TlsStream<Prefixed<TcpStream>>,
    pub upstream: TcpStream,
    pub addr: SocketAddr,
}

/// Completes the handshake over the replayed hello and connects to the
/// site's upstream, sending it the PROXY header when configured.
pub async fn serve(
    via: Via<'_>,
    contexts: &Contexts,
    site: SiteId,
    stream: TcpStream,
    replay: Vec<u8>,
    chacha_first: bool,
    ends: Ends,
) -> Result<Terminated, TerminateError> {
    let config = via.config;
    let acceptor = contexts
        .get(site, chacha_first)
        .ok_or(TerminateError::NoContext)?;
    let SiteRoute::Held { upstream, .. } = &config.site(site).route else {
        return Err(TerminateError::NoContext);
    };
    let deadline = config.timeouts.handshake;
    let began = std::time::Instant::now();
    let tls = tokio::time::timeout(deadline, acceptor.accept(Prefixed::new(replay, stream)))
        .await
        .map_err(|_| TerminateError::HandshakeTimeout(deadline))?
        .map_err(TerminateError::Handshake)?;
    metrics::histogram!(crate::metrics::HANDSHAKE_SECONDS).record(began.elapsed().as_secs_f64());
    let header = config
        .site(site)
        .proxy_protocol
        .map(|version| proxy_protocol::encode(version, ends.client, ends.destination))
        .unwrap_or_default();
    let label = &config.site(site).label;
    let targets = Target::upstreams(upstream, ends.client.ip(), label);
    let opened = forward::open(via, &targets, Some(header), Vec::new(), Answer::Connect).await?;
    Ok(Terminated {
        tls,
        upstream: opened.stream,
        addr: opened.target,
    })
}
