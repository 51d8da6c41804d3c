//! The decision for a request on port 80: pure, no I/O.

use super::challenge::valid_token;
use super::request::Head;
use std::net::IpAddr;

use crate::config::{Config, Denial, HttpMode, SiteId};

const CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpDecision {
    /// An ACME HTTP-01 request with a well-formed token.
    Challenge { token: String },
    /// A challenge path whose token is not base64url: 404, nothing looked up.
    BadToken,
    /// 308 to https, path and query kept.
    Redirect { location: String },
    /// Splice the plain request to the site's upstream or a holder.
    Upstream { site: SiteId },
    /// No usable Host header: 400.
    NoHost,
    /// A Host that is no site's name: 404, we redirect only our own names.
    UnknownHost,
    /// The site's access lists refuse the client: 403.
    Denied { site: SiteId, denial: Denial },
}

/// Challenges come first and pass whoever asks: the CA's validators must
/// get through a site's access lists. `client` is the real client (from a
/// trusted PROXY header, else the socket peer).
pub fn decide(config: &Config, head: &Head, client: IpAddr) -> HttpDecision {
    if let Some(rest) = head.target.strip_prefix(CHALLENGE_PREFIX) {
        let token = rest.split('?').next().unwrap_or_default();
        return if valid_token(token) {
            HttpDecision::Challenge {
                token: token.to_string(),
            }
        } else {
            HttpDecision::BadToken
        };
    }
    let Some(host) = &head.host else {
        return HttpDecision::NoHost;
    };
    let Some(site) = config.names.get(host).copied() else {
        return HttpDecision::UnknownHost;
    };
    if let Err(denial) = config.site(site).access.check(client) {
        return HttpDecision::Denied { site, denial };
    }
    match config.site(site).http {
        HttpMode::Upstream => HttpDecision::Upstream { site },
        HttpMode::Redirect => {
            let path = if head.target.starts_with('/') {
                head.target.as_str()
            } else {
                "/"
            };
            HttpDecision::Redirect {
                location: format!("https://{host}{path}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::parse(
            r#"
            this_node = "a"
            [[nodes]]
            name = "a"
            tls = "127.0.0.2:443"
            http = "127.0.0.2:80"
            [[sites]]
            names = ["www.test", "*.app.test"]
            held_by = ["a"]
            upstream = "127.0.0.1:9000"
            [[sites]]
            names = ["plain.test"]
            held_by = ["a"]
            upstream = "127.0.0.1:9000"
            http = "upstream"
            allow = ["192.0.2.0/24"]
            "#,
            "t",
            None,
        )
        .unwrap()
    }

    fn client() -> IpAddr {
        "192.0.2.7".parse().unwrap()
    }

    fn head(target: &str, host: Option<&str>) -> Head {
        Head {
            method: "GET".into(),
            target: target.into(),
            host: host.map(str::to_string),
            forwarded: false,
            forwarded_digest: None,
            len: 0,
        }
    }

    #[test]
    fn challenges_need_a_base64url_token() {
        let c = config();
        let d = decide(
            &c,
            &head("/.well-known/acme-challenge/abc_DEF-1", None),
            client(),
        );
        assert_eq!(
            d,
            HttpDecision::Challenge {
                token: "abc_DEF-1".into()
            }
        );
        for bad in ["../../etc/passwd", "a/b", "", "a%2e%2e", "x.y"] {
            let d = decide(
                &c,
                &head(
                    &format!("/.well-known/acme-challenge/{bad}"),
                    Some("www.test"),
                ),
                client(),
            );
            assert_eq!(d, HttpDecision::BadToken, "{bad:?}");
        }
    }

    #[test]
    fn redirects_keep_path_and_query() {
        let c = config();
        let d = decide(&c, &head("/a/b?c=d&e", Some("x.app.test")), client());
        assert_eq!(
            d,
            HttpDecision::Redirect {
                location: "https://x.app.test/a/b?c=d&e".into()
            }
        );
        assert_eq!(decide(&c, &head("/", None), client()), HttpDecision::NoHost);
        assert_eq!(
            decide(&c, &head("/", Some("other.test")), client()),
            HttpDecision::UnknownHost
        );
        assert_eq!(
            decide(&c, &head("/", Some("plain.test")), client()),
            HttpDecision::Upstream { site: SiteId(1) }
        );
    }

    #[test]
    fn access_lists_refuse_a_site_but_never_a_challenge() {
        let c = config();
        let outsider: IpAddr = "198.51.100.1".parse().unwrap();
        assert_eq!(
            decide(&c, &head("/", Some("plain.test")), outsider),
            HttpDecision::Denied {
                site: SiteId(1),
                denial: Denial::NotAllowed
            }
        );
        let challenge = head("/.well-known/acme-challenge/abc", Some("plain.test"));
        assert!(matches!(
            decide(&c, &challenge, outsider),
            HttpDecision::Challenge { .. }
        ));
    }
}
