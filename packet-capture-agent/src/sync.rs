//! Mutexes for code that runs on the agent's threads and tasks.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `mutex`, also when a thread panicked while holding it. What the
/// agent's mutexes guard is whole between statements (maps, queues, a
/// handle), so the data is still sound; taking it keeps one failed request
/// or thread from failing every later caller of the same lock.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
