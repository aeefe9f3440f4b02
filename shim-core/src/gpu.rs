//! The one accelerator allocator, shared by the local runtimes (processes and Docker).
//! Kubernetes leaves placement to the cluster scheduler and does not use it; its shimlet reports
//! the nodes' GPUs instead ([`ClusterGpus`]), which admission and `GET /api/v1/gpus` then use.
//!
//! It also keeps the GPU inventory: each GPU's name and memory from `nvidia-smi`, re-read when a
//! reader finds it older than [`REFRESH`]. With memory known and a service's need per GPU
//! recorded ([`GpuAllocator::set_need`]), placement picks, among the free GPUs that hold the need,
//! those with the least free memory (best fit), so a large GPU stays free for a large model.
//! Without either it hands out free GPUs in configured order, as it always did.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

/// How old the inventory may be before a reader re-runs `nvidia-smi`.
pub const REFRESH: Duration = Duration::from_secs(5);

const MIB: u64 = 1 << 20;

/// Not enough free accelerators.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "insufficient GPUs: {requested} requested, {free} of {total} free{}",
    need_bytes.map(|b| format!(" with {:.1} GiB usable", b as f64 / (1u64 << 30) as f64)).unwrap_or_default()
)]
pub struct GpuError {
    /// How many were asked for.
    pub requested: u32,
    /// How many were free (and, when `need_bytes` is set, had that much memory).
    pub free: u32,
    /// How many the host has.
    pub total: u32,
    /// Memory each GPU needed, when the service's need was known.
    pub need_bytes: Option<u64>,
}

/// One GPU as `nvidia-smi` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmiGpu {
    /// `index`.
    pub index: u32,
    /// `uuid`, e.g. `GPU-5f0c…`.
    pub uuid: String,
    /// `name`, e.g. `NVIDIA H200`.
    pub name: String,
    /// `memory.total` in bytes (`None` when the driver says `[N/A]`).
    pub memory_total_bytes: Option<u64>,
    /// `memory.used` in bytes.
    pub memory_used_bytes: Option<u64>,
}

/// Parses `nvidia-smi --query-gpu=index,uuid,name,memory.total,memory.used
/// --format=csv,noheader,nounits` (memory in MiB). Lines that do not parse are skipped.
pub fn parse_nvidia_smi(text: &str) -> Vec<SmiGpu> {
    let mut gpus = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if fields.len() < 5 {
            continue;
        }
        let Ok(index) = fields[0].parse::<u32>() else {
            continue;
        };
        // A name may hold commas; index and uuid lead, the two memory columns trail.
        let n = fields.len();
        let mib = |s: &str| s.parse::<u64>().ok().map(|v| v * MIB);
        gpus.push(SmiGpu {
            index,
            uuid: fields[1].to_string(),
            name: fields[2..n - 2].join(","),
            memory_total_bytes: mib(fields[n - 2]),
            memory_used_bytes: mib(fields[n - 1]),
        });
    }
    gpus
}

/// One GPU as the API shows it: `GET /api/v1/gpus`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GpuStatus {
    /// The device id the allocator hands out (an index, or what `engine.gpus` lists).
    pub id: String,
    /// nvidia-smi's index (the id parsed as a number when nvidia-smi is absent).
    pub index: Option<u32>,
    /// nvidia-smi's uuid.
    pub uuid: Option<String>,
    /// Product name.
    pub name: Option<String>,
    /// Total memory.
    pub memory_total_bytes: Option<u64>,
    /// Memory in use (by anything, this shim's engines included).
    pub memory_used_bytes: Option<u64>,
    /// Total less used.
    pub memory_free_bytes: Option<u64>,
    /// The service holding it, if any.
    pub held_by: Option<String>,
    /// The cluster node it is on (runtimes that place replicas on nodes: Kubernetes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// The GPUs of one node of a cluster whose own scheduler places replicas (Kubernetes), as the
/// runtime reports them. A replica's GPUs are all on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeGpus {
    /// Node name.
    pub node: String,
    /// GPUs the node can give to pods (its capacity less what the system reserves), whether or
    /// not pods hold them now.
    pub allocatable: u32,
    /// Memory of each of its GPUs, when the node says; `None` = unknown.
    pub memory_bytes: Option<u64>,
    /// Product name, when the node says.
    pub product: Option<String>,
}

/// What a runtime whose cluster places replicas knows of the cluster's GPUs
/// ([`Shimlet::cluster_gpus`](crate::Shimlet::cluster_gpus)).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClusterGpus {
    /// The nodes that have GPUs, as last seen.
    Nodes(Vec<NodeGpus>),
    /// Not known: the nodes could not be listed (no permission, API server away); says why.
    Unknown(String),
}

impl ClusterGpus {
    /// One row per GPU for `GET /api/v1/gpus` and the GPU metrics: id `<node>/<n>`, total memory
    /// when the node says. Used and free memory and the holder are not known: the cluster gives
    /// each GPU whole to one pod, and the shim does not see which.
    pub fn rows(&self) -> Vec<GpuStatus> {
        let Self::Nodes(nodes) = self else {
            return Vec::new();
        };
        nodes
            .iter()
            .flat_map(|n| {
                (0..n.allocatable).map(move |i| GpuStatus {
                    id: format!("{}/{i}", n.node),
                    index: Some(i),
                    uuid: None,
                    name: n.product.clone(),
                    memory_total_bytes: n.memory_bytes,
                    memory_used_bytes: None,
                    memory_free_bytes: None,
                    held_by: None,
                    node: Some(n.node.clone()),
                })
            })
            .collect()
    }
}

/// What a service needs on each GPU, recorded at admission so placement can pick GPUs that
/// hold it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GpuNeed {
    /// Bytes per GPU.
    pub bytes: u64,
    /// Share of a GPU's total memory the engine may use (vLLM 0.9).
    pub memory_fraction: f64,
}

impl GpuNeed {
    /// Usable memory of a GPU for this engine: free memory, capped at its share of the total.
    pub fn usable(&self, total: u64, free: u64) -> u64 {
        free.min((total as f64 * self.memory_fraction.clamp(0.0, 1.0)) as u64)
    }
}

/// A GPU the admission check may count on, with the memory it may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuCandidate {
    /// Device id.
    pub id: String,
    /// Total memory.
    pub total_bytes: u64,
    /// Free memory, counting GPUs this shim's services hold as released (they may be).
    pub free_bytes: u64,
}

struct Inventory {
    program: PathBuf,
    read_at: Option<Instant>,
    gpus: Vec<SmiGpu>,
}

/// Hands out accelerator ids to owners (one owner per replica, named `service/replica`), never
/// one id to two owners unless sharing is configured.
#[derive(Debug)]
pub struct GpuAllocator {
    devices: Vec<String>,
    share: bool,
    assigned: Mutex<BTreeMap<String, Vec<String>>>,
    needs: Mutex<HashMap<String, GpuNeed>>,
    inventory: Option<Mutex<Inventory>>,
}

impl std::fmt::Debug for Inventory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inventory")
            .field("program", &self.program)
            .field("gpus", &self.gpus.len())
            .finish()
    }
}

impl GpuAllocator {
    /// An allocator over the given device ids, memory unknown (no `nvidia-smi`).
    pub fn new(devices: Vec<String>, share: bool) -> Self {
        Self {
            devices,
            share,
            assigned: Mutex::new(BTreeMap::new()),
            needs: Mutex::new(HashMap::new()),
            inventory: None,
        }
    }

    /// The engine's allocator: `configured` ids (`engine.gpus`) when given, else the GPUs
    /// `program` (normally `nvidia-smi` on PATH) reports. Memory comes from `program` when it
    /// answers; when it does not, memory stays unknown and placement works as before.
    pub fn with_inventory(
        configured: Option<Vec<String>>,
        share: bool,
        program: impl Into<PathBuf>,
    ) -> Self {
        let program = program.into();
        let gpus = query(&program);
        let devices = match (configured, &gpus) {
            (Some(list), _) => list,
            (None, Some(gpus)) => gpus.iter().map(|g| g.index.to_string()).collect(),
            (None, None) => Vec::new(),
        };
        let mut allocator = Self::new(devices, share);
        if let Some(gpus) = gpus {
            allocator.inventory = Some(Mutex::new(Inventory {
                program,
                read_at: Some(Instant::now()),
                gpus,
            }));
        }
        allocator
    }

    /// Detects NVIDIA GPUs with `nvidia-smi`; none when it is absent or fails.
    pub fn detect() -> Vec<String> {
        query(std::path::Path::new("nvidia-smi"))
            .unwrap_or_default()
            .iter()
            .map(|g| g.index.to_string())
            .collect()
    }

    /// All device ids.
    pub fn devices(&self) -> &[String] {
        &self.devices
    }

    /// Whether GPU memory is known (nvidia-smi answered).
    pub fn knows_memory(&self) -> bool {
        self.inventory.is_some()
    }

    /// What `service` needs per GPU, as recorded.
    pub fn need(&self, service: &str) -> Option<GpuNeed> {
        self.needs.lock().expect("gpu lock").get(service).copied()
    }

    /// Records what `service` needs per GPU; placement of its replicas uses it.
    pub fn set_need(&self, service: &str, need: Option<GpuNeed>) {
        let mut needs = self.needs.lock().expect("gpu lock");
        match need {
            Some(n) => needs.insert(service.to_string(), n),
            None => needs.remove(service),
        };
    }

    /// The inventory rows (re-read when stale) by device id.
    fn rows(&self) -> HashMap<String, SmiGpu> {
        let Some(inventory) = &self.inventory else {
            return HashMap::new();
        };
        let mut inv = inventory.lock().expect("gpu inventory lock");
        if inv.read_at.is_none_or(|t| t.elapsed() >= REFRESH) {
            // A failed re-read keeps the last answer: one hiccup must not make memory unknown.
            if let Some(gpus) = query(&inv.program) {
                inv.gpus = gpus;
            }
            inv.read_at = Some(Instant::now());
        }
        let mut rows = HashMap::new();
        for id in &self.devices {
            if let Some(g) = inv
                .gpus
                .iter()
                .find(|g| g.index.to_string() == *id || g.uuid == *id)
            {
                rows.insert(id.clone(), g.clone());
            }
        }
        rows
    }

    /// Every GPU with its memory and holder.
    pub fn snapshot(&self) -> Vec<GpuStatus> {
        let rows = self.rows();
        let assigned = self.assigned.lock().expect("gpu lock");
        self.devices
            .iter()
            .map(|id| {
                let row = rows.get(id);
                let held_by = assigned
                    .iter()
                    .find(|(_, devices)| devices.contains(id))
                    .map(|(owner, _)| service_of(owner).to_string());
                let total = row.and_then(|r| r.memory_total_bytes);
                let used = row.and_then(|r| r.memory_used_bytes);
                GpuStatus {
                    id: id.clone(),
                    index: row.map(|r| r.index).or_else(|| id.parse().ok()),
                    uuid: row.map(|r| r.uuid.clone()),
                    name: row.map(|r| r.name.clone()),
                    memory_total_bytes: total,
                    memory_used_bytes: used,
                    memory_free_bytes: total.zip(used).map(|(t, u)| t.saturating_sub(u)),
                    held_by,
                    node: None,
                }
            })
            .collect()
    }

    /// The GPUs an admission check may count on, with memory; `None` when memory is unknown.
    /// GPUs held by this shim's services count as released (their services may stop, and a
    /// service that only waits for them stays `pending`, as before), so a request is refused
    /// only when the host as a whole cannot hold it.
    pub fn candidates(&self) -> Option<Vec<GpuCandidate>> {
        self.inventory.as_ref()?;
        let rows = self.rows();
        let assigned = self.assigned.lock().expect("gpu lock");
        let held: Vec<&String> = assigned.values().flatten().collect();
        let list: Vec<GpuCandidate> = self
            .devices
            .iter()
            .filter_map(|id| {
                let row = rows.get(id)?;
                let total = row.memory_total_bytes?;
                let used = row.memory_used_bytes.unwrap_or(0);
                let free = if held.contains(&id) {
                    total
                } else {
                    total.saturating_sub(used)
                };
                Some(GpuCandidate {
                    id: id.clone(),
                    total_bytes: total,
                    free_bytes: free,
                })
            })
            .collect();
        (!list.is_empty()).then_some(list)
    }

    /// Gives `count` devices to `owner` (replacing what it held).
    ///
    /// # Errors
    /// [`GpuError`] when fewer than `count` are free (or, with the owner's need and memory
    /// known, free and large enough).
    pub fn allocate(&self, owner: &str, count: u32) -> Result<Vec<String>, GpuError> {
        let need = self
            .needs
            .lock()
            .expect("gpu lock")
            .get(service_of(owner))
            .copied();
        // Read before taking the assignment lock: `rows` may run nvidia-smi.
        let rows = match need {
            Some(_) => self.rows(),
            None => HashMap::new(),
        };
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
        let memory_known = !rows.is_empty() && free.iter().all(|d| rows.contains_key(d));
        let (picked, need_bytes) = match need {
            Some(need) if memory_known => {
                // Best fit: the GPUs with the least usable memory that still hold the need.
                let mut fitting: Vec<(u64, usize, String)> = free
                    .iter()
                    .filter_map(|d| {
                        let row = &rows[d];
                        let total = row.memory_total_bytes?;
                        let used = row.memory_used_bytes.unwrap_or(0);
                        let usable = need.usable(total, total.saturating_sub(used));
                        let order = self.devices.iter().position(|x| x == d).unwrap_or(0);
                        (usable >= need.bytes).then(|| (usable, order, d.clone()))
                    })
                    .collect();
                fitting.sort();
                let ids: Vec<String> = fitting.into_iter().map(|(_, _, d)| d).collect();
                (ids, Some(need.bytes))
            }
            _ => (free, None),
        };
        if (picked.len() as u32) < count {
            return Err(GpuError {
                requested: count,
                free: picked.len() as u32,
                total,
                need_bytes,
            });
        }
        let picked: Vec<String> = picked.into_iter().take(count as usize).collect();
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

/// `service/replica` → `service`.
fn service_of(owner: &str) -> &str {
    owner.split('/').next().unwrap_or(owner)
}

/// Runs the inventory query; `None` when the program is missing or fails.
fn query(program: &std::path::Path) -> Option<Vec<SmiGpu>> {
    let out = std::process::Command::new(program)
        .args([
            "--query-gpu=index,uuid,name,memory.total,memory.used",
            "--format=csv,noheader,nounits",
        ])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| parse_nvidia_smi(&String::from_utf8_lossy(&out.stdout)))
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
                total: 2,
                need_bytes: None,
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

    #[test]
    fn nvidia_smi_output_parses_with_odd_names_and_na_memory() {
        let text = "0, GPU-aaa, NVIDIA H200, 143771, 1024\n\
                    1, GPU-bbb, Weird, Name, 81559, [N/A]\n\
                    garbage line\n";
        let gpus = parse_nvidia_smi(text);
        assert_eq!(gpus.len(), 2);
        assert_eq!(gpus[0].name, "NVIDIA H200");
        assert_eq!(gpus[0].memory_total_bytes, Some(143_771 * MIB));
        assert_eq!(gpus[0].memory_used_bytes, Some(1024 * MIB));
        assert_eq!(gpus[1].name, "Weird,Name");
        assert_eq!(gpus[1].memory_used_bytes, None);
    }

    /// A fake nvidia-smi that prints `rows` (index, uuid, name, total MiB, used MiB).
    fn fake_smi(dir: &std::path::Path, rows: &str) -> PathBuf {
        let data = dir.join("gpus.csv");
        std::fs::write(&data, rows).unwrap();
        let script = dir.join("nvidia-smi");
        std::fs::write(&script, format!("#!/bin/sh\ncat '{}'\n", data.display())).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        script
    }

    #[test]
    fn placement_picks_the_smallest_gpu_that_fits() {
        let dir = tempfile::tempdir().unwrap();
        let smi = fake_smi(
            dir.path(),
            "0, GPU-a, Big, 81920, 0\n1, GPU-b, Small, 24576, 0\n2, GPU-c, Mid, 49152, 0\n",
        );
        let gpus = GpuAllocator::with_inventory(None, false, &smi);
        assert_eq!(gpus.devices(), ["0", "1", "2"]);
        // 30 GiB at a 0.9 fraction: the 24 GiB GPU is too small, the 48 GiB one fits best.
        gpus.set_need(
            "svc",
            Some(GpuNeed {
                bytes: 30 << 30,
                memory_fraction: 0.9,
            }),
        );
        assert_eq!(gpus.allocate("svc/0", 1).unwrap(), ["2"]);
        assert_eq!(gpus.allocate("svc/1", 1).unwrap(), ["0"]);
        let err = gpus.allocate("svc/2", 1).unwrap_err();
        assert_eq!(err.free, 0);
        assert_eq!(
            err.to_string(),
            "insufficient GPUs: 1 requested, 0 of 3 free with 30.0 GiB usable"
        );
        // A service without a recorded need gets the first free one, as before.
        assert_eq!(gpus.allocate("other/0", 1).unwrap(), ["1"]);
        let snapshot = gpus.snapshot();
        assert_eq!(snapshot[2].held_by.as_deref(), Some("svc"));
        assert_eq!(snapshot[1].held_by.as_deref(), Some("other"));
        assert_eq!(snapshot[1].memory_free_bytes, Some(24576 * MIB));
        assert_eq!(snapshot[0].uuid.as_deref(), Some("GPU-a"));
    }

    #[test]
    fn configured_ids_get_memory_by_index_or_uuid_and_refresh() {
        let dir = tempfile::tempdir().unwrap();
        let smi = fake_smi(dir.path(), "0, GPU-a, A, 1000, 10\n1, GPU-b, B, 2000, 20\n");
        let gpus =
            GpuAllocator::with_inventory(Some(vec!["GPU-b".into(), "7".into()]), false, &smi);
        let s = gpus.snapshot();
        assert_eq!(s[0].index, Some(1));
        assert_eq!(s[0].memory_used_bytes, Some(20 * MIB));
        // Not reported by nvidia-smi: listed, memory unknown.
        assert_eq!(s[1].index, Some(7));
        assert_eq!(s[1].memory_total_bytes, None);
        // Memory is unknown for one free GPU, so a need cannot be checked: old behaviour.
        gpus.set_need(
            "x",
            Some(GpuNeed {
                bytes: 1 << 40,
                memory_fraction: 1.0,
            }),
        );
        assert_eq!(gpus.allocate("x/0", 1).unwrap(), ["GPU-b"]);
        // The candidates for admission: known memory only, held GPUs counted as released.
        let c = gpus.candidates().unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].free_bytes, 2000 * MIB);
    }

    #[test]
    fn cluster_rows_list_every_allocatable_gpu_of_every_node() {
        let cluster = ClusterGpus::Nodes(vec![
            NodeGpus {
                node: "a".into(),
                allocatable: 2,
                memory_bytes: Some(80 << 30),
                product: Some("NVIDIA H100".into()),
            },
            NodeGpus {
                node: "b".into(),
                allocatable: 1,
                memory_bytes: None,
                product: None,
            },
        ]);
        let rows = cluster.rows();
        let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["a/0", "a/1", "b/0"]);
        assert_eq!(rows[1].memory_total_bytes, Some(80 << 30));
        assert_eq!(rows[1].name.as_deref(), Some("NVIDIA H100"));
        assert_eq!(rows[2].node.as_deref(), Some("b"));
        assert_eq!(rows[2].memory_total_bytes, None);
        assert!(ClusterGpus::Unknown("forbidden".into()).rows().is_empty());
    }

    #[test]
    fn without_nvidia_smi_memory_is_unknown_and_ids_are_configured() {
        let gpus =
            GpuAllocator::with_inventory(Some(vec!["0".into()]), false, "/nonexistent/nvidia-smi");
        assert!(!gpus.knows_memory());
        assert!(gpus.candidates().is_none());
        assert_eq!(gpus.snapshot()[0].memory_total_bytes, None);
        assert_eq!(gpus.allocate("a/0", 1).unwrap(), ["0"]);
        let none = GpuAllocator::with_inventory(None, false, "/nonexistent/nvidia-smi");
        assert!(none.devices().is_empty());
    }
}
