//! File-system helpers shared by the data plane and the node agent.

use std::io;
use std::path::Path;

/// `bytes` random bytes (from `/dev/urandom`), as hex.
pub fn random_hex(bytes: usize) -> io::Result<String> {
    use std::io::Read;
    let mut random = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut random)?;
    Ok(hex::encode(random))
}

/// Replaces `path` with `bytes` by writing them to `tmp` first and renaming it over
/// `path`: a reader sees the old file or the new one, never half of one. `tmp` must be on
/// the same file system as `path`; it is removed if the write (a full disk) or the
/// rename fails.
pub fn replace_file(tmp: &Path, path: &Path, bytes: &[u8]) -> io::Result<()> {
    replace_file_with(tmp, path, |tmp| std::fs::write(tmp, bytes))
}

fn replace_file_with(
    tmp: &Path,
    path: &Path,
    write: impl FnOnce(&Path) -> io::Result<()>,
) -> io::Result<()> {
    let result = write(tmp).and_then(|()| std::fs::rename(tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    result
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
    fn a_failed_write_removes_the_temp_file_and_keeps_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let (tmp, path) = (dir.path().join("t"), dir.path().join("f"));
        std::fs::write(&path, b"old").unwrap();
        // What a full disk does: the file is created, part of it written, then ENOSPC.
        let full = |tmp: &Path| {
            std::fs::write(tmp, b"ne")?;
            Err(io::Error::from_raw_os_error(28))
        };
        let err = replace_file_with(&tmp, &path, full).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(28));
        assert!(!tmp.exists(), "the temp file was left behind");
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
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
