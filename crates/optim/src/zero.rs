//! The optimizer sharded over data-parallel ranks, as DeepSpeed's ZeRO stages 1 and 2 and its
//! optimizer offload do it: every trainable value gets a place in one flat space (parameters in
//! order, each flattened), the space is cut into `world` equal shards, and rank r keeps the fp32
//! master weights and AdamW moments of shard r only — on the training device, or in host memory
//! when offloaded. A step reduce-scatters the gradients (rank r receives the sum of shard r),
//! updates the shard, and all-gathers the new weights.
//!
//! A shard cuts through parameters; each piece of a parameter inside a shard (a [`Segment`]) is
//! optimised as a parameter of its own by [`AdamW`], with the weight-decay flag and step count of
//! the parameter it comes from, so the update of every value is the one [`AdamW`] gives it
//! unsharded.
//!
//! [`StateFiles`] reads optimizer state saved by any number of ranks (or by an unsharded
//! [`AdamW`]) and hands each rank the ranges it owns now, so a run resumes at another world size,
//! sharded or not.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

use crate::adamw::STATE_FORMAT;
use crate::{AdamW, AdamWConfig, OptimError};

/// Where every trainable value sits in the flat space the ranks exchange, and which shard of
/// it each rank owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlatLayout {
    /// Start of each parameter in the flat space, then the total.
    offsets: Vec<usize>,
    world: usize,
    shard: usize,
}

/// The part of one parameter inside a rank's shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Index of the parameter (in the layout's order).
    pub var: usize,
    /// First element of the segment within the flattened parameter.
    pub start: usize,
    /// Elements in the segment.
    pub len: usize,
    /// Where the segment starts within the shard.
    pub at: usize,
}

impl FlatLayout {
    /// The layout of parameters of `sizes` elements each, cut into `world` (≥ 1) shards of
    /// `ceil(total / world)` values; the last shard is padded.
    pub fn new(sizes: &[usize], world: usize) -> Self {
        let world = world.max(1);
        let mut offsets = Vec::with_capacity(sizes.len() + 1);
        let mut at = 0;
        for &n in sizes {
            offsets.push(at);
            at += n;
        }
        offsets.push(at);
        FlatLayout {
            offsets,
            world,
            shard: at.div_ceil(world),
        }
    }

    /// Trainable values in all.
    pub fn total(&self) -> usize {
        self.offsets.last().copied().unwrap_or(0)
    }

    /// Number of shards.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Values per shard (padding included).
    pub fn shard_len(&self) -> usize {
        self.shard
    }

    /// Length of the padded flat space: `world × shard_len`.
    pub fn padded_len(&self) -> usize {
        self.shard * self.world
    }

    /// The flat range of parameter `i`.
    pub fn var_range(&self, i: usize) -> Range<usize> {
        self.offsets[i]..self.offsets[i + 1]
    }

    /// Number of parameters.
    pub fn vars(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Real (unpadded) values in shard `rank`.
    pub fn owned(&self, rank: usize) -> usize {
        let start = (rank * self.shard).min(self.total());
        let end = ((rank + 1) * self.shard).min(self.total());
        end - start
    }

    /// The pieces of parameters in shard `rank`, in flat order.
    pub fn segments(&self, rank: usize) -> Vec<Segment> {
        let lo = rank * self.shard;
        let hi = ((rank + 1) * self.shard).min(self.total());
        let mut out = Vec::new();
        for i in 0..self.vars() {
            let r = self.var_range(i);
            let (a, b) = (r.start.max(lo), r.end.min(hi));
            if a < b {
                out.push(Segment {
                    var: i,
                    start: a - r.start,
                    len: b - a,
                    at: a - lo,
                });
            }
        }
        out
    }
}

/// The name a segment's state goes by: `<param>[start..end]`.
fn segment_name(param: &str, seg: &Segment) -> String {
    format!("{param}[{}..{}]", seg.start, seg.start + seg.len)
}

/// AdamW over one rank's shard of the flat space (see the module doc).
pub struct ShardedAdamW {
    layout: FlatLayout,
    rank: usize,
    /// Every parameter's name, shape and dtype (all ranks', in layout order).
    params: Vec<(String, Vec<usize>, DType)>,
    segments: Vec<Segment>,
    /// One var per segment, on the state device, in the dtype of its parameter.
    shadows: Vec<Var>,
    opt: AdamW,
}

impl ShardedAdamW {
    /// The optimizer of shard `rank` of `world` over `params` (the order of the flat space),
    /// its state on `state_device` (the parameters' device, or the CPU to offload it), starting
    /// from the parameters' current values. `decay(name)` as for [`AdamW::new`].
    pub fn new(
        params: &[(String, Var)],
        rank: usize,
        world: usize,
        cfg: AdamWConfig,
        decay: impl Fn(&str) -> bool,
        state_device: &Device,
    ) -> Result<Self, OptimError> {
        let sizes: Vec<usize> = params.iter().map(|(_, v)| v.elem_count()).collect();
        let layout = FlatLayout::new(&sizes, world);
        let segments = layout.segments(rank);
        let mut shadows = Vec::with_capacity(segments.len());
        let mut named = Vec::with_capacity(segments.len());
        let mut decays = HashMap::new();
        for seg in &segments {
            let (name, var) = &params[seg.var];
            let piece = var
                .as_detached_tensor()
                .flatten_all()?
                .narrow(0, seg.start, seg.len)?
                .to_device(state_device)?;
            let shadow = Var::from_tensor(&piece)?;
            let sname = segment_name(name, seg);
            decays.insert(sname.clone(), decay(name));
            named.push((sname, shadow.clone()));
            shadows.push(shadow);
        }
        let opt = AdamW::new(named, cfg, |n| decays.get(n).copied().unwrap_or(true))?;
        Ok(ShardedAdamW {
            layout,
            rank,
            params: params
                .iter()
                .map(|(n, v)| (n.clone(), v.dims().to_vec(), v.dtype()))
                .collect(),
            segments,
            shadows,
            opt,
        })
    }

    /// The flat space and its shards.
    pub fn layout(&self) -> &FlatLayout {
        &self.layout
    }

    /// One AdamW update of the shard: `grads` holds the shard's summed gradient
    /// ([`FlatLayout::shard_len`] values), `present[i]` whether parameter i has a gradient this
    /// step (one without is left alone, as [`AdamW::step`] leaves it). `lr` and `grad_scale` as
    /// for [`AdamW::step`].
    pub fn step(
        &mut self,
        grads: &[f32],
        present: &[bool],
        lr: f64,
        grad_scale: f64,
    ) -> Result<(), OptimError> {
        if grads.len() != self.layout.shard_len() || present.len() != self.layout.vars() {
            return Err(OptimError::Candle(candle_core::Error::Msg(format!(
                "sharded step: {} gradient values and {} flags for a shard of {} values over {} \
                 parameters",
                grads.len(),
                present.len(),
                self.layout.shard_len(),
                self.layout.vars()
            ))));
        }
        let mut store = GradStore::default();
        for (seg, shadow) in self.segments.iter().zip(&self.shadows) {
            if !present[seg.var] {
                continue;
            }
            let g = Tensor::from_slice(&grads[seg.at..seg.at + seg.len], seg.len, shadow.device())?;
            store.insert(shadow.as_tensor(), g);
        }
        self.opt.step(&store, lr, grad_scale)
    }

    /// One update of an unsharded layout (one shard: every segment a whole parameter) from the
    /// parameters' own gradients in `grads`, one parameter at a time: its gradient goes to the
    /// state's device, it is updated there, and the new weights come back into `params` (the
    /// vars the layout was made from). No flat copy of the whole space is made, so an offloaded
    /// optimizer needs host memory for its state and one parameter's temporaries only.
    pub fn step_vars(
        &mut self,
        grads: &GradStore,
        params: &[(String, Var)],
        lr: f64,
        grad_scale: f64,
    ) -> Result<(), OptimError> {
        if self.layout.world() != 1 || params.len() != self.layout.vars() {
            return Err(OptimError::Candle(candle_core::Error::Msg(format!(
                "step_vars: a layout of {} shards over {} parameters, given {} parameters",
                self.layout.world(),
                self.layout.vars(),
                params.len()
            ))));
        }
        for (i, seg) in self.segments.iter().enumerate() {
            let (_, var) = &params[seg.var];
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            self.opt.step_param(i, &g.flatten_all()?, lr, grad_scale)?;
            let fresh = self.shadows[i]
                .as_tensor()
                .to_device(var.device())?
                .reshape(var.dims())?;
            var.set(&fresh)?;
        }
        self.opt.count_step();
        Ok(())
    }

    /// The shard's current weights, in each parameter's dtype, as f32 (padding zero): what
    /// every rank sets its copy of the parameters to.
    pub fn shard_values(&self) -> Result<Vec<f32>, OptimError> {
        let mut out = vec![0f32; self.layout.shard_len()];
        for (seg, shadow) in self.segments.iter().zip(&self.shadows) {
            let v = shadow.as_tensor().to_dtype(DType::F32)?.to_vec1::<f32>()?;
            out[seg.at..seg.at + seg.len].copy_from_slice(&v);
        }
        Ok(out)
    }

    /// Completed steps.
    pub fn steps(&self) -> u64 {
        self.opt.steps()
    }

    /// Bytes of optimizer state this rank holds (masters and moments of its shard).
    pub fn state_bytes(&self) -> usize {
        self.opt.state_bytes()
    }

    /// Saves this rank's state: the format of [`AdamW::save_state`], one tensor set per segment
    /// under `<param>[start..end]`.
    pub fn save_state(&self, path: &Path) -> Result<(), OptimError> {
        self.opt.save_state(path)
    }

    /// Restores this rank's shard from state saved by any ranks (`files`), sharded or not: each
    /// segment's moments, master and step are cut from whichever saved ranges hold them, and
    /// the weights of segments without a master (f32 parameters, whose values live in the
    /// model checkpoint) are taken from `params` (the layout's parameters, already holding the
    /// checkpoint's values). Every tensor must belong to a parameter of the run; nothing
    /// changes on an error.
    pub fn load_state(
        &mut self,
        files: &StateFiles,
        params: &[(String, Var)],
    ) -> Result<(), OptimError> {
        if params.len() != self.params.len() {
            return Err(OptimError::Candle(candle_core::Error::Msg(format!(
                "load_state: {} parameters given for a layout of {}",
                params.len(),
                self.params.len()
            ))));
        }
        files.check_names(
            self.params
                .iter()
                .map(|(n, d, t)| (n.as_str(), d.as_slice(), *t != DType::F32)),
        )?;
        let sources: Vec<Source> = self
            .segments
            .iter()
            .map(|seg| {
                let (name, dims, _) = &self.params[seg.var];
                Source {
                    name: name.clone(),
                    dims: dims.clone(),
                    range: seg.start..seg.start + seg.len,
                }
            })
            .collect();
        self.opt.load_pieces(files, &sources)?;
        for (seg, shadow) in self.segments.iter().zip(&self.shadows) {
            let (_, var) = &params[seg.var];
            if var.dtype() == DType::F32 {
                let piece = var
                    .as_detached_tensor()
                    .flatten_all()?
                    .narrow(0, seg.start, seg.len)?
                    .to_device(shadow.device())?;
                shadow.set(&piece)?;
            }
        }
        Ok(())
    }

    /// The rank this optimizer belongs to.
    pub fn rank(&self) -> usize {
        self.rank
    }
}

/// Which saved values one optimizer parameter takes: elements `range` of parameter `name`
/// (flattened; the parameter has shape `dims`).
pub(crate) struct Source {
    pub name: String,
    pub dims: Vec<usize>,
    pub range: Range<usize>,
}

/// One saved tensor: a whole parameter's (`range` None) or a range of its elements.
struct Piece {
    file: usize,
    key: String,
    range: Option<Range<usize>>,
    dims: Vec<usize>,
    /// Byte range of the f32 data in the file.
    bytes: Range<usize>,
}

/// The suffixes of a state tensor's key.
const SUFFIXES: [&str; 3] = ["exp_avg_sq", "exp_avg", "master"];

/// Optimizer state saved by one or more ranks (files written by [`AdamW::save_state`] or
/// [`ShardedAdamW::save_state`]), memory-mapped, indexed by parameter and range.
pub struct StateFiles {
    paths: Vec<PathBuf>,
    maps: Vec<memmap2::Mmap>,
    /// (parameter, suffix) → pieces.
    pieces: HashMap<(String, String), Vec<Piece>>,
    steps: u64,
    param_steps: HashMap<String, u64>,
}

/// Splits `<param>[a..b]` into the parameter and the range; a plain name has no range.
fn parse_range(name: &str) -> Option<(&str, Option<Range<usize>>)> {
    let Some(open) = name.strip_suffix(']').and_then(|s| s.rfind('[')) else {
        return Some((name, None));
    };
    let inner = &name[open + 1..name.len() - 1];
    let (a, b) = inner.split_once("..")?;
    let (a, b) = (a.parse().ok()?, b.parse().ok()?);
    (a < b).then_some((&name[..open], Some(a..b)))
}

impl StateFiles {
    /// Opens and indexes `paths` (one file per saving rank; one for an unsharded optimizer).
    /// Errors name the file and tensor that is not optimizer state, and files that disagree on
    /// the step or on a parameter's step.
    pub fn open(paths: &[PathBuf]) -> Result<Self, OptimError> {
        let mut out = StateFiles {
            paths: paths.to_vec(),
            maps: Vec::new(),
            pieces: HashMap::new(),
            steps: 0,
            param_steps: HashMap::new(),
        };
        for (fi, path) in paths.iter().enumerate() {
            let bad = |msg: String| OptimError::State {
                path: path.clone(),
                msg,
            };
            let opened = std::fs::File::open(path).and_then(|f| {
                // SAFETY: state files are written to a temporary name and renamed into place,
                // never modified afterwards; the map is read-only.
                unsafe { memmap2::Mmap::map(&f) }
            });
            let map = opened.map_err(|source| OptimError::Io {
                path: path.clone(),
                source,
            })?;
            let st_err = |source| OptimError::SafeTensors {
                path: path.clone(),
                source,
            };
            let (_, header) = safetensors::SafeTensors::read_metadata(&map).map_err(st_err)?;
            let file = safetensors::SafeTensors::deserialize(&map).map_err(st_err)?;
            let meta = header.metadata().clone().unwrap_or_default();
            let field = |key: &str| {
                meta.get(key)
                    .ok_or_else(|| bad(format!("metadata has no {key:?}")))
            };
            let format = field("format")?;
            if format != STATE_FORMAT {
                return Err(bad(format!(
                    "format is {format:?}, expected {STATE_FORMAT:?}"
                )));
            }
            let steps: u64 = field("step")?
                .parse()
                .map_err(|e| bad(format!("metadata \"step\": {e}")))?;
            if fi > 0 && steps != out.steps {
                return Err(bad(format!(
                    "saved at step {steps}, but {} at step {}",
                    paths[0].display(),
                    out.steps
                )));
            }
            out.steps = steps;
            let param_steps: HashMap<String, u64> = serde_json::from_str(field("param_steps")?)
                .map_err(|e| bad(format!("metadata \"param_steps\": {e}")))?;
            for (k, step) in param_steps {
                let (name, _) =
                    parse_range(&k).ok_or_else(|| bad(format!("param_steps key {k:?}")))?;
                match out.param_steps.insert(name.to_string(), step) {
                    Some(s) if s != step => {
                        return Err(bad(format!(
                            "parameter {name:?} is at update {step} here and {s} elsewhere"
                        )))
                    }
                    _ => {}
                }
            }
            let base = map.as_ptr() as usize;
            for key in file.names() {
                let view = file.tensor(key).map_err(st_err)?;
                let (stem, suffix) = SUFFIXES
                    .iter()
                    .find_map(|s| key.strip_suffix(&format!(".{s}")).map(|n| (n, *s)))
                    .ok_or_else(|| bad(format!("tensor {key:?} is not optimizer state")))?;
                let (name, range) =
                    parse_range(stem).ok_or_else(|| bad(format!("tensor {key:?}: bad range")))?;
                if view.dtype() != safetensors::Dtype::F32
                    || range
                        .as_ref()
                        .is_some_and(|r| view.shape() != [r.end - r.start])
                {
                    return Err(bad(format!(
                        "tensor {key:?} is {:?} {:?}, expected F32{}",
                        view.dtype(),
                        view.shape(),
                        range
                            .as_ref()
                            .map(|r| format!(" [{}]", r.end - r.start))
                            .unwrap_or_default()
                    )));
                }
                let start = view.data().as_ptr() as usize - base;
                out.pieces
                    .entry((name.to_string(), suffix.to_string()))
                    .or_default()
                    .push(Piece {
                        file: fi,
                        key: key.to_string(),
                        range,
                        dims: view.shape().to_vec(),
                        bytes: start..start + view.data().len(),
                    });
            }
            out.maps.push(map);
        }
        for pieces in out.pieces.values_mut() {
            pieces.sort_by_key(|p| p.range.as_ref().map_or(0, |r| r.start));
        }
        Ok(out)
    }

    /// Completed optimizer steps of the saved run.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    fn bad(&self, msg: String) -> OptimError {
        OptimError::State {
            path: self.paths.first().cloned().unwrap_or_default(),
            msg,
        }
    }

    /// Every saved tensor belongs to one of `params` (name, shape, whether it has an f32 master
    /// copy); errors name the first that does not.
    pub(crate) fn check_names<'a>(
        &self,
        params: impl Iterator<Item = (&'a str, &'a [usize], bool)>,
    ) -> Result<(), OptimError> {
        let known: HashMap<&str, bool> = params.map(|(n, _, m)| (n, m)).collect();
        let mut extra: Vec<&str> = self
            .pieces
            .iter()
            .filter(|((name, suffix), _)| match known.get(name.as_str()) {
                None => true,
                Some(&master) => suffix == "master" && !master,
            })
            .flat_map(|(_, ps)| ps.iter().map(|p| p.key.as_str()))
            .collect();
        extra.sort_unstable();
        match extra.first() {
            Some(k) => Err(self.bad(format!(
                "tensor {k:?} belongs to no parameter of this optimizer"
            ))),
            None => Ok(()),
        }
    }

    /// Checks that `suffix` of `src` is saved in full (values or errors, nothing read).
    fn check(&self, src: &Source, suffix: &str) -> Result<(), OptimError> {
        self.read_into(src, suffix, None)
    }

    /// The saved values of `suffix` (exp_avg, exp_avg_sq, master) of `src`.
    pub(crate) fn read(&self, src: &Source, suffix: &str) -> Result<Vec<f32>, OptimError> {
        let mut out = vec![0f32; src.range.end - src.range.start];
        self.read_into(src, suffix, Some(&mut out))?;
        Ok(out)
    }

    fn read_into(
        &self,
        src: &Source,
        suffix: &str,
        mut out: Option<&mut [f32]>,
    ) -> Result<(), OptimError> {
        let whole_key = format!("{}.{suffix}", src.name);
        let pieces = self
            .pieces
            .get(&(src.name.clone(), suffix.to_string()))
            .ok_or_else(|| self.bad(format!("no tensor {whole_key:?}")))?;
        let numel: usize = src.dims.iter().product();
        let want = src.range.clone();
        let mut covered = 0;
        for p in pieces {
            let prange = match &p.range {
                None => {
                    if p.dims != src.dims {
                        return Err(self.bad(format!(
                            "tensor {:?} is F32 {:?}, expected F32 {:?}",
                            p.key, p.dims, src.dims
                        )));
                    }
                    0..numel
                }
                Some(r) if r.end <= numel => r.clone(),
                Some(_) => {
                    return Err(self.bad(format!(
                        "tensor {:?} reaches past the {numel} values of {:?}",
                        p.key, src.name
                    )))
                }
            };
            // Pieces are sorted by start; a part already covered is not counted twice.
            let (a, b) = (
                prange.start.max(want.start).max(want.start + covered),
                prange.end.min(want.end),
            );
            if a >= b {
                continue;
            }
            if a != want.start + covered {
                // A gap before this piece: nothing else can fill it.
                break;
            }
            if let Some(out) = out.as_deref_mut() {
                let bytes = &self.maps[p.file][p.bytes.clone()];
                let from = (a - prange.start) * 4;
                let src_bytes = &bytes[from..from + (b - a) * 4];
                for (o, c) in out[a - want.start..b - want.start]
                    .iter_mut()
                    .zip(src_bytes.chunks_exact(4))
                {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            covered += b - a;
            if p.range.is_none() {
                break;
            }
        }
        if covered != want.end - want.start {
            return Err(self.bad(format!(
                "the saved {whole_key:?} covers {covered} of elements {}..{} (a rank's file \
                 missing?)",
                want.start, want.end
            )));
        }
        Ok(())
    }

    /// The saved update count of parameter `name`.
    pub(crate) fn param_step(&self, name: &str) -> Result<u64, OptimError> {
        self.param_steps
            .get(name)
            .copied()
            .ok_or_else(|| self.bad(format!("metadata \"param_steps\" has no {name:?}")))
    }
}

impl AdamW {
    /// Sets parameter i's moments, master (if it has one) and step from `sources[i]` of
    /// `files`, checking everything before changing anything.
    pub(crate) fn load_pieces(
        &mut self,
        files: &StateFiles,
        sources: &[Source],
    ) -> Result<(), OptimError> {
        let mut steps = Vec::with_capacity(sources.len());
        for (p, src) in self.params_mut().iter().zip(sources) {
            files.check(src, "exp_avg")?;
            files.check(src, "exp_avg_sq")?;
            if p.has_master() {
                files.check(src, "master")?;
            }
            steps.push(files.param_step(&src.name)?);
        }
        let total = files.steps();
        for ((p, src), step) in self.params_mut().iter_mut().zip(sources).zip(steps) {
            let dims = p.dims();
            let device = p.device();
            let load = |suffix: &str| -> Result<Tensor, OptimError> {
                let v = files.read(src, suffix)?;
                Ok(Tensor::from_vec(v, dims.as_slice(), &device)?)
            };
            let master = if p.has_master() {
                Some(load("master")?)
            } else {
                None
            };
            p.restore(load("exp_avg")?, load("exp_avg_sq")?, master, step)?;
        }
        self.set_steps(total);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_flat_space_once() {
        let sizes = [5, 0, 3, 9, 1];
        for world in 1..=7 {
            let l = FlatLayout::new(&sizes, world);
            assert_eq!(l.shard_len(), 18usize.div_ceil(world));
            let mut seen = vec![0u8; 18];
            let mut owned = 0;
            for r in 0..world {
                let segs = l.segments(r);
                let mut at = 0;
                for s in &segs {
                    assert_eq!(s.at, at, "contiguous within the shard");
                    at += s.len;
                    for k in 0..s.len {
                        seen[l.var_range(s.var).start + s.start + k] += 1;
                    }
                }
                assert_eq!(at, l.owned(r));
                owned += l.owned(r);
            }
            assert_eq!(owned, 18);
            assert!(seen.iter().all(|&c| c == 1), "world {world}: {seen:?}");
        }
    }

    #[test]
    fn segment_names_round_trip() {
        let seg = Segment {
            var: 0,
            start: 3,
            len: 4,
            at: 0,
        };
        let n = segment_name("llm.model.layers.0.mlp.up_proj.weight", &seg);
        assert_eq!(
            parse_range(&n),
            Some(("llm.model.layers.0.mlp.up_proj.weight", Some(3..7)))
        );
        assert_eq!(parse_range("a.b"), Some(("a.b", None)));
        assert_eq!(parse_range("a[4..2]"), None);
    }
}
