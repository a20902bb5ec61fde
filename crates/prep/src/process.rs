//! One input sample → one shard row (or a rejection): the whole per-sample pipeline.
//!
//! The text side (placement, placeholders, template, labels, bounds, length) only needs each
//! image's size, which is read from the file header; pixels are decoded and resampled only for
//! samples that pass, so over-long or malformed samples cost almost nothing.

use std::path::{Path, PathBuf};

use cpmv_image::{decode, plan_slices, probe, slice_image_into, DecodeOptions, SlicePlan};
use cpmv_shard::{PackPixels, Sample, SourceImage};
use serde_json::Value;

use crate::input::RawSample;
use crate::model::ModelDir;
use crate::placeholder::PlaceholderBuilder;
use crate::reject::{RejectKind, Rejection};
use crate::sample::{parse_sample, sample_id, ParsedSample};
use crate::template::{image_bounds, labels, Templater};

/// Settings that change what a sample becomes (all of them are fingerprinted; the type is the
/// manifest's, `cpmv_shard::settings`).
pub use cpmv_shard::settings::SampleSettings;

/// The slicing part of the sample settings.
pub use cpmv_shard::images::slice_config;

/// Where an input file's samples come from and where their relative image paths point.
#[derive(Clone, Debug)]
pub struct InputSource {
    pub path: PathBuf,
    /// File name without extension, used in default sample ids.
    pub stem: String,
    pub image_root: PathBuf,
}

/// Counts that summaries add up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SampleStats {
    pub images: usize,
    pub slices: usize,
    pub supervised: usize,
    pub image_tokens: usize,
    /// Tokens removed by `--truncate`.
    pub truncated: usize,
    /// Bytes of image files read for this sample.
    pub image_bytes: u64,
}

/// A sample's text side, computed from image sizes only.
#[derive(Clone, Debug)]
pub struct TextPlan {
    pub id: String,
    pub input_ids: Vec<i32>,
    pub labels: Vec<i32>,
    pub image_bound: Vec<[i32; 2]>,
    /// Per image (model order): its slicing plan.
    pub plans: Vec<SlicePlan>,
    pub stats: SampleStats,
}

impl TextPlan {
    /// The shard row, given the slices' sizes and pixels (model order).
    pub fn into_sample(self, tgt_sizes: Vec<[i32; 2]>, pixel_values: Vec<Vec<u8>>) -> Sample {
        Sample {
            id: self.id,
            input_ids: self.input_ids,
            labels: self.labels,
            image_bound: self.image_bound,
            tgt_sizes,
            pixel_values,
            ..Sample::default()
        }
    }
}

/// A finished row with its counts.
#[derive(Clone, Debug)]
pub struct Prepared {
    pub sample: Sample,
    pub stats: SampleStats,
}

/// Runs `f` for one sample; a panic in it (a cpmv bug) becomes an `internal_error` rejection
/// that names the sample, so one bad sample never aborts a whole run.
pub fn guard_sample<T>(
    raw: &RawSample,
    source: &InputSource,
    f: impl FnOnce() -> Result<T, Rejected>,
) -> Result<T, Rejected> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .map_err(|payload| panic_rejection(sample_id(None, &source.stem, raw.index), payload))?
}

/// The rejection of a sample whose processing panicked (a cpmv bug): `internal_error`, with
/// the panic's message, so the run goes on and the report names the sample.
fn panic_rejection(id: String, payload: Box<dyn std::any::Any + Send>) -> Rejected {
    let msg = payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into());
    Rejected {
        id,
        rejection: Rejection::new(
            RejectKind::InternalError,
            format!("internal error (please report): {msg}"),
        ),
    }
}

/// Reads an image file fully; a file that cannot be read rejects its sample.
fn read_image_file(full: &Path) -> Result<Vec<u8>, Rejection> {
    std::fs::read(full).map_err(|e| {
        Rejection::new(
            RejectKind::ImageNotFound,
            format!("cannot read image {}: {e}", full.display()),
        )
    })
}

fn decode_rejection(path: &str, e: cpmv_image::DecodeError) -> Rejection {
    let kind = match e {
        cpmv_image::DecodeError::TooLarge(..) => RejectKind::ImageTooLarge,
        _ => RejectKind::ImageDecode,
    };
    Rejection::new(kind, format!("image {path}: {e}"))
}

/// Everything needed to process samples for one model directory; shared by all threads.
pub struct Processor {
    pub model: ModelDir,
    pub settings: SampleSettings,
    templater: Templater,
    /// `--pixels source`: samples carry their image files instead of slices (every image is
    /// still decoded and its size checked, as a set of slices would reject it).
    pub keep_source: bool,
}

/// A sample that failed, with its id (as far as it could be read).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    pub id: String,
    pub rejection: Rejection,
}

impl Processor {
    pub fn new(
        model: ModelDir,
        settings: SampleSettings,
    ) -> Result<Self, crate::template::TemplateError> {
        let templater = Templater::new(&model)?;
        let p = Self {
            model,
            settings,
            templater,
            keep_source: false,
        };
        p.self_check()?;
        Ok(p)
    }

    /// Runs a tiny conversation with one sliced image through the placeholder, template and
    /// bound code, so a checkpoint whose tokenizer splits `<unk>`/`<image>` or whose template
    /// fails is refused once, at start-up, instead of rejecting every sample.
    fn self_check(&self) -> Result<(), crate::template::TemplateError> {
        use crate::sample::{Message, Role, Segment};
        let parsed = ParsedSample {
            id: "self-check".into(),
            images: vec![String::new()],
            messages: vec![
                Message {
                    role: Role::User,
                    segments: vec![Segment::Image(0), Segment::Text("\nWhat is this?".into())],
                },
                Message {
                    role: Role::Assistant,
                    segments: vec![Segment::Text("A test.".into())],
                },
            ],
        };
        let s = self.settings.scale_resolution;
        let size = (2 * s, s);
        let fail = |m: String| {
            crate::template::TemplateError(format!(
                "{}: the checkpoint cannot encode a sample: {m}",
                self.model.dir.display()
            ))
        };
        let plan = self
            .plan_text_within(&parsed, &[size], usize::MAX)
            .map_err(|r| fail(r.message))?;
        // The widened short form must equal tokenizing the full placeholder text.
        let cfg = slice_config(&self.settings);
        let mut full = PlaceholderBuilder::new(
            self.settings.query_num,
            &self.model.strings.unk,
            self.settings.llm_type.new_schema(),
            self.settings.image_id_mode,
        );
        let ph = vec![full.next(&cpmv_image::plan_slices(size.0, size.1, &cfg))];
        let messages: Vec<_> = parsed
            .messages
            .iter()
            .map(|m| (m.role, m.render(&ph)))
            .collect();
        let tok = self.templater.tokenize(&self.model, &messages)?;
        let ids: Vec<i32> = tok.ids.iter().map(|&v| v as i32).collect();
        if ids != plan.input_ids {
            return Err(fail(format!(
                "the tokenizer does not treat {} and the image tokens as special (added) tokens",
                self.model.strings.unk
            )));
        }
        Ok(())
    }

    fn resolve(&self, source: &InputSource, path: &str) -> PathBuf {
        let p = Path::new(path);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            source.image_root.join(p)
        }
    }

    /// Parses and validates the JSON of a sample.
    pub fn parse(&self, raw: &RawSample, source: &InputSource) -> Result<ParsedSample, Rejected> {
        let fallback = sample_id(None, &source.stem, raw.index);
        let value: Value = serde_json::from_slice(&raw.text).map_err(|e| Rejected {
            id: fallback.clone(),
            rejection: Rejection::new(RejectKind::InvalidJson, format!("invalid JSON: {e}")),
        })?;
        let id = sample_id(Some(&value), &source.stem, raw.index);
        parse_sample(&value, id.clone(), self.settings.llm_type)
            .map_err(|rejection| Rejected { id, rejection })
    }

    /// Reads an image file fully (the caller decodes it later from the same bytes).
    pub fn read_image(&self, source: &InputSource, path: &str) -> Result<Vec<u8>, Rejection> {
        read_image_file(&self.resolve(source, path))
    }

    /// Image size read from the file's first bytes only (no pixel data is read or decoded):
    /// what `prep stats` uses. Falls back to the whole file when the header is not in the first
    /// 16 KiB (e.g. a JPEG with a large EXIF thumbnail first).
    pub fn image_size_from_header(
        &self,
        source: &InputSource,
        path: &str,
    ) -> Result<(u32, u32), Rejection> {
        self.image_header(source, path).map(|(size, _)| size)
    }

    /// [`Processor::image_size_from_header`] and the file's length in bytes.
    pub fn image_header(
        &self,
        source: &InputSource,
        path: &str,
    ) -> Result<((u32, u32), u64), Rejection> {
        use std::io::Read;
        const HEAD: u64 = 16 << 10;
        let full = self.resolve(source, path);
        let not_found = |e: std::io::Error| {
            Rejection::new(
                RejectKind::ImageNotFound,
                format!("cannot read image {}: {e}", full.display()),
            )
        };
        let mut file = std::fs::File::open(&full).map_err(not_found)?;
        let len = file.metadata().map_err(not_found)?.len();
        let mut head = Vec::with_capacity(HEAD as usize);
        (&mut file)
            .take(HEAD)
            .read_to_end(&mut head)
            .map_err(not_found)?;
        // EXIF may sit after the image data (WebP, some PNGs): with --exif-transpose the
        // orientation needs the whole file.
        if self.settings.exif_transpose && head.len() as u64 == HEAD {
            file.read_to_end(&mut head).map_err(not_found)?;
        }
        let size = match self.image_size(path, &head) {
            Err(_) if head.len() as u64 == HEAD => {
                file.read_to_end(&mut head).map_err(not_found)?;
                self.image_size(path, &head)
            }
            r => r,
        }?;
        Ok((size, len))
    }

    /// Image size as the reference sees it (EXIF rotation applied only with `exif_transpose`).
    pub fn image_size(&self, path: &str, bytes: &[u8]) -> Result<(u32, u32), Rejection> {
        let info = probe(bytes).map_err(|e| decode_rejection(path, e))?;
        let swap = self.settings.exif_transpose
            && cpmv_image::exif::orientation(bytes).is_some_and(|o| o >= 5);
        Ok(if swap {
            (info.height, info.width)
        } else {
            (info.width, info.height)
        })
    }

    /// Repeats the `<unk>` inside each placeholder run `q` times (with its mask value). Runs
    /// open at `<image>` (and `<slice>` in the new schema) and close at their end tokens; a
    /// literal `<unk>` in the text, outside any run, is left alone.
    fn widen_placeholder_runs(
        &self,
        short: &crate::template::Tokenized,
        q: usize,
    ) -> crate::template::Tokenized {
        let t = &self.model.tokens;
        let new = self.settings.llm_type.new_schema();
        let extra = short.ids.iter().filter(|&&v| v == t.unk).count() * q.saturating_sub(1);
        let mut ids = Vec::with_capacity(short.ids.len() + extra);
        let mut ctx = Vec::with_capacity(short.ids.len() + extra);
        let mut in_run = false;
        for (&id, &c) in short.ids.iter().zip(&short.ctx) {
            if id == t.im_start || (new && id == t.slice_start) {
                in_run = true;
            } else if id == t.im_end || (new && id == t.slice_end) {
                in_run = false;
            }
            let copies = if in_run && id == t.unk { q } else { 1 };
            for _ in 0..copies {
                ids.push(id);
                ctx.push(c);
            }
        }
        crate::template::Tokenized { ids, ctx }
    }

    /// Rejects ids the model has no embedding for (config.json's `vocab_size`), e.g. a
    /// literal added token in the text: the trainer would otherwise stop at this sample.
    fn check_vocab(&self, ids: &[u32]) -> Result<(), Rejection> {
        let Some(vocab) = self.model.vocab_size else {
            return Ok(());
        };
        match ids.iter().find(|&&id| u64::from(id) >= vocab) {
            None => Ok(()),
            Some(&id) => Err(Rejection::new(
                RejectKind::TokenOutOfVocab,
                format!(
                    "the text tokenizes to {:?} (id {id}), not below config.json's vocab_size \
                     {vocab}: the model has no embedding for it",
                    self.model.token_name(id)
                ),
            )),
        }
    }

    /// The text side of a parsed sample given its image sizes (model order).
    pub fn plan_text(
        &self,
        parsed: &ParsedSample,
        sizes: &[(u32, u32)],
    ) -> Result<TextPlan, Rejection> {
        self.plan_text_within(parsed, sizes, self.settings.max_length)
    }

    /// [`Processor::plan_text`] with another length limit (`usize::MAX`: measure only).
    pub fn plan_text_within(
        &self,
        parsed: &ParsedSample,
        sizes: &[(u32, u32)],
        max_length: usize,
    ) -> Result<TextPlan, Rejection> {
        let s = &self.settings;
        let cfg = slice_config(s);
        let plans: Vec<SlicePlan> = sizes
            .iter()
            .map(|&(w, h)| cpmv_image::plan_slices(w, h, &cfg))
            .collect();
        // Placeholders are tokenized with a single `<unk>` per run, then each run is widened to
        // query_num tokens. `<unk>` and the start/end tokens are added (special) tokens, which
        // the tokenizer splits out before anything else, so the text around them tokenizes the
        // same either way; tokenizing thousands of `<unk>` one by one was most of the cost of a
        // sample's text side. The start-up self-check and the parity fixtures confirm it.
        let mut builder = PlaceholderBuilder::new(
            1,
            &self.model.strings.unk,
            s.llm_type.new_schema(),
            s.image_id_mode,
        );
        let placeholders: Vec<String> = plans.iter().map(|p| builder.next(p)).collect();
        let messages: Vec<_> = parsed
            .messages
            .iter()
            .map(|m| (m.role, m.render(&placeholders)))
            .collect();
        let short = self
            .templater
            .tokenize(&self.model, &messages)
            .map_err(|e| Rejection::new(RejectKind::InvalidConversations, e.0))?;
        self.check_vocab(&short.ids)?;
        let mut tok = self.widen_placeholder_runs(&short, s.query_num as usize);

        let slices: usize = plans.iter().map(SlicePlan::num_images).sum();
        let q = s.query_num as i32;
        let bounds_of = |ids: &[u32]| {
            image_bounds(ids, &self.model)
                .filter(|b| b.len() == slices && b.iter().all(|[a, e]| e - a == q))
                .ok_or_else(|| {
                    Rejection::new(
                        RejectKind::ReservedToken,
                        "image placeholders do not tokenize into one run of query_num tokens per slice",
                    )
                })
        };
        let mut bounds = bounds_of(&tok.ids)?;
        let n = tok.ids.len();
        let mut truncated = 0;
        if n > max_length {
            if !s.truncate {
                return Err(Rejection::new(
                    RejectKind::TooLong,
                    format!("{n} tokens > max length {max_length}"),
                ));
            }
            // End of the last placeholder, including the old schema's closing `</slice>`.
            let t = &self.model.tokens;
            let last_image_end = tok
                .ids
                .iter()
                .rposition(|&v| v == t.im_end || v == t.slice_end)
                .map_or(0, |p| p + 1);
            if last_image_end > max_length {
                return Err(Rejection::new(
                    RejectKind::TooLong,
                    format!(
                        "{n} tokens > max length {max_length}, and the images alone end at token {last_image_end}"
                    ),
                ));
            }
            truncated = n - max_length;
            tok.ids.truncate(max_length);
            tok.ctx.truncate(max_length);
            bounds = bounds_of(&tok.ids)?;
        }
        let labels = labels(&tok.ids, &tok.ctx, self.model.tokens.turn_end_label);
        let supervised = labels
            .iter()
            .filter(|&&l| l != cpmv_shard::schema::IGNORE_INDEX)
            .count();
        if supervised == 0 {
            return Err(Rejection::new(
                RejectKind::NoSupervision,
                if truncated > 0 {
                    format!(
                        "truncation to {} tokens removed every supervised token",
                        max_length
                    )
                } else {
                    "no token carries a label".to_string()
                },
            ));
        }
        let image_tokens = bounds.iter().map(|b| (b[1] - b[0]) as usize).sum();
        Ok(TextPlan {
            id: parsed.id.clone(),
            input_ids: tok.ids.iter().map(|&v| v as i32).collect(),
            labels,
            image_bound: bounds,
            stats: SampleStats {
                images: plans.len(),
                slices,
                supervised,
                image_tokens,
                truncated,
                image_bytes: 0,
            },
            plans,
        })
    }

    /// [`Processor::plan`], with a panic (a cpmv bug) turned into an `internal_error` rejection
    /// naming the sample instead of aborting the run.
    pub fn plan_guarded(&self, raw: &RawSample, source: &InputSource) -> Result<Planned, Rejected> {
        guard_sample(raw, source, || self.plan(raw, source))
    }

    /// [`Processor::pixels_into`], with a panic turned into an `internal_error` rejection
    /// (and `pack` left as it was).
    pub fn pixels_into_guarded(
        &self,
        planned: Planned,
        pack: &mut PackPixels,
    ) -> Result<Prepared, Rejected> {
        let id = planned.text.id.clone();
        let mark = pack.mark();
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.pixels_into(planned, pack)
        }))
        .map_err(|payload| {
            pack.truncate(mark);
            panic_rejection(id, payload)
        })?
    }

    /// The full pipeline for one raw sample: [`Processor::plan`], then [`Processor::pixels`].
    pub fn process(&self, raw: &RawSample, source: &InputSource) -> Result<Prepared, Rejected> {
        self.pixels(self.plan(raw, source)?)
    }

    /// Everything about a sample but its pixels: the JSON checked, its images' sizes read from
    /// their file headers (as `prep stats` does), the text planned (tokens, labels, bounds,
    /// slicing). Enough to pack it; [`Processor::pixels`] reads and decodes the images.
    pub fn plan(&self, raw: &RawSample, source: &InputSource) -> Result<Planned, Rejected> {
        let parsed = self.parse(raw, source)?;
        let reject = |rejection: Rejection| Rejected {
            id: parsed.id.clone(),
            rejection,
        };
        let mut sizes = Vec::with_capacity(parsed.images.len());
        let mut file_bytes = Vec::with_capacity(parsed.images.len());
        for path in &parsed.images {
            let (size, len) = self.image_header(source, path).map_err(reject)?;
            sizes.push(size);
            file_bytes.push(len);
        }
        let mut text = self.plan_text(&parsed, &sizes).map_err(reject)?;
        text.stats.image_bytes = file_bytes.iter().sum();
        let pixel_bytes = if self.keep_source {
            file_bytes.iter().map(|&b| b as usize).sum()
        } else {
            text.plans
                .iter()
                .flat_map(|p| p.image_sizes())
                .map(|(w, h)| w as usize * h as usize * 3)
                .sum()
        };
        let files = parsed
            .images
            .iter()
            .map(|p| self.resolve(source, p))
            .collect();
        Ok(Planned {
            paths: parsed.images,
            files,
            text,
            pixel_bytes,
        })
    }

    /// Decodes a planned sample's images and makes its slices (or, with `--pixels source`,
    /// keeps its files once they decoded): the finished row. An image that does not decode,
    /// or decodes to another size than its header said, rejects the sample.
    pub fn pixels(&self, planned: Planned) -> Result<Prepared, Rejected> {
        let mut px = PackPixels::default();
        let mut prepared = self.pixels_into(planned, &mut px)?;
        prepared.sample.pixel_values = px.slices().map(<[u8]>::to_vec).collect();
        Ok(prepared)
    }

    /// Bytes of slices [`Processor::pixels_into`] will append for `planned` (none with
    /// `--pixels source`, whose files go to the image store instead).
    pub fn slice_bytes(&self, planned: &Planned) -> usize {
        if self.keep_source {
            return 0;
        }
        planned.pixel_bytes
    }

    /// [`Processor::pixels`] with the sample's slices appended to a pack's buffer (one more row
    /// of `pack`) instead of kept in the row: how `prep build` makes them, so they go to the
    /// file without another copy. A rejected sample leaves `pack` as it found it.
    pub fn pixels_into(
        &self,
        planned: Planned,
        pack: &mut PackPixels,
    ) -> Result<Prepared, Rejected> {
        let mark = pack.mark();
        let res = self.append_pixels(planned, pack);
        match &res {
            Ok(_) => pack.end_row(mark),
            Err(_) => pack.truncate(mark),
        }
        res
    }

    /// The work of [`Processor::pixels_into`]; on an error `pack` may hold part of the row.
    fn append_pixels(&self, planned: Planned, pack: &mut PackPixels) -> Result<Prepared, Rejected> {
        let Planned {
            paths, files, text, ..
        } = planned;
        let reject = |rejection: Rejection| Rejected {
            id: text.id.clone(),
            rejection,
        };
        let opts = DecodeOptions {
            exif_transpose: self.settings.exif_transpose,
        };
        let cfg = slice_config(&self.settings);
        let p = cfg.patch_size as i32;
        let mut tgt_sizes = Vec::with_capacity(text.stats.slices);
        let mut sources = Vec::new();
        for ((path, file), plan) in paths.iter().zip(&files).zip(&text.plans) {
            let bytes = read_image_file(file).map_err(reject)?;
            let img = decode(&bytes, opts).map_err(|e| reject(decode_rejection(path, e)))?;
            if plan_slices(img.width, img.height, &cfg) != *plan {
                // The header promised another size than the pixels have: placeholders and
                // pixels would disagree.
                return Err(reject(Rejection::new(
                    RejectKind::ImageDecode,
                    format!(
                        "image {path}: header size differs from the decoded size {}x{}",
                        img.width, img.height
                    ),
                )));
            }
            for (w, h) in plan.image_sizes() {
                tgt_sizes.push([h as i32 / p, w as i32 / p]);
            }
            // `--pixels source`: the file decodes to the size its placeholders were made for;
            // the reader makes the slices, so resizing here would be thrown away.
            if self.keep_source {
                sources.push(SourceImage::new(bytes));
            } else {
                let mut end = pack.data.len();
                for (w, h) in slice_image_into(&img, &cfg, &mut pack.data).image_sizes() {
                    end += w as usize * h as usize * 3;
                    pack.slice_ends.push(end);
                }
            }
        }
        let stats = text.stats;
        let mut sample = text.into_sample(tgt_sizes, Vec::new());
        sample.source_images = sources;
        Ok(Prepared { sample, stats })
    }
}

/// A sample planned but without pixels yet ([`Processor::plan`]): what a packing window holds
/// (a few kB: its tokens and where its images are, not their slices' few MB).
#[derive(Clone, Debug)]
pub struct Planned {
    /// Image paths as the sample names them (model order).
    pub paths: Vec<String>,
    /// The same, resolved against the image root.
    pub files: Vec<PathBuf>,
    pub text: TextPlan,
    /// Bytes of pixel data the finished row will carry.
    pub pixel_bytes: usize,
}

impl crate::pack::Packable for Planned {
    fn num_tokens(&self) -> usize {
        self.text.input_ids.len()
    }
    fn num_slices(&self) -> usize {
        self.text.stats.slices
    }
    fn pixel_bytes(&self) -> usize {
        self.pixel_bytes
    }
}
