//! Captures the ClientHello a rustls client sends (with its default
//! post-quantum key share), for test fixtures and fuzz seeds:
//! `cargo run --example capture_hello -- NAME OUT.bin`

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::Arc;

use rustls::pki_types::ServerName;

fn main() {
    let mut args = std::env::args().skip(1);
    let name = args.next().unwrap_or_else(|| "pass.test".into());
    let out = args.next().unwrap_or_else(|| "hello.bin".into());
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let client = std::thread::spawn(move || {
        let mut config = rustls::ClientConfig::builder()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let server = ServerName::try_from(name).expect("name");
        let mut conn = rustls::ClientConnection::new(Arc::new(config), server).expect("client");
        let mut sock = std::net::TcpStream::connect(addr).expect("connect");
        conn.write_tls(&mut sock).expect("write hello");
        sock.flush().ok();
    });
    let (mut sock, _) = listener.accept().expect("accept");
    let mut hello = Vec::new();
    loop {
        let mut buf = [0u8; 4096];
        let n = sock.read(&mut buf).expect("read");
        hello.extend_from_slice(&buf[..n]);
        if n == 0
            || matches!(
                sni_router::tls::client_hello::parse(&hello),
                sni_router::tls::client_hello::Parse::Complete(_)
            )
        {
            break;
        }
    }
    client.join().expect("client thread");
    std::fs::write(&out, &hello).expect("write file");
    println!("{} bytes -> {out}", hello.len());
}
