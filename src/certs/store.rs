//! The live certificate store: site -> certificate, read at every handshake
//! without a lock and swapped whole when anything changes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::disk::Loaded;

/// Where a certificate came from, for status and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Files,
    Acme,
    Internal,
}

impl Source {
    pub fn as_str(&self) -> &'static str {
        match self {
            Source::Files => "files",
            Source::Acme => "acme",
            Source::Internal => "internal",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Entry {
    pub loaded: Loaded,
    pub source: Source,
}

/// Keyed by site label (its first name), which survives reloads that
/// reorder sites.
#[derive(Debug, Default)]
pub struct CertStore {
    sites: ArcSwap<HashMap<String, Arc<Entry>>>,
}

impl CertStore {
    /// The certificate to serve for `name` of `site`, if one is valid now and
    /// covers the name. `name` is `None` for clients without SNI.
    pub fn valid_for(
        &self,
        site: &str,
        name: Option<&str>,
        now: SystemTime,
    ) -> Option<Arc<CertifiedKey>> {
        let sites = self.sites.load();
        let entry = sites.get(site)?;
        let info = &entry.loaded.info;
        let covered = name.is_none_or(|n| info.covers(n));
        (covered && info.valid_at(now)).then(|| entry.loaded.key.clone())
    }

    pub fn get(&self, site: &str) -> Option<Arc<Entry>> {
        self.sites.load().get(site).cloned()
    }

    /// Installs or replaces one site's certificate.
    pub fn set(&self, site: &str, entry: Entry) {
        let entry = Arc::new(entry);
        self.sites.rcu(|sites| {
            let mut next = HashMap::clone(sites);
            next.insert(site.to_string(), entry.clone());
            next
        });
    }

    /// Keeps only the entries for which `keep(site, entry)` holds.
    pub fn retain(&self, keep: impl Fn(&str, &Entry) -> bool) {
        self.sites.rcu(|sites| {
            let mut next = HashMap::clone(sites);
            next.retain(|site, entry| keep(site, entry));
            next
        });
    }
}

/// Resolves one site's certificate at handshake time; one per site config.
#[derive(Debug)]
pub struct SiteResolver {
    pub store: Arc<CertStore>,
    pub site: String,
}

impl ResolvesServerCert for SiteResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name().map(str::to_ascii_lowercase);
        self.store
            .valid_for(&self.site, name.as_deref(), SystemTime::now())
    }
}
