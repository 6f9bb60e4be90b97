//! Mesos RecordIO framing (`<decimal length>\n<length bytes>`), as the operator API's
//! `SUBSCRIBE` stream sends events. Pure: bytes in, whole records out, whatever the chunking.

/// Why the stream cannot be decoded further (the connection should be dropped).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordIoError {
    #[error("record length {0:?} is not a decimal number")]
    BadLength(String),
    #[error("record of {0} bytes is larger than the {1}-byte limit")]
    TooLarge(u64, usize),
}

/// Longest length prefix read before giving up on finding its newline (20 digits hold any u64).
const MAX_PREFIX: usize = 20;

/// Incremental decoder: feed chunks as they arrive, take whole records out.
#[derive(Debug)]
pub struct RecordIoDecoder {
    buf: Vec<u8>,
    /// Start of unread bytes in `buf` (compacted between feeds).
    pos: usize,
    /// Length of the record being read, once its prefix is complete.
    want: Option<usize>,
    max: usize,
}

impl RecordIoDecoder {
    /// A decoder refusing records longer than `max` bytes.
    pub fn new(max: usize) -> Self {
        RecordIoDecoder {
            buf: Vec::new(),
            pos: 0,
            want: None,
            max,
        }
    }

    /// Append `chunk` and push every record it completes onto `out`. After an error the
    /// decoder is unusable (the stream is out of step).
    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<Vec<u8>>) -> Result<(), RecordIoError> {
        self.buf.extend_from_slice(chunk);
        loop {
            let rest = &self.buf[self.pos..];
            match self.want {
                None => {
                    let Some(nl) = rest.iter().position(|b| *b == b'\n') else {
                        if rest.len() > MAX_PREFIX {
                            return Err(RecordIoError::BadLength(
                                String::from_utf8_lossy(rest).into_owned(),
                            ));
                        }
                        break;
                    };
                    let digits = &rest[..nl];
                    let text = std::str::from_utf8(digits).unwrap_or("");
                    let len = match text.trim().parse::<u64>() {
                        Ok(n) if !text.trim().is_empty() => n,
                        _ => {
                            return Err(RecordIoError::BadLength(
                                String::from_utf8_lossy(digits).into_owned(),
                            ));
                        }
                    };
                    let len = usize::try_from(len)
                        .ok()
                        .filter(|l| *l <= self.max)
                        .ok_or(RecordIoError::TooLarge(len, self.max))?;
                    self.pos += nl + 1;
                    self.want = Some(len);
                }
                Some(len) => {
                    if rest.len() < len {
                        break;
                    }
                    out.push(rest[..len].to_vec());
                    self.pos += len;
                    self.want = None;
                }
            }
        }
        // Keep the buffer from growing with consumed bytes.
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        Ok(())
    }
}

/// Frame one record (the fake master in tests, and `l4lb` never otherwise).
pub fn encode(record: &[u8]) -> Vec<u8> {
    let mut out = format!("{}\n", record.len()).into_bytes();
    out.extend_from_slice(record);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn cases() {
        let mut out = Vec::new();
        let mut d = RecordIoDecoder::new(100);
        d.feed(b"5\nhello3\nabc0\n", &mut out).unwrap();
        assert_eq!(out, [b"hello".to_vec(), b"abc".to_vec(), Vec::new()]);
        out.clear();
        // A prefix split from its record, and the record split too.
        d.feed(b"1", &mut out).unwrap();
        d.feed(b"1\nhello ", &mut out).unwrap();
        assert!(out.is_empty());
        d.feed(b"world", &mut out).unwrap();
        assert_eq!(out, [b"hello world".to_vec()]);
        for (input, want) in [
            (&b"x\n"[..], RecordIoError::BadLength("x".into())),
            (b"\n", RecordIoError::BadLength("".into())),
            (b"-1\n", RecordIoError::BadLength("-1".into())),
            (b"101\n", RecordIoError::TooLarge(101, 100)),
            (
                b"123456789012345678901",
                RecordIoError::BadLength("123456789012345678901".into()),
            ),
        ] {
            let mut d = RecordIoDecoder::new(100);
            assert_eq!(d.feed(input, &mut Vec::new()), Err(want), "{input:?}");
        }
    }

    proptest! {
        /// Any records, framed and cut into any chunks, come out whole and in order.
        #[test]
        fn any_chunking(records in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..20),
                        cuts in prop::collection::vec(0usize..4000, 0..30)) {
            let wire: Vec<u8> = records.iter().flat_map(|r| encode(r)).collect();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (wire.len() + 1)).collect();
            cuts.push(0);
            cuts.push(wire.len());
            cuts.sort_unstable();
            let mut d = RecordIoDecoder::new(1000);
            let mut out = Vec::new();
            for w in cuts.windows(2) {
                d.feed(&wire[w[0]..w[1]], &mut out).unwrap();
            }
            prop_assert_eq!(out, records);
        }

        #[test]
        fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = RecordIoDecoder::new(64).feed(&bytes, &mut Vec::new());
        }
    }
}
