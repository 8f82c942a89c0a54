//! `pullthrough proxy`: the data plane. A read-only OCI Distribution API that answers from
//! its cache and fills it from the configured upstream registries.
//!
//! Rooms, each calling only the ones below it (docs/architecture.md draws them):
//! [`serve`] (listeners, background work) -> [`http`] (parse, render, one log line) ->
//! [`registry`] (the request layer: upstream, name, filter, admission, links, counting)
//! -> [`access`] and [`links`] -> [`pull_through`] (the cache's logic) -> [`index`] and
//! [`upstream`] -> [`store`] (the bytes). [`build`] makes the [`Proxy`] ([`state`]) from
//! the configuration. The proxy talks to Kubernetes only in [`shared_eviction`], to take
//! the Lease its bucket's evictor is elected on.

pub mod access;
pub mod admin;
pub mod availability;
pub mod build;
pub mod bundle;
pub mod error;
pub mod http;
pub mod index;
pub mod links;
pub mod metrics;
pub mod peers;
pub mod prefetcher;
pub mod pull_through;
pub mod registry;
mod serve;
pub mod shared_eviction;
pub mod shared_key;
pub mod state;
pub mod store;
#[cfg(test)]
mod test_support;
pub mod tls;
pub mod upstream;
pub mod zero_copy;

pub use build::StartError;
pub use serve::{run, serve};
pub use state::Proxy;
