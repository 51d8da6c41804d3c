//! What the ACME manager reports for `/status`: a leaf the shared state
//! holds and the manager writes, so neither imports the other.

use std::time::SystemTime;

/// The CA's suggested renewal window (ARI): start and end.
pub type Window = (SystemTime, SystemTime);

/// A site's next renewal and the CA's window behind it.
#[derive(Debug, Clone, Copy)]
pub struct Renewal {
    pub at: SystemTime,
    pub window: Option<Window>,
}
