//! DNS-01 through RFC 2136 dynamic updates signed with TSIG (RFC 8945).
//!
//! Several holders validate the same name at once, so each adds only its
//! own TXT value at `_acme-challenge.NAME` (an RFC 2136 add of one RR) and
//! later deletes exactly that RR, never the RRset. A CNAME at
//! `_acme-challenge.NAME` is followed, and the record is written at its
//! target, in whatever zone that is (acme-dns-style delegation). Messages
//! are built by hickory-proto and sent over TCP to the one configured
//! server, which is also the one asked whether the TXT is visible yet.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hickory_proto::op::{Message, Query, ResponseCode, update_message};
use hickory_proto::rr::rdata::TXT;
use hickory_proto::rr::rdata::tsig::{TsigAlgorithm, TsigError};
use hickory_proto::rr::{Name, RData, Record, RecordSet, RecordType, TSigner};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::{self, Dns01};
use crate::metrics::DNS_UPDATES;

/// One exchange with the server may take this long.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Between two looks for the TXT.
const LOOK_EVERY: Duration = Duration::from_millis(500);
/// CNAME hops followed from `_acme-challenge.NAME`.
const MAX_CNAMES: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error(
        "{server} refused the TSIG key {key}: {error:?}, {what} (a wrong secret, or a key the zone does not allow)"
    )]
    Tsig {
        server: SocketAddr,
        key: String,
        error: TsigError,
        what: String,
    },
    #[error("{server} answered {code} for {what}")]
    Refused {
        server: SocketAddr,
        code: ResponseCode,
        what: String,
    },
    #[error("no zone for {name} at {server}: it answered no SOA")]
    NoZone { server: SocketAddr, name: String },
    #[error("{server} did not answer the TXT at {name} within {within:?}")]
    NotSeen {
        server: SocketAddr,
        name: String,
        within: Duration,
    },
    #[error("talking to {server}: {message}")]
    Exchange { server: SocketAddr, message: String },
}

/// How an update or a look ended, as the metric's `result` label says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Added,
    Removed,
    TsigRefused,
    Refused,
    NoZone,
    NotSeen,
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Added => "added",
            Outcome::Removed => "removed",
            Outcome::TsigRefused => "tsig_refused",
            Outcome::Refused => "refused",
            Outcome::NoZone => "no_zone",
            Outcome::NotSeen => "not_seen",
            Outcome::Failed => "failed",
        }
    }
}

impl DnsError {
    pub fn outcome(&self) -> Outcome {
        match self {
            DnsError::Tsig { .. } => Outcome::TsigRefused,
            DnsError::Refused { .. } => Outcome::Refused,
            DnsError::NoZone { .. } => Outcome::NoZone,
            DnsError::NotSeen { .. } => Outcome::NotSeen,
            DnsError::Exchange { .. } => Outcome::Failed,
        }
    }
}

fn count(outcome: Outcome) {
    metrics::counter!(DNS_UPDATES, "result" => outcome.as_str()).increment(1);
}

/// A TXT record this node added, to be deleted by exactly its value.
#[derive(Debug, Clone)]
pub struct Placed {
    zone: Name,
    record: Record,
}

impl Placed {
    pub fn name(&self) -> String {
        self.record.name.to_string()
    }
}

/// Writes and removes DNS-01 records at one server.
pub struct Updater {
    server: SocketAddr,
    signer: TSigner,
    zone: Option<Name>,
    ttl: u32,
    propagation: Duration,
}

impl Updater {
    pub fn new(settings: &Dns01) -> Result<Updater, DnsError> {
        let server = settings.server;
        let fail = |message: String| DnsError::Exchange { server, message };
        let algorithm = match settings.algorithm {
            config::TsigAlgorithm::HmacSha256 => TsigAlgorithm::HmacSha256,
            config::TsigAlgorithm::HmacSha384 => TsigAlgorithm::HmacSha384,
            config::TsigAlgorithm::HmacSha512 => TsigAlgorithm::HmacSha512,
        };
        let key = Name::from_ascii(&settings.key_name).map_err(|e| fail(e.to_string()))?;
        let signer = TSigner::new(settings.secret.clone(), algorithm, key, 300)
            .map_err(|e| fail(e.to_string()))?;
        let zone = match &settings.zone {
            Some(zone) => Some(fqdn(zone).map_err(|e| fail(e.to_string()))?),
            None => None,
        };
        Ok(Updater {
            server,
            signer,
            zone,
            ttl: settings.ttl,
            propagation: settings.propagation_timeout,
        })
    }

    /// Adds `value` at `_acme-challenge.NAME` (or where its CNAME points)
    /// and waits until the server answers it. On an error after the add,
    /// the record is deleted again before the error is returned.
    pub async fn present(&self, name: &str, value: &str) -> Result<Placed, DnsError> {
        let owner = self.target(name).await?;
        let zone = self.zone_of(&owner).await?;
        let txt = RData::TXT(TXT::new(vec![value.to_string()]));
        let record = Record::from_rdata(owner.clone(), self.ttl, txt);
        let placed = Placed { zone, record };
        let mut rrset = RecordSet::new(owner.clone(), RecordType::TXT, 0);
        rrset.insert(placed.record.clone(), 0);
        let add = update_message::append(rrset, placed.zone.clone(), false, false);
        let what = format!("adding TXT at {owner}");
        if let Err(e) = self.update(add, &what).await {
            count(e.outcome());
            return Err(e);
        }
        count(Outcome::Added);
        if let Err(e) = self.wait_visible(&owner, value).await {
            count(e.outcome());
            self.remove(&placed).await;
            return Err(e);
        }
        Ok(placed)
    }

    /// Deletes exactly the RR `present` added; logs a failure.
    pub async fn remove(&self, placed: &Placed) {
        let mut rrset = RecordSet::new(placed.record.name.clone(), RecordType::TXT, 0);
        rrset.insert(placed.record.clone(), 0);
        let delete = update_message::delete_by_rdata(rrset, placed.zone.clone(), false);
        let what = format!("deleting TXT at {}", placed.record.name);
        match self.update(delete, &what).await {
            Ok(()) => count(Outcome::Removed),
            Err(e) => {
                count(e.outcome());
                tracing::warn!(error = %e, name = %placed.record.name, "DNS-01 record left in the zone");
            }
        }
    }

    /// `_acme-challenge.NAME`, or the end of its CNAME chain.
    async fn target(&self, name: &str) -> Result<Name, DnsError> {
        let base = name.trim_start_matches("*.");
        let mut owner = fqdn(&format!("_acme-challenge.{base}")).map_err(|e| self.fail(e))?;
        for _ in 0..MAX_CNAMES {
            // A server that holds no zone for the name refuses the query:
            // no CNAME here, and the zone lookup then says what is wrong.
            let answer = match self.query(&owner, RecordType::CNAME).await {
                Ok(answer) => answer,
                Err(DnsError::Refused { .. }) => return Ok(owner),
                Err(e) => return Err(e),
            };
            let next = answer.answers.iter().find_map(|r| match &r.data {
                RData::CNAME(cname) if r.name == owner => Some(cname.0.clone()),
                _ => None,
            });
            match next {
                Some(next) => {
                    tracing::info!(from = %owner, to = %next, "DNS-01: following CNAME");
                    owner = next;
                }
                None => return Ok(owner),
            }
        }
        Ok(owner)
    }

    /// The configured zone when it holds `owner`; else the SOA the server
    /// names for it (in the answer at an apex, in the authority section
    /// below one).
    async fn zone_of(&self, owner: &Name) -> Result<Name, DnsError> {
        if let Some(zone) = self.zone.as_ref().filter(|z| z.zone_of(owner)) {
            return Ok(zone.clone());
        }
        let no_zone = || DnsError::NoZone {
            server: self.server,
            name: owner.to_string(),
        };
        let answer = self
            .query(owner, RecordType::SOA)
            .await
            .map_err(|e| match e {
                DnsError::Refused { .. } => no_zone(),
                other => other,
            })?;
        answer
            .answers
            .iter()
            .chain(answer.authorities.iter())
            .find(|r| r.record_type() == RecordType::SOA && r.name.zone_of(owner))
            .map(|r| r.name.clone())
            .ok_or_else(no_zone)
    }

    async fn wait_visible(&self, owner: &Name, value: &str) -> Result<(), DnsError> {
        let deadline = tokio::time::Instant::now() + self.propagation;
        loop {
            let answer = self.query(owner, RecordType::TXT).await;
            let seen = answer
                .iter()
                .flat_map(|a| a.answers.iter())
                .any(|r| match &r.data {
                    RData::TXT(txt) => txt.txt_data.iter().any(|d| d.as_ref() == value.as_bytes()),
                    _ => false,
                });
            if seen {
                return Ok(());
            }
            if tokio::time::Instant::now() + LOOK_EVERY > deadline {
                return Err(DnsError::NotSeen {
                    server: self.server,
                    name: owner.to_string(),
                    within: self.propagation,
                });
            }
            tokio::time::sleep(LOOK_EVERY).await;
        }
    }

    /// A plain query; NXDOMAIN is an answer, not an error.
    async fn query(&self, name: &Name, kind: RecordType) -> Result<Message, DnsError> {
        let mut message = Message::query();
        message.add_query(Query::query(name.clone(), kind));
        let answer = self.exchange(message, None, "").await?;
        match answer.response_code {
            ResponseCode::NoError | ResponseCode::NXDomain => Ok(answer),
            code => Err(DnsError::Refused {
                server: self.server,
                code,
                what: format!("{kind} {name}"),
            }),
        }
    }

    /// A signed update; the server's refusal, named.
    async fn update(&self, mut message: Message, what: &str) -> Result<(), DnsError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        message.metadata.id = fastrand::u16(..);
        let verifier = message
            .finalize(&self.signer, now)
            .map_err(|e| self.fail(e))?;
        let answer = self.exchange(message, verifier, what).await?;
        match answer.response_code {
            ResponseCode::NoError => Ok(()),
            code => Err(DnsError::Refused {
                server: self.server,
                code,
                what: what.to_string(),
            }),
        }
    }

    /// Sends `message` over TCP and reads one answer. A signed request's
    /// answer must carry a valid TSIG; a TSIG error in it is reported as such.
    async fn exchange(
        &self,
        mut message: Message,
        verifier: Option<hickory_proto::rr::TSigVerifier>,
        what: &str,
    ) -> Result<Message, DnsError> {
        if message.metadata.id == 0 {
            message.metadata.id = fastrand::u16(1..);
        }
        let bytes = message.to_vec().map_err(|e| self.fail(e))?;
        let work = async {
            let mut stream = TcpStream::connect(self.server).await?;
            let length = u16::try_from(bytes.len()).map_err(std::io::Error::other)?;
            let mut framed = length.to_be_bytes().to_vec();
            framed.extend_from_slice(&bytes);
            stream.write_all(&framed).await?;
            let length = stream.read_u16().await?;
            let mut answer = vec![0u8; usize::from(length)];
            stream.read_exact(&mut answer).await?;
            Ok::<_, std::io::Error>(answer)
        };
        let answer = tokio::time::timeout(EXCHANGE_TIMEOUT, work)
            .await
            .map_err(|_| self.fail("no answer within 10 s"))?
            .map_err(|e| self.fail(e))?;
        let parsed = Message::from_vec(&answer).map_err(|e| self.fail(e))?;
        if parsed.metadata.id != message.metadata.id {
            return Err(self.fail("an answer to another query"));
        }
        let Some(mut verifier) = verifier else {
            return Ok(parsed);
        };
        let tsig = |error| DnsError::Tsig {
            server: self.server,
            key: self.signer.signer_name().to_string(),
            error,
            what: what.to_string(),
        };
        match parsed.signature() {
            Some(record) => match &record.data.error {
                Some(error) => Err(tsig(*error)),
                None => match verifier.verify(&answer) {
                    Ok(_) => Ok(parsed),
                    Err(_) => Err(tsig(TsigError::BadSig)),
                },
            },
            // An unsigned refusal: the caller names its code.
            None if parsed.response_code != ResponseCode::NoError => Ok(parsed),
            None => Err(self.fail("an unsigned answer to a signed update")),
        }
    }

    fn fail(&self, e: impl ToString) -> DnsError {
        DnsError::Exchange {
            server: self.server,
            message: e.to_string(),
        }
    }
}

fn fqdn(name: &str) -> Result<Name, hickory_proto::ProtoError> {
    let mut name = Name::from_ascii(name.trim_end_matches('.'))?;
    name.set_fqdn(true);
    Ok(name)
}
