//! rthooks' one configuration mechanism.
//!
//! Every binary (agent, OCI hook, NRI plugin) describes its settings once, as a
//! `clap::Parser` with `#[arg(long, env = "...", default_value = ...)]`, and gets the same
//! layering: **flag > environment variable > config file > default**.
//!
//! * [`Layers::parse`] parses the command line and the environment (clap does both).
//! * [`ConfigFile`] is the file layer: a JSON object whose keys are long flag names
//!   (`"grpc-timeout"`; `"grpc_timeout"` works too). A binary that reads YAML converts it
//!   to a JSON value and uses [`ConfigFile::from_value`].
//! * [`Layers::with_file`] fills in, from the file, every setting that neither a flag nor
//!   the environment gave, by handing clap the file's values as flags: one parser, one set
//!   of value checks, one `--help`. Keys it cannot use are reported as [`KeyProblem`]s and
//!   skipped; the caller decides whether they are fatal (agent, NRI plugin) or warnings
//!   (the hook, which must not refuse containers over a config typo).
//!
//! [`parse_duration`] is the one duration syntax (Go's `time.ParseDuration`, plus a bare
//! number meaning seconds), [`format_duration`] its inverse.

mod duration;

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::error::{ContextKind, ContextValue};
use clap::parser::ValueSource;
use clap::{ArgMatches, Parser};
use serde_json::{Map, Value};

pub use duration::{format_duration, parse_duration, DurationError};

/// Why a config file could not be used at all.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// Reading the file failed.
    #[error("reading config file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not JSON.
    #[error("config file {} is not valid JSON", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The file's top level is not an object of settings.
    #[error("config file {} is not an object of settings (keys = long flag names)", path.display())]
    NotAnObject {
        /// The file.
        path: PathBuf,
    },
}

impl FileError {
    /// Whether the file simply does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, FileError::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// One key of a config file that was not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyProblem {
    /// No flag has this long name.
    #[error("unknown key {key:?}")]
    Unknown {
        /// The key as written.
        key: String,
    },
    /// The flag exists but is not settable from a file (e.g. the file's own path).
    #[error("key {key:?} cannot be set in a config file")]
    NotSettable {
        /// The key as written.
        key: String,
    },
    /// The value has a shape no flag value can take (an object, a nested list).
    #[error("{key}: expected a string, number, boolean or list of those")]
    NotScalar {
        /// The key as written.
        key: String,
    },
    /// The flag refused the value.
    #[error("{key}: {reason}")]
    Invalid {
        /// The key as written.
        key: String,
        /// What the flag's parser said.
        reason: String,
    },
}

/// The file layer: settings keyed by long flag name.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigFile {
    /// Where the settings came from (for messages).
    pub path: PathBuf,
    /// The settings.
    pub values: Map<String, Value>,
}

impl ConfigFile {
    /// Reads a JSON config file.
    pub fn read_json(path: impl Into<PathBuf>) -> Result<Self, FileError> {
        let path = path.into();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(source) => return Err(FileError::Read { path, source }),
        };
        match serde_json::from_slice(&bytes) {
            Ok(v) => Self::from_value(path, v),
            Err(source) => Err(FileError::Json { path, source }),
        }
    }

    /// Settings already parsed into a JSON value (e.g. converted from YAML).
    pub fn from_value(path: impl Into<PathBuf>, value: Value) -> Result<Self, FileError> {
        let path = path.into();
        match value {
            Value::Object(values) => Ok(ConfigFile { path, values }),
            _ => Err(FileError::NotAnObject { path }),
        }
    }
}

/// A parsed command line (flags and environment), ready to take a file layer.
#[derive(Debug)]
pub struct Layers<T> {
    cmd: clap::Command,
    args: Vec<OsString>,
    matches: ArgMatches,
    value: T,
}

/// The result of [`Layers::with_file`].
#[derive(Debug)]
pub struct Layered<T> {
    /// The settings, every layer applied.
    pub value: T,
    /// The file's keys that were not applied (each skipped, the rest applied).
    pub problems: Vec<KeyProblem>,
}

impl<T: Parser> Layers<T> {
    /// Parses flags and environment. `Err` is clap's (help, version, a bad flag): callers
    /// usually `exit()` it.
    pub fn parse<I, A>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = A>,
        A: Into<OsString> + Clone,
    {
        let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
        let mut cmd = T::command();
        let matches = cmd.try_get_matches_from_mut(&args)?;
        let value = T::from_arg_matches(&matches)?;
        Ok(Layers {
            cmd,
            args,
            matches,
            value,
        })
    }

    /// The settings from flags, environment and defaults.
    pub fn value(&self) -> &T {
        &self.value
    }

    /// The settings from flags, environment and defaults, without a file.
    pub fn into_value(self) -> T {
        self.value
    }

    /// What clap parsed from flags and environment.
    pub fn matches(&self) -> &ArgMatches {
        &self.matches
    }

    /// Whether the flag with clap id `id` got its value from the command line or the
    /// environment (so a file cannot change it).
    pub fn given(&self, id: &str) -> bool {
        given(&self.matches, id)
    }

    /// Applies `file` below flags and environment. Keys naming a flag whose clap id is in
    /// `not_settable` are refused (e.g. the flag that names the file).
    pub fn with_file(mut self, file: &ConfigFile, not_settable: &[&str]) -> Layered<T> {
        let mut problems = Vec::new();
        // (key, flag arguments it became), in file order.
        let mut from_file: Vec<(String, Vec<OsString>)> = Vec::new();
        for (key, val) in &file.values {
            let long = key.replace('_', "-");
            let Some(arg) = self
                .cmd
                .get_arguments()
                .find(|a| a.get_long() == Some(long.as_str()))
            else {
                problems.push(KeyProblem::Unknown { key: key.clone() });
                continue;
            };
            let id = arg.get_id().as_str();
            if not_settable.contains(&id) {
                problems.push(KeyProblem::NotSettable { key: key.clone() });
                continue;
            }
            if given(&self.matches, id) {
                continue;
            }
            match flag_args(&long, arg.get_action().takes_values(), val) {
                Ok(a) if a.is_empty() => {}
                Ok(a) => from_file.push((key.clone(), a)),
                Err(()) => problems.push(KeyProblem::NotScalar { key: key.clone() }),
            }
        }
        // clap checks every value as it would on the command line. A value it refuses is
        // dropped with its key and the rest parsed again; each round drops one key.
        loop {
            if from_file.is_empty() {
                return Layered {
                    value: self.value,
                    problems,
                };
            }
            let mut argv = vec![self.args[0].clone()];
            argv.extend(from_file.iter().flat_map(|(_, a)| a.iter().cloned()));
            argv.extend(self.args[1..].iter().cloned());
            let parsed = self
                .cmd
                .try_get_matches_from_mut(&argv)
                .and_then(|m| T::from_arg_matches(&m));
            let err = match parsed {
                Ok(value) => {
                    return Layered { value, problems };
                }
                Err(e) => e,
            };
            let culprit = failing_long(&err).and_then(|long| {
                from_file
                    .iter()
                    .position(|(key, _)| key.replace('_', "-") == long)
            });
            let reason = first_line(&err);
            match culprit {
                Some(i) => {
                    let (key, _) = from_file.remove(i);
                    problems.push(KeyProblem::Invalid { key, reason });
                }
                None => {
                    // Not attributable to one key: none of the file applies.
                    for (key, _) in from_file.drain(..) {
                        problems.push(KeyProblem::Invalid {
                            key,
                            reason: reason.clone(),
                        });
                    }
                }
            }
        }
    }
}

fn given(m: &ArgMatches, id: &str) -> bool {
    matches!(
        m.value_source(id),
        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
    )
}

/// A file value as flag arguments: `--long=value`, one per list item. A flag that takes no
/// value (a plain switch) is given for `true` and left out for `false`.
fn flag_args(long: &str, takes_values: bool, val: &Value) -> Result<Vec<OsString>, ()> {
    let scalar = |v: &Value| -> Result<String, ()> {
        match v {
            Value::String(s) => Ok(s.clone()),
            Value::Number(n) => Ok(n.to_string()),
            Value::Bool(b) => Ok(b.to_string()),
            _ => Err(()),
        }
    };
    if !takes_values {
        return match val {
            Value::Bool(true) => Ok(vec![format!("--{long}").into()]),
            Value::Bool(false) | Value::Null => Ok(vec![]),
            Value::String(s) if s == "true" => Ok(vec![format!("--{long}").into()]),
            Value::String(s) if s == "false" => Ok(vec![]),
            // Passed on so clap says what it thinks of a value for a switch.
            other => Ok(vec![format!("--{long}={}", scalar(other)?).into()]),
        };
    }
    match val {
        Value::Null => Ok(vec![]),
        Value::Array(items) => items
            .iter()
            .map(|v| scalar(v).map(|s| format!("--{long}={s}").into()))
            .collect(),
        other => Ok(vec![format!("--{long}={}", scalar(other)?).into()]),
    }
}

/// The long name of the flag a clap error is about, if it names one.
fn failing_long(err: &clap::Error) -> Option<String> {
    let Some(ContextValue::String(arg)) = err.get(ContextKind::InvalidArg) else {
        return None;
    };
    let rest = arg.strip_prefix("--")?;
    Some(rest.split([' ', '=']).next().unwrap_or(rest).to_owned())
}

fn first_line(err: &clap::Error) -> String {
    let text = err.to_string();
    let line = text.lines().next().unwrap_or_default();
    line.strip_prefix("error: ").unwrap_or(line).to_owned()
}

/// `name` in the directory of the running binary, symlinks resolved (a binary installed as
/// a link still finds the file beside its real location).
pub fn beside_binary(name: impl AsRef<Path>) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let exe = std::fs::canonicalize(&exe).unwrap_or(exe);
    Some(exe.parent()?.join(name))
}

#[cfg(test)]
mod tests;
