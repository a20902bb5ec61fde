//! The whole model: vision tower → resampler → features written over the image placeholder
//! embeddings → LLM → loss (spec §6).

use candle_core::{DType, Device, Tensor};
use std::path::Path;
use std::sync::Mutex;

use crate::config::{ModelConfig, Version};
use crate::error::{ModelError, Result};
use crate::image::ImageInput;
use crate::linear::{Mode, Rng};
use crate::llm::{Llm, LlmAux};
use crate::params::{dropout_rng, LoadOptions, ParamStore};
use crate::resampler::Resampler;
use crate::vision_navit::{NavitPositions, NavitSiglip};
use crate::vision_vit::{VisionInput, VitSiglip};
use crate::weights::Checkpoint;

/// One micro-batch: `B` rows of equal length `T`, each holding one or more packed samples.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    /// `[B][T]` token ids (padding: 0).
    pub input_ids: Vec<Vec<u32>>,
    /// `[B][T]` positions, restarting at 0 for every sample (padding: 0).
    pub position_ids: Vec<Vec<u32>>,
    /// `[B][T]` targets, already shifted; −100 = no loss.
    pub labels: Vec<Vec<i64>>,
    /// Sample lengths of each row, in order (attention is causal within a sample only).
    pub segments: Vec<Vec<usize>>,
    /// Every image slice of the batch, in placeholder order.
    pub images: Vec<ImageInput>,
    /// For each image: (row, start, end) of its placeholder run, `end − start = query_num`.
    pub bounds: Vec<(usize, usize, usize)>,
    /// For each image, the vision batch it runs in (equal values, contiguous). Only 2.5's
    /// reference vision depends on it (an image's features see its batch's longest image):
    /// the official scripts train one sample per batch, so loaders give each sample its own
    /// group. Empty: all images in one batch.
    pub image_groups: Vec<usize>,
}

impl Batch {
    /// Rows and row length.
    pub fn dims(&self) -> (usize, usize) {
        (
            self.input_ids.len(),
            self.input_ids.first().map_or(0, Vec::len),
        )
    }

    /// Number of supervised tokens.
    pub fn supervised(&self) -> usize {
        self.labels.iter().flatten().filter(|&&l| l >= 0).count()
    }

    fn validate(&self, cfg: &ModelConfig) -> Result<()> {
        let (b, t) = self.dims();
        let bad = |m: String| Err(ModelError::Batch(m));
        for (name, rows) in [
            ("position_ids", self.position_ids.len()),
            ("labels", self.labels.len()),
            ("segments", self.segments.len()),
        ] {
            if rows != b {
                return bad(format!("{name} has {rows} rows, input_ids {b}"));
            }
        }
        for r in 0..b {
            if self.input_ids[r].len() != t
                || self.position_ids[r].len() != t
                || self.labels[r].len() != t
            {
                return bad(format!("row {r}: rows of a batch must all have length {t}"));
            }
            if self.segments[r].iter().sum::<usize>() > t {
                return bad(format!("row {r}: sample lengths exceed the row length {t}"));
            }
            if let Some(&id) = self.input_ids[r]
                .iter()
                .find(|&&i| i as usize >= cfg.llm.vocab_size)
            {
                return bad(format!(
                    "row {r}: token id {id} >= vocab size {}",
                    cfg.llm.vocab_size
                ));
            }
            if let Some(&l) = self.labels[r]
                .iter()
                .find(|&&l| l != -100 && (l < 0 || l as usize >= cfg.llm.vocab_size))
            {
                return bad(format!("row {r}: label {l} is neither -100 nor a token id"));
            }
        }
        if !self.image_groups.is_empty() && self.image_groups.len() != self.images.len() {
            return bad(format!(
                "{} image groups for {} images",
                self.image_groups.len(),
                self.images.len()
            ));
        }
        if self.images.len() != self.bounds.len() {
            return bad(format!(
                "{} images but {} placeholder runs",
                self.images.len(),
                self.bounds.len()
            ));
        }
        let q = cfg.resampler.query_num;
        for (i, &(r, s, e)) in self.bounds.iter().enumerate() {
            if r >= b || e > t || e < s || e - s != q {
                return bad(format!(
                    "image {i}: placeholder run (row {r}, {s}..{e}) must lie in the batch and \
                     hold query_num = {q} tokens"
                ));
            }
        }
        Ok(())
    }
}

/// Outputs of a forward pass with loss.
pub struct LossOutput {
    /// Mean cross-entropy over supervised tokens (f32 scalar).
    pub loss: Tensor,
    /// Number of supervised tokens it averages over.
    pub n_tokens: usize,
}

/// MiniCPM-V.
pub struct MiniCpmV {
    cfg: ModelConfig,
    params: ParamStore,
    vision: Vision,
    resampler: Resampler,
    llm: Llm,
    dropout: Mutex<Rng>,
    block_path: bool,
    /// The block path's CUDA backends (f32 and bf16 buffers), made on first use on candle's
    /// stream.
    #[cfg(feature = "cuda")]
    cuda_blocks: std::sync::OnceLock<CudaBackends>,
}

/// The block path's CUDA backends: f32 and bf16 buffers.
#[cfg(feature = "cuda")]
pub(crate) type CudaBackends = (cpmv_block::Cuda<f32>, cpmv_block::Cuda<half::bf16>);

enum Vision {
    Vit(VitSiglip),
    Navit(NavitSiglip),
}

impl MiniCpmV {
    /// Loads a checkpoint directory (config.json + safetensors).
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let cfg = ModelConfig::from_dir(dir)?;
        let ckpt = Checkpoint::open(dir)?;
        let params = ParamStore::load(&ckpt, &cfg, opts)?;
        Self::from_params(cfg, params, opts)
    }

    /// Builds the modules over an already loaded parameter store.
    pub fn from_params(
        cfg: ModelConfig,
        mut params: ParamStore,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let vision =
            match cfg.version {
                Version::V2_0 => Vision::Vit(VitSiglip::load(&cfg.vision, &mut params)?),
                Version::V2_5 if !opts.fixes.v25_vision_masking => Vision::Navit(
                    NavitSiglip::load(&cfg.vision, NavitPositions::AllValid1D, &mut params)?,
                ),
                Version::V2_5 | Version::V2_6 => Vision::Navit(NavitSiglip::load(
                    &cfg.vision,
                    NavitPositions::TwoD,
                    &mut params,
                )?),
            };
        let resampler = Resampler::load(&cfg.resampler, &mut params)?;
        let llm = Llm::load(&cfg.llm, &mut params)?;
        Ok(MiniCpmV {
            dropout: dropout_rng(opts.seed),
            block_path: opts.block_path,
            #[cfg(feature = "cuda")]
            cuda_blocks: std::sync::OnceLock::new(),
            cfg,
            params,
            vision,
            resampler,
            llm,
        })
    }

    /// Whether the block path was asked for at load (see [`MiniCpmV::vision_on_blocks`]).
    pub(crate) fn block_path(&self) -> bool {
        self.block_path
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn params(&self) -> &ParamStore {
        &self.params
    }

    pub fn llm(&self) -> &Llm {
        &self.llm
    }

    /// State of the dropout generator (saved with training state for exact resume).
    pub fn dropout_state(&self) -> Rng {
        *self.dropout.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_dropout_state(&self, rng: Rng) {
        *self.dropout.lock().unwrap_or_else(|p| p.into_inner()) = rng;
    }

    /// The LoRA-dropout generator cell (generation runs in eval mode and never draws from it).
    pub(crate) fn dropout_cell(&self) -> &std::sync::Mutex<crate::linear::Rng> {
        &self.dropout
    }

    fn device(&self) -> &Device {
        self.params.device()
    }

    fn dtype(&self) -> DType {
        self.params.dtype()
    }

    /// Resampled features of every image: `[n_img, query_num, hidden]`. `groups` gives each
    /// image's vision batch (see [`Batch::image_groups`]); empty means one batch.
    pub fn image_features(
        &self,
        images: &[ImageInput],
        groups: &[usize],
        train: bool,
    ) -> Result<Tensor> {
        let mode = Mode {
            train,
            rng: &self.dropout,
        };
        let (x, lens) = self.run_vision(images, groups, &mode)?;
        self.resampler.forward(&x, &lens, images, &mode)
    }

    /// The vision batches images run in: contiguous ranges. Only the 2.5 reference scheme
    /// depends on how images are batched (its features see the batch's longest image), so
    /// only there each group of [`Batch::image_groups`] runs on its own.
    pub fn vision_plan(&self, n_images: usize, groups: &[usize]) -> Vec<std::ops::Range<usize>> {
        if n_images == 0 {
            return Vec::new();
        }
        let split = matches!(&self.vision, Vision::Navit(v) if v.batch_dependent())
            && groups.len() == n_images;
        if !split {
            return std::iter::once(0..n_images).collect();
        }
        let mut out = Vec::new();
        let mut start = 0;
        while start < n_images {
            let mut end = start + 1;
            while end < n_images && groups[end] == groups[start] {
                end += 1;
            }
            out.push(start..end);
            start = end;
        }
        out
    }

    /// Patch embeddings + positions of a vision batch (the input of vision layer 0).
    pub fn vision_embed(&self, images: &[ImageInput], train: bool) -> Result<VisionInput> {
        let mode = Mode {
            train,
            rng: &self.dropout,
        };
        match &self.vision {
            Vision::Vit(v) => v.embed(images, &mode),
            Vision::Navit(v) => v.embed(images, &mode),
        }
    }

    /// Number of vision transformer layers.
    pub fn vision_num_layers(&self) -> usize {
        match &self.vision {
            Vision::Vit(v) => v.num_layers(),
            Vision::Navit(v) => v.num_layers(),
        }
    }

    /// Vision layer `i` alone (for layer-wise recomputation; see [`MiniCpmV::layer_forward`]).
    pub fn vision_layer(
        &self,
        i: usize,
        x: &Tensor,
        mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let mode = Mode {
            train,
            rng: &self.dropout,
        };
        match &self.vision {
            Vision::Vit(v) => v.layer(i, x, mask, &mode),
            Vision::Navit(v) => v.layer(i, x, mask, &mode),
        }
    }

    /// Vision layer `i` converted for the block path on backend `be`.
    pub(crate) fn vision_block_layer<B: crate::block::Bridge>(
        &self,
        be: &B,
        i: usize,
    ) -> Result<crate::block::BlockLayer<cpmv_block::vision::VisionLayer<B>>> {
        match &self.vision {
            Vision::Vit(v) => v.block_layer(be, i),
            Vision::Navit(v) => v.block_layer(be, i),
        }
    }

    /// The block path's CUDA backends for `dev` (the model's device), f32 and bf16, on
    /// candle's stream so that their work is ordered with candle's.
    #[cfg(feature = "cuda")]
    pub(crate) fn cuda_backends(&self, dev: &candle_core::CudaDevice) -> Result<&CudaBackends> {
        if let Some(b) = self.cuda_blocks.get() {
            return Ok(b);
        }
        let b = (
            cpmv_block::Cuda::new(dev.cuda_stream())?,
            cpmv_block::Cuda::new(dev.cuda_stream())?,
        );
        // A second thread may have set them meanwhile: either pair serves.
        let _ = self.cuda_blocks.set(b);
        self.cuda_blocks
            .get()
            .ok_or_else(|| ModelError::Batch("internal: no CUDA block backend".into()))
    }

    /// Whether any vision parameter trains (weights or LoRA adapters).
    pub fn vision_trains(&self) -> bool {
        self.params.vars().keys().any(|k| k.starts_with("vpm."))
            || self.params.lora().keys().any(|k| k.starts_with("vpm."))
    }

    fn finish_vision(&self, x: &Tensor) -> Result<Tensor> {
        match &self.vision {
            Vision::Vit(v) => v.finish(x),
            Vision::Navit(v) => v.finish(x),
        }
    }

    fn run_vision(
        &self,
        images: &[ImageInput],
        groups: &[usize],
        mode: &Mode,
    ) -> Result<(Tensor, Vec<usize>)> {
        let mut parts = Vec::new();
        let mut lens = Vec::with_capacity(images.len());
        for r in self.vision_plan(images.len(), groups) {
            let (x, l) = match &self.vision {
                Vision::Vit(v) => v.forward(&images[r], mode)?,
                Vision::Navit(v) => v.forward(&images[r], mode)?,
            };
            parts.push(x);
            lens.extend(l);
        }
        Ok((pad_cat(parts)?, lens))
    }

    /// Vision tower output alone (`[n, l_max, C]`, valid rows first), for inspection/tests.
    pub fn vision_tower(
        &self,
        images: &[ImageInput],
        groups: &[usize],
    ) -> Result<(Tensor, Vec<usize>)> {
        let mode = Mode {
            train: false,
            rng: &self.dropout,
        };
        self.run_vision(images, groups, &mode)
    }

    /// Input embeddings `[B, T, H]` with image features written over the placeholders.
    pub fn input_embeddings(&self, batch: &Batch, train: bool) -> Result<Tensor> {
        batch.validate(&self.cfg)?;
        if batch.images.is_empty() {
            return self.token_embeddings(batch);
        }
        let feats = self.image_features(&batch.images, &batch.image_groups, train)?;
        self.scatter_features(batch, &feats)
    }

    /// Input embeddings from the outputs of the last vision layer of each vision batch of
    /// [`MiniCpmV::vision_plan`] (before the final norm), as a layer-wise trainer computes them.
    pub fn embeddings_from_vision_layers(
        &self,
        batch: &Batch,
        last: &[Tensor],
        lens: &[usize],
        train: bool,
    ) -> Result<Tensor> {
        batch.validate(&self.cfg)?;
        if batch.images.is_empty() {
            return self.token_embeddings(batch);
        }
        let mode = Mode {
            train,
            rng: &self.dropout,
        };
        let parts = last
            .iter()
            .map(|x| self.finish_vision(x))
            .collect::<Result<Vec<_>>>()?;
        let feats = self
            .resampler
            .forward(&pad_cat(parts)?, lens, &batch.images, &mode)?;
        self.scatter_features(batch, &feats)
    }

    fn token_embeddings(&self, batch: &Batch) -> Result<Tensor> {
        let (b, t) = batch.dims();
        let ids: Vec<u32> = batch.input_ids.iter().flatten().copied().collect();
        let ids = Tensor::from_vec(ids, (b, t), self.device())?;
        self.llm.embed(&ids)
    }

    /// Token embeddings with the rows of the placeholder runs replaced by `feats`.
    fn scatter_features(&self, batch: &Batch, feats: &Tensor) -> Result<Tensor> {
        let (b, t) = batch.dims();
        let h = self.cfg.llm.hidden_size;
        let e = self.token_embeddings(batch)?;
        let q = self.cfg.resampler.query_num;
        let feats = feats.reshape((batch.images.len() * q, h))?;
        let mut keep = vec![1f32; b * t];
        let mut rows = Vec::with_capacity(batch.images.len() * q);
        for &(r, s, e) in &batch.bounds {
            for p in s..e {
                if keep[r * t + p] == 0.0 {
                    return Err(ModelError::Batch(format!(
                        "placeholder runs overlap at row {r}, position {p}"
                    )));
                }
                keep[r * t + p] = 0.0;
                rows.push((r * t + p) as u32);
            }
        }
        let keep = Tensor::from_vec(keep, (b * t, 1), self.device())?.to_dtype(self.dtype())?;
        let rows = Tensor::from_vec(rows, batch.images.len() * q, self.device())?;
        let flat = e.reshape((b * t, h))?.broadcast_mul(&keep)?;
        Ok(flat.index_add(&rows, &feats, 0)?.reshape((b, t, h))?)
    }

    /// Final hidden states `[B, T, H]` (after the last norm).
    pub fn hidden_states(&self, batch: &Batch, train: bool) -> Result<Tensor> {
        let mode = Mode {
            train,
            rng: &self.dropout,
        };
        let mut x = self.input_embeddings(batch, train)?;
        let aux = LlmAux::new(
            &self.cfg.llm,
            &batch.position_ids,
            &batch.segments,
            self.dtype(),
            self.device(),
        )?;
        for i in 0..self.llm.num_layers() {
            x = self.llm.layer(i, &x, &aux, &mode)?;
        }
        self.llm.final_norm(&x)
    }

    /// Rotary tables and attention mask of a batch, for layer-by-layer execution.
    pub fn llm_aux(&self, batch: &Batch) -> Result<LlmAux> {
        LlmAux::new(
            &self.cfg.llm,
            &batch.position_ids,
            &batch.segments,
            self.dtype(),
            self.device(),
        )
    }

    /// Decoder layer `i` alone (trainers use it to recompute layers in backward, i.e.
    /// gradient checkpointing; LoRA dropout draws from the model's generator, see
    /// [`MiniCpmV::dropout_state`]).
    pub fn layer_forward(&self, i: usize, x: &Tensor, aux: &LlmAux, train: bool) -> Result<Tensor> {
        let mode = Mode {
            train,
            rng: &self.dropout,
        };
        self.llm.layer(i, x, aux, &mode)
    }

    /// Final norm, logits of the supervised positions and their mean cross-entropy, from the
    /// last decoder layer's output.
    pub fn head_loss(&self, x: &Tensor, batch: &Batch, train: bool) -> Result<LossOutput> {
        let h = self.llm.final_norm(x)?;
        self.loss_from_hidden(&h, batch, train)
    }

    /// Logits of every position `[B, T, V]` in f32 (tests, inspection; training uses
    /// [`MiniCpmV::loss`], which computes logits for supervised positions only).
    pub fn logits(&self, batch: &Batch) -> Result<Tensor> {
        let h = self.hidden_states(batch, false)?;
        let mode = Mode {
            train: false,
            rng: &self.dropout,
        };
        Ok(self.llm.logits(&h, &mode)?.to_dtype(DType::F32)?)
    }

    /// Positions with a label, and the labels.
    fn supervised(&self, batch: &Batch) -> Result<(Tensor, Tensor, usize)> {
        let (_, t) = batch.dims();
        let mut idx = Vec::new();
        let mut tgt = Vec::new();
        for (r, row) in batch.labels.iter().enumerate() {
            for (p, &l) in row.iter().enumerate() {
                if l >= 0 {
                    idx.push((r * t + p) as u32);
                    tgt.push(l as u32);
                }
            }
        }
        let n = idx.len();
        Ok((
            Tensor::from_vec(idx, n, self.device())?,
            Tensor::from_vec(tgt, n, self.device())?,
            n,
        ))
    }

    /// Hidden states of the supervised positions `[N, H]` and their targets.
    pub fn supervised_hidden(&self, h: &Tensor, batch: &Batch) -> Result<(Tensor, Tensor, usize)> {
        let (b, t) = batch.dims();
        let (idx, tgt, n) = self.supervised(batch)?;
        let hs = h
            .reshape((b * t, self.cfg.llm.hidden_size))?
            .index_select(&idx, 0)?;
        Ok((hs, tgt, n))
    }

    /// Mean cross-entropy over the batch's supervised tokens (spec §6.3: labels already
    /// shifted, no shift here), logits computed only where there is a label.
    pub fn loss(&self, batch: &Batch, train: bool) -> Result<LossOutput> {
        let h = self.hidden_states(batch, train)?;
        self.loss_from_hidden(&h, batch, train)
    }

    /// The loss head over final hidden states.
    pub fn loss_from_hidden(&self, h: &Tensor, batch: &Batch, train: bool) -> Result<LossOutput> {
        let (hs, tgt, n) = self.supervised_hidden(h, batch)?;
        if n == 0 {
            return Err(ModelError::Batch(
                "the batch has no supervised token".into(),
            ));
        }
        let mode = Mode {
            train,
            rng: &self.dropout,
        };
        let logits = self.llm.logits(&hs, &mode)?;
        Ok(LossOutput {
            loss: crate::ops::cross_entropy(&logits, &tgt)?,
            n_tokens: n,
        })
    }

    /// Per-position losses `[N]` of the supervised tokens, in row-major order (evaluation).
    pub fn token_losses(&self, batch: &Batch) -> Result<Tensor> {
        let h = self.hidden_states(batch, false)?;
        let (hs, tgt, _) = self.supervised_hidden(&h, batch)?;
        let mode = Mode {
            train: false,
            rng: &self.dropout,
        };
        let logits = self.llm.logits(&hs, &mode)?;
        Ok(crate::ops::cross_entropy_rows(&logits, &tgt)?)
    }
}

/// Concatenates `[n_i, l_i, C]` parts along the first axis, zero-padding each to the longest.
fn pad_cat(parts: Vec<Tensor>) -> Result<Tensor> {
    if parts.len() == 1 {
        return Ok(parts.into_iter().next().expect("one part"));
    }
    let l_max = parts
        .iter()
        .map(|p| p.dim(1))
        .collect::<candle_core::Result<Vec<_>>>()?
        .into_iter()
        .max()
        .unwrap_or(0);
    let padded = parts
        .into_iter()
        .map(|p| -> candle_core::Result<Tensor> {
            let (n, l, c) = p.dims3()?;
            if l == l_max {
                Ok(p)
            } else {
                let z = Tensor::zeros((n, l_max - l, c), p.dtype(), p.device())?;
                Tensor::cat(&[&p, &z], 1)
            }
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&padded, 0)?)
}
