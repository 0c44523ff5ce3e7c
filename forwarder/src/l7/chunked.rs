//! A strict, incremental decoder for `Transfer-Encoding: chunked` (RFC 9112 §7.1).
//!
//! weir relays chunked bodies as they arrive; it decodes them only to know where they end
//! (so the next message on the connection starts at the right byte) and to refuse the
//! malformed framings that make a front end and a server disagree about that end: a bare
//! LF, a chunk size with a sign, spaces or more than 16 hex digits, data longer than its
//! size, unbounded extensions or trailers, and trailer lines that are not `name: value`
//! fields (a token name, a value without control bytes, no obs-fold) — a server must never
//! see a trailer it might parse differently from weir. For an HTTP/1.0 client the decoded
//! data is written out instead of the chunks.

/// Longest chunk extension (`;name=value...`) accepted on one size line.
const MAX_EXTENSION: usize = 4096;
/// Largest trailer section accepted.
const MAX_TRAILERS: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed chunked body: {0}")]
pub struct ChunkError(pub &'static str);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading the hex digits of a chunk size (`digits` so far).
    Size {
        digits: u8,
    },
    /// After the size, in a chunk extension, until CR.
    Extension,
    /// Expecting the LF of the size line.
    SizeLf,
    /// Inside chunk data, with this many bytes left.
    Data,
    /// Expecting the CR after chunk data.
    DataCr,
    /// Expecting the LF after chunk data.
    DataLf,
    /// At the start of a trailer line (or of the final CRLF).
    TrailerStart,
    /// In a trailer field's name, until `:`.
    TrailerName,
    /// In a trailer field's value, until CR.
    TrailerValue,
    /// Expecting the LF of a trailer line.
    TrailerLf,
    /// Expecting the LF of the final CRLF.
    EndLf,
    Done,
}

/// Decoder state for one chunked body.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: State,
    size: u64,
    extension: usize,
    trailers: usize,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        ChunkedDecoder {
            state: State::Size { digits: 0 },
            size: 0,
            extension: 0,
            trailers: 0,
        }
    }
}

impl ChunkedDecoder {
    /// Whether the last chunk and the trailers have been read.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Consumes bytes of `input` up to the end of the body, and returns how many belong to
    /// it. Decoded data is appended to `data` when given.
    pub fn feed(
        &mut self,
        input: &[u8],
        mut data: Option<&mut Vec<u8>>,
    ) -> Result<usize, ChunkError> {
        let mut at = 0;
        while at < input.len() && self.state != State::Done {
            let byte = input[at];
            match self.state {
                State::Size { digits } => match hex_value(byte) {
                    Some(value) => {
                        if digits == 16 {
                            return Err(ChunkError("chunk size too large"));
                        }
                        self.size = self.size << 4 | u64::from(value);
                        self.state = State::Size { digits: digits + 1 };
                    }
                    None if digits == 0 => return Err(ChunkError("chunk size is not hex")),
                    None if byte == b';' => {
                        self.extension = 0;
                        self.state = State::Extension;
                    }
                    None if byte == b'\r' => self.state = State::SizeLf,
                    None => return Err(ChunkError("invalid byte after chunk size")),
                },
                State::Extension => {
                    if byte == b'\r' {
                        self.state = State::SizeLf;
                    } else if byte == b'\n' || (byte < 0x20 && byte != b'\t') || byte == 0x7f {
                        return Err(ChunkError("invalid byte in chunk extension"));
                    } else {
                        self.extension += 1;
                        if self.extension > MAX_EXTENSION {
                            return Err(ChunkError("chunk extension too long"));
                        }
                    }
                }
                State::SizeLf => {
                    expect(byte, b'\n')?;
                    self.state = if self.size == 0 {
                        State::TrailerStart
                    } else {
                        State::Data
                    };
                }
                State::Data => {
                    let available = (input.len() - at) as u64;
                    let take = available.min(self.size) as usize;
                    if let Some(data) = data.as_deref_mut() {
                        data.extend_from_slice(&input[at..at + take]);
                    }
                    self.size -= take as u64;
                    at += take;
                    if self.size == 0 {
                        self.state = State::DataCr;
                    }
                    continue;
                }
                State::DataCr => {
                    expect(byte, b'\r')?;
                    self.state = State::DataLf;
                }
                State::DataLf => {
                    expect(byte, b'\n')?;
                    self.state = State::Size { digits: 0 };
                }
                State::TrailerStart => {
                    self.state = if byte == b'\r' {
                        State::EndLf
                    } else if byte == b'\n' {
                        return Err(ChunkError("bare LF"));
                    } else if is_tchar(byte) {
                        State::TrailerName
                    } else if byte == b' ' || byte == b'\t' {
                        return Err(ChunkError("folded trailer line"));
                    } else {
                        return Err(ChunkError("invalid trailer field name"));
                    };
                    self.count_trailer()?;
                }
                State::TrailerName => {
                    if byte == b':' {
                        self.state = State::TrailerValue;
                    } else if !is_tchar(byte) {
                        return Err(ChunkError("invalid trailer field name"));
                    }
                    self.count_trailer()?;
                }
                State::TrailerValue => {
                    if byte == b'\r' {
                        self.state = State::TrailerLf;
                    } else if byte == b'\n' {
                        return Err(ChunkError("bare LF"));
                    } else if (byte < 0x20 && byte != b'\t') || byte == 0x7f {
                        return Err(ChunkError("invalid byte in trailer value"));
                    }
                    self.count_trailer()?;
                }
                State::TrailerLf => {
                    expect(byte, b'\n')?;
                    self.state = State::TrailerStart;
                }
                State::EndLf => {
                    expect(byte, b'\n')?;
                    self.state = State::Done;
                }
                State::Done => unreachable!("loop ends at Done"),
            }
            at += 1;
        }
        Ok(at)
    }

    fn count_trailer(&mut self) -> Result<(), ChunkError> {
        self.trailers += 1;
        if self.trailers > MAX_TRAILERS {
            return Err(ChunkError("trailers too large"));
        }
        Ok(())
    }
}

fn expect(byte: u8, wanted: u8) -> Result<(), ChunkError> {
    if byte == wanted {
        Ok(())
    } else if wanted == b'\n' {
        Err(ChunkError("CR not followed by LF"))
    } else {
        Err(ChunkError("chunk data longer than its size"))
    }
}

/// A `tchar` of RFC 9110 §5.6.2: what a field name is made of.
fn is_tchar(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

fn hex_value(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` one byte at a time and whole, and checks both agree.
    fn decode(input: &[u8]) -> Result<(usize, Vec<u8>, bool), ChunkError> {
        let mut whole = ChunkedDecoder::default();
        let mut data = Vec::new();
        let used = whole.feed(input, Some(&mut data))?;
        let mut bytewise = ChunkedDecoder::default();
        let mut bytewise_data = Vec::new();
        let mut bytewise_used = 0;
        for chunk in input.chunks(1) {
            if bytewise.is_done() {
                break;
            }
            bytewise_used += bytewise.feed(chunk, Some(&mut bytewise_data))?;
        }
        assert_eq!((used, &data), (bytewise_used, &bytewise_data));
        Ok((used, data, whole.is_done()))
    }

    #[test]
    fn a_body_ends_after_the_last_chunk_and_trailers() {
        let body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Sum: 1\r\n\r\nGET /next";
        let (used, data, done) = decode(body).unwrap();
        assert!(done);
        assert_eq!(data, b"hello world");
        assert_eq!(&body[used..], b"GET /next");
    }

    #[test]
    fn an_unfinished_body_consumes_everything_and_waits() {
        let (used, data, done) = decode(b"A\r\n01234").unwrap();
        assert_eq!((used, done), (8, false));
        assert_eq!(data, b"01234");
    }

    #[test]
    fn smuggling_framings_are_refused() {
        for bad in [
            &b"5\nhello\r\n0\r\n\r\n"[..], // bare LF after the size
            b"5\r\nhello\n0\r\n\r\n",      // bare LF after data
            b"5\r\nhelloX\r\n0\r\n\r\n",   // data longer than its size
            b"+5\r\nhello\r\n0\r\n\r\n",   // signed size
            b" 5\r\nhello\r\n0\r\n\r\n",   // leading space
            b"5 \r\nhello\r\n0\r\n\r\n",   // trailing space
            b"0x5\r\nhello\r\n0\r\n\r\n",  // 0x prefix
            b"10000000000000000\r\n",      // 17 hex digits
            b"\r\n",                       // no size
            b"0\r\nX: y\n\r\n",            // bare LF in a trailer
            b"0\r\n\n",                    // bare LF at the end
            b"0\r\nno colon\r\n\r\n",      // a trailer line that is not a field
            b"0\r\n: no name\r\n\r\n",     // a field without a name
            b"0\r\nX y: 1\r\n\r\n",        // a space in the name
            b"0\r\nX: 1\r\n y\r\n\r\n",    // obs-fold
            b"0\r\nX: a\x00b\r\n\r\n",     // a control byte in the value
            b"0\r\nX\r: 1\r\n\r\n",        // CR in the name
        ] {
            assert!(decode(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
