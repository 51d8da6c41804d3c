//! The splice engine over real sockets: quiet joined pairs handed over from
//! their task and held in an epoll set, ended by EOF both ways, errors or
//! the idle time; and the task join they leave, going quiet or idle.
#![cfg(target_os = "linux")]

use std::time::Duration;

mod support;

use sni_router::splice::engine::Engines;
use sni_router::splice::{Done, End, JoinEnd, Mode, Moved, QuietPair, Side, TcpJoin, Transfer};
use support::segments_in;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(10);

/// A client and a target, each connected to the router's end of a pair
/// that one engine joins. Returns the test's ends and the pair's outcome.
async fn joined(
    engines: &Engines,
    idle: Duration,
) -> (TcpStream, TcpStream, oneshot::Receiver<Transfer>) {
    let (client, accepted, outbound, backend) = sockets().await;
    let (tx, rx) = oneshot::channel();
    let finish = Box::new(move |transfer| {
        let _ = tx.send(transfer);
    });
    let quiet = QuietPair {
        client: accepted,
        target: outbound,
        moved: Moved::default(),
        done: Done::default(),
        quiet_for: Duration::ZERO,
        idle,
    };
    let engine = engines.pick().expect("an engine").clone();
    engine.adopt(quiet, finish);
    (client, backend, rx)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

async fn read_to_end(stream: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    timeout(WAIT, stream.read_to_end(&mut got))
        .await
        .expect("EOF in time")
        .unwrap();
    got
}

/// Sends 8 single bytes `from` -> `to`, one every `gap`, and checks after
/// each that the pair is still `open`.
async fn trickle(
    from: &mut TcpStream,
    to: &mut TcpStream,
    gap: Duration,
    mut open: impl FnMut() -> bool,
) {
    let mut byte = [0u8; 1];
    for i in 0..8u8 {
        from.write_all(&[i]).await.unwrap();
        timeout(WAIT, to.read_exact(&mut byte))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(byte[0], i);
        tokio::time::sleep(gap).await;
        assert!(open(), "the pair ended or went quiet while bytes moved");
    }
}

fn engines() -> Engines {
    let engines = Engines::new(2);
    engines.start();
    engines
}

/// Only an engine whose epoll set tokio watches takes pairs: before that
/// (or if the runtime refuses it) pairs stay in their tasks, not stall.
#[tokio::test]
async fn only_watched_engines_take_pairs() {
    let engines = Engines::new(2);
    assert!(!engines.available());
    assert!(engines.pick().is_none());
    engines.start();
    assert!(engines.available());
    assert!(engines.pick().is_some());
}

#[tokio::test]
async fn megabytes_cross_both_ways_with_half_close_and_the_pair_ends_closed() {
    let engines = engines();
    let (mut client, mut backend, done) = joined(&engines, Duration::from_secs(30)).await;
    let up = pattern(3 << 20, 7);
    let down = pattern(2 << 20, 9);
    let (send_up, send_down) = (up.clone(), down.clone());
    let writer = tokio::spawn(async move {
        client.write_all(&send_up).await.unwrap();
        // Half-close: the reply must still arrive.
        client.shutdown().await.unwrap();
        read_to_end(&mut client).await
    });
    let got_up = read_to_end(&mut backend).await;
    assert!(got_up == up, "client bytes arrived changed or short");
    backend.write_all(&send_down).await.unwrap();
    drop(backend);
    let got_down = timeout(WAIT, writer).await.unwrap().unwrap();
    assert!(got_down == down, "target bytes arrived changed or short");
    let transfer = timeout(WAIT, done).await.unwrap().unwrap();
    assert!(matches!(transfer.end, End::Closed), "{:?}", transfer.end);
    assert_eq!(
        (transfer.to_target, transfer.to_client),
        (up.len() as u64, down.len() as u64)
    );
    assert!(engines.is_empty());
}

#[tokio::test]
async fn a_quiet_pair_ends_at_its_idle_time_and_both_ends_see_eof() {
    let engines = engines();
    let idle = Duration::from_millis(300);
    let started = tokio::time::Instant::now();
    let (mut client, mut backend, done) = joined(&engines, idle).await;
    let transfer = timeout(WAIT, done).await.unwrap().unwrap();
    assert!(matches!(transfer.end, End::Idle), "{:?}", transfer.end);
    assert!(started.elapsed() >= idle);
    assert!(read_to_end(&mut client).await.is_empty());
    assert!(read_to_end(&mut backend).await.is_empty());
    assert!(engines.is_empty());
}

#[tokio::test]
async fn traffic_keeps_a_pair_past_its_idle_time() {
    let engines = engines();
    let idle = Duration::from_millis(400);
    let (mut client, mut backend, mut done) = joined(&engines, idle).await;
    let gap = Duration::from_millis(150);
    trickle(&mut client, &mut backend, gap, || done.try_recv().is_err()).await;
    let transfer = timeout(WAIT, done).await.unwrap().unwrap();
    assert!(matches!(transfer.end, End::Idle), "{:?}", transfer.end);
    assert_eq!(transfer.to_target, 8);
}

#[tokio::test]
async fn a_reset_target_ends_the_pair_as_a_target_error() {
    let engines = engines();
    let (mut client, backend, done) = joined(&engines, Duration::from_secs(30)).await;
    // Unread bytes at close make the kernel send a reset, not a FIN.
    client.write_all(b"unread").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    socket2::SockRef::from(&backend)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(backend);
    let transfer = timeout(WAIT, done).await.unwrap().unwrap();
    assert!(
        matches!(transfer.end, End::Error(Side::Target, _)),
        "{:?}",
        transfer.end
    );
    assert!(read_to_end(&mut client).await.is_empty());
}

#[tokio::test]
async fn hundreds_of_pairs_share_the_engines() {
    let engines = engines();
    let mut pairs = Vec::new();
    for _ in 0..300 {
        pairs.push(joined(&engines, Duration::from_secs(30)).await);
    }
    assert_eq!(engines.len(), 300);
    for (i, (mut client, mut backend, done)) in pairs.into_iter().enumerate() {
        let message = format!("pair {i}");
        client.write_all(message.as_bytes()).await.unwrap();
        client.shutdown().await.unwrap();
        assert_eq!(read_to_end(&mut backend).await, message.as_bytes());
        backend.write_all(b"ok").await.unwrap();
        drop(backend);
        assert_eq!(read_to_end(&mut client).await, b"ok");
        let transfer = timeout(WAIT, done).await.unwrap().unwrap();
        assert!(matches!(transfer.end, End::Closed), "{:?}", transfer.end);
    }
    assert!(engines.is_empty());
}

/// Two connected socket pairs: (test's client end, router's client side,
/// router's target side, test's backend end).
async fn sockets() -> (TcpStream, TcpStream, TcpStream, TcpStream) {
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let back = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(front.local_addr().unwrap())
        .await
        .unwrap();
    let (accepted, _) = front.accept().await.unwrap();
    let outbound = TcpStream::connect(back.local_addr().unwrap())
        .await
        .unwrap();
    let (backend, _) = back.accept().await.unwrap();
    (client, accepted, outbound, backend)
}

#[tokio::test]
async fn a_quiet_join_hands_over_and_the_engine_carries_on_counting() {
    let engines = engines();
    let (mut client, accepted, outbound, mut backend) = sockets().await;
    let quiet = Duration::from_millis(200);
    let join =
        TcpJoin::new(accepted, outbound, Duration::from_secs(30), Mode::Splice).quiet_after(quiet);
    let task = tokio::spawn(join);
    // A half-close before the hand-over must carry over too.
    client.write_all(b"before").await.unwrap();
    client.shutdown().await.unwrap();
    let mut got = [0u8; 6];
    backend.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"before");
    let JoinEnd::Quiet(handed) = timeout(WAIT, task).await.unwrap().unwrap() else {
        panic!("the join ended instead of going quiet");
    };
    assert_eq!(
        handed.moved,
        Moved {
            to_target: 6,
            to_client: 0
        }
    );
    assert_eq!(
        handed.done,
        Done {
            up: true,
            down: false
        }
    );
    assert!(handed.quiet_for >= quiet);
    let (tx, done) = oneshot::channel();
    let finish = Box::new(move |transfer| {
        let _ = tx.send(transfer);
    });
    engines.pick().unwrap().clone().adopt(handed, finish);
    assert_eq!(read_to_end(&mut backend).await, b"");
    backend.write_all(b"after").await.unwrap();
    drop(backend);
    assert_eq!(read_to_end(&mut client).await, b"after");
    let transfer = timeout(WAIT, done).await.unwrap().unwrap();
    assert!(matches!(transfer.end, End::Closed), "{:?}", transfer.end);
    assert_eq!((transfer.to_target, transfer.to_client), (6, 5));
}

#[tokio::test]
async fn a_busy_join_never_goes_quiet() {
    let (mut client, accepted, outbound, mut backend) = sockets().await;
    let join = TcpJoin::new(accepted, outbound, Duration::from_secs(30), Mode::Splice)
        .quiet_after(Duration::from_millis(300));
    let task = tokio::spawn(join);
    let gap = Duration::from_millis(100);
    trickle(&mut client, &mut backend, gap, || !task.is_finished()).await;
    drop(client);
    drop(backend);
    let joint = timeout(WAIT, task).await.unwrap().unwrap();
    assert!(matches!(joint, JoinEnd::Ended(_)));
}

/// The task join's idle timer only notes the time while bytes move, and
/// moves itself on when it fires early: it must still end a pair exactly
/// `idle` after its last byte, and never while bytes move.
#[tokio::test]
async fn a_task_join_ends_idle_after_its_last_byte_not_its_first() {
    let (mut client, accepted, outbound, mut backend) = sockets().await;
    let idle = Duration::from_millis(300);
    let task = tokio::spawn(TcpJoin::new(accepted, outbound, idle, Mode::Splice));
    let gap = Duration::from_millis(100);
    trickle(&mut backend, &mut client, gap, || !task.is_finished()).await;
    let last_byte = tokio::time::Instant::now();
    let JoinEnd::Ended(transfer) = timeout(WAIT, task).await.unwrap().unwrap() else {
        panic!("a join without a quiet time went quiet");
    };
    let waited = last_byte.elapsed();
    assert!(matches!(transfer.end, End::Idle), "{:?}", transfer.end);
    assert!(
        waited >= Duration::from_millis(150) && waited < Duration::from_secs(2),
        "ended {waited:?} after the last byte"
    );
    assert_eq!(transfer.to_client, 8);
}

/// A reply that arrives with its FIN is read to the end before it is
/// written, so the last bytes and the half-close leave in one segment,
/// whichever way the bytes are moved.
#[tokio::test]
async fn a_reply_and_its_fin_leave_in_one_segment() {
    for mode in [Mode::Splice, Mode::Copy] {
        let (mut client, accepted, outbound, mut backend) = sockets().await;
        let reply = pattern(1024, 7);
        backend.write_all(&reply).await.unwrap();
        backend.shutdown().await.unwrap();
        let before = segments_in(&client);
        let task = tokio::spawn(TcpJoin::new(
            accepted,
            outbound,
            Duration::from_secs(30),
            mode,
        ));
        assert_eq!(read_to_end(&mut client).await, reply, "{mode:?}");
        assert_eq!(segments_in(&client) - before, 1, "{mode:?}");
        client.shutdown().await.unwrap();
        let JoinEnd::Ended(transfer) = timeout(WAIT, task).await.unwrap().unwrap() else {
            panic!("{mode:?}: the join went quiet");
        };
        assert!(matches!(transfer.end, End::Closed), "{:?}", transfer.end);
        assert_eq!(transfer.to_client, 1024);
    }
}

/// More than one read's worth arrives before the FIN: every byte crosses
/// in order, whichever way the bytes are moved.
#[tokio::test]
async fn a_long_reply_read_ahead_before_its_fin_arrives_whole() {
    for mode in [Mode::Splice, Mode::Copy] {
        let (mut client, accepted, outbound, mut backend) = sockets().await;
        let reply = pattern(3 << 20, 9);
        let writer = {
            let reply = reply.clone();
            tokio::spawn(async move {
                backend.write_all(&reply).await.unwrap();
                backend.shutdown().await.unwrap();
                backend
            })
        };
        let task = tokio::spawn(TcpJoin::new(
            accepted,
            outbound,
            Duration::from_secs(30),
            mode,
        ));
        assert!(read_to_end(&mut client).await == reply, "{mode:?}");
        drop(client);
        let _backend = timeout(WAIT, writer).await.unwrap().unwrap();
        let JoinEnd::Ended(transfer) = timeout(WAIT, task).await.unwrap().unwrap() else {
            panic!("{mode:?}: the join went quiet");
        };
        assert_eq!(transfer.to_client, 3 << 20, "{mode:?}");
    }
}
