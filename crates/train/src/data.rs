//! Training data: the packs of a memory-mapped shard directory, their per-epoch order, and
//! turning packs into model batches (u8 pixels → normalised patches) on a background thread.

use cpmv_model::{Batch, ImageInput};
use cpmv_shard::reader::{Row, SampleView, ShardDir};
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

use crate::error::TrainError;

/// A pack: rows (global row indices) trained as one packed sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pack {
    pub rows: Vec<usize>,
    pub tokens: usize,
}

/// A shard directory with its packs.
pub struct Dataset {
    pub shards: ShardDir,
    pub packs: Vec<Pack>,
}

impl Dataset {
    /// Maps the shards and groups rows into packs (rows sharing a `pack` value). Every row's
    /// lengths and bounds are checked here, so a damaged shard is refused up front; in a
    /// compressed set the pixel column is left compressed until a batch is made, where each
    /// row is checked again with its pixels (a damaged pixel buffer stops the run there,
    /// naming the file).
    pub fn open(dir: &Path) -> Result<Self, TrainError> {
        let shards = ShardDir::open(dir).map_err(|e| TrainError::Data(format!("{e}")))?;
        let mut packs: Vec<Pack> = Vec::new();
        let mut last: Option<u32> = None;
        // Pixels are not needed here (a compressed set would decompress them all for nothing);
        // each batch's rows are checked again with their pixels when the loader reads them.
        for (i, row) in shards.samples_without_pixels().enumerate() {
            let row = row.map_err(|e| TrainError::Data(e.to_string()))?;
            let s = row.view();
            s.check().map_err(|e| {
                TrainError::Data(format!("{}: corrupt shard row {i}: {e}", dir.display()))
            })?;
            let n = s.input_ids.len();
            match (last, packs.last_mut()) {
                (Some(p), Some(pack)) if p == s.pack => {
                    pack.rows.push(i);
                    pack.tokens += n;
                }
                _ => packs.push(Pack {
                    rows: vec![i],
                    tokens: n,
                }),
            }
            last = Some(s.pack);
        }
        if packs.is_empty() {
            return Err(TrainError::Data(format!(
                "{}: the shards hold no samples",
                dir.display()
            )));
        }
        Ok(Dataset { shards, packs })
    }

    /// The rows of pack `p`, in order (one decode of the pack's batch in a compressed set).
    pub fn pack_rows(&self, p: usize) -> Result<Vec<Row>, TrainError> {
        let rows = &self.packs[p].rows;
        self.shards
            .rows(rows)
            .map_err(|e| TrainError::Data(e.to_string()))?
            .into_iter()
            .zip(rows)
            .map(|(row, i)| {
                row.ok_or_else(|| TrainError::Data(format!("row {i} vanished from the shards")))
            })
            .collect()
    }

    /// Number of samples (rows).
    pub fn samples(&self) -> usize {
        self.shards.len()
    }
}

/// The order of packs in an epoch: a seeded Fisher-Yates permutation (the same seed and epoch
/// always give the same order, which is what makes resuming exact).
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut rng = cpmv_model::Rng(seed ^ epoch.wrapping_mul(0xA076_1D64_78BD_642F) ^ 0xDA7A);
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
    v
}

/// Where the data stream stands: epoch and packs consumed in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
pub struct Cursor {
    pub epoch: u64,
    pub pos: usize,
}

/// A prepared micro-batch and what it came from.
pub struct MicroBatch {
    pub batch: Batch,
    /// Sample ids, for error messages.
    pub ids: Vec<String>,
    /// Samples in it.
    pub samples: usize,
    /// Cursor after this micro-batch.
    pub cursor: Cursor,
}

fn add_row(
    batch: &mut Batch,
    shards: &ShardDir,
    rows: &[SampleView],
    patch: usize,
    row: usize,
    sample_no: &mut usize,
) -> Result<(), TrainError> {
    let mut ids = Vec::new();
    let mut pos = Vec::new();
    let mut labels = Vec::new();
    let mut segs = Vec::new();
    for s in rows {
        let off = ids.len();
        ids.extend(s.input_ids.iter().map(|&x| x as u32));
        labels.extend(s.labels.iter().map(|&x| x as i64));
        pos.extend(0..s.input_ids.len() as u32);
        segs.push(s.input_ids.len());
        // Stored slices, or (`--pixels source`) slices made again from the stored files.
        let pixels = shards
            .pixels(s)
            .map_err(|e| TrainError::Data(e.to_string()))?;
        if s.image_bound.len() != pixels.len() {
            return Err(TrainError::Data(format!(
                "sample {:?}: {} placeholder runs but {} image slices",
                s.id,
                s.image_bound.len(),
                pixels.len()
            )));
        }
        for ((b, ts), px) in s.image_bound.iter().zip(&s.tgt_sizes).zip(&pixels) {
            let (h, w) = (ts[0] as usize * patch, ts[1] as usize * patch);
            let img = ImageInput::from_hwc_u8(px, h, w, patch)
                .map_err(|e| TrainError::Data(format!("sample {:?}: {e}", s.id)))?;
            batch.images.push(img);
            batch.image_groups.push(*sample_no);
            batch
                .bounds
                .push((row, off + b[0] as usize, off + b[1] as usize));
        }
        *sample_no += 1;
    }
    batch.input_ids.push(ids);
    batch.position_ids.push(pos);
    batch.labels.push(labels);
    batch.segments.push(segs);
    Ok(())
}

/// Builds the model batch of the given packs: one row per pack, right-padded to the longest
/// (ids 0, positions 0, labels −100, as the reference collator).
pub fn make_batch(
    data: &Dataset,
    packs: &[usize],
    patch: usize,
) -> Result<(Batch, Vec<String>, usize), TrainError> {
    let found = packs
        .iter()
        .map(|&p| data.pack_rows(p))
        .collect::<Result<Vec<_>, _>>()?;
    let groups: Vec<Vec<SampleView>> = found
        .iter()
        .map(|rows| rows.iter().map(Row::view).collect())
        .collect();
    let ids = groups.iter().flatten().map(|s| s.id.to_string()).collect();
    let samples = groups.iter().map(Vec::len).sum();
    Ok((batch_of_rows(&data.shards, &groups, patch)?, ids, samples))
}

/// The model batch of `groups`: one batch row per group (a pack's samples, in order),
/// right-padded to the longest (ids 0, positions 0, labels −100, as the reference collator).
/// Each sample is checked with its pixels first.
pub fn batch_of_rows(
    shards: &ShardDir,
    groups: &[Vec<SampleView>],
    patch: usize,
) -> Result<Batch, TrainError> {
    let mut batch = Batch::default();
    // Each sample's images form their own vision batch (see `Batch::image_groups`).
    let mut sample_no = 0usize;
    for (r, rows) in groups.iter().enumerate() {
        for s in rows {
            s.check()
                .map_err(|e| TrainError::Data(format!("corrupt shard row: {e}")))?;
        }
        add_row(&mut batch, shards, rows, patch, r, &mut sample_no)?;
    }
    let t = batch.input_ids.iter().map(Vec::len).max().unwrap_or(0);
    for r in 0..batch.input_ids.len() {
        let n = batch.input_ids[r].len();
        batch.input_ids[r].resize(t, 0);
        batch.position_ids[r].resize(t, 0);
        batch.labels[r].resize(t, -100);
        debug_assert!(n <= t);
    }
    Ok(batch)
}

/// Streams micro-batches from `cursor` on, over epochs, on a background thread (the next
/// batch is prepared while the current one computes). With `(rank, world)` ranks, each global
/// micro-step covers `world × micro_batch` positions of the epoch's order and rank r takes
/// positions r, r + world, … of it (an epoch's last micro-step may leave a rank with no pack:
/// its micro-batch is then empty); every batch's cursor is the global one after its micro-step.
pub fn stream(
    data: Arc<Dataset>,
    seed: u64,
    micro_batch: usize,
    patch: usize,
    start: Cursor,
    (rank, world): (usize, usize),
) -> Receiver<Result<MicroBatch, TrainError>> {
    let (tx, rx) = sync_channel(2);
    std::thread::spawn(move || {
        let n = data.packs.len();
        let mut cur = start;
        let mut order: Option<(u64, Vec<usize>)> = None;
        loop {
            if order.as_ref().is_none_or(|(e, _)| *e != cur.epoch) {
                order = Some((cur.epoch, epoch_order(n, seed, cur.epoch)));
            }
            let Some((_, order)) = &order else { return };
            if cur.pos >= n {
                cur = Cursor {
                    epoch: cur.epoch + 1,
                    pos: 0,
                };
                continue;
            }
            let end = (cur.pos + micro_batch * world).min(n);
            let picks: Vec<usize> = (cur.pos + rank..end)
                .step_by(world.max(1))
                .map(|i| order[i])
                .collect();
            let next = Cursor {
                epoch: cur.epoch,
                pos: end,
            };
            let item = make_batch(&data, &picks, patch).map(|(batch, ids, samples)| MicroBatch {
                batch,
                ids,
                samples,
                cursor: next,
            });
            let failed = item.is_err();
            if tx.send(item).is_err() || failed {
                return;
            }
            cur = next;
        }
    });
    rx
}
