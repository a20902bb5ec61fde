//! The sharded optimizer updates every value exactly as the unsharded one does, and its state
//! moves between world sizes (and to and from the unsharded form) without changing the run.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use cpmv_optim::zero::{FlatLayout, ShardedAdamW, StateFiles};
use cpmv_optim::{AdamW, AdamWConfig};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Parameters of mixed shapes and dtypes (names as a model's).
fn params(dev: &Device) -> candle_core::Result<Vec<(String, Var)>> {
    let v = |shape: &[usize], dtype: DType, seed: f32| -> candle_core::Result<Var> {
        let n: usize = shape.iter().product();
        let vals: Vec<f32> = (0..n).map(|i| ((i as f32 + seed) * 0.37).sin()).collect();
        Var::from_tensor(&Tensor::from_vec(vals, shape, dev)?.to_dtype(dtype)?)
    };
    Ok(vec![
        ("a.weight".into(), v(&[3, 5], DType::F32, 1.0)?),
        ("a.bias".into(), v(&[5], DType::F32, 2.0)?),
        ("b.weight".into(), v(&[4, 3], DType::BF16, 3.0)?),
        ("c.norm".into(), v(&[7], DType::F32, 4.0)?),
    ])
}

/// The gradient of step `t` (parameter 2 has none at step 2).
fn grads(t: usize, sizes: &[usize]) -> Vec<Option<Vec<f32>>> {
    sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            (!(t == 2 && i == 2)).then(|| {
                (0..n)
                    .map(|k| ((k * 31 + i * 7 + t * 13) as f32 * 0.11).cos() * 0.5)
                    .collect()
            })
        })
        .collect()
}

fn values(vars: &[(String, Var)]) -> candle_core::Result<Vec<Vec<f32>>> {
    vars.iter()
        .map(|(_, v)| v.as_tensor().to_dtype(DType::F32)?.flatten_all()?.to_vec1())
        .collect()
}

/// One unsharded step.
fn step_plain(opt: &mut AdamW, vars: &[(String, Var)], t: usize) -> TestResult {
    let sizes: Vec<usize> = vars.iter().map(|(_, v)| v.elem_count()).collect();
    let mut store = GradStore::default();
    for ((_, v), g) in vars.iter().zip(grads(t, &sizes)) {
        if let Some(g) = g {
            let g = Tensor::from_vec(g, v.dims(), v.device())?.to_dtype(v.dtype())?;
            store.insert(v.as_tensor(), g);
        }
    }
    opt.step(&store, 0.01, 0.8)?;
    Ok(())
}

/// One step of every shard, then every rank's copy of the parameters set from the gathered
/// shards (what the trainer's all-gather does).
fn step_sharded(opts: &mut [ShardedAdamW], vars: &[(String, Var)], t: usize) -> TestResult {
    let sizes: Vec<usize> = vars.iter().map(|(_, v)| v.elem_count()).collect();
    let layout = opts[0].layout().clone();
    let mut flat = vec![0f32; layout.padded_len()];
    let g = grads(t, &sizes);
    for (i, gi) in g.iter().enumerate() {
        if let Some(gi) = gi {
            flat[layout.var_range(i)].copy_from_slice(gi);
        }
    }
    let present: Vec<bool> = g.iter().map(Option::is_some).collect();
    let s = layout.shard_len();
    let mut gathered = Vec::new();
    for (r, o) in opts.iter_mut().enumerate() {
        o.step(&flat[r * s..(r + 1) * s], &present, 0.01, 0.8)?;
        gathered.extend(o.shard_values()?);
    }
    for (i, (_, v)) in vars.iter().enumerate() {
        let vals = &gathered[layout.var_range(i)];
        v.set(&Tensor::from_slice(vals, v.dims(), v.device())?.to_dtype(v.dtype())?)?;
    }
    Ok(())
}

fn sharded(
    vars: &[(String, Var)],
    world: usize,
) -> Result<Vec<ShardedAdamW>, cpmv_optim::OptimError> {
    (0..world)
        .map(|r| {
            ShardedAdamW::new(
                vars,
                r,
                world,
                AdamWConfig::default(),
                |n| !n.ends_with("bias"),
                &Device::Cpu,
            )
        })
        .collect()
}

#[test]
fn sharded_updates_equal_the_unsharded_bit_for_bit() -> TestResult {
    let dev = Device::Cpu;
    for world in [1, 2, 3, 5] {
        let vars = params(&dev)?;
        let mut opts = sharded(&vars, world)?;
        let fresh = params(&dev)?;
        let mut reference = AdamW::new(fresh.clone(), AdamWConfig::default(), |n| {
            !n.ends_with("bias")
        })?;
        for t in 1..=4 {
            step_sharded(&mut opts, &vars, t)?;
            step_plain(&mut reference, &fresh, t)?;
            assert_eq!(values(&vars)?, values(&fresh)?, "world {world} step {t}");
        }
        let held: usize = opts.iter().map(ShardedAdamW::state_bytes).sum();
        assert_eq!(held, reference.state_bytes(), "world {world}");
    }
    Ok(())
}

/// An unsharded layout updated parameter by parameter from the vars' own gradients (the
/// offloaded optimizer of one rank) equals AdamW, bit for bit.
#[test]
fn streamed_single_shard_updates_equal_the_unsharded() -> TestResult {
    let dev = Device::Cpu;
    let vars = params(&dev)?;
    let mut one = sharded(&vars, 1)?.remove(0);
    let fresh = params(&dev)?;
    let mut reference = AdamW::new(fresh.clone(), AdamWConfig::default(), |n| {
        !n.ends_with("bias")
    })?;
    let sizes: Vec<usize> = vars.iter().map(|(_, v)| v.elem_count()).collect();
    for t in 1..=4 {
        let mut store = GradStore::default();
        for ((_, v), g) in vars.iter().zip(grads(t, &sizes)) {
            if let Some(g) = g {
                let g = Tensor::from_vec(g, v.dims(), v.device())?.to_dtype(v.dtype())?;
                store.insert(v.as_tensor(), g);
            }
        }
        one.step_vars(&store, &vars, 0.01, 0.8)?;
        step_plain(&mut reference, &fresh, t)?;
        assert_eq!(values(&vars)?, values(&fresh)?, "step {t}");
    }
    assert_eq!(one.steps(), 4);
    // Only an unsharded layout streams.
    let mut two = sharded(&vars, 2)?;
    assert!(two[0]
        .step_vars(&GradStore::default(), &vars, 0.01, 1.0)
        .is_err());
    Ok(())
}

#[test]
fn state_moves_between_world_sizes_and_the_unsharded_form() -> TestResult {
    let dev = Device::Cpu;
    let dir = tempfile::tempdir()?;
    // The whole run, unsharded.
    let whole = params(&dev)?;
    let mut w_opt = AdamW::new(whole.clone(), AdamWConfig::default(), |n| {
        !n.ends_with("bias")
    })?;
    for t in 1..=4 {
        step_plain(&mut w_opt, &whole, t)?;
    }
    // Two steps on 2 ranks, saved per rank.
    let vars = params(&dev)?;
    let mut two = sharded(&vars, 2)?;
    for t in 1..=2 {
        step_sharded(&mut two, &vars, t)?;
    }
    let paths: Vec<_> = (0..2)
        .map(|r| dir.path().join(format!("rank{r}.safetensors")))
        .collect();
    for (o, p) in two.iter().zip(&paths) {
        o.save_state(p)?;
    }
    let files = StateFiles::open(&paths)?;
    assert_eq!(files.steps(), 2);
    // ... resumed on 3 ranks: the optimizer is made from fresh weights, which then get the
    // checkpoint's values (as a resumed run loads them), before the state is loaded.
    let v3 = params(&dev)?;
    let mut three = sharded(&v3, 3)?;
    for ((_, d), (_, s)) in v3.iter().zip(&vars) {
        d.set(s.as_tensor())?;
    }
    for o in &mut three {
        o.load_state(&files, &v3)?;
    }
    // ... and unsharded.
    let v1 = params(&dev)?;
    for ((_, d), (_, s)) in v1.iter().zip(&vars) {
        d.set(s.as_tensor())?;
    }
    let mut one = AdamW::new(v1.clone(), AdamWConfig::default(), |n| !n.ends_with("bias"))?;
    one.load_from(&files)?;
    for t in 3..=4 {
        step_sharded(&mut three, &v3, t)?;
        step_plain(&mut one, &v1, t)?;
    }
    assert_eq!(values(&v3)?, values(&whole)?);
    assert_eq!(values(&v1)?, values(&whole)?);

    // The unsharded state back into shards.
    let plain_path = dir.path().join("plain.safetensors");
    one.save_state(&plain_path)?;
    let files = StateFiles::open(std::slice::from_ref(&plain_path))?;
    let mut again = sharded(&v1, 2)?;
    for o in &mut again {
        o.load_state(&files, &v1)?;
        assert_eq!(o.steps(), 4);
    }

    // A missing rank file is named, not papered over.
    let files = StateFiles::open(&paths[..1])?;
    let lone_vars = params(&dev)?;
    let mut lone = sharded(&lone_vars, 1)?;
    let e = lone[0]
        .load_state(&files, &lone_vars)
        .expect_err("half the state")
        .to_string();
    assert!(e.contains("covers") || e.contains("no tensor"), "{e}");
    // State of another model is refused naming the tensor.
    let other = vec![("z".to_string(), Var::zeros(3, DType::F32, &dev)?)];
    let mut z = sharded(&other, 1)?;
    let e = z[0]
        .load_state(&StateFiles::open(&paths)?, &other)
        .expect_err("another model")
        .to_string();
    assert!(e.contains("belongs to no parameter"), "{e}");
    Ok(())
}

#[test]
fn layout_of_a_real_shape_list_shards_evenly() {
    let sizes = [128_256 * 4096, 4096, 14_336 * 4096, 1];
    let l = FlatLayout::new(&sizes, 8);
    let total: usize = sizes.iter().sum();
    assert!((0..8).all(|r| l.owned(r) <= total / 8 + 1));
    assert_eq!((0..8).map(|r| l.owned(r)).sum::<usize>(), total);
}
