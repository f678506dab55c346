use std::time::Duration;

use super::*;

/// A command shaped like the binaries': switches, `Set` booleans, lists, durations, enums.
#[derive(Debug, Parser, PartialEq)]
#[command(name = "t")]
struct Args {
    stage: Option<String>,
    #[arg(long, default_value = "unix:///default")]
    address: String,
    /// Only `environment_wins_over_the_file` sets its variable (tests run in parallel).
    #[arg(long, env = "RTHOOKS_CONFIG_TEST_ENV_ONLY", default_value = "default")]
    env_only: String,
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    timeout: Duration,
    #[arg(long, default_value = "a,b", value_delimiter = ',', action = clap::ArgAction::Append)]
    names: Vec<String>,
    #[arg(long, value_delimiter = ',')]
    uids: Vec<u32>,
    #[arg(long)]
    switch: bool,
    #[arg(long, num_args = 0..=1, default_value = "false", default_missing_value = "true", action = clap::ArgAction::Set)]
    open: bool,
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
    #[arg(long)]
    max_size: Option<u64>,
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, clap::ValueEnum)]
enum Format {
    Text,
    Json,
}

fn file(json: &str) -> ConfigFile {
    ConfigFile::from_value("t.json", serde_json::from_str(json).unwrap()).unwrap()
}

fn layered(args: &[&str], json: &str) -> Layered<Args> {
    let mut argv = vec!["t"];
    argv.extend_from_slice(args);
    Layers::<Args>::parse(argv)
        .unwrap()
        .with_file(&file(json), &["config"])
}

#[test]
fn file_fills_what_flags_left_unset() {
    let l = layered(
        &["createRuntime", "--timeout", "5s"],
        r#"{"address":"unix:///file","timeout":"300ms","names":["x","y"],"uids":"1,2",
            "switch":true,"open":true,"format":"json"}"#,
    );
    assert!(l.problems.is_empty(), "{:?}", l.problems);
    let v = l.value;
    assert_eq!(v.stage.as_deref(), Some("createRuntime"));
    assert_eq!(v.address, "unix:///file");
    assert_eq!(v.timeout, Duration::from_secs(5), "the flag wins");
    assert_eq!(v.names, ["x", "y"], "a file list replaces the default");
    assert_eq!(v.uids, [1, 2]);
    assert!(v.switch && v.open);
    assert_eq!(v.format, Format::Json);
}

#[test]
fn file_values_of_every_json_shape() {
    let v = layered(
        &[],
        r#"{"timeout":0.25,"names":"p, q","switch":false,"open":"false","address":null}"#,
    )
    .value;
    assert_eq!(v.timeout, Duration::from_millis(250), "a number is seconds");
    assert_eq!(v.names, ["p", " q"]);
    assert!(!v.switch && !v.open);
    assert_eq!(v.address, "unix:///default", "null leaves the default");
    // Underscores name the same flag.
    let v = layered(&[], r#"{"max_size":3,"max-size":4}"#).value;
    assert!(matches!(v.max_size, Some(3 | 4)), "{v:?}");
    assert_eq!(layered(&[], r#"{"max_size":3}"#).value.max_size, Some(3));
    assert!(layered(&[], r#"{"switch":"true"}"#).value.switch);
}

#[test]
fn environment_wins_over_the_file() {
    std::env::set_var("RTHOOKS_CONFIG_TEST_ENV_ONLY", "env");
    let l = layered(&[], r#"{"env-only":"file","address":"unix:///file"}"#);
    std::env::remove_var("RTHOOKS_CONFIG_TEST_ENV_ONLY");
    assert_eq!(l.value.env_only, "env");
    assert_eq!(l.value.address, "unix:///file");
}

#[test]
fn bad_keys_are_reported_and_skipped_one_by_one() {
    let l = layered(
        &[],
        r#"{"bogus":1,"config":"/x","timeout":"10x","format":"yaml","names":{"a":1},
            "uids":"1,x","switch":3,"address":"unix:///still-applied"}"#,
    );
    assert_eq!(l.value.address, "unix:///still-applied");
    assert_eq!(l.value.timeout, Duration::from_secs(2));
    assert_eq!(l.value.format, Format::Text);
    assert_eq!(l.value.names, ["a", "b"]);
    assert!(l.value.uids.is_empty() && !l.value.switch);
    let keys: Vec<String> = l
        .problems
        .iter()
        .map(|p| match p {
            KeyProblem::Unknown { key }
            | KeyProblem::NotSettable { key }
            | KeyProblem::NotScalar { key }
            | KeyProblem::Invalid { key, .. } => key.clone(),
        })
        .collect();
    assert_eq!(l.problems.len(), 7, "{:?}", l.problems);
    for k in [
        "bogus", "config", "timeout", "format", "names", "uids", "switch",
    ] {
        assert!(keys.contains(&k.to_owned()), "{k}: {:?}", l.problems);
    }
    assert!(l.problems.contains(&KeyProblem::Unknown {
        key: "bogus".into()
    }));
    assert!(l.problems.contains(&KeyProblem::NotSettable {
        key: "config".into()
    }));
    let timeout = l
        .problems
        .iter()
        .find_map(|p| match p {
            KeyProblem::Invalid { key, reason } if key == "timeout" => Some(reason),
            _ => None,
        })
        .unwrap();
    assert!(timeout.contains("unknown unit \"x\""), "{timeout}");
    assert!(
        !timeout.contains('\x1b'),
        "no terminal colours: {timeout:?}"
    );
}

#[test]
fn keys_given_on_the_command_line_are_not_checked() {
    // The flag decides; a bad file value for it is never looked at.
    let l = layered(&["--timeout=1s"], r#"{"timeout":"nonsense"}"#);
    assert!(l.problems.is_empty(), "{:?}", l.problems);
    assert_eq!(l.value.timeout, Duration::from_secs(1));
}

#[test]
fn help_and_bad_flags_stay_clap_errors() {
    let e = Layers::<Args>::parse(["t", "--help"]).unwrap_err();
    assert_eq!(e.kind(), clap::error::ErrorKind::DisplayHelp);
    let e = Layers::<Args>::parse(["t", "--timeout", "1d"]).unwrap_err();
    assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation);
}

#[test]
fn reading_files() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("c.json");
    assert!(ConfigFile::read_json(&p).unwrap_err().is_not_found());
    std::fs::write(&p, "{not json").unwrap();
    assert!(matches!(
        ConfigFile::read_json(&p),
        Err(FileError::Json { .. })
    ));
    std::fs::write(&p, "[1]").unwrap();
    assert!(matches!(
        ConfigFile::read_json(&p),
        Err(FileError::NotAnObject { .. })
    ));
    std::fs::write(&p, r#"{"open":true}"#).unwrap();
    let f = ConfigFile::read_json(&p).unwrap();
    assert_eq!(f.path, p);
    assert_eq!(f.values["open"], Value::Bool(true));
}
