//! Reading values back: the record under a key and its body, inline or
//! from its blob file (verified against its SHA-256 as it streams).

use futures::StreamExt;
use trove_proto::types::ByteStream;
use trove_proto::Error;

use super::{io_error, read_error, sled_error, SledStore};
use crate::engine::chunks::VerifyingReader;
use crate::engine::record::{self, Body, ValueRecord};
use crate::engine::sled::packs::{PackLoc, ReadError};

/// The status of a packed value that could not be read.
pub(super) fn pack_error(kind: &str, display_key: &str, err: ReadError) -> Error {
    match err {
        ReadError::Damaged { reason } => Error::DataLoss {
            message: format!(
                "{kind} {}: {reason}; its bytes are damaged on disk: write the value again, \
                 or restore the data folder from a backup",
                trove_proto::error::shorten(display_key)
            ),
        },
        ReadError::Io(err) => io_error("read a value from its pack", &err),
    }
}

/// The status of a record pointing into a pack that is not there.
pub(super) fn pack_gone(kind: &str, display_key: &str, loc: PackLoc) -> Error {
    Error::DataLoss {
        message: format!(
            "{kind} {}: its bytes were in value pack {}, which is missing from the data folder; \
             write the value again, or restore the data folder from a backup",
            trove_proto::error::shorten(display_key),
            loc.pack
        ),
    }
}

impl SledStore {
    /// Reads the record under `key` and opens its body. A blob replaced
    /// between reading the record and opening the file is retried with the
    /// new record, so readers never fail because of a concurrent overwrite.
    pub(super) async fn open_value(
        &self,
        tree: &sled::Tree,
        key: &[u8],
        kind: &str,
        display_key: &str,
    ) -> Result<(ValueRecord, BodyReader), Error> {
        let ticket = self.ticket();
        let opened = self.open_latest(tree, key, kind, display_key).await;
        self.visible(ticket).await?;
        opened
    }

    async fn open_latest(
        &self,
        tree: &sled::Tree,
        key: &[u8],
        kind: &str,
        display_key: &str,
    ) -> Result<(ValueRecord, BodyReader), Error> {
        const ATTEMPTS: usize = 5;
        let mut pack_missing: Option<PackLoc> = None;
        for _ in 0..ATTEMPTS {
            let Some(bytes) = tree.get(key).map_err(sled_error)? else {
                return Err(Error::not_found(kind, display_key));
            };
            let record = record::decode(&bytes).map_err(|e| match e {
                Error::DataLoss { message } => Error::DataLoss {
                    message: format!(
                        "{kind} {}: {message}",
                        trove_proto::error::shorten(display_key)
                    ),
                },
                other => other,
            })?;
            match &record.body {
                Body::Inline(data) => {
                    let reader = BodyReader::Memory(std::io::Cursor::new(data.clone()));
                    return Ok((record, reader));
                }
                Body::Packed { pack, offset, crc } => {
                    let loc = PackLoc {
                        pack: *pack,
                        offset: *offset,
                    };
                    match self.inner.packs.read(loc, record.body_len, *crc) {
                        Ok(Some(bytes)) => {
                            let reader = BodyReader::Memory(std::io::Cursor::new(bytes));
                            return Ok((record, reader));
                        }
                        // Moved by compaction since the record was read;
                        // gone for good if the record still points there.
                        Ok(None) if pack_missing == Some(loc) => {
                            return Err(pack_gone(kind, display_key, loc))
                        }
                        Ok(None) => {
                            pack_missing = Some(loc);
                            continue;
                        }
                        Err(err) => return Err(pack_error(kind, display_key, err)),
                    }
                }
                Body::Blob(id) => {
                    match tokio::fs::File::open(self.inner.blobs.blob_path(*id)).await {
                        Ok(file) => {
                            let len = file
                                .metadata()
                                .await
                                .map_err(|e| io_error("read blob metadata", &e))?
                                .len();
                            if len != record.body_len {
                                return Err(Error::DataLoss {
                                    message: format!(
                                        "{kind} {}: blob {id} holds {len} bytes, expected {}",
                                        trove_proto::error::shorten(display_key),
                                        record.body_len
                                    ),
                                });
                            }
                            let verified = Box::new(VerifyingReader::new(file, record.sha256));
                            return Ok((record, BodyReader::File(verified)));
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(io_error("open blob", &e)),
                    }
                }
            }
        }
        // Either the file is really gone or the value keeps being replaced
        // under the reader; neither is proven damage, so ask for a retry.
        Err(Error::Unavailable {
            message: format!(
                "{kind} {}: its content changed repeatedly while opening it (or its blob file is missing); retry",
                trove_proto::error::shorten(display_key)
            ),
        })
    }

    /// Turns an opened body into a chunked byte stream. Bytes that fail
    /// their recorded SHA-256 end the stream with DATA_LOSS naming `what`.
    pub(super) fn byte_stream(&self, reader: BodyReader, what: String) -> ByteStream {
        let chunk = self.inner.options.read_chunk_bytes.max(1);
        // A long download keeps the store busy for eviction's pacing.
        let calls = self.inner.eviction.call_counter();
        tokio_util::io::ReaderStream::with_capacity(reader, chunk)
            .map(move |r| {
                calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                r.map_err(|e| read_error(&what, &e))
            })
            .boxed()
    }
}

/// An opened value body: inline bytes or a blob file.
pub enum BodyReader {
    /// Inline bytes.
    Memory(std::io::Cursor<Vec<u8>>),
    /// A blob file, verified against its recorded SHA-256 as it is read.
    File(Box<VerifyingReader<tokio::fs::File>>),
}

impl tokio::io::AsyncRead for BodyReader {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            BodyReader::Memory(c) => std::pin::Pin::new(c).poll_read(cx, buf),
            BodyReader::File(f) => std::pin::Pin::new(f.as_mut()).poll_read(cx, buf),
        }
    }
}
