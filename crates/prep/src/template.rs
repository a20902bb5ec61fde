//! Conversation → token ids and supervision mask, per llm type (spec §4), then labels and image
//! bounds.
//!
//! `ctx` follows the reference: 1 = prompt (no loss), 0 = supervised.

use minijinja::Environment;

use crate::model::{LlmType, ModelDir};
use crate::sample::Role;

/// The reference's fixed training templates (fingerprinted with the shards, so they live
/// beside the fingerprint code in `cpmv_shard::fingerprint`).
pub use cpmv_shard::fingerprint::{LLAMA3_TRAINING_TEMPLATE, MINICPM_TRAINING_SCHEME};

/// Python's `str.strip()` (what Jinja's `trim` does): Unicode whitespace plus the ASCII
/// separators U+001C–U+001F, which Rust's `trim` keeps.
pub fn py_strip(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

/// Token ids and the reference's context mask (1 = prompt, 0 = supervised).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tokenized {
    pub ids: Vec<u32>,
    pub ctx: Vec<u8>,
}

/// A checkpoint's own Jinja chat template (tokenizer_config.json `chat_template`), compiled
/// with Hugging Face's semantics: trim_blocks, lstrip_blocks, Python string methods,
/// `raise_exception`.
pub struct ChatTemplate {
    env: Environment<'static>,
}

impl ChatTemplate {
    pub fn new(template: &str) -> Result<ChatTemplate, TemplateError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template_owned("chat", template.to_string())
            .map_err(|e| TemplateError(format!("chat_template does not compile: {e}")))?;
        Ok(ChatTemplate { env })
    }

    /// The text of `messages` (role name, content); `add_generation_prompt` asks the template
    /// for the assistant's opening (inference), `enable_thinking` is passed as the reference's
    /// fine-tune code passes it.
    pub fn render(
        &self,
        model: &ModelDir,
        messages: &[(&str, &str)],
        add_generation_prompt: bool,
        enable_thinking: bool,
    ) -> Result<String, TemplateError> {
        let msgs: Vec<_> = messages
            .iter()
            .map(|(r, c)| minijinja::context! { role => r, content => c })
            .collect();
        self.env
            .get_template("chat")
            .and_then(|t| {
                t.render(minijinja::context! {
                    messages => msgs,
                    add_generation_prompt => add_generation_prompt,
                    enable_thinking => enable_thinking,
                    bos_token => model.strings.bos.clone().unwrap_or_default(),
                    eos_token => model.strings.eos.clone(),
                })
            })
            .map_err(|e| TemplateError(format!("chat_template failed to render: {e}")))
    }
}

/// Renders and tokenizes conversations for one model directory.
pub struct Templater {
    chat: Option<ChatTemplate>,
}

/// A failure to render or tokenize (a broken checkpoint template, not bad data).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TemplateError(pub String);

impl Templater {
    /// Prepares the qwen path's chat template (the checkpoint's own).
    pub fn new(model: &ModelDir) -> Result<Templater, TemplateError> {
        if model.llm_type != LlmType::Qwen {
            return Ok(Templater { chat: None });
        }
        let template = model
            .chat_template
            .as_deref()
            .ok_or_else(|| TemplateError("the checkpoint has no chat_template".into()))?;
        Ok(Templater {
            chat: Some(ChatTemplate::new(template)?),
        })
    }

    /// Token ids and mask of `messages` (role, content with placeholders already inserted).
    pub fn tokenize(
        &self,
        model: &ModelDir,
        messages: &[(Role, String)],
    ) -> Result<Tokenized, TemplateError> {
        match model.llm_type {
            LlmType::Minicpm => minicpm(model, messages),
            LlmType::Llama3 => llama3(model, messages),
            LlmType::Qwen => self.qwen(model, messages),
        }
    }

    fn qwen(
        &self,
        model: &ModelDir,
        messages: &[(Role, String)],
    ) -> Result<Tokenized, TemplateError> {
        let chat = self
            .chat
            .as_ref()
            .expect("qwen templater has a chat template");
        let msgs: Vec<(&str, &str)> = messages
            .iter()
            .map(|(r, c)| (r.name(), c.as_str()))
            .collect();
        let last = messages.last().map(|m| m.1.as_str()).unwrap_or("");
        let enable_thinking = last.contains("<think>") && last.contains("</think>");
        let text = chat.render(model, &msgs, false, enable_thinking)?;
        let ids = encode(model, &text)?;
        let t = &model.tokens;
        let (im_start, im_end, assistant) = (
            t.header_start.expect("qwen"),
            t.turn_end.expect("qwen"),
            t.assistant.expect("qwen"),
        );
        let mut ctx = vec![1u8; ids.len()];
        let assistants: Vec<usize> = positions(&ids, assistant);
        let think = text.contains("<think>\n\n</think>\n\n");
        for (k, &a) in assistants.iter().enumerate() {
            if a == 0 || ids[a - 1] != im_start {
                continue;
            }
            let mut st = a + 2; // skip "assistant" and "\n"
            if think && k == assistants.len() - 1 {
                st += 4;
            }
            if let Some(end) = ids
                .iter()
                .enumerate()
                .skip(st + 1)
                .find(|(_, &v)| v == im_end)
            {
                ctx[st..=end.0].fill(0);
            }
        }
        Ok(Tokenized { ids, ctx })
    }
}

fn positions(ids: &[u32], token: u32) -> Vec<usize> {
    ids.iter()
        .enumerate()
        .filter(|(_, &v)| v == token)
        .map(|(i, _)| i)
        .collect()
}

fn encode(model: &ModelDir, text: &str) -> Result<Vec<u32>, TemplateError> {
    model
        .tokenizer
        .encode(text, false)
        .map_err(|e| TemplateError(format!("tokenizer failed: {e}")))
}

/// V2.0: each prefix and content encoded separately (each gets the tokenizer's own leading-space
/// handling), no BOS; eos text appended to the last content.
fn minicpm(model: &ModelDir, messages: &[(Role, String)]) -> Result<Tokenized, TemplateError> {
    let mut ids = Vec::new();
    let mut ctx = Vec::new();
    for (i, (role, content)) in messages.iter().enumerate() {
        let prefix = match role {
            Role::User => "<用户>",
            Role::Assistant => "<AI>",
        };
        let p = encode(model, prefix)?;
        ctx.extend(std::iter::repeat_n(1u8, p.len()));
        ids.extend(p);
        let content = if i == messages.len() - 1 {
            format!("{content}{}", model.strings.eos)
        } else {
            content.clone()
        };
        let c = encode(model, &content)?;
        let mask = u8::from(*role == Role::User);
        ctx.extend(std::iter::repeat_n(mask, c.len()));
        ids.extend(c);
    }
    Ok(Tokenized { ids, ctx })
}

fn llama3(model: &ModelDir, messages: &[(Role, String)]) -> Result<Tokenized, TemplateError> {
    let mut text = model.strings.bos.clone().unwrap_or_default();
    for (role, content) in messages {
        text.push_str("<|start_header_id|>");
        text.push_str(role.name());
        text.push_str("<|end_header_id|>\n\n");
        text.push_str(py_strip(content));
        text.push_str("<|eot_id|>");
    }
    let ids = encode(model, &text)?;
    let t = &model.tokens;
    let (sh, eh, eot, assistant) = (
        t.header_start.expect("llama3"),
        t.header_end.expect("llama3"),
        t.turn_end.expect("llama3"),
        t.assistant.expect("llama3"),
    );
    let starts = positions(&ids, sh);
    let ends = positions(&ids, eh);
    if starts.len() != ends.len() {
        return Err(TemplateError(format!(
            "{} header starts but {} header ends after tokenization",
            starts.len(),
            ends.len()
        )));
    }
    let mut ctx = vec![1u8; ids.len()];
    for a in positions(&ids, assistant) {
        // "assistant" is the role token iff it sits exactly between a header's start and end.
        if !starts.iter().zip(&ends).any(|(s, e)| s + e == 2 * a) {
            continue;
        }
        let st = a + 3; // "assistant", <|end_header_id|>, "\n\n"
        if let Some(end) = ids.iter().enumerate().skip(st + 1).find(|(_, &v)| v == eot) {
            ctx[st..=end.0].fill(0);
        }
    }
    Ok(Tokenized { ids, ctx })
}

/// Shifted labels from ids and mask (spec §4.4): position `i-1` learns `ids[i]` where `ctx[i]`
/// is 0, and the last supervised position before prompt text learns `turn_end_label`.
pub fn labels(ids: &[u32], ctx: &[u8], turn_end_label: u32) -> Vec<i32> {
    let n = ids.len();
    let mut labels = vec![cpmv_shard::schema::IGNORE_INDEX; n];
    for i in 1..n {
        if ctx[i] == 0 {
            labels[i - 1] = ids[i] as i32;
        }
        if ctx[i] == 1 && ctx[i - 1] == 0 {
            labels[i - 1] = turn_end_label as i32;
        }
    }
    labels
}

/// `[start, end)` of each placeholder run: after each `<image>` (and `<slice>` in the new
/// schema) up to its closing token. `None` when starts and ends do not pair up.
pub fn image_bounds(ids: &[u32], model: &ModelDir) -> Option<Vec<[i32; 2]>> {
    let t = &model.tokens;
    let new = model.llm_type.new_schema();
    let is_start = |v: u32| v == t.im_start || (new && v == t.slice_start);
    let is_end = |v: u32| v == t.im_end || (new && v == t.slice_end);
    let starts: Vec<usize> = (0..ids.len()).filter(|&i| is_start(ids[i])).collect();
    let ends: Vec<usize> = (0..ids.len()).filter(|&i| is_end(ids[i])).collect();
    if starts.len() != ends.len() {
        return None;
    }
    let bounds: Vec<[i32; 2]> = starts
        .iter()
        .zip(&ends)
        .map(|(&s, &e)| [s as i32 + 1, e as i32])
        .collect();
    bounds.iter().all(|[s, e]| s <= e).then_some(bounds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_follow_the_reference_rule() {
        // prompt prompt sup sup prompt
        let ids = [10, 11, 12, 13, 14];
        let ctx = [1, 1, 0, 0, 1];
        assert_eq!(labels(&ids, &ctx, 99), vec![-100, 12, 13, 99, -100]);
        // The last position never carries a label.
        assert_eq!(labels(&[1, 2], &[1, 0], 9), vec![2, -100]);
    }

    #[test]
    fn py_strip_matches_python() {
        assert_eq!(py_strip("\u{1f} a \u{3000}\n"), "a");
        assert_eq!(py_strip("\u{200b}a"), "\u{200b}a"); // zero-width space is not whitespace
    }
}
