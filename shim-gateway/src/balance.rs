//! Which model a request names, and which replica answers it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use shim_core::{Engine, Phase};

use crate::config::Balance;

/// One ready replica of a model, as the engine last observed it.
#[derive(Debug, Clone)]
pub(crate) struct Candidate {
    pub(crate) service_id: String,
    pub(crate) url: String,
}

/// What the engine knows about the model a request names.
#[derive(Debug)]
pub(crate) enum Resolution {
    /// At least one replica is ready.
    Ready {
        served: String,
        service_ids: Vec<String>,
        replicas: Vec<Candidate>,
    },
    /// Deployed but no replica is ready yet (pending, initializing, recovering).
    Starting { served: String },
    /// Every matching service failed; `reason` is the engine's.
    Failed { served: String, reason: String },
    /// Every matching service is being deleted.
    Terminating { served: String },
    /// No live service has this name or id.
    Unknown,
}

/// Looks `model` up as a served name or a service id. Services sharing a name pool their replicas.
pub(crate) fn resolve(engine: &Engine, model: &str) -> Resolution {
    let mut served: Option<String> = None;
    let mut service_ids = Vec::new();
    let mut replicas = Vec::new();
    let mut starting = false;
    let mut failed: Option<String> = None;
    let mut terminating = false;
    engine.for_each_service(|record| {
        if record.spec.model_name != model && record.id != model {
            return;
        }
        if record.phase == Phase::Deleted {
            return;
        }
        if served.is_none() {
            served = Some(record.spec.model_name.clone());
        }
        service_ids.push(record.id.clone());
        match record.phase {
            Phase::Terminating => terminating = true,
            Phase::Failed => {
                let reason = match (&record.reason, &record.message) {
                    (Some(r), Some(m)) => format!("{r}: {m}"),
                    (Some(r), None) => r.clone(),
                    (None, Some(m)) => m.clone(),
                    (None, None) => "failed".to_owned(),
                };
                failed.get_or_insert(reason);
            }
            _ => {
                // Replicas still ready while a degraded service is repaired keep serving.
                if record.replicas.is_empty() {
                    starting = true;
                }
                replicas.extend(record.replicas.iter().map(|url| Candidate {
                    service_id: record.id.clone(),
                    url: url.clone(),
                }));
            }
        }
    });
    let Some(served) = served else {
        return Resolution::Unknown;
    };
    if !replicas.is_empty() {
        Resolution::Ready {
            served,
            service_ids,
            replicas,
        }
    } else if starting {
        Resolution::Starting { served }
    } else if let Some(reason) = failed {
        Resolution::Failed { served, reason }
    } else if terminating {
        Resolution::Terminating { served }
    } else {
        Resolution::Unknown
    }
}

/// Distinct served names of live services, sorted (for the 404 that lists them).
pub(crate) fn available_models(engine: &Engine) -> Vec<String> {
    let mut names = Vec::new();
    engine.for_each_service(|record| {
        if record.phase != Phase::Deleted && !names.contains(&record.spec.model_name) {
            names.push(record.spec.model_name.clone());
        }
    });
    names.sort();
    names
}

/// Live load and health of one replica, shared by every request that uses it.
#[derive(Debug, Default)]
pub(crate) struct ReplicaState {
    pub(crate) in_flight: AtomicI64,
    /// Milliseconds since the balancer's epoch until which the replica sits out; 0 = never.
    cooling_until_ms: AtomicU64,
}

/// Holds a replica's in-flight count up for as long as a request uses it.
#[derive(Debug)]
pub(crate) struct InFlight(Arc<ReplicaState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Picks replicas.
#[derive(Debug)]
pub(crate) struct Balancer {
    policy: Balance,
    replicas: RwLock<HashMap<String, Arc<ReplicaState>>>,
    /// Rotates the start of the least-loaded scan so ties spread evenly.
    next: AtomicUsize,
    epoch: Instant,
    cooldown: Duration,
}

/// Virtual nodes per replica on the hash ring: enough for an even split of a few replicas.
const VNODES: u64 = 64;

/// A replica's load may exceed the mean by this factor before prefix hashing skips it (CHWBL).
const LOAD_FACTOR: f64 = 1.25;

impl Balancer {
    pub(crate) fn new(policy: Balance, cooldown: Duration) -> Self {
        Self {
            policy,
            replicas: RwLock::default(),
            next: AtomicUsize::new(0),
            epoch: Instant::now(),
            cooldown,
        }
    }

    fn state(&self, url: &str) -> Arc<ReplicaState> {
        if let Some(s) = self
            .replicas
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(url)
        {
            return s.clone();
        }
        let mut map = self.replicas.write().unwrap_or_else(|e| e.into_inner());
        // Replicas come and go with new ports; forget idle ones so the map stays small.
        if map.len() > 1024 {
            map.retain(|_, s| s.in_flight.load(Ordering::Relaxed) > 0);
        }
        map.entry(url.to_owned()).or_default().clone()
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Leaves a replica out for the cool-down (it refused a connection).
    pub(crate) fn cool_down(&self, url: &str) {
        let until = self.now_ms() + u64::try_from(self.cooldown.as_millis()).unwrap_or(0);
        self.state(url)
            .cooling_until_ms
            .store(until.max(1), Ordering::Relaxed);
    }

    /// Chooses a replica among `candidates` other than `exclude`, and counts the request as in
    /// flight on it. `key` is the prompt prefix for `balance: prefix`.
    pub(crate) fn pick(
        &self,
        candidates: &[Candidate],
        exclude: Option<&str>,
        key: Option<&str>,
    ) -> Option<(usize, InFlight)> {
        let now = self.now_ms();
        let states: Vec<(usize, Arc<ReplicaState>)> = candidates
            .iter()
            .enumerate()
            .filter(|(_, c)| Some(c.url.as_str()) != exclude)
            .map(|(i, c)| (i, self.state(&c.url)))
            .collect();
        if states.is_empty() {
            return None;
        }
        // Replicas cooling down are used only when nothing else is left.
        let warm: Vec<&(usize, Arc<ReplicaState>)> = states
            .iter()
            .filter(|(_, s)| s.cooling_until_ms.load(Ordering::Relaxed) <= now)
            .collect();
        let pool: Vec<&(usize, Arc<ReplicaState>)> = if warm.is_empty() {
            states.iter().collect()
        } else {
            warm
        };
        let chosen = match (self.policy, key) {
            (Balance::Prefix, Some(key)) if pool.len() > 1 => {
                self.by_prefix(candidates, &pool, key)
            }
            _ => self.least_in_flight(&pool),
        };
        let (index, state) = pool[chosen];
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        Some((*index, InFlight(state.clone())))
    }

    fn least_in_flight(&self, pool: &[&(usize, Arc<ReplicaState>)]) -> usize {
        let start = self.next.fetch_add(1, Ordering::Relaxed) % pool.len();
        let mut best = start;
        let mut best_load = i64::MAX;
        for step in 0..pool.len() {
            let i = (start + step) % pool.len();
            let load = pool[i].1.in_flight.load(Ordering::Relaxed);
            if load < best_load {
                best = i;
                best_load = load;
            }
        }
        best
    }

    /// Consistent hashing with bounded loads: walk the ring from the key's hash and take the
    /// first replica whose load stays within `LOAD_FACTOR` of the mean.
    fn by_prefix(
        &self,
        candidates: &[Candidate],
        pool: &[&(usize, Arc<ReplicaState>)],
        key: &str,
    ) -> usize {
        let mut ring: Vec<(u64, usize)> = Vec::with_capacity(pool.len() * VNODES as usize);
        for (slot, (index, _)) in pool.iter().enumerate() {
            let url = &candidates[*index].url;
            for v in 0..VNODES {
                ring.push((hash(&[url.as_bytes(), &v.to_le_bytes()]), slot));
            }
        }
        ring.sort_unstable();
        let total: i64 = pool
            .iter()
            .map(|(_, s)| s.in_flight.load(Ordering::Relaxed).max(0))
            .sum();
        // The request being placed counts too, so an idle pool always has room.
        let bound = ((total + 1) as f64 * LOAD_FACTOR / pool.len() as f64).ceil() as i64;
        let h = hash(&[key.as_bytes()]);
        let start = ring.partition_point(|(p, _)| *p < h);
        for step in 0..ring.len() {
            let slot = ring[(start + step) % ring.len()].1;
            if pool[slot].1.in_flight.load(Ordering::Relaxed) < bound {
                return slot;
            }
        }
        self.least_in_flight(pool)
    }
}

/// A stable 64-bit hash (the same in every process and release: rings must agree over time):
/// FNV-1a, then the splitmix64 finaliser so nearby inputs spread over the ring.
fn hash(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in *part {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The first `chars` characters of a request's prompt, rendered: chat messages as
/// `role: content` lines, else `prompt`, else `input`.
pub(crate) fn prompt_prefix(body: &serde_json::Value, chars: usize) -> Option<String> {
    let mut text = String::new();
    if let Some(messages) = body.get("messages").and_then(|m| m.as_array()) {
        for message in messages {
            let role = message.get("role").and_then(|r| r.as_str()).unwrap_or("");
            text.push_str(role);
            text.push_str(": ");
            match message.get("content") {
                Some(serde_json::Value::String(s)) => text.push_str(s),
                Some(serde_json::Value::Array(parts)) => {
                    for part in parts {
                        if let Some(t) = part.get("text").and_then(|t| t.as_str()) {
                            text.push_str(t);
                        }
                    }
                }
                _ => {}
            }
            text.push('\n');
            if text.chars().count() >= chars {
                break;
            }
        }
    } else {
        let source = body.get("prompt").or_else(|| body.get("input"))?;
        match source {
            serde_json::Value::String(s) => text.push_str(s),
            other => text.push_str(&other.to_string()),
        }
    }
    Some(text.chars().take(chars).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidates(n: usize) -> Vec<Candidate> {
        (0..n)
            .map(|i| Candidate {
                service_id: "s".into(),
                url: format!("http://127.0.0.1:{}", 9000 + i),
            })
            .collect()
    }

    #[test]
    fn least_in_flight_spreads_and_prefers_the_idle_replica() {
        let b = Balancer::new(Balance::LeastInFlight, Duration::from_secs(5));
        let c = candidates(2);
        let (first, held) = b.pick(&c, None, None).unwrap();
        // The other replica is idle, so the next request goes there whatever the rotation.
        for _ in 0..4 {
            let (i, _) = b.pick(&c, None, None).unwrap();
            assert_ne!(i, first);
        }
        drop(held);
        let (i, _) = b.pick(&c, Some(&c[0].url), None).unwrap();
        assert_eq!(i, 1, "the excluded replica is never chosen");
    }

    #[test]
    fn cooling_replicas_sit_out_unless_nothing_else_is_left() {
        let b = Balancer::new(Balance::LeastInFlight, Duration::from_secs(60));
        let c = candidates(2);
        b.cool_down(&c[0].url);
        for _ in 0..5 {
            assert_eq!(b.pick(&c, None, None).unwrap().0, 1);
        }
        assert_eq!(b.pick(&c, Some(&c[1].url), None).unwrap().0, 0);
    }

    #[test]
    fn prefix_sticks_to_one_replica_until_it_is_overloaded() {
        let b = Balancer::new(Balance::Prefix, Duration::from_secs(5));
        let c = candidates(3);
        let (home, _held) = b.pick(&c, None, Some("system: you are terse")).unwrap();
        // Idle again; the same prefix goes home.
        drop(_held);
        for _ in 0..5 {
            let (i, _) = b.pick(&c, None, Some("system: you are terse")).unwrap();
            assert_eq!(i, home);
        }
        // Hold requests on the home replica: past 125 % of the mean it is skipped.
        let mut held = Vec::new();
        let mut moved = false;
        for _ in 0..10 {
            let (i, guard) = b.pick(&c, None, Some("system: you are terse")).unwrap();
            moved |= i != home;
            held.push(guard);
        }
        assert!(moved, "bounded load sends some requests elsewhere");
        // Different prefixes reach more than one replica.
        drop(held);
        let homes: std::collections::HashSet<usize> = (0..50)
            .map(|k| b.pick(&c, None, Some(&format!("user: {k}"))).unwrap().0)
            .collect();
        assert!(homes.len() > 1);
    }

    #[test]
    fn prompt_prefix_renders_messages_and_prompts() {
        let chat = serde_json::json!({"messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]}
        ]});
        assert_eq!(
            prompt_prefix(&chat, 100).unwrap(),
            "system: be brief\nuser: hi\n"
        );
        assert_eq!(prompt_prefix(&chat, 6).unwrap(), "system");
        let completion = serde_json::json!({"prompt": "once upon"});
        assert_eq!(prompt_prefix(&completion, 4).unwrap(), "once");
        assert!(prompt_prefix(&serde_json::json!({}), 4).is_none());
    }
}
