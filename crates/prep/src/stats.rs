//! `prep stats`: how long are my samples, before spending GPU hours on a `--max-length`.
//!
//! Every figure comes from the same code `prep build` runs (validation, slicing plan,
//! placeholders, template, labels), except that images are only *probed*: their size is read
//! from the file header and no pixel is decoded, which makes measuring a data set far cheaper
//! than building it. Lengths are measured without a length limit so the report can say what any
//! `--max-length` would cost. With `--sample N` a seeded reservoir sample of N samples is
//! measured instead, and the report gives 95% confidence intervals.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::Serialize;

use cpmv_fsio::Input;
use cpmv_image::{plan_slices, SliceConfig};

use crate::build::{resolve_settings, BuildError};
use crate::config::PrepPreset;
use crate::input::{RawSample, SampleReader};
use crate::model::{LlmType, ModelDir};
use crate::process::{InputSource, Processor, Rejected};

/// `max_slice_nums` values whose image-token cost is reported side by side.
pub const SLICE_BUDGETS: [u32; 3] = [1, 4, 9];
/// Candidate `--max-length` values of the loss table (plus the chosen one).
pub const CANDIDATE_LENGTHS: [u32; 5] = [1024, 2048, 3072, 4096, 8192];

/// Options of a `prep stats` run over data files.
#[derive(Clone, Debug)]
pub struct StatsOptions {
    pub data: Vec<PathBuf>,
    pub image_root: Option<PathBuf>,
    pub model: PathBuf,
    pub prep: PrepPreset,
    /// Measure a uniform random sample of this many samples instead of all.
    pub sample: Option<usize>,
    pub seed: u64,
    pub threads: Option<usize>,
    pub progress: bool,
    /// Write one JSON line per measured sample here, as samples are measured. Refused when it
    /// is a `--data` file or lies inside `--model` ([`refuse_overlapping_outputs`]).
    pub per_sample: Option<PathBuf>,
}

/// The measurements of one sample.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Measured {
    pub id: String,
    pub total_tokens: u32,
    pub text_tokens: u32,
    /// Placeholder tokens inside image bounds (query_num per overview or slice).
    pub image_tokens: u32,
    pub images: u32,
    /// Overview + slices over all images.
    pub slices: u32,
    pub supervised_tokens: u32,
    /// Slices (overview included) of each image.
    pub slices_per_image: Vec<u32>,
    /// Image tokens with each of [`SLICE_BUDGETS`] as `max_slice_nums`.
    #[serde(skip)]
    pub image_tokens_by_budget: [u32; 3],
}

/// Measures one sample from its JSON and its images' headers.
pub fn measure_sample(
    p: &Processor,
    raw: &RawSample,
    source: &InputSource,
) -> Result<Measured, Rejected> {
    let parsed = p.parse(raw, source)?;
    let reject = |rejection| Rejected {
        id: parsed.id.clone(),
        rejection,
    };
    let mut sizes = Vec::with_capacity(parsed.images.len());
    for path in &parsed.images {
        sizes.push(p.image_size_from_header(source, path).map_err(reject)?);
    }
    let text = p
        .plan_text_within(&parsed, &sizes, usize::MAX)
        .map_err(reject)?;
    let q = p.settings.query_num;
    let mut by_budget = [0u32; 3];
    for (k, &m) in SLICE_BUDGETS.iter().enumerate() {
        let cfg = SliceConfig {
            max_slice_nums: m,
            ..crate::process::slice_config(&p.settings)
        };
        by_budget[k] = sizes
            .iter()
            .map(|&(w, h)| plan_slices(w, h, &cfg).num_images() as u32 * q)
            .sum();
    }
    let total = text.input_ids.len() as u32;
    let image = text.stats.image_tokens as u32;
    Ok(Measured {
        id: text.id,
        total_tokens: total,
        text_tokens: total - image,
        image_tokens: image,
        images: text.plans.len() as u32,
        slices: text.stats.slices as u32,
        supervised_tokens: text.stats.supervised as u32,
        slices_per_image: text.plans.iter().map(|pl| pl.num_images() as u32).collect(),
        image_tokens_by_budget: by_budget,
    })
}

/// min / mean / nearest-rank percentiles / max of a set of counts.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Distribution {
    pub min: u64,
    pub mean: f64,
    pub p50: u64,
    pub p90: u64,
    pub p95: u64,
    pub p99: u64,
    pub max: u64,
}

/// How often each value occurs: exact nearest-rank percentiles in memory bounded by the number
/// of distinct values (token counts), not by the number of samples.
#[derive(Clone, Debug, Default)]
pub struct ValueCounts {
    counts: BTreeMap<u32, u64>,
    n: u64,
    sum: u64,
    sum_sq: f64,
}

impl ValueCounts {
    pub fn add(&mut self, v: u32) {
        *self.counts.entry(v).or_default() += 1;
        self.n += 1;
        self.sum += v as u64;
        self.sum_sq += (v as f64) * (v as f64);
    }

    pub fn len(&self) -> u64 {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    fn mean(&self) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            self.sum as f64 / self.n as f64
        }
    }

    /// The value of rank `rank` (1-based) in sorted order.
    fn nth(&self, rank: u64) -> u32 {
        let mut seen = 0;
        for (&v, &c) in &self.counts {
            seen += c;
            if seen >= rank {
                return v;
            }
        }
        self.counts.keys().next_back().copied().unwrap_or(0)
    }

    /// The nearest-rank percentile: the smallest value with at least `p` of the values at or
    /// below it.
    fn percentile(&self, p: f64) -> u64 {
        if self.n == 0 {
            return 0;
        }
        let rank = ((p * self.n as f64).ceil() as u64).clamp(1, self.n);
        self.nth(rank) as u64
    }

    fn distribution(&self) -> Distribution {
        if self.n == 0 {
            return Distribution::default();
        }
        Distribution {
            min: self.nth(1) as u64,
            mean: self.mean(),
            p50: self.percentile(0.50),
            p90: self.percentile(0.90),
            p95: self.percentile(0.95),
            p99: self.percentile(0.99),
            max: self.nth(self.n) as u64,
        }
    }
}

/// What a `--max-length` costs: samples longer than it are rejected by `prep build`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct LengthLoss {
    pub max_length: u32,
    pub samples_lost: u64,
    pub samples_lost_share: f64,
    pub supervised_tokens_lost_share: f64,
}

/// 95% confidence intervals of total-token figures when a sample was measured.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Confidence {
    pub mean: [f64; 2],
    pub p50: [u64; 2],
    pub p90: [u64; 2],
    pub p99: [u64; 2],
}

/// Smallest multiples of 128 that keep 99% / all of the samples.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Suggestion {
    pub keep_99_percent: u32,
    pub keep_all: u32,
}

/// Mean image tokens per sample under another `max_slice_nums`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct BudgetCost {
    pub max_slice_nums: u32,
    pub mean_image_tokens_per_sample: f64,
}

/// Counts of total tokens in equal-width bins starting at 0.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Histogram {
    pub bin_width: u32,
    pub counts: Vec<u64>,
}

/// Packing figures (shards only).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct PackingStats {
    pub packs: u64,
    pub fill_ratio: f64,
}

/// The whole report; its JSON form is documented in `schemas/stats.schema.json`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct StatsReport {
    /// "data" (measured from data files) or "shards" (read from built shards).
    pub source: String,
    /// Samples measured (valid ones).
    pub samples: u64,
    /// Samples read from the input (all of them, also when sampling).
    pub samples_read: u64,
    /// Samples whose measurement was rejected (in the measured set).
    pub rejected: u64,
    pub rejected_by_reason: BTreeMap<String, u64>,
    /// Whether a random sample was measured, and its seed.
    pub sampled: bool,
    pub seed: Option<u64>,
    pub total_tokens: Distribution,
    pub text_tokens: Distribution,
    pub image_tokens: Distribution,
    pub images_per_sample: Distribution,
    pub slices_per_image: Distribution,
    pub supervised_tokens: Distribution,
    pub total_tokens_ci95: Option<Confidence>,
    pub max_length: u32,
    pub length_loss: Vec<LengthLoss>,
    pub suggested_max_length: Suggestion,
    pub image_tokens_by_max_slice_nums: Vec<BudgetCost>,
    pub histogram: Histogram,
    pub packing: Option<PackingStats>,
}

fn round_up_128(v: u64) -> u32 {
    (v.div_ceil(128) * 128).max(128) as u32
}

fn histogram(totals: &ValueCounts) -> Histogram {
    let max = totals.counts.keys().next_back().copied().unwrap_or(0) as u64;
    let bin_width = (max.div_ceil(32).div_ceil(64) * 64).max(64) as u32;
    let bins = (max / bin_width as u64 + 1) as usize;
    let mut counts = vec![0u64; bins];
    for (&v, &c) in &totals.counts {
        counts[(v / bin_width) as usize] += c;
    }
    Histogram { bin_width, counts }
}

/// Running figures over measured samples; memory does not grow with the number of samples.
#[derive(Clone, Debug, Default)]
pub struct Accumulator {
    total: ValueCounts,
    text: ValueCounts,
    image: ValueCounts,
    images: ValueCounts,
    slices_per_image: ValueCounts,
    supervised: ValueCounts,
    /// Supervised tokens summed per total length (for the loss table).
    supervised_by_total: BTreeMap<u32, u64>,
    budget_sums: [u64; 3],
}

impl Accumulator {
    pub fn add(&mut self, m: &Measured) {
        self.total.add(m.total_tokens);
        self.text.add(m.text_tokens);
        self.image.add(m.image_tokens);
        self.images.add(m.images);
        for &s in &m.slices_per_image {
            self.slices_per_image.add(s);
        }
        self.supervised.add(m.supervised_tokens);
        *self.supervised_by_total.entry(m.total_tokens).or_default() += m.supervised_tokens as u64;
        for (sum, v) in self.budget_sums.iter_mut().zip(m.image_tokens_by_budget) {
            *sum += v as u64;
        }
    }

    /// Samples added.
    pub fn len(&self) -> u64 {
        self.total.len()
    }

    pub fn is_empty(&self) -> bool {
        self.total.is_empty()
    }

    /// The report. `max_length` is the length the user plans to train with; `sampled` the seed
    /// when a random sample was measured.
    pub fn report(
        &self,
        samples_read: u64,
        rejected_by_reason: BTreeMap<String, u64>,
        max_length: u32,
        sampled: Option<u64>,
    ) -> StatsReport {
        let n = self.len();
        let total_tokens = self.total.distribution();
        let supervised_total: u64 = self.supervised_by_total.values().sum();
        let mut lengths: Vec<u32> = CANDIDATE_LENGTHS.to_vec();
        if !lengths.contains(&max_length) {
            lengths.push(max_length);
            lengths.sort_unstable();
        }
        let share = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        let length_loss = lengths
            .into_iter()
            .map(|l| {
                let lost: u64 = self.total.counts.range(l + 1..).map(|(_, &c)| c).sum();
                let sup_lost: u64 = self
                    .supervised_by_total
                    .range(l + 1..)
                    .map(|(_, &c)| c)
                    .sum();
                LengthLoss {
                    max_length: l,
                    samples_lost: lost,
                    samples_lost_share: share(lost, n),
                    supervised_tokens_lost_share: share(sup_lost, supervised_total),
                }
            })
            .collect();
        let suggested = Suggestion {
            keep_99_percent: round_up_128(self.total.percentile(0.99)),
            keep_all: round_up_128(total_tokens.max),
        };
        let budgets = SLICE_BUDGETS
            .iter()
            .zip(self.budget_sums)
            .map(|(&m, sum)| BudgetCost {
                max_slice_nums: m,
                mean_image_tokens_per_sample: share(sum, n),
            })
            .collect();
        StatsReport {
            source: "data".into(),
            samples: n,
            samples_read,
            rejected: rejected_by_reason.values().sum(),
            rejected_by_reason,
            sampled: sampled.is_some(),
            seed: sampled,
            histogram: histogram(&self.total),
            total_tokens_ci95: sampled.map(|_| confidence(&self.total)),
            total_tokens,
            text_tokens: self.text.distribution(),
            image_tokens: self.image.distribution(),
            images_per_sample: self.images.distribution(),
            slices_per_image: self.slices_per_image.distribution(),
            supervised_tokens: self.supervised.distribution(),
            max_length,
            length_loss,
            suggested_max_length: suggested,
            image_tokens_by_max_slice_nums: budgets,
            packing: None,
        }
    }
}

/// Summarises a list of measurements (see [`Accumulator::report`]).
pub fn summarise(
    measured: &[Measured],
    samples_read: u64,
    rejected_by_reason: BTreeMap<String, u64>,
    max_length: u32,
    sampled: Option<u64>,
) -> StatsReport {
    let mut acc = Accumulator::default();
    for m in measured {
        acc.add(m);
    }
    acc.report(samples_read, rejected_by_reason, max_length, sampled)
}

/// Normal-approximation 95% intervals: the mean ± 1.96 standard errors; a percentile between
/// the order statistics at ranks n·p ± 1.96·√(n·p·(1−p)).
fn confidence(totals: &ValueCounts) -> Confidence {
    let n = totals.len() as f64;
    if totals.is_empty() {
        return Confidence {
            mean: [0.0; 2],
            p50: [0; 2],
            p90: [0; 2],
            p99: [0; 2],
        };
    }
    let mean = totals.mean();
    let var = ((totals.sum_sq - n * mean * mean) / (n - 1.0).max(1.0)).max(0.0);
    let se = (var / n).sqrt();
    let q = |p: f64| -> [u64; 2] {
        let half = 1.96 * (n * p * (1.0 - p)).sqrt();
        let lo = ((n * p - half).floor() as u64).clamp(1, totals.len());
        let hi = ((n * p + half).ceil() as u64).clamp(1, totals.len());
        [totals.nth(lo) as u64, totals.nth(hi) as u64]
    };
    Confidence {
        mean: [mean - 1.96 * se, mean + 1.96 * se],
        p50: q(0.5),
        p90: q(0.9),
        p99: q(0.99),
    }
}

/// A small deterministic generator (SplitMix64) for reservoir sampling: the same seed picks the
/// same samples on every machine and thread count.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..=bound`.
    fn below_or_eq(&mut self, bound: u64) -> u64 {
        // Rejection sampling avoids modulo bias.
        let range = bound.wrapping_add(1);
        if range == 0 {
            return self.next();
        }
        let zone = u64::MAX - (u64::MAX % range);
        loop {
            let v = self.next();
            if v < zone {
                return v % range;
            }
        }
    }
}

/// Measurements of a run: running figures plus the rejections.
pub struct Measurements {
    pub measured: Accumulator,
    pub rejected_by_reason: BTreeMap<String, u64>,
    pub samples_read: u64,
    pub settings_max_length: u32,
    pub llm_type: LlmType,
}

/// Refuses the output files of `prep stats` (`outputs`: flag and path, e.g. `--per-sample`,
/// `--plot`) that would overwrite or land in one of its inputs, before any file is created
/// (paths compared with symlinks resolved): one that is (or contains) a `--data` file, or lies
/// inside `--model` or `--shards`. With `--shards` and no `--model`, the model directory the
/// manifest names counts as `--model`. Two outputs naming the same file are refused too.
pub fn refuse_overlapping_outputs(
    outputs: &[(&str, &Path)],
    data: &[PathBuf],
    model: Option<&Path>,
    shards: Option<&Path>,
) -> Result<(), BuildError> {
    let manifest_model = match (model, shards) {
        (None, Some(dir)) => cpmv_shard::Manifest::load(dir)
            .ok()
            .map(|m| PathBuf::from(m.model.dir)),
        _ => None,
    };
    let mut inputs: Vec<Input> = data
        .iter()
        .map(|path| Input {
            flag: "--data",
            path,
        })
        .collect();
    inputs.extend(model.map(|path| Input {
        flag: "--model",
        path,
    }));
    inputs.extend(manifest_model.as_deref().map(|path| Input {
        flag: "--model (named by the manifest of --shards)",
        path,
    }));
    inputs.extend(shards.map(|path| Input {
        flag: "--shards",
        path,
    }));
    let mut seen: Vec<(&str, PathBuf)> = Vec::new();
    for &(flag, path) in outputs {
        cpmv_fsio::refuse_overlap(flag, path, &inputs)?;
        let resolved = cpmv_fsio::resolve(path)?;
        if let Some((other, _)) = seen.iter().find(|(_, p)| *p == resolved) {
            return Err(BuildError::Setup(format!(
                "{other} and {flag} name the same file {}: give them different files",
                path.display()
            )));
        }
        seen.push((flag, resolved));
    }
    Ok(())
}

/// Streams the data files and measures every sample (or a seeded reservoir sample).
pub fn measure(opts: &StatsOptions) -> Result<Measurements, BuildError> {
    if let Some(path) = &opts.per_sample {
        refuse_overlapping_outputs(
            &[("--per-sample", path)],
            &opts.data,
            Some(&opts.model),
            None,
        )?;
    }
    let model = ModelDir::load(&opts.model, opts.prep.llm_type)?;
    model.check_vocab()?;
    let settings = resolve_settings(&model, &opts.prep)?;
    let max_length = settings.max_length as u32;
    let llm_type = model.llm_type;
    let processor = Processor::new(model, settings)
        .map_err(|e| BuildError::Setup(format!("{}: {e}", opts.model.display())))?;
    let (pool, threads) = crate::build::thread_pool(opts.threads)?;
    let (sources, total_bytes) =
        crate::build::input_sources(&opts.data, opts.image_root.as_deref())?;
    let pb = crate::build::progress_bar(total_bytes, opts.progress);

    let mut measured = Accumulator::default();
    let mut rejected: BTreeMap<String, u64> = BTreeMap::new();
    let mut per_sample = match &opts.per_sample {
        Some(path) => Some((
            path.clone(),
            std::io::BufWriter::new(std::fs::File::create(path).map_err(|e| BuildError::Io {
                path: path.clone(),
                source: e,
            })?),
        )),
        None => None,
    };
    let mut record = |results: Vec<Result<Measured, Rejected>>,
                      acc: &mut Accumulator|
     -> Result<(), BuildError> {
        for r in results {
            match r {
                Ok(m) => {
                    acc.add(&m);
                    if let Some((path, out)) = per_sample.as_mut() {
                        serde_json::to_writer(&mut *out, &m)
                            .map_err(std::io::Error::from)
                            .and_then(|_| out.write_all(b"\n"))
                            .map_err(|e| BuildError::Io {
                                path: path.clone(),
                                source: e,
                            })?;
                    }
                }
                Err(rej) => {
                    *rejected
                        .entry(rej.rejection.kind.name().to_string())
                        .or_default() += 1
                }
            }
        }
        Ok(())
    };
    // Measures raw samples in parallel, results in input order.
    let measure_all = |raws: &[RawSample]| -> Vec<Result<Measured, Rejected>> {
        pool.install(|| {
            raws.par_iter()
                .map(|raw| {
                    let source = &sources[raw.file].0;
                    crate::process::guard_sample(raw, source, || {
                        measure_sample(&processor, raw, source)
                    })
                })
                .collect()
        })
    };
    let mut samples_read = 0u64;
    let mut bytes_before = 0u64;
    // Large chunks: measuring a sample is cheap, so fewer synchronisation points matter.
    let chunk_size = 1024 * threads;
    let mut reservoir: Vec<RawSample> = Vec::new();
    let mut rng = SplitMix64(opts.seed);
    for (file_idx, (source, file_bytes)) in sources.iter().enumerate() {
        let mut reader = SampleReader::open(&source.path, file_idx)?;
        loop {
            let chunk = reader.next_chunk(chunk_size)?;
            if chunk.is_empty() {
                break;
            }
            match opts.sample {
                Some(n) => {
                    // Reservoir sampling (algorithm R): every sample has probability n/N.
                    for raw in chunk {
                        if reservoir.len() < n {
                            reservoir.push(raw);
                        } else {
                            let j = rng.below_or_eq(samples_read) as usize;
                            if j < n {
                                reservoir[j] = raw;
                            }
                        }
                        samples_read += 1;
                    }
                }
                None => {
                    samples_read += chunk.len() as u64;
                    record(measure_all(&chunk), &mut measured)?;
                }
            }
            pb.set_position(bytes_before + reader.bytes_read);
            pb.set_message(format!("{samples_read} samples"));
        }
        bytes_before += file_bytes;
    }
    if opts.sample.is_some() {
        reservoir.sort_by_key(|r| (r.file, r.index));
        record(measure_all(&reservoir), &mut measured)?;
    }
    pb.finish_and_clear();
    if let Some((path, mut out)) = per_sample {
        out.flush()
            .map_err(|e| BuildError::Io { path, source: e })?;
    }
    Ok(Measurements {
        measured,
        rejected_by_reason: rejected,
        samples_read,
        settings_max_length: max_length,
        llm_type,
    })
}

/// Figures from built shards: exact lengths as written, plus packing.
pub fn stats_from_shards(dir: &Path, model: Option<&Path>) -> Result<StatsReport, BuildError> {
    let shards = cpmv_shard::ShardDir::open(dir)?;
    let m = &shards.manifest;
    let model_dir = model
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(&m.model.dir));
    let llm: LlmType = m.model.llm_type.parse().map_err(BuildError::Setup)?;
    let model = ModelDir::load(&model_dir, Some(llm))?;
    let t = &model.tokens;
    let new = llm.new_schema();
    let mut measured = Vec::with_capacity(shards.len());
    for found in shards.samples_without_pixels() {
        let found = found?;
        let row = found.view();
        row.check()
            .map_err(|e| BuildError::Setup(format!("{}: {e}", dir.display())))?;
        let image: u32 = row.image_bound.iter().map(|b| (b[1] - b[0]) as u32).sum();
        // Group runs into images: a new image starts at each `<image>` that is not a slice of
        // the previous one (old schema: inside `<slice>…</slice>`; new schema: slices use
        // `<slice>` runs).
        let mut per_image: Vec<u32> = Vec::new();
        let mut in_slice = false;
        for &id in row.input_ids {
            let id = id as u32;
            if id == t.slice_start {
                if new {
                    if let Some(last) = per_image.last_mut() {
                        *last += 1;
                    }
                } else {
                    in_slice = true;
                }
            } else if id == t.slice_end && !new {
                in_slice = false;
            } else if id == t.im_start {
                match (in_slice, per_image.last_mut()) {
                    (true, Some(last)) => *last += 1,
                    _ => per_image.push(1),
                }
            }
        }
        let slices: u32 = per_image.iter().sum();
        measured.push(Measured {
            id: row.id.to_string(),
            total_tokens: row.num_tokens as u32,
            text_tokens: row.num_tokens as u32 - image,
            image_tokens: image,
            images: per_image.len() as u32,
            slices,
            supervised_tokens: row.labels.iter().filter(|&&l| l != -100).count() as u32,
            slices_per_image: per_image,
            image_tokens_by_budget: [0; 3],
        });
    }
    let rejected = m.counts.rejected_by_reason.clone();
    let mut report = summarise(
        &measured,
        m.counts.read,
        rejected,
        m.packing.max_length,
        None,
    );
    report.source = "shards".into();
    // The slicing-budget comparison needs image sizes, which shards do not keep.
    report.image_tokens_by_max_slice_nums.clear();
    report.packing = Some(PackingStats {
        packs: m.packing.packs,
        fill_ratio: m.packing.fill_ratio,
    });
    Ok(report)
}

/// The human-readable report.
pub fn render_text(r: &StatsReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let what = if r.sampled {
        format!(
            "{} of {} samples (random sample, seed {})",
            r.samples + r.rejected,
            r.samples_read,
            r.seed.unwrap_or(0)
        )
    } else {
        format!("{} samples", r.samples_read)
    };
    let _ = writeln!(
        s,
        "{what}: {} measured, {} rejected ({})",
        r.samples, r.rejected, r.source
    );
    let _ = writeln!(
        s,
        "\n{:<22}{:>9}{:>11}{:>9}{:>9}{:>9}{:>9}{:>9}",
        "", "min", "mean", "p50", "p90", "p95", "p99", "max"
    );
    for (name, d) in [
        ("total tokens", &r.total_tokens),
        ("text tokens", &r.text_tokens),
        ("image tokens", &r.image_tokens),
        ("supervised tokens", &r.supervised_tokens),
        ("images per sample", &r.images_per_sample),
        ("slices per image", &r.slices_per_image),
    ] {
        let _ = writeln!(
            s,
            "{name:<22}{:>9}{:>11.1}{:>9}{:>9}{:>9}{:>9}{:>9}",
            d.min, d.mean, d.p50, d.p90, d.p95, d.p99, d.max
        );
    }
    if let Some(ci) = &r.total_tokens_ci95 {
        let _ =
            writeln!(
            s,
            "95% intervals for total tokens: mean {:.1}..{:.1}, p50 {}..{}, p90 {}..{}, p99 {}..{}",
            ci.mean[0], ci.mean[1], ci.p50[0], ci.p50[1], ci.p90[0], ci.p90[1], ci.p99[0], ci.p99[1]
        );
    }
    let _ = writeln!(s, "\nmax length   samples lost   supervised tokens lost");
    for l in &r.length_loss {
        let mark = if l.max_length == r.max_length {
            "  <- --max-length"
        } else {
            ""
        };
        let _ = writeln!(
            s,
            "{:>10}   {:>7} {:>5.1}%   {:>21.1}%{mark}",
            l.max_length,
            l.samples_lost,
            100.0 * l.samples_lost_share,
            100.0 * l.supervised_tokens_lost_share
        );
    }
    let _ = writeln!(
        s,
        "suggested --max-length: {} (keeps >= 99% of samples), {} (keeps all)",
        r.suggested_max_length.keep_99_percent, r.suggested_max_length.keep_all
    );
    if !r.image_tokens_by_max_slice_nums.is_empty() {
        let _ = write!(s, "mean image tokens per sample by --max-slice-nums:");
        for b in &r.image_tokens_by_max_slice_nums {
            let _ = write!(
                s,
                "  {}: {:.1}",
                b.max_slice_nums, b.mean_image_tokens_per_sample
            );
        }
        s.push('\n');
    }
    if let Some(p) = &r.packing {
        let _ = writeln!(s, "packs: {} (fill {:.1}%)", p.packs, 100.0 * p.fill_ratio);
    }
    if !r.rejected_by_reason.is_empty() {
        let _ = writeln!(s, "rejected:");
        for (reason, n) in crate::build::reasons_by_count(&r.rejected_by_reason) {
            let _ = writeln!(s, "  {n:>8}  {reason}");
        }
    }
    let _ = writeln!(s, "\ntotal tokens ({} per bin):", r.histogram.bin_width);
    let peak = r.histogram.counts.iter().copied().max().unwrap_or(0).max(1);
    for (i, &c) in r.histogram.counts.iter().enumerate() {
        let lo = i as u64 * r.histogram.bin_width as u64;
        let bar = "#".repeat(((c * 50).div_ceil(peak)) as usize);
        let mark = if (lo..lo + r.histogram.bin_width as u64).contains(&(r.max_length as u64)) {
            " <- max length"
        } else {
            ""
        };
        let _ = writeln!(s, "{lo:>7} {c:>8} {bar}{mark}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut v = ValueCounts::default();
        for x in (1..=100).rev() {
            v.add(x);
        }
        let d = v.distribution();
        assert_eq!((d.min, d.p50, d.p90, d.p99, d.max), (1, 50, 90, 99, 100));
        assert!((d.mean - 50.5).abs() < 1e-12);
        let mut one = ValueCounts::default();
        one.add(7);
        assert_eq!(one.distribution().p99, 7);
        assert_eq!(
            ValueCounts::default().distribution(),
            Distribution::default()
        );
    }

    #[test]
    fn reservoir_rng_is_uniform_enough_and_seeded() {
        let mut a = SplitMix64(42);
        let mut b = SplitMix64(42);
        let xs: Vec<u64> = (0..1000).map(|_| a.below_or_eq(9)).collect();
        assert_eq!(xs, (0..1000).map(|_| b.below_or_eq(9)).collect::<Vec<_>>());
        for k in 0..10 {
            let c = xs.iter().filter(|&&x| x == k).count();
            assert!((60..140).contains(&c), "{k}: {c}");
        }
    }

    #[test]
    fn suggestions_round_up_to_128() {
        assert_eq!(round_up_128(0), 128);
        assert_eq!(round_up_128(129), 256);
        assert_eq!(round_up_128(256), 256);
    }
}
