//! The pixel floor of `prep build`: decoding (and optionally slicing) every image the samples of a
//! data file reference, with our own decoder, on N rayon threads.
//!
//! ```text
//! cargo bench --bench decode_floor -- --data .bench/data/train.json --threads 2 [--mode decode]
//! target/release/deps/decode_floor-HASH --data ... --threads 1 --mode slice
//! ```
//!
//! Modes:
//! * `decode`: `cpmv_image::decode` only (the floor: no prep can be faster than decoding its
//!   input). Prints `{"mode","threads","samples","images","image_bytes","seconds",...}`.
//! * `slice`: decode + `slice_image_into` (the overview, then the refine image resized straight
//!   into its slices, appended to one buffer): all the pixel work `prep build` does.
//! * `phases`: one thread, the whole per-sample pipeline of `prep build` split into timed
//!   phases (read+probe+parse+placeholders+template+tokenize, decode, overview resize, refine
//!   resize, crop, Arrow shard write; `--model` and `--out` required). Prints seconds per phase.
//!
//! Every image reference counts (a file used by three samples is decoded three times), as in
//! `prep build`. File bytes are read before the clock starts (they come from the page cache in
//! `prep build` too; `read_seconds` reports the cost); only decoding / slicing is timed. A
//! checksum of the output pixels keeps the work from being optimised away.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rayon::prelude::*;
use serde_json::Value;

use cpmv::image::{decode, resize_bicubic, slice_image_into, DecodeOptions, SliceConfig};

// The allocator `prep` runs with, set up the same way, so the floor is the same pixel work with
// the same memory behaviour (glibc's allocator hands large buffers back to the kernel, which
// then zeroes them again: up to a third of this benchmark's time on a VM).
#[global_allocator]
static GLOBAL: cpmv::prep::alloc::MiMalloc = cpmv::prep::alloc::MiMalloc;

struct Args {
    data: PathBuf,
    threads: usize,
    mode: String,
    reps: usize,
    model: Option<PathBuf>,
    out: Option<PathBuf>,
}

fn usage() -> ! {
    eprintln!(
        "usage: decode_floor --data FILE [--threads N] [--mode decode|slice|phases] [--reps R] \
         [--model DIR --out DIR (phases)]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        data: PathBuf::new(),
        threads: 1,
        mode: "decode".into(),
        reps: 1,
        model: None,
        out: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| usage());
        match k.as_str() {
            "--data" => a.data = v().into(),
            "--threads" => a.threads = v().parse().unwrap_or_else(|_| usage()),
            "--mode" => a.mode = v(),
            "--reps" => a.reps = v().parse().unwrap_or_else(|_| usage()),
            "--model" => a.model = Some(v().into()),
            "--out" => a.out = Some(v().into()),
            // `cargo bench` passes --bench to harness-less targets.
            "--bench" => {}
            _ => usage(),
        }
    }
    if a.data.as_os_str().is_empty() || a.threads == 0 || a.reps == 0 {
        usage()
    }
    a
}

/// Image paths of every sample, in sample order, resolved against the data file's folder.
fn image_refs(data: &Path) -> (usize, Vec<PathBuf>) {
    let text = std::fs::read(data).unwrap_or_else(|e| panic!("{}: {e}", data.display()));
    let samples: Vec<Value> = serde_json::from_slice(&text).expect("a JSON list of samples");
    let base = data.parent().unwrap_or(Path::new("."));
    let mut refs = Vec::new();
    for s in &samples {
        match s.get("image") {
            Some(Value::String(p)) => refs.push(base.join(p)),
            Some(Value::Object(m)) => {
                refs.extend(m.values().filter_map(Value::as_str).map(|p| base.join(p)))
            }
            _ => {}
        }
    }
    (samples.len(), refs)
}

fn checksum(data: &[u8]) -> u64 {
    // A few bytes spread over the buffer: enough to depend on the output, cheap to compute.
    let n = data.len();
    [0, n / 3, n / 2, n - 1]
        .iter()
        .map(|&i| data[i] as u64)
        .sum::<u64>()
        + n as u64
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    cpmv::prep::alloc::keep_freed_memory();
    let args = parse_args();
    if args.mode == "phases" {
        phases(&args);
        return;
    }
    let (samples, refs) = image_refs(&args.data);
    let t_read = Instant::now();
    let mut files: HashMap<PathBuf, Arc<Vec<u8>>> = HashMap::new();
    let bytes: Vec<Arc<Vec<u8>>> = refs
        .iter()
        .map(|p| {
            files
                .entry(p.clone())
                .or_insert_with(|| {
                    Arc::new(std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
                })
                .clone()
        })
        .collect();
    let read_seconds = t_read.elapsed().as_secs_f64();
    let image_bytes: usize = bytes.iter().map(|b| b.len()).sum();

    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build()
        .expect("thread pool");
    let opts = DecodeOptions::default();
    let cfg = SliceConfig::default();
    let slice = match args.mode.as_str() {
        "decode" => false,
        "slice" => true,
        _ => usage(),
    };
    let mut times = Vec::new();
    let mut sum = 0u64;
    let mut outputs = 0usize;
    for _ in 0..args.reps {
        let t = Instant::now();
        let (s, n) = pool.install(|| {
            bytes
                .par_iter()
                .map(|b| {
                    let img = decode(b, opts).expect("benchmark images decode");
                    if slice {
                        let mut out = Vec::new();
                        let plan = slice_image_into(&img, &cfg, &mut out);
                        (checksum(&out), plan.num_images())
                    } else {
                        (checksum(&img.data), 1)
                    }
                })
                .reduce(|| (0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
        });
        times.push(t.elapsed().as_secs_f64());
        sum = s;
        outputs = n;
    }
    let all = times.clone();
    let seconds = median(&mut times);
    println!(
        "{}",
        serde_json::json!({
            "mode": args.mode,
            "threads": args.threads,
            "samples": samples,
            "images": refs.len(),
            "outputs": outputs,
            "image_bytes": image_bytes,
            "read_seconds": read_seconds,
            "seconds": seconds,
            "all_seconds": all,
            "images_per_s": refs.len() as f64 / seconds,
            "samples_per_s": samples as f64 / seconds,
            "checksum": sum,
        })
    );
}

/// One thread, the per-sample pipeline of `prep build` (process.rs + the shard writer) split
/// into phases. Rows are written one sample per pack (packing itself is a sort of a few hundred
/// integers per window: negligible).
fn phases(args: &Args) {
    use cpmv::prep::config::PrepPreset;
    use cpmv::prep::input::SampleReader;
    use cpmv::prep::process::InputSource;
    use cpmv::prep::{build::resolve_settings, ModelDir, Processor};
    use cpmv::shard::{ShardSetWriter, WriterOptions};

    let model_dir = args.model.clone().unwrap_or_else(|| usage());
    let out = args.out.clone().unwrap_or_else(|| usage());
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).expect("create --out");

    let t_setup = Instant::now();
    let model = ModelDir::load(&model_dir, None).expect("model dir");
    let settings = resolve_settings(&model, &PrepPreset::default()).expect("settings");
    let cfg = cpmv::prep::process::slice_config(&settings);
    let processor = Processor::new(model, settings).expect("processor");
    let setup = t_setup.elapsed();
    let source = InputSource {
        path: args.data.clone(),
        stem: "train".into(),
        image_root: args.data.parent().unwrap_or(Path::new(".")).to_path_buf(),
    };
    let mut writer = ShardSetWriter::new(&out, WriterOptions::default());

    #[derive(Default)]
    struct T {
        read_json: Duration,
        read_files: Duration,
        probe: Duration,
        text: Duration,
        decode: Duration,
        resize_overview: Duration,
        resize_refine: Duration,
        crop: Duration,
        write: Duration,
    }
    let mut t = T::default();
    let (mut samples, mut images, mut outputs, mut pixel_bytes, mut rejected) = (0, 0, 0, 0, 0);
    let mut sum = 0u64;
    let t_all = Instant::now();
    let mut reader = SampleReader::open(&args.data, 0).expect("data file");
    loop {
        let c = Instant::now();
        let raw = match reader.next() {
            Some(r) => r.expect("sample"),
            None => break,
        };
        t.read_json += c.elapsed();
        samples += 1;

        // Text side: parse + placement + placeholders + template + tokenize + labels + bounds,
        // from image sizes only (as process.rs does); file reading and header probing apart.
        let c = Instant::now();
        let parsed = match processor.parse(&raw, &source) {
            Ok(p) => p,
            Err(_) => {
                rejected += 1;
                continue;
            }
        };
        t.text += c.elapsed();
        let mut files = Vec::new();
        let mut sizes = Vec::new();
        for path in &parsed.images {
            let c = Instant::now();
            let b = processor.read_image(&source, path).expect("image file");
            t.read_files += c.elapsed();
            let c = Instant::now();
            sizes.push(processor.image_size(path, &b).expect("image header"));
            t.probe += c.elapsed();
            files.push(b);
        }
        let c = Instant::now();
        let text = match processor.plan_text(&parsed, &sizes) {
            Ok(x) => x,
            Err(_) => {
                rejected += 1;
                continue;
            }
        };
        t.text += c.elapsed();

        let mut tgt_sizes = Vec::new();
        let mut pixel_values = Vec::new();
        for (b, plan) in files.iter().zip(&text.plans) {
            images += 1;
            let c = Instant::now();
            let img = decode(b, DecodeOptions::default()).expect("decode");
            t.decode += c.elapsed();
            let c = Instant::now();
            let overview = resize_bicubic(&img, plan.source.0, plan.source.1);
            t.resize_overview += c.elapsed();
            let mut outs = vec![overview];
            if let (Some((cols, rows)), Some((rw, rh))) = (plan.grid, plan.refine) {
                let c = Instant::now();
                let refine = resize_bicubic(&img, rw, rh);
                t.resize_refine += c.elapsed();
                let c = Instant::now();
                let (sw, sh) = (rw / cols, rh / rows);
                for r in 0..rows {
                    for col in 0..cols {
                        outs.push(refine.crop(col * sw, r * sh, sw, sh));
                    }
                }
                t.crop += c.elapsed();
            }
            let p = cfg.patch_size as i32;
            for o in outs {
                outputs += 1;
                pixel_bytes += o.data.len();
                sum += checksum(&o.data);
                tgt_sizes.push([o.height as i32 / p, o.width as i32 / p]);
                pixel_values.push(o.data);
            }
        }
        let c = Instant::now();
        writer
            .write_pack(
                samples as u32,
                vec![text.into_sample(tgt_sizes, pixel_values)],
            )
            .expect("write");
        t.write += c.elapsed();
    }
    let c = Instant::now();
    writer.finish().expect("finish shards");
    t.write += c.elapsed();
    let total = t_all.elapsed().as_secs_f64();
    let s = |d: Duration| d.as_secs_f64();
    let phases = serde_json::json!({
        "read_json": s(t.read_json),
        "read_files": s(t.read_files),
        "probe": s(t.probe),
        "text": s(t.text),
        "decode": s(t.decode),
        "resize_overview": s(t.resize_overview),
        "resize_refine": s(t.resize_refine),
        "crop": s(t.crop),
        "write": s(t.write),
    });
    let accounted: f64 = phases
        .as_object()
        .unwrap()
        .values()
        .filter_map(Value::as_f64)
        .sum();
    println!(
        "{}",
        serde_json::json!({
            "mode": "phases",
            "threads": 1,
            "samples": samples,
            "rejected": rejected,
            "images": images,
            "outputs": outputs,
            "pixel_bytes_written": pixel_bytes,
            "setup_seconds": s(setup),
            "seconds": total,
            "unaccounted_seconds": total - accounted,
            "phases": phases,
            "checksum": sum,
        })
    );
    let _ = std::fs::remove_dir_all(&out);
}
