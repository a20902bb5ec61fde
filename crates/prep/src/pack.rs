//! Grouping samples into packs of at most `max_length` tokens (and a bounded number of image
//! slices), so the trainer runs full-length rows with block-diagonal attention instead of padding.
//!
//! Best-fit decreasing inside a bounded window of consecutive samples: deterministic (it depends
//! only on the samples, never on thread timing) and memory-bounded (a window is flushed when it
//! holds `window` samples or `window_bytes` of pixels). Packing needs only each sample's length,
//! slice count and pixel size ([`Packable`]), so `prep build` packs samples before their pixels
//! exist and makes the pixels of a pack only when it is written.

use cpmv_shard::Sample;

/// What packing reads of a sample.
pub trait Packable {
    /// Tokens (the row's length in a pack).
    fn num_tokens(&self) -> usize;
    /// Image slices (vision-tower inputs).
    fn num_slices(&self) -> usize;
    /// Bytes of pixel data the sample's row will carry (what bounds a window).
    fn pixel_bytes(&self) -> usize;
}

impl Packable for Sample {
    fn num_tokens(&self) -> usize {
        Sample::num_tokens(self)
    }
    fn num_slices(&self) -> usize {
        self.tgt_sizes.len()
    }
    fn pixel_bytes(&self) -> usize {
        Sample::pixel_bytes(self)
    }
}

/// Packing limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackConfig {
    /// false: one sample per pack, in input order.
    pub enabled: bool,
    pub max_length: usize,
    /// Upper bound on image slices (vision-tower inputs) per pack; 0 = no bound.
    pub max_slices: usize,
    /// Samples per packing window.
    pub window: usize,
    /// Pixel bytes per packing window.
    pub window_bytes: usize,
}

/// Collects samples and emits packs.
pub struct Packer<T> {
    cfg: PackConfig,
    window: Vec<T>,
    window_bytes: usize,
}

impl<T: Packable> Packer<T> {
    pub fn new(cfg: PackConfig) -> Self {
        Self {
            cfg,
            window: Vec::new(),
            window_bytes: 0,
        }
    }

    /// Adds a sample; returns the packs that became final (possibly none).
    pub fn push(&mut self, s: T) -> Vec<Vec<T>> {
        if !self.cfg.enabled {
            return vec![vec![s]];
        }
        self.window_bytes += s.pixel_bytes();
        self.window.push(s);
        if self.window.len() >= self.cfg.window.max(1) || self.window_bytes >= self.cfg.window_bytes
        {
            self.flush()
        } else {
            Vec::new()
        }
    }

    /// Packs whatever is buffered.
    pub fn flush(&mut self) -> Vec<Vec<T>> {
        let samples = std::mem::take(&mut self.window);
        self.window_bytes = 0;
        best_fit_decreasing(samples, self.cfg.max_length, self.cfg.max_slices)
    }
}

/// Packs `samples` best-fit decreasing by token count: each sample (longest first, ties in input
/// order) goes into the open pack it fills most tightly, or opens a new pack. Packs come out in
/// the order they were opened, rows in the order they were placed.
pub fn best_fit_decreasing<T: Packable>(
    samples: Vec<T>,
    max_len: usize,
    max_slices: usize,
) -> Vec<Vec<T>> {
    let mut order: Vec<usize> = (0..samples.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(samples[i].num_tokens()), i));
    struct Open {
        rows: Vec<usize>,
        tokens: usize,
        slices: usize,
    }
    let mut packs: Vec<Open> = Vec::new();
    for i in order {
        let (t, sl) = (samples[i].num_tokens(), samples[i].num_slices());
        let fits =
            |p: &Open| p.tokens + t <= max_len && (max_slices == 0 || p.slices + sl <= max_slices);
        let best = packs
            .iter()
            .enumerate()
            .filter(|(_, p)| fits(p))
            .min_by_key(|(k, p)| (max_len - p.tokens - t, *k))
            .map(|(k, _)| k);
        match best {
            Some(k) => {
                packs[k].rows.push(i);
                packs[k].tokens += t;
                packs[k].slices += sl;
            }
            None => packs.push(Open {
                rows: vec![i],
                tokens: t,
                slices: sl,
            }),
        }
    }
    let mut slots: Vec<Option<T>> = samples.into_iter().map(Some).collect();
    packs
        .into_iter()
        .map(|p| {
            p.rows
                .into_iter()
                .map(|i| slots[i].take().expect("each sample placed once"))
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(id: &str, tokens: usize, slices: usize) -> Sample {
        Sample {
            id: id.into(),
            input_ids: vec![0; tokens],
            labels: vec![0; tokens],
            tgt_sizes: vec![[1, 1]; slices],
            pixel_values: vec![vec![0; 3]; slices],
            ..Default::default()
        }
    }

    fn ids(packs: &[Vec<Sample>]) -> Vec<Vec<&str>> {
        packs
            .iter()
            .map(|p| p.iter().map(|s| s.id.as_str()).collect())
            .collect()
    }

    #[test]
    fn best_fit_decreasing_fills_tightly() {
        let packs = best_fit_decreasing(
            vec![
                s("a", 6, 0),
                s("b", 5, 0),
                s("c", 4, 0),
                s("d", 3, 0),
                s("e", 2, 0),
            ],
            10,
            0,
        );
        // a(6) → P0; b(5) → P1; c(4) → P0 (10); d(3) → P1 (8); e(2) → P1 (10).
        assert_eq!(ids(&packs), vec![vec!["a", "c"], vec!["b", "d", "e"]]);
        let total: usize = packs.iter().flatten().map(Sample::num_tokens).sum();
        assert_eq!(total, 20);
    }

    #[test]
    fn slice_cap_and_oversized_samples() {
        let packs = best_fit_decreasing(vec![s("a", 2, 3), s("b", 2, 3), s("c", 20, 0)], 10, 4);
        assert_eq!(ids(&packs), vec![vec!["c"], vec!["a"], vec!["b"]]);
    }

    #[test]
    fn window_bounds_buffering_and_no_pack_keeps_order() {
        let cfg = PackConfig {
            enabled: true,
            max_length: 100,
            max_slices: 0,
            window: 2,
            window_bytes: usize::MAX,
        };
        let mut p = Packer::new(cfg);
        assert!(p.push(s("a", 1, 0)).is_empty());
        assert_eq!(ids(&p.push(s("b", 1, 0))), vec![vec!["a", "b"]]);
        assert!(p.flush().is_empty());
        let mut p = Packer::new(PackConfig {
            enabled: false,
            ..cfg
        });
        assert_eq!(ids(&p.push(s("x", 50, 0))), vec![vec!["x"]]);
    }
}
