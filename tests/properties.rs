//! Properties of the ClientHello reader over many generated cases.

mod support;

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use proptest::prelude::*;
use sni_router::preface::{self, PrefaceError};
use sni_router::tls::client_hello::{ClientHello, MAX_HELLO_BYTES, Parse, parse};
use support::HELLO;
use tokio::io::{AsyncRead, ReadBuf};

/// Yields the given segments one read at a time, then EOF (or endless
/// filler when `endless`), counting what it hands out.
struct Segments {
    segments: Vec<Vec<u8>>,
    next: usize,
    endless: Option<u8>,
    given: usize,
}

impl AsyncRead for Segments {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let chunk = match this.segments.get(this.next) {
            Some(segment) => segment.clone(),
            None => match this.endless {
                Some(byte) => vec![byte; 4096],
                None => return Poll::Ready(Ok(())),
            },
        };
        let n = chunk.len().min(buf.remaining());
        buf.put_slice(&chunk[..n]);
        this.given += n;
        if n == chunk.len() {
            this.next += 1;
        } else if let Some(segment) = this.segments.get_mut(this.next) {
            segment.drain(..n);
        }
        Poll::Ready(Ok(()))
    }
}

fn segment(bytes: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    points.push(0);
    points.push(bytes.len());
    points.sort_unstable();
    points.dedup();
    points
        .windows(2)
        .map(|w| bytes[w[0]..w[1]].to_vec())
        .collect()
}

/// Re-frames the captured hello into records split at `cuts`.
fn reframe(cuts: &[usize]) -> Vec<u8> {
    let body = &HELLO[5..];
    segment(body, cuts)
        .into_iter()
        .flat_map(|part| [&HELLO[..3], &(part.len() as u16).to_be_bytes()[..], &part].concat())
        .collect()
}

fn read(segments: Vec<Vec<u8>>, endless: Option<u8>) -> (Result<ClientHello, String>, usize) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut reader = Segments {
            segments,
            next: 0,
            endless,
            given: 0,
        };
        let result =
            preface::read::<ClientHello, _>(&mut reader, false, Duration::from_secs(5)).await;
        let result = result
            .map(|p| p.parsed)
            .map_err(|e: PrefaceError<_>| e.to_string());
        (result, reader.given)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_segmentation_and_record_split_gives_the_same_sni(
        record_cuts in prop::collection::vec(any::<usize>(), 0..12),
        segment_cuts in prop::collection::vec(any::<usize>(), 0..40),
    ) {
        let bytes = reframe(&record_cuts);
        let (result, _) = read(segment(&bytes, &segment_cuts), None);
        let hello = result.unwrap();
        prop_assert_eq!(hello.sni.as_deref(), Some("pass.test"));
        prop_assert_eq!(hello.len, bytes.len());
    }

    #[test]
    fn reassembly_never_reads_past_the_cap(filler in any::<u8>(), header in prop::collection::vec(any::<u8>(), 0..16)) {
        // A record header announcing the largest record, then endless bytes.
        let start = [vec![0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x00, 0x3f, 0xff], header].concat();
        let (_, given) = read(vec![start], Some(filler));
        prop_assert!(given <= MAX_HELLO_BYTES, "read {} bytes", given);
    }

    #[test]
    fn the_parser_never_returns_a_name_that_is_not_in_the_bytes(
        flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..6),
    ) {
        let mut bytes = HELLO.to_vec();
        for (at, bit) in flips {
            let at = at % bytes.len();
            bytes[at] ^= 1 << (bit % 8);
        }
        if let Parse::Complete(hello) = parse(&bytes)
            && let Some(sni) = hello.sni
        {
            let lower = bytes.to_ascii_lowercase();
            prop_assert!(lower.windows(sni.len()).any(|w| w == sni.as_bytes()), "{} not in input", sni);
        }
    }
}
