//! What ACME leaves on disk under `state_dir`: the account, and per site the
//! chain, key and what was ordered. Written atomically (temp file, fsync,
//! rename), private files 0600; read back at start so a restart does not
//! order again.

use std::path::{Path, PathBuf};

use instant_acme::AccountCredentials;

use crate::certs::disk;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct StorageError {
    pub path: PathBuf,
    pub message: String,
}

fn error(path: &Path, message: impl ToString) -> StorageError {
    StorageError {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// The account file: instant-acme's credentials plus the key thumbprint,
/// so a node with a copied account can answer challenges before it has
/// talked to the CA.
#[derive(Serialize, Deserialize)]
pub struct AccountFile {
    pub directory: String,
    pub thumbprint: String,
    pub credentials: AccountCredentials,
}

/// What a stored certificate was ordered for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub identifiers: Vec<String>,
    pub profile: Option<String>,
}

pub struct Stored {
    pub chain_pem: String,
    pub key_pem: String,
    pub meta: Meta,
}

pub fn account_path(state_dir: &Path) -> PathBuf {
    state_dir.join("account.json")
}

pub fn load_account(state_dir: &Path) -> Result<Option<AccountFile>, StorageError> {
    let path = account_path(state_dir);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| error(&path, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(error(&path, e)),
    }
}

pub fn save_account(state_dir: &Path, account: &AccountFile) -> Result<(), StorageError> {
    let path = account_path(state_dir);
    let bytes = serde_json::to_vec_pretty(account).map_err(|e| error(&path, e))?;
    write_atomic(&path, &bytes, 0o600)
}

/// Whether `state_dir` takes a file: checked before an account is created,
/// since an account that cannot be saved would be created again at every
/// retry, against the CA's limit on new accounts.
pub fn check_writable(state_dir: &Path) -> Result<(), StorageError> {
    let probe = state_dir.join(".writable");
    write_atomic(&probe, b"", 0o600).map_err(|e| StorageError {
        message: format!("acme.state_dir is not writable: {}", e.message),
        ..e
    })?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

fn site_dir(state_dir: &Path, site: &str) -> PathBuf {
    // Site labels are validated host names: safe as one path component.
    state_dir.join("sites").join(site)
}

pub fn load_site(state_dir: &Path, site: &str) -> Result<Option<Stored>, StorageError> {
    let dir = site_dir(state_dir, site);
    let meta_path = dir.join("meta.json");
    let meta = match std::fs::read(&meta_path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| error(&meta_path, e))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(error(&meta_path, e)),
    };
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).map_err(|e| error(&path, e))
    };
    Ok(Some(Stored {
        chain_pem: read("chain.pem")?,
        key_pem: read("key.pem")?,
        meta,
    }))
}

/// Key first, meta last: a crash between writes leaves either the old set or
/// a new chain whose meta still describes the old order, which only makes
/// the next start order again.
pub fn save_site(state_dir: &Path, site: &str, stored: &Stored) -> Result<(), StorageError> {
    let dir = site_dir(state_dir, site);
    let meta = serde_json::to_vec_pretty(&stored.meta).map_err(|e| error(&dir, e))?;
    write_atomic(&dir.join("key.pem"), stored.key_pem.as_bytes(), 0o600)?;
    write_atomic(&dir.join("chain.pem"), stored.chain_pem.as_bytes(), 0o644)?;
    write_atomic(&dir.join("meta.json"), &meta, 0o644)
}

/// [`disk::write_atomic`], the error naming the file.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), StorageError> {
    disk::write_atomic(path, bytes, mode).map_err(|e| error(path, e))
}
