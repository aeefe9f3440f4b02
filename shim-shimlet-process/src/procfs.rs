//! Process identity and signals, guarded against PID reuse.
//!
//! A pid alone does not name a process: once a process is reaped its pid can be handed to an
//! unrelated one, and after a shim restart the pid in a state file may belong to anything. So
//! every replica is recorded as (pid, start time), the start time being field 22 of
//! `/proc/<pid>/stat` (clock ticks since boot), and no signal is sent unless both still match.

use std::path::PathBuf;

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

/// The fields of `/proc/<pid>/stat` this crate needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcStat {
    /// Scheduler state (`R`, `S`, `D`, `Z`, …).
    pub state: char,
    /// Process group id.
    pub pgrp: i32,
    /// Start time in clock ticks since boot.
    pub start_time: u64,
}

/// Parses the content of a `/proc/<pid>/stat` file.
///
/// The second field (the command name) is in parentheses and may itself contain spaces and
/// parentheses, so the fixed fields are counted from the last `)`.
pub(crate) fn parse_stat(content: &str) -> Option<ProcStat> {
    let rest = &content[content.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `fields[0]` is field 3 (state), so field N is `fields[N - 3]`.
    Some(ProcStat {
        state: fields.first()?.chars().next()?,
        pgrp: fields.get(2)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

/// The current stat of `pid`, or `None` when there is no such process (or it cannot be read).
pub(crate) fn read_stat(pid: u32) -> Option<ProcStat> {
    let content = std::fs::read_to_string(PathBuf::from(format!("/proc/{pid}/stat"))).ok()?;
    parse_stat(&content)
}

/// The start time of `pid`, read right after spawning it.
pub(crate) fn start_time(pid: u32) -> Option<u64> {
    read_stat(pid).map(|s| s.start_time)
}

/// What a recorded (pid, start time) refers to now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Identity {
    /// No process has that pid.
    Gone,
    /// The recorded process has exited but is not reaped yet (zombie): it is dead.
    Dead,
    /// The recorded process is alive; `pgrp` is its process group.
    Running { pgrp: i32 },
    /// The pid now belongs to another process: never touch it.
    Reused,
}

/// Looks up what `(pid, start_time)` refers to now.
pub(crate) fn identity(pid: u32, start_time: u64) -> Identity {
    match read_stat(pid) {
        None => Identity::Gone,
        Some(stat) if stat.start_time != start_time => Identity::Reused,
        Some(stat) if matches!(stat.state, 'Z' | 'X' | 'x') => Identity::Dead,
        Some(stat) => Identity::Running { pgrp: stat.pgrp },
    }
}

/// Whether the recorded process is still running.
pub(crate) fn is_running(pid: u32, start_time: u64) -> bool {
    matches!(identity(pid, start_time), Identity::Running { .. })
}

/// A pid that is safe to pass to `kill(2)`: 0, -1 and other non-positive values address whole
/// groups or every process, and pid 1 is init.
fn signallable(pid: u32) -> Option<Pid> {
    i32::try_from(pid)
        .ok()
        .filter(|p| *p > 1)
        .map(Pid::from_raw)
}

/// Sends `signal` to the recorded process, and to its whole process group when it leads one
/// (replicas are spawned as group leaders, so engine worker processes are reached too).
///
/// Returns whether a signal was sent: nothing is sent when the process is gone, dead, or the pid
/// was reused.
pub(crate) fn signal(pid: u32, start_time: u64, signal: Signal) -> bool {
    let Some(target) = signallable(pid) else {
        return false;
    };
    let Identity::Running { pgrp } = identity(pid, start_time) else {
        return false;
    };
    let sent = if pgrp == target.as_raw() {
        killpg(target, signal)
    } else {
        // The engine left the group we made for it; signal only the process we started.
        kill(target, signal)
    };
    match sent {
        Ok(()) => true,
        Err(err) => {
            tracing::debug!(pid, %signal, error = %err, "signal not delivered");
            false
        }
    }
}

/// Process group leaders (pid == group id) whose environment holds `NAME=value`, except those
/// in `known`: engines this shim started (it tags them) but never recorded, because it died
/// between spawning them and writing its state file. Workers of a known engine are in its
/// group and are never listed.
pub(crate) fn unrecorded_leaders(tag: &str, known: &std::collections::HashSet<u32>) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if known.contains(&pid) {
            continue;
        }
        let Some(stat) = read_stat(pid) else { continue };
        if i64::from(stat.pgrp) != i64::from(pid) || matches!(stat.state, 'Z' | 'X') {
            continue;
        }
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if environ.split(|b| *b == 0).any(|v| v == tag.as_bytes()) {
            found.push(pid);
        }
    }
    found
}

/// Kills the process group of an unrecorded engine found by [`unrecorded_leaders`], checking
/// first that `pid` still leads it.
pub(crate) fn kill_unrecorded(pid: u32) {
    let Some(target) = signallable(pid) else {
        return;
    };
    if read_stat(pid).is_some_and(|s| i64::from(s.pgrp) == i64::from(pid)) {
        let _ = killpg(target, Signal::SIGKILL);
    }
}

/// After a group leader we stopped has died, kills what is left of its process group (engine
/// workers that outlived it).
///
/// The group id equals the leader's pid, and the kernel does not hand a pid out again while a
/// group of that id has members. So the group is ours unless a new process now holds the pid,
/// which is checked first.
pub(crate) fn kill_leftover_group(pid: u32, start_time: u64) {
    let Some(target) = signallable(pid) else {
        return;
    };
    if matches!(identity(pid, start_time), Identity::Gone | Identity::Dead) {
        // ESRCH (no members left) is the common, expected answer.
        let _ = killpg(target, Signal::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_with_spaces_and_parentheses() {
        let line = "4242 (my (weird) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                    987654 1000 200 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0";
        let stat = parse_stat(line).unwrap();
        assert_eq!(
            stat,
            ProcStat {
                state: 'S',
                pgrp: 4242,
                start_time: 987654
            }
        );
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S 1"), None);
    }

    #[test]
    fn own_process_is_running_and_a_wrong_start_time_is_reuse() {
        let pid = std::process::id();
        let start = start_time(pid).unwrap();
        assert!(matches!(identity(pid, start), Identity::Running { .. }));
        assert_eq!(identity(pid, start + 1), Identity::Reused);
        assert!(!signal(pid, start + 1, Signal::SIGTERM));
    }

    #[test]
    fn dangerous_pids_are_never_signalled() {
        assert!(signallable(0).is_none());
        assert!(signallable(1).is_none());
        assert!(signallable(u32::MAX).is_none());
        assert!(!signal(0, 0, Signal::SIGTERM));
    }
}
