//! The fused CUDA kernels (cpmv-kernels, reached through `cpmv_model::ops` on CUDA tensors)
//! against their CPU reference — the op-by-op compositions of the same functions on the CPU —
//! forward values and gradients, in f32 (tight) and bf16 (bf16 tolerance).
//!

use candle_core::{DType, Device, Tensor, Var};
use cpmv_model::ops;

fn gpu() -> Device {
    Device::new_cuda(0).expect("these tests need a CUDA GPU")
}

/// Deterministic values in [-scale, scale).
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32 * scale
        })
        .collect()
}

fn tensor(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(values(n, seed, scale), shape, &Device::Cpu).unwrap()
}

fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let a = a
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let b = b
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    assert_eq!(a.dims(), b.dims());
    let d = (&a - &b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let m = b
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    d / m.max(1e-12)
}

/// Runs `f` on CPU (f32 composition) and GPU (fused, `dtype`) over the same inputs; compares
/// outputs and the gradients of `sum(f(x) · probe)` for every input marked trainable.
fn compare(
    name: &str,
    inputs: &[(Tensor, bool)],
    f: &dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    tol: (f32, f32),
) {
    let dev = gpu();
    for (dtype, (tol_out, tol_grad)) in [(DType::F32, tol), (DType::BF16, (2e-2, 5e-2))] {
        let run = |device: &Device, dt: DType| {
            let vars: Vec<Option<Var>> = inputs
                .iter()
                .map(|(t, train)| {
                    train.then(|| {
                        Var::from_tensor(&t.to_dtype(dt).unwrap().to_device(device).unwrap())
                            .unwrap()
                    })
                })
                .collect();
            let ts: Vec<Tensor> = inputs
                .iter()
                .zip(&vars)
                .map(|((t, _), v)| match v {
                    Some(v) => v.as_tensor().clone(),
                    None => {
                        let t = t.to_device(device).unwrap();
                        if t.dtype() == DType::F32 {
                            t.to_dtype(dt).unwrap()
                        } else {
                            t
                        }
                    }
                })
                .collect();
            let y = f(&ts).unwrap();
            let probe = Tensor::from_vec(values(y.elem_count(), 77, 1.0), y.shape(), device)
                .unwrap()
                .to_dtype(y.dtype())
                .unwrap();
            let grads = (&y * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g: Vec<Option<Tensor>> = vars
                .iter()
                .map(|v| {
                    v.as_ref()
                        .map(|v| grads.get(v.as_tensor()).unwrap().clone())
                })
                .collect();
            (y, g)
        };
        let (y_ref, g_ref) = run(&Device::Cpu, DType::F32);
        let (y, g) = run(&dev, dtype);
        let e = max_rel(&y, &y_ref);
        eprintln!("{name} {dtype:?}: output max rel diff {e:.2e}");
        assert!(e <= tol_out, "{name} {dtype:?}: output differs by {e}");
        for (i, (a, b)) in g.iter().zip(&g_ref).enumerate() {
            if let (Some(a), Some(b)) = (a, b) {
                let e = max_rel(a, b);
                eprintln!("{name} {dtype:?}: grad {i} max rel diff {e:.2e}");
                assert!(
                    e <= tol_grad,
                    "{name} {dtype:?}: gradient {i} differs by {e}"
                );
            }
        }
    }
}

#[test]
fn rms_norm_matches_cpu() {
    compare(
        "rms_norm",
        &[
            (tensor(&[3, 37, 4096], 1, 2.0), true),
            (tensor(&[4096], 2, 1.0), true),
        ],
        &|t| ops::rms_norm(&t[0], &t[1], 1e-5),
        (1e-5, 1e-4),
    );
    compare(
        "rms_norm odd width",
        &[
            (tensor(&[5, 1000], 3, 2.0), true),
            (tensor(&[1000], 4, 1.0), true),
        ],
        &|t| ops::rms_norm(&t[0], &t[1], 1e-6),
        (1e-5, 1e-4),
    );
}

#[test]
fn layer_norm_matches_cpu() {
    compare(
        "layer_norm",
        &[
            (tensor(&[2, 50, 1152], 5, 3.0), true),
            (tensor(&[1152], 6, 1.0), true),
            (tensor(&[1152], 7, 1.0), true),
        ],
        &|t| ops::layer_norm(&t[0], &t[1], &t[2], 1e-6),
        (1e-5, 1e-4),
    );
}

#[test]
fn softmax_matches_cpu() {
    compare(
        "softmax",
        &[(tensor(&[2, 3, 17, 300], 8, 8.0), true)],
        &|t| ops::softmax_last(&t[0]),
        (1e-5, 1e-4),
    );
}

#[test]
fn silu_mul_matches_cpu() {
    compare(
        "silu_mul",
        &[
            (tensor(&[4, 33, 512], 9, 4.0), true),
            (tensor(&[4, 33, 512], 10, 2.0), true),
        ],
        &|t| ops::silu_mul(&t[0], &t[1]),
        (1e-5, 1e-4),
    );
}

#[test]
fn rope_matches_cpu() {
    let (b, t, h, dh) = (2, 19, 3, 64);
    let cos = tensor(&[b, 1, t, dh], 11, 1.0);
    let sin = tensor(&[b, 1, t, dh], 12, 1.0);
    compare(
        "rope",
        &[
            (tensor(&[b, t, h, dh], 13, 2.0), true),
            (cos, false),
            (sin, false),
        ],
        &|x| ops::rope_heads(&x[0], &x[1], &x[2]),
        (1e-5, 1e-5),
    );
}

#[test]
fn masked_attention_matches_the_mask_composition() {
    // Two packed samples (7 and 9 tokens) and 4 positions of padding in a row of 20, plus a
    // second row holding one sample.
    let cfg_segments = [vec![7usize, 9], vec![20]];
    let (b, h, t) = (2, 3, 20);
    let mut mask = vec![f32::NEG_INFINITY; b * t * t];
    let mut bounds = Vec::new();
    for (r, segs) in cfg_segments.iter().enumerate() {
        let mut all = segs.clone();
        let total: usize = segs.iter().sum();
        if total < t {
            all.push(t - total);
        }
        let mut start = 0;
        for len in all {
            for i in start..start + len {
                bounds.extend([start as u32, i as u32 + 1]);
                for j in start..=i {
                    mask[r * t * t + i * t + j] = 0.0;
                }
            }
            start += len;
        }
    }
    let mask = Tensor::from_vec(mask, (b, 1, t, t), &Device::Cpu).unwrap();
    let bounds = Tensor::from_vec(bounds, (b, t, 2), &Device::Cpu).unwrap();
    let scores = tensor(&[b, h, t, t], 14, 20.0);
    let dev = gpu();
    for dtype in [DType::F32, DType::BF16] {
        let s_cpu = Var::from_tensor(&scores).unwrap();
        let p_ref = ops::masked_attention_probs(s_cpu.as_tensor(), Some(&mask), None, 64).unwrap();
        let probe = tensor(&[b, h, t, t], 15, 1.0);
        let g_ref = (&p_ref * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g_ref = g_ref.get(s_cpu.as_tensor()).unwrap().clone();

        let s_gpu =
            Var::from_tensor(&scores.to_dtype(dtype).unwrap().to_device(&dev).unwrap()).unwrap();
        let bg = bounds.to_device(&dev).unwrap();
        let p = ops::masked_attention_probs(s_gpu.as_tensor(), None, Some(&bg), 64).unwrap();
        let pg = probe.to_dtype(dtype).unwrap().to_device(&dev).unwrap();
        let g = (&p * &pg).unwrap().sum_all().unwrap().backward().unwrap();
        let g = g.get(s_gpu.as_tensor()).unwrap().clone();
        let (to, tg) = if dtype == DType::F32 {
            (1e-5, 1e-4)
        } else {
            (2e-2, 5e-2)
        };
        let e = max_rel(&p, &p_ref);
        let eg = max_rel(&g, &g_ref);
        eprintln!("masked attention {dtype:?}: probs {e:.2e}, grad {eg:.2e}");
        assert!(e <= to && eg <= tg, "{dtype:?}: probs {e}, grad {eg}");
    }
}

#[test]
fn cross_entropy_matches_cpu() {
    let targets = Tensor::new(&[3u32, 0, 151_000, 77, 5, 9], &Device::Cpu).unwrap();
    compare(
        "cross_entropy",
        &[(tensor(&[6, 151_666], 16, 12.0), true), (targets, false)],
        &|t| ops::cross_entropy(&t[0], &t[1]),
        (1e-5, 1e-4),
    );
}

/// Device dropout masks: a pure function of the seed (so a recomputation replays it), values
/// 0 or 1/keep, and the keep rate as asked.
#[test]
fn dropout_masks_replay_from_their_seed() {
    let dev = gpu();
    let like = Tensor::zeros((1000, 1003), DType::BF16, &dev).unwrap();
    let keep = 0.95;
    let host = |t: &Tensor| {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let a = host(&ops::dropout_mask(&like, 7, keep).unwrap());
    let b = host(&ops::dropout_mask(&like, 7, keep).unwrap());
    let c = host(&ops::dropout_mask(&like, 8, keep).unwrap());
    assert_eq!(a, b, "same seed, same mask");
    assert_ne!(a, c, "another seed, another mask");
    let scale = half::bf16::from_f64(1.0 / keep).to_f32();
    assert!(a.iter().all(|&x| x == 0.0 || x == scale));
    let kept = a.iter().filter(|&&x| x != 0.0).count() as f64 / a.len() as f64;
    eprintln!("dropout keep rate {kept:.5} (asked {keep})");
    assert!((kept - keep).abs() < 2e-3, "{kept}");
}

/// The many-block sum of squares behind the gradient norm, against an f64 sum on the CPU.
#[test]
fn sum_of_squares_matches_cpu() {
    let dev = gpu();
    let x = tensor(&[1_000_003], 31, 3.0);
    let want: f64 = x
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|&v| v as f64 * v as f64)
        .sum();
    for dtype in [DType::F32, DType::BF16] {
        let xd = x.to_dtype(dtype).unwrap().to_device(&dev).unwrap();
        let got = cpmv_kernels::sum_squares(&xd)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        // bf16 rounds each element (relative 2^-9) before squaring.
        let want = if dtype == DType::F32 {
            want
        } else {
            x.to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|&v| v as f64 * v as f64)
                .sum()
        };
        let rel = ((got - want) / want).abs();
        eprintln!("sum_squares {dtype:?}: rel diff {rel:.2e}");
        assert!(rel < 1e-12, "{dtype:?}: {got} vs {want}");
    }
}

/// Bias + GELU (both variants) and the bias alone: the fused op and its column-sum bias
/// gradient against the broadcast-add composition. 2·129 rows (not a multiple of the kernel's
/// 8-row stride nor of its 256-row blocks) by 1000 columns (not a multiple of 32).
#[test]
fn bias_act_matches_cpu() {
    use cpmv_model::config::Gelu;
    for (name, gelu) in [
        ("bias", None),
        ("bias+gelu_tanh", Some(Gelu::Tanh)),
        ("bias+gelu_erf", Some(Gelu::Erf)),
    ] {
        compare(
            name,
            &[
                (tensor(&[2, 129, 1000], 41, 3.0), true),
                (tensor(&[1000], 42, 1.0), true),
            ],
            &|t| ops::bias_act(&t[0], &t[1], gelu),
            (1e-5, 1e-4),
        );
    }
}

/// u8 pixels normalised on the device through the 256-entry table: bit-identical to the host
/// path, padding included.
#[test]
fn u8_pixels_normalise_on_the_device_as_on_the_host() {
    use cpmv_model::image::{stack_patches, ImageInput};
    let dev = gpu();
    let img = |h: usize, w: usize, seed: u8| {
        let px: Vec<u8> = (0..h * w * 3)
            .map(|i| (i as u8).wrapping_mul(37).wrapping_add(seed))
            .collect();
        ImageInput::from_hwc_u8(&px, h, w, 14).unwrap()
    };
    let images = vec![img(42, 56, 1), img(28, 14, 2), img(42, 56, 3)];
    for dtype in [DType::F32, DType::BF16] {
        let a = stack_patches(&images, 12, dtype, &dev).unwrap();
        let b = stack_patches(&images, 12, dtype, &Device::Cpu).unwrap();
        let bits = |t: &Tensor| -> Vec<u32> {
            t.to_device(&Device::Cpu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        };
        assert_eq!(bits(&a), bits(&b), "{dtype:?}");
    }
}
