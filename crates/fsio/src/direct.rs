//! [`DirectWriter`]: large sequential files written around the page cache.
//!
//! `prep build` writes gigabytes of pixel slices that nobody reads back soon. Through the page
//! cache every byte costs a kernel copy, page allocation and later writeback and reclaim; on the
//! development VM that was ~2 s of kernel time per 1.8 GB (`dd`: 2.31 s buffered, 0.43 s with
//! `O_DIRECT`). With `O_DIRECT` (Linux) the file is written straight from an aligned buffer in
//! large blocks; the tail that is not a whole block is written normally at the end. Where the
//! file system refuses `O_DIRECT` (tmpfs, some network file systems) the writer falls back to
//! ordinary writes, with the same bytes in the file either way.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

/// Alignment of the buffer, of every direct write's length and of the file offset: covers
/// devices with 512-byte and 4 KiB logical blocks.
const BLOCK: usize = 4096;
/// Bytes collected before a direct write.
const CAPACITY: usize = 8 << 20;

/// A [`CAPACITY`]-byte heap buffer whose usable part starts at a [`BLOCK`] boundary: a plain `Vec` one block
/// longer than needed, used from its first aligned byte (it never grows, so never moves).
struct Aligned {
    bytes: Vec<u8>,
    start: usize,
}

impl Aligned {
    fn new() -> Aligned {
        let bytes = vec![0u8; CAPACITY + BLOCK];
        let start = bytes.as_ptr().align_offset(BLOCK);
        Aligned { bytes, start }
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[self.start..self.start + CAPACITY]
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.bytes[self.start..self.start + CAPACITY]
    }
}

/// A file writer that bypasses the page cache where it can (see the module documentation).
/// Bytes reach the file in whole blocks as the buffer fills and the rest at
/// [`DirectWriter::finish`], which must be called: dropping the writer loses the buffered tail
/// (callers discard such a file anyway).
pub struct DirectWriter {
    file: File,
    buf: Aligned,
    filled: usize,
    direct: bool,
}

impl DirectWriter {
    /// Creates (truncates) `path`, with `O_DIRECT` where the platform and file system allow.
    pub fn create(path: &Path) -> io::Result<DirectWriter> {
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::fs::OpenOptionsExt;
            let direct = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .custom_flags(libc::O_DIRECT)
                .open(path);
            match direct {
                Ok(file) => return Ok(DirectWriter::new(file, true)),
                // tmpfs and others refuse the flag (EINVAL): write normally.
                Err(e) if e.kind() == io::ErrorKind::InvalidInput => {}
                Err(e) => return Err(e),
            }
        }
        Ok(DirectWriter::new(File::create(path)?, false))
    }

    /// Creates (truncates) `path` for ordinary writes through the page cache.
    pub fn create_buffered(path: &Path) -> io::Result<DirectWriter> {
        Ok(DirectWriter::new(File::create(path)?, false))
    }

    fn new(file: File, direct: bool) -> DirectWriter {
        DirectWriter {
            file,
            buf: Aligned::new(),
            filled: 0,
            direct,
        }
    }

    /// Whether writes still bypass the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Turns `O_DIRECT` off for the rest of the file (for the tail, or after a refusal).
    fn stop_direct(&mut self) -> io::Result<()> {
        #[cfg(target_os = "linux")]
        if self.direct {
            use std::os::unix::io::AsRawFd;
            let fd = self.file.as_raw_fd();
            // SAFETY: fcntl on a file descriptor this writer owns; no memory is passed.
            let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
            if flags < 0
                // SAFETY: as above.
                || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_DIRECT) } < 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        self.direct = false;
        Ok(())
    }

    /// Writes the buffer's whole blocks (all of it when not direct) and keeps the rest.
    fn drain(&mut self) -> io::Result<()> {
        let whole = if self.direct {
            self.filled / BLOCK * BLOCK
        } else {
            self.filled
        };
        if whole == 0 {
            return Ok(());
        }
        let result = self.file.write_all(&self.buf.as_slice()[..whole]);
        match result {
            Ok(()) => {}
            Err(e) if self.direct && e.kind() == io::ErrorKind::InvalidInput => {
                // Accepted at open but refused on write (some file systems): write normally.
                // A failed direct write transfers nothing, so the offset is where it was.
                self.stop_direct()?;
                self.file.write_all(&self.buf.as_slice()[..whole])?;
            }
            Err(e) => return Err(e),
        }
        self.buf.as_mut_slice().copy_within(whole..self.filled, 0);
        self.filled -= whole;
        Ok(())
    }

    /// Writes everything still buffered and returns the file (not yet synced).
    pub fn finish(mut self) -> io::Result<File> {
        self.drain()?;
        if self.filled > 0 {
            self.stop_direct()?;
            self.drain()?;
        }
        Ok(self.file)
    }
}

impl Write for DirectWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.filled == CAPACITY {
            self.drain()?;
        }
        let n = data.len().min(CAPACITY - self.filled);
        self.buf.as_mut_slice()[self.filled..self.filled + n].copy_from_slice(&data[..n]);
        self.filled += n;
        Ok(n)
    }

    /// Writes the whole blocks buffered so far; a partial block waits for more bytes or for
    /// [`DirectWriter::finish`] (a direct write cannot end mid-block).
    fn flush(&mut self) -> io::Result<()> {
        self.drain()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pieces of awkward sizes around the block and buffer sizes.
    fn pieces() -> Vec<Vec<u8>> {
        let sizes = [
            1,
            7,
            BLOCK - 1,
            BLOCK,
            BLOCK + 1,
            3 * BLOCK + 17,
            CAPACITY - 5,
            CAPACITY + 123,
            2 * CAPACITY + BLOCK,
            0,
            64,
        ];
        sizes
            .iter()
            .enumerate()
            .map(|(k, &n)| (0..n).map(|i| (i * 31 + k * 7) as u8).collect())
            .collect()
    }

    fn round_trip(dir: &Path, direct: bool) -> bool {
        let path = dir.join(format!("f-{direct}"));
        let mut w = if direct {
            DirectWriter::create(&path).unwrap()
        } else {
            DirectWriter::create_buffered(&path).unwrap()
        };
        let was_direct = w.is_direct();
        let mut want = Vec::new();
        for (k, p) in pieces().into_iter().enumerate() {
            w.write_all(&p).unwrap();
            if k % 3 == 0 {
                w.flush().unwrap();
            }
            want.extend(p);
        }
        w.finish().unwrap().sync_all().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), want, "direct {direct}");
        was_direct
    }

    /// A directory on the build's disk (the repository's target/), where O_DIRECT is usually
    /// accepted, else the system temp dir.
    fn disk_dir() -> tempfile::TempDir {
        let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target");
        match target.is_dir() {
            true => tempfile::tempdir_in(target).unwrap(),
            false => tempfile::tempdir().unwrap(),
        }
    }

    #[test]
    fn writes_the_same_bytes_with_and_without_o_direct() {
        // On a disk O_DIRECT is taken; on tmpfs (/dev/shm) open refuses it and the writer
        // falls back; both give the same file.
        let mut dirs = vec![disk_dir(), tempfile::tempdir().unwrap()];
        if Path::new("/dev/shm").is_dir() {
            dirs.push(tempfile::tempdir_in("/dev/shm").unwrap());
        }
        for dir in &dirs {
            round_trip(dir.path(), true);
            assert!(!round_trip(dir.path(), false));
        }
    }

    #[test]
    fn an_empty_file_and_a_single_partial_block() {
        let dir = disk_dir();
        let path = dir.path().join("empty");
        DirectWriter::create(&path).unwrap().finish().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), Vec::<u8>::new());
        let mut w = DirectWriter::create(&path).unwrap();
        w.write_all(b"short").unwrap();
        w.finish().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"short");
    }
}
