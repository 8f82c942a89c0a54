//! The proxy, the data plane: the registry API as clients use it, against real
//! Distribution upstreams and ones that misbehave on purpose.

/// Whether workload images can be pulled now, and what asking costs the upstream.
mod availability;
/// Bundles: images carried between caches as OCI image layouts, with skopeo.
pub(crate) mod bundles;
/// What a cache keeps and lets go: the size limit, pins, a killed process, a full disk.
mod cache;
/// Connections cannot be hoarded, and the ports stay up.
mod connections;
/// One download per blob, the index and the disk in agreement, room not overcommitted.
mod downloads;
/// Upstreams that misbehave: auth, 5xx, cut and stalled bodies, odd answers.
mod faults;
/// An upstream's mode: online, localFirst, offline, and changing it while running.
mod modes;
/// The parsers every request goes through, under arbitrary input.
mod parsers;
/// Upstreams chosen by the path's first component, by skopeo and podman.
mod path_routing;
/// Prefetching on request, on the operations port.
mod prefetch;
/// Private repositories stay private through the cache.
mod private_access;
/// The registry API as clients and Distribution use it: manifests, blobs, tags, Accept.
mod registry;
/// Replicas sharing an S3 bucket (a real Ceph RGW).
mod s3_shared;
/// The upstream's limits kept: caps, fair turns, back-off.
mod upstream_limits;
