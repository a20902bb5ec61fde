//! The loss-curve PNG of a run, drawn from its `log.jsonl` with plotters into a memory buffer
//! and encoded with the `image` crate. The font (DejaVu Sans, shipped in crates/prep/assets/) is
//! embedded so the plot renders on any machine.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;

use crate::{LogError, RunLog, LOG_FILE};

/// Width of the loss-curve PNG in pixels.
pub const WIDTH: u32 = 1000;
/// Height of the loss-curve PNG in pixels.
pub const HEIGHT: u32 = 560;
/// Weight of the previous value in the smoothed curve's exponential moving average.
pub const EMA_WEIGHT: f64 = 0.9;

static FONT: Once = Once::new();

fn register_font() {
    FONT.call_once(|| {
        let bytes: &'static [u8] = include_bytes!("../../prep/assets/DejaVuSans.ttf");
        // Cannot fail for a valid embedded font; plotting falls back to no text if it did.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, bytes);
    });
}

/// The debiased exponential moving average TensorBoard's smoothing slider uses:
/// `m = w·m + (1−w)·y`, shown as `m / (1 − wⁿ)` after `n` points, so the curve starts at the
/// first value instead of rising from 0.
pub fn ema_debiased(ys: &[f64], w: f64) -> Vec<f64> {
    let mut m = 0.0;
    let mut wn = 1.0;
    ys.iter()
        .map(|&y| {
            m = w * m + (1.0 - w) * y;
            wn *= w;
            m / (1.0 - wn)
        })
        .collect()
}

fn finite(v: &serde_json::Value, key: &str) -> Option<f64> {
    v.get(key)
        .and_then(|x| x.as_f64())
        .filter(|x| x.is_finite())
}

/// Loss curve PNG (1000×560) of the run in `dir_with_log` (its `log.jsonl`): training loss per
/// step as a thin light line, its smoothed curve as a thick line, and the evaluation losses as
/// points joined by a thin line; x = step, y = loss, titled `title`.
///
/// Smoothing: the debiased exponential moving average with weight 0.9 ([`EMA_WEIGHT`],
/// [`ema_debiased`]), the same as TensorBoard's smoothing at 0.9. Non-finite losses (written as
/// `null`) are left out. Eval points come from `"kind":"eval"` lines and from train lines that
/// carry `eval_loss`.
pub fn loss_curve_png(dir_with_log: &Path, out_png: &Path, title: &str) -> Result<(), LogError> {
    let records = RunLog::read(dir_with_log)?;
    let mut train: Vec<(f64, f64)> = Vec::new();
    let mut eval: Vec<(f64, f64)> = Vec::new();
    for r in &records {
        let Some(step) = r.get("step").and_then(|s| s.as_f64()) else {
            continue;
        };
        match r.get("kind").and_then(|k| k.as_str()) {
            Some("train") => {
                if let Some(l) = finite(r, "loss") {
                    train.push((step, l));
                }
                if let Some(l) = finite(r, "eval_loss") {
                    eval.push((step, l));
                }
            }
            Some("eval") => {
                if let Some(l) = finite(r, "eval_loss") {
                    eval.push((step, l));
                }
            }
            _ => {}
        }
    }
    if train.is_empty() && eval.is_empty() {
        return Err(LogError::NoData {
            path: dir_with_log.join(LOG_FILE),
        });
    }
    train.sort_by(|a, b| a.0.total_cmp(&b.0));
    eval.sort_by(|a, b| a.0.total_cmp(&b.0));
    let smooth: Vec<(f64, f64)> = train
        .iter()
        .map(|p| p.0)
        .zip(ema_debiased(
            &train.iter().map(|p| p.1).collect::<Vec<_>>(),
            EMA_WEIGHT,
        ))
        .collect();

    let all = train.iter().chain(eval.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in all {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let pad = if y1 > y0 {
        (y1 - y0) * 0.05
    } else {
        (y0.abs() * 0.1).max(0.5)
    };
    let (y0, y1) = (y0 - pad, y1 + pad);

    let plot_err = |e: String| LogError::Plot {
        path: out_png.to_path_buf(),
        message: e,
    };
    register_font();
    let mut buf = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_err(e.to_string()))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(64)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|e| plot_err(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .label_style(("sans-serif", 15))
            .draw()
            .map_err(|e| plot_err(e.to_string()))?;
        let raw_color = RGBColor(160, 195, 230);
        let smooth_color = RGBColor(31, 90, 160);
        let eval_color = RGBColor(225, 105, 30);
        if !train.is_empty() {
            chart
                .draw_series(LineSeries::new(
                    train.iter().copied(),
                    raw_color.stroke_width(1),
                ))
                .map_err(|e| plot_err(e.to_string()))?
                .label("train loss")
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], raw_color.stroke_width(2))
                });
            chart
                .draw_series(LineSeries::new(
                    smooth.iter().copied(),
                    smooth_color.stroke_width(3),
                ))
                .map_err(|e| plot_err(e.to_string()))?
                .label(format!("train loss, EMA {EMA_WEIGHT} (debiased)"))
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], smooth_color.stroke_width(3))
                });
        }
        if !eval.is_empty() {
            chart
                .draw_series(LineSeries::new(
                    eval.iter().copied(),
                    eval_color.stroke_width(1),
                ))
                .map_err(|e| plot_err(e.to_string()))?;
            chart
                .draw_series(eval.iter().map(|&p| Circle::new(p, 5, eval_color.filled())))
                .map_err(|e| plot_err(e.to_string()))?
                .label("eval loss")
                .legend(move |(x, y)| Circle::new((x + 10, y), 5, eval_color.filled()));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font(("sans-serif", 16))
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .draw()
            .map_err(|e| plot_err(e.to_string()))?;
        root.present().map_err(|e| plot_err(e.to_string()))?;
    }
    let img = image::RgbImage::from_raw(WIDTH, HEIGHT, buf)
        .ok_or_else(|| plot_err("plot buffer size".to_string()))?;
    img.save_with_format(out_png, image::ImageFormat::Png)
        .map_err(|e| plot_err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ema_starts_at_first_value_and_converges() {
        let s = ema_debiased(&[2.0, 2.0, 2.0], 0.9);
        for v in s {
            assert!((v - 2.0).abs() < 1e-12);
        }
        let s = ema_debiased(&[1.0, 0.0], 0.9);
        assert_eq!(s[0], 1.0);
        // (0.9·0.1) / (1 − 0.81) = 0.09 / 0.19
        assert!((s[1] - 0.09 / 0.19).abs() < 1e-12);
    }
}
