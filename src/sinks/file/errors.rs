//! The file sink's errors. Every one of them is local I/O (or the writer gone), so
//! the same batch may succeed later: nothing here is a reason to dead-letter.

use crate::batcher::BatcherStopped;
use crate::event::SinkKind;
use crate::sinks::{ClassifyError, ErrorClass, SinkError};

#[derive(Debug, Clone, thiserror::Error)]
pub enum FileError {
    /// Writing, syncing, rotating or opening a file failed.
    #[error("{0}")]
    Io(String),
    /// The blocking writer task panicked or was cancelled.
    #[error("writer task failed: {0}")]
    WriterTask(String),
    #[error("the file sink's writer has stopped")]
    Stopped,
}

impl From<std::io::Error> for FileError {
    fn from(error: std::io::Error) -> Self {
        FileError::Io(error.to_string())
    }
}

impl From<BatcherStopped> for FileError {
    fn from(_: BatcherStopped) -> Self {
        FileError::Stopped
    }
}

impl ClassifyError for FileError {
    fn classify(&self) -> ErrorClass {
        match self {
            FileError::Io(_) | FileError::WriterTask(_) => ErrorClass::Io,
            FileError::Stopped => ErrorClass::Stopped,
        }
    }
}

impl From<FileError> for SinkError {
    fn from(error: FileError) -> Self {
        SinkError::classified(SinkKind::File, &error)
    }
}
