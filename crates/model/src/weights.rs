//! Checkpoint tensors: which names and shapes a config implies (spec §7.5), reading them from
//! memory-mapped safetensors (single file or sharded through `model.safetensors.index.json`),
//! and writing them back.

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorView};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::config::{ModelConfig, Version};
use crate::error::{ModelError, Result};

/// How a parameter is initialised by [`crate::init`] (and what kind of tensor it is).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum InitKind {
    /// Normal(0, std) — projection matrices, embeddings.
    Normal(f64),
    /// Ones — norm weights.
    Ones,
    /// Zeros — biases.
    Zeros,
    /// The fixed 2-D sin-cos table of V2.0's resampler queries.
    QuerySinCos,
}

/// One tensor a checkpoint of a given config must hold.
#[derive(Debug, Clone)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: InitKind,
}

/// The model part a tensor belongs to (for freezing and for the trainable sets of spec §8.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Part {
    Vision,
    Resampler,
    /// `llm.model.embed_tokens`.
    Embeddings,
    /// The rest of the LLM, `lm_head` included.
    Llm,
}

/// The part of a tensor name.
pub fn part_of(name: &str) -> Part {
    if name.starts_with("vpm.") {
        Part::Vision
    } else if name.starts_with("resampler.") {
        Part::Resampler
    } else if name.starts_with("llm.model.embed_tokens.") {
        Part::Embeddings
    } else {
        Part::Llm
    }
}

/// Every tensor the checkpoint of `cfg` holds, with its shape, in a stable order.
pub fn param_specs(cfg: &ModelConfig) -> Vec<ParamSpec> {
    let mut out = Vec::new();
    let mut p =
        |name: String, shape: Vec<usize>, init: InitKind| out.push(ParamSpec { name, shape, init });
    let l = &cfg.llm;
    let std = 0.02;
    let (h, hd, kvd) = (l.hidden_size, l.head_dim(), l.head_dim() * l.num_kv_heads);
    p(
        "llm.model.embed_tokens.weight".into(),
        vec![l.vocab_size, h],
        InitKind::Normal(std),
    );
    for i in 0..l.num_layers {
        let pre = format!("llm.model.layers.{i}");
        p(
            format!("{pre}.self_attn.q_proj.weight"),
            vec![l.num_heads * hd, h],
            InitKind::Normal(std),
        );
        p(
            format!("{pre}.self_attn.k_proj.weight"),
            vec![kvd, h],
            InitKind::Normal(std),
        );
        p(
            format!("{pre}.self_attn.v_proj.weight"),
            vec![kvd, h],
            InitKind::Normal(std),
        );
        if l.qkv_bias {
            p(
                format!("{pre}.self_attn.q_proj.bias"),
                vec![l.num_heads * hd],
                InitKind::Zeros,
            );
            p(
                format!("{pre}.self_attn.k_proj.bias"),
                vec![kvd],
                InitKind::Zeros,
            );
            p(
                format!("{pre}.self_attn.v_proj.bias"),
                vec![kvd],
                InitKind::Zeros,
            );
        }
        p(
            format!("{pre}.self_attn.o_proj.weight"),
            vec![h, l.num_heads * hd],
            InitKind::Normal(std),
        );
        p(
            format!("{pre}.mlp.gate_proj.weight"),
            vec![l.intermediate_size, h],
            InitKind::Normal(std),
        );
        p(
            format!("{pre}.mlp.up_proj.weight"),
            vec![l.intermediate_size, h],
            InitKind::Normal(std),
        );
        p(
            format!("{pre}.mlp.down_proj.weight"),
            vec![h, l.intermediate_size],
            InitKind::Normal(std),
        );
        p(
            format!("{pre}.input_layernorm.weight"),
            vec![h],
            InitKind::Ones,
        );
        p(
            format!("{pre}.post_attention_layernorm.weight"),
            vec![h],
            InitKind::Ones,
        );
    }
    p("llm.model.norm.weight".into(), vec![h], InitKind::Ones);
    p(
        "llm.lm_head.weight".into(),
        vec![l.vocab_size, h],
        InitKind::Normal(std),
    );

    let v = &cfg.vision;
    let (vh, vi, ps) = (v.hidden_size, v.intermediate_size, v.patch_size);
    match cfg.version {
        Version::V2_0 => {
            p(
                "vpm.patch_embed.proj.weight".into(),
                vec![vh, 3, ps, ps],
                InitKind::Normal(std),
            );
            p(
                "vpm.patch_embed.proj.bias".into(),
                vec![vh],
                InitKind::Zeros,
            );
            p(
                "vpm.pos_embed".into(),
                vec![1, v.grid() * v.grid(), vh],
                InitKind::Normal(std),
            );
            for i in 0..v.num_layers {
                let pre = format!("vpm.blocks.{i}");
                for n in ["norm1", "norm2"] {
                    p(format!("{pre}.{n}.weight"), vec![vh], InitKind::Ones);
                    p(format!("{pre}.{n}.bias"), vec![vh], InitKind::Zeros);
                }
                p(
                    format!("{pre}.attn.qkv.weight"),
                    vec![3 * vh, vh],
                    InitKind::Normal(std),
                );
                p(
                    format!("{pre}.attn.qkv.bias"),
                    vec![3 * vh],
                    InitKind::Zeros,
                );
                p(
                    format!("{pre}.attn.proj.weight"),
                    vec![vh, vh],
                    InitKind::Normal(std),
                );
                p(format!("{pre}.attn.proj.bias"), vec![vh], InitKind::Zeros);
                p(
                    format!("{pre}.mlp.fc1.weight"),
                    vec![vi, vh],
                    InitKind::Normal(std),
                );
                p(format!("{pre}.mlp.fc1.bias"), vec![vi], InitKind::Zeros);
                p(
                    format!("{pre}.mlp.fc2.weight"),
                    vec![vh, vi],
                    InitKind::Normal(std),
                );
                p(format!("{pre}.mlp.fc2.bias"), vec![vh], InitKind::Zeros);
            }
            p("vpm.norm.weight".into(), vec![vh], InitKind::Ones);
            p("vpm.norm.bias".into(), vec![vh], InitKind::Zeros);
        }
        Version::V2_5 | Version::V2_6 => {
            let pre = "vpm.embeddings";
            p(
                format!("{pre}.patch_embedding.weight"),
                vec![vh, 3, ps, ps],
                InitKind::Normal(std),
            );
            p(
                format!("{pre}.patch_embedding.bias"),
                vec![vh],
                InitKind::Zeros,
            );
            p(
                format!("{pre}.position_embedding.weight"),
                vec![v.grid() * v.grid(), vh],
                InitKind::Normal(std),
            );
            for i in 0..v.num_layers {
                let pre = format!("vpm.encoder.layers.{i}");
                for n in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                    p(
                        format!("{pre}.self_attn.{n}.weight"),
                        vec![vh, vh],
                        InitKind::Normal(std),
                    );
                    p(
                        format!("{pre}.self_attn.{n}.bias"),
                        vec![vh],
                        InitKind::Zeros,
                    );
                }
                for n in ["layer_norm1", "layer_norm2"] {
                    p(format!("{pre}.{n}.weight"), vec![vh], InitKind::Ones);
                    p(format!("{pre}.{n}.bias"), vec![vh], InitKind::Zeros);
                }
                p(
                    format!("{pre}.mlp.fc1.weight"),
                    vec![vi, vh],
                    InitKind::Normal(std),
                );
                p(format!("{pre}.mlp.fc1.bias"), vec![vi], InitKind::Zeros);
                p(
                    format!("{pre}.mlp.fc2.weight"),
                    vec![vh, vi],
                    InitKind::Normal(std),
                );
                p(format!("{pre}.mlp.fc2.bias"), vec![vh], InitKind::Zeros);
            }
            p("vpm.post_layernorm.weight".into(), vec![vh], InitKind::Ones);
            p("vpm.post_layernorm.bias".into(), vec![vh], InitKind::Zeros);
        }
    }

    let r = &cfg.resampler;
    let d = r.embed_dim;
    p(
        "resampler.query".into(),
        vec![r.query_num, d],
        InitKind::Normal(std),
    );
    if r.query_pos {
        p(
            "resampler.pos_embed".into(),
            vec![r.query_num, d],
            InitKind::QuerySinCos,
        );
    }
    p(
        "resampler.kv_proj.weight".into(),
        vec![d, r.kv_dim],
        InitKind::Normal(std),
    );
    p(
        "resampler.attn.in_proj_weight".into(),
        vec![3 * d, d],
        InitKind::Normal(std),
    );
    p(
        "resampler.attn.in_proj_bias".into(),
        vec![3 * d],
        InitKind::Zeros,
    );
    p(
        "resampler.attn.out_proj.weight".into(),
        vec![d, d],
        InitKind::Normal(std),
    );
    p(
        "resampler.attn.out_proj.bias".into(),
        vec![d],
        InitKind::Zeros,
    );
    for n in ["ln_q", "ln_kv", "ln_post"] {
        p(format!("resampler.{n}.weight"), vec![d], InitKind::Ones);
        p(format!("resampler.{n}.bias"), vec![d], InitKind::Zeros);
    }
    p("resampler.proj".into(), vec![d, d], InitKind::Normal(std));
    out
}

struct Entry {
    file: usize,
    dtype: StDtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// The tensors of a checkpoint directory, memory-mapped; nothing is read until asked for.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<(PathBuf, Mmap)>,
    entries: BTreeMap<String, Entry>,
}

impl Checkpoint {
    /// Opens `DIR/model.safetensors.index.json` if present, else `DIR/model.safetensors`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let file_names: Vec<String> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| ModelError::Io {
                path: index.clone(),
                source: e,
            })?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ModelError::Checkpoint {
                    path: index.clone(),
                    reason: e.to_string(),
                })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::Checkpoint {
                    path: index.clone(),
                    reason: "no `weight_map` object".into(),
                })?;
            let mut names: Vec<String> = map
                .values()
                .filter_map(|f| f.as_str().map(str::to_string))
                .collect();
            names.sort();
            names.dedup();
            names
        } else {
            vec!["model.safetensors".into()]
        };
        let mut files = Vec::new();
        let mut entries = BTreeMap::new();
        for (fi, name) in file_names.iter().enumerate() {
            let path = dir.join(name);
            let f = std::fs::File::open(&path).map_err(|e| ModelError::Io {
                path: path.clone(),
                source: e,
            })?;
            // SAFETY: the mapping is read-only; a checkpoint modified while being read is
            // outside what any loader can defend against.
            let mmap = unsafe { Mmap::map(&f) }.map_err(|e| ModelError::Io {
                path: path.clone(),
                source: e,
            })?;
            let (header, meta) =
                SafeTensors::read_metadata(&mmap).map_err(|e| ModelError::Checkpoint {
                    path: path.clone(),
                    reason: format!("not a valid safetensors file: {e}"),
                })?;
            let base = 8 + header;
            for (tname, info) in meta.tensors() {
                let (s, e) = info.data_offsets;
                if entries.contains_key(&tname) {
                    return Err(ModelError::Checkpoint {
                        path: path.clone(),
                        reason: format!("tensor `{tname}` is stored in two files"),
                    });
                }
                entries.insert(
                    tname,
                    Entry {
                        file: fi,
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        start: base + s,
                        end: base + e,
                    },
                );
            }
            files.push((path, mmap));
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            files,
            entries,
        })
    }

    /// The directory it was opened from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Names of all stored tensors.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Stored dtype of a tensor (F32/BF16/F16; anything else reads as F32).
    pub fn dtype(&self, name: &str) -> Option<DType> {
        self.entries.get(name).map(|e| match e.dtype {
            StDtype::BF16 => DType::BF16,
            StDtype::F16 => DType::F16,
            _ => DType::F32,
        })
    }

    /// Stored shape of a tensor.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    /// Checks the stored tensors against the specs: all missing, unexpected and mis-shaped
    /// names in one error.
    pub fn check(&self, specs: &[ParamSpec]) -> Result<()> {
        let expected: HashMap<&str, &ParamSpec> =
            specs.iter().map(|s| (s.name.as_str(), s)).collect();
        let mut missing = Vec::new();
        let mut misshaped = Vec::new();
        for s in specs {
            match self.entries.get(&s.name) {
                None => missing.push(s.name.clone()),
                Some(e) if e.shape != s.shape => {
                    misshaped.push((s.name.clone(), s.shape.clone(), e.shape.clone()))
                }
                Some(_) => {}
            }
        }
        let unexpected: Vec<String> = self
            .entries
            .keys()
            .filter(|n| !expected.contains_key(n.as_str()))
            .cloned()
            .collect();
        if missing.is_empty() && unexpected.is_empty() && misshaped.is_empty() {
            Ok(())
        } else {
            Err(ModelError::WeightsMismatch {
                dir: self.dir.clone(),
                missing,
                unexpected,
                misshaped,
            })
        }
    }

    /// Reads one tensor converted to `dtype` on `device`.
    pub fn load(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| ModelError::Checkpoint {
                path: self.dir.clone(),
                reason: format!("no tensor `{name}`"),
            })?;
        let (path, mmap) = &self.files[e.file];
        let bytes = mmap
            .get(e.start..e.end)
            .ok_or_else(|| ModelError::Checkpoint {
                path: path.clone(),
                reason: format!("tensor `{name}` lies outside the file"),
            })?;
        let view = TensorView::new(e.dtype, e.shape.clone(), bytes).map_err(|err| {
            ModelError::Checkpoint {
                path: path.clone(),
                reason: format!("tensor `{name}`: {err}"),
            }
        })?;
        let t = view.load(device).map_err(|err| ModelError::Checkpoint {
            path: path.clone(),
            reason: format!("tensor `{name}`: {err}"),
        })?;
        Ok(t.to_dtype(dtype)?)
    }
}

/// Copies the non-weight files of a checkpoint directory (tokenizer, processor, generation
/// config, remote code) from `from` into `to`; weights, indexes and `config.json` are left to
/// the writer.
pub fn copy_side_files(from: &Path, to: &Path) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |e| ModelError::Io { path, source: e }
    };
    for entry in std::fs::read_dir(from).map_err(io(from))? {
        let entry = entry.map_err(io(from))?;
        let name = entry.file_name().to_string_lossy().to_string();
        let skip = name == "config.json"
            || name.ends_with(".safetensors")
            || name.ends_with(".bin")
            || name.ends_with(".pt")
            || name.ends_with(".index.json");
        if skip || !entry.file_type().map_err(io(from))?.is_file() {
            continue;
        }
        std::fs::copy(entry.path(), to.join(&name)).map_err(io(&entry.path()))?;
    }
    Ok(())
}

/// Writes one safetensors file with the `{"format": "pt"}` metadata transformers expects.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    safetensors::serialize_to_file(cpu.iter().map(|(k, t)| (k.as_str(), t)), Some(meta), path)
        .map_err(|e| ModelError::Checkpoint {
            path: path.to_path_buf(),
            reason: format!("cannot write: {e}"),
        })
}

/// Writes tensors as one `model.safetensors` (or shards of at most `shard_bytes` with an
/// index, named as transformers names them) into `dir`.
pub fn save_tensors(
    dir: &Path,
    tensors: &[(String, Tensor)],
    shard_bytes: Option<usize>,
) -> Result<Vec<PathBuf>> {
    let total: usize = tensors
        .iter()
        .map(|(_, t)| crate::ops::tensor_bytes(t))
        .sum();
    let limit = shard_bytes.unwrap_or(usize::MAX);
    let mut groups: Vec<Vec<&(String, Tensor)>> = vec![Vec::new()];
    let mut size = 0;
    for t in tensors {
        let b = crate::ops::tensor_bytes(&t.1);
        let cur_len = groups.last().map_or(0, Vec::len);
        if size + b > limit && cur_len > 0 {
            groups.push(Vec::new());
            size = 0;
        }
        size += b;
        if let Some(g) = groups.last_mut() {
            g.push(t);
        }
    }
    let mut written = Vec::new();
    let n = groups.len();
    let mut weight_map = BTreeMap::new();
    for (i, g) in groups.iter().enumerate() {
        let fname = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
        };
        let path = dir.join(&fname);
        let group: Vec<(String, Tensor)> = g.iter().map(|(k, t)| (k.clone(), t.clone())).collect();
        for (k, _) in &group {
            weight_map.insert(k.clone(), fname.clone());
        }
        write_safetensors(&path, &group)?;
        written.push(path);
    }
    let index_path = dir.join("model.safetensors.index.json");
    if n == 1 && index_path.exists() {
        // A stale index would make loaders read the old shards instead of this file.
        std::fs::remove_file(&index_path).map_err(|e| ModelError::Io {
            path: index_path.clone(),
            source: e,
        })?;
    }
    if n > 1 {
        let index = serde_json::json!({
            "metadata": { "total_size": total },
            "weight_map": weight_map,
        });
        let path = dir.join("model.safetensors.index.json");
        let text = serde_json::to_string_pretty(&index).map_err(|e| ModelError::Checkpoint {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        std::fs::write(&path, text).map_err(|e| ModelError::Io {
            path: path.clone(),
            source: e,
        })?;
        written.push(path);
    }
    Ok(written)
}
