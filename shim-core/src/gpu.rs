//! The one accelerator allocator, shared by the local runtimes (processes and Docker).
//! Kubernetes leaves placement to the cluster scheduler and does not use it.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// Not enough free accelerators.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("insufficient GPUs: {requested} requested, {free} of {total} free")]
pub struct GpuError {
    /// How many were asked for.
    pub requested: u32,
    /// How many were free.
    pub free: u32,
    /// How many the host has.
    pub total: u32,
}

/// Hands out accelerator ids to owners (one owner per replica), never one id to two owners
/// unless sharing is configured.
#[derive(Debug)]
pub struct GpuAllocator {
    devices: Vec<String>,
    share: bool,
    assigned: Mutex<BTreeMap<String, Vec<String>>>,
}

impl GpuAllocator {
    /// An allocator over the given device ids.
    pub fn new(devices: Vec<String>, share: bool) -> Self {
        Self {
            devices,
            share,
            assigned: Mutex::new(BTreeMap::new()),
        }
    }

    /// Detects NVIDIA GPUs with `nvidia-smi`; none when it is absent or fails.
    pub fn detect() -> Vec<String> {
        let output = std::process::Command::new("nvidia-smi")
            .args(["--query-gpu=index", "--format=csv,noheader"])
            .output();
        match output {
            Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect(),
            _ => Vec::new(),
        }
    }

    /// All device ids.
    pub fn devices(&self) -> &[String] {
        &self.devices
    }

    /// Gives `count` devices to `owner` (replacing what it held).
    ///
    /// # Errors
    /// [`GpuError`] when fewer than `count` are free.
    pub fn allocate(&self, owner: &str, count: u32) -> Result<Vec<String>, GpuError> {
        let mut assigned = self.assigned.lock().expect("gpu lock");
        assigned.remove(owner);
        if count == 0 {
            return Ok(Vec::new());
        }
        let total = self.devices.len() as u32;
        let free: Vec<String> = if self.share {
            self.devices.clone()
        } else {
            let used: Vec<&String> = assigned.values().flatten().collect();
            self.devices
                .iter()
                .filter(|d| !used.contains(d))
                .cloned()
                .collect()
        };
        if (free.len() as u32) < count {
            return Err(GpuError {
                requested: count,
                free: free.len() as u32,
                total,
            });
        }
        let picked: Vec<String> = free.into_iter().take(count as usize).collect();
        assigned.insert(owner.to_string(), picked.clone());
        Ok(picked)
    }

    /// Records that `owner` already holds `devices` (re-adoption after a restart).
    pub fn claim(&self, owner: &str, devices: Vec<String>) {
        if !devices.is_empty() {
            self.assigned
                .lock()
                .expect("gpu lock")
                .insert(owner.to_string(), devices);
        }
    }

    /// Frees what `owner` holds.
    pub fn release(&self, owner: &str) {
        self.assigned.lock().expect("gpu lock").remove(owner);
    }

    /// Frees everything held by owners whose name starts with `prefix` (all replicas of a service).
    pub fn release_prefix(&self, prefix: &str) {
        self.assigned
            .lock()
            .expect("gpu lock")
            .retain(|owner, _| !owner.starts_with(prefix));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_gives_one_gpu_to_two_owners() {
        let gpus = GpuAllocator::new(vec!["0".into(), "1".into()], false);
        assert_eq!(gpus.allocate("a/0", 1).unwrap(), ["0"]);
        assert_eq!(gpus.allocate("b/0", 1).unwrap(), ["1"]);
        assert_eq!(
            gpus.allocate("c/0", 1).unwrap_err(),
            GpuError {
                requested: 1,
                free: 0,
                total: 2
            }
        );
        gpus.release_prefix("a/");
        assert_eq!(gpus.allocate("c/0", 1).unwrap(), ["0"]);
    }

    #[test]
    fn sharing_hands_out_the_same_gpu_again() {
        let gpus = GpuAllocator::new(vec!["0".into()], true);
        assert_eq!(gpus.allocate("a/0", 1).unwrap(), ["0"]);
        assert_eq!(gpus.allocate("b/0", 1).unwrap(), ["0"]);
        assert!(gpus.allocate("c/0", 2).is_err());
    }

    #[test]
    fn claimed_devices_count_as_used() {
        let gpus = GpuAllocator::new(vec!["0".into(), "1".into()], false);
        gpus.claim("old/0", vec!["1".into()]);
        assert_eq!(gpus.allocate("new/0", 1).unwrap(), ["0"]);
        assert!(gpus.allocate("more/0", 1).is_err());
    }
}
