//! The optional TOML settings file: reading it, turning its keys into flags
//! for the settings nothing else set, and its namespace quota tables.

use std::ffi::OsString;
use std::path::Path;

use clap::parser::ValueSource;
use clap::CommandFactory;

use super::{Config, ConfigError};

/// An error about the config file at `path`.
fn file_error(path: &Path, message: String) -> ConfigError {
    ConfigError::File {
        path: path.to_path_buf(),
        message,
    }
}

/// Reads and parses the config file, once.
pub(super) fn file_table(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| file_error(path, format!("cannot read it: {e}")))?;
    text.parse()
        .map_err(|e: toml::de::Error| file_error(path, e.to_string().trim().to_owned()))
}

/// The `[namespaces."name"]` quota tables of a config file.
pub(super) fn namespace_quotas(
    path: &Path,
    table: &toml::Table,
    default_on_full: crate::engine::quota::OnFull,
) -> Result<std::collections::BTreeMap<String, crate::engine::quota::NamespaceQuota>, ConfigError> {
    let fail = |message: String| file_error(path, message);
    match table.get("namespaces") {
        None => Ok(std::collections::BTreeMap::new()),
        Some(toml::Value::Table(namespaces)) => {
            crate::engine::quota::Quotas::parse_namespaces(namespaces, default_on_full)
                .map_err(fail)
        }
        Some(_) => Err(fail(
            "namespaces must be a table of [namespaces.\"name\"] tables".into(),
        )),
    }
}

/// Turns the keys of a TOML file into `--flag value` arguments for the
/// settings that were left at their defaults.
pub(super) fn file_arguments(
    path: &Path,
    table: &toml::Table,
    matches: &clap::ArgMatches,
) -> Result<Vec<OsString>, ConfigError> {
    let fail = |message: String| file_error(path, message);
    let command = Config::command();
    let mut args = Vec::new();
    for (key, value) in table {
        if key == "namespaces" {
            // Read by `namespace_quotas`: a table, not a flag.
            continue;
        }
        let id = key.replace('-', "_");
        let known = command.get_arguments().find(|a| {
            a.get_id().as_str() == id
                && a.get_long().is_some()
                && !matches!(id.as_str(), "config" | "print_config")
        });
        let Some(arg) = known else {
            return Err(fail(format!(
                "unknown setting {key:?}; see trove-server --help for the settings"
            )));
        };
        let value = match value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Float(f) => f.to_string(),
            other => {
                return Err(fail(format!(
                    "setting {key:?} must be a string, number or boolean, not {}",
                    other.type_str()
                )))
            }
        };
        let explicit = matches!(
            matches.value_source(&id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        );
        if !explicit {
            // `--flag=value` keeps values such as "-1" from reading as flags.
            let long = arg.get_long().unwrap_or(&id);
            args.push(OsString::from(format!("--{long}={value}")));
        }
    }
    Ok(args)
}
