//! System and process memory readings (sysinfo), for admission and /health.

use std::sync::Mutex;

use sysinfo::{MemoryRefreshKind, Pid, ProcessRefreshKind, ProcessesToUpdate, RefreshKind, System};

pub struct MemoryMonitor {
    system: Mutex<System>,
    pid: Pid,
}

impl Default for MemoryMonitor {
    fn default() -> Self {
        MemoryMonitor {
            system: Mutex::new(System::new_with_specifics(RefreshKind::nothing().with_memory(MemoryRefreshKind::everything()))),
            pid: Pid::from_u32(std::process::id()),
        }
    }
}

impl MemoryMonitor {
    /// Memory the OS could hand out now (includes reclaimable cache).
    pub fn available(&self) -> u64 {
        let mut s = self.system.lock().unwrap();
        s.refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        s.available_memory()
    }

    pub fn total(&self) -> u64 {
        self.system.lock().unwrap().total_memory()
    }

    /// This process's resident set size.
    pub fn process_rss(&self) -> u64 {
        let mut s = self.system.lock().unwrap();
        s.refresh_processes_specifics(ProcessesToUpdate::Some(&[self.pid]), false, ProcessRefreshKind::nothing().with_memory());
        s.process(self.pid).map(|p| p.memory()).unwrap_or(0)
    }
}

/// Fixes the C heap's threshold for serving an allocation by its own
/// mapping at 1 MiB. glibc raises it (up to 32 MiB) after freeing a large
/// block, and its trim threshold with it (to 64 MiB): then tensors and
/// caches freed by an unloaded model stay resident at the top of a thread's
/// heap, out of `malloc_trim`'s reach. Fixed, a large block is returned to
/// the OS when freed. (MLX keeps its own cache of freed buffers for reuse,
/// so steps do not map and unmap on every allocation.)
pub fn tune_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        // SAFETY: mallopt only sets allocator parameters.
        ONCE.call_once(|| unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        });
    }
}

/// Returns the C heap's free pages to the OS (glibc keeps them otherwise):
/// after a model is unloaded, its freed memory leaves the process.
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free pages of the heap's arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_are_plausible() {
        let m = MemoryMonitor::default();
        assert!(m.available() > 0);
        assert!(m.total() >= m.available());
        let rss = m.process_rss();
        assert!(rss > 1 << 20, "rss {rss}");
    }
}
