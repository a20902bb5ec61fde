//! Talk to a MiniCPM-V checkpoint (or a fine-tune of one) the way its official inference code
//! does: the checkpoint's inference chat template (not the training one), images placed before
//! the text of their turn and sliced as at inference, a key/value cache, greedy decoding unless
//! sampling is asked for, and the reply streamed as it is produced.
//!
//! `train chat` is the command; this crate holds the prompt building and the reply loop so
//! tests can compare both with the PyTorch reference.

use std::path::{Path, PathBuf};

use cpmv_image::{decode, slice_image, DecodeOptions, RgbImage, SliceConfig};
use cpmv_model::{Batch, ImageInput, MiniCpmV, Sampling, StopReason};
use cpmv_prep::model::{LlmType, ModelDir};
use cpmv_prep::placeholder::{ImageIdMode, PlaceholderBuilder};
use cpmv_prep::template::{image_bounds, ChatTemplate};

/// What can go wrong building a prompt or replying.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("image {path}: {message}")]
    Image { path: PathBuf, message: String },
    #[error("{0}")]
    Checkpoint(String),
    #[error(transparent)]
    Model(#[from] cpmv_model::ModelError),
}

/// Who speaks in a turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// An image file, decoded to RGB (stored pixel order, as the reference's PIL
/// `Image.open(...).convert("RGB")`: no EXIF rotation).
#[derive(Clone)]
pub struct ChatImage {
    pub path: PathBuf,
    pub image: RgbImage,
}

impl ChatImage {
    pub fn open(path: &Path) -> Result<ChatImage, ChatError> {
        let err = |message: String| ChatError::Image {
            path: path.to_path_buf(),
            message,
        };
        let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        let image = decode(
            &bytes,
            DecodeOptions {
                exif_transpose: false,
            },
        )
        .map_err(|e| err(e.to_string()))?;
        Ok(ChatImage {
            path: path.to_path_buf(),
            image,
        })
    }
}

/// One turn: its images come before its text, each followed by a newline, as the official
/// `chat` joins a message's content list.
#[derive(Clone)]
pub struct Turn {
    pub role: Role,
    pub text: String,
    pub images: Vec<ChatImage>,
}

/// The model input of a conversation.
pub struct Prompt {
    /// The rendered text, placeholders included.
    pub text: String,
    pub ids: Vec<u32>,
    /// `[start, end)` of each placeholder run, in slice order.
    pub bounds: Vec<[i32; 2]>,
    /// Overview and slices of every image, in placeholder order.
    pub slices: Vec<RgbImage>,
}

/// A finished reply.
#[derive(Clone, Debug)]
pub struct Reply {
    /// Generated ids (the stop token included when there was one).
    pub ids: Vec<u32>,
    /// Decoded text without special tokens.
    pub text: String,
    pub stop: StopReason,
}

/// A checkpoint ready to chat: the model, its tokenizer and templates, its inference slicing.
pub struct Chat<'a> {
    model: &'a MiniCpmV,
    dir: ModelDir,
    template: Option<ChatTemplate>,
    slice: SliceConfig,
    stop: Vec<u32>,
}

impl<'a> Chat<'a> {
    /// `model_dir` supplies tokenizer, chat template and slicing settings (for a LoRA run, the
    /// base checkpoint or the adapter directory, which carries the base's files);
    /// `max_slice_nums` overrides the checkpoint's.
    pub fn new(
        model: &'a MiniCpmV,
        model_dir: &Path,
        max_slice_nums: Option<u32>,
    ) -> Result<Chat<'a>, ChatError> {
        let dir =
            ModelDir::load(model_dir, None).map_err(|e| ChatError::Checkpoint(e.to_string()))?;
        let template = match dir.llm_type {
            LlmType::Minicpm => None,
            _ => {
                let t = dir.chat_template.as_deref().ok_or_else(|| {
                    ChatError::Checkpoint(format!(
                        "{}: tokenizer_config.json has no chat_template (the inference prompt \
                         of this version is the checkpoint's own template)",
                        model_dir.display()
                    ))
                })?;
                Some(ChatTemplate::new(t).map_err(|e| ChatError::Checkpoint(e.to_string()))?)
            }
        };
        let slice = SliceConfig {
            max_slice_nums: max_slice_nums.unwrap_or(dir.slice.max_slice_nums),
            ..dir.slice
        };
        let stop = stop_ids(&dir, model_dir);
        Ok(Chat {
            model,
            dir,
            template,
            slice,
            stop,
        })
    }

    /// The model input for `turns`, ending where the assistant's reply starts.
    pub fn prompt(&self, turns: &[Turn]) -> Result<Prompt, ChatError> {
        let new_schema = self.dir.llm_type.new_schema();
        let mut builder = PlaceholderBuilder::new(
            self.dir.query_num,
            &self.dir.strings.unk,
            new_schema,
            ImageIdMode::Inference,
        );
        let mut slices = Vec::new();
        let mut contents = Vec::with_capacity(turns.len());
        for turn in turns {
            let mut content = String::new();
            for img in &turn.images {
                let sliced = slice_image(&img.image, &self.slice);
                content.push_str(&builder.next(&sliced.plan));
                content.push('\n');
                slices.extend(sliced.images);
            }
            content.push_str(&turn.text);
            contents.push((turn.role, content));
        }
        let (text, ids) = match &self.template {
            None => {
                // MiniCPM-V 2.0: `<用户>`/`<AI>` pieces, the assistant's opening, BOS.
                let mut text = String::new();
                for (role, content) in &contents {
                    text.push_str(match role {
                        Role::User => "<用户>",
                        Role::Assistant => "<AI>",
                        Role::System => {
                            return Err(ChatError::Checkpoint(
                                "MiniCPM-V 2.0 has no system prompt".into(),
                            ))
                        }
                    });
                    text.push_str(content);
                }
                text.push_str("<AI>");
                let ids = self.encode(&text, true)?;
                (text, ids)
            }
            Some(t) => {
                let msgs: Vec<(&str, &str)> = contents
                    .iter()
                    .map(|(r, c)| (r.name(), c.as_str()))
                    .collect();
                let text = t
                    .render(&self.dir, &msgs, true, false)
                    .map_err(|e| ChatError::Checkpoint(e.to_string()))?;
                let ids = self.encode(&text, false)?;
                (text, ids)
            }
        };
        let q = self.dir.query_num as i32;
        let bounds = image_bounds(&ids, &self.dir)
            .filter(|b| b.len() == slices.len() && b.iter().all(|[s, e]| e - s == q))
            .ok_or_else(|| {
                ChatError::Checkpoint(
                    "the image placeholders do not tokenize into one run of query_num tokens \
                     per slice (is the text using the image tokens?)"
                        .into(),
                )
            })?;
        Ok(Prompt {
            text,
            ids,
            bounds,
            slices,
        })
    }

    fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>, ChatError> {
        self.dir
            .tokenizer
            .encode(text, special)
            .map_err(|e| ChatError::Checkpoint(format!("tokenizer: {e}")))
    }

    /// Text of `ids` without special tokens.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.dir.tokenizer.decode(ids, true).unwrap_or_default()
    }

    /// The model batch of a prompt (one row, every slice in one vision batch).
    pub fn batch(&self, prompt: &Prompt) -> Result<Batch, ChatError> {
        let n = prompt.ids.len();
        let patch = self.slice.patch_size as usize;
        let mut batch = Batch {
            input_ids: vec![prompt.ids.clone()],
            position_ids: vec![(0..n as u32).collect()],
            labels: vec![vec![-100; n]],
            segments: vec![vec![n]],
            ..Batch::default()
        };
        for (img, b) in prompt.slices.iter().zip(&prompt.bounds) {
            batch.images.push(ImageInput::from_hwc_u8(
                &img.data,
                img.height as usize,
                img.width as usize,
                patch,
            )?);
            batch.bounds.push((0, b[0] as usize, b[1] as usize));
            batch.image_groups.push(0);
        }
        Ok(batch)
    }

    /// Generates the assistant's reply to a prompt (see [`Chat::prompt`]). `on_text` receives
    /// the reply's text as it grows (only complete characters), for streaming.
    pub fn reply(
        &self,
        prompt: &Prompt,
        max_new_tokens: usize,
        sampling: &Sampling,
        mut on_text: impl FnMut(&str),
    ) -> Result<Reply, ChatError> {
        let batch = self.batch(prompt)?;
        let mut ids: Vec<u32> = Vec::new();
        let mut shown = 0usize;
        let generated =
            self.model
                .generate(&batch, max_new_tokens, &self.stop, sampling, |id| {
                    ids.push(id);
                    let text = self.decode(&ids);
                    // A byte-fallback character may be split over tokens: wait for the rest.
                    if text.len() > shown && !text.ends_with('\u{fffd}') {
                        if let Some(new) = text.get(shown..) {
                            on_text(new);
                        }
                        shown = text.len();
                    }
                    true
                })?;
        let text = self.decode(&generated.ids);
        if text.len() > shown {
            if let Some(rest) = text.get(shown..) {
                on_text(rest);
            }
        }
        Ok(Reply {
            ids: generated.ids,
            text,
            stop: generated.stop,
        })
    }
}

/// The ids that end a reply: the tokenizer's eos, the version's turn ends (`<|eot_id|>` for
/// 2.5; `<|im_end|>` and `<|endoftext|>` for 2.6) and generation_config.json's eos ids.
fn stop_ids(dir: &ModelDir, model_dir: &Path) -> Vec<u32> {
    let mut stop = vec![dir.tokens.eos];
    let extra: &[&str] = match dir.llm_type {
        LlmType::Minicpm => &[],
        LlmType::Llama3 => &["<|eot_id|>"],
        LlmType::Qwen => &["<|im_end|>", "<|endoftext|>"],
    };
    stop.extend(extra.iter().filter_map(|t| dir.tokenizer.token_to_id(t)));
    if let Ok(text) = std::fs::read_to_string(model_dir.join("generation_config.json")) {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
            match v.get("eos_token_id") {
                Some(serde_json::Value::Number(n)) => stop.extend(n.as_u64().map(|x| x as u32)),
                Some(serde_json::Value::Array(a)) => {
                    stop.extend(a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32))
                }
                _ => {}
            }
        }
    }
    stop.sort_unstable();
    stop.dedup();
    stop
}
