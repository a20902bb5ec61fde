//! Reading shards: the file is memory-mapped and, in an uncompressed file, Arrow arrays point
//! into the map (zero-copy). A file written with `--compression lz4|zstd` is decoded one record
//! batch (one pack) at a time, when a row of it is asked for; nothing decoded is kept beyond
//! the rows that hold it, so memory stays bounded whatever the number of shards.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{Int32Type, UInt32Type};
use arrow_array::{Array, RecordBatch};
use arrow_buffer::Buffer;
use arrow_ipc::convert::try_fb_to_schema;
use arrow_ipc::reader::{read_footer_length, FileDecoder};
use arrow_ipc::{root_as_footer, Block};

use std::borrow::Cow;

use crate::images::{slices_from_file, ImageStore};
use crate::manifest::{Manifest, PixelMode};
use crate::schema::{col, shard_schema};
use crate::ShardError;

/// A memory-mapped Arrow IPC file. Uncompressed, its record batches are decoded at open and
/// point into the map; compressed, each batch is decoded (decompressed) when asked for.
pub(crate) struct Mapped {
    path: PathBuf,
    map: Buffer,
    decoder: FileDecoder,
    /// Decodes without the columns `open` was told to leave out (they are not decompressed).
    lean: FileDecoder,
    blocks: Vec<Block>,
    /// Row index where each batch starts, plus the total at the end.
    starts: Vec<usize>,
    /// Every batch of an uncompressed file (views into the map); empty for a compressed one.
    batches: Vec<RecordBatch>,
    /// Whether the file's batches are compressed (decoded on demand).
    compressed: bool,
}

/// Largest uncompressed size a compressed buffer may declare: 1 GiB, or 4096 times its
/// compressed size (zstd's ratio on uniform pixels). A damaged length prefix is refused here
/// instead of becoming a huge allocation in the decompressor.
fn max_uncompressed(compressed: u64) -> u64 {
    (1u64 << 30).max(compressed.saturating_mul(4096))
}

/// The row count of a record-batch block and whether its buffers are compressed, read from the
/// block's message header; a compressed block's buffers are checked to lie inside the body
/// and to declare plausible uncompressed sizes.
fn block_header(map: &Buffer, block: &Block) -> Result<(usize, bool), String> {
    let meta = &map[block.offset() as usize..][..block.metaDataLength() as usize];
    let skip = if meta.len() >= 8 && meta[..4] == [0xff; 4] {
        8
    } else {
        4
    };
    let message = meta
        .get(skip..)
        .ok_or("a record batch header is truncated")
        .and_then(|m| {
            arrow_ipc::root_as_message(m).map_err(|_| "a record batch header does not parse")
        })?;
    let batch = message
        .header_as_record_batch()
        .ok_or("a block is not a record batch")?;
    let rows =
        usize::try_from(batch.length()).map_err(|_| "a record batch has a negative length")?;
    let compressed = batch.compression().is_some();
    if compressed {
        let body_start = block.offset() as u64 + block.metaDataLength() as u64;
        let body_len = block.bodyLength() as u64;
        for b in batch.buffers().into_iter().flatten() {
            let (offset, len) = (b.offset() as u64, b.length() as u64);
            if offset.checked_add(len).is_none_or(|end| end > body_len) {
                return Err("a buffer lies outside its record batch".into());
            }
            if len == 0 {
                continue;
            }
            if len < 8 {
                return Err("a compressed buffer is shorter than its length prefix".into());
            }
            // Arrow IPC compression: each buffer starts with its uncompressed length (i64 LE,
            // -1 when stored uncompressed).
            let at = (body_start + offset) as usize;
            let prefix: [u8; 8] = map
                .get(at..at + 8)
                .and_then(|p| p.try_into().ok())
                .ok_or("a compressed buffer is shorter than its length prefix")?;
            let declared = i64::from_le_bytes(prefix);
            let plausible =
                declared == -1 || u64::try_from(declared).is_ok_and(|d| d <= max_uncompressed(len));
            if !plausible {
                return Err(format!(
                    "a compressed buffer of {len} bytes declares {declared} bytes uncompressed"
                ));
            }
        }
    }
    Ok((rows, compressed))
}

impl Mapped {
    /// Maps `path` and decodes its footer and record-batch headers (no data is copied);
    /// `accept(schema)` says whether its columns are the expected ones (`what` names them).
    /// [`Mapped::decode_lean`] decodes batches without the columns named in `leave_out`.
    pub(crate) fn open(
        path: &Path,
        accept: impl Fn(&arrow_schema::Schema) -> bool,
        what: &str,
        leave_out: &[&str],
    ) -> Result<Mapped, ShardError> {
        let file = std::fs::File::open(path).map_err(|e| ShardError::io(path, e))?;
        // SAFETY: set files are written once and never modified in place (they are renamed
        // into place when complete); mapping them read-only is sound as long as no one edits
        // them while we read, which the format forbids.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ShardError::io(path, e))?;
        let map = Buffer::from(bytes::Bytes::from_owner(mmap));
        if map.len() < 10 + 6 || &map[..6] != b"ARROW1" {
            return Err(ShardError::format(path, "not an Arrow IPC file"));
        }
        let trailer_start = map.len() - 10;
        let footer_len = read_footer_length(map[trailer_start..].try_into().expect("10 bytes"))
            .map_err(|e| ShardError::arrow(path, e))?;
        let footer_start = trailer_start
            .checked_sub(footer_len)
            .ok_or_else(|| ShardError::format(path, "footer length exceeds the file"))?;
        let footer = root_as_footer(&map[footer_start..trailer_start])
            .map_err(|e| ShardError::format(path, format!("bad footer: {e}")))?;
        let schema = try_fb_to_schema(
            footer
                .schema()
                .ok_or_else(|| ShardError::format(path, "footer without schema"))?,
        )
        .map_err(|e| ShardError::arrow(path, e))?;
        if !accept(&schema) {
            return Err(ShardError::format(
                path,
                format!("columns differ from those of {what}: found {schema:?}"),
            ));
        }
        let kept = (0..schema.fields().len())
            .filter(|&k| !leave_out.contains(&schema.field(k).name().as_str()))
            .collect();
        let schema = Arc::new(schema);
        let decoder = FileDecoder::new(schema.clone(), footer.version());
        let lean = FileDecoder::new(schema, footer.version()).with_projection(kept);
        let mut blocks = Vec::new();
        let mut starts = vec![0];
        let mut compressed = false;
        for block in footer.recordBatches().into_iter().flatten() {
            let (offset, body, meta) = (block.offset(), block.bodyLength(), block.metaDataLength());
            let in_file = offset >= 0
                && body >= 0
                && meta >= 0
                && (offset as u64)
                    .checked_add(body as u64 + meta as u64)
                    .is_some_and(|end| end <= map.len() as u64);
            if !in_file {
                return Err(ShardError::format(
                    path,
                    "a record batch lies outside the file",
                ));
            }
            let (rows, packed) =
                block_header(&map, block).map_err(|e| ShardError::format(path, e))?;
            compressed |= packed;
            let total: usize = starts.last().copied().unwrap_or(0);
            let total = total
                .checked_add(rows)
                .ok_or_else(|| ShardError::format(path, "row counts overflow"))?;
            starts.push(total);
            blocks.push(*block);
        }
        let mut mapped = Mapped {
            path: path.to_path_buf(),
            map,
            decoder,
            lean,
            blocks,
            starts,
            batches: Vec::new(),
            compressed,
        };
        if !compressed {
            mapped.batches = (0..mapped.blocks.len())
                .map(|b| mapped.decode(b))
                .collect::<Result<_, _>>()?;
        }
        Ok(mapped)
    }

    /// Decodes batch `b` from the map (views into it, or decompressed copies).
    fn decode(&self, b: usize) -> Result<RecordBatch, ShardError> {
        self.decode_with(&self.decoder, b)
    }

    /// Batch `b` without the columns `open` was told to leave out: in a compressed file those
    /// are neither decompressed nor copied.
    pub(crate) fn decode_lean(&self, b: usize) -> Result<RecordBatch, ShardError> {
        match self.mapped_batches() {
            Some(all) => Ok(all[b].clone()),
            None => self.decode_with(&self.lean, b),
        }
    }

    fn decode_with(&self, decoder: &FileDecoder, b: usize) -> Result<RecordBatch, ShardError> {
        let block = &self.blocks[b];
        let len = block.bodyLength() as usize + block.metaDataLength() as usize;
        let data = self.map.slice_with_length(block.offset() as usize, len);
        let batch = decoder
            .read_record_batch(block, &data)
            .map_err(|e| ShardError::arrow(&self.path, e))?
            .ok_or_else(|| ShardError::format(&self.path, "empty record batch block"))?;
        let rows = self.starts[b + 1] - self.starts[b];
        if batch.num_rows() != rows {
            return Err(ShardError::format(
                &self.path,
                format!(
                    "record batch {b} holds {} rows, its header says {rows}",
                    batch.num_rows()
                ),
            ));
        }
        Ok(batch)
    }

    /// Batch `b`: the mapped one, or a compressed one decoded now.
    pub(crate) fn batch(&self, b: usize) -> Result<RecordBatch, ShardError> {
        match self.mapped_batches() {
            Some(all) => Ok(all[b].clone()),
            None => self.decode(b),
        }
    }

    /// Every batch of an uncompressed file, decoded at open; `None` for a compressed one.
    pub(crate) fn mapped_batches(&self) -> Option<&[RecordBatch]> {
        (!self.compressed).then_some(&self.batches[..])
    }

    /// Whether the file's record batches are compressed.
    pub(crate) fn compressed(&self) -> bool {
        self.compressed
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Number of rows.
    pub(crate) fn len(&self) -> usize {
        *self.starts.last().unwrap_or(&0)
    }

    /// Number of record batches.
    pub(crate) fn num_batches(&self) -> usize {
        self.blocks.len()
    }

    /// The batch holding row `i` and the row's index in it.
    pub(crate) fn locate(&self, i: usize) -> Option<(usize, usize)> {
        if i >= self.len() {
            return None;
        }
        let b = self.starts.partition_point(|&s| s <= i) - 1;
        Some((b, i - self.starts[b]))
    }
}

/// One memory-mapped shard file.
pub struct ShardReader {
    mapped: Mapped,
}

/// One row of a shard: it holds the row's record batch (mapped, or decompressed), so it stays
/// valid on its own. [`Row::view`] borrows the row's values.
#[derive(Clone)]
pub struct Row {
    batch: RecordBatch,
    r: usize,
}

impl std::fmt::Debug for Row {
    /// The row's id and place, not its batch (which holds pixels).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = self.view();
        f.debug_struct("Row")
            .field("id", &v.id)
            .field("row_in_batch", &self.r)
            .field("tokens", &v.num_tokens)
            .finish()
    }
}

impl Row {
    /// The row's values, borrowed from its batch.
    pub fn view(&self) -> SampleView<'_> {
        view(&self.batch, self.r)
    }
}

/// A borrowed view of one row. Slices point into the memory map (or into a decompressed batch).
#[derive(Debug, Clone)]
pub struct SampleView<'a> {
    pub id: &'a str,
    pub input_ids: &'a [i32],
    pub labels: &'a [i32],
    pub image_bound: Vec<[i32; 2]>,
    pub tgt_sizes: Vec<[i32; 2]>,
    /// One u8 RGB HWC buffer per slice (empty in a set of `--pixels source`: see
    /// [`ShardDir::pixels`]).
    pub pixel_values: Vec<&'a [u8]>,
    /// `--pixels source`: each image's row in the set's image store.
    pub image_refs: &'a [u32],
    pub num_tokens: i32,
    pub pack: u32,
    /// The row was read without its pixels ([`ShardReader::samples_without_pixels`]):
    /// `pixel_values` is empty whatever the set holds.
    pub pixels_left_out: bool,
}

impl SampleView<'_> {
    /// Checks the row's internal consistency (lengths, bounds inside the sequence, one pixel
    /// buffer per slice). Tools that index with these values call it first, so a damaged or
    /// foreign file gives an error instead of a panic.
    pub fn check(&self) -> Result<(), String> {
        let n = self.input_ids.len();
        if self.labels.len() != n || self.num_tokens as usize != n {
            return Err(format!(
                "row {:?}: {} input ids, {} labels, num_tokens {}",
                self.id,
                n,
                self.labels.len(),
                self.num_tokens
            ));
        }
        if let Some(b) = self
            .image_bound
            .iter()
            .find(|b| b[0] < 0 || b[0] > b[1] || b[1] as usize > n)
        {
            return Err(format!(
                "row {:?}: image bound {b:?} outside 0..{n}",
                self.id
            ));
        }
        let stored_as_source = self.pixel_values.is_empty() && !self.image_refs.is_empty();
        let counted = !stored_as_source && !self.pixels_left_out;
        if (counted && self.tgt_sizes.len() != self.pixel_values.len())
            || self.tgt_sizes.iter().any(|t| t[0] < 0 || t[1] < 0)
        {
            return Err(format!(
                "row {:?}: {} slice sizes for {} pixel buffers",
                self.id,
                self.tgt_sizes.len(),
                self.pixel_values.len()
            ));
        }
        Ok(())
    }
}

impl ShardReader {
    /// Maps `path` and decodes its footer and record-batch headers (no data is copied).
    /// Shards written before the `image_refs` column are read too.
    pub fn open(path: &Path) -> Result<ShardReader, ShardError> {
        let expected = shard_schema();
        let accept = |s: &arrow_schema::Schema| {
            s.fields() == expected.fields()
                || s.fields()[..] == expected.fields()[..crate::schema::LEGACY_COLUMNS]
        };
        Ok(ShardReader {
            mapped: Mapped::open(path, accept, "a shard", &[col::PIXEL_VALUES])?,
        })
    }

    /// Path of the file.
    pub fn path(&self) -> &Path {
        self.mapped.path()
    }

    /// Number of rows (samples).
    pub fn len(&self) -> usize {
        self.mapped.len()
    }

    /// True when the shard has no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of record batches (one per pack in a compressed file).
    pub fn num_batches(&self) -> usize {
        self.mapped.num_batches()
    }

    /// Whether the file was written with `--compression lz4|zstd` (rows are decompressed when
    /// read rather than used in place).
    pub fn compressed(&self) -> bool {
        self.mapped.compressed()
    }

    /// The mapped file's bytes (tests use it to prove that columns are not copies).
    pub fn mapped_bytes(&self) -> &[u8] {
        self.mapped.map.as_slice()
    }

    /// Row `i`, or `None` past the end; an error when its batch does not decode. In a
    /// compressed file this decodes the row's whole batch: read a pack's rows with
    /// [`ShardReader::rows`].
    pub fn sample(&self, i: usize) -> Result<Option<Row>, ShardError> {
        Ok(self.rows(&[i])?.pop().flatten())
    }

    /// Rows `indices` (`None` past the end), each compressed batch among them decoded once.
    pub fn rows(&self, indices: &[usize]) -> Result<Vec<Option<Row>>, ShardError> {
        let mut decoded: HashMap<usize, RecordBatch> = HashMap::new();
        indices
            .iter()
            .map(|&i| {
                let Some((b, r)) = self.mapped.locate(i) else {
                    return Ok(None);
                };
                let batch = match decoded.get(&b) {
                    Some(batch) => batch.clone(),
                    None => {
                        let batch = self.mapped.batch(b)?;
                        decoded.insert(b, batch.clone());
                        batch
                    }
                };
                Ok(Some(Row { batch, r }))
            })
            .collect()
    }

    /// All rows in order (each compressed batch decoded once, not kept).
    pub fn samples(&self) -> impl Iterator<Item = Result<Row, ShardError>> + '_ {
        self.scan(|b| self.mapped.batch(b))
    }

    /// All rows in order, where a compressed file leaves their pixels out (not decompressed:
    /// a scan of lengths, ids and labels costs a fraction of a full read). Their views say
    /// so in [`SampleView::pixels_left_out`]; an uncompressed file gives its whole rows.
    pub fn samples_without_pixels(&self) -> impl Iterator<Item = Result<Row, ShardError>> + '_ {
        self.scan(|b| self.mapped.decode_lean(b))
    }

    fn scan<'a>(
        &'a self,
        batch: impl Fn(usize) -> Result<RecordBatch, ShardError> + 'a,
    ) -> impl Iterator<Item = Result<Row, ShardError>> + 'a {
        (0..self.mapped.num_batches()).flat_map(move |b| {
            let rows: Vec<Result<Row, ShardError>> = match batch(b) {
                Ok(batch) => (0..batch.num_rows())
                    .map(|r| {
                        Ok(Row {
                            batch: batch.clone(),
                            r,
                        })
                    })
                    .collect(),
                Err(e) => vec![Err(e)],
            };
            rows
        })
    }
}

fn list_i32<'a>(batch: &'a RecordBatch, name: &str, r: usize) -> &'a [i32] {
    let list = batch
        .column_by_name(name)
        .expect("schema checked on open")
        .as_list::<i32>();
    let offsets = list.value_offsets();
    let (s, e) = (offsets[r] as usize, offsets[r + 1] as usize);
    let values = list.values().as_primitive::<Int32Type>();
    &values.values()[s..e]
}

fn pairs(batch: &RecordBatch, name: &str, r: usize) -> Vec<[i32; 2]> {
    let list = batch
        .column_by_name(name)
        .expect("schema checked on open")
        .as_list::<i32>();
    let offsets = list.value_offsets();
    let (s, e) = (offsets[r] as usize, offsets[r + 1] as usize);
    let fsl = list.values().as_fixed_size_list();
    let flat = fsl.values().as_primitive::<Int32Type>().values();
    let base = fsl.offset();
    (s..e)
        .map(|k| [flat[(base + k) * 2], flat[(base + k) * 2 + 1]])
        .collect()
}

fn view(batch: &RecordBatch, r: usize) -> SampleView<'_> {
    let id = batch
        .column_by_name(col::ID)
        .expect("schema checked on open")
        .as_string::<i32>()
        .value(r);
    // Absent when the batch was decoded without it (`samples_without_pixels`).
    let pix = batch
        .column_by_name(col::PIXEL_VALUES)
        .map(|c| c.as_list::<i32>());
    let pixel_values = match pix {
        Some(pix) => {
            let offsets = pix.value_offsets();
            let bin = pix.values().as_binary::<i64>();
            (offsets[r] as usize..offsets[r + 1] as usize)
                .map(|k| bin.value(k))
                .collect()
        }
        None => Vec::new(),
    };
    let num_tokens = batch
        .column_by_name(col::NUM_TOKENS)
        .expect("schema checked on open")
        .as_primitive::<Int32Type>()
        .value(r);
    let pack = batch
        .column_by_name(col::PACK)
        .expect("schema checked on open")
        .as_primitive::<UInt32Type>()
        .value(r);
    let image_refs = match batch.column_by_name(col::IMAGE_REFS) {
        Some(c) => {
            let list = c.as_list::<i32>();
            let offsets = list.value_offsets();
            let (s, e) = (offsets[r] as usize, offsets[r + 1] as usize);
            &list.values().as_primitive::<UInt32Type>().values()[s..e]
        }
        // A shard written before the column existed: a set of slices.
        None => &[][..],
    };
    SampleView {
        id,
        image_refs,
        input_ids: list_i32(batch, col::INPUT_IDS, r),
        labels: list_i32(batch, col::LABELS, r),
        image_bound: pairs(batch, col::IMAGE_BOUND, r),
        tgt_sizes: pairs(batch, col::TGT_SIZES, r),
        pixel_values,
        num_tokens,
        pack,
        pixels_left_out: pix.is_none(),
    }
}

/// A finished shard directory: its manifest and every Arrow shard it lists, mapped (and its
/// image store, in a set of `--pixels source`).
pub struct ShardDir {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub shards: Vec<ShardReader>,
    pub images: Option<ImageStore>,
}

impl ShardDir {
    /// Opens `dir`; fails when the manifest is missing (unfinished run), a listed shard is
    /// missing or malformed, or the set has no Arrow files (`--format parquet`: refused with
    /// how to get them, rather than read as a set without samples).
    pub fn open(dir: &Path) -> Result<ShardDir, ShardError> {
        let manifest = Manifest::load(dir)?;
        let mut shards = Vec::new();
        for entry in &manifest.shards {
            let Some(file) = &entry.file else {
                return Err(if entry.parquet.is_some() {
                    ShardError::ParquetOnly {
                        dir: dir.display().to_string(),
                    }
                } else {
                    ShardError::Manifest {
                        path: dir
                            .join(crate::manifest::MANIFEST_FILE)
                            .display()
                            .to_string(),
                        reason: "a shard entry names no file".into(),
                    }
                });
            };
            let reader = ShardReader::open(&dir.join(file))?;
            if reader.len() as u64 != entry.rows {
                return Err(ShardError::format(
                    reader.path(),
                    format!("{} rows, the manifest says {}", reader.len(), entry.rows),
                ));
            }
            shards.push(reader);
        }
        let images = match (manifest.pixels, &manifest.images) {
            (PixelMode::Slices, _) => None,
            (PixelMode::Source, None) => {
                return Err(ShardError::Manifest {
                    path: dir
                        .join(crate::manifest::MANIFEST_FILE)
                        .display()
                        .to_string(),
                    reason: "pixels \"source\" without an \"images\" entry".into(),
                })
            }
            (PixelMode::Source, Some(entry)) => {
                let store = ImageStore::open(&dir.join(&entry.file))?;
                if store.len() as u64 != entry.count {
                    return Err(ShardError::format(
                        store.path(),
                        format!("{} images, the manifest says {}", store.len(), entry.count),
                    ));
                }
                Some(store)
            }
        };
        Ok(ShardDir {
            dir: dir.to_path_buf(),
            manifest,
            shards,
            images,
        })
    }

    /// The u8 RGB slices of row `s`, one per `tgt_sizes` entry: the stored ones in a set of
    /// slices (borrowed from the map), or, in a set of `--pixels source`, made again from the
    /// stored image files by `prep build`'s own decoder and slicer. Errors name the row and
    /// the image when a stored file is missing, does not decode, or slices to other sizes than
    /// the row says.
    pub fn pixels<'a>(&self, s: &SampleView<'a>) -> Result<Vec<Cow<'a, [u8]>>, ShardError> {
        let Some(store) = &self.images else {
            return Ok(s.pixel_values.iter().map(|p| Cow::Borrowed(*p)).collect());
        };
        let settings = &self.manifest.settings.sample;
        let patch = settings.patch_size as i32;
        let bad = |msg: String| ShardError::format(store.path(), format!("row {:?}: {msg}", s.id));
        let mut out = Vec::with_capacity(s.tgt_sizes.len());
        for &r in s.image_refs {
            let bytes = store
                .get(r)
                .ok_or_else(|| bad(format!("image {r} is not in the store")))?;
            let slices = slices_from_file(bytes, settings)
                .map_err(|e| bad(format!("image {r} does not decode: {e}")))?;
            for (data, [h, w]) in slices {
                let k = out.len();
                let want = s.tgt_sizes.get(k).copied();
                if want != Some([h as i32 / patch, w as i32 / patch]) {
                    return Err(bad(format!(
                        "image {r} slices to {h}x{w} px at slice {k}, the row says {want:?} \
                         patches"
                    )));
                }
                out.push(Cow::Owned(data));
            }
        }
        if out.len() != s.tgt_sizes.len() {
            return Err(bad(format!(
                "{} slices from its images, {} slice sizes",
                out.len(),
                s.tgt_sizes.len()
            )));
        }
        Ok(out)
    }

    /// Total rows over all shards.
    pub fn len(&self) -> usize {
        self.shards.iter().map(ShardReader::len).sum()
    }

    /// True when no shard has rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every row of every shard, in order.
    pub fn samples(&self) -> impl Iterator<Item = Result<Row, ShardError>> + '_ {
        self.shards.iter().flat_map(|s| s.samples())
    }

    /// Every row of every shard, in order, without pixels where leaving them out saves
    /// decompressing them ([`ShardReader::samples_without_pixels`]).
    pub fn samples_without_pixels(&self) -> impl Iterator<Item = Result<Row, ShardError>> + '_ {
        self.shards.iter().flat_map(|s| s.samples_without_pixels())
    }

    /// Row `i` counted over all shards, or `None` past the end.
    pub fn sample(&self, i: usize) -> Result<Option<Row>, ShardError> {
        Ok(self.rows(&[i])?.pop().flatten())
    }

    /// Rows `indices` counted over all shards (`None` past the end): a pack's rows, say, with
    /// each compressed batch among them decoded once.
    pub fn rows(&self, indices: &[usize]) -> Result<Vec<Option<Row>>, ShardError> {
        let mut out: Vec<Option<Row>> = vec![None; indices.len()];
        let mut start = 0;
        for s in &self.shards {
            let local: Vec<(usize, usize)> = indices
                .iter()
                .enumerate()
                .filter(|(_, &i)| i >= start && i < start + s.len())
                .map(|(k, &i)| (k, i - start))
                .collect();
            if !local.is_empty() {
                let idx: Vec<usize> = local.iter().map(|&(_, i)| i).collect();
                for (&(k, _), row) in local.iter().zip(s.rows(&idx)?) {
                    out[k] = row;
                }
            }
            start += s.len();
        }
        Ok(out)
    }

    /// The first row whose id is `id` (with its pixels).
    pub fn find_id(&self, id: &str) -> Result<Option<Row>, ShardError> {
        for (i, row) in self.samples_without_pixels().enumerate() {
            if row?.view().id == id {
                return self.sample(i);
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Compression;
    use crate::schema::Sample;
    use crate::writer::{ShardSetWriter, WriterOptions};

    fn sample(id: &str, n: usize, slices: usize) -> Sample {
        Sample {
            id: id.into(),
            input_ids: (0..n as i32).collect(),
            labels: (0..n as i32)
                .map(|v| if v % 2 == 0 { -100 } else { v })
                .collect(),
            image_bound: (0..slices as i32).map(|k| [k * 3 + 1, k * 3 + 2]).collect(),
            tgt_sizes: (0..slices as i32).map(|k| [1, k + 1]).collect(),
            pixel_values: (0..slices)
                .map(|k| vec![k as u8; 14 * 14 * (k + 1) * 3])
                .collect(),
            ..Sample::default()
        }
    }

    fn owned(s: &SampleView) -> Sample {
        Sample {
            id: s.id.to_string(),
            input_ids: s.input_ids.to_vec(),
            labels: s.labels.to_vec(),
            image_bound: s.image_bound.clone(),
            tgt_sizes: s.tgt_sizes.clone(),
            pixel_values: s.pixel_values.iter().map(|p| p.to_vec()).collect(),
            ..Sample::default()
        }
    }

    #[test]
    fn round_trip_is_exact_and_zero_copy_when_uncompressed() {
        let written: Vec<Vec<Sample>> = vec![
            vec![sample("a", 5, 1), sample("b", 3, 0)],
            vec![sample("c", 9, 2)],
            vec![sample("d", 1, 0), sample("e", 4, 3), sample("f", 2, 1)],
        ];
        let expected: Vec<(u32, Sample)> = written
            .iter()
            .enumerate()
            .flat_map(|(p, v)| v.iter().map(move |s| (p as u32, s.clone())))
            .collect();
        let mut sizes = Vec::new();
        for compression in [Compression::None, Compression::Lz4, Compression::Zstd] {
            let dir = tempfile::tempdir().unwrap();
            let opts = WriterOptions {
                max_shard_bytes: 1000,
                max_batch_rows: 2,
                parquet: true,
                compression,
                ..Default::default()
            };
            let mut w = ShardSetWriter::new(dir.path(), opts);
            for (p, pack) in written.iter().enumerate() {
                w.write_pack(p as u32, pack.clone()).unwrap();
            }
            let entries = w.finish().unwrap();
            assert!(
                entries.len() >= 2,
                "small max_shard_bytes must split shards"
            );
            assert!(!std::fs::read_dir(dir.path()).unwrap().any(|e| e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".partial")));

            let mut rows = Vec::new();
            let mut lean = Vec::new();
            for e in &entries {
                let r = ShardReader::open(&dir.path().join(e.file.as_ref().unwrap())).unwrap();
                assert_eq!(r.len() as u64, e.rows);
                assert_eq!(r.compressed(), compression != Compression::None);
                let map = r.mapped_bytes().as_ptr_range();
                for row in r.samples() {
                    let row = row.unwrap();
                    let s = row.view();
                    // In place when uncompressed (a compressed file stores a buffer that
                    // does not shrink as it is, so no claim either way there).
                    if !r.compressed() {
                        assert!(map.contains(&(s.input_ids.as_ptr() as *const u8)));
                        for p in &s.pixel_values {
                            assert!(map.contains(&p.as_ptr()), "pixels not mapped");
                        }
                    }
                    assert!(!s.pixels_left_out);
                    rows.push((s.pack, owned(&s)));
                }
                // Random access agrees with the scan, one row or several at once.
                let first = rows.len() - r.len();
                for i in (0..r.len()).rev() {
                    let row = r.sample(i).unwrap().unwrap();
                    assert_eq!(owned(&row.view()), rows[first + i].1);
                }
                assert!(r.sample(r.len()).unwrap().is_none());
                let picked: Vec<usize> = (0..=r.len()).rev().collect();
                let got = r.rows(&picked).unwrap();
                assert!(got[0].is_none(), "past the end");
                for (&i, row) in picked.iter().zip(&got).skip(1) {
                    assert_eq!(owned(&row.as_ref().unwrap().view()), rows[first + i].1);
                }
                for row in r.samples_without_pixels() {
                    let row = row.unwrap();
                    let s = row.view();
                    assert_eq!(s.pixels_left_out, r.compressed());
                    lean.push((s.id.to_string(), s.input_ids.to_vec(), s.tgt_sizes.clone()));
                }
            }
            assert_eq!(rows, expected, "{compression:?}");
            let want: Vec<_> = expected
                .iter()
                .map(|(_, s)| (s.id.clone(), s.input_ids.clone(), s.tgt_sizes.clone()))
                .collect();
            assert_eq!(lean, want, "{compression:?}: rows without pixels");
            sizes.push(entries.iter().map(|e| e.bytes).sum::<u64>());
        }
        // The constant-valued pixels compress, whatever the codec.
        assert!(sizes[1] < sizes[0] && sizes[2] < sizes[0], "{sizes:?}");
    }

    #[test]
    fn compressed_batch_that_does_not_decode_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let opts = WriterOptions {
            compression: Compression::Zstd,
            ..Default::default()
        };
        let mut w = ShardSetWriter::new(dir.path(), opts);
        w.write_pack(0, vec![sample("a", 5, 2)]).unwrap();
        let entries = w.finish().unwrap();
        let path = dir.path().join(entries[0].file.as_ref().unwrap());
        let mut bytes = std::fs::read(&path).unwrap();
        // The zstd frame magic of the first compressed buffer, broken.
        let at = bytes
            .windows(4)
            .position(|w| w == [0x28, 0xb5, 0x2f, 0xfd])
            .expect("a zstd frame");
        bytes[at] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
        let r = ShardReader::open(&path).unwrap();
        let err = r.sample(0).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(r.samples().next().unwrap().is_err());

        // A length prefix (the 8 bytes before the frame) claiming an absurd size is refused
        // at open, before any decompressor allocates for it.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[at] ^= 0xff; // the frame again as written
        bytes[at - 8..at].copy_from_slice(&(1i64 << 50).to_le_bytes());
        std::fs::write(&path, bytes).unwrap();
        let err = ShardReader::open(&path).err().unwrap().to_string();
        assert!(err.contains("declares"), "{err}");
    }

    #[test]
    fn inconsistent_rows_are_reported_by_check() {
        let ids = [1, 2, 3];
        let good = SampleView {
            id: "x",
            input_ids: &ids,
            labels: &[-100, 3, -100],
            image_bound: vec![[1, 2]],
            tgt_sizes: vec![],
            pixel_values: vec![],
            image_refs: &[],
            num_tokens: 3,
            pack: 0,
            pixels_left_out: false,
        };
        assert!(good.check().is_ok());
        let inverted = SampleView {
            image_bound: vec![[2, 1]],
            ..good.clone()
        };
        assert!(inverted.check().unwrap_err().contains("outside"));
        let short = SampleView {
            labels: &[-100],
            ..good.clone()
        };
        assert!(short.check().is_err());
        let pixels = SampleView {
            tgt_sizes: vec![[1, 1]],
            ..good
        };
        assert!(pixels.check().is_err());
        // A row read without its pixels is not short of them.
        let lean = SampleView {
            pixels_left_out: true,
            ..pixels
        };
        assert!(lean.check().is_ok());
    }

    #[test]
    fn corrupt_footer_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.arrow");
        let mut bytes = b"ARROW1\0\0".to_vec();
        bytes.extend_from_slice(&[0u8; 16]);
        bytes.extend_from_slice(&i32::MAX.to_le_bytes()); // footer length far beyond the file
        bytes.extend_from_slice(b"ARROW1");
        std::fs::write(&p, bytes).unwrap();
        assert!(ShardReader::open(&p).is_err());
    }

    #[test]
    fn foreign_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.arrow");
        std::fs::write(&p, b"definitely not arrow data").unwrap();
        assert!(matches!(
            ShardReader::open(&p),
            Err(ShardError::Format { .. })
        ));
        assert!(ShardDir::open(dir.path()).is_err());
    }
}
