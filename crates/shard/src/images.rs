//! The image store of a set built with `--pixels source`: `images.arrow`, one row per distinct
//! image file (by the sha256 of its bytes), in the order the samples first refer to them, with
//! the file's original bytes. Shard rows point at it through `image_refs`; a reader decodes and
//! slices the bytes with the code `prep build` slices with ([`slices_from_file`]), so the pixels
//! are the ones a set of slices would hold, bit for bit, at the cost of the image files on disk.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{FixedSizeBinaryBuilder, LargeBinaryBuilder};
use arrow_array::cast::AsArray;
use arrow_array::{ArrayRef, RecordBatch};
use arrow_ipc::writer::{FileWriter, IpcWriteOptions};
use arrow_ipc::MetadataVersion;
use arrow_schema::{DataType, Field, Schema};

use crate::manifest::ImagesEntry;
use crate::reader::Mapped;
use crate::settings::SampleSettings;
use crate::writer::{ALIGNMENT, PARTIAL_SUFFIX};
use crate::ShardError;

/// File name of the image store inside a shard directory.
pub const IMAGES_FILE: &str = "images.arrow";

/// Columns of the image store.
pub mod col {
    pub const SHA256: &str = "sha256";
    pub const BYTES: &str = "bytes";
}

/// The Arrow schema of `images.arrow`.
pub fn images_schema() -> Schema {
    Schema::new(vec![
        Field::new(col::SHA256, DataType::FixedSizeBinary(32), false),
        Field::new(col::BYTES, DataType::LargeBinary, false),
    ])
}

/// Bytes of image files buffered before a record batch is written.
const BATCH_BYTES: usize = 64 << 20;

/// Writes the image store, each distinct file once.
pub struct ImageStoreWriter {
    path: PathBuf,
    writer: FileWriter<BufWriter<File>>,
    index: HashMap<[u8; 32], u32>,
    pending: Vec<([u8; 32], Vec<u8>)>,
    pending_bytes: usize,
}

impl ImageStoreWriter {
    /// Starts `dir/images.arrow.partial`.
    pub fn create(dir: &Path) -> Result<Self, ShardError> {
        let path = dir.join(format!("{IMAGES_FILE}{PARTIAL_SUFFIX}"));
        let file = File::create(&path).map_err(|e| ShardError::io(&path, e))?;
        let options = IpcWriteOptions::try_new(ALIGNMENT, false, MetadataVersion::V5)
            .map_err(|e| ShardError::arrow(&path, e))?;
        let schema = images_schema();
        let writer = FileWriter::try_new_with_options(BufWriter::new(file), &schema, options)
            .map_err(|e| ShardError::arrow(&path, e))?;
        Ok(ImageStoreWriter {
            path,
            writer,
            index: HashMap::new(),
            pending: Vec::new(),
            pending_bytes: 0,
        })
    }

    /// The row of the file with digest `sha256` and `bytes`, stored now if it is new.
    pub fn add(&mut self, sha256: [u8; 32], bytes: Vec<u8>) -> Result<u32, ShardError> {
        if let Some(&i) = self.index.get(&sha256) {
            return Ok(i);
        }
        let i = u32::try_from(self.index.len())
            .map_err(|_| ShardError::format(&self.path, "more than 2^32 distinct images"))?;
        self.index.insert(sha256, i);
        self.pending_bytes += bytes.len();
        self.pending.push((sha256, bytes));
        if self.pending_bytes >= BATCH_BYTES {
            self.flush()?;
        }
        Ok(i)
    }

    fn flush(&mut self) -> Result<(), ShardError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let rows = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        let arrow = |e| ShardError::arrow(&self.path, e);
        let mut sha = FixedSizeBinaryBuilder::with_capacity(rows.len(), 32);
        let mut bytes =
            LargeBinaryBuilder::with_capacity(rows.len(), rows.iter().map(|r| r.1.len()).sum());
        for (h, b) in &rows {
            sha.append_value(h).map_err(arrow)?;
            bytes.append_value(b);
        }
        let columns: Vec<ArrayRef> = vec![Arc::new(sha.finish()), Arc::new(bytes.finish())];
        let batch = RecordBatch::try_new(Arc::new(images_schema()), columns).map_err(arrow)?;
        self.writer.write(&batch).map_err(arrow)
    }

    /// Writes what is buffered and closes the file, flushed to the disk, still under its
    /// partial name. Returns (partial path, final name, manifest entry).
    pub fn close(mut self) -> Result<(PathBuf, String, ImagesEntry), ShardError> {
        self.flush()?;
        let path = self.path.clone();
        self.writer
            .finish()
            .map_err(|e| ShardError::arrow(&path, e))?;
        let file = self
            .writer
            .into_inner()
            .map_err(|e| ShardError::arrow(&path, e))?
            .into_inner()
            .map_err(|e| ShardError::io(&path, e.into_error()))?;
        file.sync_all().map_err(|e| ShardError::io(&path, e))?;
        let bytes = file.metadata().map_err(|e| ShardError::io(&path, e))?.len();
        let entry = ImagesEntry {
            file: IMAGES_FILE.into(),
            count: self.index.len() as u64,
            bytes,
        };
        Ok((path, IMAGES_FILE.into(), entry))
    }

    /// The partial file's path (removed by a failed run).
    pub fn partial_path(&self) -> &Path {
        &self.path
    }
}

/// The image store of a set, memory-mapped.
pub struct ImageStore {
    mapped: Mapped,
}

impl ImageStore {
    /// Maps `path` and checks its columns.
    pub fn open(path: &Path) -> Result<Self, ShardError> {
        let expected = images_schema();
        let mapped = Mapped::open(
            path,
            |s| s.fields() == expected.fields(),
            "an image store",
            &[],
        )?;
        if mapped.compressed() {
            // prep never compresses the store (encoded image files do not shrink), and its
            // rows are handed out borrowed from the map.
            return Err(ShardError::format(path, "compressed image store"));
        }
        Ok(ImageStore { mapped })
    }

    /// Number of image files.
    pub fn len(&self) -> usize {
        self.mapped.len()
    }

    /// True when the store holds no file.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes of image `i`.
    pub fn get(&self, i: u32) -> Option<&[u8]> {
        let (b, r) = self.mapped.locate(i as usize)?;
        let batch = &self.mapped.mapped_batches()?[b];
        let col = batch.column_by_name(col::BYTES)?.as_binary::<i64>();
        Some(col.value(r))
    }

    /// The path of the mapped file.
    pub fn path(&self) -> &Path {
        self.mapped.path()
    }
}

/// The slicing part of the sample settings.
pub fn slice_config(s: &SampleSettings) -> cpmv_image::SliceConfig {
    cpmv_image::SliceConfig {
        max_slice_nums: s.max_slice_nums,
        scale_resolution: s.scale_resolution,
        patch_size: s.patch_size,
    }
}

/// One slice: u8 RGB HWC bytes and `[height, width]` in pixels.
pub type Slice = (Vec<u8>, [u32; 2]);

/// The u8 RGB slices (overview first, then the grid row by row) and their `[height, width]`
/// in pixels that `prep build` makes of an image file with `settings`: the same decoder and
/// slicing code, so a set of `--pixels source` yields the pixels of a set of slices.
pub fn slices_from_file(
    bytes: &[u8],
    settings: &SampleSettings,
) -> Result<Vec<Slice>, cpmv_image::DecodeError> {
    let img = cpmv_image::decode(
        bytes,
        cpmv_image::DecodeOptions {
            exif_transpose: settings.exif_transpose,
        },
    )?;
    Ok(cpmv_image::slice_image(&img, &slice_config(settings))
        .images
        .into_iter()
        .map(|s| {
            let hw = [s.height, s.width];
            (s.data, hw)
        })
        .collect())
}
