//! File and directory sources, and the watcher that notices their changes.
//!
//! Editors save in many ways: writing in place, writing a temp file and
//! renaming it over the original, or moving the original to a backup first
//! (vim). The watcher therefore watches the *directory*, ignores names
//! editors use for temp, swap and backup files, and only signals; the store
//! debounces the signals and reloads once things are quiet, and publishes
//! only if the merged content actually changed. Together: one reload per
//! save, none for temp files alone.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use notify::{
    EventKind, RecommendedWatcher, RecursiveMode, Watcher,
    event::{AccessKind, AccessMode},
};
use tokio::sync::mpsc;

use crate::{
    ConfigError,
    value::{Layer, expand_placeholders, parse_file},
};

/// Whether `name` is an editor's temp, swap or backup file, or hidden.
pub(crate) fn is_temp(name: &str) -> bool {
    name.starts_with('.')                       // .x.swp, .#x (emacs lock), hidden files
        || name.starts_with('#')                // #x# (emacs autosave)
        || name.ends_with('~')                  // x~ (backups)
        || name == "4913"                       // vim's probe file
        || [".swp", ".swx", ".swo", ".tmp", ".bak", ".orig", "___jb_tmp___", "___jb_old___", ".kate-swp", ".crswap"]
            .iter()
            .any(|s| name.ends_with(s))
}

/// Whether `path` is a config file a directory source reads.
pub(crate) fn is_config_file(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    !is_temp(name) && matches!(ext.as_str(), "toml" | "yaml" | "yml" | "json")
}

/// The file and directory sources, in the order given.
#[derive(Debug, Clone, Default)]
pub(crate) struct FileSources {
    paths: Vec<PathBuf>,
}

impl FileSources {
    pub(crate) fn push(&mut self, path: PathBuf) {
        // Absolute, so watcher events (reported under the watched
        // directory) compare equal to the configured paths.
        self.paths.push(std::path::absolute(&path).unwrap_or(path));
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// Reads every file (a directory: its config files in name order).
    pub(crate) fn load(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Vec<Layer>, ConfigError> {
        let mut layers = Vec::new();
        for path in &self.paths {
            let read_err = |e: std::io::Error| ConfigError::Read {
                source_name: format!("file {}", path.display()),
                reason: e.to_string(),
            };
            if path.is_dir() {
                let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                    .map_err(read_err)?
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| p.is_file() && is_config_file(p))
                    .collect();
                files.sort();
                for file in files {
                    layers.push(load_file(&file, env)?);
                }
            } else {
                layers.push(load_file(path, env)?);
            }
        }
        Ok(layers)
    }

    /// Watches the sources' directories; sends a unit for every event that
    /// may change what [`FileSources::load`] reads.
    pub(crate) fn watch(&self, tx: mpsc::Sender<()>) -> Result<RecommendedWatcher, ConfigError> {
        let files: BTreeSet<PathBuf> = self.paths.iter().filter(|p| !p.is_dir()).cloned().collect();
        let dirs: BTreeSet<PathBuf> = self.paths.iter().filter(|p| p.is_dir()).cloned().collect();
        let watched: BTreeSet<PathBuf> = files
            .iter()
            .filter_map(|f| f.parent().map(Path::to_path_buf))
            .chain(dirs.iter().cloned())
            .collect();
        let (files2, dirs2) = (files.clone(), dirs.clone());
        let relevant = move |p: &Path| {
            files2.contains(p)
                || (p.parent().is_some_and(|d| dirs2.contains(d)) && is_config_file(p))
        };
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let Ok(event) = event else { return };
                let interesting = matches!(
                    event.kind,
                    EventKind::Create(_)
                        | EventKind::Modify(_)
                        | EventKind::Remove(_)
                        | EventKind::Access(AccessKind::Close(AccessMode::Write))
                );
                if interesting && event.paths.iter().any(|p| relevant(p)) {
                    // Full means a reload is already pending: dropping is fine.
                    let _ = tx.try_send(());
                }
            })
            .map_err(|e| ConfigError::Read {
                source_name: "file watcher".into(),
                reason: e.to_string(),
            })?;
        for dir in &watched {
            watcher
                .watch(dir, RecursiveMode::NonRecursive)
                .map_err(|e| ConfigError::Read {
                    source_name: format!("file watcher on {}", dir.display()),
                    reason: e.to_string(),
                })?;
        }
        Ok(watcher)
    }
}

fn load_file(path: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Layer, ConfigError> {
    let source = format!("file {}", path.display());
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
        source_name: source.clone(),
        reason: e.to_string(),
    })?;
    let mut doc = parse_file(path, &text)?;
    expand_placeholders(&mut doc, env, &source, "")?;
    Ok(Layer {
        source,
        doc,
        version: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_editor_droppings() {
        for temp in [
            ".config.toml.swp",
            "config.toml~",
            "4913",
            "#config.toml#",
            ".#config.toml",
            "config.toml.tmp",
            "config.toml___jb_tmp___",
        ] {
            assert!(is_temp(temp), "{temp}");
            assert!(!is_config_file(Path::new(temp)), "{temp}");
        }
        for real in ["config.toml", "10-db.yaml", "x.yml", "a.json"] {
            assert!(is_config_file(Path::new(real)), "{real}");
        }
        assert!(!is_config_file(Path::new("README.md")));
    }
}
