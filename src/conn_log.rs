//! The finished-connection line, written by hand. It is the one log line
//! per connection, and formatting it through `tracing`'s fmt layer cost a
//! third of the router's user-space instructions per routed connection
//! (field visitors, `dyn Display`, colour wrappers even without colour).
//! Here it is the same text, byte for byte, in the same sink: one copy into
//! a thread's buffer and one append to [`LogSink`].
//!
//! Only when the process logs through [`direct`] (the binary, without
//! colours); otherwise, e.g. in tests with their own subscriber, the line
//! goes through `tracing` as any other. Either way `RUST_LOG` decides
//! whether it is written (target `sni_router::conn`, level INFO).

use std::cell::RefCell;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::log_sink::LogSink;

/// The log format chosen by `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

static DIRECT: OnceLock<(LogSink, Format)> = OnceLock::new();

/// Writes connection lines straight to `sink` from now on, in `format`,
/// which must be the format the `tracing` subscriber writes to the same
/// sink (without colours).
pub fn direct(sink: LogSink, format: Format) {
    let _ = DIRECT.set((sink, format));
}

/// What one finished connection reports.
#[derive(Debug, Clone, Copy)]
pub struct Line<'a> {
    pub client: SocketAddr,
    pub via: SocketAddr,
    pub sni: Option<&'a str>,
    pub decision: &'static str,
    pub target: Option<SocketAddr>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub duration_ms: u64,
    pub end: &'a str,
}

/// Logs `line`, if `RUST_LOG` lets `sni_router::conn` log at INFO.
pub fn write(line: &Line<'_>) {
    if !tracing::enabled!(target: "sni_router::conn", tracing::Level::INFO) {
        return;
    }
    let Some((sink, format)) = DIRECT.get() else {
        return through_tracing(line);
    };
    thread_local! {
        static BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }
    BUF.with(|buf| {
        let Ok(mut buf) = buf.try_borrow_mut() else {
            return through_tracing(line);
        };
        buf.clear();
        match format {
            Format::Text => text(&mut buf, SystemTime::now(), line),
            Format::Json => json(&mut buf, SystemTime::now(), line),
        }
        sink.append(&buf);
    });
}

fn through_tracing(line: &Line<'_>) {
    tracing::info!(
        target: "sni_router::conn",
        client = %line.client,
        via = %line.via,
        sni = line.sni.unwrap_or("-"),
        decision = line.decision,
        target = %Target(line.target),
        bytes_up = line.bytes_up,
        bytes_down = line.bytes_down,
        duration_ms = line.duration_ms,
        end = %line.end,
        "connection finished"
    );
}

/// A target address, or `-`.
struct Target(Option<SocketAddr>);

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(addr) => addr.fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// A field's value, by how tracing records it: `%` fields as they
/// display, `&str` fields as strings, integers as numbers.
enum Value<'a> {
    Addr(SocketAddr),
    Target(Option<SocketAddr>),
    Text(&'a str),
    Str(&'a str),
    Number(u64),
}

/// The line's fields in order, for both formats; each is handed to
/// `field` as it comes (inlined: no list is built per line).
#[inline(always)]
fn fields(line: &Line<'_>, mut field: impl FnMut(&'static str, Value<'_>)) {
    field("client", Value::Addr(line.client));
    field("via", Value::Addr(line.via));
    field("sni", Value::Str(line.sni.unwrap_or("-")));
    field("decision", Value::Str(line.decision));
    field("target", Value::Target(line.target));
    field("bytes_up", Value::Number(line.bytes_up));
    field("bytes_down", Value::Number(line.bytes_down));
    field("duration_ms", Value::Number(line.duration_ms));
    field("end", Value::Text(line.end));
}

/// `tracing-subscriber`'s full text format: `&str` fields quoted as by
/// `Debug`, `%` fields as they display.
fn text(buf: &mut Vec<u8>, now: SystemTime, line: &Line<'_>) {
    timestamp(buf, now);
    buf.extend_from_slice(b"Z  INFO sni_router::conn: connection finished");
    fields(line, |name, value| {
        buf.push(b' ');
        buf.extend_from_slice(name.as_bytes());
        buf.push(b'=');
        match value {
            Value::Addr(a) => addr(buf, a),
            Value::Target(t) => target(buf, t),
            Value::Text(t) => buf.extend_from_slice(t.as_bytes()),
            Value::Str(s) => quoted(buf, s),
            Value::Number(n) => number(buf, n),
        }
    });
    buf.push(b'\n');
}

/// `tracing-subscriber`'s JSON format, fields in the order given.
fn json(buf: &mut Vec<u8>, now: SystemTime, line: &Line<'_>) {
    buf.extend_from_slice(b"{\"timestamp\":\"");
    timestamp(buf, now);
    buf.extend_from_slice(
        b"Z\",\"level\":\"INFO\",\"fields\":{\"message\":\"connection finished\"",
    );
    fields(line, |name, value| {
        buf.extend_from_slice(b",\"");
        buf.extend_from_slice(name.as_bytes());
        buf.extend_from_slice(b"\":");
        match value {
            // Addresses need no escaping; other text does.
            Value::Addr(a) => {
                buf.push(b'"');
                addr(buf, a);
                buf.push(b'"');
            }
            Value::Target(t) => {
                buf.push(b'"');
                target(buf, t);
                buf.push(b'"');
            }
            Value::Text(t) | Value::Str(t) => json_string(buf, t),
            Value::Number(n) => number(buf, n),
        }
    });
    buf.extend_from_slice(b"},\"target\":\"sni_router::conn\"}\n");
}

/// RFC 3339 in UTC to the microsecond, without the `Z` (the text format
/// has it in its next literal). The date part changes once a second: it
/// is kept per thread.
fn timestamp(buf: &mut Vec<u8>, now: SystemTime) {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    thread_local! {
        static SECOND: RefCell<(u64, [u8; 20])> = const { RefCell::new((u64::MAX, [0; 20])) };
    }
    SECOND.with(|second| {
        let mut second = second.borrow_mut();
        if second.0 != secs {
            *second = (secs, civil(secs));
        }
        buf.extend_from_slice(&second.1);
    });
    let micros = since.subsec_micros();
    let mut digits = [b'0'; 6];
    let mut rest = micros;
    for d in digits.iter_mut().rev() {
        *d = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    buf.extend_from_slice(&digits);
}

/// `YYYY-MM-DDTHH:MM:SS.` for seconds since the epoch (Howard Hinnant's
/// days-to-civil algorithm).
fn civil(secs: u64) -> [u8; 20] {
    let days = (secs / 86_400) as i64;
    let in_day = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut out = *b"0000-00-00T00:00:00.";
    let mut put = |at: usize, width: usize, mut value: u64| {
        for i in (at..at + width).rev() {
            if let Some(b) = out.get_mut(i) {
                *b = b'0' + (value % 10) as u8;
            }
            value /= 10;
        }
    };
    put(0, 4, year.clamp(0, 9999) as u64);
    put(5, 2, month as u64);
    put(8, 2, day as u64);
    put(11, 2, in_day / 3600);
    put(14, 2, in_day / 60 % 60);
    put(17, 2, in_day % 60);
    out
}

fn number(buf: &mut Vec<u8>, n: u64) {
    buf.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// An address as `Display` writes it; IPv4 by hand, the common case.
fn addr(buf: &mut Vec<u8>, addr: SocketAddr) {
    match addr {
        SocketAddr::V4(v4) => {
            for (i, octet) in v4.ip().octets().iter().enumerate() {
                if i > 0 {
                    buf.push(b'.');
                }
                buf.extend_from_slice(itoa::Buffer::new().format(*octet).as_bytes());
            }
            buf.push(b':');
            buf.extend_from_slice(itoa::Buffer::new().format(v4.port()).as_bytes());
        }
        SocketAddr::V6(v6) => {
            let _ = write!(buf, "{v6}");
        }
    }
}

fn target(buf: &mut Vec<u8>, target: Option<SocketAddr>) {
    match target {
        Some(a) => addr(buf, a),
        None => buf.push(b'-'),
    }
}

/// As `{:?}` writes a `&str`; without a byte to escape, a plain copy.
fn quoted(buf: &mut Vec<u8>, s: &str) {
    let plain = s
        .bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\');
    if plain {
        buf.push(b'"');
        buf.extend_from_slice(s.as_bytes());
        buf.push(b'"');
    } else {
        let _ = write!(buf, "{s:?}");
    }
}

fn json_string(buf: &mut Vec<u8>, s: &str) {
    let _ = serde_json::to_writer(&mut *buf, s);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A `MakeWriter` the test reads back.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }

    /// What tracing's own formatter writes for `line`, without the
    /// timestamp (the part before the first space), in `format`.
    fn by_tracing(line: &Line<'_>, format: Format) -> String {
        let out = Captured::default();
        let builder = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(out.clone());
        match format {
            Format::Text => {
                tracing::subscriber::with_default(builder.finish(), || through_tracing(line))
            }
            Format::Json => {
                tracing::subscriber::with_default(builder.json().finish(), || through_tracing(line))
            }
        }
        String::from_utf8(out.0.lock().unwrap().clone()).unwrap()
    }

    fn by_hand(line: &Line<'_>, format: Format) -> String {
        let mut buf = Vec::new();
        let now = SystemTime::now();
        match format {
            Format::Text => text(&mut buf, now, line),
            Format::Json => json(&mut buf, now, line),
        }
        String::from_utf8(buf).unwrap()
    }

    fn lines() -> Vec<Line<'static>> {
        let base = Line {
            client: "203.0.113.7:50123".parse().unwrap(),
            via: "127.0.0.3:41000".parse().unwrap(),
            sni: Some("pass.test"),
            decision: "passthrough",
            target: Some("127.0.0.1:19001".parse().unwrap()),
            bytes_up: 1484,
            bytes_down: 1024,
            duration_ms: 0,
            end: "closed",
        };
        vec![
            base,
            Line {
                client: "[2001:db8::1]:443".parse().unwrap(),
                via: "[::1]:9".parse().unwrap(),
                sni: None,
                decision: "reject",
                target: None,
                bytes_up: u64::MAX,
                bytes_down: 0,
                duration_ms: 12_345,
                end: "connect_error: connect to 10.0.0.1:443: \"refused\" \\ é\n",
            },
            Line {
                sni: Some("we\"ird\\name\u{7f}é"),
                client: "0.0.0.0:0".parse().unwrap(),
                via: "255.255.255.255:65535".parse().unwrap(),
                ..base
            },
        ]
    }

    #[test]
    fn the_text_line_is_tracings_byte_for_byte() {
        for line in lines() {
            let ours = by_hand(&line, Format::Text);
            let theirs = by_tracing(&line, Format::Text);
            let after_time = |s: &str| s.split_once(' ').unwrap().1.to_string();
            assert_eq!(after_time(&ours), after_time(&theirs));
        }
    }

    #[test]
    fn the_json_line_is_tracings() {
        for line in lines() {
            let mut ours: serde_json::Value =
                serde_json::from_str(&by_hand(&line, Format::Json)).unwrap();
            let mut theirs: serde_json::Value =
                serde_json::from_str(&by_tracing(&line, Format::Json)).unwrap();
            for v in [&mut ours, &mut theirs] {
                v.as_object_mut().unwrap().remove("timestamp").unwrap();
            }
            assert_eq!(ours, theirs);
            // The same keys in the same order, too.
            let keys = |s: &str| {
                s.split('"')
                    .skip(1)
                    .step_by(2)
                    .filter(|k| k.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
                    .take(8)
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            };
            let (o, t) = (
                by_hand(&line, Format::Json),
                by_tracing(&line, Format::Json),
            );
            assert_eq!(keys(&o), keys(&t));
        }
    }

    #[test]
    fn timestamps_are_rfc3339_utc_to_the_microsecond() {
        let at = |secs: u64, micros: u32| {
            let mut buf = Vec::new();
            timestamp(
                &mut buf,
                UNIX_EPOCH + std::time::Duration::new(secs, micros * 1000),
            );
            String::from_utf8(buf).unwrap()
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000");
        assert_eq!(at(951_782_400, 7), "2000-02-29T00:00:00.000007");
        assert_eq!(at(1_796_189_541, 50_148), "2026-12-02T05:32:21.050148");
        assert_eq!(at(4_102_444_799, 999_999), "2099-12-31T23:59:59.999999");
        // And as tracing writes them, now.
        let ours = by_hand(&lines()[0], Format::Text);
        let theirs = by_tracing(&lines()[0], Format::Text);
        assert_eq!(ours.find(' '), theirs.find(' '));
    }
}
