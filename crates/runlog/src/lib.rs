//! `runlog`: what a training run writes so people can watch and compare it.
//!
//! A [`RunLog`] writes, into a run directory:
//! - `log.jsonl`: one JSON object a line, `{"kind":"train", ...StepRecord}` per training step and
//!   `{"kind":"eval","step":..,"eval_loss":..,"n_tokens":..}` per evaluation. Non-finite floats
//!   (a NaN loss) are written as `null`, as JSON has no NaN.
//! - `tb/events.out.tfevents.<unix secs>.<hostname>.cpmv`: a TensorBoard event file (one per
//!   [`RunLog::create`]), written by [`tfevents`] without any TensorFlow dependency.
//!
//! [`loss_curve_png`] draws the loss curve from `log.jsonl`.

pub mod plot;
pub mod tfevents;

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use plot::loss_curve_png;
use tfevents::EventWriter;

/// File name of the JSON-lines log inside a run directory.
pub const LOG_FILE: &str = "log.jsonl";
/// Folder (inside a run directory) of the TensorBoard event files.
pub const TB_DIR: &str = "tb";

/// One logged training/eval step.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepRecord {
    /// Optimizer step, counted from 1.
    pub step: u64,
    /// Fractional epoch at the end of this step.
    pub epoch: f64,
    /// Training loss of this step.
    pub loss: f64,
    /// Learning rate used for this step.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens seen so far (cumulative).
    pub tokens: u64,
    /// Samples seen so far (cumulative).
    pub samples: u64,
    /// Throughput in tokens per second.
    pub tokens_per_s: f64,
    /// Throughput in samples per second.
    pub samples_per_s: f64,
    /// Seconds since the run started.
    pub elapsed_s: f64,
    /// Peak accelerator memory in bytes.
    pub peak_mem_bytes: u64,
    /// Evaluation loss, when this step also evaluated.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub eval_loss: Option<f64>,
    /// Number of micro-batches skipped for non-finite loss or gradients, when any.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub skipped_nonfinite: Option<u64>,
}

/// What can go wrong writing, reading or plotting a run log; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Reading, writing, creating or renaming a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A line of `log.jsonl` is not JSON (or a record could not be serialized).
    #[error("{} line {line}: {source}", path.display())]
    Json {
        /// The log file.
        path: PathBuf,
        /// 1-based line number (0 when serializing).
        line: usize,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// Drawing or encoding the plot failed.
    #[error("{}: {message}", path.display())]
    Plot {
        /// The PNG being written.
        path: PathBuf,
        /// What the plotting or image library said.
        message: String,
    },
    /// The log holds no finite loss to plot.
    #[error("{}: no finite train or eval loss to plot", path.display())]
    NoData {
        /// The log file.
        path: PathBuf,
    },
}

impl LogError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        LogError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

#[derive(Serialize)]
struct TrainLine<'a> {
    kind: &'static str,
    #[serde(flatten)]
    record: &'a StepRecord,
}

#[derive(Serialize)]
struct EvalLine {
    kind: &'static str,
    step: u64,
    eval_loss: f64,
    n_tokens: u64,
}

/// The log of one training run: `dir/log.jsonl` plus a TensorBoard event file in `dir/tb/`.
///
/// Every [`RunLog::train_step`] and [`RunLog::eval`] is handed to the OS before it returns, so
/// `tail -f log.jsonl` and a running TensorBoard see it at once; [`RunLog::flush`] also `fsync`s.
/// Dropping the log flushes it (errors ignored).
pub struct RunLog {
    dir: PathBuf,
    log_path: PathBuf,
    jsonl: BufWriter<File>,
    tb: EventWriter,
}

impl RunLog {
    /// Creates (or, with `resume_from_step = Some(step)`, appends to) `dir/log.jsonl` and a
    /// TensorBoard event file `dir/tb/events.out.tfevents.<unix secs>.<hostname>.cpmv`.
    ///
    /// `None` starts a fresh log: an existing `log.jsonl` is truncated. On resume, the records
    /// already in `log.jsonl` whose step is greater than `step` are dropped (as is a torn last
    /// line), so the resumed run's log has every step once; the file is rewritten through a
    /// temporary file and a rename. The new event file starts with a `SessionLog.START` at
    /// `step + 1`, which makes TensorBoard drop the earlier files' events from that step on.
    pub fn create(dir: &Path, resume_from_step: Option<u64>) -> Result<Self, LogError> {
        std::fs::create_dir_all(dir).map_err(|e| LogError::io(dir, e))?;
        let log_path = dir.join(LOG_FILE);
        let file = match resume_from_step {
            None => File::create(&log_path).map_err(|e| LogError::io(&log_path, e))?,
            Some(step) => {
                truncate_after(&log_path, step)?;
                File::options()
                    .create(true)
                    .append(true)
                    .open(&log_path)
                    .map_err(|e| LogError::io(&log_path, e))?
            }
        };
        let mut tb = EventWriter::create(&dir.join(TB_DIR))?;
        if let Some(step) = resume_from_step {
            tb.session_start(step + 1)?;
            tb.flush()?;
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            log_path,
            jsonl: BufWriter::new(file),
            tb,
        })
    }

    /// The run directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The TensorBoard event file this log writes.
    pub fn event_file(&self) -> &Path {
        self.tb.path()
    }

    fn write_line(&mut self, value: &impl Serialize) -> Result<(), LogError> {
        let mut line = serde_json::to_vec(value).map_err(|source| LogError::Json {
            path: self.log_path.clone(),
            line: 0,
            source,
        })?;
        line.push(b'\n');
        self.jsonl
            .write_all(&line)
            .and_then(|()| self.jsonl.flush())
            .map_err(|e| LogError::io(&self.log_path, e))
    }

    /// Logs one training step: a `{"kind":"train", ...}` line in `log.jsonl` and the TensorBoard
    /// scalars `train/loss`, `train/lr`, `train/grad_norm`, `train/tokens_per_s`,
    /// `train/peak_mem_gib` (peak memory in GiB, 2^30 bytes) and, when the record has it,
    /// `train/skipped_nonfinite`, all at `r.step`.
    pub fn train_step(&mut self, r: &StepRecord) -> Result<(), LogError> {
        self.write_line(&TrainLine {
            kind: "train",
            record: r,
        })?;
        let mut scalars = vec![
            ("train/loss", r.loss as f32),
            ("train/lr", r.lr as f32),
            ("train/grad_norm", r.grad_norm as f32),
            ("train/tokens_per_s", r.tokens_per_s as f32),
            (
                "train/peak_mem_gib",
                (r.peak_mem_bytes as f64 / (1u64 << 30) as f64) as f32,
            ),
        ];
        if let Some(n) = r.skipped_nonfinite {
            scalars.push(("train/skipped_nonfinite", n as f32));
        }
        self.tb.scalars(r.step, &scalars)?;
        self.tb.flush()
    }

    /// Logs one evaluation: a `{"kind":"eval","step":..,"eval_loss":..,"n_tokens":..}` line in
    /// `log.jsonl` and the TensorBoard scalar `eval/loss` at `step`.
    pub fn eval(&mut self, step: u64, eval_loss: f64, n_tokens: u64) -> Result<(), LogError> {
        self.write_line(&EvalLine {
            kind: "eval",
            step,
            eval_loss,
            n_tokens,
        })?;
        self.tb.scalars(step, &[("eval/loss", eval_loss as f32)])?;
        self.tb.flush()
    }

    /// Flushes both files and `fsync`s their data (call it at checkpoints).
    pub fn flush(&mut self) -> Result<(), LogError> {
        self.jsonl
            .flush()
            .and_then(|()| self.jsonl.get_ref().sync_data())
            .map_err(|e| LogError::io(&self.log_path, e))?;
        self.tb.sync()
    }

    /// Reads `dir/log.jsonl` back, one JSON value per non-empty line (for the plot and for
    /// tests). A last line without its newline that does not parse (a write torn by a crash or
    /// still in progress) is skipped; any other line that does not parse is an error.
    pub fn read(dir: &Path) -> Result<Vec<serde_json::Value>, LogError> {
        let path = dir.join(LOG_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| LogError::io(&path, e))?;
        let complete = text.ends_with('\n');
        let lines: Vec<&str> = text.lines().collect();
        let mut out = Vec::with_capacity(lines.len());
        for (i, line) in lines.iter().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str(line) {
                Ok(v) => out.push(v),
                Err(_) if i + 1 == lines.len() && !complete => {}
                Err(source) => {
                    return Err(LogError::Json {
                        path,
                        line: i + 1,
                        source,
                    })
                }
            }
        }
        Ok(out)
    }
}

impl Drop for RunLog {
    fn drop(&mut self) {
        let _ = self.jsonl.flush();
        let _ = self.tb.flush();
    }
}

/// Keeps only the lines of `path` whose `step` is `<= last_step` (dropping lines that do not
/// parse or have no step); nothing to do if the file does not exist.
fn truncate_after(path: &Path, last_step: u64) -> Result<(), LogError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(LogError::io(path, e)),
    };
    let mut kept = String::with_capacity(text.len());
    // A last line without its newline must be rewritten even if kept, or the next append
    // would join it.
    let mut rewrite = !text.is_empty() && !text.ends_with('\n');
    for line in text.lines() {
        let step = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v.get("step").and_then(|s| s.as_u64()));
        match step {
            Some(s) if s <= last_step => {
                kept.push_str(line);
                kept.push('\n');
            }
            _ => rewrite = true,
        }
    }
    if !rewrite {
        return Ok(());
    }
    let tmp = path.with_extension("jsonl.tmp");
    std::fs::write(&tmp, kept).map_err(|e| LogError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| LogError::io(path, e))
}
