//! Configuration and resource types shared by the roles. No I/O happens here: the proxy
//! reads [`ProxyConfig`] from a file, the controller writes the same struct into a
//! ConfigMap.

pub mod docker_hub;
pub mod dockerconfig;
pub mod duration;
pub mod image_ref;
pub mod mirror;
pub mod proxy_config;
pub mod quantity;

pub use proxy_config::{
    AccessConfig, AccessMode, ConfigError, Credentials, ProxyConfig, RepositoryFilter, TagPolicy,
    TagPolicyKind, TlsConfig, UpstreamAccess, UpstreamConfig, UpstreamLimits, UpstreamMode,
};
