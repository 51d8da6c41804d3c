//! Port 443: read the ClientHello without decrypting, decide, then splice
//! (or, for names this node holds, terminate).

pub mod client_hello;
pub mod handler;
pub mod route;
pub mod prefixed;
pub mod suites;
pub mod terminate;
