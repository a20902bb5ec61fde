//! Streaming readers for the two input layouts: the reference's single JSON list and JSONL.
//!
//! A JSON list is split into its elements by a byte scanner that tracks strings and nesting, so
//! a 10 GB file is never held in memory, and an element that is not valid JSON (or not an
//! object) becomes a rejected sample instead of aborting the run. Only damage to the list
//! structure itself (an unterminated string, a missing `]`) stops reading that file.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// Largest accepted sample (one JSON list element or JSONL line). A file whose structure is
/// broken (say an unterminated string) would otherwise be buffered whole before the error.
pub const MAX_SAMPLE_BYTES: usize = 256 << 20;

/// One sample's raw JSON text with where it came from.
#[derive(Clone, Debug)]
pub struct RawSample {
    /// Index of the input file in the run's `--data` list.
    pub file: usize,
    /// 0-based index of the sample within its file.
    pub index: u64,
    /// 1-based line number (JSONL) or byte offset of the element (JSON list).
    pub location: Location,
    pub text: Vec<u8>,
}

/// Where a sample starts in its file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Location {
    Line(u64),
    Offset(u64),
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Line(l) => write!(f, "line {l}"),
            Location::Offset(o) => write!(f, "byte {o}"),
        }
    }
}

/// A file-level problem: the file cannot be read or its list structure is broken.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: at byte {offset}: {message}")]
    Syntax {
        path: PathBuf,
        offset: u64,
        message: String,
    },
}

enum Layout {
    List,
    Lines,
}

/// Reads samples from one file, streaming.
pub struct SampleReader {
    path: PathBuf,
    file: usize,
    reader: BufReader<Box<dyn Read + Send>>,
    layout: Layout,
    offset: u64,
    line: u64,
    next_index: u64,
    done: bool,
    /// Bytes consumed so far (for progress).
    pub bytes_read: u64,
}

impl SampleReader {
    /// Opens `path` (index `file` in the run) and detects the layout from its first byte.
    pub fn open(path: &Path, file: usize) -> Result<SampleReader, InputError> {
        let f = File::open(path).map_err(|e| InputError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        Self::from_reader(path, file, Box::new(f))
    }

    /// Like [`SampleReader::open`] over any reader (tests).
    pub fn from_reader(
        path: &Path,
        file: usize,
        inner: Box<dyn Read + Send>,
    ) -> Result<SampleReader, InputError> {
        let mut r = SampleReader {
            path: path.to_path_buf(),
            file,
            reader: BufReader::with_capacity(1 << 20, inner),
            layout: Layout::Lines,
            offset: 0,
            line: 1,
            next_index: 0,
            done: false,
            bytes_read: 0,
        };
        // Skip a UTF-8 byte-order mark and leading whitespace, then look at the first byte.
        let path = r.path.clone();
        let has_bom = r
            .reader
            .fill_buf()
            .map_err(|e| InputError::Io { path, source: e })?
            .starts_with(b"\xEF\xBB\xBF");
        if has_bom {
            r.reader.consume(3);
            r.advance_counters(b"\xEF\xBB\xBF");
        }
        r.skip_ws()?;
        match r.peek()? {
            Some(b'[') => {
                r.layout = Layout::List;
                r.take_byte()?;
            }
            Some(b'{') | None => r.layout = Layout::Lines,
            Some(other) => {
                return Err(r.syntax(format!(
                    "expected a JSON list `[` or JSONL objects, found {:?}",
                    other as char
                )))
            }
        }
        Ok(r)
    }

    fn io(&self, e: std::io::Error) -> InputError {
        InputError::Io {
            path: self.path.clone(),
            source: e,
        }
    }

    fn syntax(&self, message: String) -> InputError {
        InputError::Syntax {
            path: self.path.clone(),
            offset: self.offset,
            message,
        }
    }

    fn advance_counters(&mut self, bytes: &[u8]) {
        self.offset += bytes.len() as u64;
        self.bytes_read = self.offset;
        self.line += bytes.iter().filter(|&&b| b == b'\n').count() as u64;
    }

    fn peek(&mut self) -> Result<Option<u8>, InputError> {
        let buf = self.reader.fill_buf().map_err(|e| InputError::Io {
            path: self.path.clone(),
            source: e,
        })?;
        Ok(buf.first().copied())
    }

    fn take_byte(&mut self) -> Result<Option<u8>, InputError> {
        let b = self.peek()?;
        if let Some(b) = b {
            self.reader.consume(1);
            self.advance_counters(&[b]);
        }
        Ok(b)
    }

    fn skip_ws(&mut self) -> Result<(), InputError> {
        while let Some(b) = self.peek()? {
            if b.is_ascii_whitespace() {
                self.take_byte()?;
            } else {
                break;
            }
        }
        Ok(())
    }

    fn next_line(&mut self) -> Result<Option<RawSample>, InputError> {
        loop {
            let start_line = self.line;
            let mut buf = Vec::new();
            let n = (&mut self.reader)
                .take(MAX_SAMPLE_BYTES as u64 + 1)
                .read_until(b'\n', &mut buf)
                .map_err(|e| self.io(e))?;
            if n == 0 {
                return Ok(None);
            }
            if n > MAX_SAMPLE_BYTES {
                return Err(self.syntax(format!(
                    "line {start_line} is longer than {MAX_SAMPLE_BYTES} bytes (is this JSONL?)"
                )));
            }
            self.advance_counters(&buf);
            if buf.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let index = self.next_index;
            self.next_index += 1;
            return Ok(Some(RawSample {
                file: self.file,
                index,
                location: Location::Line(start_line),
                text: buf,
            }));
        }
    }

    fn next_element(&mut self) -> Result<Option<RawSample>, InputError> {
        self.skip_ws()?;
        match self.peek()? {
            None => return Err(self.syntax("the list is not closed (missing `]`)".into())),
            Some(b']') => {
                self.take_byte()?;
                self.skip_ws()?;
                if let Some(b) = self.peek()? {
                    return Err(self.syntax(format!(
                        "unexpected {:?} after the end of the list",
                        b as char
                    )));
                }
                return Ok(None);
            }
            _ => {}
        }
        let start = self.offset;
        let mut text = Vec::new();
        let (mut depth, mut in_string, mut escape) = (0u32, false, false);
        // Scan the reader's buffer in place and copy whole runs: a byte-at-a-time loop through
        // the reader was the serial bottleneck of large runs.
        loop {
            let buf = self.reader.fill_buf().map_err(|e| InputError::Io {
                path: self.path.clone(),
                source: e,
            })?;
            if buf.is_empty() {
                return Err(InputError::Syntax {
                    path: self.path.clone(),
                    offset: start,
                    message: if in_string {
                        "unterminated string in the list element starting here".into()
                    } else {
                        "the list ends inside the element starting here".into()
                    },
                });
            }
            let mut end = None;
            for (i, &b) in buf.iter().enumerate() {
                if in_string {
                    if escape {
                        escape = false;
                    } else if b == b'\\' {
                        escape = true;
                    } else if b == b'"' {
                        in_string = false;
                    }
                    continue;
                }
                match b {
                    b'"' => in_string = true,
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' if depth > 0 => depth -= 1,
                    b']' | b',' if depth == 0 => {
                        // the element ends here
                        end = Some(i);
                        break;
                    }
                    b'}' => {
                        return Err(InputError::Syntax {
                            path: self.path.clone(),
                            offset: self.offset + i as u64,
                            message: "unbalanced `}` in the list".into(),
                        });
                    }
                    _ => {}
                }
            }
            let take = end.unwrap_or(buf.len());
            text.extend_from_slice(&buf[..take]);
            self.reader.consume(take);
            self.offset += take as u64;
            self.bytes_read = self.offset;
            if text.len() > MAX_SAMPLE_BYTES {
                return Err(InputError::Syntax {
                    path: self.path.clone(),
                    offset: start,
                    message: format!(
                        "the list element starting here is longer than {MAX_SAMPLE_BYTES} bytes \
                         (an unterminated string?)"
                    ),
                });
            }
            if end.is_some() {
                break;
            }
        }
        // At `,` or `]`.
        if self.peek()? == Some(b',') {
            self.take_byte()?;
            self.skip_ws()?;
            if self.peek()? == Some(b']') {
                return Err(self.syntax("trailing comma before `]`".into()));
            }
        }
        while text.last().is_some_and(u8::is_ascii_whitespace) {
            text.pop();
        }
        if text.is_empty() {
            return Err(InputError::Syntax {
                path: self.path.clone(),
                offset: start,
                message: "empty list element".into(),
            });
        }
        let index = self.next_index;
        self.next_index += 1;
        Ok(Some(RawSample {
            file: self.file,
            index,
            location: Location::Offset(start),
            text,
        }))
    }
}

impl SampleReader {
    /// Up to `n` next samples (fewer at the end of the file, none after it).
    pub fn next_chunk(&mut self, n: usize) -> Result<Vec<RawSample>, InputError> {
        let mut chunk = Vec::with_capacity(n);
        for raw in self.by_ref() {
            chunk.push(raw?);
            if chunk.len() == n {
                break;
            }
        }
        Ok(chunk)
    }
}

impl Iterator for SampleReader {
    type Item = Result<RawSample, InputError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let r = match self.layout {
            Layout::Lines => self.next_line(),
            Layout::List => self.next_element(),
        };
        match r {
            Ok(Some(s)) => Some(Ok(s)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Vec<Result<String, String>> {
        let r = SampleReader::from_reader(
            Path::new("t.json"),
            0,
            Box::new(std::io::Cursor::new(text.as_bytes().to_vec())),
        );
        match r {
            Err(e) => vec![Err(e.to_string())],
            Ok(r) => r
                .map(|s| {
                    s.map(|s| String::from_utf8(s.text).unwrap())
                        .map_err(|e| e.to_string())
                })
                .collect(),
        }
    }

    #[test]
    fn list_elements_are_split_with_strings_and_nesting() {
        let got = read(" [ {\"a\": \"x,]}\\\"\"}, {\"b\": [1, {\"c\": 2}]} ,3 ]\n");
        assert_eq!(
            got,
            vec![
                Ok("{\"a\": \"x,]}\\\"\"}".into()),
                Ok("{\"b\": [1, {\"c\": 2}]}".into()),
                Ok("3".into())
            ]
        );
        assert!(read("[]").is_empty());
        assert!(read("\u{feff}[{}]").len() == 1);
    }

    /// A reader that hands out one byte per call, so every element crosses buffer boundaries.
    struct Trickle(std::io::Cursor<Vec<u8>>);

    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(1);
            self.0.read(&mut buf[..n])
        }
    }

    #[test]
    fn elements_split_across_reads_are_reassembled() {
        let text = b"[ {\"a\": \"x,]}\\\"\"}, {\"b\": [1, {\"c\": 2}]} ,3 ]".to_vec();
        let r = SampleReader::from_reader(
            Path::new("t.json"),
            0,
            Box::new(Trickle(std::io::Cursor::new(text))),
        )
        .unwrap();
        let got: Vec<String> = r
            .map(|s| String::from_utf8(s.unwrap().text).unwrap())
            .collect();
        assert_eq!(
            got,
            vec!["{\"a\": \"x,]}\\\"\"}", "{\"b\": [1, {\"c\": 2}]}", "3"]
        );
    }

    #[test]
    fn broken_lists_are_file_errors_with_offsets() {
        let got = read("[{\"a\": 1}, {\"b\": \"unterminated}]");
        assert!(got[0].is_ok());
        assert!(got[1].as_ref().unwrap_err().contains("byte 11"), "{got:?}");
        assert!(read("[{}").last().unwrap().is_err());
        assert!(read("[{},]").last().unwrap().is_err());
        assert!(read("[{}] x").last().unwrap().is_err());
        assert!(read("hello").last().unwrap().is_err());
    }

    #[test]
    fn jsonl_skips_blank_lines_and_keeps_line_numbers() {
        let r = SampleReader::from_reader(
            Path::new("t.jsonl"),
            2,
            Box::new(std::io::Cursor::new(
                b"{\"a\":1}\n\n{bad\n{\"c\":3}".to_vec(),
            )),
        )
        .unwrap();
        let got: Vec<_> = r.map(|s| s.unwrap()).collect();
        assert_eq!(got.len(), 3);
        assert_eq!(got[1].location, Location::Line(3));
        assert_eq!(got[1].index, 1);
        assert_eq!(got[2].file, 2);
    }
}
