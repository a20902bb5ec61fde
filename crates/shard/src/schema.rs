//! Column names and types of a shard, and the owned row type the writer takes.

use std::sync::Arc;

use arrow_schema::{DataType, Field, Schema};

/// Column names (also listed in `schemas/shard.schema.json`; a checker reads them there).
pub mod col {
    pub const ID: &str = "id";
    pub const INPUT_IDS: &str = "input_ids";
    pub const LABELS: &str = "labels";
    pub const IMAGE_BOUND: &str = "image_bound";
    pub const TGT_SIZES: &str = "tgt_sizes";
    pub const PIXEL_VALUES: &str = "pixel_values";
    pub const NUM_TOKENS: &str = "num_tokens";
    pub const PACK: &str = "pack";
    pub const IMAGE_REFS: &str = "image_refs";
}

/// Value of `labels` at positions that carry no loss (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i32 = -100;

fn item(dt: DataType) -> Arc<Field> {
    Arc::new(Field::new("item", dt, false))
}

fn pair_list() -> DataType {
    DataType::List(item(DataType::FixedSizeList(item(DataType::Int32), 2)))
}

/// The Arrow schema of every shard file.
pub fn shard_schema() -> Schema {
    Schema::new(vec![
        Field::new(col::ID, DataType::Utf8, false),
        Field::new(col::INPUT_IDS, DataType::List(item(DataType::Int32)), false),
        Field::new(col::LABELS, DataType::List(item(DataType::Int32)), false),
        Field::new(col::IMAGE_BOUND, pair_list(), false),
        Field::new(col::TGT_SIZES, pair_list(), false),
        Field::new(
            col::PIXEL_VALUES,
            DataType::List(item(DataType::LargeBinary)),
            false,
        ),
        Field::new(col::NUM_TOKENS, DataType::Int32, false),
        Field::new(col::PACK, DataType::UInt32, false),
        Field::new(
            col::IMAGE_REFS,
            DataType::List(item(DataType::UInt32)),
            false,
        ),
    ])
}

/// Columns of shards written before `image_refs` existed (read as sets of `slices`).
pub const LEGACY_COLUMNS: usize = 8;

/// One training sample ready to be written: the model's inputs after templates, placeholders,
/// label shifting and slicing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sample {
    /// The input's `id`, or `<file stem>:<index>` when it has none.
    pub id: String,
    pub input_ids: Vec<i32>,
    /// Same length as `input_ids`; [`IGNORE_INDEX`] where no loss; already shifted
    /// (`labels[t]` is the token to predict at position `t`).
    pub labels: Vec<i32>,
    /// `[start, end)` of each run of image placeholder tokens, ascending.
    pub image_bound: Vec<[i32; 2]>,
    /// `[height / patch, width / patch]` of each slice, in model order.
    pub tgt_sizes: Vec<[i32; 2]>,
    /// One entry per slice (same order as `tgt_sizes`): u8 RGB, row-major, height × width × 3.
    /// Empty in a set of `--pixels source`.
    pub pixel_values: Vec<Vec<u8>>,
    /// `--pixels source`: each image's row in the set's image store, in image order (the
    /// writer fills it from `source_images`). Empty in a set of slices.
    pub image_refs: Vec<u32>,
    /// `--pixels source`: the sample's image files, in image order, for the writer to store
    /// (each distinct file once). Not a column.
    pub source_images: Vec<SourceImage>,
}

/// An image file as read from the disk, with the sha256 of its bytes (its identity in the
/// image store).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceImage {
    pub sha256: [u8; 32],
    pub bytes: Vec<u8>,
}

impl SourceImage {
    /// The file's bytes with their digest.
    pub fn new(bytes: Vec<u8>) -> Self {
        use sha2::Digest;
        SourceImage {
            sha256: sha2::Sha256::digest(&bytes).into(),
            bytes,
        }
    }
}

impl Sample {
    /// Number of tokens (the row's length in a pack).
    pub fn num_tokens(&self) -> usize {
        self.input_ids.len()
    }

    /// Bytes of pixel data this sample carries (slices, or image files before they are
    /// deduplicated).
    pub fn pixel_bytes(&self) -> usize {
        self.pixel_values.iter().map(Vec::len).sum::<usize>()
            + self
                .source_images
                .iter()
                .map(|i| i.bytes.len())
                .sum::<usize>()
    }
}
