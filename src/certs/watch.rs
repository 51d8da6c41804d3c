//! Keeps file-sourced certificates in the store current: loads them at
//! start, on reload, and whenever the files change on disk (so certbot or
//! lego renewals are picked up without a signal).

use std::collections::HashMap;
use std::path::Path;
use std::time::SystemTime;

use super::disk;
use super::store::{CertStore, Entry, Source};
use crate::config::{CertFiles, Config};

/// What we last loaded, to notice changes by modification time and size.
type Stamp = Option<(SystemTime, u64)>;

#[derive(Debug, Default)]
pub struct FileWatch {
    seen: HashMap<String, (CertFiles, Stamp, Stamp)>,
}

fn stamp(path: &Path) -> Stamp {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

impl FileWatch {
    /// Makes the next `sync` re-read every file.
    pub fn forget(&mut self) {
        self.seen.clear();
    }

    /// Loads what changed since the last call; drops certificates of sites
    /// that no longer have files here.
    pub fn sync(&mut self, config: &Config, store: &CertStore) {
        let mut keep = Vec::new();
        for (site, files) in config.held_with_files() {
            keep.push(site.label.clone());
            let now = (files.clone(), stamp(&files.cert), stamp(&files.key));
            if self.seen.get(&site.label) == Some(&now) {
                continue;
            }
            self.seen.insert(site.label.clone(), now);
            match disk::load_files(&files.cert, &files.key) {
                Ok(loaded) => {
                    let info = &loaded.info;
                    for name in &site.names {
                        let probe = name.to_string().replace("*.", "x.");
                        if !info.covers(&probe) {
                            tracing::warn!(site = %site.label, %name, "certificate does not cover this name");
                        }
                    }
                    tracing::info!(
                        site = %site.label,
                        file = %files.cert.display(),
                        not_after = %humantime::format_rfc3339_seconds(info.not_after),
                        valid_now = info.valid_at(SystemTime::now()),
                        "certificate loaded"
                    );
                    store.set(
                        &site.label,
                        Entry {
                            loaded,
                            source: Source::Files,
                        },
                    );
                }
                Err(e) => {
                    tracing::warn!(site = %site.label, error = %e, "certificate not loaded; splicing to peers meanwhile");
                }
            }
        }
        self.seen.retain(|site, _| keep.contains(site));
        store.retain(|site, entry| entry.source != Source::Files || keep.iter().any(|k| k == site));
    }
}
