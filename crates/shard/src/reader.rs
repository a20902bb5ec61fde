//! Zero-copy reading of shards: the file is memory-mapped and Arrow arrays point into the map.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{Int32Type, UInt32Type};
use arrow_array::{Array, RecordBatch};
use arrow_buffer::Buffer;
use arrow_ipc::convert::try_fb_to_schema;
use arrow_ipc::reader::{read_footer_length, FileDecoder};
use arrow_ipc::root_as_footer;

use std::borrow::Cow;

use crate::images::{slices_from_file, ImageStore};
use crate::manifest::{Manifest, PixelMode};
use crate::schema::{col, shard_schema};
use crate::ShardError;

/// A memory-mapped Arrow IPC file whose record batches point into the map.
pub(crate) struct Mapped {
    path: PathBuf,
    batches: Vec<RecordBatch>,
    /// Row index where each batch starts, plus the total at the end.
    starts: Vec<usize>,
    map: Buffer,
}

impl Mapped {
    /// Maps `path` and decodes its footer and record-batch headers (no data is copied);
    /// `accept(schema)` says whether its columns are the expected ones (`what` names them).
    pub(crate) fn open(
        path: &Path,
        accept: impl Fn(&arrow_schema::Schema) -> bool,
        what: &str,
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
        let decoder = FileDecoder::new(Arc::new(schema), footer.version());
        let mut batches = Vec::new();
        let mut starts = vec![0];
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
            let data = map.slice_with_length(offset as usize, body as usize + meta as usize);
            let batch = decoder
                .read_record_batch(block, &data)
                .map_err(|e| ShardError::arrow(path, e))?
                .ok_or_else(|| ShardError::format(path, "empty record batch block"))?;
            starts.push(starts.last().copied().unwrap_or(0) + batch.num_rows());
            batches.push(batch);
        }
        Ok(Mapped {
            path: path.to_path_buf(),
            batches,
            starts,
            map,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Number of rows.
    pub(crate) fn len(&self) -> usize {
        *self.starts.last().unwrap_or(&0)
    }

    /// The batch holding row `i` and the row's index in it.
    pub(crate) fn locate(&self, i: usize) -> Option<(&RecordBatch, usize)> {
        if i >= self.len() {
            return None;
        }
        let b = self.starts.partition_point(|&s| s <= i) - 1;
        Some((&self.batches[b], i - self.starts[b]))
    }
}

/// One memory-mapped shard file.
pub struct ShardReader {
    mapped: Mapped,
}

/// A borrowed view of one row. Slices point into the memory map.
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
        if (!stored_as_source && self.tgt_sizes.len() != self.pixel_values.len())
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
            mapped: Mapped::open(path, accept, "a shard")?,
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

    /// The record batches, for column-wise access.
    pub fn batches(&self) -> &[RecordBatch] {
        &self.mapped.batches
    }

    /// The mapped file's bytes (tests use it to prove that columns are not copies).
    pub fn mapped_bytes(&self) -> &[u8] {
        self.mapped.map.as_slice()
    }

    /// Row `i`, or `None` past the end.
    pub fn sample(&self, i: usize) -> Option<SampleView<'_>> {
        let (batch, r) = self.mapped.locate(i)?;
        Some(view(batch, r))
    }

    /// All rows in order.
    pub fn samples(&self) -> impl Iterator<Item = SampleView<'_>> + '_ {
        (0..self.len()).filter_map(move |i| self.sample(i))
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
    let pix = batch
        .column_by_name(col::PIXEL_VALUES)
        .expect("schema checked on open")
        .as_list::<i32>();
    let offsets = pix.value_offsets();
    let bin = pix.values().as_binary::<i64>();
    let pixel_values = (offsets[r] as usize..offsets[r + 1] as usize)
        .map(|k| bin.value(k))
        .collect();
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
    pub fn samples(&self) -> impl Iterator<Item = SampleView<'_>> + '_ {
        self.shards.iter().flat_map(|s| s.samples())
    }

    /// Row `i` counted over all shards.
    pub fn sample(&self, mut i: usize) -> Option<SampleView<'_>> {
        for s in &self.shards {
            if i < s.len() {
                return s.sample(i);
            }
            i -= s.len();
        }
        None
    }

    /// The first row whose id is `id`.
    pub fn find_id(&self, id: &str) -> Option<SampleView<'_>> {
        self.samples().find(|s| s.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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

    #[test]
    fn round_trip_is_zero_copy_and_exact() {
        let dir = tempfile::tempdir().unwrap();
        let opts = WriterOptions {
            max_shard_bytes: 1000,
            max_batch_rows: 2,
            parquet: true,
            ..Default::default()
        };
        let mut w = ShardSetWriter::new(dir.path(), opts);
        let written: Vec<Vec<Sample>> = vec![
            vec![sample("a", 5, 1), sample("b", 3, 0)],
            vec![sample("c", 9, 2)],
            vec![sample("d", 1, 0), sample("e", 4, 3), sample("f", 2, 1)],
        ];
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
        for e in &entries {
            let r = ShardReader::open(&dir.path().join(e.file.as_ref().unwrap())).unwrap();
            assert_eq!(r.len() as u64, e.rows);
            let map = r.mapped_bytes().as_ptr_range();
            for s in r.samples() {
                assert!(
                    map.contains(&(s.input_ids.as_ptr() as *const u8)),
                    "input_ids not mapped"
                );
                for p in &s.pixel_values {
                    assert!(map.contains(&p.as_ptr()), "pixels not mapped");
                }
                rows.push((
                    s.pack,
                    Sample {
                        id: s.id.to_string(),
                        input_ids: s.input_ids.to_vec(),
                        labels: s.labels.to_vec(),
                        image_bound: s.image_bound.clone(),
                        tgt_sizes: s.tgt_sizes.clone(),
                        pixel_values: s.pixel_values.iter().map(|p| p.to_vec()).collect(),
                        ..Sample::default()
                    },
                ));
            }
        }
        let expected: Vec<(u32, Sample)> = written
            .into_iter()
            .enumerate()
            .flat_map(|(p, v)| v.into_iter().map(move |s| (p as u32, s)))
            .collect();
        assert_eq!(rows, expected);
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
