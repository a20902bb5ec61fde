//! The memory a rank of a run holds, by kind, as printed at the start of `train`: what
//! `--zero` and `--offload-optimizer` buy before a run is started on real hardware.

use std::fmt;

use candle_core::{DType, Var};
use cpmv_model::MiniCpmV;
use cpmv_optim::FlatLayout;

use crate::config::TrainConfig;

/// Bytes one rank holds, by kind (the rank with the largest shard).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryPlan {
    pub world: usize,
    pub zero: u8,
    pub offload: bool,
    /// Every weight of the model, LoRA adapters included, on the training device.
    pub parameters: u64,
    /// Gradients held across a step: all of them (`--zero 0|1`) or the rank's f32 shard
    /// (`--zero 2`).
    pub gradients: u64,
    /// fp32 masters (of non-f32 weights) and both AdamW moments on the training device.
    pub optimizer_device: u64,
    /// The same in host memory (`--offload-optimizer`).
    pub optimizer_host: u64,
    /// Host buffers the gradients and weights are exchanged through (the flat space in f32).
    pub exchange_host: u64,
}

/// Optimizer bytes per value (see [`cpmv_optim::adamw::state_bytes_per_value`]).
fn optimizer_bytes(dtype: DType) -> u64 {
    cpmv_optim::adamw::state_bytes_per_value(dtype) as u64
}

impl MemoryPlan {
    /// The plan for a model of `parameters` bytes whose trainable tensors have the given
    /// element counts and dtypes, on `world` ranks.
    pub fn new(
        parameters: u64,
        trainable: &[(usize, DType)],
        world: usize,
        zero: u8,
        offload: bool,
    ) -> Self {
        let sizes: Vec<usize> = trainable.iter().map(|&(n, _)| n).collect();
        let layout = FlatLayout::new(&sizes, if zero > 0 { world } else { 1 });
        // The sharded optimizer (any ZeRO stage, or offloading) updates its own copy of the
        // shard's weights in their dtype beside the f32 state (`ShardedAdamW`'s shadows).
        let sharded = zero > 0 || offload;
        let per_value =
            |t: DType| optimizer_bytes(t) + if sharded { t.size_in_bytes() as u64 } else { 0 };
        // Shard 0 is never smaller than another.
        let optimizer: u64 = if zero > 0 {
            layout
                .segments(0)
                .iter()
                .map(|s| s.len as u64 * per_value(trainable[s.var].1))
                .sum()
        } else {
            trainable
                .iter()
                .map(|&(n, t)| n as u64 * per_value(t))
                .sum()
        };
        let gradients = if zero == 2 && world > 1 {
            layout.shard_len() as u64 * 4
        } else {
            trainable
                .iter()
                .map(|&(n, t)| (n * t.size_in_bytes()) as u64)
                .sum()
        };
        // One rank streams gradients parameter by parameter; several exchange the flat space
        // through host buffers (all-reduced; or reduce-scattered and all-gathered).
        let exchange_host = if world == 1 {
            0
        } else if zero > 0 {
            2 * layout.padded_len() as u64 * 4
        } else {
            layout.total() as u64 * 4
        };
        MemoryPlan {
            world,
            zero,
            offload,
            parameters,
            gradients,
            optimizer_device: if offload { 0 } else { optimizer },
            optimizer_host: if offload { optimizer } else { 0 },
            exchange_host,
        }
    }

    /// The plan of `model` training `vars` with `cfg` on `world` ranks.
    pub fn of(model: &MiniCpmV, vars: &[(String, Var)], cfg: &TrainConfig, world: usize) -> Self {
        let p = model.params();
        let weights: u64 = p
            .tensors()
            .values()
            .map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
            .sum::<u64>()
            + p.lora()
                .values()
                .flat_map(|a| [&a.a, &a.b])
                .map(|v| (v.elem_count() * v.dtype().size_in_bytes()) as u64)
                .sum::<u64>();
        let trainable: Vec<(usize, DType)> = vars
            .iter()
            .map(|(_, v)| (v.elem_count(), v.dtype()))
            .collect();
        Self::new(weights, &trainable, world, cfg.zero, cfg.offload_optimizer)
    }
}

/// Bytes in binary units, one decimal.
fn human(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

impl fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "memory plan per rank (zero {}, {} rank{}{}): parameters {}, gradients {}, optimizer \
             state {} on the device + {} in host memory, exchange buffers {} in host memory",
            self.zero,
            self.world,
            if self.world == 1 { "" } else { "s" },
            if self.offload {
                ", optimizer offloaded"
            } else {
                ""
            },
            human(self.parameters),
            human(self.gradients),
            human(self.optimizer_device),
            human(self.optimizer_host),
            human(self.exchange_host)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cpmv_model::init::{derive_config, Size};
    use cpmv_model::weights::param_specs;

    /// Every tensor of the released MiniCPM-Llama3-V 2.5, bf16, all trainable (the official
    /// full fine-tune with --tune_llm true).
    fn llama3_v25_full() -> Vec<(usize, DType)> {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../examples/models/minicpm-llama3-v-2_5-tiny/config.json"
        );
        let template: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir).unwrap()).unwrap();
        let cfg = derive_config(&template, Size::Full, DType::BF16).unwrap();
        param_specs(&cfg)
            .iter()
            .map(|s| (s.shape.iter().product(), DType::BF16))
            .collect()
    }

    #[test]
    fn zero_2_on_8_ranks_holds_an_eighth_of_the_sharded_optimizer_state() {
        let t = llama3_v25_full();
        let n: usize = t.iter().map(|&(n, _)| n).sum();
        assert!((8.0e9..9.0e9).contains(&(n as f64)), "{n} parameters");
        let weights = n as u64 * 2;
        let today = MemoryPlan::new(weights, &t, 1, 0, false);
        assert_eq!(today.optimizer_device, n as u64 * 12);
        let z2 = MemoryPlan::new(weights, &t, 8, 2, false);
        // The sharded optimizer also keeps a bf16 copy of its shard (2 bytes per value beside
        // 12 of f32 state): 1/8 of that, up to the one value a shard rounds up — 14/96 of
        // today's replicated state, not 1/8 of it.
        assert!(
            z2.optimizer_device <= (today.optimizer_device + weights) / 8 + 14,
            "{z2}"
        );
        assert!(z2.optimizer_device > today.optimizer_device / 8, "{z2}");
        assert!(z2.gradients <= (n as u64).div_ceil(8) * 4, "{z2}");
        assert_eq!(z2.optimizer_host, 0);
        let z1 = MemoryPlan::new(weights, &t, 8, 1, false);
        assert_eq!(z1.optimizer_device, z2.optimizer_device);
        assert_eq!(z1.gradients, today.gradients);
        // Offloaded on one GPU: the device keeps weights and gradients only (2 × 16 GiB for
        // 8.5 B bf16 values), well inside 80 GB.
        let off = MemoryPlan::new(weights, &t, 1, 0, true);
        assert_eq!(off.optimizer_device, 0);
        assert_eq!(off.optimizer_host, today.optimizer_device + weights);
        assert!(off.parameters + off.gradients < 40 << 30, "{off}");
        assert_eq!(off.exchange_host, 0);
        let line = z2.to_string();
        assert!(line.contains("zero 2, 8 ranks"), "{line}");
    }
}
