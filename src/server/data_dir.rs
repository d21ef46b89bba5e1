//! The data directory's lock: two processes (a server, or an offline admin
//! command) never share one data directory.

use super::StartupError;

/// Holds `<data_dir>/breakwater.lock` for as long as the returned file lives.
pub fn lock_data_dir(data_dir: &std::path::Path) -> Result<std::fs::File, StartupError> {
    let path = data_dir.join("breakwater.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| StartupError::DataDir {
            path: path.clone(),
            source,
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StartupError::DataDirLocked(data_dir.to_path_buf())),
        Err(std::fs::TryLockError::Error(source)) => Err(StartupError::DataDir { path, source }),
    }
}
