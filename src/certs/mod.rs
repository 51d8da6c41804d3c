//! Certificates: loaded from PEM files (and, later, ACME) into one live
//! store that the TLS handshake reads.

pub mod disk;
pub mod store;
pub mod watch;
