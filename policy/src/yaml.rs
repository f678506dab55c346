//! rthooks' one YAML dialect, for policy files, the API's policy documents and the
//! config file: the YAML 1.2 core schema as serde_yaml read it before (`yes`, `no`, `on`,
//! `off` and `1_000` are strings, so `log-level: off` stays the word "off"), parsed by
//! serde-saphyr. Errors name line and column, on one line.
use serde::de::DeserializeOwned;
use serde::Serialize;

pub use serde_saphyr::Error;

fn options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        strict_booleans: true,
        underscored_numbers_as_strings: true,
        with_snippet: false,
    }
}

/// Every document of `text` (`---` separated); empty ones are skipped.
pub fn from_documents<T: DeserializeOwned>(text: &str) -> Result<Vec<T>, Error> {
    serde_saphyr::from_multiple_with_options(text, options())
}

/// The one document of `text`.
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, Error> {
    serde_saphyr::from_str_with_options(text, options())
}

pub fn to_string<T: Serialize>(value: &T) -> String {
    serde_saphyr::to_string(value).unwrap_or_default()
}
