//! A response body fed from a channel, so the client can hand the user's tool each decrypted
//! piece (each SSE event) the moment it opens, and can end the body with an error when the
//! encrypted stream breaks, which the HTTP server turns into a visibly truncated response.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::mpsc;

/// Why a streamed body ended early.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(super) struct BodyError(pub String);

/// The receiving half, used as the HTTP response body.
#[derive(Debug)]
pub(super) struct ChannelBody {
    rx: mpsc::Receiver<Result<Bytes, BodyError>>,
}

/// The sending half.
pub(super) type BodySender = mpsc::Sender<Result<Bytes, BodyError>>;

/// A body and its sender. A small buffer keeps back-pressure: if the user's tool reads slowly,
/// the client stops reading the QUIC stream, and QUIC flow control slows the exit.
#[must_use]
pub(super) fn channel() -> (BodySender, ChannelBody) {
    let (tx, rx) = mpsc::channel(16);
    (tx, ChannelBody { rx })
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.rx
            .poll_recv(cx)
            .map(|item| item.map(|result| result.map(Frame::data)))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
