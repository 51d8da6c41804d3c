//! The HTTP client under instant-acme: its own hyper stack, a deadline on
//! every request, and notes for the manager: the `Retry-After` a CA sends
//! with a refusal (429 rate limited, 503 busy), and whether a request went
//! unanswered. instant-acme honours `Retry-After` while polling, but an
//! error it returns carries only the problem document, so the manager could
//! not wait as long as the CA asked before ordering again.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::RETRY_AFTER;
use hyper_rustls::HttpsConnectorBuilder;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use instant_acme::{BodyWrapper, BytesResponse, HttpClient};

/// The latest `Retry-After` of a refusal, shared by the client and the
/// manager; the manager takes it after a failed order.
#[derive(Clone, Default)]
pub struct RetryAfter(Arc<Mutex<Option<SystemTime>>>);

impl RetryAfter {
    pub fn take(&self) -> Option<SystemTime> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    fn note(&self, at: SystemTime) {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // Of several refusals in one order, the latest wish wins.
        *slot = Some(slot.map_or(at, |old| old.max(at)));
    }
}

/// No single request to a CA takes this long when the CA is up; without
/// it, a CA that accepts connections and never answers held an order for
/// its whole 5-minute deadline.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(30);

/// Whether a request to the CA went unanswered since the manager last
/// looked: the CA is then likely silent for every site, not just one.
#[derive(Clone, Default)]
pub struct Unanswered(Arc<AtomicBool>);

impl Unanswered {
    pub fn take(&self) -> bool {
        self.0.swap(false, Ordering::Relaxed)
    }

    pub fn note(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the CA did not answer within {0:?}")]
struct Silent(Duration);

/// RFC 9773 asks a CA to send `Retry-After` with renewal information, and
/// instant-acme refuses an answer without one, window (or the CA's problem
/// document) and all. Our only GETs are the directory and renewal
/// information, so a GET answered without it is given the six hours Let's
/// Encrypt sends.
const RENEWAL_INFO_RETRY_AFTER: &str = "21600";

struct Watched {
    inner: Box<dyn HttpClient>,
    retry_after: RetryAfter,
    unanswered: Unanswered,
    deadline: Duration,
}

impl HttpClient for Watched {
    fn request(
        &self,
        req: http::Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let get = req.method() == http::Method::GET;
        let response = self.inner.request(req);
        let (retry_after, unanswered) = (self.retry_after.clone(), self.unanswered.clone());
        let deadline = self.deadline;
        Box::pin(async move {
            let Ok(response) = tokio::time::timeout(deadline, response).await else {
                unanswered.note();
                return Err(instant_acme::Error::Other(Box::new(Silent(deadline))));
            };
            let mut response = response?;
            if let Some(at) = refusal_retry_after(&response.parts, SystemTime::now()) {
                retry_after.note(at);
            }
            let headers = &mut response.parts.headers;
            if get && !headers.contains_key(RETRY_AFTER) {
                let default = http::HeaderValue::from_static(RENEWAL_INFO_RETRY_AFTER);
                headers.insert(RETRY_AFTER, default);
            }
            Ok(response)
        })
    }
}

/// The client instant-acme would build (platform roots, or the roots in
/// `ca_file`), noting refusals' `Retry-After` into `retry_after` and
/// requests that outlive `REQUEST_DEADLINE` into `unanswered`.
pub fn build(
    ca_file: Option<&Path>,
    retry_after: RetryAfter,
    unanswered: Unanswered,
) -> Result<Box<dyn HttpClient>, instant_acme::Error> {
    let builder = match ca_file {
        Some(path) => {
            let roots = crate::certs::disk::roots_from_file(path).map_err(|e| {
                let message = format!("acme.ca_file {}: {e}", path.display());
                instant_acme::Error::Other(message.into())
            })?;
            HttpsConnectorBuilder::new().with_tls_config(
                rustls::ClientConfig::builder()
                    .with_root_certificates(roots)
                    .with_no_client_auth(),
            )
        }
        None => HttpsConnectorBuilder::new()
            .try_with_platform_verifier()
            .map_err(|e| instant_acme::Error::Other(e.into()))?,
    };
    let connector = builder.https_only().enable_http1().enable_http2().build();
    let inner: Client<_, BodyWrapper<Bytes>> =
        Client::builder(TokioExecutor::new()).build(connector);
    Ok(Box::new(Watched {
        inner: Box::new(inner),
        retry_after,
        unanswered,
        deadline: REQUEST_DEADLINE,
    }))
}

/// When a refusal asks to be retried, if it does.
fn refusal_retry_after(parts: &http::response::Parts, now: SystemTime) -> Option<SystemTime> {
    if !matches!(parts.status.as_u16(), 429 | 503) {
        return None;
    }
    let value = parts.headers.get(RETRY_AFTER)?.to_str().ok()?;
    parse_retry_after(value, now)
}

/// `Retry-After` is delay-seconds or an HTTP-date (RFC 9110, 10.2.3).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<SystemTime> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return now.checked_add(Duration::from_secs(seconds));
    }
    httpdate::parse_http_date(value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(status: u16, retry_after: Option<&str>) -> BytesResponse {
        let mut builder = http::Response::builder().status(status);
        if let Some(value) = retry_after {
            builder = builder.header(RETRY_AFTER, value);
        }
        BytesResponse::from(builder.body(String::new()).unwrap())
    }

    struct Answers(u16, Option<&'static str>);

    impl HttpClient for Answers {
        fn request(
            &self,
            _: http::Request<BodyWrapper<Bytes>>,
        ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>>
        {
            let (status, retry_after) = (self.0, self.1);
            Box::pin(async move { Ok(response(status, retry_after)) })
        }
    }

    #[tokio::test]
    async fn a_get_answered_without_retry_after_gets_six_hours() {
        let answer = |status, retry_after, method| async move {
            let client = Watched {
                inner: Box::new(Answers(status, retry_after)),
                retry_after: RetryAfter::default(),
                unanswered: Unanswered::default(),
                deadline: REQUEST_DEADLINE,
            };
            let mut request = http::Request::new(BodyWrapper::from(Vec::new()));
            *request.method_mut() = method;
            let response = client.request(request).await.unwrap();
            let value = response.parts.headers.get(RETRY_AFTER);
            value.map(|v| v.to_str().unwrap().to_string())
        };
        let get = http::Method::GET;
        assert_eq!(
            answer(200, None, get.clone()).await.as_deref(),
            Some("21600")
        );
        assert_eq!(
            answer(200, Some("60"), get.clone()).await.as_deref(),
            Some("60")
        );
        // So that instant-acme reads the CA's problem document.
        assert_eq!(answer(404, None, get).await.as_deref(), Some("21600"));
        assert_eq!(answer(200, None, http::Method::POST).await, None);
    }

    async fn noted(status: u16, retry_after: Option<&'static str>) -> Option<SystemTime> {
        let slot = RetryAfter::default();
        let client = Watched {
            inner: Box::new(Answers(status, retry_after)),
            retry_after: slot.clone(),
            unanswered: Unanswered::default(),
            deadline: REQUEST_DEADLINE,
        };
        let request = http::Request::new(BodyWrapper::from(Vec::new()));
        let answer = client.request(request).await.unwrap();
        assert_eq!(answer.parts.status.as_u16(), status, "passed through");
        slot.take()
    }

    #[tokio::test]
    async fn refusals_note_their_retry_after_and_answers_do_not() {
        let before = SystemTime::now();
        let at = noted(429, Some("3600")).await.expect("rate limited");
        let wait = at.duration_since(before).unwrap();
        assert!((3599..=3601).contains(&wait.as_secs()), "{wait:?}");
        assert!(
            noted(503, Some("Wed, 21 Oct 2099 07:28:00 GMT"))
                .await
                .is_some()
        );
        // A successful answer may carry Retry-After (polling, ARI): not a refusal.
        assert_eq!(noted(200, Some("3600")).await, None);
        assert_eq!(noted(429, None).await, None);
        assert_eq!(noted(429, Some("soon")).await, None);
    }

    struct Never;

    impl HttpClient for Never {
        fn request(
            &self,
            _: http::Request<BodyWrapper<Bytes>>,
        ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>>
        {
            Box::pin(std::future::pending())
        }
    }

    #[tokio::test]
    async fn a_request_without_an_answer_ends_at_its_deadline_and_is_noted() {
        let unanswered = Unanswered::default();
        let client = Watched {
            inner: Box::new(Never),
            retry_after: RetryAfter::default(),
            unanswered: unanswered.clone(),
            deadline: Duration::from_millis(20),
        };
        let request = http::Request::new(BodyWrapper::from(Vec::new()));
        let Err(e) = client.request(request).await else {
            panic!("a request nobody answered succeeded");
        };
        assert!(e.to_string().contains("did not answer within 20ms"), "{e}");
        assert!(unanswered.take());
        assert!(!unanswered.take(), "taken once");
    }

    #[test]
    fn retry_after_is_seconds_or_an_http_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(
            parse_retry_after(" 120 ", now),
            Some(now + Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777))
        );
        assert_eq!(parse_retry_after("-5", now), None);
        assert_eq!(parse_retry_after("", now), None);
    }

    #[test]
    fn an_unusable_ca_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("roots.pem");
        std::fs::write(&path, "not a certificate").unwrap();
        let Err(e) = build(Some(&path), RetryAfter::default(), Unanswered::default()) else {
            panic!("a file without a certificate was accepted");
        };
        let text = e.to_string();
        assert!(
            text.contains("acme.ca_file") && text.contains("roots.pem"),
            "{text}"
        );
    }

    #[test]
    fn the_latest_wish_wins() {
        let slot = RetryAfter::default();
        let early = SystemTime::UNIX_EPOCH + Duration::from_secs(10);
        let late = early + Duration::from_secs(10);
        slot.note(late);
        slot.note(early);
        assert_eq!(slot.take(), Some(late));
        assert_eq!(slot.take(), None);
    }
}
