//! TensorBoard event files, written by hand (no TensorFlow, no protobuf crate).
//!
//! An event file is a sequence of TFRecords: `u64` little-endian data length, `u32` masked
//! CRC32C of those 8 bytes, the data, `u32` masked CRC32C of the data. Each record's data is a
//! serialized `tensorflow.Event` protobuf. The first record carries only `file_version =
//! "brain.Event:2"`; scalars are `Event { wall_time, step, summary: Summary { value: [Value { tag,
//! simple_value }] } }`. A resumed run writes `Event { session_log: SessionLog { status: START }
//! }` at the first new step, which tells TensorBoard to drop the old file's events from that step
//! on (see [`EventWriter::session_start`]).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::LogError;

/// The `file_version` TensorBoard expects in the first record ("brain.Event:2" enables the
/// `SessionLog.START` purge logic of its readers).
pub const FILE_VERSION: &str = "brain.Event:2";

/// The Castagnoli CRC32 lookup table (reflected polynomial 0x82F63B78), built at compile time.
const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut k = 0;
        while k < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
            k += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// CRC32C (Castagnoli) of `data`, table-driven. `crc32c(b"123456789") == 0xE306_9283`.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc = CRC32C_TABLE[((crc ^ b as u32) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

/// The masked CRC32C TFRecord stores: `((crc >> 15) | (crc << 17)) + 0xa282ead8` (wrapping).
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    // `(crc >> 15) | (crc << 17)` is a right rotation by 15.
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Frames `data` as one TFRecord (length, masked CRC of the length, data, masked CRC of data).
pub fn tfrecord(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

// ---- protobuf encoding (only what Event needs) ----

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_key(out: &mut Vec<u8>, field: u32, wire_type: u8) {
    put_varint(out, ((field as u64) << 3) | wire_type as u64);
}

fn put_double(out: &mut Vec<u8>, field: u32, v: f64) {
    put_key(out, field, 1);
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_float(out: &mut Vec<u8>, field: u32, v: f32) {
    put_key(out, field, 5);
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_int64(out: &mut Vec<u8>, field: u32, v: i64) {
    put_key(out, field, 0);
    put_varint(out, v as u64);
}

fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(out, field, 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// `Event { wall_time = 1, step = 2 }` plus whatever field `extra` appends.
fn event(wall_time: f64, step: i64, extra: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut ev = Vec::with_capacity(64);
    put_double(&mut ev, 1, wall_time);
    put_int64(&mut ev, 2, step);
    extra(&mut ev);
    ev
}

/// Serialized `Event { wall_time, step, file_version }`.
pub fn file_version_event(wall_time: f64, step: i64) -> Vec<u8> {
    event(wall_time, step, |ev| {
        put_bytes(ev, 3, FILE_VERSION.as_bytes())
    })
}

/// Serialized `Event { wall_time, step, summary: Summary { value: [Value { tag, simple_value }] }
/// }` with one `Value` per `(tag, value)`.
pub fn scalars_event(wall_time: f64, step: i64, scalars: &[(&str, f32)]) -> Vec<u8> {
    let mut summary = Vec::with_capacity(32 * scalars.len());
    for &(tag, v) in scalars {
        let mut value = Vec::with_capacity(tag.len() + 8);
        put_bytes(&mut value, 1, tag.as_bytes());
        put_float(&mut value, 2, v);
        put_bytes(&mut summary, 1, &value);
    }
    event(wall_time, step, |ev| put_bytes(ev, 5, &summary))
}

/// Serialized `Event { wall_time, step, session_log (field 7): SessionLog { status: START (1) } }`.
pub fn session_start_event(wall_time: f64, step: i64) -> Vec<u8> {
    let mut log = Vec::with_capacity(2);
    put_key(&mut log, 1, 0);
    put_varint(&mut log, 1);
    event(wall_time, step, |ev| put_bytes(ev, 7, &log))
}

/// The current time as seconds since the Unix epoch.
pub(crate) fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// This machine's host name for the event file name (`/proc/sys/kernel/hostname`, else
/// `$HOSTNAME`, else "localhost"), with anything but `[A-Za-z0-9._-]` replaced by `_`.
fn hostname() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string());
    raw.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Writes one TensorBoard event file.
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// Creates `dir` if needed and a new file `dir/events.out.tfevents.<unix secs>.<hostname>.cpmv`
    /// holding the `file_version` record. If a file of that name exists (a resume within the same
    /// second), the seconds are bumped until the name is free, so files still sort in write
    /// order, which is the order TensorBoard reads them in.
    pub fn create(dir: &Path) -> Result<Self, LogError> {
        std::fs::create_dir_all(dir).map_err(|e| LogError::io(dir, e))?;
        let wall = now_secs();
        let host = hostname();
        let mut secs = wall as u64;
        let (path, file) = loop {
            let path = dir.join(format!("events.out.tfevents.{secs}.{host}.cpmv"));
            match File::options().write(true).create_new(true).open(&path) {
                Ok(f) => break (path, f),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => secs += 1,
                Err(e) => return Err(LogError::io(&path, e)),
            }
        };
        let mut w = Self {
            path,
            out: BufWriter::new(file),
        };
        w.write_event(&file_version_event(wall, 0))?;
        w.flush()?;
        Ok(w)
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one serialized `Event` as a TFRecord (buffered; see [`EventWriter::flush`]).
    pub fn write_event(&mut self, event: &[u8]) -> Result<(), LogError> {
        self.out
            .write_all(&tfrecord(event))
            .map_err(|e| LogError::io(&self.path, e))
    }

    /// Appends scalars for `step`, all in one `Event`.
    pub fn scalars(&mut self, step: u64, scalars: &[(&str, f32)]) -> Result<(), LogError> {
        self.write_event(&scalars_event(now_secs(), step as i64, scalars))
    }

    /// Appends a `SessionLog.START` event at `step`: TensorBoard then drops events it already
    /// read (from this run's earlier files) whose step is `>= step`.
    pub fn session_start(&mut self, step: u64) -> Result<(), LogError> {
        self.write_event(&session_start_event(now_secs(), step as i64))
    }

    /// Hands buffered records to the OS.
    pub fn flush(&mut self) -> Result<(), LogError> {
        self.out.flush().map_err(|e| LogError::io(&self.path, e))
    }

    /// Flushes and `fsync`s the file's data.
    pub fn sync(&mut self) -> Result<(), LogError> {
        self.flush()?;
        self.out
            .get_ref()
            .sync_data()
            .map_err(|e| LogError::io(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_vectors() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
        // RFC 3720 B.4: 32 bytes of zeros.
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xFFu8; 32]), 0x62A8_AB43);
    }

    #[test]
    fn varints() {
        let mut v = Vec::new();
        put_varint(&mut v, 0);
        put_varint(&mut v, 1);
        put_varint(&mut v, 300);
        put_varint(&mut v, u64::MAX);
        assert_eq!(
            v,
            [0x00, 0x01, 0xAC, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]
        );
    }

    #[test]
    fn file_version_event_bytes() {
        let ev = file_version_event(0.0, 0);
        let mut want = vec![0x09];
        want.extend_from_slice(&[0; 8]);
        want.extend_from_slice(&[0x10, 0x00, 0x1a, 13]);
        want.extend_from_slice(b"brain.Event:2");
        assert_eq!(ev, want);
    }

    #[test]
    fn session_start_is_field_7() {
        // event.proto: 6 is the deprecated `log_message`, 7 is `session_log`.
        let ev = session_start_event(0.0, 31);
        assert_eq!(&ev[9..], &[0x10, 31, 0x3a, 2, 0x08, 0x01]);
    }
}
