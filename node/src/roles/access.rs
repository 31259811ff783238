//! Group access tokens: the secret an exit may require before it calls its backend, and the
//! client's tokens for the exits it uses. The token travels as one field of the encrypted
//! BHTTP request ([`TOKEN_FIELD`]), so only the exit ever sees it; the exit removes it before
//! anything reaches the backend. A token shared by a group identifies the group, not the
//! person (per-user anonymous tokens are a later step: Privacy Pass).

use std::collections::HashMap;

use libp2p_identity::PeerId;
use tokengo_proto::bhttp::{Field, RequestHead};
use zeroize::Zeroize as _;

/// The request field that carries the token inside the encrypted request.
pub const TOKEN_FIELD: &str = "tokengo-exit-token";
/// Shortest token accepted: a guessable token protects nothing.
pub const MIN_TOKEN_LEN: usize = 16;
/// Longest token accepted (it travels in every request).
pub const MAX_TOKEN_LEN: usize = 512;

/// Why a token was refused (the token itself is never part of the message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Shorter than [`MIN_TOKEN_LEN`] or longer than [`MAX_TOKEN_LEN`].
    #[error(
        "a token must be {MIN_TOKEN_LEN} to {MAX_TOKEN_LEN} characters (this one has {0}); generate one with `openssl rand -base64 32`"
    )]
    Length(usize),
    /// A character outside base64/base64url and `.~`.
    #[error(
        "a token may contain only letters, digits and `+/=-_.~` (no spaces or commas); generate one with `openssl rand -base64 32`"
    )]
    Characters,
}

/// One access token. Never printed: `Debug` shows only its length; zeroed when dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct AccessToken(String);

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AccessToken({} chars)", self.0.len())
    }
}

impl Drop for AccessToken {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl AccessToken {
    /// Checks `text` (surrounding whitespace removed) as a token.
    pub fn parse(text: &str) -> Result<Self, TokenError> {
        let text = text.trim();
        if !(MIN_TOKEN_LEN..=MAX_TOKEN_LEN).contains(&text.len()) {
            return Err(TokenError::Length(text.chars().count()));
        }
        if !text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+/=-_.~".contains(&b))
        {
            return Err(TokenError::Characters);
        }
        Ok(Self(text.to_owned()))
    }

    /// The token's bytes, for the constant-time comparison and the request field.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

/// The client's tokens: one for any exit that requires a token, and per pinned exit.
#[derive(Debug, Clone, Default)]
pub struct ExitTokens {
    /// Sent to every exit without a token of its own (`--exit-token`). Default none.
    pub default: Option<AccessToken>,
    /// Per exit (`--exit PEERID=TOKEN`).
    pub per_exit: HashMap<PeerId, AccessToken>,
}

impl ExitTokens {
    /// The token for `exit`, if the client has one.
    #[must_use]
    pub fn for_exit(&self, exit: &PeerId) -> Option<&AccessToken> {
        self.per_exit.get(exit).or(self.default.as_ref())
    }

    /// `head` as sent to `exit`: any token field the user's tool set removed (it is not the
    /// user's to choose), the client's token for that exit added.
    #[must_use]
    pub fn request_head(&self, head: &RequestHead, exit: &PeerId) -> RequestHead {
        let mut head = head.clone();
        head.fields
            .retain(|f| !f.name.eq_ignore_ascii_case(TOKEN_FIELD.as_bytes()));
        if let Some(token) = self.for_exit(exit) {
            head.fields.push(Field {
                name: TOKEN_FIELD.as_bytes().to_vec(),
                value: token.as_bytes().to_vec(),
            });
        }
        head
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_checked_and_never_printed() {
        let token = AccessToken::parse("  c2VjcmV0LXRva2VuLWZvci1ncm91cA==\n").unwrap();
        assert_eq!(token.as_bytes(), b"c2VjcmV0LXRva2VuLWZvci1ncm91cA==");
        assert!(!format!("{token:?}").contains("c2Vj"));
        assert_eq!(AccessToken::parse("short"), Err(TokenError::Length(5)));
        assert_eq!(
            AccessToken::parse("has a space in the middle"),
            Err(TokenError::Characters)
        );
        assert_eq!(
            AccessToken::parse("comma,separated,values,x"),
            Err(TokenError::Characters)
        );
        assert!(AccessToken::parse(&"a".repeat(MAX_TOKEN_LEN + 1)).is_err());
    }

    #[test]
    fn the_client_sends_its_own_token_only() {
        let peer = |n: u8| {
            libp2p_identity::Keypair::ed25519_from_bytes([n; 32])
                .unwrap()
                .public()
                .to_peer_id()
        };
        let tokens = ExitTokens {
            default: Some(AccessToken::parse("default-token-0123456789").unwrap()),
            per_exit: HashMap::from([(
                peer(1),
                AccessToken::parse("pinned-token-0123456789").unwrap(),
            )]),
        };
        let head = RequestHead {
            method: b"POST".to_vec(),
            scheme: b"https".to_vec(),
            authority: Vec::new(),
            path: b"/v1/chat/completions".to_vec(),
            fields: vec![
                Field {
                    name: b"Tokengo-Exit-Token".to_vec(),
                    value: b"set-by-the-tool".to_vec(),
                },
                Field {
                    name: b"content-type".to_vec(),
                    value: b"application/json".to_vec(),
                },
            ],
        };
        let token_of = |head: &RequestHead| {
            head.fields
                .iter()
                .filter(|f| f.name.eq_ignore_ascii_case(TOKEN_FIELD.as_bytes()))
                .map(|f| String::from_utf8(f.value.clone()).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            token_of(&tokens.request_head(&head, &peer(1))),
            ["pinned-token-0123456789"]
        );
        assert_eq!(
            token_of(&tokens.request_head(&head, &peer(2))),
            ["default-token-0123456789"]
        );
        let none = ExitTokens::default().request_head(&head, &peer(2));
        assert!(token_of(&none).is_empty());
        assert_eq!(none.fields.len(), 1);
    }
}
