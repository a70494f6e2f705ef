//! Moving bytes between the local side (files, standard input and output) and
//! the client's byte streams, in chunks, never a whole value in memory; and
//! the progress bar, drawn on standard error only when it is a terminal.
//!
//! Downloads into a file go to a temporary file beside it that is renamed
//! over the destination once the last byte arrived, so a failed or cancelled
//! download never leaves a truncated file under the requested name.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use futures::{StreamExt, TryStreamExt};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncSeekExt, AsyncWriteExt};
use trove_client::trove_proto::types::ByteStream;
use trove_client::trove_proto::Error;

use crate::report::{Exit, Failure, Outcome};

/// Size of the pieces read from files and standard input.
pub const READ_CHUNK_BYTES: usize = 256 * 1024;

/// True when `path` means standard input or output.
pub fn is_stdio(path: Option<&Path>) -> bool {
    path.is_none_or(|p| p.as_os_str() == "-")
}

/// A source of bytes: a file, a pipe or device named on the command line, or
/// standard input.
pub struct Source {
    reader: Box<dyn AsyncRead + Send + Unpin>,
    /// Length in bytes, known in advance only for a regular file (a pipe or
    /// device reports 0 whatever it will produce).
    pub len: Option<u64>,
    /// How to name the source in messages.
    pub label: String,
}

impl Source {
    /// Opens `path`, or standard input for `-` or none.
    pub async fn open(path: Option<&Path>) -> Outcome<Self> {
        match path {
            Some(path) if !is_stdio(Some(path)) => {
                let label = path.display().to_string();
                let file = tokio::fs::File::open(path)
                    .await
                    .map_err(|e| Failure::io(&label, &e))?;
                let meta = file.metadata().await.map_err(|e| Failure::io(&label, &e))?;
                Ok(Source {
                    reader: Box::new(file),
                    len: meta.is_file().then_some(meta.len()),
                    label,
                })
            }
            _ => Ok(Source {
                reader: Box::new(tokio::io::stdin()),
                len: None,
                label: "standard input".into(),
            }),
        }
    }

    /// The source as a plain reader.
    pub fn into_reader(self) -> Box<dyn AsyncRead + Send + Unpin> {
        self.reader
    }

    /// The source as an upload body, counting bytes on `progress`. A read
    /// error aborts the upload (the server stores nothing).
    pub fn into_stream(self, progress: ProgressBar) -> ByteStream {
        let label = self.label;
        tokio_util::io::ReaderStream::with_capacity(self.reader, READ_CHUNK_BYTES)
            .map_ok(move |chunk| {
                progress.inc(chunk.len() as u64);
                chunk
            })
            .map_err(move |e| Error::internal(format!("reading {label}: {e}")))
            .boxed()
    }

    /// Copies a source that can be read only once (standard input, a pipe)
    /// into an anonymous temporary file while hashing it, so that an upload
    /// whose hash must travel first never holds the input in memory. The
    /// file has no name, so it disappears with the process however it ends.
    /// Returns the spooled copy, positioned at its start, and its SHA-256.
    pub async fn spool(self) -> Outcome<(Source, String)> {
        let label = self.label.clone();
        let spool = tempfile::tempfile().map_err(|e| Failure::io("temporary file", &e))?;
        let mut writer = tokio::fs::File::from_std(
            spool
                .try_clone()
                .map_err(|e| Failure::io("temporary file", &e))?,
        );
        let mut input = tokio_util::io::ReaderStream::with_capacity(self.reader, READ_CHUNK_BYTES);
        let mut hasher = Sha256::new();
        let mut len = 0u64;
        while let Some(chunk) = input.next().await {
            let chunk = chunk.map_err(|e| Failure::io(&label, &e))?;
            hasher.update(&chunk);
            len += chunk.len() as u64;
            writer
                .write_all(&chunk)
                .await
                .map_err(|e| Failure::io("temporary file", &e))?;
        }
        writer
            .flush()
            .await
            .map_err(|e| Failure::io("temporary file", &e))?;
        drop(writer);
        // The clone shared the file position: go back to the start to read.
        let mut reader = tokio::fs::File::from_std(spool);
        reader
            .seek(std::io::SeekFrom::Start(0))
            .await
            .map_err(|e| Failure::io("temporary file", &e))?;
        let source = Source {
            reader: Box::new(reader),
            len: Some(len),
            label,
        };
        Ok((source, hex::encode(hasher.finalize())))
    }
}

/// True when `path` names a regular file, which can be read twice.
pub fn is_regular_file(path: &Path) -> bool {
    !is_stdio(Some(path)) && std::fs::metadata(path).is_ok_and(|m| m.is_file())
}

/// SHA-256 of a file, read in chunks.
pub async fn hash_file(path: &Path) -> Outcome<String> {
    let label = path.display().to_string();
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| Failure::io(&label, &e))?;
    let mut input = tokio_util::io::ReaderStream::with_capacity(file, READ_CHUNK_BYTES);
    let mut hasher = Sha256::new();
    while let Some(chunk) = input.next().await {
        hasher.update(&chunk.map_err(|e| Failure::io(&label, &e))?);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Writes a download to `path` (see the module doc) or to standard output.
/// With `expect_sha256`, the bytes are hashed on the way and a mismatch fails
/// with [`Exit::DataLoss`]; a file target is then left as it was.
pub async fn write_download(
    mut body: ByteStream,
    path: Option<&Path>,
    progress: &ProgressBar,
    expect_sha256: Option<&str>,
) -> Outcome<u64> {
    let expect_sha256 = expect_sha256.filter(|digest| !digest.is_empty());
    let mut hasher = expect_sha256.map(|_| Sha256::new());
    let mut written = 0u64;
    let mut sink = Sink::open(path)?;
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        if let Some(hasher) = hasher.as_mut() {
            hasher.update(&chunk);
        }
        sink.write(&chunk).await?;
        written += chunk.len() as u64;
        progress.inc(chunk.len() as u64);
    }
    if let (Some(hasher), Some(expected)) = (hasher, expect_sha256) {
        let actual = hex::encode(hasher.finalize());
        if actual != expected {
            let outcome = match sink {
                Sink::Staged { .. } => "the file was left as it was",
                Sink::Stdout(_) | Sink::Direct { .. } => "discard what was written",
            };
            return Err(Failure::new(
                Exit::DataLoss,
                format!("the downloaded bytes hash to {actual}, not {expected}; {outcome}"),
            ));
        }
    }
    sink.finish().await?;
    Ok(written)
}

/// Where downloaded bytes go.
enum Sink {
    Stdout(tokio::io::Stdout),
    /// A regular file (or a new one): written beside the target under a
    /// temporary name, synced, then renamed over it.
    Staged {
        staging: tempfile::NamedTempFile,
        file: tokio::fs::File,
        target: PathBuf,
    },
    /// Something that is not a regular file (`/dev/null`, a FIFO): written
    /// in place, since renaming over it would replace the device itself.
    Direct {
        file: tokio::fs::File,
        target: PathBuf,
    },
}

impl Sink {
    fn open(path: Option<&Path>) -> Outcome<Self> {
        let Some(path) = path.filter(|p| !is_stdio(Some(p))) else {
            return Ok(Sink::Stdout(tokio::io::stdout()));
        };
        let label = path.display().to_string();
        let existing = std::fs::metadata(path).ok();
        if existing.as_ref().is_some_and(|meta| !meta.is_file()) {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| Failure::io(&label, &e))?;
            return Ok(Sink::Direct {
                file: tokio::fs::File::from_std(file),
                target: path.to_path_buf(),
            });
        }
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        // A replaced file keeps its mode; a new one gets the usual 0666 less
        // the umask, not the 0600 of a temporary file.
        let permissions = match &existing {
            Some(meta) => meta.permissions(),
            None => std::os::unix::fs::PermissionsExt::from_mode(0o666),
        };
        let staging = tempfile::Builder::new()
            .prefix(".trove-download-")
            .permissions(permissions)
            .tempfile_in(&dir)
            .map_err(|e| Failure::io(&label, &e))?;
        let file = staging.reopen().map_err(|e| Failure::io(&label, &e))?;
        Ok(Sink::Staged {
            staging,
            file: tokio::fs::File::from_std(file),
            target: path.to_path_buf(),
        })
    }

    async fn write(&mut self, chunk: &[u8]) -> Outcome {
        match self {
            Sink::Stdout(out) => out.write_all(chunk).await.map_err(|e| Failure::stdout(&e)),
            Sink::Staged { file, target, .. } | Sink::Direct { file, target } => file
                .write_all(chunk)
                .await
                .map_err(|e| Failure::io(&target.display().to_string(), &e)),
        }
    }

    async fn finish(self) -> Outcome {
        match self {
            Sink::Stdout(mut out) => out.flush().await.map_err(|e| Failure::stdout(&e)),
            Sink::Direct { mut file, target } => file
                .flush()
                .await
                .map_err(|e| Failure::io(&target.display().to_string(), &e)),
            Sink::Staged {
                staging,
                mut file,
                target,
            } => {
                let label = target.display().to_string();
                file.flush().await.map_err(|e| Failure::io(&label, &e))?;
                // Synced before the rename, so a crash can never leave the
                // new name pointing at a file whose bytes were not written.
                file.sync_all().await.map_err(|e| Failure::io(&label, &e))?;
                drop(file);
                staging
                    .persist(&target)
                    .map_err(|e| Failure::io(&label, &e.error))?;
                Ok(())
            }
        }
    }
}

/// A progress bar for a transfer of `len` bytes (unknown: a spinner with a
/// byte count), on standard error when it is a terminal; hidden otherwise, so
/// pipes and logs never see control characters.
pub fn progress_bar(len: Option<u64>, message: String) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = match len {
        Some(len) => ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr())
            .with_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            ),
        None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()).with_style(
            ProgressStyle::with_template("{msg} {spinner} {bytes} {bytes_per_sec}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        ),
    };
    bar.set_message(message);
    bar
}
