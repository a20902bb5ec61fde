//! The PNG histogram of `prep stats --plot`: total tokens per sample, the chosen max length
//! marked. Drawn with plotters into a memory buffer and encoded with the `image` crate; the font
//! (DejaVu Sans, free licence in assets/) is embedded so the plot renders on any machine.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;

use crate::stats::StatsReport;

static FONT: Once = Once::new();

fn register_font() {
    FONT.call_once(|| {
        let bytes: &'static [u8] = include_bytes!("../assets/DejaVuSans.ttf");
        // Cannot fail for a valid embedded font; plotting falls back to no text if it did.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, bytes);
    });
}

/// Writes the histogram of `report` (total tokens per sample) to `path` as PNG.
pub fn histogram_png(report: &StatsReport, title: &str, path: &Path) -> Result<(), String> {
    register_font();
    let (w, h) = (1000u32, 560u32);
    let mut buf = vec![255u8; (w * h * 3) as usize];
    let bin = report.histogram.bin_width.max(1) as u64;
    let counts = &report.histogram.counts;
    let x_max = (counts.len() as u64 * bin).max(report.max_length as u64 + bin);
    let y_max = counts.iter().copied().max().unwrap_or(1).max(1);
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(64)
            .build_cartesian_2d(0u64..x_max, 0u64..(y_max + y_max / 10 + 1))
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("total tokens per sample")
            .y_desc("samples")
            .label_style(("sans-serif", 15))
            .draw()
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(counts.iter().enumerate().map(|(i, &c)| {
                let x0 = i as u64 * bin;
                let style = if x0 + bin > report.max_length as u64 {
                    RGBColor(230, 120, 100).filled()
                } else {
                    RGBColor(70, 130, 180).filled()
                };
                Rectangle::new([(x0, 0), (x0 + bin, c)], style)
            }))
            .map_err(|e| e.to_string())?;
        let ml = report.max_length as u64;
        chart
            .draw_series(LineSeries::new(
                [(ml, 0), (ml, y_max + y_max / 10)],
                RED.stroke_width(3),
            ))
            .map_err(|e| e.to_string())?
            .label(format!(
                "--max-length {} ({:.1}% of samples longer)",
                ml,
                report
                    .length_loss
                    .iter()
                    .find(|l| l.max_length == report.max_length)
                    .map_or(0.0, |l| 100.0 * l.samples_lost_share)
            ))
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED.stroke_width(3)));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperMiddle)
            .label_font(("sans-serif", 16))
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    let img = image::RgbImage::from_raw(w, h, buf).ok_or("plot buffer size")?;
    img.save_with_format(path, image::ImageFormat::Png)
        .map_err(|e| format!("{}: {e}", path.display()))
}
