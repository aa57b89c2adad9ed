//! Sharded serving: one model over the ranks of an MLX distributed group
//! (`mx.distributed`: ring over TCP, JACCL, MPI). The transport and the
//! sharding are MLX's and mlx-lm's; the protocol between the ranks (rank 0
//! decides every engine step and broadcasts it) is in
//! `python/pensieve_shim/shard.py`.
//!
//! This module is the process side:
//! - which rank this process is (`MLX_RANK`, set by `mlx.launch` or by
//!   `pensieve --ranks N`), so rank 0 serves HTTP and the others follow;
//! - `--ranks`/`--hosts`: writing the ring's host file, starting the local
//!   ranks as child processes and printing the command for remote ones;
//! - the group's health: an operation that takes longer than
//!   `--shard-timeout` (a rank stopped answering) or a collective that failed
//!   (a rank is gone) marks the group lost: running requests get an error
//!   event, `/health` turns 503, and every surviving rank exits non-zero.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::engine::EngineStatus;

/// Exit status of a rank that left because its group broke.
pub const EXIT_GROUP_LOST: u8 = 3;

/// The rank the launcher gave this process, if it runs in a group.
pub fn env_rank() -> Option<u32> {
    ["MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"]
        .iter()
        .find_map(|k| std::env::var(k).ok())
        .and_then(|v| v.trim().parse().ok())
}

/// Whether this process is a rank of a distributed group (then its model is sharded).
pub fn distributed() -> bool {
    env_rank().is_some()
}

// ---- the group's health -------------------------------------------------

static LOST: OnceLock<String> = OnceLock::new();
static LOST_NOTIFY: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// Marks the group lost (the first reason stays): generations waiting on
/// tokens fail at once with `why`.
pub fn declare_lost(why: &str) {
    if LOST.set(why.to_string()).is_ok() {
        tracing::error!("shard group lost: {why}");
    }
    LOST_NOTIFY.notify_waiters();
}

/// Why the group was lost, once it was.
pub fn lost() -> Option<&'static str> {
    LOST.get().map(|s| s.as_str())
}

/// Resolves when the group is lost (never in an unsharded process).
pub async fn when_lost() -> &'static str {
    loop {
        let notified = LOST_NOTIFY.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if let Some(why) = lost() {
            return why;
        }
        notified.await;
    }
}

/// Milliseconds since `EPOCH` when the running group operation started (0: none).
static BUSY_SINCE: AtomicU64 = AtomicU64::new(0);
static EPOCH: OnceLock<Instant> = OnceLock::new();

fn now_ms() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// Runs `f`, one operation every rank takes part in, under the watchdog.
pub fn operation<T>(f: impl FnOnce() -> T) -> T {
    BUSY_SINCE.store(now_ms(), Ordering::Release);
    let out = f();
    BUSY_SINCE.store(0, Ordering::Release);
    out
}

/// Starts the watchdog (once per process): an operation running longer than
/// `timeout` means a rank stopped answering. The group is then lost: rank 0
/// (`status` given) turns its engine to failed, which fails its running
/// requests with an error event; after a short grace for those events to be
/// written, the process exits non-zero (its engine thread is stuck in a
/// collective that will never complete).
pub fn watch(timeout: Duration, status: Option<Arc<EngineStatus>>) {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(move || {
        let spawned = std::thread::Builder::new().name("pensieve-shard-watch".into()).spawn(move || loop {
            std::thread::sleep(Duration::from_millis(100));
            let since = BUSY_SINCE.load(Ordering::Acquire);
            let stuck = since != 0 && now_ms().saturating_sub(since) > timeout.as_millis() as u64;
            if stuck || lost().is_some() {
                if stuck {
                    declare_lost(&format!(
                        "an operation of the group took over {}s (--shard-timeout): a rank stopped answering",
                        timeout.as_secs_f64()
                    ));
                }
                if let Some(st) = &status {
                    st.set_state(crate::engine::EngineState::Failed);
                }
                // The engine thread may still end on its own (a failed
                // collective raises): then the server drains and exits.
                // Stuck in a collective, it never will.
                std::thread::sleep(Duration::from_secs(3));
                if stuck {
                    tracing::error!("exiting: the group is lost (a supervisor can restart every rank)");
                    kill_children();
                    // SAFETY: _exit ends the process at once; no destructors run
                    // under the engine thread stuck in MLX.
                    unsafe { libc::_exit(EXIT_GROUP_LOST as i32) };
                }
                // Lost by a failed collective: the engine thread ends and the
                // server exits; this thread only stops watching.
                return;
            }
        });
        if let Err(e) = spawned {
            tracing::warn!("could not start the shard watchdog: {e}");
        }
    });
}

// ---- starting the ranks -------------------------------------------------

/// Local ranks this process started (rank, child).
static CHILDREN: Mutex<Vec<(u32, Child)>> = Mutex::new(Vec::new());

/// The process ids of the local ranks this process started.
pub fn child_pids() -> Vec<(u32, u32)> {
    CHILDREN.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(r, c)| (*r, c.id())).collect()
}

/// Stops the local ranks this process started (SIGKILL) and reaps them.
pub fn kill_children() {
    let mut children = CHILDREN.lock().unwrap_or_else(|e| e.into_inner());
    for (_, c) in children.iter_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
    children.clear();
}

/// Waits up to `grace` for the local ranks to exit (rank 0 told them to
/// stop), then kills what is left. Returns whether all exited cleanly.
pub fn reap_children(grace: Duration) -> bool {
    let deadline = Instant::now() + grace;
    let mut clean = true;
    let mut children = CHILDREN.lock().unwrap_or_else(|e| e.into_inner());
    for (rank, c) in children.iter_mut() {
        loop {
            match c.try_wait() {
                Ok(Some(st)) => {
                    if !st.success() {
                        tracing::warn!("rank {rank} exited with {st}");
                        clean = false;
                    }
                    break;
                }
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                _ => {
                    tracing::warn!("rank {rank} did not exit: killing it");
                    let _ = c.kill();
                    let _ = c.wait();
                    clean = false;
                    break;
                }
            }
        }
    }
    children.clear();
    clean
}

/// The ring's endpoints, one per rank: `host:port`, ports counting up from
/// `--shard-port` (each rank listens on its own).
fn ring(config: &Config) -> anyhow::Result<Vec<String>> {
    let hosts: Vec<String> = if config.hosts.is_empty() {
        vec!["127.0.0.1".to_string(); config.ranks.max(1) as usize]
    } else {
        if config.ranks > 1 && config.ranks as usize != config.hosts.len() {
            anyhow::bail!("--ranks {} but --hosts lists {} hosts (one rank per host entry)", config.ranks, config.hosts.len());
        }
        config.hosts.clone()
    };
    for h in &hosts {
        if h.parse::<std::net::IpAddr>().is_err() {
            anyhow::bail!("--hosts: {h:?} is not an IP address (MLX's ring backend connects to addresses)");
        }
    }
    Ok(hosts.iter().enumerate().map(|(i, h)| format!("{h}:{}", config.shard_port as usize + i)).collect())
}

/// MLX's ring host file: a JSON list with one list of endpoints per rank.
fn write_hostfile(dir: &Path, endpoints: &[String]) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("ring-{}.json", std::process::id()));
    let json = serde_json::to_string(&endpoints.iter().map(|e| vec![e.clone()]).collect::<Vec<_>>())?;
    std::fs::write(&path, json)?;
    Ok(path)
}

fn is_local(host: &str) -> bool {
    host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// `--ranks N` / `--hosts`: makes this process rank 0 of a ring group, starts
/// the ranks on this machine as children (`pensieve worker`), and prints the
/// command each remote rank runs. Call before anything starts threads.
pub fn launch(config: &Config) -> anyhow::Result<()> {
    if distributed() || (config.ranks <= 1 && config.hosts.len() <= 1) {
        return Ok(());
    }
    let endpoints = ring(config)?;
    let hostfile = write_hostfile(&config.cache_root().join("shard"), &endpoints)?;
    std::env::set_var("MLX_RANK", "0");
    std::env::set_var("MLX_HOSTFILE", &hostfile);
    // Which ranks run on this machine (a loopback address, or rank 0's).
    let host_of = |ep: &str| ep.rsplit_once(':').map(|(h, _)| h.to_string()).unwrap_or_default();
    let first_host = host_of(&endpoints[0]);
    let here: Vec<bool> = endpoints.iter().map(|ep| is_local(&host_of(ep)) || host_of(ep) == first_host).collect();
    let local = here.iter().filter(|h| **h).count();
    if local > 1 && std::env::var_os("OPENBLAS_NUM_THREADS").is_none() {
        // Ranks sharing this machine share its cores: each gets its part for
        // OpenBLAS's threads (read when it loads), not all of them each.
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        std::env::set_var("OPENBLAS_NUM_THREADS", (cores / local).max(1).to_string());
    }
    let exe = std::env::current_exe()?;
    let ring_arg = endpoints.join(",");
    let mut children = CHILDREN.lock().unwrap_or_else(|e| e.into_inner());
    for (rank, ep) in endpoints.iter().enumerate().skip(1) {
        let mut args: Vec<String> = vec!["worker".into(), "--rank".into(), rank.to_string(), "--ring".into(), ring_arg.clone()];
        args.extend(worker_flags(config));
        if here[rank] {
            let mut cmd = Command::new(&exe);
            cmd.args(&args).stdin(Stdio::null());
            #[cfg(target_os = "linux")]
            {
                use std::os::unix::process::CommandExt;
                // SAFETY: prctl in the child between fork and exec; it only
                // asks the kernel to kill the child when its parent dies.
                unsafe {
                    cmd.pre_exec(|| {
                        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                        // Its own process group: a terminal's Ctrl-C or a
                        // supervisor's group signal reaches rank 0 only, which
                        // drains and then stops the other ranks itself.
                        libc::setpgid(0, 0);
                        Ok(())
                    });
                }
            }
            let child = cmd.spawn().map_err(|e| anyhow::anyhow!("cannot start rank {rank} ({}): {e}", exe.display()))?;
            eprintln!("pensieve: started rank {rank} of {} (pid {}) on {ep}", endpoints.len(), child.id());
            children.push((rank as u32, child));
        } else {
            eprintln!("pensieve: rank {rank} runs on {}; start it there with:\n  pensieve {}", host_of(ep), shell_words(&args));
        }
    }
    Ok(())
}

/// The flags a worker needs of rank 0's (where to find Python, the cache, the watchdog's bound).
fn worker_flags(config: &Config) -> Vec<String> {
    let mut out = vec!["--shard-timeout".to_string(), config.shard_timeout.to_string()];
    if let Some(v) = &config.venv {
        out.extend(["--venv".to_string(), v.to_string_lossy().to_string()]);
    }
    if let Some(c) = &config.cache_dir {
        out.extend(["--cache-dir".to_string(), c.to_string_lossy().to_string()]);
    }
    out
}

fn shell_words(args: &[String]) -> String {
    args.iter()
        .map(|a| {
            if a.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:,=".contains(c)) {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `pensieve worker`: a rank > 0. With `--ring`, writes the ring's host file
/// and sets the rank; under `mlx.launch` both come from the environment.
/// Loads the shard rank 0 names and follows rank 0 until it says stop.
pub fn worker(args: WorkerArgs) -> ExitCode {
    let config = args.config;
    if let Some(endpoints) = &args.ring {
        let endpoints: Vec<String> = endpoints.split(',').map(|s| s.trim().to_string()).collect();
        match write_hostfile(&config.cache_root().join("shard"), &endpoints) {
            Ok(p) => std::env::set_var("MLX_HOSTFILE", p),
            Err(e) => {
                eprintln!("error: cannot write the ring's host file: {e}");
                return ExitCode::from(2);
            }
        }
    }
    if let Some(r) = args.rank {
        std::env::set_var("MLX_RANK", r.to_string());
    }
    match env_rank() {
        Some(r) if r > 0 => {}
        _ => {
            eprintln!("error: `pensieve worker` is a rank above 0: pass --rank (and --ring), or run it under mlx.launch");
            return ExitCode::from(2);
        }
    }
    follow(&config)
}

/// A rank > 0 (also when `mlx.launch` starts the plain command on every rank).
pub fn follow(config: &Config) -> ExitCode {
    let rank = env_rank().unwrap_or(0);
    tracing::info!("rank {rank}: following rank 0 (no HTTP)");
    let timeout = Duration::from_secs_f64(config.shard_timeout);
    match crate::engine::follow(config, timeout) {
        Ok(()) => {
            tracing::info!("rank {rank}: rank 0 stopped the group");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("rank {rank}: {e:#}");
            ExitCode::from(EXIT_GROUP_LOST)
        }
    }
}

/// `pensieve worker`'s flags.
#[derive(clap::Args, Debug)]
pub struct WorkerArgs {
    /// This process's rank (1 and up; rank 0 is the server).
    #[arg(long)]
    pub rank: Option<u32>,
    /// The ring's endpoints, `host:port` per rank in rank order, comma-separated
    /// (what rank 0 prints).
    #[arg(long)]
    pub ring: Option<String>,
    #[command(flatten)]
    pub config: Config,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn config(args: &[&str]) -> Config {
        Config::parse_from(std::iter::once("pensieve").chain(args.iter().copied()))
    }

    #[test]
    fn the_ring_has_one_endpoint_per_rank() {
        assert_eq!(
            ring(&config(&["--ranks", "3", "--shard-port", "4000"])).unwrap(),
            ["127.0.0.1:4000", "127.0.0.1:4001", "127.0.0.1:4002"]
        );
        assert_eq!(ring(&config(&["--hosts", "10.0.0.1,10.0.0.2"])).unwrap(), ["10.0.0.1:32323", "10.0.0.2:32324"]);
        assert_eq!(ring(&config(&["--hosts", "10.0.0.1,10.0.0.2", "--ranks", "2"])).unwrap().len(), 2);
    }

    #[test]
    fn bad_hosts_are_refused_with_the_reason() {
        let e = ring(&config(&["--hosts", "mac-studio.local,10.0.0.2"])).unwrap_err().to_string();
        assert!(e.contains("not an IP address"), "{e}");
        let e = ring(&config(&["--hosts", "10.0.0.1,10.0.0.2", "--ranks", "3"])).unwrap_err().to_string();
        assert!(e.contains("one rank per host"), "{e}");
    }

    #[test]
    fn the_printed_command_survives_a_shell() {
        let args: Vec<String> = ["worker", "--rank", "1", "--ring", "10.0.0.1:1,10.0.0.2:2", "--cache-dir", "/my models/x'y"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let line = shell_words(&args);
        let out = std::process::Command::new("sh").arg("-c").arg(format!("printf '%s\\n' {line}")).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).lines().collect::<Vec<_>>(), args);
    }

    #[test]
    fn a_group_is_lost_once_with_its_first_reason() {
        // The process-wide state: this test binary has no sharded engine.
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let waiter = rt.spawn(when_lost());
        declare_lost("rank 1 is gone");
        declare_lost("a later reason");
        assert_eq!(rt.block_on(waiter).unwrap(), "rank 1 is gone");
        assert_eq!(lost(), Some("rank 1 is gone"));
    }
}
