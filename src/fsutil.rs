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

/// The fewest bytes a secret file (the admin token, the replicas' shared key) may hold.
pub const MIN_SECRET_BYTES: usize = 32;

/// The secret in `path` (the admin token, the replicas' shared key), created there (mode
/// 0600, 32 random bytes as hex) if missing or empty. One shorter than
/// [`MIN_SECRET_BYTES`] is refused: a short key is found offline from one token it
/// signed.
pub fn load_or_create_secret(path: &Path) -> io::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => {
            let t = t.trim();
            if t.len() < MIN_SECRET_BYTES {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{} bytes, and a secret must be at least {MIN_SECRET_BYTES} (make one \
                         with: openssl rand -hex 32)",
                        t.len()
                    ),
                ));
            }
            return Ok(t.to_string());
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let secret = random_hex(32)?;
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(secret.as_bytes())?;
    Ok(secret)
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
    fn a_secret_is_made_once_private_and_never_short() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin-token");
        let secret = load_or_create_secret(&path).unwrap();
        assert_eq!(secret.len(), 64);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(load_or_create_secret(&path).unwrap(), secret, "kept");
        std::fs::write(&path, "short\n").unwrap();
        let e = load_or_create_secret(&path).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

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
