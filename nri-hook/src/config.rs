//! The NRI plugin's settings: flags, environment variables and an optional JSON file
//! (`--config`), layered by the shared mechanism (`rthooks-config`).

use std::ffi::OsString;
use std::path::PathBuf;

use clap::Parser;
use rthooks_config::{ConfigFile, KeyProblem, Layers};

use crate::nri::DEFAULT_SOCKET;
use crate::rthooks::{DEFAULT_AGENT_ADDRESS, DEFAULT_HOOK_PATH, DEFAULT_HOOK_TIMEOUT_SECS};

/// Why the settings could not be assembled.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Help, version or a bad flag: clap's own error, to `exit()`.
    #[error(transparent)]
    Flags(#[from] clap::Error),
    /// The config file could not be read or parsed.
    #[error(transparent)]
    File(#[from] rthooks_config::FileError),
    /// Keys of the file that cannot be used; the plugin refuses to start on any.
    #[error("config file {}: {}", path.display(), problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Keys {
        /// The file.
        path: PathBuf,
        /// Each unusable key.
        problems: Vec<KeyProblem>,
    },
}

/// The plugin's settings.
#[derive(Parser, Debug, Clone, PartialEq)]
#[command(
    name = "rthooks-nri-hook",
    version,
    about,
    after_help = "Precedence: flag > environment variable > --config file > default."
)]
pub struct Args {
    /// Configuration file: a JSON object whose keys are long flag names (e.g. "hook-path").
    #[arg(long, env = "RTHOOKS_NRI_CONFIG")]
    pub config: Option<PathBuf>,
    /// NRI socket to connect to (ignored when the runtime launched us with NRI_PLUGIN_SOCKET).
    #[arg(long, env = "RTHOOKS_NRI_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: String,
    /// Plugin name used for registration (NRI_PLUGIN_NAME wins when set by the runtime).
    #[arg(long, env = "RTHOOKS_NRI_NAME", default_value = "rthooks")]
    pub name: String,
    /// Plugin index: plugins are called in ascending order (NRI_PLUGIN_IDX wins).
    #[arg(long, env = "RTHOOKS_NRI_IDX", default_value = "10")]
    pub idx: String,
    /// Path of the OCI hook to inject.
    #[arg(long, env = "RTHOOKS_HOOK_PATH", default_value = DEFAULT_HOOK_PATH)]
    pub hook_path: String,
    /// The hook's argv (argv[0] first), comma-separated.
    #[arg(
        long,
        env = "RTHOOKS_HOOK_ARGS",
        value_delimiter = ',',
        default_value = "rthooks-oci-hook,createRuntime"
    )]
    pub hook_args: Vec<String>,
    /// Environment for the hook (KEY=value), repeatable.
    #[arg(long = "hook-env", env = "RTHOOKS_HOOK_ENV", value_delimiter = ',')]
    pub hook_env: Vec<String>,
    /// The hook's OCI timeout in seconds.
    #[arg(long, env = "RTHOOKS_HOOK_TIMEOUT", default_value_t = DEFAULT_HOOK_TIMEOUT_SECS)]
    pub hook_timeout: i64,
    /// The agent's gRPC address, for Synchronize/RemoveContainer reports ("" or "none" to
    /// disable).
    #[arg(long, env = "RTHOOKS_AGENT_ADDRESS", default_value = DEFAULT_AGENT_ADDRESS)]
    pub agent_address: String,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "RTHOOKS_LOG", default_value = "info")]
    pub log: String,
}

/// Parses the command line (argv[0] first), the environment and the `--config` file.
pub fn parse<I, A>(args: I) -> Result<Args, ConfigError>
where
    I: IntoIterator<Item = A>,
    A: Into<OsString> + Clone,
{
    let layers = Layers::<Args>::parse(args)?;
    let Some(path) = layers.value().config.clone() else {
        return Ok(layers.into_value());
    };
    let file = ConfigFile::read_json(&path)?;
    let layered = layers.with_file(&file, &["config"]);
    if !layered.problems.is_empty() {
        return Err(ConfigError::Keys {
            path,
            problems: layered.problems,
        });
    }
    Ok(layered.value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_flags_and_file() {
        let a = parse(["rthooks-nri-hook"]).unwrap();
        assert_eq!(a.socket, DEFAULT_SOCKET);
        assert_eq!((a.name.as_str(), a.idx.as_str()), ("rthooks", "10"));
        assert_eq!(a.hook_args, ["rthooks-oci-hook", "createRuntime"]);
        assert_eq!(a.hook_timeout, DEFAULT_HOOK_TIMEOUT_SECS);

        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("nri.json");
        std::fs::write(
            &f,
            r#"{"hook-path":"/opt/x/hook","hook-args":["hook","createRuntime","--fail-open"],
                "hook-env":["A=1","B=2"],"hook-timeout":7,"idx":"05"}"#,
        )
        .unwrap();
        let a = parse([
            "rthooks-nri-hook",
            "--config",
            f.to_str().unwrap(),
            "--idx",
            "20",
        ])
        .unwrap();
        assert_eq!(a.hook_path, "/opt/x/hook");
        assert_eq!(a.hook_args, ["hook", "createRuntime", "--fail-open"]);
        assert_eq!(a.hook_env, ["A=1", "B=2"]);
        assert_eq!(a.hook_timeout, 7);
        assert_eq!(a.idx, "20", "the flag wins over the file");

        std::fs::write(&f, r#"{"hook-timeout":"soon","colour":"blue"}"#).unwrap();
        let e = parse(["rthooks-nri-hook", "--config", f.to_str().unwrap()]).unwrap_err();
        let ConfigError::Keys { problems, .. } = &e else {
            panic!("{e}")
        };
        assert_eq!(problems.len(), 2, "{e}");
        assert!(e.to_string().contains("unknown key \"colour\""), "{e}");
        assert!(matches!(
            parse(["rthooks-nri-hook", "--config", "/nonexistent/nri.json"]),
            Err(ConfigError::File(_))
        ));
    }
}
