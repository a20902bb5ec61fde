//! The text that stands for an image in the conversation (spec §3): runs of `<unk>` between
//! start/end tokens, one run per overview and per slice, which the model overwrites with vision
//! features.

use cpmv_image::SlicePlan;

/// How 2.6 numbers its images (shared with the manifest's settings).
pub use cpmv_shard::settings::ImageIdMode;

/// Builds placeholders for one sample, keeping the per-sample image-id counter.
pub struct PlaceholderBuilder<'a> {
    pub query_num: u32,
    pub unk: &'a str,
    pub new_schema: bool,
    pub id_mode: ImageIdMode,
    sliced_seen: usize,
    images_seen: usize,
}

impl<'a> PlaceholderBuilder<'a> {
    pub fn new(query_num: u32, unk: &'a str, new_schema: bool, id_mode: ImageIdMode) -> Self {
        Self {
            query_num,
            unk,
            new_schema,
            id_mode,
            sliced_seen: 0,
            images_seen: 0,
        }
    }

    fn run(&self, start: &str, end: &str, out: &mut String) {
        out.push_str(start);
        for _ in 0..self.query_num {
            out.push_str(self.unk);
        }
        out.push_str(end);
    }

    /// The placeholder of the next image of the sample (call in model order).
    pub fn next(&mut self, plan: &SlicePlan) -> String {
        let mut out = String::new();
        let index = self.images_seen;
        self.images_seen += 1;
        if self.new_schema {
            let id = match (self.id_mode, plan.grid) {
                (ImageIdMode::Reference, Some(_)) => {
                    self.sliced_seen += 1;
                    Some(self.sliced_seen - 1)
                }
                (ImageIdMode::Reference, None) => None,
                (ImageIdMode::Inference, _) => Some(index),
            };
            if let Some(id) = id {
                out.push_str(&format!("<image_id>{id}</image_id>"));
            }
        }
        self.run("<image>", "</image>", &mut out);
        if let Some((cols, rows)) = plan.grid {
            let (start, end) = if self.new_schema {
                ("<slice>", "</slice>")
            } else {
                ("<image>", "</image>")
            };
            if !self.new_schema {
                out.push_str("<slice>");
            }
            for r in 0..rows {
                if r > 0 {
                    out.push('\n');
                }
                for _ in 0..cols {
                    self.run(start, end, &mut out);
                }
            }
            if !self.new_schema {
                out.push_str("</slice>");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(grid: Option<(u32, u32)>) -> SlicePlan {
        SlicePlan {
            source: (448, 448),
            grid,
            refine: grid.map(|(c, r)| (448 * c, 448 * r)),
        }
    }

    #[test]
    fn old_schema_wraps_slices_in_one_slice_pair() {
        let mut b = PlaceholderBuilder::new(2, "<unk>", false, ImageIdMode::Reference);
        assert_eq!(b.next(&plan(None)), "<image><unk><unk></image>");
        assert_eq!(
            b.next(&plan(Some((2, 2)))),
            "<image><unk><unk></image><slice><image><unk><unk></image><image><unk><unk></image>\n<image><unk><unk></image><image><unk><unk></image></slice>"
        );
    }

    #[test]
    fn new_schema_ids_only_sliced_images_in_reference_mode() {
        let mut b = PlaceholderBuilder::new(1, "<unk>", true, ImageIdMode::Reference);
        let a = b.next(&plan(Some((2, 1))));
        assert_eq!(
            a,
            "<image_id>0</image_id><image><unk></image><slice><unk></slice><slice><unk></slice>"
        );
        assert_eq!(b.next(&plan(None)), "<image><unk></image>");
        assert!(b
            .next(&plan(Some((1, 2))))
            .starts_with("<image_id>1</image_id>"));

        let mut b = PlaceholderBuilder::new(1, "<unk>", true, ImageIdMode::Inference);
        b.next(&plan(Some((2, 1))));
        assert_eq!(
            b.next(&plan(None)),
            "<image_id>1</image_id><image><unk></image>"
        );
    }
}
