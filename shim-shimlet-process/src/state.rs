//! The per-service state file, `<state_dir>/<service_id>.json`, that lets a restarted shim
//! re-adopt the engines it left running.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use shim_core::WorkloadSpec;
use shim_core::shimlet::Failure;

/// Format version written into every file, so a later layout can migrate or refuse old ones.
pub(crate) const FORMAT_VERSION: u32 = 1;

/// What is persisted for one service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ServiceFile {
    /// [`FORMAT_VERSION`] at the time of writing.
    pub version: u32,
    /// The spec last applied (compared on the next apply, reused for health probes on adoption).
    pub spec: WorkloadSpec,
    /// Current replicas, running or exited.
    pub replicas: Vec<ReplicaRecord>,
    /// Replicas being stopped (replaced by a new spec or scaled away): a shim that restarts
    /// mid-stop finishes stopping them instead of forgetting them.
    #[serde(default)]
    pub retired: Vec<ReplicaRecord>,
    /// Whether a delete was under way.
    #[serde(default)]
    pub deleting: bool,
}

/// One replica's identity and resources.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ReplicaRecord {
    /// Replica number, 0-based.
    pub index: u32,
    /// Process id (also its process group id: replicas lead their own group).
    pub pid: u32,
    /// Field 22 of `/proc/<pid>/stat` at spawn: with the pid, the process's identity.
    pub start_time: u64,
    /// Port it was told to listen on.
    pub port: u16,
    /// Accelerator ids in its `CUDA_VISIBLE_DEVICES`.
    #[serde(default)]
    pub gpus: Vec<String>,
    /// Where its stdout and stderr go.
    pub log_path: PathBuf,
    /// Wall-clock spawn time (Unix milliseconds), for the start-up timeout across restarts.
    pub started_at_ms: u64,
    /// Why it stopped, once it has.
    #[serde(default)]
    pub exit: Option<Failure>,
}

/// Path of a service's state file.
pub(crate) fn path(state_dir: &Path, service_id: &str) -> PathBuf {
    state_dir.join(format!("{service_id}.json"))
}

/// Writes a service's state atomically (temporary file, then rename), so a crash of the shim
/// never leaves half a file behind.
///
/// There is no fsync: it would stall `observe` (writes happen under the service table's lock),
/// and it only helps against power loss, after which no engine is running to re-adopt anyway.
///
/// # Errors
/// I/O errors.
pub(crate) fn save(state_dir: &Path, service_id: &str, file: &ServiceFile) -> io::Result<()> {
    let target = path(state_dir, service_id);
    let tmp = state_dir.join(format!(".{service_id}.json.tmp"));
    let bytes = serde_json::to_vec_pretty(file).map_err(io::Error::other)?;
    let mut out = std::fs::File::create(&tmp)?;
    out.write_all(&bytes)?;
    drop(out);
    std::fs::rename(&tmp, &target)
}

/// Removes a service's state file; a missing file is fine.
///
/// # Errors
/// I/O errors other than "not found".
pub(crate) fn remove(state_dir: &Path, service_id: &str) -> io::Result<()> {
    match std::fs::remove_file(path(state_dir, service_id)) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(err),
        _ => Ok(()),
    }
}

/// A state file that could not be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LoadError {
    /// Unreadable.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Not a state file of a layout this version knows.
    #[error("cannot parse {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
}

/// Every state file in `state_dir` (temporary files skipped), each parsed or with its error.
///
/// # Errors
/// The directory itself cannot be listed.
pub(crate) fn load_all(state_dir: &Path) -> io::Result<Vec<Result<ServiceFile, LoadError>>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(state_dir)? {
        let path = entry?.path();
        let is_state = path.extension().is_some_and(|e| e == "json")
            && path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| !n.starts_with('.'));
        if is_state {
            found.push(load(&path));
        }
    }
    Ok(found)
}

fn load(path: &Path) -> Result<ServiceFile, LoadError> {
    let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let file: ServiceFile = serde_json::from_slice(&bytes).map_err(|e| LoadError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    if file.version != FORMAT_VERSION {
        return Err(LoadError::Parse {
            path: path.to_path_buf(),
            message: format!(
                "format version {} (this shim writes {FORMAT_VERSION})",
                file.version
            ),
        });
    }
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default();
    if stem != file.spec.service_id {
        return Err(LoadError::Parse {
            path: path.to_path_buf(),
            message: format!("holds service {:?}", file.spec.service_id),
        });
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_skips_temporary_files() {
        let dir = tempfile::tempdir().unwrap();
        let file = ServiceFile {
            version: FORMAT_VERSION,
            spec: WorkloadSpec::new("svc1", 3, ""),
            replicas: vec![ReplicaRecord {
                index: 0,
                pid: 1234,
                start_time: 99,
                port: 8000,
                gpus: vec!["0".into()],
                log_path: dir.path().join("logs/svc1-0.log"),
                started_at_ms: 1,
                exit: None,
            }],
            retired: Vec::new(),
            deleting: false,
        };
        save(dir.path(), "svc1", &file).unwrap();
        std::fs::write(dir.path().join(".svc2.json.tmp"), "half").unwrap();
        std::fs::write(dir.path().join("svc3.json"), "{not json").unwrap();
        let mut loaded = load_all(dir.path()).unwrap();
        loaded.sort_by_key(Result::is_err);
        assert_eq!(loaded.len(), 2);
        assert_eq!(loaded[0].as_ref().unwrap(), &file);
        assert!(
            loaded[1]
                .as_ref()
                .unwrap_err()
                .to_string()
                .contains("svc3.json")
        );
        remove(dir.path(), "svc1").unwrap();
        remove(dir.path(), "svc1").unwrap();
        assert!(!path(dir.path(), "svc1").exists());
    }
}
