//! What the CA's renewal information (ARI, RFC 9773) says about a
//! certificate: when to renew it, and when to ask again. A revocation or an
//! incident moves the window; the next check moves the renewal.

use std::time::{Duration, SystemTime};

use instant_acme::CertificateIdentifier;

use super::order::Step;
use super::{AcmeError, Manager, causes, schedule};
use crate::certs::disk::Loaded;
use crate::config::Acme;
use crate::metrics::ACME_RENEWAL_INFO;

/// Asking for renewal information (one GET, maybe the account first): a CA
/// that accepts and never answers must not stall every site's schedule.
const ASK_DEADLINE: Duration = Duration::from_secs(30);

/// An ARI suggested window: start, end.
pub use super::status::Window;

/// When to renew a certificate, and what the CA said about it.
pub(super) struct Plan {
    pub(super) renew: SystemTime,
    pub(super) window: Option<Window>,
    pub(super) recheck: Option<SystemTime>,
}

impl Manager {
    /// ARI's suggested window when the CA offers one that ends before the
    /// certificate does, else a third of the lifetime left; both with
    /// jitter so holders spread out. A window other than `known` that
    /// cannot be followed is logged.
    pub(super) async fn plan(
        &mut self,
        acme: &Acme,
        label: &str,
        loaded: &Loaded,
        known: Option<Window>,
    ) -> Plan {
        let info = &loaded.info;
        let fallback = schedule::renew_at(info.not_before, info.not_after, fastrand::f64());
        let lifetime = info
            .not_after
            .duration_since(info.not_before)
            .unwrap_or_default();
        let now = SystemTime::now();
        let (window, retry_after) = match self.renewal_info(acme, label, loaded).await {
            Ari::Unsupported => {
                return Plan {
                    renew: fallback,
                    window: None,
                    recheck: None,
                };
            }
            Ari::Failed => (None, schedule::ARI_RECHECK_AFTER_FAILURE),
            Ari::Window(window, retry_after, explanation) => {
                // RFC 9773 asks that operators can see why a window moved.
                if let Some(url) = explanation.filter(|_| Some(window) != known) {
                    tracing::info!(site = label, step = Step::RenewalInfo.as_str(), explanation = %url, "the CA explains its renewal window");
                }
                (Some(window), retry_after)
            }
        };
        let renew = window
            .and_then(|w| schedule::ari_renew_at(now, w, info.not_after, fastrand::f64()))
            .unwrap_or_else(|| {
                if window.is_some() && window != known {
                    tracing::warn!(
                        site = label,
                        step = Step::RenewalInfo.as_str(),
                        "the CA's renewal window ends after the certificate expires; renewing at a third of its lifetime left"
                    );
                }
                fallback
            });
        Plan {
            renew,
            window,
            recheck: Some(now + schedule::ari_recheck(lifetime, retry_after)),
        }
    }

    /// Asks the CA again; a moved window moves the renewal (a revoked
    /// certificate's window is in the past: renew now).
    pub(super) async fn recheck(&mut self, acme: &Acme, label: &str) {
        let Some((loaded, known)) = self
            .sites
            .get(label)
            .and_then(|s| Some((s.current.clone()?, s.window)))
        else {
            return;
        };
        let plan = self.plan(acme, label, &loaded, known).await;
        let Some(state) = self.sites.get_mut(label) else {
            return;
        };
        state.recheck = plan.recheck;
        if plan.window.is_none() || plan.window == state.window {
            return;
        }
        let what = if known.is_some() {
            "the CA's renewal window moved"
        } else {
            "the CA suggests a renewal window"
        };
        tracing::info!(
            site = label,
            step = Step::RenewalInfo.as_str(),
            next_renewal = %humantime::format_rfc3339_seconds(plan.renew),
            "{what}"
        );
        (state.next, state.window) = (plan.renew, plan.window);
    }

    async fn renewal_info(&mut self, acme: &Acme, label: &str, loaded: &Loaded) -> Ari {
        let ari = self.ask(acme, label, loaded).await;
        let outcome = match ari {
            Ari::Window(..) => "window",
            Ari::Unsupported => "unsupported",
            Ari::Failed => "failed",
        };
        metrics::counter!(ACME_RENEWAL_INFO, "site" => label.to_string(), "outcome" => outcome)
            .increment(1);
        ari
    }

    async fn ask(&mut self, acme: &Acme, label: &str, loaded: &Loaded) -> Ari {
        let Some(id) = loaded.key.cert.first().and_then(certificate_id) else {
            return Ari::Unsupported;
        };
        let asked = async {
            let account = self.account(acme).await?;
            Ok::<_, AcmeError>(account.renewal_info(&id).await)
        };
        let answer = match tokio::time::timeout(ASK_DEADLINE, asked).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => {
                tracing::warn!(site = label, step = Step::RenewalInfo.as_str(), error = %causes(&e), "cannot ask the CA for renewal information");
                return Ari::Failed;
            }
            Err(_) => {
                self.unanswered.note();
                tracing::warn!(site = label, step = Step::RenewalInfo.as_str(), deadline = ?ASK_DEADLINE, "the CA did not answer in time; asking again later");
                return Ari::Failed;
            }
        };
        match answer {
            Ok((ari, retry_after)) => {
                let window = &ari.suggested_window;
                Ari::Window(
                    (SystemTime::from(window.start), SystemTime::from(window.end)),
                    retry_after,
                    ari.explanation_url,
                )
            }
            Err(instant_acme::Error::Unsupported(_)) => Ari::Unsupported,
            Err(e) => {
                tracing::warn!(site = label, step = Step::RenewalInfo.as_str(), error = %causes(&e), "renewal information unavailable; asking again later");
                Ari::Failed
            }
        }
    }
}

/// What the CA said when asked for renewal information.
enum Ari {
    /// The window, the CA's `Retry-After`, its `explanationURL`.
    Window(Window, Duration, Option<String>),
    /// The directory offers no `renewalInfo`.
    Unsupported,
    Failed,
}

/// ARI's certificate identifier: authority key id and serial (RFC 9773 4.1).
pub(super) fn certificate_id(
    der: &rustls::pki_types::CertificateDer<'_>,
) -> Option<CertificateIdentifier<'static>> {
    CertificateIdentifier::try_from(der)
        .ok()
        .map(CertificateIdentifier::into_owned)
}
