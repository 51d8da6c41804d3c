//! What ACME leaves on disk under `state_dir`: the account, and per site the
//! chain, key and what was ordered. Written atomically (temp file, fsync,
//! rename), private files 0600; read back at start so a restart does not
//! order again.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use instant_acme::AccountCredentials;
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

/// Temp file in the same directory, fsync, rename over, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), StorageError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| error(dir, e))?;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| error(&tmp, e))?;
    file.write_all(bytes).map_err(|e| error(&tmp, e))?;
    file.sync_all().map_err(|e| error(&tmp, e))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(|e| error(path, e))?;
    if let Ok(dir) = std::fs::File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sites_round_trip_with_private_keys() {
        let dir = std::env::temp_dir().join(format!("sni-router-storage-{}", std::process::id()));
        let stored = Stored {
            chain_pem: "CHAIN".into(),
            key_pem: "KEY".into(),
            meta: Meta {
                identifiers: vec!["a.test".into()],
                profile: None,
            },
        };
        save_site(&dir, "a.test", &stored).unwrap();
        let back = load_site(&dir, "a.test").unwrap().unwrap();
        assert_eq!(
            (back.chain_pem.as_str(), back.key_pem.as_str()),
            ("CHAIN", "KEY")
        );
        assert_eq!(back.meta, stored.meta);
        let mode = std::fs::metadata(dir.join("sites/a.test/key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(load_site(&dir, "other.test").unwrap().is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_unwritable_state_dir_is_named() {
        let dir = std::env::temp_dir().join(format!("sni-router-probe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        check_writable(&dir).unwrap();
        assert!(!dir.join(".writable").exists(), "the probe is removed");
        // A symlink to a volume not mounted: even root cannot write there.
        let state = dir.join("state");
        std::os::unix::fs::symlink(dir.join("unmounted/state"), &state).unwrap();
        let e = check_writable(&state).unwrap_err().to_string();
        assert!(e.contains("acme.state_dir is not writable"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
