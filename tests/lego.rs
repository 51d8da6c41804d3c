//! An unmodified external ACME client (lego, `--http.webroot` on one node)
//! gets a certificate from Pebble while the name's DNS points at another.

mod support;

use std::net::SocketAddr;

use support::pebble::{Options, Pebble};
use support::*;

#[tokio::test]
async fn lego_with_a_webroot_on_one_node_is_validated_through_another() {
    if !have("pebble") || !have("lego") {
        return;
    }
    let pebble = Pebble::start(Options::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let webroot = dir.path().join("webroot");
    std::fs::create_dir_all(&webroot).unwrap();
    // Every node's HTTP listener is on Pebble's validation port.
    let nodes: Vec<(&str, SocketAddr, SocketAddr)> =
        [("a", "127.0.0.2"), ("b", "127.0.0.3"), ("c", "127.0.0.4")]
            .into_iter()
            .map(|(name, ip)| {
                (
                    name,
                    free_addr(ip),
                    SocketAddr::new(ip.parse().unwrap(), pebble.http_port),
                )
            })
            .collect();
    let site =
        "[[sites]]\nnames = [\"lego.test\"]\nheld_by = [\"a\"]\nupstream = \"127.0.0.1:9\"\n";
    let mut routers = Vec::new();
    for (name, _, _) in &nodes {
        let top = if *name == "a" {
            format!("[http]\nwebroot = \"{}\"", webroot.display())
        } else {
            String::new()
        };
        routers.push(Router::start(&fleet_toml_http(name, &nodes, &top, site)).await);
    }
    // The CA's validation lands on b, which has neither the token nor the webroot.
    pebble.add_a("lego.test", "127.0.0.3").await;
    let (ok, out) = sh(format!(
        "LEGO_CA_CERTIFICATES={ca} timeout 90 lego --server {dir_url} --email ops@lego.test \
         --accept-tos --domains lego.test --http --http.webroot {webroot} --path {path} run 2>&1",
        ca = pebble.ca_file.display(),
        dir_url = pebble.directory,
        webroot = webroot.display(),
        path = dir.path().join("lego").display(),
    ))
    .await;
    assert!(ok, "lego failed:\n{out}\npebble:\n{}", pebble.log());
    let cert = dir.path().join("lego/certificates/lego.test.crt");
    let (ok, text) = sh(format!(
        "openssl x509 -in {} -noout -ext subjectAltName",
        cert.display()
    ))
    .await;
    assert!(ok && text.contains("DNS:lego.test"), "{text}");
    assert!(
        routers[1].http_forwarded() >= 1,
        "b forwarded the validation to a"
    );
    assert_eq!(routers[0].http_forwarded(), 0);
}
