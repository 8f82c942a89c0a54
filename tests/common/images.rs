//! Images generated on the fly: blobs, single- and multi-platform images, tar layers.

use super::{CONFIG, LAYER, OCI_INDEX, OCI_MANIFEST, sha256};
use serde_json::json;
use std::collections::BTreeSet;

/// Deterministic pseudo-random bytes (incompressible enough for tests).
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A blob with its digest and media type.
#[derive(Clone)]
pub struct Blob {
    pub digest: String,
    pub media_type: String,
    pub bytes: Vec<u8>,
}

impl Blob {
    pub fn new(media_type: &str, bytes: Vec<u8>) -> Blob {
        Blob {
            digest: sha256(&bytes),
            media_type: media_type.into(),
            bytes,
        }
    }

    pub fn descriptor(&self) -> serde_json::Value {
        json!({"mediaType": self.media_type, "digest": self.digest, "size": self.bytes.len()})
    }
}

/// One platform's image: config, layers and manifest.
#[derive(Clone)]
pub struct Image {
    pub config: Blob,
    pub layers: Vec<Blob>,
    pub manifest: Blob,
}

impl Image {
    pub fn generate(seed: u64, layer_sizes: &[usize], arch: &str) -> Image {
        let layers = layer_sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| random_bytes(seed * 1000 + i as u64, n))
            .collect();
        Image::with_layers(seed, layers, arch)
    }

    /// An image whose layers are real tar archives (one file each), which containerd can
    /// unpack.
    pub fn generate_tar(seed: u64, file_sizes: &[usize], arch: &str) -> Image {
        let layers = file_sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                tar_with_file(
                    &format!("data/file-{seed}-{i}"),
                    &random_bytes(seed * 1000 + i as u64, n),
                )
            })
            .collect();
        Image::with_layers(seed, layers, arch)
    }

    pub fn with_layers(seed: u64, layer_bytes: Vec<Vec<u8>>, arch: &str) -> Image {
        let layers: Vec<Blob> = layer_bytes
            .into_iter()
            .map(|b| Blob::new(LAYER, b))
            .collect();
        let config = Blob::new(
            CONFIG,
            serde_json::to_vec(&json!({
                "architecture": arch, "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| &l.digest).collect::<Vec<_>>()},
                "config": {"Env": [format!("SEED={seed}")]}
            }))
            .unwrap(),
        );
        let manifest = Blob::new(
            OCI_MANIFEST,
            serde_json::to_vec(&json!({
                "schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": config.descriptor(),
                "layers": layers.iter().map(Blob::descriptor).collect::<Vec<_>>()
            }))
            .unwrap(),
        );
        Image {
            config,
            layers,
            manifest,
        }
    }

    pub fn blobs(&self) -> impl Iterator<Item = &Blob> {
        std::iter::once(&self.config).chain(self.layers.iter())
    }
}

/// A multi-platform image: an index over several images.
pub struct MultiArch {
    pub images: Vec<Image>,
    pub index: Blob,
}

impl MultiArch {
    pub fn generate(seed: u64, layer_sizes: &[usize]) -> MultiArch {
        let images: Vec<Image> = ["amd64", "arm64"]
            .iter()
            .enumerate()
            .map(|(i, arch)| Image::generate(seed * 10 + i as u64, layer_sizes, arch))
            .collect();
        let index = Blob::new(
            OCI_INDEX,
            serde_json::to_vec(&json!({
                "schemaVersion": 2, "mediaType": OCI_INDEX,
                "manifests": images.iter().zip(["amd64", "arm64"]).map(|(img, arch)| {
                    let mut d = img.manifest.descriptor();
                    d["platform"] = json!({"architecture": arch, "os": "linux"});
                    d
                }).collect::<Vec<_>>()
            }))
            .unwrap(),
        );
        MultiArch { images, index }
    }

    /// Every digest a full pull touches.
    pub fn all_digests(&self) -> BTreeSet<String> {
        let mut s = BTreeSet::from([self.index.digest.clone()]);
        for img in &self.images {
            s.insert(img.manifest.digest.clone());
            s.extend(img.blobs().map(|b| b.digest.clone()));
        }
        s
    }
}

/// A ustar archive holding one regular file.
pub fn tar_with_file(name: &str, content: &[u8]) -> Vec<u8> {
    assert!(name.len() < 100);
    let mut h = [0u8; 512];
    let put = |h: &mut [u8; 512], at: usize, v: &[u8]| h[at..at + v.len()].copy_from_slice(v);
    put(&mut h, 0, name.as_bytes());
    put(&mut h, 100, b"0000644\0");
    put(&mut h, 108, b"0000000\0");
    put(&mut h, 116, b"0000000\0");
    put(&mut h, 124, format!("{:011o}\0", content.len()).as_bytes());
    put(&mut h, 136, b"00000000000\0");
    put(&mut h, 148, b"        ");
    h[156] = b'0';
    put(&mut h, 257, b"ustar\0");
    put(&mut h, 263, b"00");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    put(&mut h, 148, format!("{sum:06o}\0 ").as_bytes());
    let mut out = h.to_vec();
    out.extend_from_slice(content);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out.extend_from_slice(&[0u8; 1024]);
    out
}
