//! The config file as written: serde shapes only, converted once by `build`.

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub this_node: String,
    pub default_site: Option<String>,
    pub workers: Option<usize>,
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
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSite {
    pub names: Vec<String>,
    #[serde(default)]
    pub held_by: Vec<String>,
    pub upstream: Option<String>,
    pub passthrough: Option<String>,
    pub proxy_protocol: Option<String>,
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    pub alpn: Option<Vec<String>>,
    pub http: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileListener {
    pub bind: String,
    pub default_site: Option<String>,
    pub node: Option<String>,
}
