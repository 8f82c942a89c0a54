//! The tar a bundle travels in: enough of POSIX ustar to write an OCI image layout and to
//! read the layouts other tools write (skopeo's `oci-archive:`, `ctr export`, GNU and
//! BSD tar). Streamed both ways, so a bundle is never held in memory or unpacked first.
//!
//! Read: regular files (`0` and the old `\0`) with their ustar prefix, GNU long names
//! (`L`) and PAX headers (`x`: `path` and `size`); directories, links and global headers
//! are skipped. Sizes of 8 GiB and over are read in base-256 as well as in octal.

use bytes::{Bytes, BytesMut};
use std::io;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const BLOCK: usize = 512;

/// The most a name or PAX header may take.
const MAX_HEADER_BODY: u64 = 1 << 20;

fn bad(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

/// Writes a tar file by file.
pub struct TarWriter<W> {
    out: W,
}

impl<W: AsyncWrite + Unpin> TarWriter<W> {
    /// A tar written to `out`.
    pub fn new(out: W) -> TarWriter<W> {
        TarWriter { out }
    }

    /// Begins the file `name` of `size` bytes, which the caller writes next with
    /// [`Self::write`] (exactly `size` of them) and ends with [`Self::end_file`].
    pub async fn begin_file(&mut self, name: &str, size: u64) -> io::Result<()> {
        self.out.write_all(&header(name, size)?).await
    }

    /// Bytes of the file begun.
    pub async fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes).await
    }

    /// Pads the file of `size` bytes to a whole block.
    pub async fn end_file(&mut self, size: u64) -> io::Result<()> {
        let pad = (BLOCK - (size % BLOCK as u64) as usize) % BLOCK;
        self.out.write_all(&[0u8; BLOCK][..pad]).await
    }

    /// A whole small file.
    pub async fn file(&mut self, name: &str, bytes: &[u8]) -> io::Result<()> {
        self.begin_file(name, bytes.len() as u64).await?;
        self.write(bytes).await?;
        self.end_file(bytes.len() as u64).await
    }

    /// Ends the archive (two zero blocks) and flushes it: the writer back.
    pub async fn finish(mut self) -> io::Result<W> {
        self.out.write_all(&[0u8; 2 * BLOCK]).await?;
        self.out.flush().await?;
        Ok(self.out)
    }
}

/// A ustar header of a regular file (mode 0644, owner 0, time 0: a bundle's bytes depend
/// on its content alone).
fn header(name: &str, size: u64) -> io::Result<[u8; BLOCK]> {
    if name.len() > 100 {
        return Err(bad(format!("tar name {name:?} is over 100 bytes")));
    }
    let mut h = [0u8; BLOCK];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..107].copy_from_slice(b"0000644");
    h[108..115].copy_from_slice(b"0000000");
    h[116..123].copy_from_slice(b"0000000");
    if size < 0o77777777777 {
        h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
    } else {
        // base-256: the high bit set, the size big-endian in the rest of the field.
        h[124] = 0x80;
        h[128..136].copy_from_slice(&size.to_be_bytes());
    }
    h[136..147].copy_from_slice(b"00000000000");
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    Ok(h)
}

/// A NUL-terminated text field.
fn field(bytes: &[u8]) -> &[u8] {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    &bytes[..end]
}

/// A numeric field: octal, or base-256 when its high bit is set.
fn number(bytes: &[u8]) -> io::Result<u64> {
    if bytes[0] & 0x80 != 0 {
        let mut n: u64 = u64::from(bytes[0] & 0x7f);
        for &b in &bytes[1..] {
            n = n
                .checked_mul(256)
                .and_then(|n| n.checked_add(u64::from(b)))
                .ok_or_else(|| bad("tar size out of range"))?;
        }
        return Ok(n);
    }
    let text = std::str::from_utf8(field(bytes)).map_err(|_| bad("tar number is not text"))?;
    let text = text.trim_matches(|c: char| c == ' ' || c == '\0');
    if text.is_empty() {
        return Ok(0);
    }
    u64::from_str_radix(text, 8).map_err(|_| bad(format!("tar number {text:?} is not octal")))
}

/// One regular file of a tar being read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its path in the archive, without a leading `./`.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
}

/// Reads a tar's regular files one after the other.
pub struct TarReader<R> {
    input: R,
    /// Bytes of the current entry not yet read, and the padding after them.
    left: u64,
    pad: u64,
}

impl<R: AsyncRead + Unpin> TarReader<R> {
    /// A reader of the tar `input`.
    pub fn new(input: R) -> TarReader<R> {
        TarReader {
            input,
            left: 0,
            pad: 0,
        }
    }

    /// The next regular file, skipping what is left of the one before; `None` at the
    /// end of the archive.
    pub async fn next(&mut self) -> io::Result<Option<Entry>> {
        self.skip_rest().await?;
        let mut long_name: Option<String> = None;
        let mut pax_size: Option<u64> = None;
        loop {
            let mut h = [0u8; BLOCK];
            if !self.read_block(&mut h).await? {
                return Ok(None);
            }
            if h.iter().all(|&b| b == 0) {
                return Ok(None);
            }
            let stored: u32 = number(&h[148..156])? as u32;
            let mut blank = h;
            blank[148..156].copy_from_slice(b"        ");
            let sum: u32 = blank.iter().map(|&b| u32::from(b)).sum();
            if sum != stored {
                return Err(bad(
                    "a tar header's checksum does not match: not a tar, or damaged",
                ));
            }
            let size = pax_size.take().map_or_else(|| number(&h[124..136]), Ok)?;
            let mut name = String::from_utf8_lossy(field(&h[..100])).into_owned();
            if &h[257..262] == b"ustar" {
                let prefix = field(&h[345..500]);
                if !prefix.is_empty() {
                    name = format!("{}/{name}", String::from_utf8_lossy(prefix));
                }
            }
            self.left = size;
            self.pad = (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64;
            match h[156] {
                b'0' | 0 | b'7' => {
                    let name = long_name.take().unwrap_or(name);
                    let name = name.trim_start_matches("./").to_string();
                    return Ok(Some(Entry { name, size }));
                }
                b'L' => {
                    let body = self.small_body(size).await?;
                    long_name = Some(String::from_utf8_lossy(field(&body)).into_owned());
                }
                b'x' => {
                    let body = self.small_body(size).await?;
                    for (key, value) in pax_records(&body)? {
                        match key.as_str() {
                            "path" => long_name = Some(value),
                            "size" => {
                                pax_size = Some(value.parse().map_err(|_| bad("bad PAX size"))?)
                            }
                            _ => {}
                        }
                    }
                }
                _ => self.skip_rest().await?,
            }
        }
    }

    /// Up to `max` bytes of the current file; `None` once it is all read.
    pub async fn chunk(&mut self, max: usize) -> io::Result<Option<Bytes>> {
        if self.left == 0 {
            return Ok(None);
        }
        let want = (self.left.min(max as u64)) as usize;
        let mut buf = BytesMut::zeroed(want);
        let n = self.input.read(&mut buf).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.truncate(n);
        self.left -= n as u64;
        Ok(Some(buf.freeze()))
    }

    async fn small_body(&mut self, size: u64) -> io::Result<Vec<u8>> {
        if size > MAX_HEADER_BODY {
            return Err(bad("a tar name or PAX header over 1 MiB"));
        }
        let mut body = vec![0u8; size as usize];
        self.input.read_exact(&mut body).await?;
        self.left = 0;
        self.skip_rest().await?;
        Ok(body)
    }

    async fn skip_rest(&mut self) -> io::Result<()> {
        let n = self.left + self.pad;
        if n > 0 {
            let copied =
                tokio::io::copy(&mut (&mut self.input).take(n), &mut tokio::io::sink()).await?;
            if copied != n {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        self.left = 0;
        self.pad = 0;
        Ok(())
    }

    /// A whole block; `false` at a clean end of the input.
    async fn read_block(&mut self, h: &mut [u8; BLOCK]) -> io::Result<bool> {
        let mut got = 0;
        while got < BLOCK {
            let n = self.input.read(&mut h[got..]).await?;
            if n == 0 {
                return if got == 0 {
                    Ok(false)
                } else {
                    Err(io::ErrorKind::UnexpectedEof.into())
                };
            }
            got += n;
        }
        Ok(true)
    }
}

/// A PAX header's `LEN key=value\n` records.
fn pax_records(body: &[u8]) -> io::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let space = rest
            .iter()
            .position(|&b| b == b' ')
            .ok_or_else(|| bad("bad PAX record"))?;
        let len: usize = std::str::from_utf8(&rest[..space])
            .ok()
            .and_then(|l| l.parse().ok())
            .filter(|&l| l > space + 1 && l <= rest.len())
            .ok_or_else(|| bad("bad PAX record length"))?;
        let record = &rest[space + 1..len - 1];
        if let Some(eq) = record.iter().position(|&b| b == b'=') {
            out.push((
                String::from_utf8_lossy(&record[..eq]).into_owned(),
                String::from_utf8_lossy(&record[eq + 1..]).into_owned(),
            ));
        }
        rest = &rest[len..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read_all(tar: &[u8]) -> io::Result<Vec<(String, Vec<u8>)>> {
        let mut r = TarReader::new(tar);
        let mut out = Vec::new();
        while let Some(e) = r.next().await? {
            let mut body = Vec::new();
            while let Some(c) = r.chunk(7).await? {
                body.extend_from_slice(&c);
            }
            assert_eq!(body.len() as u64, e.size);
            out.push((e.name, body));
        }
        Ok(out)
    }

    #[tokio::test]
    async fn what_is_written_reads_back_and_system_tar_agrees() {
        let mut w = TarWriter::new(Vec::new());
        w.file("oci-layout", b"{}").await.unwrap();
        w.file("blobs/sha256/abc", &[7u8; 1500]).await.unwrap();
        w.file("empty", b"").await.unwrap();
        let tar = w.finish().await.unwrap();
        let files = read_all(&tar).await.unwrap();
        assert_eq!(files.len(), 3);
        assert_eq!(files[0], ("oci-layout".to_string(), b"{}".to_vec()));
        assert_eq!(files[1].1, vec![7u8; 1500]);
        assert_eq!(files[2], ("empty".to_string(), Vec::new()));

        // GNU tar lists what this writes, and what it writes (long names, directories,
        // ./ prefixes) reads here.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.tar");
        std::fs::write(&path, &tar).unwrap();
        let listed = std::process::Command::new("tar")
            .arg("-tf")
            .arg(&path)
            .output()
            .unwrap();
        assert!(listed.status.success());
        assert_eq!(
            String::from_utf8_lossy(&listed.stdout),
            "oci-layout\nblobs/sha256/abc\nempty\n"
        );
        let src = dir.path().join("src");
        let long = "d".repeat(120);
        std::fs::create_dir_all(src.join("blobs/sha256")).unwrap();
        std::fs::write(src.join("blobs/sha256").join(&long), b"long").unwrap();
        let made = dir.path().join("gnu.tar");
        for format in ["gnu", "pax"] {
            let ok = std::process::Command::new("tar")
                .args(["--format", format, "-cf"])
                .arg(&made)
                .arg("-C")
                .arg(&src)
                .arg(".")
                .status()
                .unwrap();
            assert!(ok.success());
            let files = read_all(&std::fs::read(&made).unwrap()).await.unwrap();
            assert_eq!(
                files,
                vec![(format!("blobs/sha256/{long}"), b"long".to_vec())],
                "{format}"
            );
        }
    }

    #[tokio::test]
    async fn damage_is_an_error_not_a_short_file() {
        let mut w = TarWriter::new(Vec::new());
        w.file("a", &[1u8; 600]).await.unwrap();
        let tar = w.finish().await.unwrap();
        let mut broken = tar.clone();
        broken[10] ^= 1;
        assert!(read_all(&broken).await.is_err());
        let cut = &tar[..BLOCK + 100];
        assert!(read_all(cut).await.is_err());
    }
}
