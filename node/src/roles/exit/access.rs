//! Who may use this exit: with `--access-token-file`, only requests whose encrypted head
//! carries one of the file's tokens reach the backend. The gateway calls [`Access::admit`] once
//! per request, after decapsulation: it removes the token field whatever happens (a token
//! never reaches the backend) and compares in constant time. The file is read again when its
//! contents change (polled, so a rewritten file or an updated Kubernetes Secret takes effect
//! without a signal); a file that became unusable keeps the previous tokens.

use std::{
    path::{Path, PathBuf},
    sync::RwLock,
    time::Duration,
};

use subtle::ConstantTimeEq as _;
use tokengo_proto::bhttp::RequestHead;
use tokio_util::sync::CancellationToken;
use zeroize::Zeroize as _;

use crate::{
    roles::access::{AccessToken, TOKEN_FIELD, TokenError},
    web::api_error::ApiError,
};

/// How often the token file is checked for changes.
pub const RELOAD_EVERY: Duration = Duration::from_secs(5);
/// Largest token file read.
const MAX_FILE_BYTES: u64 = 1 << 20;

/// Why the token file cannot be used (never quotes a token).
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// The file cannot be read.
    #[error("cannot read access token file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Larger than a token file can sensibly be.
    #[error("access token file {0} is larger than 1 MiB")]
    TooLarge(PathBuf),
    /// No token in it: the exit would refuse everyone.
    #[error(
        "access token file {0} has no tokens (one per line; `#` starts a comment); generate one with `openssl rand -base64 32`"
    )]
    Empty(PathBuf),
    /// A line is not a usable token.
    #[error("access token file {path}, line {line}: {source}")]
    Token {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        source: TokenError,
    },
}

/// Parses a token file's text: one token per line; blank lines and `#` comments skipped.
pub fn parse_tokens(path: &Path, text: &str) -> Result<Vec<AccessToken>, AccessError> {
    let mut tokens = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let token = AccessToken::parse(line).map_err(|source| AccessError::Token {
            path: path.to_path_buf(),
            line: index + 1,
            source,
        })?;
        if !tokens.contains(&token) {
            tokens.push(token);
        }
    }
    if tokens.is_empty() {
        return Err(AccessError::Empty(path.to_path_buf()));
    }
    Ok(tokens)
}

/// Reads and parses the token file.
pub fn load_tokens(path: &Path) -> Result<Vec<AccessToken>, AccessError> {
    let mut text = read(path)?;
    let parsed = parse_tokens(path, &text);
    text.zeroize();
    parsed
}

fn read(path: &Path) -> Result<String, AccessError> {
    let read_error = |source| AccessError::Read {
        path: path.to_path_buf(),
        source,
    };
    let len = std::fs::metadata(path).map_err(read_error)?.len();
    if len > MAX_FILE_BYTES {
        return Err(AccessError::TooLarge(path.to_path_buf()));
    }
    std::fs::read_to_string(path).map_err(read_error)
}

/// The exit's access rule: open to every request, or only to requests with a token.
#[derive(Debug, Default)]
pub struct Access {
    /// `None`: no token required (the default).
    tokens: RwLock<Option<Vec<AccessToken>>>,
}

impl Access {
    /// Requires one of `tokens` from now on (replacing any earlier set).
    pub fn require(&self, tokens: Vec<AccessToken>) {
        *self
            .tokens
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(tokens);
    }

    /// Whether requests must carry a token (what the descriptor announces).
    #[must_use]
    pub fn required(&self) -> bool {
        self.tokens
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some()
    }

    /// Removes the token field from `head`, then lets the request through when no token is
    /// required or when it carried exactly one token field whose value is one of the tokens
    /// (compared in constant time against every token). Otherwise the user's 401.
    pub fn admit(&self, head: &mut RequestHead) -> Result<(), ApiError> {
        let (mut presented, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut head.fields)
            .into_iter()
            .partition(|f| f.name.eq_ignore_ascii_case(TOKEN_FIELD.as_bytes()));
        head.fields = rest;
        let verdict = {
            let tokens = self
                .tokens
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match (tokens.as_deref(), presented.as_slice()) {
                (None, _) => Ok(()),
                (Some(_), []) => Err(ApiError::ExitAccessDenied { missing: true }),
                (Some(tokens), [one]) => {
                    let mut matched = subtle::Choice::from(0);
                    for token in tokens {
                        matched |= token.as_bytes().ct_eq(&one.value);
                    }
                    if bool::from(matched) {
                        Ok(())
                    } else {
                        Err(ApiError::ExitAccessDenied { missing: false })
                    }
                }
                (Some(_), _) => Err(ApiError::ExitAccessDenied { missing: false }),
            }
        };
        for field in &mut presented {
            field.value.zeroize();
        }
        verdict
    }

    /// Checks the token file every [`RELOAD_EVERY`] until shutdown (see [`Reloader`]).
    pub async fn watch(&self, path: PathBuf, shutdown: CancellationToken) {
        let mut reloader = Reloader::new(path);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(RELOAD_EVERY) => {}
            }
            reloader.check(self);
        }
    }
}

/// Reloads a token file when its contents change.
#[derive(Debug)]
pub struct Reloader {
    path: PathBuf,
    /// The contents last seen (zeroed when replaced).
    last: Option<String>,
}

impl Reloader {
    /// Starts from the file as it is now (already loaded by the caller).
    #[must_use]
    pub fn new(path: PathBuf) -> Self {
        let last = read(&path).ok();
        Self { path, last }
    }

    /// Reads the file; when its contents changed, swaps its tokens into `access`, or, when it
    /// cannot be used, keeps the previous tokens and says so (once per change).
    pub fn check(&mut self, access: &Access) {
        let text = read(&self.path);
        if text.as_ref().ok() == self.last.as_ref() {
            return;
        }
        let seen = match text {
            Ok(text) => {
                match parse_tokens(&self.path, &text) {
                    Ok(tokens) => {
                        tracing::info!(tokens = tokens.len(), path = %self.path.display(), "access tokens reloaded");
                        access.require(tokens);
                    }
                    Err(error) => tracing::warn!("{error}; keeping the previous access tokens"),
                }
                text
            }
            Err(error) => {
                tracing::warn!("{error}; keeping the previous access tokens");
                String::new()
            }
        };
        if let Some(mut old) = self.last.replace(seen) {
            old.zeroize();
        }
    }
}

impl Drop for Reloader {
    fn drop(&mut self) {
        if let Some(last) = &mut self.last {
            last.zeroize();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokengo_proto::bhttp::Field;

    const GOOD: &str = "group-token-0123456789";

    fn head(tokens: &[&str]) -> RequestHead {
        let mut fields = vec![Field {
            name: b"content-type".to_vec(),
            value: b"application/json".to_vec(),
        }];
        fields.extend(tokens.iter().map(|t| Field {
            name: TOKEN_FIELD.as_bytes().to_vec(),
            value: t.as_bytes().to_vec(),
        }));
        RequestHead {
            method: b"POST".to_vec(),
            scheme: b"https".to_vec(),
            authority: Vec::new(),
            path: b"/v1/chat/completions".to_vec(),
            fields,
        }
    }

    fn gate() -> Access {
        let access = Access::default();
        access.require(
            parse_tokens(
                Path::new("t"),
                &format!("# group\n\n{GOOD}\nother-token-0123456789\n"),
            )
            .unwrap(),
        );
        access
    }

    #[test]
    fn the_token_field_never_passes_and_only_a_listed_token_admits() {
        let open = Access::default();
        assert!(!open.required());
        let mut h = head(&[GOOD]);
        assert_eq!(open.admit(&mut h), Ok(()));
        assert_eq!(h.fields.len(), 1, "removed even when no token is required");

        let access = gate();
        assert!(access.required());
        let mut h = head(&[GOOD]);
        assert_eq!(access.admit(&mut h), Ok(()));
        assert_eq!(h.fields.len(), 1);
        assert!(!h.fields.iter().any(|f| f.name == TOKEN_FIELD.as_bytes()));
        assert_eq!(access.admit(&mut head(&["other-token-0123456789"])), Ok(()));
        for (case, tokens, missing) in [
            ("none", &[][..], true),
            ("wrong", &["wrong-token-0123456789"][..], false),
            ("prefix", &["group-token-012345678"][..], false),
            ("longer", &["group-token-01234567890"][..], false),
            ("two", &[GOOD, "wrong-token-0123456789"][..], false),
        ] {
            let mut h = head(tokens);
            assert_eq!(
                access.admit(&mut h),
                Err(ApiError::ExitAccessDenied { missing }),
                "{case}"
            );
            assert_eq!(h.fields.len(), 1, "{case}");
        }
    }

    #[test]
    fn token_files_are_checked_without_quoting_tokens() {
        let path = Path::new("tokens.txt");
        assert_eq!(
            parse_tokens(path, &format!("{GOOD}\n{GOOD}\n"))
                .unwrap()
                .len(),
            1
        );
        let error = parse_tokens(path, "# only a comment\n\n").unwrap_err();
        assert!(matches!(error, AccessError::Empty(_)), "{error}");
        let error = parse_tokens(path, &format!("{GOOD}\nshort-secret\n")).unwrap_err();
        let message = error.to_string();
        assert!(message.contains("line 2"), "{message}");
        assert!(!message.contains("short-secret"), "{message}");
    }

    #[test]
    fn a_changed_file_is_reloaded_and_a_broken_one_keeps_the_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, format!("{GOOD}\n")).unwrap();
        let access = Access::default();
        access.require(load_tokens(&path).unwrap());
        let mut reloader = Reloader::new(path.clone());
        reloader.check(&access);
        assert_eq!(access.admit(&mut head(&[GOOD])), Ok(()), "unchanged");
        let next = "next-token-0123456789";
        std::fs::write(&path, format!("{next}\n")).unwrap();
        reloader.check(&access);
        assert_eq!(access.admit(&mut head(&[next])), Ok(()));
        assert!(
            access.admit(&mut head(&[GOOD])).is_err(),
            "old token revoked"
        );
        for broken in ["tiny\n", "# nothing\n"] {
            std::fs::write(&path, broken).unwrap();
            reloader.check(&access);
            assert_eq!(access.admit(&mut head(&[next])), Ok(()), "kept");
        }
        std::fs::remove_file(&path).unwrap();
        reloader.check(&access);
        assert_eq!(access.admit(&mut head(&[next])), Ok(()), "kept");
    }
}
