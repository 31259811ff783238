//! The data directory: where a node keeps its identity and OHTTP keys between starts.
//! Secrets are written with mode 0600 into a 0700 directory, atomically, and never overwritten.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
};

/// A data-directory problem, naming the path involved.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    /// No directory was given and no home directory is known.
    #[error("no data directory: set --data-dir or TOKENGO_DATA_DIR (HOME is not set)")]
    NoHome,
    /// Creating, reading or writing a file failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
}

/// A resolved data directory (created on first use).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataDir {
    path: PathBuf,
}

impl DataDir {
    /// `explicit`, else `$XDG_DATA_HOME/tokengo`, else `~/.local/share/tokengo`.
    pub fn resolve(explicit: Option<PathBuf>) -> Result<Self, DataDirError> {
        let path = match explicit {
            Some(path) => path,
            None => default_path()?,
        };
        Ok(Self { path })
    }

    /// The directory.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Path of a file inside the directory.
    #[must_use]
    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Creates the directory (mode 0700) if it does not exist.
    pub fn ensure(&self) -> Result<(), DataDirError> {
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt as _;
            builder.mode(0o700);
        }
        builder
            .create(&self.path)
            .map_err(|source| DataDirError::Io {
                action: "creating data directory",
                path: self.path.clone(),
                source,
            })
    }
}

fn default_path() -> Result<PathBuf, DataDirError> {
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(xdg).join("tokengo"));
    }
    let home = std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .ok_or(DataDirError::NoHome)?;
    Ok(PathBuf::from(home).join(".local/share/tokengo"))
}

/// Reads a file, `Ok(None)` when it does not exist.
pub fn read_if_exists(path: &Path) -> Result<Option<Vec<u8>>, DataDirError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(DataDirError::Io {
            action: "reading",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Writes a secret file with mode 0600. Fails if the file exists: keys are never overwritten,
/// so a mistake cannot destroy an identity. The bytes go to a temporary file first and are
/// renamed into place, so a crash never leaves a half-written key.
pub fn write_secret_new(path: &Path, bytes: &[u8]) -> Result<(), DataDirError> {
    let io = |action, source| DataDirError::Io {
        action,
        path: path.to_path_buf(),
        source,
    };
    if path.exists() {
        return Err(io(
            "refusing to overwrite existing key",
            std::io::Error::from(std::io::ErrorKind::AlreadyExists),
        ));
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        DataDir {
            path: parent.to_path_buf(),
        }
        .ensure()?;
    }
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp).map_err(|e| io("creating", e))?;
    file.write_all(bytes).map_err(|e| io("writing", e))?;
    file.sync_all().map_err(|e| io("syncing", e))?;
    std::fs::rename(&tmp, path).map_err(|e| io("renaming into place", e))
}

/// Replaces a secret file atomically (mode 0600), for files that change by design (the OHTTP
/// keyring on rotation).
pub fn replace_secret(path: &Path, bytes: &[u8]) -> Result<(), DataDirError> {
    let tmp = path.with_extension("new");
    let _ = std::fs::remove_file(&tmp);
    write_secret_new(&tmp, bytes)?;
    std::fs::rename(&tmp, path).map_err(|source| DataDirError::Io {
        action: "renaming into place",
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn secrets_are_0600_and_never_overwritten() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/key");
        write_secret_new(&path, b"one").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let dir_mode = std::fs::metadata(dir.path().join("sub"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        assert!(write_secret_new(&path, b"two").is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
        replace_secret(&path, b"three").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"three");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn missing_file_reads_as_none() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_if_exists(&dir.path().join("nope")).unwrap().is_none());
    }
}
