//! The request-response codecs of `/tokengo/relay-info/1` and `/tokengo/exit-info/1`: read at
//! most a bounded number of bytes from the libp2p stream and hand them to the sans-I/O
//! encodings in `tokengo_proto::{relay_info, exit_info}`, which check versions and sizes.

use std::{io, marker::PhantomData};

use libp2p::{
    StreamProtocol,
    futures::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    request_response,
};
use tokengo_proto::{
    exit_info::{self, ExitInfoError, SignedExitInfo},
    relay_info::{self, RelayInfo, RelayInfoError},
};

/// Largest request read (it is one version byte).
const MAX_REQUEST_BYTES: u64 = 16;

/// A response message of one of the info protocols, with its request (a version byte).
pub(super) trait InfoMessage: Sized + Send + 'static {
    /// Largest response accepted: bounds what a hostile provider can make us buffer.
    const MAX_RESPONSE: usize;
    /// Why a request or a response was refused.
    type Error: std::error::Error + Send + Sync + 'static;
    fn encode_request() -> Vec<u8>;
    fn check_request(bytes: &[u8]) -> Result<(), Self::Error>;
    fn encode(&self) -> Vec<u8>;
    fn decode(bytes: Vec<u8>) -> Result<Self, Self::Error>;
}

impl InfoMessage for RelayInfo {
    const MAX_RESPONSE: usize = relay_info::MAX_RESPONSE_BYTES;
    type Error = RelayInfoError;

    fn encode_request() -> Vec<u8> {
        relay_info::encode_request()
    }

    fn check_request(bytes: &[u8]) -> Result<(), RelayInfoError> {
        relay_info::decode_request(bytes)
    }

    fn encode(&self) -> Vec<u8> {
        RelayInfo::encode(self)
    }

    fn decode(bytes: Vec<u8>) -> Result<Self, RelayInfoError> {
        RelayInfo::decode(&bytes, Self::MAX_RESPONSE)
    }
}

/// Exit-info answers are only size-checked here: verification needs the clock and the
/// answering peer, so the seeker does it.
impl InfoMessage for SignedExitInfo {
    const MAX_RESPONSE: usize = exit_info::MAX_RESPONSE_BYTES;
    type Error = ExitInfoError;

    fn encode_request() -> Vec<u8> {
        exit_info::encode_request()
    }

    fn check_request(bytes: &[u8]) -> Result<(), ExitInfoError> {
        exit_info::decode_request(bytes)
    }

    fn encode(&self) -> Vec<u8> {
        self.as_bytes().to_vec()
    }

    fn decode(bytes: Vec<u8>) -> Result<Self, ExitInfoError> {
        SignedExitInfo::from_bytes(bytes)
    }
}

/// The codec of one info protocol.
#[derive(Debug)]
pub(super) struct InfoCodec<M> {
    message: PhantomData<fn() -> M>,
}

impl<M> Default for InfoCodec<M> {
    fn default() -> Self {
        Self {
            message: PhantomData,
        }
    }
}

impl<M> Clone for InfoCodec<M> {
    fn clone(&self) -> Self {
        Self::default()
    }
}

/// The codec of `/tokengo/relay-info/1`.
pub(super) type RelayInfoCodec = InfoCodec<RelayInfo>;
/// The codec of `/tokengo/exit-info/1`.
pub(super) type ExitInfoCodec = InfoCodec<SignedExitInfo>;

fn invalid(error: impl std::error::Error + Send + Sync + 'static) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error)
}

async fn read_bounded<T: AsyncRead + Unpin + Send>(io: &mut T, max: u64) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    // One byte more than allowed, so an oversized message is detected rather than cut.
    io.take(max.saturating_add(1))
        .read_to_end(&mut bytes)
        .await?;
    Ok(bytes)
}

impl<M: InfoMessage> request_response::Codec for InfoCodec<M> {
    type Protocol = StreamProtocol;
    type Request = ();
    type Response = M;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<()>
    where
        T: AsyncRead + Unpin + Send,
    {
        let bytes = read_bounded(io, MAX_REQUEST_BYTES).await?;
        M::check_request(&bytes).map_err(invalid)
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<M>
    where
        T: AsyncRead + Unpin + Send,
    {
        let max = u64::try_from(M::MAX_RESPONSE).unwrap_or(u64::MAX);
        let bytes = read_bounded(io, max).await?;
        M::decode(bytes).map_err(invalid)
    }

    async fn write_request<T>(&mut self, _: &StreamProtocol, io: &mut T, (): ()) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        io.write_all(&M::encode_request()).await?;
        io.close().await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        response: M,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        io.write_all(&response.encode()).await?;
        io.close().await
    }
}
