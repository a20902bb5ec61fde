//! Text generation: a prompt (with its images) is run once to fill a key/value cache, then one
//! new token per step attends to that cache. Greedy by default; temperature + nucleus (top-p)
//! sampling from a seeded generator on request.

use candle_core::{DType, Tensor};

use crate::error::{ModelError, Result};
use crate::linear::{Mode, Rng};
use crate::llm::{KvCache, Llm, LlmAux};
use crate::model::{Batch, MiniCpmV};

/// How the next token is picked.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    /// 0 = greedy (argmax, ties to the lowest id, as `torch.argmax`).
    pub temperature: f64,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`.
    pub top_p: f64,
    /// Seed of the sampling generator (unused when greedy).
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// A stop token was produced (it is the last generated id).
    StopToken,
    /// `max_new_tokens` were produced.
    Length,
    /// The callback asked to stop.
    Interrupted,
}

/// Generated ids (stop token included when there was one) and why it ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generated {
    pub ids: Vec<u32>,
    pub stop: StopReason,
}

impl MiniCpmV {
    fn eval_mode(&self) -> Mode<'_> {
        Mode {
            train: false,
            rng: self.dropout_cell(),
        }
    }

    /// Runs `x` `[1, t, H]` (embeddings of positions `start..start + t`) through the LLM with
    /// the cache; returns the f32 logits `[V]` of the last position.
    fn step(&self, x: Tensor, start: u32, cache: &mut KvCache) -> Result<Tensor> {
        let t = x.dim(1)?;
        let positions: Vec<u32> = (start..start + t as u32).collect();
        let aux = LlmAux::rotary(self.llm().config(), &positions, x.dtype(), x.device())?;
        // One mask for every layer of the step (none for a single token).
        let mask = Llm::cached_mask(start as usize, t, x.dtype(), x.device())?;
        let mode = self.eval_mode();
        let mut x = x;
        for i in 0..self.llm().num_layers() {
            x = self
                .llm()
                .layer_cached(i, &x, &aux.cos, &aux.sin, mask.as_ref(), cache, &mode)?;
        }
        let last = x.narrow(1, t - 1, 1)?;
        let h = self.llm().final_norm(&last)?;
        Ok(self
            .llm()
            .logits(&h, &mode)?
            .to_dtype(DType::F32)?
            .flatten_all()?)
    }

    /// Logits after the prompt `batch` (one row, images and placeholder bounds as for
    /// training), filling `cache`.
    pub fn prefill(&self, batch: &Batch, cache: &mut KvCache) -> Result<Tensor> {
        if batch.input_ids.len() != 1 {
            return Err(ModelError::Batch(format!(
                "generation takes one prompt, got {} rows",
                batch.input_ids.len()
            )));
        }
        if !cache.is_empty() {
            return Err(ModelError::Batch("prefill needs an empty cache".into()));
        }
        let x = self.input_embeddings(batch, false)?;
        self.step(x, 0, cache)
    }

    /// Logits after one more token at the next position of `cache`.
    pub fn decode(&self, token: u32, cache: &mut KvCache) -> Result<Tensor> {
        let ids = Tensor::from_vec(vec![token], (1, 1), self.params().device())?;
        let x = self.llm().embed(&ids)?;
        let start = cache.len() as u32;
        self.step(x, start, cache)
    }

    /// Generates up to `max_new_tokens` after the prompt `batch`, stopping after any id of
    /// `stop`. `on_token` sees each new id as it is produced (for streaming) and may return
    /// `false` to stop.
    pub fn generate(
        &self,
        batch: &Batch,
        max_new_tokens: usize,
        stop: &[u32],
        sampling: &Sampling,
        mut on_token: impl FnMut(u32) -> bool,
    ) -> Result<Generated> {
        let mut cache = KvCache::default();
        let mut rng = Rng(sampling.seed);
        let mut ids = Vec::new();
        if max_new_tokens == 0 {
            return Ok(Generated {
                ids,
                stop: StopReason::Length,
            });
        }
        let mut logits = self.prefill(batch, &mut cache)?;
        loop {
            let next = pick(&logits, sampling, &mut rng)?;
            ids.push(next);
            if !on_token(next) {
                return Ok(Generated {
                    ids,
                    stop: StopReason::Interrupted,
                });
            }
            if stop.contains(&next) {
                return Ok(Generated {
                    ids,
                    stop: StopReason::StopToken,
                });
            }
            if ids.len() >= max_new_tokens {
                return Ok(Generated {
                    ids,
                    stop: StopReason::Length,
                });
            }
            logits = self.decode(next, &mut cache)?;
        }
    }
}

/// The next token from f32 logits `[V]`.
pub fn pick(logits: &Tensor, sampling: &Sampling, rng: &mut Rng) -> Result<u32> {
    let v: Vec<f32> = logits.to_vec1()?;
    if v.is_empty() {
        return Err(ModelError::Batch("empty logits".into()));
    }
    if sampling.temperature <= 0.0 {
        return Ok(argmax(&v));
    }
    // Probabilities of logits / temperature (f64), most likely first.
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(usize, f64)> = v
        .iter()
        .enumerate()
        .map(|(i, &l)| (i, ((l as f64 - max) / sampling.temperature).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= total);
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut kept = 0;
    let mut mass = 0.0;
    for p in &probs {
        kept += 1;
        mass += p.1;
        if mass >= sampling.top_p {
            break;
        }
    }
    let mut u = rng.uniform() * mass;
    for p in &probs[..kept] {
        if u < p.1 {
            return Ok(p.0 as u32);
        }
        u -= p.1;
    }
    Ok(probs[kept - 1].0 as u32)
}

/// Index of the largest value, the first one on ties (NaN never wins).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] || v[best].is_nan() && !x.is_nan() {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_of_ties_and_skips_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5, 0.1]), 1);
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        let logits = Tensor::new(&[10.0f32, 9.9, -5.0, -6.0], &candle_core::Device::Cpu).unwrap();
        let s = Sampling {
            temperature: 1.0,
            top_p: 0.9,
            seed: 3,
        };
        let mut rng = Rng(s.seed);
        for _ in 0..200 {
            let t = pick(&logits, &s, &mut rng).unwrap();
            assert!(t < 2, "{t}");
        }
    }
}
