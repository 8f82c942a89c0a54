//! OCI Distribution vocabulary: digests, repository names and references, manifest media
//! types and the spec's error codes. Pure values and parsing; no I/O.

pub mod digest;
pub mod error;
pub mod media;
pub mod reference;

pub use digest::{Algorithm, Digest, DigestError, Hasher};
pub use error::ErrorCode;
pub use reference::{Reference, ReferenceError, validate_repository};
