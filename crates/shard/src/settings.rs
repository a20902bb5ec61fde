//! The settings a shard set was built with, as `manifest.json` records them under `settings`:
//! one typed struct shared by the writer (`prep build`) and the readers (`train`, `prep
//! inspect`), so a renamed field is a compile error rather than a check that silently stops
//! checking. The canonical JSON of [`BuildSettings`] is what `fingerprints.settings` hashes.

use serde::{Deserialize, Serialize};

/// The language-model family, which decides the chat template and the placeholder schema.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LlmType {
    /// MiniCPM-V 2.0 (MiniCPM-2.4B): `<用户>`/`<AI>` pieces, old placeholder schema.
    Minicpm,
    /// MiniCPM-Llama3-V 2.5: Llama-3 headers, old placeholder schema.
    Llama3,
    /// MiniCPM-V 2.6 (Qwen2): the checkpoint's ChatML template, `<slice>` per slice, image ids.
    Qwen,
}

impl LlmType {
    /// The name used on the command line and in files.
    pub fn name(self) -> &'static str {
        match self {
            LlmType::Minicpm => "minicpm",
            LlmType::Llama3 => "llama3",
            LlmType::Qwen => "qwen",
        }
    }

    /// The MiniCPM-V version that uses this llm type.
    pub fn version(self) -> &'static str {
        match self {
            LlmType::Minicpm => "2.0",
            LlmType::Llama3 => "2.5",
            LlmType::Qwen => "2.6",
        }
    }

    /// The llm type of a MiniCPM-V version ("2.0", "2.5", "2.6").
    pub fn for_version(version: &str) -> Option<LlmType> {
        [LlmType::Minicpm, LlmType::Llama3, LlmType::Qwen]
            .into_iter()
            .find(|t| t.version() == version)
    }

    /// The 2.6 ("new") schema: each slice wrapped in `<slice>…</slice>` and counted as a bound.
    pub fn new_schema(self) -> bool {
        self == LlmType::Qwen
    }
}

impl std::str::FromStr for LlmType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "minicpm" => Ok(LlmType::Minicpm),
            "llama3" => Ok(LlmType::Llama3),
            "qwen" => Ok(LlmType::Qwen),
            other => Err(format!(
                "unknown llm type {other:?} (expected minicpm, llama3 or qwen)"
            )),
        }
    }
}

/// How 2.6 numbers its images with `<image_id>N</image_id>`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageIdMode {
    /// The fine-tuning reference: only sliced images get an id, counted over sliced images.
    #[default]
    Reference,
    /// The 2.6 inference processor: every image gets its index in the prompt.
    Inference,
}

/// Settings that change what a sample becomes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SampleSettings {
    pub llm_type: LlmType,
    pub max_slice_nums: u32,
    pub scale_resolution: u32,
    pub patch_size: u32,
    /// Placeholder tokens per image view (the resampler's query count).
    pub query_num: u32,
    pub max_length: usize,
    /// Cut over-long samples after their last image instead of rejecting them.
    pub truncate: bool,
    pub image_id_mode: ImageIdMode,
    pub exif_transpose: bool,
}

/// Every setting that changes the rows of a shard set (all of them fingerprinted).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildSettings {
    /// The shard format version the set was written in.
    pub format_version: u32,
    pub sample: SampleSettings,
    /// The checkpoint batches vision input across samples (config.json `batch_vision_input`).
    pub batch_vision: bool,
    pub pack: bool,
    pub max_slices_per_pack: usize,
    pub pack_window: usize,
}

impl BuildSettings {
    /// The canonical JSON that `fingerprints.settings` is the sha256 of (keys sorted, no
    /// whitespace).
    pub fn canonical_json(&self) -> String {
        serde_json::to_value(self)
            .expect("settings serialise")
            .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_round_trip_through_the_manifest_json() {
        let s = BuildSettings {
            format_version: 1,
            sample: SampleSettings {
                llm_type: LlmType::Llama3,
                max_slice_nums: 9,
                scale_resolution: 448,
                patch_size: 14,
                query_num: 96,
                max_length: 2048,
                truncate: false,
                image_id_mode: ImageIdMode::Reference,
                exif_transpose: false,
            },
            batch_vision: true,
            pack: true,
            max_slices_per_pack: 40,
            pack_window: 512,
        };
        let text = s.canonical_json();
        assert!(text.contains(r#""llm_type":"llama3""#), "{text}");
        assert!(text.contains(r#""image_id_mode":"reference""#), "{text}");
        let back: BuildSettings = serde_json::from_str(&text).unwrap();
        assert_eq!(back, s);
        assert_eq!(LlmType::for_version("2.6"), Some(LlmType::Qwen));
        assert_eq!(LlmType::for_version("3.0"), None);
    }
}
