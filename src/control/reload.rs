//! Reloading the configuration from its file (SIGHUP, `POST /reload`, file changes): load,
//! validate, and hand the new configuration to the registry; an invalid file changes nothing.

use std::path::PathBuf;
use std::sync::Weak;

use super::registry::Registry;
use crate::config::{Config, ConfigError, Env};

/// Reloads the configuration from its file (SIGHUP, `POST /reload`, file changes).
pub struct Reloader {
    registry: Weak<Registry>,
    path: PathBuf,
    env: Env,
}

/// The outcome of a successful reload.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Reloaded {
    /// Settings that changed in the file but need a restart to take effect.
    pub restart_needed: Vec<String>,
}

impl Reloader {
    /// Loads, validates and installs the file. An invalid file changes nothing.
    pub fn reload(&self) -> Result<Reloaded, ConfigError> {
        let config = Config::load(&self.path, &self.env)?;
        let Some(registry) = self.registry.upgrade() else {
            return Ok(Reloaded {
                restart_needed: Vec::new(),
            });
        };
        let restart_needed = registry.reload(config);
        for r in &restart_needed {
            tracing::warn!(setting = %r, "changed setting needs a restart to take effect");
        }
        tracing::info!(path = %self.path.display(), "configuration reloaded");
        Ok(Reloaded { restart_needed })
    }

    /// Reloads and logs the outcome (for signal and file triggers).
    pub fn reload_and_log(&self, trigger: &str) {
        if let Err(e) = self.reload() {
            tracing::error!(trigger, problems = ?e.problems(), "reload rejected; the running configuration stays");
        }
    }

    /// The file's modification time and size, to notice changes.
    pub fn fingerprint(&self) -> Option<(std::time::SystemTime, u64)> {
        let m = std::fs::metadata(&self.path).ok()?;
        Some((m.modified().ok()?, m.len()))
    }
}

impl Reloader {
    /// A reloader of `path` into `registry`.
    pub fn new(registry: Weak<Registry>, path: PathBuf, env: Env) -> Self {
        Self {
            registry,
            path,
            env,
        }
    }
}
