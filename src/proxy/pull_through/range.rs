//! `Range: bytes=` requests of blobs.

/// A `Range: bytes=...` request, not yet resolved against a length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ByteRange {
    /// `start-` or `start-end` (inclusive).
    From {
        /// First byte.
        start: u64,
        /// Last byte, inclusive.
        end: Option<u64>,
    },
    /// `-n`: the last n bytes.
    Suffix(u64),
}

impl ByteRange {
    /// Parses a single-range `Range` header. `None` for headers the proxy ignores (not
    /// bytes, multiple ranges): the full body is served then, as HTTP allows.
    pub fn parse(header: &str) -> Option<Result<ByteRange, ()>> {
        let spec = header.trim().strip_prefix("bytes=")?;
        if spec.contains(',') {
            return None;
        }
        let (a, b) = spec.split_once('-')?;
        let (a, b) = (a.trim(), b.trim());
        let num = |s: &str| s.parse::<u64>().map_err(|_| ());
        Some(if a.is_empty() {
            num(b).map(ByteRange::Suffix)
        } else {
            match (num(a), b.is_empty()) {
                (Ok(start), true) => Ok(ByteRange::From { start, end: None }),
                (Ok(start), false) => num(b).and_then(|end| {
                    if end < start {
                        Err(())
                    } else {
                        Ok(ByteRange::From {
                            start,
                            end: Some(end),
                        })
                    }
                }),
                (Err(()), _) => Err(()),
            }
        })
    }

    /// The inclusive byte span within a blob of `len` bytes, if satisfiable.
    pub fn resolve(self, len: u64) -> Option<(u64, u64)> {
        match self {
            ByteRange::From { start, end } if start < len => {
                Some((start, end.map_or(len - 1, |e| e.min(len - 1))))
            }
            ByteRange::Suffix(n) if n > 0 && len > 0 => Some((len - n.min(len), len - 1)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let p = |s| ByteRange::parse(s);
        assert_eq!(
            p("bytes=0-9"),
            Some(Ok(ByteRange::From {
                start: 0,
                end: Some(9)
            }))
        );
        assert_eq!(
            p("bytes=5-"),
            Some(Ok(ByteRange::From {
                start: 5,
                end: None
            }))
        );
        assert_eq!(p("bytes=-3"), Some(Ok(ByteRange::Suffix(3))));
        assert_eq!(p("bytes=9-5"), Some(Err(())));
        assert_eq!(p("bytes=x-5"), Some(Err(())));
        assert_eq!(p("bytes=0-1,3-4"), None);
        assert_eq!(p("items=0-1"), None);
        let r = |s| ByteRange::parse(s).unwrap().unwrap();
        assert_eq!(r("bytes=0-9").resolve(5), Some((0, 4)));
        assert_eq!(r("bytes=5-").resolve(5), None);
        assert_eq!(r("bytes=-3").resolve(10), Some((7, 9)));
        assert_eq!(r("bytes=-30").resolve(10), Some((0, 9)));
        assert_eq!(r("bytes=-0").resolve(10), None);
    }
}
