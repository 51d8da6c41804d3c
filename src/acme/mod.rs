//! Certificates by ACME: every holder of a site orders and renews its own,
//! with no shared storage and no copied private keys. One task per node
//! walks the managed sites, orders what is due, and sleeps until the next
//! renewal, a reload, or a retry after backoff.

mod ari;
pub mod dns01;
pub mod client;
pub mod order;
pub mod schedule;
mod site;
pub mod status;
pub mod storage;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use instant_acme::{Account, CertificateIdentifier, ExternalAccountKey, NewAccount};

use self::ari::certificate_id;
use self::dns01::Updater;
use self::order::{OrderError, Request, Solver, Step};
use self::site::{Hush, SiteState};
use self::status::Report;
pub use self::status::{Renewal, Window};
use self::storage::{AccountFile, Meta, StorageError, Stored};
use crate::certs::disk::{self, CertError, Loaded};
use crate::certs::store::{CertStore, Entry, Source};
use crate::config::{Acme, Challenge, Config, SiteId};
use crate::http::challenge::ChallengeStore;
use crate::metrics::ACME_ORDERS;
use crate::state::Live;
use tokio::sync::watch;

/// An order that takes longer than this has stalled somewhere.
const ORDER_DEADLINE: Duration = Duration::from_secs(300);
/// Wake at least this often to notice the clock (and config) moving.
const MAX_SLEEP: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("account: {0}")]
    Account(#[source] instant_acme::Error),
    #[error("{0} belongs to directory {1}; move it away to create an account for {2}")]
    OtherDirectory(String, String, String),
    #[error(transparent)]
    Order(#[from] OrderError),
    #[error("order did not finish within {0:?}")]
    Deadline(Duration),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("issued certificate unusable: {0}")]
    Certificate(#[from] CertError),
}

impl AcmeError {
    pub fn step(&self) -> Step {
        match self {
            AcmeError::Account(_) | AcmeError::OtherDirectory(..) => Step::Account,
            AcmeError::Order(e) => e.step(),
            AcmeError::Deadline(_) => Step::Deadline,
            AcmeError::Storage(_) => Step::Storage,
            AcmeError::Certificate(_) => Step::Certificate,
        }
    }
}

/// What the manager reads and writes of the node's state, and no more.
pub struct Inputs {
    /// The live config, swapped whole on reload.
    pub live: Arc<ArcSwap<Live>>,
    /// Changes on every reload.
    pub reloads: watch::Receiver<u64>,
    pub certs: Arc<CertStore>,
    pub challenges: Arc<ChallengeStore>,
    pub report: Arc<Report>,
}

pub struct Manager {
    inputs: Inputs,
    account: Option<(String, Account)>,
    sites: HashMap<String, SiteState>,
    /// The CA's latest refusal's `Retry-After`, noted by the HTTP client.
    retry_after: client::RetryAfter,
    /// A request that went unanswered, noted by the HTTP client or by the
    /// renewal-information deadline.
    unanswered: client::Unanswered,
}

impl Manager {
    pub fn new(inputs: Inputs) -> Self {
        Manager {
            inputs,
            account: None,
            sites: HashMap::new(),
            retry_after: client::RetryAfter::default(),
            unanswered: client::Unanswered::default(),
        }
    }

    /// Puts every stored certificate live. Called before the listeners
    /// accept, so a restarted node terminates the sites it holds from its
    /// first connection on, instead of refusing a site it alone holds
    /// until its first tick.
    pub fn load_stored(&mut self) {
        let live = self.inputs.live.load_full();
        let Some(acme) = &live.config.acme else {
            return;
        };
        for site in live.config.acme_sites() {
            let label = live.config.site(site).label.clone();
            let state = self.restore(acme, &label, identifiers(&live.config, site));
            self.sites.insert(label, state);
        }
    }

    /// Runs until the task is dropped.
    pub async fn run(mut self) {
        let mut reloads = self.inputs.reloads.clone();
        loop {
            let live = self.inputs.live.load_full();
            let next = match &live.config.acme {
                Some(acme) => self.tick(&live.config, acme).await,
                None => None,
            };
            let sleep = next
                .and_then(|at| at.duration_since(SystemTime::now()).ok())
                .unwrap_or(if next.is_some() {
                    Duration::ZERO
                } else {
                    MAX_SLEEP
                })
                .min(MAX_SLEEP);
            tokio::select! {
                () = tokio::time::sleep(sleep) => {}
                _ = reloads.changed() => {}
            }
        }
    }

    /// Loads state for new sites, orders what is due; returns the next due time.
    async fn tick(&mut self, config: &Config, acme: &Acme) -> Option<SystemTime> {
        if acme.shared_account {
            self.publish_thumbprint(acme);
        }
        let labels = self.track(config, acme);
        // Every stored certificate is live before the first wait on the CA.
        self.work_due(acme, &labels).await;
        self.publish_renewals();
        self.sites
            .values()
            .flat_map(|s| [Some(s.next), s.recheck])
            .flatten()
            .min()
    }

    /// Follows the config: forgets sites no longer held here (and their
    /// certificates), restores new ones and those whose names changed.
    /// Returns the labels of the sites managed now.
    fn track(&mut self, config: &Config, acme: &Acme) -> Vec<String> {
        let managed = config.acme_sites();
        let labels: Vec<String> = managed
            .iter()
            .map(|s| config.site(*s).label.clone())
            .collect();
        self.sites.retain(|label, _| labels.contains(label));
        self.inputs
            .certs
            .retain(|site, entry| entry.source != Source::Acme || labels.iter().any(|l| l == site));
        for site in managed {
            let label = config.site(site).label.clone();
            let identifiers = identifiers(config, site);
            let stale = self
                .sites
                .get(&label)
                .is_none_or(|s| s.identifiers != identifiers);
            if stale {
                let state = self.restore(acme, &label, identifiers);
                self.sites.insert(label, state);
            }
        }
        labels
    }

    /// Orders what is due and asks for renewal information where it is
    /// due. After a request the CA left unanswered, the sites behind it
    /// wait for that site's next try ([`Hush`]) instead of each waiting out
    /// its own deadline.
    async fn work_due(&mut self, acme: &Acme, labels: &[String]) {
        let mut hush: Option<Hush> = None;
        let mut deferred = 0;
        self.unanswered.take();
        for label in labels {
            let now = SystemTime::now();
            let Some(state) = self.sites.get_mut(label) else {
                continue;
            };
            if let Some(h) = &hush
                && state.defer(now, h.until, h.orders)
            {
                deferred += 1;
            }
            let ordered = if state.next <= now {
                self.attempt(acme, label).await;
                true
            } else if state.recheck.is_some_and(|at| at <= now) {
                self.recheck(acme, label).await;
                false
            } else {
                continue;
            };
            if self.unanswered.take()
                && let Some(state) = self.sites.get(label)
                && let Some(found) = Hush::after(label, state, ordered, now)
                && hush.as_ref().is_none_or(|h| found.orders || !h.orders)
            {
                hush = Some(found);
            }
        }
        if let Some(h) = hush.filter(|_| deferred > 0) {
            let waiting = if h.orders {
                "other due orders and renewal-information asks wait"
            } else {
                "other renewal-information asks wait"
            };
            tracing::warn!(
                site = h.site,
                deferred,
                until = %humantime::format_rfc3339_seconds(h.until),
                "the CA left a request unanswered; {waiting} for this site's next try"
            );
        }
    }

    /// Each site's next renewal and the CA's window, for `/status`.
    fn publish_renewals(&self) {
        self.inputs.report.set_renewals(
            self.sites
                .iter()
                .map(|(site, s)| {
                    let renewal = Renewal {
                        at: s.next,
                        window: s.window,
                    };
                    (site.clone(), renewal)
                })
                .collect(),
        );
    }

    /// A stored certificate for the same identifiers goes live at once and
    /// is renewed on schedule; otherwise the site is due now.
    fn restore(&mut self, acme: &Acme, label: &str, identifiers: Vec<String>) -> SiteState {
        let mut state = SiteState {
            next: SystemTime::now(),
            failures: 0,
            current: None,
            window: None,
            recheck: None,
            identifiers,
        };
        let stored = match storage::load_site(&acme.state_dir, label) {
            Ok(Some(stored)) => stored,
            Ok(None) => return state,
            Err(e) => {
                tracing::warn!(site = label, error = %e, "stored certificate unreadable; ordering anew");
                return state;
            }
        };
        if stored.meta.identifiers != state.identifiers || stored.meta.profile != acme.profile {
            tracing::info!(
                site = label,
                "stored certificate was ordered for other names or profile; ordering anew"
            );
            return state;
        }
        match disk::from_pem(
            stored.chain_pem.as_bytes(),
            stored.key_pem.as_bytes(),
            label,
        ) {
            Ok(loaded) if loaded.info.valid_at(SystemTime::now()) => {
                tracing::info!(
                    site = label,
                    not_after = %humantime::format_rfc3339_seconds(loaded.info.not_after),
                    "stored ACME certificate loaded"
                );
                self.install(label, &loaded);
                // Renewal information is asked at once, but after every
                // site's certificate is loaded.
                let info = &loaded.info;
                state.next = schedule::renew_at(info.not_before, info.not_after, fastrand::f64());
                state.recheck = Some(SystemTime::now());
                state.current = Some(loaded);
            }
            Ok(_) => tracing::info!(site = label, "stored certificate expired; ordering anew"),
            Err(e) => {
                tracing::warn!(site = label, error = %e, "stored certificate unusable; ordering anew")
            }
        }
        state
    }

    async fn attempt(&mut self, acme: &Acme, label: &str) {
        let Some(state) = self.sites.get(label) else {
            return;
        };
        let identifiers = state.identifiers.clone();
        let replaces = state
            .current
            .as_ref()
            .filter(|_| state.window.is_some())
            .and_then(|c| c.key.cert.first().and_then(certificate_id));
        // Only this order's refusals count.
        self.retry_after.take();
        let result = tokio::time::timeout(
            ORDER_DEADLINE,
            self.order(acme, label, &identifiers, replaces),
        )
        .await
        .unwrap_or(Err(AcmeError::Deadline(ORDER_DEADLINE)));
        let plan = match &result {
            Ok(loaded) => Some(self.plan(acme, label, loaded, None).await),
            Err(_) => None,
        };
        let Some(state) = self.sites.get_mut(label) else {
            return;
        };
        match result {
            Ok(loaded) => {
                self.inputs.report.order_ended(label, None);
                metrics::counter!(ACME_ORDERS, "site" => label.to_string(), "outcome" => "issued")
                    .increment(1);
                state.failures = 0;
                if let Some(plan) = plan {
                    state.follow(plan);
                }
                tracing::info!(
                    site = label,
                    not_after = %humantime::format_rfc3339_seconds(loaded.info.not_after),
                    next_renewal = %humantime::format_rfc3339_seconds(state.next),
                    "ACME certificate installed"
                );
                state.current = Some(loaded);
            }
            Err(e) => {
                self.inputs.report.order_ended(label, Some(causes(&e)));
                metrics::counter!(ACME_ORDERS, "site" => label.to_string(), "outcome" => "failed")
                    .increment(1);
                state.failures += 1;
                // A CA that refuses `replaces` (already replaced, say) gets
                // a plain order next time.
                if e.step() == Step::NewOrder {
                    state.window = None;
                }
                let wait = schedule::backoff(
                    state.failures,
                    acme.retry_min,
                    acme.retry_max,
                    fastrand::f64(),
                );
                let asked = self.retry_after.take();
                let now = SystemTime::now();
                state.next = schedule::after_failure(now, wait, asked);
                tracing::error!(
                    site = label,
                    step = e.step().as_str(),
                    failures = state.failures,
                    retry_in = ?state.next.duration_since(now).unwrap_or_default(),
                    ca_retry_after = asked.map(humantime::format_rfc3339_seconds).map(tracing::field::display),
                    error = %causes(&e),
                    "ACME order failed; serving through peers meanwhile"
                );
            }
        }
    }

    async fn order(
        &mut self,
        acme: &Acme,
        label: &str,
        identifiers: &[String],
        replaces: Option<CertificateIdentifier<'static>>,
    ) -> Result<Loaded, AcmeError> {
        let account = self.account(acme).await?;
        let request = Request {
            site: label,
            identifiers,
            profile: acme.profile.as_deref(),
            replaces,
            key_type: acme.key_type,
        };
        let live = self.inputs.live.load_full();
        let updater = match (live.config.challenge_of(label), &live.config.dns01) {
            (Challenge::Dns01, Some(dns01)) => Some(Updater::new(dns01).map_err(OrderError::Dns)?),
            _ => None,
        };
        let solver = match &updater {
            Some(updater) => Solver::Dns01(updater),
            None => Solver::Http01(&self.inputs.challenges),
        };
        let (chain_pem, key_pem) = order::obtain(&account, solver, request).await?;
        let loaded = disk::from_pem(chain_pem.as_bytes(), key_pem.as_bytes(), label)?;
        let stored = Stored {
            chain_pem,
            key_pem,
            meta: Meta {
                identifiers: identifiers.to_vec(),
                profile: acme.profile.clone(),
            },
        };
        // Ordering again would not store it either, and would spend the
        // CA's limit on duplicate certificates: serve it, and say so.
        if let Err(e) = storage::save_site(&acme.state_dir, label, &stored) {
            tracing::error!(
                site = label,
                step = Step::Storage.as_str(),
                error = %e,
                "certificate served but not stored; a restart orders it again"
            );
        }
        self.install(label, &loaded);
        Ok(loaded)
    }

    fn install(&self, label: &str, loaded: &Loaded) {
        self.inputs.certs.set(
            label,
            Entry {
                loaded: loaded.clone(),
                source: Source::Acme,
            },
        );
    }

    /// The account: from `state_dir` if there, else created (with EAB when
    /// configured) and saved 0600.
    async fn account(&mut self, acme: &Acme) -> Result<Account, AcmeError> {
        if let Some((directory, account)) = &self.account
            && *directory == acme.directory
        {
            return Ok(account.clone());
        }
        let http = client::build(
            acme.ca_file.as_deref(),
            self.retry_after.clone(),
            self.unanswered.clone(),
        )
        .map_err(AcmeError::Account)?;
        let builder = Account::builder_with_http(http);
        let account = match storage::load_account(&acme.state_dir)? {
            Some(file) if file.directory != acme.directory => {
                let path = storage::account_path(&acme.state_dir).display().to_string();
                return Err(AcmeError::OtherDirectory(
                    path,
                    file.directory,
                    acme.directory.clone(),
                ));
            }
            Some(file) => builder
                .from_credentials(file.credentials)
                .await
                .map_err(AcmeError::Account)?,
            None => {
                storage::check_writable(&acme.state_dir)?;
                let contact: Vec<&str> = acme.contact.iter().map(String::as_str).collect();
                let eab = acme
                    .eab
                    .as_ref()
                    .map(|(kid, key)| ExternalAccountKey::new(kid.clone(), key));
                let new = NewAccount {
                    contact: &contact,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                };
                tracing::info!(step = Step::NewAccount.as_str(), directory = %acme.directory, "creating ACME account");
                let (account, credentials) = builder
                    .create(&new, acme.directory.clone(), eab.as_ref())
                    .await
                    .map_err(AcmeError::Account)?;
                let file = AccountFile {
                    directory: acme.directory.clone(),
                    thumbprint: account.key_thumbprint().to_string(),
                    credentials,
                };
                storage::save_account(&acme.state_dir, &file)?;
                account
            }
        };
        if acme.shared_account {
            self.inputs
                .challenges
                .set_thumbprint(Some(account.key_thumbprint().to_string()));
        }
        self.account = Some((acme.directory.clone(), account.clone()));
        Ok(account)
    }

    /// Stateless answers need only the thumbprint, which the account file
    /// carries: no round trip to the CA first.
    fn publish_thumbprint(&self, acme: &Acme) {
        match storage::load_account(&acme.state_dir) {
            Ok(Some(file)) => self.inputs.challenges.set_thumbprint(Some(file.thumbprint)),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "shared account unreadable"),
        }
    }
}

/// An error and its causes, each once: an HTTP client's "client error
/// (Connect)" alone does not tell an operator that the CA's certificate
/// was not trusted.
fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

/// The identifiers this node orders for a site: its exact names plus the
/// node's own `acme_name`, sorted so storage comparisons are stable.
pub fn identifiers(config: &Config, site: SiteId) -> Vec<String> {
    let mut names: Vec<String> = config
        .site(site)
        .names
        .iter()
        .map(|n| n.to_string())
        .collect();
    if let Some(own) = &config.this().acme_name {
        names.push(own.clone());
    }
    names.sort();
    names.dedup();
    names
}

#[cfg(test)]
mod tests {
    use super::causes;

    #[derive(Debug, thiserror::Error)]
    #[error("account: {0}")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn causes_name_each_cause_once() {
        let inner = std::io::Error::other("invalid peer certificate: UnknownIssuer");
        let outer = Outer(inner);
        assert_eq!(
            causes(&outer),
            "account: invalid peer certificate: UnknownIssuer"
        );
        let wrapped = std::io::Error::other(outer);
        assert_eq!(
            causes(&wrapped),
            "account: invalid peer certificate: UnknownIssuer"
        );
    }
}
