//! Model FLOPs of a training step, for throughput figures (MFU) that compare implementations by
//! the work the model needs, not by what an implementation happens to compute.
//!
//! Conventions: a matmul of `[m, k] × [k, n]` is `2·m·n·k`; attention counts `QKᵀ` and `PV`
//! over the keys each query may see (causal and within its sample for the LLM, all valid patches
//! for the vision tower); element-wise ops, norms and softmax are not counted. Backward is twice
//! the forward for a part whose weights train (input and weight gradients), once the forward for
//! a frozen part the gradient must cross (input gradients only; LoRA adapters add their own),
//! and nothing for a frozen part nothing below trains. Attention backward is twice its forward
//! wherever a gradient crosses it. Gradient-checkpointing recomputation is not counted (it is
//! overhead, not model work).

use crate::config::ModelConfig;
use crate::linear::LoraConfig;
use crate::model::Batch;
use crate::params::Trainable;

/// FLOPs of one forward + backward pass over a batch, by part.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct StepFlops {
    pub vision: f64,
    pub resampler: f64,
    pub llm: f64,
}

impl StepFlops {
    pub fn total(&self) -> f64 {
        self.vision + self.resampler + self.llm
    }
}

/// Forward FLOPs split into weight matmuls and attention.
#[derive(Default, Clone, Copy)]
struct Fwd {
    linear: f64,
    attn: f64,
}

impl Fwd {
    /// Forward + backward: `trains` = weights get gradients; `passes` = a gradient must cross.
    fn with_backward(self, trains: bool, passes: bool) -> f64 {
        let lin = if trains {
            3.0
        } else if passes {
            2.0
        } else {
            1.0
        };
        let attn = if trains || passes { 3.0 } else { 1.0 };
        self.linear * lin + self.attn * attn
    }
}

/// FLOPs of one training step on `batch` with the given trainable parts and LoRA settings
/// (LoRA adapters are counted on the modules `lora.target` matches among the LLM's q/k/v/o).
pub fn step_flops(
    cfg: &ModelConfig,
    batch: &Batch,
    trains: &Trainable,
    lora: Option<&LoraConfig>,
) -> StepFlops {
    let v = &cfg.vision;
    let r = &cfg.resampler;
    let l = &cfg.llm;
    let c = v.hidden_size as f64;
    let iv = v.intermediate_size as f64;
    let p = v.patch_size as f64;

    // Vision tower: every image slice on its own patches (padding is implementation overhead).
    let mut vis = Fwd::default();
    let mut res = Fwd::default();
    let d = r.embed_dim as f64;
    let q = r.query_num as f64;
    for im in &batch.images {
        let n = im.len() as f64;
        vis.linear += 2.0 * n * 3.0 * p * p * c;
        vis.linear += v.num_layers as f64 * 2.0 * n * (4.0 * c * c + 2.0 * c * iv);
        vis.attn += v.num_layers as f64 * 4.0 * n * n * c;
        // Resampler: kv_proj, k/v in-proj on the patches; q in-proj, out_proj, proj on queries.
        res.linear += 2.0 * n * r.kv_dim as f64 * d + 2.0 * 2.0 * n * d * d;
        res.linear += 2.0 * q * d * d * 3.0;
        res.attn += 4.0 * q * n * d;
    }

    // LLM.
    let h = l.hidden_size as f64;
    let dh = l.head_dim() as f64;
    let (nh, nkv) = (l.num_heads as f64, l.num_kv_heads as f64);
    let per_token = 2.0
        * l.num_layers as f64
        * (h * nh * dh + 2.0 * h * nkv * dh + nh * dh * h + 3.0 * h * l.intermediate_size as f64);
    let tokens: usize = batch.segments.iter().flatten().sum();
    let pairs: f64 = batch
        .segments
        .iter()
        .flatten()
        .map(|&s| s as f64 * (s as f64 + 1.0) / 2.0)
        .sum();
    let supervised = batch.supervised() as f64;
    let llm = Fwd {
        linear: per_token * tokens as f64 + 2.0 * supervised * h * l.vocab_size as f64,
        attn: l.num_layers as f64 * 4.0 * nh * dh * pairs,
    };
    // LoRA adapters: A (r × in) and B (out × r) on each matched projection, always trained.
    let lora_fwd = lora.map_or(0.0, |lc| {
        let re = regex::Regex::new(&format!("^(?:{})$", lc.target)).ok();
        let rr = lc.r as f64;
        let mut per_layer = 0.0;
        for (name, i, o) in [
            ("q_proj", h, nh * dh),
            ("k_proj", h, nkv * dh),
            ("v_proj", h, nkv * dh),
            ("o_proj", nh * dh, h),
        ] {
            let full = format!("llm.model.layers.0.self_attn.{name}");
            if re.as_ref().is_some_and(|re| re.is_match(&full)) {
                per_layer += 2.0 * rr * (i + o);
            }
        }
        per_layer * l.num_layers as f64 * tokens as f64
    });

    // A gradient crosses a part when something trains below it (the image features feed the
    // LLM; the vision tower feeds the resampler).
    let vision_trains = trains.vision;
    let resampler_trains = trains.resampler;
    let below_llm = vision_trains || resampler_trains || trains.embeddings;
    let llm_trains = trains.llm;
    let llm_passes = below_llm || lora.is_some();
    StepFlops {
        vision: vis.with_backward(vision_trains, false),
        resampler: res.with_backward(resampler_trains, vision_trains),
        llm: llm.with_backward(llm_trains, llm_passes) + 3.0 * lora_fwd,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::ImageInput;

    fn tiny() -> ModelConfig {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../examples/models/minicpm-v-2_6-tiny");
        ModelConfig::from_dir(&dir).unwrap()
    }

    /// Hand count for one 2x3-patch image and a single 10-token sample.
    #[test]
    fn counts_match_a_hand_computation() {
        let cfg = tiny();
        let q = cfg.resampler.query_num;
        let t = 10 + q;
        let img = ImageInput::from_hwc_u8(&vec![0u8; 28 * 42 * 3], 28, 42, 14).unwrap();
        let mut labels = vec![-100i64; t];
        labels[t - 2] = 5;
        labels[t - 3] = 7;
        let batch = Batch {
            input_ids: vec![vec![1; t]],
            position_ids: vec![(0..t as u32).collect()],
            labels: vec![labels],
            segments: vec![vec![t]],
            images: vec![img],
            bounds: vec![(0, 2, 2 + q)],
            image_groups: vec![0],
        };
        let f = step_flops(&cfg, &batch, &Trainable::ALL, None);
        let (v, r, l) = (&cfg.vision, &cfg.resampler, &cfg.llm);
        let (c, iv, n) = (v.hidden_size as f64, v.intermediate_size as f64, 6.0);
        let vis_fwd = 2.0 * n * 3.0 * 196.0 * c
            + v.num_layers as f64 * (2.0 * n * (4.0 * c * c + 2.0 * c * iv) + 4.0 * n * n * c);
        assert_eq!(f.vision, 3.0 * vis_fwd);
        let (d, qn) = (r.embed_dim as f64, q as f64);
        let res_fwd =
            2.0 * n * r.kv_dim as f64 * d + 4.0 * n * d * d + 6.0 * qn * d * d + 4.0 * qn * n * d;
        assert_eq!(f.resampler, 3.0 * res_fwd);
        let (h, i, nl) = (
            l.hidden_size as f64,
            l.intermediate_size as f64,
            l.num_layers as f64,
        );
        let (nh, nkv, dh) = (
            l.num_heads as f64,
            l.num_kv_heads as f64,
            l.head_dim() as f64,
        );
        let tt = t as f64;
        let llm_fwd = 2.0 * tt * nl * (2.0 * h * nh * dh + 2.0 * h * nkv * dh + 3.0 * h * i)
            + 2.0 * 2.0 * h * l.vocab_size as f64
            + nl * 4.0 * nh * dh * tt * (tt + 1.0) / 2.0;
        assert!((f.llm - 3.0 * llm_fwd).abs() <= 1e-9 * f.llm);
        // LoRA on a frozen LLM: input gradients only, plus the adapters.
        let frozen = Trainable {
            llm: false,
            embeddings: false,
            ..Trainable::ALL
        };
        let lc = LoraConfig {
            r: 8,
            ..Default::default()
        };
        let g = step_flops(&cfg, &batch, &frozen, Some(&lc));
        let attn = nl * 4.0 * nh * dh * tt * (tt + 1.0) / 2.0;
        let linear = llm_fwd - attn;
        // The default target adapts q, k and v: A (r × in) and B (out × r) on each.
        let lora = 2.0 * 8.0 * ((h + nh * dh) + 2.0 * (h + nkv * dh)) * nl * tt;
        let want = 2.0 * linear + 3.0 * attn + 3.0 * lora;
        assert!((g.llm - want).abs() <= 1e-9 * want, "{} vs {want}", g.llm);
        // Nothing trains below the LLM and no adapters: the LLM runs forward only.
        let none = step_flops(&cfg, &batch, &Trainable::NONE, None);
        assert!((none.llm - llm_fwd).abs() <= 1e-9 * llm_fwd);
        assert_eq!(none.vision, vis_fwd);
    }
}
