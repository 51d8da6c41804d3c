//! Port 80 across three nodes: challenges answered anywhere in one hop,
//! redirects, limits. Real clients: curl and a small Rust client.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const IPS: [&str; 3] = ["127.0.0.2", "127.0.0.3", "127.0.0.4"];
const NAMES: [&str; 3] = ["a", "b", "c"];
const TOKEN: &str = "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0";

/// Three nodes; `config(node, dir)` gives each node's extra config
/// (`top`, `rest`).
async fn fleet(
    config: impl Fn(&str, &Path) -> (String, String),
) -> (Vec<Router>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let nodes: Vec<(&str, SocketAddr, SocketAddr)> = NAMES
        .iter()
        .zip(IPS)
        .map(|(name, ip)| (*name, free_addr(ip), free_addr(ip)))
        .collect();
    let mut routers = Vec::new();
    for name in NAMES {
        let (top, rest) = config(name, dir.path());
        routers.push(Router::start(&fleet_toml_http(name, &nodes, &top, &rest)).await);
    }
    (routers, dir)
}

fn challenge_path(token: &str) -> String {
    format!("/.well-known/acme-challenge/{token}")
}

#[tokio::test]
async fn a_token_held_by_one_node_is_answered_through_every_node() {
    let (routers, _dir) = fleet(|_, _| {
        (
            String::new(),
            held_site(&["acme.test"], &["b"], NOWHERE, ""),
        )
    })
    .await;
    routers[1]
        .handle
        .shared
        .challenges
        .insert(TOKEN, &format!("{TOKEN}.thumb"), Duration::from_secs(60))
        .unwrap();
    for router in &routers {
        let (status, _, body) =
            http_get(router.http_addr(), "acme.test", &challenge_path(TOKEN), "").await;
        assert_eq!(
            (status, body.as_str()),
            (200, format!("{TOKEN}.thumb").as_str())
        );
    }
    assert_eq!(
        routers
            .iter()
            .map(|r| r.http_forwarded())
            .collect::<Vec<_>>(),
        vec![1, 0, 1]
    );
    if have("curl") {
        let addr = routers[2].http_addr();
        let (_, out) = sh(format!(
            "curl -sS --max-time 10 --resolve acme.test:{port}:{ip} http://acme.test:{port}{path}",
            port = addr.port(),
            ip = addr.ip(),
            path = challenge_path(TOKEN)
        ))
        .await;
        assert_eq!(out, format!("{TOKEN}.thumb"));
    }
}

#[tokio::test]
async fn a_token_in_one_nodes_webroot_is_answered_through_every_node() {
    let (routers, dir) = fleet(|node, dir| {
        let top = if node == "c" {
            format!("[http]\nwebroot = \"{}\"", dir.join("webroot").display())
        } else {
            String::new()
        };
        (
            top,
            held_site(&["web.test", "*.web.test"], &["a", "c"], NOWHERE, ""),
        )
    })
    .await;
    let challenges = dir.path().join("webroot/.well-known/acme-challenge");
    std::fs::create_dir_all(&challenges).unwrap();
    std::fs::write(challenges.join(TOKEN), format!("{TOKEN}.fromdisk\n")).unwrap();
    for router in &routers {
        let (status, _, body) =
            http_get(router.http_addr(), "x.web.test", &challenge_path(TOKEN), "").await;
        assert_eq!(
            (status, body.as_str()),
            (200, format!("{TOKEN}.fromdisk").as_str())
        );
    }
}

#[tokio::test]
async fn a_missing_token_is_a_quick_404_and_conflicting_holders_forward_once() {
    // Each node believes the next one holds the name: a -> b -> c -> a.
    let (routers, _dir) = fleet(|node, _| {
        let holder = match node {
            "a" => "b",
            "b" => "c",
            _ => "a",
        };
        (
            String::new(),
            held_site(&["loop.test"], &[holder], NOWHERE, ""),
        )
    })
    .await;
    let started = Instant::now();
    let (status, _, _) = http_get(
        routers[0].http_addr(),
        "loop.test",
        &challenge_path("missing"),
        "",
    )
    .await;
    assert_eq!(status, 404);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let requests: Vec<u64> = routers.iter().map(|r| r.http_requests()).collect();
    assert_eq!(
        requests,
        vec![1, 1, 0],
        "one hop: a asked b, b answered from local state"
    );
    assert_eq!(routers[1].http_forwarded(), 0);
}

#[tokio::test]
async fn the_forwarded_mark_counts_only_from_nodes_and_forwarding_is_rate_limited() {
    let (routers, _dir) = fleet(|_, _| {
        (
            "[http]\nforward_per_second = 5".to_string(),
            held_site(&["busy.test"], &["b"], NOWHERE, ""),
        )
    })
    .await;
    // From a client (127.0.0.1 is no node), the mark is ignored: a still asks b.
    let mark = "sni-router-forwarded: 1\r\n";
    let (status, _, _) = http_get(
        routers[0].http_addr(),
        "busy.test",
        &challenge_path("t0"),
        mark,
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(routers[1].http_requests(), 1);
    // The same miss again is remembered; a flood of distinct tokens is capped.
    http_get(
        routers[0].http_addr(),
        "busy.test",
        &challenge_path("t0"),
        "",
    )
    .await;
    for i in 1..=40 {
        http_get(
            routers[0].http_addr(),
            "busy.test",
            &challenge_path(&format!("t{i}")),
            "",
        )
        .await;
    }
    let forwarded = routers[1].http_requests();
    assert!(
        (5..=13).contains(&forwarded),
        "b was asked {forwarded} times for 42 requests"
    );
    // Names outside the config are never forwarded.
    http_get(
        routers[0].http_addr(),
        "stranger.test",
        &challenge_path("zz"),
        "",
    )
    .await;
    assert_eq!(routers[1].http_requests(), forwarded);
}

#[tokio::test]
async fn stateless_mode_answers_any_token_for_configured_names() {
    let (routers, _dir) = fleet(|_, _| {
        (
            "[http]\nforward = false".into(),
            held_site(&["same.test"], &["a", "b"], NOWHERE, ""),
        )
    })
    .await;
    for router in &routers {
        router
            .handle
            .shared
            .challenges
            .set_thumbprint(Some("THUMB".into()));
    }
    let (status, _, body) = http_get(
        routers[2].http_addr(),
        "same.test",
        &challenge_path(TOKEN),
        "",
    )
    .await;
    assert_eq!((status, body), (200, format!("{TOKEN}.THUMB")));
    let (status, _, _) = http_get(
        routers[2].http_addr(),
        "other.test",
        &challenge_path(TOKEN),
        "",
    )
    .await;
    assert_eq!(status, 404, "only names in the config");
    assert_eq!(routers.iter().map(|r| r.http_forwarded()).sum::<u64>(), 0);
}

#[tokio::test]
async fn other_requests_redirect_with_path_and_query_kept() {
    let (routers, _dir) = fleet(|_, _| {
        (
            String::new(),
            held_site(&["www.test", "*.www.test"], &["a"], NOWHERE, ""),
        )
    })
    .await;
    let (status, head, _) = http_get(
        routers[1].http_addr(),
        "Deep.WWW.test:80",
        "/a/b?x=1&y=%20",
        "",
    )
    .await;
    assert_eq!(status, 308);
    assert!(
        head.to_lowercase()
            .contains("location: https://deep.www.test/a/b?x=1&y=%20"),
        "{head}"
    );
    let (status, _, _) = http_get(routers[1].http_addr(), "unknown.test", "/", "").await;
    assert_eq!(status, 404);
    if have("curl") {
        let addr = routers[0].http_addr();
        let (_, out) = sh(format!(
            "curl -sS -o /dev/null -w '%{{http_code}} %{{redirect_url}}' --max-time 10 \
             --resolve www.test:{port}:{ip} 'http://www.test:{port}/path?q=1'",
            port = addr.port(),
            ip = addr.ip()
        ))
        .await;
        assert_eq!(out, "308 https://www.test/path?q=1");
    }
}

#[tokio::test]
async fn bad_tokens_never_read_a_file() {
    let (routers, dir) = fleet(|_, dir| {
        (
            format!("[http]\nwebroot = \"{}\"", dir.join("webroot").display()),
            held_site(&["www.test"], &["a"], NOWHERE, ""),
        )
    })
    .await;
    let root = dir.path().join("webroot");
    std::fs::create_dir_all(root.join(".well-known/acme-challenge")).unwrap();
    std::fs::write(root.join(".well-known/secret"), "SECRET").unwrap();
    std::fs::write(dir.path().join("secret"), "SECRET").unwrap();
    for bad in [
        "../secret",
        "..%2Fsecret",
        "%2e%2e%2fsecret",
        "../../secret",
        "a/../../secret",
        "..",
    ] {
        let (status, _, body) =
            http_get(routers[0].http_addr(), "www.test", &challenge_path(bad), "").await;
        assert_eq!(status, 404, "{bad}");
        assert!(!body.contains("SECRET"), "{bad}");
    }
}

#[tokio::test]
async fn slow_malformed_and_oversized_heads_are_cut_off() {
    let (routers, _dir) = fleet(|_, _| {
        (
            "[timeouts]\nhttp_head = \"300ms\"".into(),
            held_site(&["www.test"], &["a"], NOWHERE, ""),
        )
    })
    .await;
    let addr = routers[0].http_addr();
    let mut slow = TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: www.te")
        .await
        .unwrap();
    let (reply, eof) = read_until_eof(&mut slow).await;
    assert!(eof && started.elapsed() < Duration::from_secs(3));
    assert!(String::from_utf8_lossy(&reply).starts_with("HTTP/1.1 408"));

    let mut big = TcpStream::connect(addr).await.unwrap();
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: www.test\r\nx-pad: {}\r\n\r\n",
        "a".repeat(10_000)
    );
    let _ = big.write_all(huge.as_bytes()).await;
    let (reply, eof) = read_until_eof(&mut big).await;
    assert!(eof);
    assert!(
        String::from_utf8_lossy(&reply).starts_with("HTTP/1.1 431"),
        "{}",
        String::from_utf8_lossy(&reply)
    );

    let mut junk = TcpStream::connect(addr).await.unwrap();
    junk.write_all(b"\x16\x03\x01\x02\x00garbage\r\n\r\n")
        .await
        .unwrap();
    let (reply, _) = read_until_eof(&mut junk).await;
    assert!(String::from_utf8_lossy(&reply).starts_with("HTTP/1.1 400"));

    let (status, _, _) = http_get(addr, "www.test", "/", "").await;
    assert_eq!(status, 308, "still serving");
}

#[tokio::test]
async fn http_upstream_mode_splices_plain_http() {
    let upstream = Backend::http("127.0.0.1").await;
    let (routers, _dir) = fleet(|_, _| {
        (
            String::new(),
            format!(
                "[[sites]]\nnames = [\"plain.test\"]\nheld_by = [\"b\"]\nupstream = \"{}\"\nhttp = \"upstream\"\nproxy_protocol = \"v1\"\n",
                upstream.addr
            ),
        )
    })
    .await;
    for router in &routers {
        let (status, _, body) = http_get(router.http_addr(), "plain.test", "/x", "").await;
        assert_eq!(status, 200);
        // The holder (b) sends the original client address upstream.
        assert!(
            body.contains("upstream saw: PROXY TCP4 127.0.0.1 "),
            "{body}"
        );
    }
}
