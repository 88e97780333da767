//! What a cluster consists of, written to `<state dir>/state.json` on every
//! change, so that whoever comes next can remove it: the process that owns
//! it at exit, `cargo xtask cluster down`, or the next start after a crash.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, Once, TryLockError};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::network::{Plan, delete_netns};
use super::process::{Proc, start_time};
use super::{Error, Result};

const STATE_FILE: &str = "state.json";

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct State {
    pub name: String,
    pub slot: u8,
    /// Started by `cargo xtask cluster up`: lives until `cluster down`.
    pub detached: bool,
    /// The process whose exit ends a process-lifetime cluster.
    pub owner: Option<Proc>,
    /// `https://<ip>:<port>`, once the apiserver runs.
    #[serde(default)]
    pub server: String,
    #[serde(default)]
    pub processes: Vec<Proc>,
    #[serde(default)]
    pub nodes: Vec<NodeRecord>,
    #[serde(default)]
    pub pods: Vec<PodRecord>,
    /// Started with the workload controllers and the scheduler's rights,
    /// so that real nodes can run the pods of Deployments and DaemonSets.
    #[serde(default)]
    pub workloads: bool,
    /// The last `n` of the names made by `unique_name`.
    #[serde(default)]
    pub next_name: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeRecord {
    pub name: String,
    pub index: u8,
    pub netns: String,
    /// Run by kubelet and containerd (what they made is found from the
    /// node's name: [`super::real::Layout`]).
    #[serde(default)]
    pub real: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PodRecord {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub index: u8,
    pub netns: String,
}

impl State {
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(STATE_FILE);
        let text = fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::Process(format!("{}: {e}", path.display())))
    }

    /// Writes the state atomically (a new file renamed over the old one),
    /// and its copy in the machine-wide [registry].
    pub fn save(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("the state serialises");
        write_atomically(&dir.join(STATE_FILE), &text)?;
        let entry = Registered {
            dir: dir.to_path_buf(),
            state: self.clone(),
        };
        let text = serde_json::to_string_pretty(&entry).expect("the entry serialises");
        let registry = registry();
        fs::create_dir_all(&registry).map_err(|e| Error::io(&registry, e))?;
        write_atomically(&registry_entry(dir), &text)
    }

    pub fn plan(&self) -> Plan {
        Plan::new(self.slot)
    }

    /// Whether the cluster was left behind by a process that has ended.
    fn abandoned(&self) -> bool {
        !self.detached && self.owner.as_ref().is_none_or(|o| !o.alive())
    }
}

/// A new file renamed over `path`, so that a reader sees the old or the new.
fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// A cluster's entry in the [registry]: its state and where its state
/// directory is.
#[derive(Serialize, Deserialize)]
struct Registered {
    dir: PathBuf,
    state: State,
}

/// Machine-wide, one entry per cluster of any checkout: a start in one
/// checkout also removes what a killed run of another left, even when that
/// checkout has been deleted since.
fn registry() -> PathBuf {
    std::env::temp_dir().join("packet-capture-clusters")
}

fn registry_entry(dir: &Path) -> PathBuf {
    let key: String = dir
        .to_string_lossy()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    registry().join(format!("{key}.json"))
}

/// Where the state directories live: `.cluster/` in the workspace.
pub fn state_root() -> PathBuf {
    super::workspace_root().join(".cluster")
}

/// Holds the machine-wide lock under which clusters pick their addresses.
pub struct AllocationLock(#[allow(dead_code)] File);

impl AllocationLock {
    pub fn take() -> Result<Self> {
        let path = std::env::temp_dir().join("packet-capture-cluster.lock");
        let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
        file.lock().map_err(|e| Error::io(&path, e))?;
        Ok(Self(file))
    }
}

/// Removes clusters whose owning process has ended (a crashed or killed
/// test run), then picks a slot no other cluster on this machine uses and
/// records the new cluster under it. Call with the allocation lock held.
pub fn allocate(
    _lock: &AllocationLock,
    root: &Path,
    name: &str,
    detached: bool,
) -> Result<(PathBuf, State)> {
    fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
    let mut used = Vec::new();
    for entry in fs::read_dir(root).map_err(|e| Error::io(root, e))? {
        let dir = entry.map_err(|e| Error::io(root, e))?.path();
        if !dir.is_dir() {
            continue;
        }
        match State::load(&dir) {
            Ok(state) if state.abandoned() => teardown(&dir, &state, Duration::ZERO),
            Ok(state) => used.push(state.slot),
            // Created and never recorded: a start that died at once.
            Err(_) => {
                let _ = fs::remove_dir_all(&dir);
            }
        }
    }
    remove_abandoned_elsewhere();
    let dir = root.join(name);
    if dir.exists() {
        return Err(Error::Process(format!(
            "a cluster named {name} is already running (state in {}); \
             `cargo xtask cluster down --name {name}` removes it",
            dir.display()
        )));
    }
    let slot = (0..Plan::SLOTS)
        .find(|s| !used.contains(s) && Plan::new(*s).free_on_host())
        .ok_or_else(|| {
            Error::Process(format!(
                "all {} cluster address slots are in use",
                Plan::SLOTS
            ))
        })?;
    fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let owner = (!detached).then(|| {
        let pid = std::process::id();
        Proc {
            role: "owner".into(),
            pid,
            start: start_time(pid).unwrap_or_default(),
        }
    });
    let state = State {
        name: name.to_string(),
        slot,
        detached,
        owner,
        ..State::default()
    };
    state.save(&dir)?;
    Ok((dir, state))
}

/// Removes the clusters of other checkouts whose owning process has ended
/// (those of this checkout are gone already, and their entries with them).
fn remove_abandoned_elsewhere() {
    let Ok(entries) = fs::read_dir(registry()) else {
        return;
    };
    for path in entries.filter_map(|e| e.ok()).map(|e| e.path()) {
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let entry = fs::read_to_string(&path)
            .ok()
            .and_then(|text| serde_json::from_str::<Registered>(&text).ok());
        match entry {
            Some(entry) if entry.state.abandoned() => {
                teardown(&entry.dir, &entry.state, Duration::ZERO);
            }
            Some(_) => {}
            None => {
                let _ = fs::remove_file(&path);
            }
        }
    }
}

/// Stops every process, removes every namespace and link of a cluster, then
/// its state directory. Best effort: it goes on past what is already gone.
/// Agents get `grace` to finish their files after SIGTERM; the control plane
/// is killed after at most the same time.
pub fn teardown(dir: &Path, state: &State, grace: Duration) {
    // Agents first, the control plane in reverse order of start.
    for p in state.processes.iter().rev() {
        p.stop(grace);
    }
    for pod in &state.pods {
        delete_netns(&pod.netns);
    }
    for node in &state.nodes {
        if node.real {
            super::real::Layout::of(dir, &state.name, &node.name).remove();
        }
        delete_netns(&node.netns);
    }
    state.plan().delete_bridge();
    let _ = fs::remove_dir_all(dir);
    let _ = fs::remove_file(registry_entry(dir));
}

/// Removes the state root once the last cluster of the checkout is gone,
/// so nothing is left behind (under the allocation lock, so that no start
/// is creating a cluster in it meanwhile).
pub fn remove_root_if_empty() {
    if let Ok(_lock) = AllocationLock::take() {
        // Fails, as it should, while the root holds a cluster.
        let _ = fs::remove_dir(state_root());
    }
}

static OWNED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Tears the cluster in `dir` down when this process exits normally (the
/// test harness calls `exit` after the last test, whatever the results).
/// Processes are also killed by their parent-death signal, and a start after
/// a crash removes what remains.
pub fn remove_at_exit(dir: &Path) {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        // SAFETY: registering a plain extern "C" function.
        unsafe { libc::atexit(at_exit) };
    });
    lock_owned().push(dir.to_path_buf());
}

/// Forgets a cluster that was torn down already.
pub fn forget_at_exit(dir: &Path) {
    lock_owned().retain(|d| d != dir);
}

fn lock_owned() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    OWNED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

extern "C" fn at_exit() {
    let dirs = match OWNED.try_lock() {
        Ok(dirs) => dirs.clone(),
        Err(TryLockError::Poisoned(p)) => p.into_inner().clone(),
        // Someone holds it while the process exits: leave it to the next start.
        Err(TryLockError::WouldBlock) => return,
    };
    let any = !dirs.is_empty();
    for dir in dirs {
        if let Ok(state) = State::load(&dir) {
            teardown(&dir, &state, Duration::ZERO);
        }
    }
    if any {
        remove_root_if_empty();
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    fn sleeper() -> (std::process::Child, Proc) {
        let child = Command::new("sleep").arg("60").spawn().unwrap();
        let proc = Proc::of("sleeper", &child);
        (child, proc)
    }

    #[test]
    fn a_start_removes_what_a_crashed_run_left_and_keeps_the_rest() {
        if !crate::privileged("a_start_removes_what_a_crashed_run_left_and_keeps_the_rest") {
            return;
        }
        let root = std::env::temp_dir().join(format!("pc-state-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let lock = AllocationLock::take().unwrap();
        // While the lock is held nobody takes a free slot.
        let slot = (0..Plan::SLOTS)
            .rev()
            .find(|s| Plan::new(*s).free_on_host())
            .unwrap();
        let (mut dead_owner, owner) = sleeper();
        dead_owner.kill().unwrap();
        dead_owner.wait().unwrap();
        let (mut left_running, left) = sleeper();
        let netns = format!("pc-state-test-{}", std::process::id());
        super::super::network::ip(None, &["netns", "add", &netns]).unwrap();

        let crashed = State {
            name: "crashed".into(),
            slot,
            owner: Some(owner),
            processes: vec![left.clone()],
            nodes: vec![NodeRecord {
                name: "n-1".into(),
                index: 1,
                netns: netns.clone(),
                real: false,
            }],
            ..State::default()
        };
        let crashed_dir = root.join("crashed");
        fs::create_dir_all(&crashed_dir).unwrap();
        crashed.save(&crashed_dir).unwrap();
        let kept = State {
            name: "kept".into(),
            slot,
            detached: true,
            ..State::default()
        };
        let kept_dir = root.join("kept");
        fs::create_dir_all(&kept_dir).unwrap();
        kept.save(&kept_dir).unwrap();
        let partial = root.join("partial");
        fs::create_dir_all(&partial).unwrap();
        // A crashed run of another checkout, deleted since: only the
        // registry knows of it.
        let other_netns = format!("{netns}-other");
        super::super::network::ip(None, &["netns", "add", &other_netns]).unwrap();
        let other_checkout = root.with_extension("other");
        let other_dir = other_checkout.join("crashed");
        fs::create_dir_all(&other_dir).unwrap();
        State {
            name: "crashed".into(),
            slot,
            owner: crashed.owner.clone(),
            nodes: vec![NodeRecord {
                name: "n-1".into(),
                index: 1,
                netns: other_netns.clone(),
                real: false,
            }],
            ..State::default()
        }
        .save(&other_dir)
        .unwrap();
        fs::remove_dir_all(&other_checkout).unwrap();

        let (dir, state) = allocate(&lock, &root, "fresh", false).unwrap();
        assert!(!crashed_dir.exists(), "the crashed cluster's state is left");
        assert!(!partial.exists(), "the unrecorded directory is left");
        assert!(!left.alive(), "the crashed cluster's process still runs");
        for gone in [&netns, &other_netns] {
            assert!(
                !Path::new("/run/netns").join(gone).exists(),
                "{gone} is left"
            );
        }
        assert!(!registry_entry(&crashed_dir).exists());
        assert!(!registry_entry(&other_dir).exists());
        left_running.wait().unwrap();
        assert!(kept_dir.exists(), "a detached cluster was removed");
        assert_ne!(state.slot, slot, "the detached cluster's slot was reused");
        assert_eq!(dir, root.join("fresh"));
        assert_eq!(state.owner.as_ref().unwrap().pid, std::process::id());
        // Our own cluster is alive: a second start under its name fails.
        assert!(allocate(&lock, &root, "fresh", false).is_err());
        teardown(&dir, &state, Duration::ZERO);
        teardown(&kept_dir, &kept, Duration::ZERO);
        assert!(!registry_entry(&kept_dir).exists());
        fs::remove_dir_all(&root).unwrap();
    }
}
