//! Parsing and validating one input sample, and laying out where its images go in the text.
//!
//! The reference's placement rules (spec §1.3–§1.4) are reproduced exactly, newlines included.
//! Where the reference silently corrupts a sample (stray `<image>` tags, tags it cannot bind,
//! empty assistant turns) the sample is rejected with a reason instead.

use serde_json::Value;

use crate::model::LlmType;
use crate::reject::{RejectKind, Rejection};

/// Speaker of a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    User,
    Assistant,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// A piece of a message: text, or the placeholder of image `i` (model order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Segment {
    Text(String),
    Image(usize),
}

/// One message with its images located.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub role: Role,
    pub segments: Vec<Segment>,
}

impl Message {
    /// The content with each image replaced by `placeholders[i]`.
    pub fn render(&self, placeholders: &[String]) -> String {
        let mut s = String::new();
        for seg in &self.segments {
            match seg {
                Segment::Text(t) => s.push_str(t),
                Segment::Image(i) => s.push_str(&placeholders[*i]),
            }
        }
        s
    }
}

/// A validated sample: id, image paths in model order (first appearance in the text), and the
/// messages with image positions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedSample {
    pub id: String,
    pub images: Vec<String>,
    pub messages: Vec<Message>,
}

const SINGLE_TAG: &str = "<image>";

/// Tokens that must not appear literally in message text, whatever the llm type: they would
/// produce image bounds without images.
const IMAGE_MARKERS: &[&str] = &[
    "</image>",
    "<slice>",
    "</slice>",
    "<image_id>",
    "</image_id>",
];

/// Template tokens that must not appear in message text for each llm type.
fn template_markers(llm: LlmType) -> &'static [&'static str] {
    match llm {
        LlmType::Minicpm => &["<s>", "</s>"],
        LlmType::Llama3 => &[
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ],
        LlmType::Qwen => &["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
    }
}

/// The id shown for a sample: its `id` field (string or number), else `<file stem>:<index>`.
pub fn sample_id(value: Option<&Value>, stem: &str, index: u64) -> String {
    match value.and_then(|v| v.get("id")) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => format!("{stem}:{index}"),
    }
}

/// Splits `text` at `<image_NN>` tags (ASCII digits), returning text parts and tags alternately
/// (like Python's `re.split` with a capturing group: always text, tag, text, ..., text).
fn split_tags(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let bytes = text.as_bytes();
    let mut last = 0;
    let mut i = 0;
    while let Some(pos) = text[i..].find("<image_") {
        let start = i + pos;
        let mut j = start + "<image_".len();
        while j < bytes.len() && bytes[j].is_ascii_digit() {
            j += 1;
        }
        if j > start + "<image_".len() && j < bytes.len() && bytes[j] == b'>' {
            parts.push(&text[last..start]);
            parts.push(&text[start..=j]);
            last = j + 1;
            i = j + 1;
        } else {
            i = start + 1;
        }
    }
    parts.push(&text[last..]);
    parts
}

fn is_tag_key(key: &str) -> bool {
    key.len() > "<image_>".len()
        && key.starts_with("<image_")
        && key.ends_with('>')
        && key["<image_".len()..key.len() - 1]
            .bytes()
            .all(|b| b.is_ascii_digit())
}

/// Validates `value` and lays out its images. `llm` decides which template tokens are reserved.
pub fn parse_sample(value: &Value, id: String, llm: LlmType) -> Result<ParsedSample, Rejection> {
    let obj = value.as_object().ok_or_else(|| {
        Rejection::new(RejectKind::NotAnObject, "the sample is not a JSON object")
    })?;
    let bad_conv = |m: String| Rejection::new(RejectKind::InvalidConversations, m);

    // Conversations.
    let conv = obj
        .get("conversations")
        .ok_or_else(|| bad_conv("no `conversations` field".into()))?
        .as_array()
        .ok_or_else(|| bad_conv("`conversations` is not a list".into()))?;
    if conv.len() < 2 {
        return Err(bad_conv(format!(
            "`conversations` has {} message(s); at least 2 (a user and an assistant turn) are needed",
            conv.len()
        )));
    }
    let mut raw = Vec::with_capacity(conv.len());
    for (i, m) in conv.iter().enumerate() {
        let role = m
            .get("role")
            .ok_or_else(|| bad_conv(format!("message {i} has no `role`")))?;
        let content = m
            .get("content")
            .ok_or_else(|| bad_conv(format!("message {i} has no `content`")))?
            .as_str()
            .ok_or_else(|| bad_conv(format!("message {i}: `content` is not a string")))?;
        let role = match role.as_str() {
            Some("user") => Role::User,
            Some("assistant") => Role::Assistant,
            _ => {
                return Err(Rejection::new(
                    RejectKind::InvalidRoles,
                    format!("message {i} has role {role}; expected \"user\" or \"assistant\""),
                ))
            }
        };
        if role == Role::Assistant && crate::template::py_strip(content).is_empty() {
            return Err(Rejection::new(
                RejectKind::EmptyAssistant,
                format!("message {i} (assistant) has empty content"),
            ));
        }
        raw.push((role, content));
    }
    if raw[0].0 != Role::User {
        return Err(Rejection::new(
            RejectKind::InvalidRoles,
            "the first message must be from the user",
        ));
    }
    if !raw.iter().any(|(r, _)| *r == Role::Assistant) {
        return Err(Rejection::new(
            RejectKind::InvalidRoles,
            "no assistant message: nothing to learn",
        ));
    }
    for (i, (_, content)) in raw.iter().enumerate() {
        for marker in IMAGE_MARKERS.iter().chain(template_markers(llm)) {
            if content.contains(marker) {
                return Err(Rejection::new(
                    RejectKind::ReservedToken,
                    format!("message {i} contains the reserved token {marker}"),
                ));
            }
        }
    }

    // Images.
    enum Spec {
        None,
        Single(String),
        Multi(Vec<(String, String)>),
    }
    let bad_image = |m: String| Rejection::new(RejectKind::InvalidImageField, m);
    let spec = match obj.get("image") {
        None | Some(Value::Null) => Spec::None,
        Some(Value::String(p)) => Spec::Single(p.clone()),
        Some(Value::Object(map)) => {
            let mut entries = Vec::with_capacity(map.len());
            for (k, v) in map {
                let p = v
                    .as_str()
                    .ok_or_else(|| bad_image(format!("image {k:?}: the path is not a string")))?;
                entries.push((k.clone(), p.to_string()));
            }
            if entries.is_empty() {
                return Err(bad_image("`image` is an empty object".into()));
            }
            if entries.len() == 1 && entries[0].0 == SINGLE_TAG {
                Spec::Single(entries.remove(0).1)
            } else {
                if let Some((k, _)) = entries.iter().find(|(k, _)| !is_tag_key(k)) {
                    return Err(bad_image(format!(
                        "image key {k:?} is not of the form <image_NN> (several images) or <image> (one)"
                    )));
                }
                Spec::Multi(entries)
            }
        }
        Some(other) => {
            return Err(bad_image(format!(
                "`image` must be a path or an object of paths, found {other}"
            )))
        }
    };

    let text_only = |content: &str| vec![Segment::Text(content.to_string())];
    let mut images = Vec::new();
    let mut messages = Vec::with_capacity(raw.len());
    match spec {
        Spec::None | Spec::Single(_) => {
            let single = if let Spec::Single(p) = &spec {
                Some(p.clone())
            } else {
                None
            };
            for (i, (role, content)) in raw.iter().enumerate() {
                if split_tags(content).len() > 1 {
                    return Err(Rejection::new(
                        RejectKind::UnknownImageTag,
                        format!(
                            "message {i} uses an <image_NN> tag but `image` is {}",
                            if single.is_some() {
                                "a single path"
                            } else {
                                "absent"
                            }
                        ),
                    ));
                }
                let n = content.matches(SINGLE_TAG).count();
                let segments = match (&single, i) {
                    (Some(_), 0) if n > 1 => {
                        return Err(Rejection::new(
                            RejectKind::DuplicateImageTag,
                            format!("the first message contains <image> {n} times for one image"),
                        ))
                    }
                    (Some(_), 0) if n == 1 => {
                        let (a, b) = content.split_once(SINGLE_TAG).expect("counted once");
                        vec![
                            Segment::Text(a.to_string()),
                            Segment::Image(0),
                            Segment::Text(b.to_string()),
                        ]
                    }
                    (Some(_), 0) => {
                        vec![Segment::Image(0), Segment::Text(format!("\n{content}"))]
                    }
                    _ if n > 0 => {
                        return Err(Rejection::new(
                            RejectKind::MisplacedImageTag,
                            if single.is_some() {
                                format!("message {i} contains <image>; only the first message may")
                            } else {
                                format!("message {i} contains <image> but the sample has no image")
                            },
                        ))
                    }
                    _ => text_only(content),
                };
                messages.push(Message {
                    role: *role,
                    segments,
                });
            }
            images.extend(single);
        }
        Spec::Multi(entries) => {
            let mut order: Vec<String> = Vec::new();
            for (i, (role, content)) in raw.iter().enumerate() {
                if content.contains(SINGLE_TAG) {
                    return Err(Rejection::new(
                        RejectKind::MisplacedImageTag,
                        format!("message {i} contains <image> in a sample with named images (use <image_NN>)"),
                    ));
                }
                let parts = split_tags(content);
                if parts.len() == 1 {
                    messages.push(Message {
                        role: *role,
                        segments: text_only(content),
                    });
                    continue;
                }
                // Joined with "\n", empty parts included, as the reference does.
                let mut segments = Vec::with_capacity(parts.len() * 2);
                for (k, part) in parts.iter().enumerate() {
                    if k > 0 {
                        segments.push(Segment::Text("\n".into()));
                    }
                    if k % 2 == 1 {
                        let Some(path_idx) = entries.iter().position(|(t, _)| t == part) else {
                            return Err(Rejection::new(
                                RejectKind::UnknownImageTag,
                                format!("message {i} uses {part}, which is not in `image`"),
                            ));
                        };
                        if order.iter().any(|t| t == part) {
                            return Err(Rejection::new(
                                RejectKind::DuplicateImageTag,
                                format!("{part} is used more than once"),
                            ));
                        }
                        order.push(part.to_string());
                        images.push(entries[path_idx].1.clone());
                        segments.push(Segment::Image(images.len() - 1));
                    } else {
                        segments.push(Segment::Text(part.to_string()));
                    }
                }
                messages.push(Message {
                    role: *role,
                    segments,
                });
            }
            if let Some((tag, _)) = entries.iter().find(|(t, _)| !order.contains(t)) {
                return Err(Rejection::new(
                    RejectKind::UnusedImage,
                    format!("image {tag} is never referenced in the conversation"),
                ));
            }
        }
    }
    Ok(ParsedSample {
        id,
        images,
        messages,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<ParsedSample, Rejection> {
        parse_sample(&v, "s".into(), LlmType::Qwen)
    }

    fn kind(v: Value) -> RejectKind {
        parse(v).unwrap_err().kind
    }

    fn conv(user: &str, assistant: &str) -> Value {
        json!([{"role": "user", "content": user}, {"role": "assistant", "content": assistant}])
    }

    fn rendered(p: &ParsedSample) -> Vec<String> {
        let ph: Vec<String> = (0..p.images.len()).map(|i| format!("P{i}")).collect();
        p.messages.iter().map(|m| m.render(&ph)).collect()
    }

    #[test]
    fn single_image_prepends_or_replaces() {
        let p = parse(json!({"image": "a.jpg", "conversations": conv("What?", "Cat.")})).unwrap();
        assert_eq!(rendered(&p), vec!["P0\nWhat?", "Cat."]);
        let p = parse(json!({"image": {"<image>": "a.jpg"}, "conversations": conv("Look: <image> ok", "Cat.")}))
            .unwrap();
        assert_eq!(rendered(&p), vec!["Look: P0 ok", "Cat."]);
        assert_eq!(p.images, vec!["a.jpg"]);
    }

    #[test]
    fn multi_image_joins_parts_with_newlines_like_the_reference() {
        let p = parse(json!({
            "image": {"<image_00>": "a.jpg", "<image_01>": "b.jpg"},
            "conversations": conv("How to create …?\n<image_00>\n<image_01>\n", "x")
        }))
        .unwrap();
        assert_eq!(rendered(&p)[0], "How to create …?\n\nP0\n\n\nP1\n\n");
        let p = parse(json!({
            "image": {"<image_00>": "a.jpg", "<image_01>": "b.jpg"},
            "conversations": conv("<image_00>Compare with <image_01>.", "x")
        }))
        .unwrap();
        assert_eq!(rendered(&p)[0], "\nP0\nCompare with \nP1\n.");
    }

    #[test]
    fn images_are_ordered_by_first_appearance() {
        let p = parse(json!({
            "image": {"<image_00>": "a.jpg", "<image_01>": "b.jpg"},
            "conversations": conv("<image_01> then <image_00>", "x")
        }))
        .unwrap();
        assert_eq!(p.images, vec!["b.jpg", "a.jpg"]);
    }

    #[test]
    fn each_rejection_class_is_named() {
        assert_eq!(kind(json!([1])), RejectKind::NotAnObject);
        assert_eq!(
            kind(json!({"image": "a"})),
            RejectKind::InvalidConversations
        );
        assert_eq!(
            kind(json!({"conversations": [{"role": "user", "content": "hi"}]})),
            RejectKind::InvalidConversations
        );
        assert_eq!(
            kind(
                json!({"conversations": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]})
            ),
            RejectKind::InvalidConversations
        );
        assert_eq!(
            kind(
                json!({"conversations": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]})
            ),
            RejectKind::InvalidRoles
        );
        assert_eq!(
            kind(
                json!({"conversations": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]})
            ),
            RejectKind::InvalidRoles
        );
        assert_eq!(
            kind(
                json!({"conversations": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]})
            ),
            RejectKind::InvalidRoles
        );
        assert_eq!(
            kind(json!({"conversations": conv("a", "  \n")})),
            RejectKind::EmptyAssistant
        );
        assert_eq!(
            kind(json!({"image": 5, "conversations": conv("a", "b")})),
            RejectKind::InvalidImageField
        );
        assert_eq!(
            kind(json!({"image": {"pic": "a.jpg", "x": "b"}, "conversations": conv("a", "b")})),
            RejectKind::InvalidImageField
        );
        assert_eq!(
            kind(json!({"image": "a.jpg", "conversations": [
                {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "<image> again"}, {"role": "assistant", "content": "c"}]})),
            RejectKind::MisplacedImageTag
        );
        assert_eq!(
            kind(json!({"conversations": conv("<image> hi", "b")})),
            RejectKind::MisplacedImageTag
        );
        assert_eq!(
            kind(json!({"image": "a.jpg", "conversations": conv("<image><image>", "b")})),
            RejectKind::DuplicateImageTag
        );
        assert_eq!(
            kind(
                json!({"image": {"<image_00>": "a", "<image_01>": "b"}, "conversations": conv("<image_00><image_00><image_01>", "b")})
            ),
            RejectKind::DuplicateImageTag
        );
        assert_eq!(
            kind(
                json!({"image": {"<image_00>": "a", "<image_01>": "b"}, "conversations": conv("<image_00><image_02>", "b")})
            ),
            RejectKind::UnknownImageTag
        );
        assert_eq!(
            kind(
                json!({"image": {"<image_00>": "a", "<image_01>": "b"}, "conversations": conv("<image_00>", "b")})
            ),
            RejectKind::UnusedImage
        );
        assert_eq!(
            kind(json!({"image": "a.jpg", "conversations": conv("hi </image>", "b")})),
            RejectKind::ReservedToken
        );
        assert_eq!(
            kind(json!({"conversations": conv("hi", "b<|im_end|>")})),
            RejectKind::ReservedToken
        );
    }

    #[test]
    fn text_only_samples_are_valid() {
        let p = parse(json!({"id": 7, "conversations": conv("hi", "hello")})).unwrap();
        assert!(p.images.is_empty());
        assert_eq!(rendered(&p), vec!["hi", "hello"]);
    }

    #[test]
    fn split_tags_matches_python_re_split() {
        assert_eq!(split_tags("a<image_1>b"), vec!["a", "<image_1>", "b"]);
        assert_eq!(
            split_tags("<image_1><image_22>"),
            vec!["", "<image_1>", "", "<image_22>", ""]
        );
        assert_eq!(split_tags("<image_>x<image_a>"), vec!["<image_>x<image_a>"]);
    }
}
