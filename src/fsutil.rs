//! File-system helpers shared by the data plane and the node agent.

use std::io;
use std::path::Path;

/// Replaces `path` with `bytes` by writing them to `tmp` first and renaming it over
/// `path`: a reader sees the old file or the new one, never half of one. `tmp` must be on
/// the same file system as `path`; it is removed if the rename fails.
pub fn replace_file(tmp: &Path, path: &Path, bytes: &[u8]) -> io::Result<()> {
    std::fs::write(tmp, bytes)?;
    if let Err(e) = std::fs::rename(tmp, path) {
        let _ = std::fs::remove_file(tmp);
        return Err(e);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_file_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let (tmp, path) = (dir.path().join("t"), dir.path().join("f"));
        std::fs::write(&path, b"old").unwrap();
        replace_file(&tmp, &path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert!(!tmp.exists());
    }

    #[test]
    fn a_failed_rename_removes_the_temp_file_and_keeps_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let (tmp, path) = (dir.path().join("t"), dir.path().join("d"));
        // Renaming a file over a non-empty directory fails.
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("inside"), b"x").unwrap();
        assert!(replace_file(&tmp, &path, b"new").is_err());
        assert!(!tmp.exists());
        assert!(path.join("inside").exists());
    }
}
