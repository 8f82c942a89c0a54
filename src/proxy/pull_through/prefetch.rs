//! Evicting down to a lowered limit at start, and dropping an image on purpose.

use super::*;
use crate::oci::{Digest, Reference};
use crate::proxy::upstream::Upstream;
use std::sync::Arc;

impl PullThrough {
    /// Evicts down to the size limit (after a restart with a lower limit), keeping pins.
    pub async fn enforce_limit(self: &Arc<Self>) {
        if self.index.limit().is_some() {
            drop(self.reserve(0).await);
        }
    }

    /// Drops an image (tag or digest) from the cache on purpose: the tag record, the
    /// manifests, and the blobs no other cached manifest or pin needs.
    pub async fn drop_image(
        self: &Arc<Self>,
        up: &Arc<Upstream>,
        repository: &str,
        reference: &Reference,
    ) -> crate::proxy::index::Removal {
        let root = match reference {
            Reference::Digest(d) => Some(d.clone()),
            Reference::Tag(t) => {
                let st = self.tag_state(up, repository, t).await;
                self.forget_tag(up, repository, t).await;
                st.map(|s| s.digest)
            }
        };
        let Some(root) = root else {
            return crate::proxy::index::Removal::default();
        };
        // On its own task: the index and the store agree even if the caller goes away.
        let this = self.clone();
        tokio::spawn(async move {
            let dropped = this.index.closure([root.clone()]);
            let keep: std::collections::HashSet<Digest> =
                this.pinned().difference(&dropped).cloned().collect();
            this.index.drop_images(&[root], &keep).await
        })
        .await
        .expect("drop task")
    }
}
