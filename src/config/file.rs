//! The config file as written: serde shapes only, converted once by `build`.

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub this_node: String,
    pub default_site: Option<String>,
    pub workers: Option<usize>,
    pub accept: Option<String>,
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    #[serde(default)]
    pub timeouts: FileTimeouts,
    #[serde(default)]
    pub limits: FileLimits,
    #[serde(default)]
    pub certs: FileCerts,
    #[serde(default)]
    pub http: FileHttp,
    pub acme: Option<FileAcme>,
    pub state_dir: Option<String>,
    pub internal_ca: Option<FileInternalCa>,
    pub dns01: Option<FileDns01>,
    pub admin: Option<FileAdmin>,
    #[serde(default)]
    pub defaults: FileDefaults,
    #[serde(default)]
    pub nodes: Vec<FileNode>,
    #[serde(default)]
    pub sites: Vec<FileSite>,
    #[serde(default)]
    pub listeners: Vec<FileListener>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTimeouts {
    pub hello: Option<String>,
    pub connect: Option<String>,
    pub idle: Option<String>,
    pub drain: Option<String>,
    pub handshake: Option<String>,
    pub http_head: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileHttp {
    pub webroot: Option<String>,
    pub forward: Option<bool>,
    pub forward_timeout: Option<String>,
    pub forward_per_second: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCerts {
    pub poll: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileLimits {
    pub backlog: Option<u32>,
    pub max_connections: Option<usize>,
    pub max_pending_hellos: Option<usize>,
    pub max_per_source: Option<usize>,
    pub new_per_source_per_second: Option<u32>,
    pub zero_copy: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileNode {
    pub name: String,
    pub tls: String,
    pub http: String,
    pub tls_bind: Option<String>,
    pub http_bind: Option<String>,
    #[serde(default)]
    pub addresses: Vec<String>,
    pub acme_name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAcme {
    pub directory: String,
    #[serde(default)]
    pub contact: Vec<String>,
    /// The older spelling of the top-level `state_dir`.
    pub state_dir: Option<String>,
    pub ca_file: Option<String>,
    pub profile: Option<String>,
    pub eab: Option<FileEab>,
    #[serde(default)]
    pub shared_account: bool,
    pub key_type: Option<String>,
    pub retry_min: Option<String>,
    pub retry_max: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDns01 {
    pub server: String,
    pub tsig_key: String,
    pub tsig_algorithm: Option<String>,
    pub tsig_secret_file: String,
    pub zone: Option<String>,
    pub propagation_timeout: Option<String>,
    pub ttl: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileInternalCa {
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    pub lifetime: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAdmin {
    pub listen: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEab {
    pub kid: String,
    pub hmac_key: String,
}

/// Settings every site takes unless it sets its own.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDefaults {
    pub allow: Option<Vec<String>>,
    pub deny: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSite {
    pub names: Vec<String>,
    #[serde(default)]
    pub held_by: Vec<String>,
    pub upstream: Option<FileTargets>,
    pub passthrough: Option<FileTargets>,
    /// Addresses of the pool that take no new connections.
    pub drain: Option<Vec<String>>,
    /// `"tcp"`: connect to each target every few seconds.
    pub health: Option<String>,
    pub proxy_protocol: Option<String>,
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    pub issuer: Option<String>,
    pub challenge: Option<String>,
    pub alpn: Option<Vec<String>>,
    pub http: Option<String>,
    pub allow: Option<Vec<String>>,
    pub deny: Option<Vec<String>>,
}

/// `"IP:port"`, or a list of those and `{ addr = "IP:port", weight = N }`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum FileTargets {
    One(String),
    Many(Vec<FileTarget>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum FileTarget {
    Addr(String),
    Weighted(FileWeighted),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileWeighted {
    pub addr: String,
    pub weight: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileListener {
    pub bind: String,
    pub default_site: Option<String>,
    pub node: Option<String>,
}
