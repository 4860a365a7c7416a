//! Configuration files: TOML, parsed with serde and validated at load time.
//!
//! Unknown fields are errors (a typo must not silently fall back to a default), and every error
//! names the file and the field. Relative paths inside a file are relative to that file.
pub mod agent;
pub mod relay;
pub mod shield;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("config file {path}: `{field}`: {message}")]
    Invalid {
        path: PathBuf,
        field: String,
        message: String,
    },
}

/// Reads and parses `path`; the caller validates.
pub(crate) fn read_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.into(),
        source: Box::new(source),
    })
}

/// Makes `relative` relative to the directory holding the config file.
pub(crate) fn resolve(config_path: &Path, relative: &Path) -> PathBuf {
    match config_path.parent() {
        Some(dir) if relative.is_relative() => dir.join(relative),
        _ => relative.to_path_buf(),
    }
}

/// Builds a [`ConfigError::Invalid`] for `field`.
pub(crate) fn invalid(path: &Path, field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        path: path.into(),
        field: field.into(),
        message: message.into(),
    }
}

/// A duration field must be positive.
pub(crate) fn positive(path: &Path, field: &str, value: Duration) -> Result<(), ConfigError> {
    if value.is_zero() {
        Err(invalid(path, field, "must be greater than zero"))
    } else {
        Ok(())
    }
}
