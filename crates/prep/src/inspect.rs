//! `prep inspect`: one sample of a shard set, decoded back to text the way a person can check
//! it: placeholder runs folded, the tokens that carry loss marked, bounds and slice sizes
//! listed, slices written as PNG on request.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use crate::tokenizer::{TextTokenizer, TokenizerKind};
use cpmv_shard::{SampleView, ShardDir};

use crate::build::BuildError;

/// Which sample to show and how.
#[derive(Clone, Debug)]
pub struct InspectOptions {
    pub shards: PathBuf,
    pub id: Option<String>,
    pub index: Option<usize>,
    /// Tokenizer directory (default: the manifest's model directory).
    pub model: Option<PathBuf>,
    pub dump_images: Option<PathBuf>,
    /// ANSI colours for supervised text (default: when stdout is a terminal).
    pub color: Option<bool>,
}

const GREEN: &str = "\x1b[32m";
const YELLOW: &str = "\x1b[33m";
const RESET: &str = "\x1b[0m";

/// Renders `row`'s tokens: runs inside image bounds folded to `[N × <tok>]`; tokens that are
/// prediction targets (the previous position has a label) shown in green, or inside `[[…]]`
/// without colour; a label that is not the next token (the reference's extra end-of-turn
/// targets) shown as `{→tok}` after the position that learns it.
pub fn render_tokens(tok: &TextTokenizer, row: &SampleView<'_>, color: bool) -> String {
    let ids: Vec<u32> = row.input_ids.iter().map(|&v| v as u32).collect();
    let n = ids.len();
    let learned = |i: usize| i > 0 && row.labels[i - 1] == row.input_ids[i];
    let token_str = |id: u32| tok.id_to_token(id).unwrap_or_else(|| format!("<{id}>"));
    let decode = |s: &[u32]| tok.decode(s, false).unwrap_or_else(|_| format!("{s:?}"));
    let (open, close) = if color { (GREEN, RESET) } else { ("[[", "]]") };
    let mut out = String::new();
    let mut i = 0;
    while i < n {
        if let Some(b) = row.image_bound.iter().find(|b| b[0] as usize == i) {
            let len = (b[1] - b[0]) as usize;
            let folded = format!("[{len} × {}]", token_str(ids[i]));
            if color {
                out.push_str(&format!("{YELLOW}{folded}{RESET}"));
            } else {
                out.push_str(&folded);
            }
            i += len.max(1);
            continue;
        }
        // A run of tokens with the same supervision state, up to the next image run or extra
        // target.
        let state = learned(i);
        let mut j = i;
        loop {
            let extra =
                row.labels[j] != -100 && (j + 1 == n || row.labels[j] != row.input_ids[j + 1]);
            j += 1;
            if extra
                || j == n
                || learned(j) != state
                || row.image_bound.iter().any(|b| b[0] as usize == j)
            {
                break;
            }
        }
        let text = decode(&ids[i..j]);
        if state {
            out.push_str(open);
            out.push_str(&text);
            out.push_str(close);
        } else {
            out.push_str(&text);
        }
        let last = j - 1;
        if row.labels[last] != -100 && (j == n || row.labels[last] != row.input_ids[j]) {
            out.push_str(&format!("{{→{}}}", token_str(row.labels[last] as u32)));
        }
        i = j;
    }
    out
}

/// Refuses a `--dump-images` directory that is `--shards` or lies inside it (symlinks
/// resolved): PNG files there would make the shard directory hold files `prep build` did not
/// write (so `--overwrite` refuses it). A folder that contains the shard directory is fine:
/// the PNG names never collide with it.
fn refuse_dump_into_shards(dump: &Path, shards: &Path) -> Result<(), BuildError> {
    let (d, s) = (cpmv_fsio::resolve(dump)?, cpmv_fsio::resolve(shards)?);
    let relation = if d == s {
        "is"
    } else if d.starts_with(&s) {
        "lies inside"
    } else {
        return Ok(());
    };
    Err(BuildError::Setup(format!(
        "--dump-images {} {relation} --shards {} ({}); writing images there would add \
         foreign files to the shard set: choose a directory outside it",
        dump.display(),
        shards.display(),
        s.display()
    )))
}

/// Finds the sample, renders the report and writes slices when asked.
pub fn inspect(opts: &InspectOptions) -> Result<String, BuildError> {
    if let Some(dump) = &opts.dump_images {
        refuse_dump_into_shards(dump, &opts.shards)?;
    }
    let dir = ShardDir::open(&opts.shards)?;
    let found = match (&opts.id, opts.index) {
        (Some(id), _) => dir.find_id(id)?.ok_or_else(|| {
            BuildError::Setup(format!(
                "no sample with id {id:?} in {}",
                opts.shards.display()
            ))
        })?,
        (None, Some(k)) => dir.sample(k)?.ok_or_else(|| {
            BuildError::Setup(format!("index {k} is past the end ({} samples)", dir.len()))
        })?,
        (None, None) => return Err(BuildError::Setup("give --id or --index".into())),
    };
    let row = found.view();
    row.check()
        .map_err(|e| BuildError::Setup(format!("{}: {e}", opts.shards.display())))?;
    let model_dir = opts
        .model
        .clone()
        .unwrap_or_else(|| PathBuf::from(&dir.manifest.model.dir));
    let llm = dir.manifest.settings.sample.llm_type;
    let kind = std::fs::read_to_string(model_dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .map_or(TokenizerKind::Json, |cfg| {
            cpmv_shard::fingerprint::tokenizer_kind(&model_dir, llm, &cfg)
        });
    let (tok, _) = TextTokenizer::load(&model_dir, kind)
        .map_err(|(path, e)| BuildError::Setup(format!("{path}: {e} (pass --model DIR)")))?;
    let color = opts.color.unwrap_or_else(|| {
        std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
    });
    let supervised = row.labels.iter().filter(|&&l| l != -100).count();
    let mut s = format!(
        "id {}  pack {}  {} tokens, {} supervised, {} slices\n\n",
        row.id,
        row.pack,
        row.num_tokens,
        supervised,
        row.tgt_sizes.len()
    );
    s.push_str(&render_tokens(&tok, &row, color));
    s.push_str("\n\n");
    if color {
        s.push_str(&format!("({GREEN}green{RESET}: tokens the model learns to predict; {{→x}}: an extra target x)\n"));
    } else {
        s.push_str("([[…]]: tokens the model learns to predict; {→x}: an extra target x)\n");
    }
    let patch = dir.manifest.settings.sample.patch_size as i32;
    for (k, (b, t)) in row.image_bound.iter().zip(&row.tgt_sizes).enumerate() {
        s.push_str(&format!(
            "slice {k:>2}: tokens [{}, {})  {}x{} px  ({} x {} patches)\n",
            b[0],
            b[1],
            t[1] * patch,
            t[0] * patch,
            t[0],
            t[1]
        ));
    }
    if let Some(out) = &opts.dump_images {
        std::fs::create_dir_all(out).map_err(|e| BuildError::Io {
            path: out.clone(),
            source: e,
        })?;
        let safe: String = row
            .id
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        // Stored slices, or (`--pixels source`) the slices the trainer makes of the files.
        let pixels = dir.pixels(&row)?;
        for (k, (px, t)) in pixels.iter().zip(&row.tgt_sizes).enumerate() {
            let (w, h) = ((t[1] * patch) as u32, (t[0] * patch) as u32);
            let path = out.join(format!("{safe}-slice-{k:02}.png"));
            let img = image::RgbImage::from_raw(w, h, px.to_vec()).ok_or_else(|| {
                BuildError::Setup(format!("slice {k} has {} bytes, not {w}x{h}x3", px.len()))
            })?;
            img.save_with_format(&path, image::ImageFormat::Png)
                .map_err(|e| BuildError::Setup(format!("{}: {e}", path.display())))?;
            s.push_str(&format!("wrote {}\n", path.display()));
        }
    }
    Ok(s)
}
