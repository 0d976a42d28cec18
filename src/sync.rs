//! Locking a mutex whose holder may have panicked: below every module that shares state behind one.

use std::sync::{Mutex, MutexGuard};

/// Locks a mutex, whose data stays consistent even if a holder panicked (each critical section that
/// uses it is one assignment or one insert).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
