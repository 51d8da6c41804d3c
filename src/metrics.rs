//! Metric names, their help text, and the Prometheus exporter. Labels come
//! from closed sets only (listener addresses and site names from the config,
//! decisions, reasons): never a client's SNI, Host or token.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, OnceLock};

use ::metrics::{Counter, Gauge, Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::tls::route::DecisionKind;

pub const CONNECTIONS_ACCEPTED: &str = "sni_router_connections_accepted_total";
pub const CONNECTIONS_FINISHED: &str = "sni_router_connections_finished_total";
pub const CONNECTIONS_ACTIVE: &str = "sni_router_connections_active";
pub const CONNECTIONS_QUIET: &str = "sni_router_connections_quiet";
pub const REJECTED: &str = "sni_router_rejected_total";
pub const BYTES: &str = "sni_router_bytes_total";
/// Finished TLS-port connections by site and decision.
pub const SITE_CONNECTIONS: &str = "sni_router_site_connections_total";
/// Bytes relayed by site and direction.
pub const SITE_BYTES: &str = "sni_router_site_bytes_total";
pub const HELLO_SECONDS: &str = "sni_router_client_hello_duration_seconds";
pub const HELLO_FAILURES: &str = "sni_router_client_hello_failures_total";
pub const CONNECT_FAILURES: &str = "sni_router_connect_failures_total";
pub const FAILOVERS: &str = "sni_router_failovers_total";
pub const HANDSHAKE_FAILURES: &str = "sni_router_tls_handshake_failures_total";
pub const HANDSHAKE_SECONDS: &str = "sni_router_tls_handshake_duration_seconds";
/// 1 while the last connect to a peer node worked, 0 after one failed.
pub const PEER_UP: &str = "sni_router_peer_up";
pub const TERMINATE_FALLBACKS: &str = "sni_router_terminate_fallbacks_total";
pub const HTTP_REQUESTS: &str = "sni_router_http_requests_total";
pub const HTTP_FORWARD_SECONDS: &str = "sni_router_http_forward_duration_seconds";
pub const ACME_ORDERS: &str = "sni_router_acme_orders_total";
pub const ACME_RENEWAL_INFO: &str = "sni_router_acme_renewal_info_total";
pub const CERT_EXPIRY: &str = "sni_router_certificate_expiry_timestamp_seconds";
/// With the expiry, the lifetime: alerts judge the fraction left, which
/// suits 6-day and 90-day certificates alike.
pub const CERT_NOT_BEFORE: &str = "sni_router_certificate_not_before_timestamp_seconds";
pub const CONFIG_RELOADS: &str = "sni_router_config_reloads_total";
pub const CONFIG_DRIFT: &str = "sni_router_config_drift_total";
/// 1, labelled with the running version.
pub const BUILD_INFO: &str = "sni_router_build_info";
/// When the running config was loaded: at start, and at each reload that took.
pub const CONFIG_LOADED: &str = "sni_router_config_last_reload_success_timestamp_seconds";
/// The `max_connections` limit, beside the connections in flight.
pub const CONNECTIONS_MAX: &str = "sni_router_connections_max";
/// DNS-01 record updates and looks, by result.
pub const DNS_UPDATES: &str = "sni_router_dns_updates_total";
/// 1 for each ACME site's challenge type (`site`, `challenge`).
pub const ACME_CHALLENGE: &str = "sni_router_acme_challenge_info";
/// Active health of a checked pool's targets (`site`, `target`).
pub const TARGET_UP: &str = "sni_router_target_up";
/// Clients a site's allow/deny lists refused (`site`, `reason`, `port`).
pub const ACCESS_DENIED: &str = "sni_router_access_denied_total";

/// Buckets for the latency histograms: a hello or a forwarded challenge
/// takes milliseconds; the deadlines are seconds.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The decisions a finished TLS-port connection is counted under.
const DECISIONS: [DecisionKind; 4] = DecisionKind::ALL;

/// One listener's per-connection series, looked up once when it starts
/// accepting. A labelled `counter!` builds its key, hashes it and takes the
/// registry's lock on every call; a held handle is one atomic add.
pub struct ListenerMetrics {
    /// The listener as metrics name it: its bound address.
    pub label: Arc<str>,
    pub accepted: Counter,
    pub active: Gauge,
    /// Pairs handed to the splice engines (not by listener).
    pub quiet: Gauge,
    /// TLS listeners only: finished connections and bytes by decision.
    outcomes: Option<Outcomes>,
}

struct Outcomes {
    finished: [Counter; 4],
    /// Bytes (up, down); by decision, not by listener.
    bytes: [(Counter, Counter); 4],
}

impl ListenerMetrics {
    /// Handles for the listener `label`, from the recorder installed now
    /// (if any); with `tls`, also its outcome series.
    pub fn new(label: Arc<str>, tls: bool) -> Self {
        let outcomes = tls.then(|| Outcomes {
            finished: DECISIONS.map(|decision| {
                let decision = decision.as_str();
                ::metrics::counter!(CONNECTIONS_FINISHED, "listener" => label.clone(), "decision" => decision)
            }),
            bytes: DECISIONS.map(|decision| {
                let decision = decision.as_str();
                (
                    ::metrics::counter!(BYTES, "direction" => "up", "decision" => decision),
                    ::metrics::counter!(BYTES, "direction" => "down", "decision" => decision),
                )
            }),
        });
        ListenerMetrics {
            accepted: ::metrics::counter!(CONNECTIONS_ACCEPTED, "listener" => label.clone()),
            active: ::metrics::gauge!(CONNECTIONS_ACTIVE, "listener" => label.clone()),
            quiet: ::metrics::gauge!(CONNECTIONS_QUIET),
            outcomes,
            label,
        }
    }

    /// Counts a finished connection and the bytes it moved each way.
    pub fn finished(&self, decision: DecisionKind, up: u64, down: u64) {
        let i = DECISIONS.iter().position(|d| *d == decision);
        let decision = decision.as_str();
        let held = i.and_then(|i| {
            let outcomes = self.outcomes.as_ref()?;
            Some((outcomes.finished.get(i)?, outcomes.bytes.get(i)?))
        });
        if let Some((finished, (to_target, to_client))) = held {
            finished.increment(1);
            to_target.increment(up);
            to_client.increment(down);
            return;
        }
        ::metrics::counter!(CONNECTIONS_FINISHED, "listener" => self.label.clone(), "decision" => decision).increment(1);
        ::metrics::counter!(BYTES, "direction" => "up", "decision" => decision).increment(up);
        ::metrics::counter!(BYTES, "direction" => "down", "decision" => decision).increment(down);
    }
}

/// Which site a finished connection counts under: one of the config's, a
/// name in none of them, or no name at all. Bounded by the config, so junk
/// SNI cannot add series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SiteRef {
    Site(crate::config::SiteId),
    Unknown,
    NoSni,
}

/// One site's counts, kept across reloads under its label so a site that
/// stays counts on.
#[derive(Default)]
struct SiteCounters {
    finished: [AtomicU64; 4],
    up: AtomicU64,
    down: AtomicU64,
}

/// Every site label any config has had, with its counts.
static SITE_COUNTS: LazyLock<Mutex<HashMap<Arc<str>, Arc<SiteCounters>>>> =
    LazyLock::new(Mutex::default);

/// Per-site counts for one config, looked up once when the config is
/// built: counting a connection is an index and three atomic adds. They
/// are rendered at scrape time for this config's sites only, so a removed
/// site's series leave the exposition.
pub struct SiteMetrics {
    /// The config's sites by `SiteId`, then `unknown`, then `none`.
    sites: Vec<(Arc<str>, Arc<SiteCounters>)>,
}

impl SiteMetrics {
    /// Counts for sites labelled `labels` (their first names, in `SiteId`
    /// order).
    pub fn new<'a>(labels: impl Iterator<Item = &'a str>) -> SiteMetrics {
        let mut known = SITE_COUNTS.lock().unwrap_or_else(|p| p.into_inner());
        let sites = labels
            .chain(["unknown", "none"])
            .map(|label| {
                let label: Arc<str> = label.into();
                let counts = known.entry(label.clone()).or_default().clone();
                (label, counts)
            })
            .collect();
        SiteMetrics { sites }
    }

    pub fn finished(&self, site: SiteRef, decision: DecisionKind, up: u64, down: u64) {
        let extra = self.sites.len().saturating_sub(2);
        let index = match site {
            SiteRef::Site(id) => id.0,
            SiteRef::Unknown => extra,
            SiteRef::NoSni => extra + 1,
        };
        let Some((_, site)) = self.sites.get(index) else {
            return;
        };
        if let Some(finished) = DECISIONS
            .iter()
            .position(|d| *d == decision)
            .and_then(|i| site.finished.get(i))
        {
            finished.fetch_add(1, Ordering::Relaxed);
        }
        site.up.fetch_add(up, Ordering::Relaxed);
        site.down.fetch_add(down, Ordering::Relaxed);
    }

    /// This config's sites' series, in the exposition format.
    pub fn write(&self, out: &mut String) {
        let read = |n: &AtomicU64| n.load(Ordering::Relaxed) as f64;
        let mut connections = Vec::new();
        let mut bytes = Vec::new();
        for (label, counts) in &self.sites {
            for (decision, n) in DECISIONS.iter().zip(&counts.finished) {
                connections.push((
                    vec![("site", &**label), ("decision", decision.as_str())],
                    read(n),
                ));
            }
            bytes.push((
                vec![("site", &**label), ("direction", "up")],
                read(&counts.up),
            ));
            bytes.push((
                vec![("site", &**label), ("direction", "down")],
                read(&counts.down),
            ));
        }
        Family::SiteConnections.write(out, &connections);
        Family::SiteBytes.write(out, &bytes);
    }
}

impl std::fmt::Debug for SiteMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SiteMetrics")
            .field("sites", &self.sites.len())
            .finish()
    }
}

impl std::fmt::Debug for ListenerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerMetrics")
            .field("label", &self.label)
            .finish()
    }
}

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide recorder once; returns the handle that renders
/// the exposition, or `None` if another recorder was installed first.
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            ::metrics::set_global_recorder(recorder).ok()?;
            describe();
            process::describe();
            ::metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            Some(handle)
        })
        .clone()
}

/// The `process_*` family Prometheus's own client libraries export, read
/// from `/proc/self` at each scrape. Only `/proc/self`: the unit's
/// `ProcSubset=pid` hides the rest of `/proc` (so the start time is taken
/// when the recorder is installed, at start-up, not from `/proc/stat`).
mod process {
    use std::sync::OnceLock;

    use ::metrics::{Unit, describe_counter, describe_gauge};

    static STARTED: OnceLock<f64> = OnceLock::new();

    pub fn describe() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        STARTED.get_or_init(|| now.as_secs_f64());
        describe_counter!(
            "process_cpu_seconds_total",
            Unit::Seconds,
            "Total user and system CPU time spent in seconds."
        );
        describe_gauge!(
            "process_resident_memory_bytes",
            Unit::Bytes,
            "Resident memory size in bytes."
        );
        describe_gauge!(
            "process_virtual_memory_bytes",
            Unit::Bytes,
            "Virtual memory size in bytes."
        );
        describe_gauge!("process_open_fds", "Number of open file descriptors.");
        describe_gauge!(
            "process_max_fds",
            "Maximum number of open file descriptors."
        );
        describe_gauge!("process_threads", "Number of OS threads in the process.");
        describe_gauge!(
            "process_start_time_seconds",
            Unit::Seconds,
            "Start time of the process since unix epoch in seconds."
        );
    }

    pub fn collect() {
        // SAFETY: sysconf has no preconditions; it reads a constant.
        let (ticks, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            // Fields after the command name, which may hold spaces: state
            // is the first, utime the 12th and stime the 13th.
            let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let time = |i: usize| {
                fields
                    .get(i)
                    .and_then(|f| f.parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            if ticks > 0 {
                let cpu = (time(11) + time(12)) / ticks as f64;
                ::metrics::counter!("process_cpu_seconds_total").absolute(cpu as u64);
            }
            ::metrics::gauge!("process_threads").set(time(17));
        }
        if let Ok(statm) = std::fs::read_to_string("/proc/self/statm") {
            let pages: Vec<f64> = statm
                .split_whitespace()
                .filter_map(|f| f.parse().ok())
                .collect();
            let bytes = |i: usize| pages.get(i).copied().unwrap_or(0.0) * page as f64;
            ::metrics::gauge!("process_virtual_memory_bytes").set(bytes(0));
            ::metrics::gauge!("process_resident_memory_bytes").set(bytes(1));
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            ::metrics::gauge!("process_open_fds").set(fds.count() as f64);
        }
        if let Ok((soft, _)) = rlimit::getrlimit(rlimit::Resource::NOFILE) {
            ::metrics::gauge!("process_max_fds").set(soft as f64);
        }
        if let Some(started) = STARTED.get() {
            ::metrics::gauge!("process_start_time_seconds").set(*started);
        }
    }
}

/// The exposition text, with the process_* series read now.
pub fn render(handle: &PrometheusHandle) -> String {
    process::collect();
    handle.render()
}

/// Series drawn from live state at each scrape instead of kept in the
/// recorder, which cannot delete one: these vanish with the site or node
/// they describe, so no alert fires and no panel shows one no longer here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    CertExpiry,
    CertNotBefore,
    AcmeChallenge,
    PeerUp,
    SiteConnections,
    SiteBytes,
    TargetUp,
}

/// A sample: label pairs and a value.
pub type Sample<'a> = (Vec<(&'a str, &'a str)>, f64);

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::CertExpiry => CERT_EXPIRY,
            Family::CertNotBefore => CERT_NOT_BEFORE,
            Family::AcmeChallenge => ACME_CHALLENGE,
            Family::PeerUp => PEER_UP,
            Family::SiteConnections => SITE_CONNECTIONS,
            Family::SiteBytes => SITE_BYTES,
            Family::TargetUp => TARGET_UP,
        }
    }

    fn help(self) -> &'static str {
        match self {
            Family::CertExpiry => "Expiry of the certificate served for a held site (Unix time).",
            Family::CertNotBefore => {
                "Start of the validity of the certificate served for a held site (Unix time)."
            }
            Family::AcmeChallenge => "1 for each site this node orders by ACME, by challenge type.",
            Family::PeerUp => {
                "1 while the last connect to a peer node (splice, forward or probe) worked, 0 after one failed."
            }
            Family::SiteConnections => {
                "Finished TLS-port connections by site (its first name; unknown: a name in no site; none: no SNI) and decision."
            }
            Family::SiteBytes => "Bytes relayed by site and direction (up: from client).",
            Family::TargetUp => {
                "1 while the last health check (health = \"tcp\") of a site's backend or upstream connected, 0 after one failed."
            }
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Family::SiteConnections | Family::SiteBytes => "counter",
            _ => "gauge",
        }
    }

    /// Appends this family's HELP, TYPE and samples to `out`; nothing
    /// when there are none.
    pub fn write(self, out: &mut String, samples: &[Sample<'_>]) {
        use std::fmt::Write;
        if samples.is_empty() {
            return;
        }
        let name = self.name();
        let _ = write!(
            out,
            "# HELP {name} {}\n# TYPE {name} {}\n",
            self.help(),
            self.kind()
        );
        for (labels, value) in samples {
            out.push_str(name);
            let mut sep = '{';
            for (key, value) in labels {
                let value = value
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(out, "{sep}{key}=\"{value}\"");
                sep = ',';
            }
            if sep == ',' {
                out.push('}');
            }
            let _ = writeln!(out, " {value}");
        }
        out.push('\n');
    }
}

/// Marks the running config as loaded now.
pub fn config_loaded() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    ::metrics::gauge!(CONFIG_LOADED).set(now.as_secs_f64());
}

fn describe() {
    describe_build_sites_and_peers();
    describe_counter!(CONNECTIONS_ACCEPTED, "Connections accepted, by listener.");
    describe_counter!(
        CONNECTIONS_FINISHED,
        "Connections finished, by listener and decision."
    );
    describe_gauge!(CONNECTIONS_ACTIVE, "Connections open now, by listener.");
    describe_gauge!(
        CONNECTIONS_QUIET,
        "Spliced connections the splice engine holds, quiet for a second or more (also counted as active)."
    );
    describe_counter!(REJECTED, "Connections refused, by reason.");
    describe_counter!(
        BYTES,
        Unit::Bytes,
        "Bytes relayed, by direction (up: from client) and decision."
    );
    describe_histogram!(
        HELLO_SECONDS,
        Unit::Seconds,
        "Time from accept to a complete ClientHello."
    );
    describe_counter!(
        HELLO_FAILURES,
        "ClientHellos not usable, by reason (no_sni counts hellos without SNI)."
    );
    describe_counter!(
        CONNECT_FAILURES,
        "Failed connects to nodes, backends and upstreams, by target kind and target."
    );
    describe_counter!(FAILOVERS, "Holders skipped for the next one, by node.");
    describe_counter!(
        HANDSHAKE_FAILURES,
        "TLS handshakes this node terminated that failed, by reason."
    );
    describe_counter!(
        TERMINATE_FALLBACKS,
        "Held sites spliced to a peer for want of a valid certificate here, by site."
    );
    describe_counter!(HTTP_REQUESTS, "Requests on the HTTP port, by outcome.");
    describe_histogram!(
        HTTP_FORWARD_SECONDS,
        Unit::Seconds,
        "Time to ask holders for a challenge token."
    );
    describe_counter!(ACME_ORDERS, "ACME orders, by site and outcome.");
    describe_counter!(
        ACME_RENEWAL_INFO,
        "Asks for a certificate's ACME renewal information (ARI), by site and outcome."
    );
    describe_counter!(CONFIG_RELOADS, "Config reloads, by outcome.");
    describe_counter!(
        ACCESS_DENIED,
        "Clients refused by a site's allow/deny lists, by site, reason (not_allowed, deny_listed) and port (tls, http)."
    );
    describe_counter!(
        CONFIG_DRIFT,
        "Connections from a peer node (splices, forwarded challenges) whose fleet digest differed from ours, by peer."
    );
}

/// The series for the operator's dashboard: build, config, limits, sites,
/// handshakes, peers.
fn describe_build_sites_and_peers() {
    describe_gauge!(BUILD_INFO, "1, labelled with the running version.");
    describe_histogram!(
        HANDSHAKE_SECONDS,
        Unit::Seconds,
        "TLS handshakes terminated here, from the replayed ClientHello to done."
    );
    describe_gauge!(
        CONFIG_LOADED,
        Unit::Seconds,
        "When the running config was loaded (at start, or the last reload that took)."
    );
    describe_gauge!(CONNECTIONS_MAX, "The max_connections limit.");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_family_escapes_label_values_and_writes_nothing_without_samples() {
        let mut out = String::new();
        Family::PeerUp.write(&mut out, &[]);
        assert_eq!(out, "");
        Family::AcmeChallenge.write(
            &mut out,
            &[(vec![("site", "*.a\"b\\c\nd"), ("challenge", "dns-01")], 1.0)],
        );
        assert_eq!(
            out,
            "# HELP sni_router_acme_challenge_info 1 for each site this node orders by ACME, by challenge type.\n\
             # TYPE sni_router_acme_challenge_info gauge\n\
             sni_router_acme_challenge_info{site=\"*.a\\\"b\\\\c\\nd\",challenge=\"dns-01\"} 1\n\n"
        );
    }

    #[test]
    fn a_site_kept_across_configs_counts_on_and_a_removed_one_is_not_written() {
        let before = SiteMetrics::new(["kept.metrics.test", "gone.metrics.test"].into_iter());
        before.finished(SiteRef::Site(crate::config::SiteId(0)), DECISIONS[0], 3, 4);
        let after = SiteMetrics::new(["kept.metrics.test"].into_iter());
        after.finished(SiteRef::Site(crate::config::SiteId(0)), DECISIONS[0], 3, 4);
        let mut out = String::new();
        after.write(&mut out);
        assert!(
            out.contains(
                "sni_router_site_bytes_total{site=\"kept.metrics.test\",direction=\"up\"} 6\n"
            ),
            "{out}"
        );
        assert!(!out.contains("gone.metrics.test"), "{out}");
    }
}
