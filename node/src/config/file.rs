//! The YAML file a role reads (`--config`). Each role has its own schema: a flat struct with
//! one optional field per key it takes. The file's top-level keys are checked against that
//! schema before anything else, so a key the role does not take (another role's key, or a
//! typo) is refused with the key, the command and the keys it takes; then the file is
//! deserialized into the schema, whose errors name the key and the line.

use std::path::Path;

use serde::{Deserialize, de::DeserializeOwned};

use super::ConfigError;

/// A role's file schema. It must be a struct with named fields and without
/// `#[serde(flatten)]`: a flattened field would lose the key and line in errors and cannot be
/// combined with `deny_unknown_fields`, and its fields would not be listed as keys.
pub(crate) trait Schema: DeserializeOwned + Default {
    /// The command whose file this is, named in errors, e.g. `tokengo relay`.
    const COMMAND: &'static str;
}

/// A YAML value that may be one string or a list of them (`relay:`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    /// The strings, one or many.
    pub(crate) fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(one) => vec![one],
            Self::Many(many) => many,
        }
    }
}

/// Reads the file at `path` as schema `S`; no file, or an empty one, gives every key its
/// default.
pub(crate) fn load<S: Schema>(path: Option<&Path>) -> Result<S, ConfigError> {
    let Some(path) = path else {
        return Ok(S::default());
    };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if text.trim().is_empty() {
        return Ok(S::default());
    }
    let parse_error = |e: serde_yaml_ng::Error| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let accepted = keys::<S>();
    let document: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).map_err(parse_error)?;
    if let serde_yaml_ng::Value::Mapping(mapping) = &document {
        let unknown: Vec<String> = mapping
            .keys()
            .map(key_name)
            .filter(|key| !accepted.contains(&key.as_str()))
            .collect();
        if !unknown.is_empty() {
            return Err(ConfigError::UnknownKeys {
                path: path.to_path_buf(),
                unknown,
                command: S::COMMAND,
                accepted,
            });
        }
    }
    // Parsed again from the text rather than from `document`: only the text's parser knows
    // the lines its errors point at.
    serde_yaml_ng::from_str(&text).map_err(parse_error)
}

/// A mapping key as the user wrote it.
fn key_name(key: &serde_yaml_ng::Value) -> String {
    match key {
        serde_yaml_ng::Value::String(name) => name.clone(),
        other => serde_yaml_ng::to_string(other)
            .map(|text| text.trim().to_owned())
            .unwrap_or_else(|_| format!("{other:?}")),
    }
}

/// The keys schema `S` takes: its field names, as serde's derive hands them to
/// `deserialize_struct`. Taken from the struct itself so the list cannot drift from it.
pub(crate) fn keys<S: Schema>() -> &'static [&'static str] {
    let mut fields: &'static [&'static str] = &[];
    // The deserializer stops with an error once it has the names; the error is expected.
    let _ = S::deserialize(FieldNames(&mut fields));
    fields
}

/// A deserializer that records the field names a struct asks for and produces nothing.
struct FieldNames<'a>(&'a mut &'static [&'static str]);

impl<'de> serde::Deserializer<'de> for FieldNames<'_> {
    type Error = serde::de::value::Error;

    fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(serde::de::Error::custom("a file schema must be a struct"))
    }

    fn deserialize_struct<V: serde::de::Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = fields;
        Err(serde::de::Error::custom("field names recorded"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

/// "unknown key `x` for `tokengo relay`; did you mean `y`? (keys it takes: a, b, c)".
pub(super) fn describe_unknown(unknown: &[String], command: &str, accepted: &[&str]) -> String {
    let quoted: Vec<String> = unknown.iter().map(|key| format!("`{key}`")).collect();
    let noun = if unknown.len() == 1 { "key" } else { "keys" };
    let guesses: Vec<(&str, &str)> = unknown
        .iter()
        .filter_map(|key| closest(key, accepted))
        .collect();
    let hint = match guesses.as_slice() {
        [] => String::new(),
        [(_, guess)] if unknown.len() == 1 => format!("; did you mean `{guess}`?"),
        _ => {
            let pairs: Vec<String> = guesses
                .iter()
                .map(|(key, guess)| format!("`{guess}` for `{key}`"))
                .collect();
            format!("; did you mean {}?", pairs.join(", "))
        }
    };
    format!(
        "unknown {noun} {} for `{command}`{hint} (keys it takes: {})",
        quoted.join(", "),
        accepted.join(", ")
    )
}

/// The accepted key a typo most likely meant: within two edits, and closer than half its
/// length (so short keys are not matched to anything).
fn closest<'a>(key: &'a str, accepted: &[&'a str]) -> Option<(&'a str, &'a str)> {
    accepted
        .iter()
        .map(|candidate| (edit_distance(key, candidate), *candidate))
        .filter(|(distance, candidate)| *distance <= 2 && *distance * 2 < candidate.len())
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| (key, candidate))
}

/// Levenshtein distance between two keys (ASCII in practice; compared by character).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

#[cfg(test)]
pub(crate) mod examples {
    //! The example files in `configs/`: each is named after the command that reads it
    //! (`relay.yaml`, `relay-dht.yaml`, ...), and each role's tests load its own.

    use std::path::PathBuf;

    use super::{Schema, keys, load};

    /// The commands an example file may be named after.
    const ROLES: &[&str] = &["bootstrap", "client", "exit", "relay", "serve"];

    fn all() -> Vec<PathBuf> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.extension().is_some_and(|e| e == "yaml"))
            .collect();
        files.sort();
        files
    }

    fn role_of(path: &std::path::Path) -> &str {
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        stem.split('-').next().unwrap_or(stem)
    }

    /// Keys shown commented out (`# key: value` at the start of a line), which readers
    /// uncomment: they must be keys of the file's command too.
    fn commented_keys(text: &str) -> Vec<String> {
        text.lines()
            .filter_map(|line| line.strip_prefix("# "))
            .filter_map(|rest| rest.split_once(':'))
            .map(|(key, _)| key)
            .filter(|key| {
                !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
            })
            .map(str::to_owned)
            .collect()
    }

    /// Loads every example of `role` as schema `S` and checks its commented-out keys; returns
    /// how many there were.
    pub(crate) fn check<S: Schema>(role: &str) -> usize {
        let mut seen = 0;
        for path in all().into_iter().filter(|p| role_of(p) == role) {
            load::<S>(Some(&path)).unwrap_or_else(|e| panic!("{e}"));
            let text = std::fs::read_to_string(&path).unwrap();
            for key in commented_keys(&text) {
                assert!(
                    keys::<S>().contains(&key.as_str()),
                    "{}: commented-out `{key}` is not a key of `{}`",
                    path.display(),
                    S::COMMAND
                );
            }
            seen += 1;
        }
        assert!(seen > 0, "no example config for {role}");
        seen
    }

    #[test]
    fn every_example_is_named_after_its_command() {
        let files = all();
        assert!(files.len() >= 8, "{} example configs", files.len());
        for path in files {
            assert!(ROLES.contains(&role_of(&path)), "{}", path.display());
        }
    }

    #[test]
    fn commented_keys_are_found_and_prose_is_not() {
        let text = "# data_dir: /var/lib\n#   - item\n# Some prose: here\nlisten: x\n# a_b:\n";
        assert_eq!(commented_keys(text), ["data_dir", "a_b"]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::file_with;

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        listen: Option<String>,
        backend: Option<String>,
        #[serde(default)]
        headers: Vec<String>,
        worker_threads: Option<usize>,
    }

    impl Schema for Sample {
        const COMMAND: &'static str = "tokengo sample";
    }

    #[test]
    fn keys_are_the_schema_fields() {
        assert_eq!(
            keys::<Sample>(),
            ["listen", "backend", "headers", "worker_threads"]
        );
    }

    #[test]
    fn a_key_the_command_does_not_take_is_refused_with_the_key_command_and_file() {
        let file = file_with("listen: 127.0.0.1:1\nmax_exits: 3\n");
        let error = load::<Sample>(Some(file.path())).unwrap_err().to_string();
        let name = file.path().display().to_string();
        assert!(
            error.contains(&name)
                && error.contains("unknown key `max_exits` for `tokengo sample`")
                && error.contains("keys it takes: listen, backend, headers, worker_threads"),
            "{error}"
        );
        assert!(!error.contains("did you mean"), "{error}");
    }

    #[test]
    fn a_typo_is_refused_with_a_guess_and_every_unknown_key_is_named() {
        let file = file_with("backnd: http://x\n");
        let error = load::<Sample>(Some(file.path())).unwrap_err().to_string();
        assert!(
            error.ends_with(
                "unknown key `backnd` for `tokengo sample`; did you mean `backend`? \
                 (keys it takes: listen, backend, headers, worker_threads)"
            ),
            "{error}"
        );
        let file = file_with("backnd: http://x\nworker_thread: 2\nzz: 1\n");
        let error = load::<Sample>(Some(file.path())).unwrap_err().to_string();
        assert!(
            error.contains("unknown keys `backnd`, `worker_thread`, `zz`")
                && error.contains(
                    "did you mean `backend` for `backnd`, `worker_threads` for `worker_thread`?"
                ),
            "{error}"
        );
    }

    #[test]
    fn values_of_the_wrong_type_name_the_key_and_line() {
        let file = file_with("listen: 127.0.0.1:1\nworker_threads: many\n");
        let error = load::<Sample>(Some(file.path())).unwrap_err().to_string();
        assert!(
            error.contains("worker_threads") && error.contains("line 2"),
            "{error}"
        );
    }

    #[test]
    fn a_file_with_known_keys_loads() {
        let file = file_with("listen: 127.0.0.1:1\nheaders: ['A: b']\nworker_threads: 2\n");
        let sample = load::<Sample>(Some(file.path())).unwrap();
        assert_eq!(sample.listen.as_deref(), Some("127.0.0.1:1"));
        assert_eq!(sample.headers, ["A: b"]);
        assert_eq!(sample.worker_threads, Some(2));
    }

    #[test]
    fn no_file_or_an_empty_one_gives_the_defaults() {
        assert!(load::<Sample>(None).unwrap().listen.is_none());
        let empty = file_with("  \n");
        assert!(
            load::<Sample>(Some(empty.path()))
                .unwrap()
                .backend
                .is_none()
        );
        let missing = load::<Sample>(Some(Path::new("/nonexistent/tokengo.yaml")));
        assert!(matches!(missing, Err(ConfigError::Read { .. })));
    }

    #[test]
    fn edit_distance_counts_edits() {
        assert_eq!(edit_distance("backnd", "backend"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("relay", "relay"), 0);
        assert_eq!(
            closest("lsten", &["listen", "relay"]),
            Some(("lsten", "listen"))
        );
        assert_eq!(closest("ab", &["listen", "a"]), None);
    }
}
