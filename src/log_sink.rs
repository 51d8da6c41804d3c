//! Where log lines go: a shared buffer that one writer thread empties to
//! stderr in batches. A connection's line costs a lock and a copy on the
//! worker, not a `write(2)`; a slow stderr (a stalled journald, a full
//! pipe) never blocks a worker: past `CAP` bytes waiting, lines are
//! dropped and counted, and the count is written when the writer catches
//! up.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Bytes of log lines waiting at most; then lines are dropped.
const CAP: usize = 1 << 20;
/// The least time between two writes: a line that finds the writer idle
/// for longer goes out at once; under a stream of lines they gather for
/// up to this long and go out together. Each write costs the worker a
/// futex wake, and the writer a sleep and a `write`: writing every 2 ms,
/// that was 0.8 us of a 44 us connection at 16k connections/s.
const LINGER: Duration = Duration::from_millis(10);

#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    dropped: u64,
    closed: bool,
}

#[derive(Default)]
struct Inner {
    pending: Mutex<Pending>,
    ready: Condvar,
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The `MakeWriter` for tracing: each event's formatted line is appended
/// to the shared buffer in one piece.
#[derive(Clone)]
pub struct LogSink {
    inner: Arc<Inner>,
}

/// Flushes what is waiting and stops the writer thread when dropped: hold
/// it until the process ends.
pub struct Flush {
    inner: Arc<Inner>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl LogSink {
    /// A sink writing to `out` from a thread of its own.
    pub fn start(mut out: impl Write + Send + 'static) -> (LogSink, Flush) {
        let inner = Arc::new(Inner::default());
        let shared = inner.clone();
        let writer = std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || {
                let mut batch = Vec::new();
                let mut last_write: Option<std::time::Instant> = None;
                loop {
                    let dropped = {
                        let mut pending = shared.lock();
                        while pending.bytes.is_empty() && !pending.closed {
                            pending = shared
                                .ready
                                .wait(pending)
                                .unwrap_or_else(|p| p.into_inner());
                        }
                        if pending.bytes.is_empty() {
                            return; // closed, and all written
                        }
                        let since = last_write.map_or(LINGER, |t| t.elapsed());
                        if !pending.closed && since < LINGER {
                            drop(pending);
                            std::thread::sleep(LINGER - since);
                            pending = shared.lock();
                        }
                        std::mem::swap(&mut batch, &mut pending.bytes);
                        std::mem::take(&mut pending.dropped)
                    };
                    let _ = out.write_all(&batch);
                    if dropped > 0 {
                        let _ = writeln!(
                            out,
                            "{dropped} log lines dropped: the log output was too slow"
                        );
                    }
                    let _ = out.flush();
                    last_write = Some(std::time::Instant::now());
                    batch.clear();
                }
            })
            .ok();
        let flush = Flush {
            inner: inner.clone(),
            writer,
        };
        (LogSink { inner }, flush)
    }
}

impl LogSink {
    /// Appends one whole line (or several), or counts it dropped.
    pub fn append(&self, line: &[u8]) {
        let mut pending = self.inner.lock();
        if pending.bytes.len() + line.len() > CAP {
            pending.dropped += 1;
            return;
        }
        let first = pending.bytes.is_empty();
        pending.bytes.extend_from_slice(line);
        drop(pending);
        // The writer sleeps only while nothing waits: one wake per batch.
        if first {
            self.inner.ready.notify_one();
        }
    }
}

impl Write for LogSink {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        self.append(line);
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogSink {
    type Writer = LogSink;

    fn make_writer(&'a self) -> LogSink {
        self.clone()
    }
}

impl Drop for Flush {
    fn drop(&mut self) {
        self.inner.lock().closed = true;
        self.inner.ready.notify_one();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer the test can read, that takes `delay` per call.
    #[derive(Clone, Default)]
    struct Slow {
        written: Arc<Mutex<Vec<u8>>>,
        calls: Arc<Mutex<usize>>,
        delay: Duration,
    }

    impl Write for Slow {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            std::thread::sleep(self.delay);
            *self.calls.lock().unwrap() += 1;
            self.written.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_arrive_whole_in_order_in_few_writes_and_all_on_drop() {
        let out = Slow::default();
        let (mut sink, flush) = LogSink::start(out.clone());
        for i in 0..1000 {
            sink.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        drop(flush);
        let text = String::from_utf8(out.written.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1000);
        assert!(
            lines
                .iter()
                .enumerate()
                .all(|(i, l)| *l == format!("line {i}"))
        );
        assert!(*out.calls.lock().unwrap() < 100, "batched");
    }

    #[test]
    fn a_stalled_output_drops_and_counts_lines_instead_of_blocking() {
        let out = Slow {
            delay: Duration::from_millis(300),
            ..Slow::default()
        };
        let (mut sink, flush) = LogSink::start(out.clone());
        let line = vec![b'x'; 1023]
            .into_iter()
            .chain([b'\n'])
            .collect::<Vec<u8>>();
        let started = std::time::Instant::now();
        for _ in 0..3000 {
            sink.write_all(&line).unwrap();
        }
        assert!(
            started.elapsed() < Duration::from_millis(250),
            "the caller never waits"
        );
        drop(flush);
        let text = String::from_utf8(out.written.lock().unwrap().clone()).unwrap();
        assert!(text.contains("log lines dropped"), "{}", text.len());
    }
}
