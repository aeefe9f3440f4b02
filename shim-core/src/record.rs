//! What the engine stores per service: desired spec, generation, phase and progress.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::phase::Phase;
use crate::pipeline::StepProgress;
use crate::spec::DeploySpec;

/// Whether the service should exist. Deletion is desired state too, so deploy, update and delete
/// are all just new desired states of one id and cannot race into a mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Desired {
    /// Run the spec.
    Present,
    /// Remove the workload; the record stays as history.
    Absent,
}

/// One service: desired state plus what was observed, as stored and as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRecord {
    /// Opaque id (8 lowercase hex characters).
    pub id: String,
    /// The last accepted spec.
    pub spec: DeploySpec,
    /// Bumped by every accepted deploy, update or delete.
    pub generation: u64,
    /// Present or absent.
    pub desired: Desired,
    /// Lifecycle phase.
    pub phase: Phase,
    /// Typed reason while pending or failed.
    pub reason: Option<String>,
    /// Human-readable detail (the runtime's own words).
    pub message: Option<String>,
    /// Full URL ending in `/v1/chat/completions`; empty until running.
    pub endpoint: String,
    /// Replicas ready, as last observed.
    pub ready_replicas: u32,
    /// Replicas wanted.
    pub desired_replicas: u32,
    /// Base URL of every ready replica, as last observed: what the OpenAI gateway balances over.
    /// Observed state, not desired: empty until the first replica is ready.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<String>,
    /// Generation whose pipeline last completed.
    pub applied_generation: u64,
    /// Repairs made for the current generation.
    pub restarts: u32,
    /// The step that is waiting for resources while the service is pending with a reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked_step: Option<String>,
    /// Steps of the latest pipeline run (for the current generation).
    pub steps: Vec<StepProgress>,
    /// When the service was first deployed.
    pub created_at: DateTime<Utc>,
    /// Time of the last real status change (phase, reason or endpoint).
    pub updated_at: DateTime<Utc>,
}

impl ServiceRecord {
    /// A freshly accepted service at generation 1.
    pub fn new(id: String, spec: DeploySpec, now: DateTime<Utc>) -> Self {
        let desired_replicas = spec.replicas();
        Self {
            id,
            spec,
            generation: 1,
            desired: Desired::Present,
            phase: Phase::Pending,
            reason: None,
            message: None,
            endpoint: String::new(),
            ready_replicas: 0,
            desired_replicas,
            replicas: Vec::new(),
            applied_generation: 0,
            restarts: 0,
            blocked_step: None,
            steps: Vec::new(),
            created_at: now,
            updated_at: now,
        }
    }

    /// Whether the record still belongs to the live set (not deleted).
    pub fn is_live(&self) -> bool {
        self.phase != Phase::Deleted
    }
}

/// Serialises a `Duration` as whole milliseconds.
pub mod duration_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes milliseconds.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    /// Reads milliseconds.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}
