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
