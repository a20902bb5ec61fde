//! Writes packs of samples into size-bounded Arrow IPC shards (and optional Parquet twins).
//!
//! Files are written under a `.partial` name and only renamed to `shard-NNNNN.arrow` by
//! [`ShardSetWriter::finish`], once every shard is complete; the caller writes the manifest after
//! that. A run killed half-way therefore leaves nothing that looks like a finished shard set.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{
    FixedSizeListBuilder, Int32Builder, LargeBinaryBuilder, ListBuilder, StringBuilder,
};
use arrow_array::{ArrayRef, Int32Array, RecordBatch, UInt32Array};
use arrow_ipc::writer::{FileWriter, IpcWriteOptions};
use arrow_ipc::MetadataVersion;
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::manifest::ShardEntry;
use crate::schema::{shard_schema, Sample};
use crate::ShardError;

/// Alignment of every Arrow buffer in the file, so mapped columns can be used in place (and by
/// SIMD code) without copying.
pub const ALIGNMENT: usize = 64;

/// How shards are cut and which files are written.
#[derive(Clone, Debug)]
pub struct WriterOptions {
    /// A new shard is started once the current one holds at least this many bytes of data
    /// (packs are never split across shards).
    pub max_shard_bytes: u64,
    /// Rows are grouped into record batches of at most this many bytes...
    pub max_batch_bytes: u64,
    /// ...or this many rows.
    pub max_batch_rows: usize,
    /// Also write a zstd-compressed Parquet file next to each Arrow shard.
    pub parquet: bool,
    /// Write the Arrow IPC shards (false with `--format parquet`).
    pub arrow: bool,
}

impl Default for WriterOptions {
    fn default() -> Self {
        Self {
            max_shard_bytes: 1 << 30,
            max_batch_bytes: 64 << 20,
            max_batch_rows: 1024,
            parquet: false,
            arrow: true,
        }
    }
}

struct OpenShard {
    index: usize,
    arrow: Option<(PathBuf, FileWriter<BufWriter<File>>)>,
    parquet: Option<(PathBuf, ArrowWriter<File>)>,
    rows: u64,
    packs: u64,
    bytes: u64,
    first_pack: Option<u32>,
}

/// Writes a whole shard set into one directory.
pub struct ShardSetWriter {
    dir: PathBuf,
    opts: WriterOptions,
    schema: Arc<Schema>,
    current: Option<OpenShard>,
    pending: Vec<(u32, Sample)>,
    pending_bytes: u64,
    done: Vec<ShardEntry>,
    partial_files: Vec<(PathBuf, PathBuf)>,
}

/// Final name of shard `index` with extension `ext`.
pub fn shard_file_name(index: usize, ext: &str) -> String {
    format!("shard-{index:05}.{ext}")
}

fn sample_bytes(s: &Sample) -> u64 {
    (s.pixel_bytes() + s.input_ids.len() * 8 + s.id.len() + 64) as u64
}

impl ShardSetWriter {
    /// Prepares to write into `dir` (which must exist).
    pub fn new(dir: &Path, opts: WriterOptions) -> Self {
        Self {
            dir: dir.to_path_buf(),
            opts,
            schema: Arc::new(shard_schema()),
            current: None,
            pending: Vec::new(),
            pending_bytes: 0,
            done: Vec::new(),
            partial_files: Vec::new(),
        }
    }

    /// Appends one pack (its rows are written consecutively, in the given order, with `pack`
    /// as their `pack` value).
    pub fn write_pack(&mut self, pack: u32, samples: Vec<Sample>) -> Result<(), ShardError> {
        let need_new = match &self.current {
            None => true,
            Some(s) => s.bytes >= self.opts.max_shard_bytes && s.rows > 0,
        };
        if need_new {
            self.flush_batch()?;
            self.close_current()?;
            self.open_next()?;
        }
        let cur = self.current.as_mut().expect("shard opened above");
        cur.first_pack.get_or_insert(pack);
        cur.packs += 1;
        for s in samples {
            let b = sample_bytes(&s);
            cur.bytes += b;
            cur.rows += 1;
            self.pending_bytes += b;
            self.pending.push((pack, s));
        }
        if self.pending_bytes >= self.opts.max_batch_bytes
            || self.pending.len() >= self.opts.max_batch_rows
        {
            self.flush_batch()?;
        }
        Ok(())
    }

    fn open_next(&mut self) -> Result<(), ShardError> {
        let index = self.done.len();
        let arrow = if self.opts.arrow {
            let path = self
                .dir
                .join(format!("{}.partial", shard_file_name(index, "arrow")));
            let file = File::create(&path).map_err(|e| ShardError::io(&path, e))?;
            let options = IpcWriteOptions::try_new(ALIGNMENT, false, MetadataVersion::V5)
                .map_err(|e| ShardError::arrow(&path, e))?;
            let w = FileWriter::try_new_with_options(BufWriter::new(file), &self.schema, options)
                .map_err(|e| ShardError::arrow(&path, e))?;
            Some((path, w))
        } else {
            None
        };
        let parquet = if self.opts.parquet {
            let path = self
                .dir
                .join(format!("{}.partial", shard_file_name(index, "parquet")));
            let file = File::create(&path).map_err(|e| ShardError::io(&path, e))?;
            let props = WriterProperties::builder()
                .set_compression(Compression::ZSTD(
                    ZstdLevel::try_new(3).expect("valid level"),
                ))
                .build();
            let w = ArrowWriter::try_new(file, self.schema.clone(), Some(props)).map_err(|e| {
                ShardError::Parquet {
                    path: path.display().to_string(),
                    source: e,
                }
            })?;
            Some((path, w))
        } else {
            None
        };
        self.current = Some(OpenShard {
            index,
            arrow,
            parquet,
            rows: 0,
            packs: 0,
            bytes: 0,
            first_pack: None,
        });
        Ok(())
    }

    fn flush_batch(&mut self) -> Result<(), ShardError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let rows = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        let batch =
            build_batch(&self.schema, &rows).map_err(|e| ShardError::arrow(&self.dir, e))?;
        let cur = self
            .current
            .as_mut()
            .expect("a shard is open while rows are pending");
        if let Some((path, w)) = cur.arrow.as_mut() {
            w.write(&batch).map_err(|e| ShardError::arrow(path, e))?;
        }
        if let Some((path, w)) = cur.parquet.as_mut() {
            // One row group per batch: the Parquet writer never buffers a whole shard.
            w.write(&batch)
                .and_then(|_| w.flush())
                .map_err(|e| ShardError::Parquet {
                    path: path.display().to_string(),
                    source: e,
                })?;
        }
        Ok(())
    }

    fn close_current(&mut self) -> Result<(), ShardError> {
        let Some(cur) = self.current.take() else {
            return Ok(());
        };
        let mut entry = ShardEntry {
            file: None,
            parquet: None,
            rows: cur.rows,
            packs: cur.packs,
            first_pack: cur.first_pack.unwrap_or(0),
            bytes: 0,
        };
        if let Some((path, mut w)) = cur.arrow {
            w.finish().map_err(|e| ShardError::arrow(&path, e))?;
            let inner = w.into_inner().map_err(|e| ShardError::arrow(&path, e))?;
            let file = inner
                .into_inner()
                .map_err(|e| ShardError::io(&path, e.into_error()))?;
            file.sync_all().map_err(|e| ShardError::io(&path, e))?;
            entry.bytes = file.metadata().map_err(|e| ShardError::io(&path, e))?.len();
            let name = shard_file_name(cur.index, "arrow");
            self.partial_files.push((path, self.dir.join(&name)));
            entry.file = Some(name);
        }
        if let Some((path, w)) = cur.parquet {
            w.close().map_err(|e| ShardError::Parquet {
                path: path.display().to_string(),
                source: e,
            })?;
            let name = shard_file_name(cur.index, "parquet");
            self.partial_files.push((path, self.dir.join(&name)));
            entry.parquet = Some(name);
        }
        self.done.push(entry);
        Ok(())
    }

    /// Abandons the set: closes nothing, removes every `.partial` file (used when the run
    /// fails, so nothing that looks like a finished shard is left behind).
    pub fn abort(mut self) {
        let mut partial: Vec<PathBuf> =
            self.partial_files.drain(..).map(|(from, _)| from).collect();
        if let Some(cur) = self.current.take() {
            partial.extend(cur.arrow.map(|(p, _)| p));
            partial.extend(cur.parquet.map(|(p, _)| p));
        }
        for p in partial {
            let _ = std::fs::remove_file(p);
        }
    }

    /// Writes what is buffered, closes the last shard and gives every file its final name.
    /// Returns the shard entries for the manifest.
    pub fn finish(mut self) -> Result<Vec<ShardEntry>, ShardError> {
        self.flush_batch()?;
        self.close_current()?;
        for (from, to) in &self.partial_files {
            std::fs::rename(from, to).map_err(|e| ShardError::io(to, e))?;
        }
        Ok(self.done)
    }
}

fn build_batch(
    schema: &Arc<Schema>,
    rows: &[(u32, Sample)],
) -> Result<RecordBatch, arrow_schema::ArrowError> {
    let n = rows.len();
    let item = |dt: DataType| Arc::new(Field::new("item", dt, false));

    let mut ids = StringBuilder::with_capacity(n, rows.iter().map(|r| r.1.id.len()).sum());
    let tokens: usize = rows.iter().map(|r| r.1.input_ids.len()).sum();
    let mut input_ids =
        ListBuilder::new(Int32Builder::with_capacity(tokens)).with_field(item(DataType::Int32));
    let mut labels =
        ListBuilder::new(Int32Builder::with_capacity(tokens)).with_field(item(DataType::Int32));
    let pair_field = item(DataType::FixedSizeList(item(DataType::Int32), 2));
    let pairs = || {
        ListBuilder::new(
            FixedSizeListBuilder::new(Int32Builder::new(), 2).with_field(item(DataType::Int32)),
        )
        .with_field(pair_field.clone())
    };
    let mut bounds = pairs();
    let mut sizes = pairs();
    let pix_bytes: usize = rows.iter().map(|r| r.1.pixel_bytes()).sum();
    let mut pixels = ListBuilder::new(LargeBinaryBuilder::with_capacity(n, pix_bytes))
        .with_field(item(DataType::LargeBinary));
    let mut num_tokens = Vec::with_capacity(n);
    let mut packs = Vec::with_capacity(n);

    for (pack, s) in rows {
        ids.append_value(&s.id);
        input_ids.values().append_slice(&s.input_ids);
        input_ids.append(true);
        labels.values().append_slice(&s.labels);
        labels.append(true);
        for (builder, list) in [(&mut bounds, &s.image_bound), (&mut sizes, &s.tgt_sizes)] {
            for p in list {
                builder.values().values().append_slice(p);
                builder.values().append(true);
            }
            builder.append(true);
        }
        for p in &s.pixel_values {
            pixels.values().append_value(p);
        }
        pixels.append(true);
        num_tokens.push(s.input_ids.len() as i32);
        packs.push(*pack);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(ids.finish()),
        Arc::new(input_ids.finish()),
        Arc::new(labels.finish()),
        Arc::new(bounds.finish()),
        Arc::new(sizes.finish()),
        Arc::new(pixels.finish()),
        Arc::new(Int32Array::from(num_tokens)),
        Arc::new(UInt32Array::from(packs)),
    ];
    RecordBatch::try_new(schema.clone(), columns)
}
