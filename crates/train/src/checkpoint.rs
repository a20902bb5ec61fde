//! What a run writes: full checkpoints in the original layout, LoRA adapters in PEFT's
//! layout, training state for exact resumption, and `merge-lora`.

use candle_core::{DType, Device, Tensor};
use cpmv_model::weights::{save_tensors, Checkpoint};
use cpmv_model::{MiniCpmV, Version};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::config::{TrainConfig, TrainMode};
use crate::data::Cursor;
use crate::error::{io, TrainError};

/// Files of a checkpoint directory besides the weights.
pub const STATE_FILE: &str = "trainer_state.json";
pub const TRAINABLE_FILE: &str = "trainable.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// PEFT's prefix of adapter keys.
pub const PEFT_PREFIX: &str = "base_model.model.";
/// The official recipe's reload file: the modules trained whole, keyed as in the PEFT-wrapped
/// model's state dict, for `model.load_state_dict(torch.load(...), strict=False)`.
pub const RELOAD_FILE: &str = "vpm_resampler_embedtokens.pt";

/// The scalar state of a run (beside optimiser moments and trainable values).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    /// Optimiser steps applied.
    pub step: u64,
    /// Steps skipped for non-finite values.
    pub skipped: u64,
    pub cursor: Cursor,
    /// LoRA dropout generator.
    pub dropout_rng: u64,
    pub tokens_seen: u64,
    pub samples_seen: u64,
    pub config: TrainConfig,
    pub model_dir: String,
    pub shards_dir: String,
    /// Packs of the shards (resuming on other shards is refused).
    #[serde(default)]
    pub packs: usize,
    /// sha256 of the shards' manifest.json (resuming on other data is refused).
    #[serde(default)]
    pub data_digest: String,
    /// Math-changing settings accepted with `--resume-override`, oldest first.
    #[serde(default)]
    pub overrides: Vec<ResumeOverride>,
}

/// Settings changed by a `--resume-override` at a step.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ResumeOverride {
    /// The checkpoint step the run continued from.
    pub step: u64,
    pub changes: Vec<crate::config::SettingChange>,
}

/// What the writers need to know about the run.
pub struct SaveContext<'a> {
    pub base_dir: &'a Path,
    pub base: &'a Checkpoint,
    pub config: &'a TrainConfig,
    /// `max_slice_nums` the shards were made with, written into config.json.
    pub max_slice_nums: Option<u64>,
}

fn copy_side_files(from: &Path, to: &Path) -> Result<(), TrainError> {
    Ok(cpmv_model::weights::copy_side_files(from, to)?)
}

/// Reads a safetensors file into CPU tensors, naming the file on error.
fn load_file(path: &Path) -> Result<HashMap<String, Tensor>, TrainError> {
    candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Sets a variable from a stored tensor of the same shape (converted to its dtype/device).
fn set_var(var: &candle_core::Var, t: &Tensor, key: &str, path: &Path) -> Result<(), TrainError> {
    if t.dims() != var.as_tensor().dims() {
        return Err(TrainError::Checkpoint {
            path: path.to_path_buf(),
            reason: format!(
                "`{key}` is {:?}, the model has {:?}",
                t.dims(),
                var.as_tensor().dims()
            ),
        });
    }
    var.set(
        &t.to_dtype(var.as_tensor().dtype())?
            .to_device(var.as_tensor().device())?,
    )?;
    Ok(())
}

/// config.json of the base with `max_slice_nums` updated as the reference saves it
/// (top level for V2.0, `slice_config` for 2.5/2.6).
pub fn updated_config(model: &MiniCpmV, max_slice_nums: Option<u64>) -> Value {
    let mut raw = model.config().raw.clone();
    if let (Some(n), Some(obj)) = (max_slice_nums, raw.as_object_mut()) {
        if model.config().version == Version::V2_0 || !obj.contains_key("slice_config") {
            obj.insert("max_slice_nums".into(), json!(n));
        }
        if let Some(sc) = obj.get_mut("slice_config").and_then(Value::as_object_mut) {
            sc.insert("max_slice_nums".into(), json!(n));
        }
    }
    raw
}

fn write_json(path: &Path, v: &Value) -> Result<(), TrainError> {
    let text = serde_json::to_string_pretty(v).map_err(|e| TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    std::fs::write(path, text + "\n").map_err(io(path))
}

/// Full mode: every tensor under its original name and dtype, config, tokenizer and processor
/// files — a directory that loads wherever the original checkpoint loads.
pub fn save_full(model: &MiniCpmV, ctx: &SaveContext, out: &Path) -> Result<(), TrainError> {
    std::fs::create_dir_all(out).map_err(io(out))?;
    copy_side_files(ctx.base_dir, out)?;
    write_json(
        &out.join("config.json"),
        &updated_config(model, ctx.max_slice_nums),
    )?;
    let mut tensors = Vec::new();
    for (name, t) in model.params().tensors() {
        let dt = ctx.base.dtype(name).unwrap_or(DType::F32);
        tensors.push((name.clone(), t.to_dtype(dt)?.to_device(&Device::Cpu)?));
    }
    save_tensors(out, &tensors, Some(cpmv_model::init::SHARD_BYTES)).map_err(TrainError::from)?;
    Ok(())
}

/// The modules PEFT saves whole (`modules_to_save`), as the reference configures them.
pub fn modules_to_save(cfg: &TrainConfig) -> Vec<String> {
    let mut m = Vec::new();
    if cfg.lora_embeddings {
        m.push("embed_tokens".to_string());
    }
    m.push("resampler".to_string());
    if cfg.tune_vision {
        m.push("vpm".into());
    }
    m
}

/// The module of `modules` (PEFT `modules_to_save` names) that holds parameter `name`, as its
/// full module path (`embed_tokens` is `llm.model.embed_tokens`).
fn saved_whole_module(name: &str, modules: &[String]) -> Option<String> {
    modules.iter().find_map(|m| {
        let path = match m.as_str() {
            "embed_tokens" => "llm.model.embed_tokens",
            other => other,
        };
        name.starts_with(&format!("{path}."))
            .then(|| path.to_string())
    })
}

/// The key of a modules_to_save parameter in the PEFT-wrapped model's state dict: PEFT keeps
/// the trained copy of module `m` at `m.modules_to_save.default`.
pub fn wrapped_key(name: &str, module: &str) -> String {
    let rest = &name[module.len() + 1..];
    format!("{PEFT_PREFIX}{module}.modules_to_save.default.{rest}")
}

/// A tensor as torch.save stores it (its own dtype; other dtypes as f32): contiguous
/// little-endian bytes, copied to the host once.
fn torch_tensor(name: String, t: &Tensor) -> Result<crate::torch_save::TorchTensor, TrainError> {
    use crate::torch_save::{StorageType, TorchTensor};
    let flat = t.flatten_all()?;
    let (dtype, bytes): (StorageType, Vec<u8>) = match t.dtype() {
        DType::BF16 => (
            StorageType::Bf16,
            flat.to_vec1::<half::bf16>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        DType::F16 => (
            StorageType::F16,
            flat.to_vec1::<half::f16>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        _ => (
            StorageType::F32,
            flat.to_dtype(DType::F32)?
                .to_vec1::<f32>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
    };
    Ok(TorchTensor {
        name,
        dtype,
        shape: t.dims().to_vec(),
        bytes,
    })
}

/// LoRA mode: `adapter_config.json` + `adapter_model.safetensors` with PEFT's key names
/// (spec §8.3): `base_model.model.<module>.lora_A.weight`/`lora_B.weight`, and the
/// modules_to_save parameters under `base_model.model.<name>`.
pub fn save_lora(model: &MiniCpmV, ctx: &SaveContext, out: &Path) -> Result<(), TrainError> {
    std::fs::create_dir_all(out).map_err(io(out))?;
    let lora = model
        .params()
        .lora_config()
        .ok_or_else(|| TrainError::Config("save_lora on a model without LoRA".into()))?;
    let modules = modules_to_save(ctx.config);
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (m, ad) in model.params().lora() {
        tensors.push((
            format!("{PEFT_PREFIX}{m}.lora_A.weight"),
            ad.a.as_tensor().to_dtype(DType::F32)?,
        ));
        tensors.push((
            format!("{PEFT_PREFIX}{m}.lora_B.weight"),
            ad.b.as_tensor().to_dtype(DType::F32)?,
        ));
    }
    let mut reload = Vec::new();
    for (name, t) in model.params().tensors() {
        if let Some(module) = saved_whole_module(name, &modules) {
            let dt = ctx.base.dtype(name).unwrap_or(DType::F32);
            let t = t.to_dtype(dt)?;
            reload.push(torch_tensor(wrapped_key(name, &module), &t)?);
            tensors.push((format!("{PEFT_PREFIX}{name}"), t));
        }
    }
    cpmv_model::weights::write_safetensors(&out.join(ADAPTER_WEIGHTS), &tensors)?;
    let reload_path = out.join(RELOAD_FILE);
    crate::torch_save::write(&reload_path, "vpm_resampler_embedtokens", &reload)
        .map_err(io(&reload_path))?;
    let base = std::fs::canonicalize(ctx.base_dir).unwrap_or_else(|_| ctx.base_dir.to_path_buf());
    let cfg = json!({
        "peft_type": "LORA",
        // CAUSAL_LM, not PEFT's own `null` + `auto_mapping`: with the latter,
        // `AutoPeftModelForCausalLM.from_pretrained(adapter_dir, trust_remote_code=True)` (the
        // official reload snippet) fails on PEFT's import allowlist and on a fresh modules
        // cache; with CAUSAL_LM it resolves the base through config.json's `auto_map`
        // (AutoModelForCausalLM). Key names and PeftModel.from_pretrained are unaffected.
        "task_type": "CAUSAL_LM",
        "auto_mapping": null,
        "base_model_name_or_path": base.to_string_lossy(),
        "revision": null,
        "inference_mode": true,
        "r": lora.r,
        // An integer when it is one, as PEFT writes it.
        "lora_alpha": if lora.alpha.fract() == 0.0 && lora.alpha.abs() < 1e15 {
            json!(lora.alpha as i64)
        } else {
            json!(lora.alpha)
        },
        "lora_dropout": lora.dropout,
        "bias": "none",
        "target_modules": lora.target,
        "modules_to_save": modules,
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": false,
        "use_dora": false,
    });
    write_json(&out.join(ADAPTER_CONFIG), &cfg)?;
    // The processor/tokenizer files travel with the adapter so it is self-describing; the
    // model config with the training max_slice_nums as well.
    copy_side_files(ctx.base_dir, out)?;
    write_json(
        &out.join("config.json"),
        &updated_config(model, ctx.max_slice_nums),
    )?;
    Ok(())
}

/// Writes the model files of the run's mode.
pub fn save_model(model: &MiniCpmV, ctx: &SaveContext, out: &Path) -> Result<(), TrainError> {
    match ctx.config.mode {
        TrainMode::Full => save_full(model, ctx, out),
        TrainMode::Lora => save_lora(model, ctx, out),
    }
}

/// Trainable values in f32 (exact resume even when the model files are bf16).
pub fn save_trainable(model: &MiniCpmV, path: &Path) -> Result<(), TrainError> {
    let map: HashMap<String, Tensor> = model
        .params()
        .trainable_vars()
        .into_iter()
        .map(|(n, v)| Ok((n, v.as_tensor().to_dtype(DType::F32)?)))
        .collect::<Result<_, TrainError>>()?;
    candle_core::safetensors::save(&map, path).map_err(|e| TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason: format!("cannot write: {e}"),
    })
}

/// Restores trainable values saved by [`save_trainable`]; every variable must be present. The
/// file is memory-mapped and read one tensor at a time, so restoring never holds a second copy
/// of all trainable values in memory.
pub fn load_trainable(model: &MiniCpmV, path: &Path) -> Result<(), TrainError> {
    let failed = |reason: String| TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason,
    };
    // SAFETY: checkpoint files are written once under a `.partial` name and published by
    // rename; nothing writes them in place while a run reads them.
    let file = unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }
        .map_err(|e| failed(e.to_string()))?;
    for (name, var) in model.params().trainable_vars() {
        let t = file.load(&name, &Device::Cpu).map_err(|_| {
            failed(format!(
                "no value for trainable `{name}` (was the run started with other settings?)"
            ))
        })?;
        set_var(&var, &t, &name, path)?;
    }
    Ok(())
}

/// `checkpoint-N` directories of a run, ascending.
pub fn checkpoints(run: &Path) -> Vec<(u64, PathBuf)> {
    let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(run)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let n = name.strip_prefix("checkpoint-")?.parse::<u64>().ok()?;
            e.path().join(STATE_FILE).exists().then(|| (n, e.path()))
        })
        .collect();
    v.sort();
    v
}

/// Deletes all but the newest `keep` checkpoints. Each is first renamed to
/// `checkpoint-N.partial`, so a kill half-way through the deletion leaves a directory the next
/// run recognises as stale and removes, never one that looks like a checkpoint.
pub fn prune(run: &Path, keep: usize) -> Result<(), TrainError> {
    let all = checkpoints(run);
    if all.len() > keep {
        for (n, p) in &all[..all.len() - keep] {
            let doomed = run.join(format!("checkpoint-{n}.partial"));
            std::fs::rename(p, &doomed).map_err(io(p))?;
            std::fs::remove_dir_all(&doomed).map_err(io(&doomed))?;
        }
    }
    Ok(())
}

/// Reads a checkpoint's scalar state.
pub fn read_state(dir: &Path) -> Result<TrainState, TrainError> {
    let p = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&p).map_err(io(&p))?;
    serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint {
        path: p,
        reason: e.to_string(),
    })
}

/// Writes `state` as JSON.
pub fn write_state(dir: &Path, state: &TrainState) -> Result<(), TrainError> {
    let v = serde_json::to_value(state).map_err(|e| TrainError::Checkpoint {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    })?;
    write_json(&dir.join(STATE_FILE), &v)
}

/// An output directory that exists and holds anything: the writers would overwrite it.
fn refuse_non_empty(out: &Path) -> Result<(), TrainError> {
    let non_empty = std::fs::read_dir(out).is_ok_and(|mut d| d.next().is_some());
    if non_empty {
        return Err(TrainError::Config(format!(
            "--out {} exists and is not empty; choose a new or empty directory",
            out.display()
        )));
    }
    Ok(())
}

/// `train merge-lora`: base checkpoint + PEFT adapter → a full checkpoint where every adapted
/// weight is `W + (α/r)·B·A` and modules_to_save tensors replace the base ones.
pub fn merge_lora(base_dir: &Path, adapter_dir: &Path, out: &Path) -> Result<usize, TrainError> {
    // The merged files would overwrite the mapped base weights or the adapter being read.
    cpmv_fsio::refuse_overlap(
        "--out",
        out,
        &[
            cpmv_fsio::Input {
                flag: "--model",
                path: base_dir,
            },
            cpmv_fsio::Input {
                flag: "--adapter",
                path: adapter_dir,
            },
        ],
    )?;
    refuse_non_empty(out)?;
    let cfg_path = adapter_dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&cfg_path).map_err(io(&cfg_path))?;
    let cfg: Value = serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint {
        path: cfg_path.clone(),
        reason: e.to_string(),
    })?;
    refuse_unsupported(&cfg, &cfg_path)?;
    let num = |k: &str| cfg.get(k).and_then(Value::as_f64);
    let (r, alpha) = match (num("r"), num("lora_alpha")) {
        (Some(r), Some(a)) if r > 0.0 => (r, a),
        _ => {
            return Err(TrainError::Checkpoint {
                path: cfg_path,
                reason: "needs numeric `r` > 0 and `lora_alpha`".into(),
            })
        }
    };
    let scale = alpha / r;
    let wpath = adapter_dir.join(ADAPTER_WEIGHTS);
    let adapter = load_file(&wpath)?;
    let base = Checkpoint::open(base_dir)?;
    let mut lora: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
    let mut whole: BTreeMap<String, Tensor> = BTreeMap::new();
    for (k, t) in &adapter {
        let Some(rest) = k.strip_prefix(PEFT_PREFIX) else {
            return Err(TrainError::Checkpoint {
                path: wpath.clone(),
                reason: format!("key `{k}` lacks the `{PEFT_PREFIX}` prefix"),
            });
        };
        if let Some(m) = rest.strip_suffix(".lora_A.weight") {
            lora.entry(m.to_string()).or_default().0 = Some(t.clone());
        } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
            lora.entry(m.to_string()).or_default().1 = Some(t.clone());
        } else if base.shape(rest) == Some(t.dims()) {
            whole.insert(rest.to_string(), t.clone());
        } else {
            return Err(TrainError::Checkpoint {
                path: wpath.clone(),
                reason: format!("`{k}` matches no tensor of that shape in the base checkpoint"),
            });
        }
    }
    let mut merged = 0;
    let mut tensors = Vec::new();
    let names: Vec<String> = base.names().map(str::to_string).collect();
    for name in &names {
        let dt = base.dtype(name).unwrap_or(DType::F32);
        let module = name.strip_suffix(".weight");
        let t = if let Some(t) = whole.get(name) {
            t.to_dtype(dt)?
        } else if let Some((Some(a), Some(b))) = module.and_then(|m| lora.get(m)) {
            merged += 1;
            let w = base.load(name, DType::F32, &Device::Cpu)?;
            let delta = (b.to_dtype(DType::F32)?.matmul(&a.to_dtype(DType::F32)?)? * scale)?;
            (w + delta)?.to_dtype(dt)?
        } else {
            base.load(name, dt, &Device::Cpu)?
        };
        tensors.push((name.clone(), t));
    }
    if merged != lora.len() {
        let missing: Vec<&String> = lora
            .iter()
            .filter(|(m, (a, b))| {
                a.is_none() || b.is_none() || base.shape(&format!("{m}.weight")).is_none()
            })
            .map(|(m, _)| m)
            .collect();
        return Err(TrainError::Checkpoint {
            path: wpath,
            reason: format!("adapters without a matching base weight or missing A/B: {missing:?}"),
        });
    }
    std::fs::create_dir_all(out).map_err(io(out))?;
    // The base's tokenizer, processor and code files (a PEFT adapter directory need not have
    // them); the config from the adapter when it carries one (training max_slice_nums).
    copy_side_files(base_dir, out)?;
    let cfg_src = settings_dir(base_dir, adapter_dir).join("config.json");
    std::fs::copy(&cfg_src, out.join("config.json")).map_err(io(&cfg_src))?;
    save_tensors(out, &tensors, Some(cpmv_model::init::SHARD_BYTES))?;
    Ok(merged)
}

/// Where the settings a LoRA adapter was trained with live: a cpmv run directory carries the
/// base's tokenizer files and its config.json with the training slicing (`max_slice_nums`);
/// any other adapter directory defers to the base. Chat and merge both read it, so a merged
/// model prompts as chatting with the adapter does.
pub fn settings_dir<'a>(base_dir: &'a Path, adapter_dir: &'a Path) -> &'a Path {
    if adapter_dir.join("config.json").is_file()
        && adapter_dir.join("tokenizer_config.json").is_file()
    {
        adapter_dir
    } else {
        base_dir
    }
}

/// Loads a base checkpoint with a PEFT LoRA adapter applied (adapters attached to the
/// modules the adapter's target regex matches, modules_to_save tensors replaced), frozen.
pub fn load_with_adapter(
    base_dir: &Path,
    adapter_dir: &Path,
    fixes: cpmv_model::Fixes,
) -> Result<MiniCpmV, TrainError> {
    load_with_adapter_on(base_dir, adapter_dir, fixes, &Device::Cpu, DType::F32)
}

/// [`load_with_adapter`] with the weights on `device` in `dtype` (LoRA pairs stay f32).
pub fn load_with_adapter_on(
    base_dir: &Path,
    adapter_dir: &Path,
    fixes: cpmv_model::Fixes,
    device: &Device,
    dtype: DType,
) -> Result<MiniCpmV, TrainError> {
    let cfg_path = adapter_dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&cfg_path).map_err(io(&cfg_path))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint {
        path: cfg_path.clone(),
        reason: e.to_string(),
    })?;
    refuse_unsupported(&v, &cfg_path)?;
    let bad = |m: &str| TrainError::Checkpoint {
        path: cfg_path.clone(),
        reason: m.to_string(),
    };
    let target = match v.get("target_modules") {
        Some(Value::String(s)) => s.clone(),
        // PEFT also allows a list of module-name suffixes.
        Some(Value::Array(a)) => {
            let names: Vec<String> = a
                .iter()
                .filter_map(Value::as_str)
                .map(regex_escape)
                .collect();
            format!(r".*\.({})", names.join("|"))
        }
        _ => return Err(bad("no `target_modules`")),
    };
    let lora = cpmv_model::LoraConfig {
        r: v.get("r")
            .and_then(Value::as_u64)
            .ok_or_else(|| bad("no integer `r`"))? as usize,
        alpha: v
            .get("lora_alpha")
            .and_then(Value::as_f64)
            .ok_or_else(|| bad("no `lora_alpha`"))?,
        dropout: v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0),
        target,
    };
    let wpath = adapter_dir.join(ADAPTER_WEIGHTS);
    let adapter = load_file(&wpath)?;
    let cfg = cpmv_model::ModelConfig::from_dir(base_dir)?;
    let base = Checkpoint::open(base_dir)?;
    let specs = cpmv_model::weights::param_specs(&cfg);
    base.check(&specs)?;
    let mut map = BTreeMap::new();
    for s in &specs {
        map.insert(
            s.name.clone(),
            base.load(&s.name, DType::F32, &Device::Cpu)?,
        );
    }
    for (k, t) in &adapter {
        let rest = k.strip_prefix(PEFT_PREFIX).unwrap_or(k);
        if rest.ends_with(".lora_A.weight") || rest.ends_with(".lora_B.weight") {
            continue;
        }
        match map.get(rest) {
            Some(old) if old.dims() == t.dims() => {
                map.insert(rest.to_string(), t.to_dtype(DType::F32)?);
            }
            _ => {
                return Err(TrainError::Checkpoint {
                    path: wpath.clone(),
                    reason: format!("`{k}` matches no base tensor of that shape"),
                })
            }
        }
    }
    let opts = cpmv_model::LoadOptions {
        lora: Some(lora),
        fixes,
        device: device.clone(),
        dtype,
        ..Default::default()
    };
    let store = cpmv_model::ParamStore::from_tensors(map, &opts)?;
    let model = MiniCpmV::from_params(cfg, store, &opts)?;
    // Every LoRA pair of the file must belong to a module the target created.
    for k in adapter.keys() {
        let rest = k.strip_prefix(PEFT_PREFIX).unwrap_or(k);
        let module = rest
            .strip_suffix(".lora_A.weight")
            .or_else(|| rest.strip_suffix(".lora_B.weight"));
        if let Some(m) = module {
            if !model.params().lora().contains_key(m) {
                return Err(TrainError::Checkpoint {
                    path: wpath.clone(),
                    reason: format!(
                        "`{k}`: module {m} is not matched by the adapter's target_modules"
                    ),
                });
            }
        }
    }
    for (m, ad) in model.params().lora() {
        for (suffix, var) in [("lora_A", &ad.a), ("lora_B", &ad.b)] {
            let key = format!("{PEFT_PREFIX}{m}.{suffix}.weight");
            let t = adapter.get(&key).ok_or_else(|| TrainError::Checkpoint {
                path: wpath.clone(),
                reason: format!("no `{key}` for adapted module {m}"),
            })?;
            set_var(var, t, &key, &wpath)?;
        }
    }
    Ok(model)
}

/// PEFT options that change the LoRA arithmetic and are not implemented here: refused rather
/// than silently computing another model.
fn refuse_unsupported(cfg: &Value, path: &Path) -> Result<(), TrainError> {
    let on = |k: &str| cfg.get(k).and_then(Value::as_bool).unwrap_or(false);
    let non_empty = |k: &str| {
        cfg.get(k)
            .and_then(Value::as_object)
            .is_some_and(|o| !o.is_empty())
    };
    for k in ["use_rslora", "use_dora", "fan_in_fan_out"] {
        if on(k) {
            return Err(TrainError::Checkpoint {
                path: path.to_path_buf(),
                reason: format!("`{k}: true` is not supported"),
            });
        }
    }
    for k in ["rank_pattern", "alpha_pattern"] {
        if non_empty(k) {
            return Err(TrainError::Checkpoint {
                path: path.to_path_buf(),
                reason: format!("a non-empty `{k}` is not supported"),
            });
        }
    }
    Ok(())
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c.to_string()
            } else {
                format!("\\{c}")
            }
        })
        .collect()
}
