//! Writes packs of samples into size-bounded Arrow IPC shards (and optional Parquet twins).
//!
//! Files are written under a `.partial` name, flushed to the disk when their shard closes, and
//! only renamed to `shard-NNNNN.arrow` when the whole set is published
//! ([`ClosedShardSet::publish`]); the caller writes the manifest after that. A run killed
//! half-way therefore leaves nothing that looks like a finished shard set, and a failed run
//! removes what it wrote.

use std::fs::File;

use cpmv_fsio::DirectWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{
    FixedSizeListBuilder, Int32Builder, ListBuilder, StringBuilder, UInt32Builder,
};
use arrow_array::{ArrayRef, Int32Array, LargeBinaryArray, ListArray, RecordBatch, UInt32Array};
use arrow_buffer::{Buffer, OffsetBuffer, ScalarBuffer};
use arrow_ipc::writer::{FileWriter, IpcWriteOptions};
use arrow_ipc::{CompressionType, MetadataVersion};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression as ParquetCompression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::images::ImageStoreWriter;
use crate::manifest::{Compression, ImagesEntry, PixelMode, ShardEntry};
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
    /// Rows are grouped into record batches of at most this many bytes (a pack of
    /// [`SOLO_PACK_BYTES`] of slices or more, and every pack of a compressed set, is a batch of
    /// its own)...
    pub max_batch_bytes: u64,
    /// ...or this many rows.
    pub max_batch_rows: usize,
    /// Also write a zstd-compressed Parquet file next to each Arrow shard.
    pub parquet: bool,
    /// Write the Arrow IPC shards (false with `--format parquet`).
    pub arrow: bool,
    /// Where pixels go: the rows (slices), or each distinct image file once into the image
    /// store (`Sample::source_images`, referenced by `image_refs`).
    pub pixels: PixelMode,
    /// Buffer compression of the Arrow shards. A compressed shard gets one record batch per
    /// pack: a reader decompresses the batch of the rows it wants, and a loader wants a pack.
    pub compression: Compression,
}

impl Default for WriterOptions {
    fn default() -> Self {
        Self {
            max_shard_bytes: 1 << 30,
            max_batch_bytes: 64 << 20,
            max_batch_rows: 1024,
            parquet: false,
            arrow: true,
            pixels: PixelMode::Slices,
            compression: Compression::None,
        }
    }
}

struct OpenShard {
    index: usize,
    /// Arrow shards bypass the page cache where the file system allows (gigabytes of slices
    /// nobody reads back soon: see `cpmv_fsio::DirectWriter`).
    arrow: Option<(PathBuf, FileWriter<DirectWriter>)>,
    parquet: Option<(PathBuf, ArrowWriter<File>)>,
    /// Rows and bytes in the Parquet writer's open row group (cut by the batch limits even when
    /// compressed Arrow batches are cut per pack).
    parquet_group: (usize, u64),
    rows: u64,
    packs: u64,
    bytes: u64,
    first_pack: Option<u32>,
}

/// The slices of a pack's rows in one buffer, the way the pixel column stores them: row after
/// row, each row's slices in model order (u8 RGB, row-major). A pack of this many bytes or more
/// is written as a record batch of its own whose pixel column *is* this buffer, so the slices
/// reach the file without being copied into a batch first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PackPixels {
    /// Every slice of every row, back to back.
    pub data: Vec<u8>,
    /// Where each slice ends in `data`.
    pub slice_ends: Vec<usize>,
    /// How many slices each row has (one entry per row of the pack, 0 for rows without
    /// slices, e.g. in a set of `--pixels source`).
    pub row_slices: Vec<usize>,
}

impl PackPixels {
    /// The pixels of `samples` (their `pixel_values`), copied into one buffer.
    pub fn of_samples(samples: &[Sample]) -> Self {
        let mut p = PackPixels {
            data: Vec::with_capacity(samples.iter().map(|s| s.pixel_bytes()).sum()),
            ..Default::default()
        };
        for s in samples {
            for slice in &s.pixel_values {
                p.data.extend_from_slice(slice);
                p.slice_ends.push(p.data.len());
            }
            p.row_slices.push(s.pixel_values.len());
        }
        p
    }

    /// How far the pack reaches now, to undo a row that fails half-way
    /// ([`PackPixels::truncate`]).
    pub fn mark(&self) -> PackMark {
        PackMark {
            data: self.data.len(),
            slices: self.slice_ends.len(),
            rows: self.row_slices.len(),
        }
    }

    /// Drops everything added since `mark` was taken.
    pub fn truncate(&mut self, mark: PackMark) {
        self.data.truncate(mark.data);
        self.slice_ends.truncate(mark.slices);
        self.row_slices.truncate(mark.rows);
    }

    /// Closes a row: the slices added since `mark` are its slices.
    pub fn end_row(&mut self, mark: PackMark) {
        self.row_slices.truncate(mark.rows);
        self.row_slices.push(self.slice_ends.len() - mark.slices);
    }

    /// Checks that the buffer, the slice ends and the row counts agree with `rows` rows.
    fn check(&self, pack: u32, rows: usize) -> Result<(), ShardError> {
        let bad = |reason: String| Err(ShardError::Pack { pack, reason });
        if self.row_slices.len() != rows {
            return bad(format!(
                "slice counts for {} rows, the pack has {rows}",
                self.row_slices.len()
            ));
        }
        let slices: usize = self.row_slices.iter().sum();
        if slices != self.slice_ends.len() {
            return bad(format!(
                "rows count {slices} slices, {} slice ends given",
                self.slice_ends.len()
            ));
        }
        if self.slice_ends.windows(2).any(|w| w[0] > w[1])
            || self.slice_ends.last().copied().unwrap_or(0) != self.data.len()
        {
            return bad(format!(
                "slice ends do not run in order to the end of {} pixel bytes",
                self.data.len()
            ));
        }
        Ok(())
    }

    /// Each slice, in order.
    pub fn slices(&self) -> impl Iterator<Item = &[u8]> + '_ {
        let mut start = 0;
        self.slice_ends.iter().map(move |&end| {
            let slice = &self.data[start..end];
            start = end;
            slice
        })
    }

    /// Bytes of pixels of each row.
    fn row_bytes(&self) -> impl Iterator<Item = usize> + '_ {
        let mut slice = 0;
        let mut start = 0;
        self.row_slices.iter().map(move |&n| {
            slice += n;
            let end = if slice == 0 {
                0
            } else {
                self.slice_ends[slice - 1]
            };
            let bytes = end - start;
            start = end;
            bytes
        })
    }
}

/// A point of a [`PackPixels`] to go back to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackMark {
    data: usize,
    slices: usize,
    rows: usize,
}

/// Packs of at least this many pixel bytes get a record batch of their own, written from their
/// own buffer (smaller ones share a batch, copied into it: a batch per pack of a text-only set
/// would be mostly metadata).
pub const SOLO_PACK_BYTES: usize = 1 << 20;

/// Rows waiting for the next record batch: their pixels already laid out as the pixel column.
#[derive(Default)]
struct Pending {
    rows: Vec<(u32, Sample)>,
    bytes: u64,
    /// The pixel column's values and, per slice, where it ends (LargeBinary offsets, from 0).
    pixels: Vec<u8>,
    slice_offsets: Vec<i64>,
    /// Slices of each row.
    row_slices: Vec<usize>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Adds a checked pack's pixels: its buffer is taken as it is when nothing is pending
    /// (a solo pack: no copy), else appended.
    fn add_pixels(&mut self, px: PackPixels) {
        if self.slice_offsets.is_empty() {
            self.slice_offsets.push(0);
        }
        let base = self.pixels.len();
        if base == 0 {
            self.pixels = px.data;
        } else {
            self.pixels.extend_from_slice(&px.data);
        }
        self.slice_offsets
            .extend(px.slice_ends.iter().map(|&e| (base + e) as i64));
        self.row_slices.extend_from_slice(&px.row_slices);
    }
}

/// Writes a whole shard set into one directory.
pub struct ShardSetWriter {
    dir: PathBuf,
    opts: WriterOptions,
    schema: Arc<Schema>,
    current: Option<OpenShard>,
    pending: Pending,
    done: Vec<ShardEntry>,
    partial_files: Vec<(PathBuf, PathBuf)>,
    /// The image store (`--pixels source`), opened with the first pack.
    images: Option<ImageStoreWriter>,
}

/// Suffix of every file while it is being written (the name it is published under plus this).
pub const PARTIAL_SUFFIX: &str = ".partial";

/// Final name of shard `index` with extension `ext`.
pub fn shard_file_name(index: usize, ext: &str) -> String {
    format!("shard-{index:05}.{ext}")
}

/// True for a file name [`shard_file_name`] gives an Arrow or Parquet shard:
/// `shard-` + at least five ASCII digits + `.arrow` or `.parquet`.
pub fn is_shard_file_name(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("shard-") else {
        return false;
    };
    let Some(digits) = rest
        .strip_suffix(".arrow")
        .or_else(|| rest.strip_suffix(".parquet"))
    else {
        return false;
    };
    digits.len() >= 5 && digits.bytes().all(|b| b.is_ascii_digit())
}

/// True for every name `prep build` writes into a shard directory, final or partial:
/// `manifest.json`, `rejected.jsonl`, the shard files, `images.arrow`, and each of them with
/// [`PARTIAL_SUFFIX`]. Anything else in the directory belongs to someone else, and a rebuild
/// must not delete it.
pub fn is_set_file_name(name: &str) -> bool {
    let base = name.strip_suffix(PARTIAL_SUFFIX).unwrap_or(name);
    base == crate::manifest::MANIFEST_FILE
        || base == crate::manifest::REJECTED_FILE
        || base == crate::images::IMAGES_FILE
        || is_shard_file_name(base)
}

/// Arrow IPC write options: aligned buffers, metadata V5, and `compression`.
fn ipc_options(compression: Compression) -> Result<IpcWriteOptions, arrow_schema::ArrowError> {
    let options = IpcWriteOptions::try_new(ALIGNMENT, false, MetadataVersion::V5)?;
    match compression {
        Compression::None => Ok(options),
        Compression::Lz4 => options.try_with_compression(Some(CompressionType::LZ4_FRAME)),
        Compression::Zstd => options
            .try_with_compression(Some(CompressionType::ZSTD))?
            .try_with_compression_level(Some(ZSTD_LEVEL)),
    }
}

/// zstd level of `--compression zstd`.
pub const ZSTD_LEVEL: i32 = 1;

fn partial_name(name: &str) -> String {
    format!("{name}{PARTIAL_SUFFIX}")
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
            pending: Pending::default(),
            done: Vec::new(),
            partial_files: Vec::new(),
            images: None,
        }
    }

    /// Appends one pack (its rows are written consecutively, in the given order, with `pack`
    /// as their `pack` value). Its slices are copied out of the samples; see
    /// [`ShardSetWriter::write_pack_pixels`] for a pack whose slices are in one buffer already.
    pub fn write_pack(&mut self, pack: u32, mut samples: Vec<Sample>) -> Result<(), ShardError> {
        let pixels = PackPixels::of_samples(&samples);
        for s in &mut samples {
            s.pixel_values = Vec::new();
        }
        self.write_pack_pixels(pack, samples, pixels)
    }

    /// [`ShardSetWriter::write_pack`] for rows whose slices are in `pixels` (their own
    /// `pixel_values` must be empty). A pack of [`SOLO_PACK_BYTES`] or more goes to the file
    /// from `pixels`' own buffer.
    pub fn write_pack_pixels(
        &mut self,
        pack: u32,
        mut samples: Vec<Sample>,
        pixels: PackPixels,
    ) -> Result<(), ShardError> {
        pixels.check(pack, samples.len())?;
        for (s, &n) in samples.iter().zip(&pixels.row_slices) {
            let want = match self.opts.pixels {
                PixelMode::Slices => s.tgt_sizes.len(),
                PixelMode::Source => 0,
            };
            let reason = if !s.pixel_values.is_empty() {
                "has slices of its own besides the pack's".to_string()
            } else if n != want {
                format!("has {n} slices in the pack's pixels, {want} expected")
            } else {
                continue;
            };
            return Err(ShardError::Pack {
                pack,
                reason: format!("row {:?} {reason}", s.id),
            });
        }
        if self.opts.pixels == PixelMode::Source {
            if self.images.is_none() {
                self.images = Some(ImageStoreWriter::create(&self.dir)?);
            }
            let store = self.images.as_mut().expect("created above");
            for s in &mut samples {
                for img in std::mem::take(&mut s.source_images) {
                    let r = store.add(img.sha256, img.bytes)?;
                    s.image_refs.push(r);
                }
            }
        }
        let need_new = match &self.current {
            None => true,
            Some(s) => s.bytes >= self.opts.max_shard_bytes && s.rows > 0,
        };
        if need_new {
            self.flush_batch()?;
            self.close_current()?;
            self.open_next()?;
        }
        // Compressed sets get a batch per pack whatever its size (what a reader decompresses
        // at once).
        let solo =
            self.opts.compression != Compression::None || pixels.data.len() >= SOLO_PACK_BYTES;
        if solo {
            self.flush_batch()?;
        }
        let cur = self.current.as_mut().expect("shard opened above");
        cur.first_pack.get_or_insert(pack);
        cur.packs += 1;
        for (s, pix) in samples.drain(..).zip(pixels.row_bytes()) {
            let b = sample_bytes(&s) + pix as u64;
            cur.bytes += b;
            cur.rows += 1;
            self.pending.bytes += b;
            self.pending.rows.push((pack, s));
        }
        self.pending.add_pixels(pixels);
        if solo
            || self.pending.bytes >= self.opts.max_batch_bytes
            || self.pending.rows.len() >= self.opts.max_batch_rows
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
                .join(partial_name(&shard_file_name(index, "arrow")));
            let file = DirectWriter::create(&path).map_err(|e| ShardError::io(&path, e))?;
            let options =
                ipc_options(self.opts.compression).map_err(|e| ShardError::arrow(&path, e))?;
            let w = FileWriter::try_new_with_options(file, &self.schema, options)
                .map_err(|e| ShardError::arrow(&path, e))?;
            Some((path, w))
        } else {
            None
        };
        let parquet = if self.opts.parquet {
            let path = self
                .dir
                .join(partial_name(&shard_file_name(index, "parquet")));
            let file = File::create(&path).map_err(|e| ShardError::io(&path, e))?;
            let props = WriterProperties::builder()
                .set_compression(ParquetCompression::ZSTD(
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
            parquet_group: (0, 0),
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
        let pending = std::mem::take(&mut self.pending);
        let bytes = pending.bytes;
        let batch =
            build_batch(&self.schema, pending).map_err(|e| ShardError::arrow(&self.dir, e))?;
        let cur = self
            .current
            .as_mut()
            .expect("a shard is open while rows are pending");
        if let Some((path, w)) = cur.arrow.as_mut() {
            w.write(&batch).map_err(|e| ShardError::arrow(path, e))?;
        }
        if let Some((path, w)) = cur.parquet.as_mut() {
            // Row groups of up to a batch's limits: the Parquet writer never buffers a whole
            // shard, and one-pack Arrow batches (large packs, compressed sets) do not make tiny
            // row groups.
            let group = &mut cur.parquet_group;
            group.0 += batch.num_rows();
            group.1 += bytes;
            let cut = group.0 >= self.opts.max_batch_rows || group.1 >= self.opts.max_batch_bytes;
            w.write(&batch)
                .and_then(|_| if cut { w.flush() } else { Ok(()) })
                .map_err(|e| ShardError::Parquet {
                    path: path.display().to_string(),
                    source: e,
                })?;
            if cut {
                *group = (0, 0);
            }
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
            let file = inner.finish().map_err(|e| ShardError::io(&path, e))?;
            file.sync_all().map_err(|e| ShardError::io(&path, e))?;
            entry.bytes = file.metadata().map_err(|e| ShardError::io(&path, e))?.len();
            let name = shard_file_name(cur.index, "arrow");
            self.partial_files.push((path, self.dir.join(&name)));
            entry.file = Some(name);
        }
        if let Some((path, mut w)) = cur.parquet {
            w.finish().map_err(|e| ShardError::Parquet {
                path: path.display().to_string(),
                source: e,
            })?;
            // `finish` wrote the footer and flushed the writer's buffers into the file.
            w.inner().sync_all().map_err(|e| ShardError::io(&path, e))?;
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
        if let Some(store) = self.images.take() {
            partial.push(store.partial_path().to_path_buf());
        }
        if let Some(cur) = self.current.take() {
            partial.extend(cur.arrow.map(|(p, _)| p));
            partial.extend(cur.parquet.map(|(p, _)| p));
        }
        for p in partial {
            let _ = std::fs::remove_file(p);
        }
    }

    /// Writes what is buffered and closes the last shard: every file is complete and flushed to
    /// the disk, still under its `.partial` name. On an error every partial file is removed.
    pub fn close(mut self) -> Result<ClosedShardSet, ShardError> {
        if let Err(e) = self.flush_batch().and_then(|()| self.close_current()) {
            self.abort();
            return Err(e);
        }
        // A set of source pixels always has a store, if an empty one.
        if self.opts.pixels == PixelMode::Source && self.images.is_none() {
            match ImageStoreWriter::create(&self.dir) {
                Ok(w) => self.images = Some(w),
                Err(e) => {
                    self.abort();
                    return Err(e);
                }
            }
        }
        let mut images = None;
        if let Some(store) = self.images.take() {
            let partial = store.partial_path().to_path_buf();
            match store.close() {
                Ok((from, name, entry)) => {
                    self.partial_files.push((from, self.dir.join(name)));
                    images = Some(entry);
                }
                Err(e) => {
                    let _ = std::fs::remove_file(partial);
                    self.abort();
                    return Err(e);
                }
            }
        }
        Ok(ClosedShardSet {
            dir: self.dir,
            entries: self.done,
            files: self.partial_files,
            images,
        })
    }

    /// [`ShardSetWriter::close`], then [`ClosedShardSet::publish`]: every file under its final
    /// name. Returns the shard entries for the manifest. On an error nothing is left behind.
    pub fn finish(self) -> Result<Vec<ShardEntry>, ShardError> {
        self.close()?.publish()
    }
}

/// A shard set whose files are complete and durable but still carry their `.partial` names:
/// the caller publishes it once everything else of the run has succeeded, or discards it.
#[derive(Debug)]
pub struct ClosedShardSet {
    dir: PathBuf,
    entries: Vec<ShardEntry>,
    /// (partial name, final name) of every file.
    files: Vec<(PathBuf, PathBuf)>,
    images: Option<ImagesEntry>,
}

impl ClosedShardSet {
    /// The shard entries the manifest will list.
    pub fn entries(&self) -> &[ShardEntry] {
        &self.entries
    }

    /// The image store's entry (`--pixels source`).
    pub fn images(&self) -> Option<&ImagesEntry> {
        self.images.as_ref()
    }

    /// Renames every file to its final name. The directory is flushed before the renames (so
    /// the files' own entries are on the disk) and after them (so the new names are), which
    /// lets a manifest written afterwards rely on every shard it lists. On an error every file
    /// of the set, renamed or not, is removed.
    pub fn publish(self) -> Result<Vec<ShardEntry>, ShardError> {
        let res = self.rename_all();
        match res {
            Ok(()) => Ok(self.entries),
            Err(e) => {
                for (from, to) in &self.files {
                    let _ = std::fs::remove_file(from);
                    let _ = std::fs::remove_file(to);
                }
                Err(e)
            }
        }
    }

    fn rename_all(&self) -> Result<(), ShardError> {
        cpmv_fsio::sync_dir(&self.dir)?;
        for (from, to) in &self.files {
            std::fs::rename(from, to).map_err(|e| ShardError::io(to, e))?;
        }
        Ok(cpmv_fsio::sync_dir(&self.dir)?)
    }

    /// Removes every (partial) file of the set, for a run that failed after closing it.
    pub fn discard(self) {
        for (from, _) in &self.files {
            let _ = std::fs::remove_file(from);
        }
    }
}

fn build_batch(
    schema: &Arc<Schema>,
    pending: Pending,
) -> Result<RecordBatch, arrow_schema::ArrowError> {
    let Pending {
        rows,
        pixels: pixel_bytes,
        mut slice_offsets,
        row_slices,
        ..
    } = pending;
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
    // The pixel column around the pending buffer as it is (no copy).
    if slice_offsets.is_empty() {
        slice_offsets.push(0);
    }
    let slices = LargeBinaryArray::try_new(
        OffsetBuffer::new(ScalarBuffer::from(slice_offsets)),
        Buffer::from_vec(pixel_bytes),
        None,
    )?;
    let pixels = ListArray::try_new(
        item(DataType::LargeBinary),
        OffsetBuffer::<i32>::from_lengths(row_slices),
        Arc::new(slices),
        None,
    )?;
    let mut num_tokens = Vec::with_capacity(n);
    let mut packs = Vec::with_capacity(n);
    let mut image_refs = ListBuilder::new(UInt32Builder::new()).with_field(item(DataType::UInt32));

    for (pack, s) in &rows {
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
        image_refs.values().append_slice(&s.image_refs);
        image_refs.append(true);
        num_tokens.push(s.input_ids.len() as i32);
        packs.push(*pack);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(ids.finish()),
        Arc::new(input_ids.finish()),
        Arc::new(labels.finish()),
        Arc::new(bounds.finish()),
        Arc::new(sizes.finish()),
        Arc::new(pixels),
        Arc::new(Int32Array::from(num_tokens)),
        Arc::new(UInt32Array::from(packs)),
        Arc::new(image_refs.finish()),
    ];
    RecordBatch::try_new(schema.clone(), columns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{
        Counts, Fingerprints, Manifest, ModelInfo, Packing, TokenTotals, FORMAT_NAME,
        FORMAT_VERSION,
    };
    use crate::reader::ShardDir;

    fn sample(id: &str) -> Sample {
        Sample {
            id: id.into(),
            input_ids: vec![1, 2, 3],
            labels: vec![-100, 3, -100],
            image_bound: vec![],
            tgt_sizes: vec![[1, 1]],
            pixel_values: vec![vec![7u8; 14 * 14 * 3]],
            ..Sample::default()
        }
    }

    /// A compressed set cuts one Arrow record batch per pack (what a reader decompresses at
    /// once), while its Parquet twin keeps row groups of the usual batch limits.
    #[test]
    fn compressed_arrow_batches_per_pack_and_parquet_row_groups_by_limits() {
        use parquet::file::reader::{FileReader, SerializedFileReader};
        let dir = tempfile::tempdir().unwrap();
        let opts = WriterOptions {
            max_batch_rows: 4,
            parquet: true,
            compression: Compression::Zstd,
            ..Default::default()
        };
        let mut w = ShardSetWriter::new(dir.path(), opts);
        for p in 0..10 {
            w.write_pack(p, vec![sample(&format!("s{p}"))]).unwrap();
        }
        let entries = w.finish().unwrap();
        assert_eq!(entries.len(), 1);
        let arrow =
            crate::reader::ShardReader::open(&dir.path().join(entries[0].file.as_ref().unwrap()))
                .unwrap();
        assert!(arrow.compressed());
        assert_eq!(arrow.len(), 10);
        assert_eq!(arrow.num_batches(), 10, "one record batch per pack");
        let parquet = dir.path().join(entries[0].parquet.as_ref().unwrap());
        let reader = SerializedFileReader::new(File::open(parquet).unwrap()).unwrap();
        let groups: Vec<i64> = (0..reader.num_row_groups())
            .map(|g| reader.metadata().row_group(g).num_rows())
            .collect();
        assert_eq!(groups, vec![4, 4, 2]);
    }

    /// A pack of `rows` rows of `slices` slices each, every slice `bytes` long and filled
    /// with its own value.
    fn pack_of(tag: u8, rows: usize, slices: usize, bytes: usize) -> (Vec<Sample>, PackPixels) {
        let mut px = PackPixels::default();
        let samples = (0..rows)
            .map(|r| {
                let mark = px.mark();
                for k in 0..slices {
                    let v = tag.wrapping_mul(31).wrapping_add((r * slices + k) as u8);
                    px.data.extend(std::iter::repeat_n(v, bytes));
                    px.slice_ends.push(px.data.len());
                }
                px.end_row(mark);
                Sample {
                    id: format!("p{tag}r{r}"),
                    input_ids: vec![1, 2],
                    labels: vec![2, -100],
                    tgt_sizes: vec![[1, 1]; slices],
                    ..Sample::default()
                }
            })
            .collect();
        (samples, px)
    }

    /// Large packs get a batch of their own and go to the file from their own buffer; small
    /// ones share batches; every row reads back with its slices either way, in order.
    #[test]
    fn large_packs_are_batches_of_their_own_and_small_ones_share() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ShardSetWriter::new(dir.path(), WriterOptions::default());
        // (rows, slices per row, bytes per slice): small, small, large, small, large.
        let shapes = [
            (2, 1, 100),
            (1, 3, 50),
            (2, 2, SOLO_PACK_BYTES / 4),
            (1, 0, 0),
            (1, 1, SOLO_PACK_BYTES),
        ];
        let mut want = Vec::new();
        for (p, &(rows, slices, bytes)) in shapes.iter().enumerate() {
            let (samples, px) = pack_of(p as u8, rows, slices, bytes);
            {
                let mut each = px.slices();
                for (s, &n) in samples.iter().zip(&px.row_slices) {
                    let mut full = s.clone();
                    full.pixel_values = each.by_ref().take(n).map(<[u8]>::to_vec).collect();
                    want.push((p as u32, full));
                }
            }
            w.write_pack_pixels(p as u32, samples, px).unwrap();
        }
        let entries = w.finish().unwrap();
        let r =
            crate::reader::ShardReader::open(&dir.path().join(entries[0].file.as_ref().unwrap()))
                .unwrap();
        // Packs 0 and 1 share a batch; 2 alone; 3 waits and is flushed before 4; 4 alone.
        assert_eq!(r.num_batches(), 4);
        assert_eq!(r.len(), want.len());
        for (i, (pack, s)) in want.iter().enumerate() {
            let row = r.sample(i).unwrap().unwrap();
            let v = row.view();
            assert_eq!((v.id, v.pack), (s.id.as_str(), *pack));
            let got: Vec<Vec<u8>> = v.pixel_values.iter().map(|p| p.to_vec()).collect();
            assert!(got == s.pixel_values, "row {i} pixels");
        }
    }

    /// The pixel column of a batch is the pending buffer itself, not a copy of it.
    #[test]
    fn a_batch_s_pixel_column_is_the_pack_s_buffer() {
        let (samples, px) = pack_of(7, 2, 3, 1000);
        let ptr = px.data.as_ptr();
        let mut pending = Pending {
            rows: samples.into_iter().map(|s| (0, s)).collect(),
            ..Pending::default()
        };
        pending.add_pixels(px);
        let batch = build_batch(&Arc::new(shard_schema()), pending).unwrap();
        let col = batch
            .column_by_name(crate::schema::col::PIXEL_VALUES)
            .unwrap()
            .as_any()
            .downcast_ref::<ListArray>()
            .unwrap()
            .values()
            .as_any()
            .downcast_ref::<LargeBinaryArray>()
            .unwrap()
            .values()
            .as_ptr();
        assert_eq!(col, ptr);
    }

    /// Pixels that do not add up, rows with slices of their own next to the pack's, or slice
    /// counts a row's sizes do not match are the caller's error, named by pack and row, and
    /// leave nothing in the set.
    #[test]
    fn inconsistent_pack_pixels_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ShardSetWriter::new(dir.path(), WriterOptions::default());
        let (samples, mut px) = pack_of(1, 2, 2, 10);
        px.slice_ends[1] = 5;
        let err = w.write_pack_pixels(3, samples.clone(), px).unwrap_err();
        assert!(matches!(err, ShardError::Pack { pack: 3, .. }), "{err}");
        let (_, mut px) = pack_of(1, 2, 2, 10);
        px.row_slices.pop();
        let err = w.write_pack_pixels(3, samples.clone(), px).unwrap_err();
        assert!(matches!(err, ShardError::Pack { pack: 3, .. }), "{err}");
        let (_, mut px) = pack_of(1, 2, 2, 10);
        px.data.push(0);
        let err = w.write_pack_pixels(3, samples.clone(), px).unwrap_err();
        assert!(matches!(err, ShardError::Pack { pack: 3, .. }), "{err}");
        let (mut samples, px) = pack_of(1, 2, 2, 10);
        samples[1].pixel_values = vec![vec![1; 10]];
        let err = w.write_pack_pixels(4, samples, px).unwrap_err().to_string();
        assert!(err.contains("pack 4") && err.contains("p1r1"), "{err}");
        // Slices that a row's sizes do not account for: the rows would get each other's.
        let (mut samples, px) = pack_of(2, 2, 2, 10);
        samples[0].tgt_sizes.pop();
        let err = w.write_pack_pixels(5, samples, px).unwrap_err().to_string();
        assert!(err.contains("p2r0") && err.contains("1 expected"), "{err}");
        // Nothing of the refused packs reached the set.
        let (samples, px) = pack_of(3, 1, 1, 10);
        w.write_pack_pixels(6, samples, px).unwrap();
        let entries = w.finish().unwrap();
        let r =
            crate::reader::ShardReader::open(&dir.path().join(entries[0].file.as_ref().unwrap()))
                .unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r.sample(0).unwrap().unwrap().view().id, "p3r0");
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn write_set(dir: &Path, arrow: bool, parquet: bool) -> ClosedShardSet {
        let opts = WriterOptions {
            max_shard_bytes: 500,
            arrow,
            parquet,
            ..Default::default()
        };
        let mut w = ShardSetWriter::new(dir, opts);
        for p in 0..3 {
            w.write_pack(p, vec![sample(&format!("s{p}"))]).unwrap();
        }
        w.close().unwrap()
    }

    fn manifest(shards: Vec<ShardEntry>) -> Manifest {
        Manifest {
            format: FORMAT_NAME.into(),
            format_version: FORMAT_VERSION,
            tool: "test".into(),
            model: ModelInfo {
                dir: "m".into(),
                version: "2.6".into(),
                llm_type: "qwen".into(),
                tokenizer: String::new(),
            },
            fingerprints: Fingerprints {
                tokenizer: String::new(),
                chat_template: String::new(),
                settings: String::new(),
            },
            settings: crate::settings::BuildSettings {
                format_version: FORMAT_VERSION,
                sample: crate::settings::SampleSettings {
                    llm_type: crate::settings::LlmType::Qwen,
                    max_slice_nums: 9,
                    scale_resolution: 448,
                    patch_size: 14,
                    query_num: 64,
                    max_length: 2048,
                    truncate: false,
                    image_id_mode: crate::settings::ImageIdMode::Reference,
                    exif_transpose: false,
                },
                batch_vision: true,
                pack: true,
                max_slices_per_pack: 40,
                pack_window: 512,
            },
            inputs: vec![],
            counts: Counts::default(),
            tokens: TokenTotals::default(),
            packing: Packing {
                enabled: true,
                max_length: 2048,
                max_slices_per_pack: 40,
                packs: 3,
                fill_ratio: 0.0,
            },
            shards,
            pixels: PixelMode::Slices,
            images: None,
            compression: Compression::None,
        }
    }

    #[test]
    fn set_file_names_are_recognised_exactly() {
        for ours in [
            "manifest.json",
            "manifest.json.partial",
            "rejected.jsonl",
            "rejected.jsonl.partial",
            "shard-00000.arrow",
            "shard-00012.parquet",
            "shard-00003.arrow.partial",
            "shard-123456.parquet.partial",
        ] {
            assert!(is_set_file_name(ours), "{ours}");
        }
        for foreign in [
            "manifest.json.bak",
            "my-manifest.json",
            "rejected.jsonl.old",
            "shard-0000.arrow",
            "shard-0000a.arrow",
            "shard-00000.arrow.bak",
            "shard-00000.arrows",
            "shard-00000.feather",
            "shard-00000.arrow.partial.partial",
            "notes.txt",
            ".partial",
        ] {
            assert!(!is_set_file_name(foreign), "{foreign}");
        }
    }

    #[test]
    fn a_closed_set_stays_partial_until_published_and_can_be_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let closed = write_set(dir.path(), true, true);
        assert!(closed.entries().len() >= 2);
        let partial = names(dir.path());
        assert!(
            !partial.is_empty() && partial.iter().all(|n| n.ends_with(PARTIAL_SUFFIX)),
            "{partial:?}"
        );
        closed.discard();
        assert!(names(dir.path()).is_empty());

        let closed = write_set(dir.path(), true, true);
        let entries = closed.publish().unwrap();
        let published = names(dir.path());
        assert!(
            published.iter().all(|n| is_shard_file_name(n)),
            "{published:?}"
        );
        assert_eq!(published.len(), entries.len() * 2);
        // The Parquet twins are complete files (footer magic at the end).
        for e in &entries {
            let bytes = std::fs::read(dir.path().join(e.parquet.as_ref().unwrap())).unwrap();
            assert!(bytes.ends_with(b"PAR1"));
        }
    }

    #[test]
    fn a_failed_publish_removes_the_whole_set() {
        let dir = tempfile::tempdir().unwrap();
        let closed = write_set(dir.path(), true, false);
        // A directory under the first final name makes its rename fail.
        let first = closed.files[0].1.clone();
        std::fs::create_dir(&first).unwrap();
        std::fs::write(first.join("x"), b"x").unwrap();
        assert!(closed.publish().is_err());
        assert_eq!(
            names(dir.path()),
            vec![first.file_name().unwrap().to_string_lossy()]
        );
    }

    #[test]
    fn manifest_save_is_atomic_and_parquet_only_sets_are_refused_by_the_reader() {
        let dir = tempfile::tempdir().unwrap();
        let entries = write_set(dir.path(), false, true).publish().unwrap();
        manifest(entries).save(dir.path()).unwrap();
        assert!(!dir.path().join("manifest.json.partial").exists());
        let err = ShardDir::open(dir.path()).err().unwrap();
        let msg = err.to_string();
        assert!(matches!(err, ShardError::ParquetOnly { .. }), "{msg}");
        assert!(
            msg.contains("--format arrow") && msg.contains("--format both"),
            "{msg}"
        );
        // A save into a missing directory fails and leaves nothing.
        assert!(manifest(vec![]).save(&dir.path().join("missing")).is_err());
    }
}
