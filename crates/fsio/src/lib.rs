//! File safety shared by every cpmv command that writes: an output directory that is, contains
//! or lies inside one of the command's inputs is refused before anything is touched, and files
//! and directories are made durable (contents and directory entries fsynced) before the rename
//! that publishes them, so a crash or power loss never leaves a published name over missing data.

use std::fs::File;
use std::path::{Component, Path, PathBuf};

mod direct;
pub use direct::DirectWriter;

/// Why an output was refused or could not be made durable.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The output and an input of the same command overlap.
    #[error("{message}")]
    Overlap { message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FsError + '_ {
    move |source| FsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The absolute path `p` names, with every symlink of its existing part resolved: the longest
/// existing ancestor is canonicalised and the components that do not exist yet are appended
/// (lexically, `.` dropped and `..` applied), so two spellings of one place compare equal
/// whether or not the place exists yet.
pub fn resolve(p: &Path) -> Result<PathBuf, FsError> {
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().map_err(io(p))?.join(p)
    };
    let mut existing = abs.as_path();
    let mut rest: Vec<&std::ffi::OsStr> = Vec::new();
    loop {
        match std::fs::canonicalize(existing) {
            Ok(mut base) => {
                for c in rest.iter().rev() {
                    base.push(c);
                }
                return Ok(normalize(&base));
            }
            Err(e) => {
                let (Some(parent), Some(name)) = (existing.parent(), existing.file_name()) else {
                    return Err(FsError::Io {
                        path: p.to_path_buf(),
                        source: e,
                    });
                };
                rest.push(name);
                existing = parent;
            }
        }
    }
}

/// Applies `.` and `..` lexically (only used on the part of a path that does not exist, where
/// no symlink can intervene).
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// One input of a command, named by its flag for the error message.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    pub flag: &'a str,
    pub path: &'a Path,
}

impl<'a> Input<'a> {
    pub fn new(flag: &'a str, path: &'a Path) -> Self {
        Input { flag, path }
    }
}

/// Refuses an output directory that is, contains or lies inside any of `inputs` (symlinks
/// resolved). Writing there could overwrite, truncate or delete the inputs the command is
/// still reading (a model copied onto itself is truncated to 0 bytes).
pub fn refuse_overlap(out_flag: &str, out: &Path, inputs: &[Input]) -> Result<(), FsError> {
    let o = resolve(out)?;
    for input in inputs {
        let i = resolve(input.path)?;
        let relation = if o == i {
            "is"
        } else if i.starts_with(&o) {
            "contains"
        } else if o.starts_with(&i) {
            "lies inside"
        } else {
            continue;
        };
        return Err(FsError::Overlap {
            message: format!(
                "{out_flag} {} {relation} {} {} ({}); writing there could overwrite or delete \
                 the input while it is read: choose an output directory outside it",
                out.display(),
                input.flag,
                input.path.display(),
                i.display()
            ),
        });
    }
    Ok(())
}

/// Flushes a file's contents and metadata to the disk.
pub fn sync_file(path: &Path) -> Result<(), FsError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io(path))
}

/// Flushes a directory's entries (names created, renamed or removed in it) to the disk.
pub fn sync_dir(dir: &Path) -> Result<(), FsError> {
    #[cfg(unix)]
    {
        File::open(dir).and_then(|f| f.sync_all()).map_err(io(dir))
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// Flushes every file below `dir` and every directory, `dir` included.
pub fn sync_tree(dir: &Path) -> Result<(), FsError> {
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(io(&path))?;
        if kind.is_dir() {
            sync_tree(&path)?;
        } else if kind.is_file() {
            sync_file(&path)?;
        }
    }
    sync_dir(dir)
}

/// Publishes a finished file or directory `from` under the name `to` (same directory): its
/// contents are flushed first, then it is renamed and the parent directory is flushed, so after
/// a crash `to` is either absent (or the previous version) or complete.
pub fn publish(from: &Path, to: &Path) -> Result<(), FsError> {
    if from.is_dir() {
        sync_tree(from)?;
    } else {
        sync_file(from)?;
    }
    std::fs::rename(from, to).map_err(io(to))?;
    sync_dir(to.parent().unwrap_or(Path::new(".")))
}

/// Writes `bytes` to `path` durably: a `.partial` sibling written and flushed, then published.
/// A failed write removes the partial file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), FsError> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    let tmp = path.with_file_name(name);
    let res = std::fs::write(&tmp, bytes)
        .map_err(io(&tmp))
        .and_then(|()| publish(&tmp, path));
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_is_found_through_symlinks_dots_and_missing_parts() {
        let tmp = tempfile::tempdir().unwrap();
        let model = tmp.path().join("model");
        std::fs::create_dir_all(model.join("sub")).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&model, &link).unwrap();
        let input = [Input {
            flag: "--model",
            path: &model,
        }];
        let refused = |out: &Path| {
            refuse_overlap("--output", out, &input)
                .unwrap_err()
                .to_string()
        };
        assert!(refused(&model).contains(" is --model"));
        assert!(refused(&link).contains(" is --model"));
        assert!(refused(&tmp.path().join("model/./sub/../")).contains(" is --model"));
        assert!(refused(&link.join("new/run")).contains("lies inside --model"));
        assert!(refused(tmp.path()).contains("contains --model"));
        refuse_overlap("--output", &tmp.path().join("run"), &input).unwrap();
        // A sibling whose name starts like the input is not inside it.
        refuse_overlap("--output", &tmp.path().join("model-run"), &input).unwrap();
    }

    #[test]
    fn relative_paths_resolve_against_the_working_directory() {
        let here = std::env::current_dir().unwrap();
        assert_eq!(
            resolve(Path::new("no-such-dir/x")).unwrap(),
            std::fs::canonicalize(&here).unwrap().join("no-such-dir/x")
        );
    }

    #[test]
    fn atomic_write_publishes_complete_files_only() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("a.json");
        write_atomic(&p, b"{}\n").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"{}\n");
        assert!(!tmp.path().join("a.json.partial").exists());
        // A write into a missing directory fails and leaves nothing.
        let q = tmp.path().join("missing/b.json");
        assert!(write_atomic(&q, b"x").is_err());
        let d = tmp.path().join("d.partial");
        std::fs::create_dir_all(d.join("e")).unwrap();
        std::fs::write(d.join("e/f"), b"1").unwrap();
        publish(&d, &tmp.path().join("d")).unwrap();
        assert_eq!(std::fs::read(tmp.path().join("d/e/f")).unwrap(), b"1");
    }
}
