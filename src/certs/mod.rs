//! Certificates: PEM files on disk (`disk`, watched by `watch`) and ACME
//! orders (`crate::acme`) feed one live store that every handshake reads.

pub mod disk;
pub mod store;
pub mod watch;
