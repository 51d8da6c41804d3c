//! One ACME order, HTTP-01 through this node's challenge store or DNS-01
//! through RFC 2136 updates: tokens and records are in place before a
//! challenge is set ready, and removed afterwards whatever the outcome.

use std::time::Duration;

use instant_acme::{
    Account, AuthorizationStatus, CertificateIdentifier, ChallengeType, Identifier,
    KeyAuthorization, NewOrder, OrderStatus, RetryPolicy,
};
use rcgen::{CertificateParams, DistinguishedName, KeyPair};

use super::dns01::{DnsError, Placed, Updater};
use crate::config::KeyType;
use crate::http::challenge::{ChallengeStore, Full};

/// A token outlives its order by a margin: the CA may validate late.
const TOKEN_TTL: Duration = Duration::from_secs(15 * 60);
/// How long the CA may take to validate, and then to issue.
const POLL: RetryPolicy = RetryPolicy::new()
    .initial_delay(Duration::from_millis(250))
    .backoff(1.5)
    .timeout(Duration::from_secs(90));

#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    /// The CA's answer; a problem document's type and detail are in `source`.
    #[error("{}: {source}", step.as_str())]
    Acme {
        step: Step,
        source: instant_acme::Error,
    },
    #[error("no {0} challenge offered for {1}")]
    NoChallenge(&'static str, String),
    #[error(transparent)]
    Dns(#[from] DnsError),
    #[error("authorization for {0} is {1:?}")]
    Authorization(String, AuthorizationStatus),
    #[error("order ended {0:?}")]
    Order(OrderStatus),
    #[error("making the key or CSR: {0}")]
    Csr(#[from] rcgen::Error),
    #[error(transparent)]
    Challenges(#[from] Full),
}

/// A step of obtaining a certificate, as logs name it (`step=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    NewAccount,
    Account,
    NewOrder,
    Authorization,
    Challenge,
    SetReady,
    PollReady,
    Csr,
    Finalize,
    Certificate,
    Deadline,
    Storage,
    Issued,
    RenewalInfo,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::NewAccount => "new_account",
            Step::Account => "account",
            Step::NewOrder => "new_order",
            Step::Authorization => "authorization",
            Step::Challenge => "challenge",
            Step::SetReady => "set_ready",
            Step::PollReady => "poll_ready",
            Step::Csr => "csr",
            Step::Finalize => "finalize",
            Step::Certificate => "certificate",
            Step::Deadline => "deadline",
            Step::Storage => "storage",
            Step::Issued => "issued",
            Step::RenewalInfo => "renewal_info",
        }
    }
}

impl OrderError {
    pub fn step(&self) -> Step {
        match self {
            OrderError::Acme { step, .. } => *step,
            OrderError::NoChallenge(..)
            | OrderError::Dns(_)
            | OrderError::Authorization(..)
            | OrderError::Challenges(_) => Step::Challenge,
            OrderError::Order(_) => Step::PollReady,
            OrderError::Csr(_) => Step::Csr,
        }
    }
}

fn at(step: Step) -> impl FnOnce(instant_acme::Error) -> OrderError {
    move |source| OrderError::Acme { step, source }
}

/// What to order.
pub struct Request<'a> {
    pub site: &'a str,
    pub identifiers: &'a [String],
    pub profile: Option<&'a str>,
    pub replaces: Option<CertificateIdentifier<'static>>,
    pub key_type: KeyType,
}

/// How this order's challenges are answered.
pub enum Solver<'a> {
    /// A token in this node's store, which port 80 serves (and other
    /// holders ask for).
    Http01(&'a ChallengeStore),
    /// A TXT record written through RFC 2136.
    Dns01(&'a Updater),
}

/// What an answered challenge left in place, to be removed.
enum Answer {
    Token(String),
    Record(Box<Placed>),
}

impl Solver<'_> {
    /// The challenge type to pick, and its name for messages.
    fn kind(&self) -> (ChallengeType, &'static str) {
        match self {
            Solver::Http01(_) => (ChallengeType::Http01, "http-01"),
            Solver::Dns01(_) => (ChallengeType::Dns01, "dns-01"),
        }
    }

    /// Puts the answer to one challenge in place (for DNS-01: visible at
    /// the server); returns what to remove afterwards.
    async fn present(
        &self,
        site: &str,
        name: &str,
        token: &str,
        key_authorization: &KeyAuthorization,
    ) -> Result<Answer, OrderError> {
        match self {
            Solver::Http01(store) => {
                store.insert(token, key_authorization.as_str(), TOKEN_TTL)?;
                tracing::info!(site, step = Step::Challenge.as_str(), identifier = %name, "HTTP-01 token in place, set ready");
                Ok(Answer::Token(token.to_string()))
            }
            Solver::Dns01(updater) => {
                let placed = updater
                    .present(name, &key_authorization.dns_value())
                    .await?;
                tracing::info!(site, step = Step::Challenge.as_str(), identifier = %name, record = %placed.name(), "DNS-01 TXT visible at the server, set ready");
                Ok(Answer::Record(Box::new(placed)))
            }
        }
    }

    async fn remove(&self, answer: &Answer) {
        match (answer, self) {
            (Answer::Token(token), Solver::Http01(store)) => store.remove(token),
            (Answer::Record(placed), Solver::Dns01(updater)) => updater.remove(placed).await,
            _ => {}
        }
    }
}

/// Runs the order to the end; returns (chain PEM, key PEM).
pub async fn obtain(
    account: &Account,
    solver: Solver<'_>,
    request: Request<'_>,
) -> Result<(String, String), OrderError> {
    let site = request.site;
    let identifiers: Vec<Identifier> = request
        .identifiers
        .iter()
        .cloned()
        .map(Identifier::Dns)
        .collect();
    let mut new_order = NewOrder::new(&identifiers);
    if let Some(profile) = request.profile {
        new_order = new_order.profile(profile);
    }
    let replaces = request.replaces.as_ref().map(ToString::to_string);
    if let Some(replaces) = request.replaces {
        new_order = new_order.replaces(replaces);
    }
    tracing::info!(site, step = Step::NewOrder.as_str(), identifiers = ?request.identifiers, replaces, "ACME order");
    let mut order = account
        .new_order(&new_order)
        .await
        .map_err(at(Step::NewOrder))?;

    let mut answers = Vec::new();
    let result = async {
        let mut authorizations = order.authorizations();
        while let Some(authorization) = authorizations.next().await {
            let mut authorization = authorization.map_err(at(Step::Authorization))?;
            let name = authorization.identifier().to_string();
            match authorization.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => return Err(OrderError::Authorization(name, other)),
            }
            let (kind, label) = solver.kind();
            let mut challenge = authorization
                .challenge(kind)
                .ok_or_else(|| OrderError::NoChallenge(label, name.clone()))?;
            let key_authorization = challenge.key_authorization();
            let answer = solver
                .present(site, &name, &challenge.token, &key_authorization)
                .await?;
            answers.push(answer);
            challenge.set_ready().await.map_err(at(Step::SetReady))?;
        }
        let status = order.poll_ready(&POLL).await.map_err(at(Step::PollReady))?;
        if status != OrderStatus::Ready {
            return Err(OrderError::Order(status));
        }
        Ok(())
    }
    .await;
    for answer in &answers {
        solver.remove(answer).await;
    }
    result?;

    let (csr, key_pem) = csr(request.identifiers, request.key_type)?;
    tracing::info!(
        site,
        step = Step::Finalize.as_str(),
        "ACME order ready, finalizing"
    );
    order.finalize_csr(&csr).await.map_err(at(Step::Finalize))?;
    let chain = order
        .poll_certificate(&POLL)
        .await
        .map_err(at(Step::Certificate))?;
    tracing::info!(
        site,
        step = Step::Issued.as_str(),
        "ACME certificate issued"
    );
    Ok((chain, key_pem))
}

/// A fresh key of the configured type and a CSR for the identifiers.
fn csr(identifiers: &[String], key_type: KeyType) -> Result<(Vec<u8>, String), rcgen::Error> {
    let algorithm = match key_type {
        KeyType::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        KeyType::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
        KeyType::Rsa2048 => &rcgen::PKCS_RSA_SHA256,
    };
    let key = KeyPair::generate_for(algorithm)?;
    let mut params = CertificateParams::new(identifiers.to_vec())?;
    params.distinguished_name = DistinguishedName::new();
    let csr = params.serialize_request(&key)?;
    Ok((csr.der().to_vec(), key.serialize_pem()))
}
