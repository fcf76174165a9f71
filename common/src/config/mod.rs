//! Configuration files: raw serde structs parsed from TOML, turned into validated types.
//!
//! Parse, don't validate: [`agent::AgentConfig`] and [`aggregator::AggregatorConfig`] can only be
//! built through their `parse` functions, which collect *every* problem with its dotted key and
//! the value given (`uplink.interval_secs: must be 1..=3600, got 0`) before refusing the file.
//! Unknown keys are refused by serde with their name. Relative paths are resolved against the
//! directory of the config file, so a config directory can be moved as a whole.

pub mod agent;
pub mod aggregator;

use std::fmt;
use std::path::{Path, PathBuf};

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading config {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS reason.
        #[source]
        source: std::io::Error,
    },
    /// The TOML is malformed, has an unknown key, or a value of the wrong type.
    #[error("config {origin}: {message}")]
    Parse {
        /// File path or `<embedded>`.
        origin: String,
        /// toml's message, which names the key and shows the line.
        message: String,
    },
    /// Values parsed but are not acceptable; every problem is listed.
    #[error("config {origin}: {} problem(s):\n{}", problems.len(), Problems(problems))]
    Invalid {
        /// File path or `<embedded>`.
        origin: String,
        /// One line per problem, each naming the dotted key and the value given.
        problems: Vec<String>,
    },
}

struct Problems<'a>(&'a [String]);

impl fmt::Display for Problems<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "  - {p}")?;
        }
        Ok(())
    }
}

/// Collects problems while turning a raw config into a validated one.
#[derive(Debug, Default)]
pub(crate) struct Checker {
    problems: Vec<String>,
}

impl Checker {
    /// Records a problem with `key` (dotted), what is required and the value given.
    pub(crate) fn problem(&mut self, key: &str, must: &str, got: impl fmt::Debug) {
        self.problems.push(format!("{key}: {must}, got {got:?}"));
    }

    /// Checks `lo <= v <= hi` for an integer value and returns it.
    pub(crate) fn range<T>(&mut self, key: &str, v: T, lo: T, hi: T) -> T
    where
        T: PartialOrd + fmt::Debug + fmt::Display + Copy,
    {
        if v < lo || v > hi {
            self.problem(key, &format!("must be {lo}..={hi}"), v);
        }
        v
    }

    /// Parses a socket address like `127.0.0.1:7443` or `[::]:7443`.
    pub(crate) fn socket_addr(&mut self, key: &str, v: &str) -> std::net::SocketAddr {
        v.parse().unwrap_or_else(|_| {
            self.problem(key, "must be an IP address and port such as 127.0.0.1:7443", v);
            std::net::SocketAddr::from(([127, 0, 0, 1], 0))
        })
    }

    /// A non-empty path, resolved against `base`.
    pub(crate) fn path(&mut self, key: &str, v: &Path, base: &Path) -> PathBuf {
        if v.as_os_str().is_empty() {
            self.problem(key, "must be a file path", v);
        }
        resolve(base, v)
    }

    /// Finishes: the value if there were no problems.
    pub(crate) fn finish<T>(self, origin: &str, value: T) -> Result<T, ConfigError> {
        if self.problems.is_empty() {
            Ok(value)
        } else {
            Err(ConfigError::Invalid { origin: origin.to_owned(), problems: self.problems })
        }
    }
}

/// `path` if absolute, else `base/path`.
pub fn resolve(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() { path.to_owned() } else { base.join(path) }
}

/// Reads a config file: its text, its origin name and the directory relative paths start from.
pub(crate) fn read_file(path: &Path) -> Result<(String, String, PathBuf), ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { path: path.into(), source })?;
    let base = path.parent().map(Path::to_owned).unwrap_or_default();
    let base = if base.as_os_str().is_empty() { PathBuf::from(".") } else { base };
    Ok((text, path.display().to_string(), base))
}

/// Deserializes TOML, mapping errors to [`ConfigError::Parse`].
pub(crate) fn from_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    origin: &str,
) -> Result<T, ConfigError> {
    toml::from_str(text)
        .map_err(|e| ConfigError::Parse { origin: origin.to_owned(), message: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every example config in `config/` parses and validates.
    #[test]
    fn example_configs_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with("agent") && name.ends_with(".toml") {
                agent::AgentConfig::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
                seen += 1;
            } else if name.starts_with("aggregator") && name.ends_with(".toml") {
                aggregator::AggregatorConfig::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
                seen += 1;
            }
        }
        assert!(seen >= 2, "expected agent and aggregator examples in {}", dir.display());
    }
}
