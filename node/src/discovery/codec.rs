//! The `/tokengo/relay-info/1` request-response codec: reads at most a bounded number of bytes
//! from the libp2p stream and hands them to the sans-I/O encoding in
//! `tokengo_proto::relay_info`, which checks versions and sizes.

use std::io;

use libp2p::{
    StreamProtocol,
    futures::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    request_response,
};
use tokengo_proto::relay_info::{self, RelayInfo};

/// Largest request read (it is one version byte).
const MAX_REQUEST_BYTES: u64 = 16;

/// The codec; the response limit bounds what a hostile provider can make us buffer.
#[derive(Debug, Clone)]
pub(super) struct RelayInfoCodec {
    max_response: usize,
}

impl Default for RelayInfoCodec {
    fn default() -> Self {
        Self {
            max_response: relay_info::MAX_RESPONSE_BYTES,
        }
    }
}

fn invalid(error: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error.to_string())
}

async fn read_bounded<T: AsyncRead + Unpin + Send>(io: &mut T, max: u64) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    // One byte more than allowed, so an oversized message is detected rather than cut.
    io.take(max.saturating_add(1))
        .read_to_end(&mut bytes)
        .await?;
    Ok(bytes)
}

impl request_response::Codec for RelayInfoCodec {
    type Protocol = StreamProtocol;
    type Request = ();
    type Response = RelayInfo;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<()>
    where
        T: AsyncRead + Unpin + Send,
    {
        let bytes = read_bounded(io, MAX_REQUEST_BYTES).await?;
        relay_info::decode_request(&bytes).map_err(invalid)
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<RelayInfo>
    where
        T: AsyncRead + Unpin + Send,
    {
        let max = u64::try_from(self.max_response).unwrap_or(u64::MAX);
        let bytes = read_bounded(io, max).await?;
        RelayInfo::decode(&bytes, self.max_response).map_err(invalid)
    }

    async fn write_request<T>(&mut self, _: &StreamProtocol, io: &mut T, (): ()) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        io.write_all(&relay_info::encode_request()).await?;
        io.close().await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        response: RelayInfo,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        io.write_all(&response.encode()).await?;
        io.close().await
    }
}
