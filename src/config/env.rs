//! The environment as a value (`Env`): the `MESHGATE_*` figment layer and the variables that
//! sections read (`CONSUL_*`, `OTEL_*`), so validation never reads the process environment.

use std::collections::BTreeMap;

use figment::providers::Serialized;
use figment::Figment;

/// The environment as a set of variables, so tests never touch the process environment.
#[derive(Debug, Clone, Default)]
pub struct Env {
    vars: BTreeMap<String, String>,
}

impl Env {
    /// A snapshot of the process environment (non-UTF-8 variables are skipped).
    pub fn from_process() -> Self {
        Self::from_pairs(
            std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))),
        )
    }

    /// An environment made of the given variables only.
    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Self {
            vars: pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
    }

    /// One variable, when set and not empty.
    pub fn get(&self, name: &str) -> Option<String> {
        self.vars.get(name).filter(|v| !v.is_empty()).cloned()
    }

    /// True when some `MESHGATE_*` variable is set (not empty): enough to run without a file.
    pub fn has_meshgate_vars(&self) -> bool {
        self.vars.iter().any(|(k, v)| {
            k.len() > "MESHGATE_".len() && k.starts_with("MESHGATE_") && !v.is_empty()
        })
    }

    /// `MESHGATE_A__B=v` as the figment layer `a.b = v` (values parsed as TOML-like scalars).
    pub(super) fn provider(&self) -> Figment {
        let mut fig = Figment::new();
        for (key, value) in &self.vars {
            let Some(rest) = key.strip_prefix("MESHGATE_") else {
                continue;
            };
            if rest.is_empty() {
                continue;
            }
            let path = rest.to_ascii_lowercase().replace("__", ".");
            let value: figment::value::Value = value
                .parse()
                .unwrap_or_else(|e: std::convert::Infallible| match e {});
            fig = fig.merge(Serialized::defaults(figment::util::nest(&path, value)));
        }
        fig
    }
}
