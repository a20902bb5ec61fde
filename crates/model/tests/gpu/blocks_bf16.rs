//! The block path in bf16 on the GPU (`CPMV_TEST_DEVICE=cuda CPMV_CUDA_BLOCKS=1`): vision and
//! decoder layers of a bf16 model on the CUDA backend, held to the f32 autograd result within
//! twice the error of candle's own bf16 autograd path on the same layer (floor 1e-2 of the
//! largest magnitude), for the output, the input gradient and every parameter gradient, with
//! the same LoRA dropout masks in all three runs.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use cpmv_model::config::Fixes;
use cpmv_model::{synthetic, LoadOptions, MiniCpmV};

use crate::blocks::{fixture_dir, llm_setups, max_abs, rel_err, seeded, setups, Setup};

/// How far bf16 may stray: this factor times candle bf16's own error, at least the floor.
const FACTOR: f32 = 2.0;
const FLOOR: f32 = 1e-2;

fn f32_of(t: &Tensor) -> Tensor {
    t.to_dtype(DType::F32).unwrap()
}

/// Holds the block path's bf16 result to the f32 reference, by candle bf16's error.
fn bounded(what: &str, block: &Tensor, candle: &Tensor, reference: &Tensor) {
    let eb = rel_err(&f32_of(block), reference);
    let ec = rel_err(&f32_of(candle), reference);
    let bound = (FACTOR * ec).max(FLOOR);
    println!("{what}: block bf16 {eb:.2e}, candle bf16 {ec:.2e}");
    assert!(
        eb <= bound,
        "{what}: block bf16 error {eb} over {bound} (candle bf16 {ec})"
    );
}

fn load(version: &str, s: &Setup, dtype: DType) -> MiniCpmV {
    let opts = LoadOptions {
        trainable: s.trainable,
        lora: s.lora.clone(),
        seed: 7,
        fixes: Fixes::default(),
        device: crate::blocks::device(),
        dtype,
        ..Default::default()
    };
    let m = MiniCpmV::load(&fixture_dir(version), &opts).unwrap();
    assert!(m.vision_on_blocks(), "the block path is off for {dtype:?}");
    m
}

/// Every parameter gradient of the three runs, matched by name. `zero_key_bias`: the vision
/// layers' key-bias gradients are analytically zero (no rotary positions between the bias and
/// the scores), so the block path's is held to rounding noise against the layer's gradients.
fn compare_grads(
    what: &str,
    zero_key_bias: bool,
    m32: &MiniCpmV,
    m16: &MiniCpmV,
    reference: &GradStore,
    candle: &GradStore,
    block: &[(Tensor, Tensor)],
) {
    let vars32 = m32.params().trainable_vars();
    let vars16 = m16.params().trainable_vars();
    let scale = vars32
        .iter()
        .filter_map(|(_, v)| reference.get(v.as_tensor()))
        .map(max_abs)
        .fold(0f32, f32::max);
    let mut want = 0;
    for (name, v32) in &vars32 {
        let Some(g_ref) = reference.get(v32.as_tensor()) else {
            continue;
        };
        want += 1;
        let v16 = &vars16.iter().find(|(n, _)| n == name).unwrap().1;
        let g_c = candle
            .get(v16.as_tensor())
            .unwrap_or_else(|| panic!("{what}: {name}"));
        let g_b = &block
            .iter()
            .find(|(p, _)| p.id() == v16.as_tensor().id())
            .unwrap_or_else(|| panic!("{what}: no block gradient for {name}"))
            .1;
        if zero_key_bias && name.ends_with("k_proj.bias") {
            let noise = max_abs(&f32_of(g_b));
            assert!(
                noise <= FLOOR * scale,
                "{what}: {name} gradient {noise} (scale {scale})"
            );
            continue;
        }
        bounded(&format!("{what}: {name}"), g_b, g_c, g_ref);
    }
    assert!(want > 0, "{what}: nothing trains");
    assert_eq!(block.len(), want, "{what}: gradients of other tensors");
}

/// The three runs of one layer: block path bf16, candle bf16, candle f32 (the reference).
struct Runs<'a> {
    /// Outputs: block, candle, reference.
    y: [&'a Tensor; 3],
    /// The layer inputs of the candle runs (bf16, f32), keys of their input gradients.
    inputs: [&'a Var; 2],
    /// Gradients of the candle runs (bf16, f32).
    grads: [&'a GradStore; 2],
    block_grads: &'a [(Tensor, Tensor)],
    /// Vision layers: key-bias gradients are analytically zero.
    zero_key_bias: bool,
}

impl Runs<'_> {
    /// Output, input gradient (`gx` of the block path) and every parameter gradient.
    fn compare(&self, what: &str, gx: &Tensor, m32: &MiniCpmV, m16: &MiniCpmV) {
        let [y_b, y_c, y_ref] = self.y;
        bounded(&format!("{what} output"), y_b, y_c, y_ref);
        let gx_c = self.grads[0].get(self.inputs[0].as_tensor()).unwrap();
        let gx_ref = self.grads[1].get(self.inputs[1].as_tensor()).unwrap();
        bounded(&format!("{what} input gradient"), gx, gx_c, gx_ref);
        let [g_c, g_ref] = self.grads;
        compare_grads(
            what,
            self.zero_key_bias,
            m32,
            m16,
            g_ref,
            g_c,
            self.block_grads,
        );
    }
}

fn check_vision(version: &str) {
    for s in setups() {
        let (m32, m16) = (
            load(version, &s, DType::F32),
            load(version, &s, DType::BF16),
        );
        let cfg = m32.config().clone();
        let batch = synthetic::batch(&cfg, 1, 3, 8, &[(2, 3), (4, 4), (1, 2)], 11);
        let in32 = m32.vision_embed(&batch.images, true).unwrap();
        let in16 = m16.vision_embed(&batch.images, true).unwrap();
        let mut x = in32.x.detach();
        for i in 0..m32.vision_num_layers() {
            let what = format!("{version} vision [{}] layer {i}", s.name);
            let gy = seeded(x.dims(), 100 + i as u64, x.device());
            let gy16 = gy.to_dtype(DType::BF16).unwrap();
            let state = m32.dropout_state();

            let xv = Var::from_tensor(&x).unwrap();
            let y_ref = m32
                .vision_layer(i, xv.as_tensor(), in32.mask.as_ref(), true)
                .unwrap();
            let g_ref = cpmv_model::ops::backward_with(&y_ref, &gy).unwrap();

            m16.set_dropout_state(state);
            let xv16 = Var::from_tensor(&x.to_dtype(DType::BF16).unwrap()).unwrap();
            let y_c = m16
                .vision_layer(i, xv16.as_tensor(), in16.mask.as_ref(), true)
                .unwrap();
            let g_c = cpmv_model::ops::backward_with(&y_c, &gy16).unwrap();

            m16.set_dropout_state(state);
            let x16 = x.to_dtype(DType::BF16).unwrap();
            let (y_b, st) = m16
                .vision_block_forward(i, &x16, &in16, true, true)
                .unwrap();
            let (gx_b, pg) = m16.vision_block_backward(&st.unwrap(), &gy16).unwrap();
            assert_eq!(y_b.dtype(), DType::BF16);

            let runs = Runs {
                y: [&y_b, &y_c, &y_ref],
                inputs: [&xv16, &xv],
                grads: [&g_c, &g_ref],
                block_grads: &pg,
                zero_key_bias: true,
            };
            runs.compare(&what, &gx_b, &m32, &m16);
            x = y_ref.detach();
        }
    }
}

fn check_llm(version: &str) {
    for s in llm_setups() {
        let (m32, m16) = (
            load(version, &s, DType::F32),
            load(version, &s, DType::BF16),
        );
        let cfg = m32.config().clone();
        let batch = synthetic::batch(&cfg, 2, 3, 6, &[(2, 2), (1, 3)], 13);
        let (aux32, aux16) = (m32.llm_aux(&batch).unwrap(), m16.llm_aux(&batch).unwrap());
        let mut x = m32.input_embeddings(&batch, true).unwrap().detach();
        for i in 0..m32.llm().num_layers() {
            let what = format!("{version} LLM [{}] layer {i}", s.name);
            let gy = seeded(x.dims(), 200 + i as u64, x.device());
            let gy16 = gy.to_dtype(DType::BF16).unwrap();
            let state = m32.dropout_state();

            let xv = Var::from_tensor(&x).unwrap();
            let y_ref = m32.layer_forward(i, xv.as_tensor(), &aux32, true).unwrap();
            let g_ref = cpmv_model::ops::backward_with(&y_ref, &gy).unwrap();

            m16.set_dropout_state(state);
            let xv16 = Var::from_tensor(&x.to_dtype(DType::BF16).unwrap()).unwrap();
            let y_c = m16
                .layer_forward(i, xv16.as_tensor(), &aux16, true)
                .unwrap();
            let g_c = cpmv_model::ops::backward_with(&y_c, &gy16).unwrap();

            m16.set_dropout_state(state);
            let x16 = x.to_dtype(DType::BF16).unwrap();
            let (y_b, st) = m16.llm_block_forward(i, &x16, &aux16, true, true).unwrap();
            let (gx_b, pg) = m16.llm_block_backward(&st.unwrap(), &aux16, &gy16).unwrap();

            let runs = Runs {
                y: [&y_b, &y_c, &y_ref],
                inputs: [&xv16, &xv],
                grads: [&g_c, &g_ref],
                block_grads: &pg,
                zero_key_bias: false,
            };
            runs.compare(&what, &gx_b, &m32, &m16);
            x = y_ref.detach();
        }
    }
}

#[test]
fn v2_0_vision_and_decoder_blocks_in_bf16() {
    check_vision("v2_0");
    check_llm("v2_0");
}

#[test]
fn v2_6_vision_and_decoder_blocks_in_bf16() {
    check_vision("v2_6");
    check_llm("v2_6");
}
