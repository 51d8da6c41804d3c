//! Certificates: PEM files on disk (`disk`, watched by `watch`), the
//! internal CA's leaves (`internal`) and ACME orders (`crate::acme`) feed
//! one live store that every handshake reads.

pub mod disk;
pub mod internal;
pub mod store;
pub mod watch;
