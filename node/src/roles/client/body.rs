//! A response body fed from a channel, so the client can hand the user's tool each decrypted
//! piece (each SSE event) the moment it opens, and can end the body with an error when the
//! encrypted stream breaks, which the HTTP server turns into a visibly truncated response.
//! Every response body is also wrapped so the request counts as in flight until it is sent.

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

/// A response body that keeps a request counted as in flight until its last frame has been
/// handed to the HTTP server (or the body is dropped because the user's tool went away). The
/// count ends before the server writes the end of the response, so a tool that has read the
/// whole response finds the request no longer in flight.
#[derive(Debug)]
pub(super) struct Tracked {
    inner: axum::body::Body,
    in_flight: Option<crate::ops::metrics::InFlight>,
}

impl Tracked {
    /// Wraps `inner`; `in_flight` is released at the end of the body.
    pub(super) fn new(inner: axum::body::Body, in_flight: crate::ops::metrics::InFlight) -> Self {
        Self {
            inner,
            in_flight: Some(in_flight),
        }
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let ended = match &polled {
            Poll::Ready(None | Some(Err(_))) => true,
            Poll::Ready(Some(Ok(_))) => self.inner.is_end_stream(),
            Poll::Pending => false,
        };
        if ended {
            self.in_flight = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
