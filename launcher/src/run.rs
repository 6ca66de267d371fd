//! Starting the ranks and supervising them until the job ends.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use collective::{format_list, segments};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::plan::{plan, Plan};
use crate::topo::{self, Machine, Source};
use crate::{bind, Args};

/// How long the other ranks get to end by themselves after one fails, before SIGTERM.
const SETTLE: Duration = Duration::from_millis(300);
/// Ranks per CPU past which ringrun refuses to start a job without --oversubscribe.
const MAX_RANKS_PER_CPU: usize = 8;

/// How long ranks get between SIGTERM and SIGKILL.
const GRACE: Duration = Duration::from_secs(3);

fn warn(msg: &str) {
    eprintln!("ringrun: warning: {msg}");
}

pub fn main(args: Args) -> Result<u8, String> {
    let removed = segments::remove_stale();
    if !removed.is_empty() {
        eprintln!(
            "ringrun: removed {} segment(s) of dead jobs: {}",
            removed.len(),
            removed.join(", ")
        );
    } else if args.cleanup {
        eprintln!("ringrun: no stale segments");
    }
    if args.cleanup && args.program.is_empty() && !args.dry_run {
        return Ok(0);
    }
    let source = args
        .topology
        .as_deref()
        .map(Source::parse)
        .unwrap_or(Source::ThisSystem);
    let machine = topo::load(&source).map_err(|e| e.to_string())?;
    let plan = plan(&machine, args.np, args.map_by, args.bind_to)?;
    // Far more ranks than CPUs is a typo or a script's runaway value, not a job: starting them all would
    // take minutes before the first of them fails. A few per CPU stays allowed (tests, small machines).
    let pus: usize = machine.cores().map(|(_, c)| c.pus.len()).sum();
    if plan.ranks.len() > MAX_RANKS_PER_CPU * pus.max(1) && !args.oversubscribe && !args.dry_run {
        return Err(format!(
            "{} ranks on {pus} CPUs is more than {MAX_RANKS_PER_CPU} per CPU; pass --oversubscribe to start them anyway",
            plan.ranks.len()
        ));
    }
    if plan.oversubscribed {
        warn(&format!(
            "{} ranks on {} cores: ranks share cores and will slow each other down",
            plan.ranks.len(),
            machine.core_count()
        ));
    }
    if args.report_bindings || args.dry_run {
        report(&machine, &plan);
    }
    if args.dry_run {
        return Ok(0);
    }
    if args.program.is_empty() {
        return Err(
            "no program given: ringrun [OPTIONS] -- PROGRAM [ARGS...] (see ringrun --help)".into(),
        );
    }

    for x in &args.export {
        let name = x.split('=').next().unwrap_or("");
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err(format!("-x {x:?}: expected VAR or VAR=VALUE"));
        }
    }
    launch(&args, &machine, &plan)
}

fn report(machine: &Machine, plan: &Plan) {
    let pus: usize = machine.cores().map(|(_, c)| c.pus.len()).sum();
    eprintln!(
        "[ringrun] topology ({}): {} package(s), {} NUMA node(s), {} cores, {} PUs",
        machine.source,
        machine.packages.len(),
        machine.numa_nodes().len().max(1),
        machine.core_count(),
        pus
    );
    for r in &plan.ranks {
        let cpu = r
            .cpu_bind
            .as_ref()
            .map(|c| format!("PUs {}", format_list(c)))
            .unwrap_or_else(|| "none".into());
        let mem = r
            .mem_bind
            .as_ref()
            .map(|m| format!("bind NUMA {} (MPOL_BIND)", format_list(m)))
            .unwrap_or_else(|| "default (first touch)".into());
        eprintln!(
            "[ringrun] rank {}: package {} | NUMA {} | cores {} | PUs {} | cpu binding: {} | memory: {}",
            r.rank,
            format_list(&r.packages),
            format_list(&r.numa),
            format_list(&r.cores),
            format_list(&r.pus),
            cpu,
            mem
        );
    }
}

fn job_id() -> String {
    let mut rnd = [0u8; 4];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut rnd))
        .is_err()
    {
        rnd = (Instant::now().elapsed().subsec_nanos() ^ std::process::id()).to_le_bytes();
    }
    format!("{}.{:08x}", std::process::id(), u32::from_le_bytes(rnd))
}

fn signal_name(sig: i32) -> String {
    Signal::try_from(sig)
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|_| format!("signal {sig}"))
}

/// Copies a rank's output to ours, each line prefixed with its rank.
fn tag_stream(
    rank: usize,
    stream: impl Read + Send + 'static,
    to_stderr: bool,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut r = BufReader::new(stream);
        let mut line = Vec::new();
        loop {
            line.clear();
            match r.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let mut buf = format!("[rank {rank}] ").into_bytes();
                    buf.extend_from_slice(&line);
                    if !buf.ends_with(b"\n") {
                        buf.push(b'\n');
                    }
                    let _ = if to_stderr {
                        std::io::stderr().lock().write_all(&buf)
                    } else {
                        std::io::stdout().lock().write_all(&buf)
                    };
                }
            }
        }
    })
}

struct Failure {
    message: String,
    code: u8,
}

fn launch(args: &Args, machine: &Machine, plan: &Plan) -> Result<u8, String> {
    let job = job_id();
    let np = plan.ranks.len();
    let allowed = collective::allowed_cpus();
    let mut bindings = Vec::with_capacity(np);
    let mut warned = false;
    for r in &plan.ranks {
        let (b, why) = bind::feasible(r.cpu_bind.as_deref(), r.mem_bind.as_deref(), &allowed);
        if !why.is_empty() && !warned {
            let hint = if machine.is_this_system {
                ""
            } else {
                " (the topology is not this machine's)"
            };
            warn(&format!(
                "cannot bind rank {} as planned: {}{hint}; such ranks run unbound",
                r.rank,
                why.join("; ")
            ));
            warned = true;
        }
        bindings.push(b);
    }

    // Signals are taken synchronously with sigtimedwait; ranks get a clean mask back before exec.
    let mut handled = SigSet::empty();
    for s in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGCHLD,
    ] {
        handled.add(s);
    }
    handled
        .thread_block()
        .map_err(|e| format!("cannot block signals: {e}"))?;

    let launcher_pid = std::process::id() as i32;
    let mut pids: HashMap<i32, usize> = HashMap::new();
    let mut tags = Vec::new();
    let mut failure: Option<Failure> = None;
    for (r, b) in plan.ranks.iter().zip(&bindings) {
        let mut cmd = Command::new(&args.program[0]);
        cmd.args(&args.program[1..])
            .env("RINGLM_RANK", r.rank.to_string())
            .env("RINGLM_WORLD_SIZE", np.to_string())
            .env("RINGLM_LOCAL_RANK", r.rank.to_string())
            .env("RINGLM_JOB", &job)
            .env(
                "RINGLM_CPUSET",
                format_list(b.cpus.as_deref().unwrap_or(&r.pus)),
            )
            .env("RINGLM_NUMA", format_list(&r.numa))
            .env("RINGLM_THREADS", r.cores.len().max(1).to_string());
        for x in &args.export {
            match x.split_once('=') {
                Some((k, v)) => cmd.env(k, v),
                None => match std::env::var_os(x) {
                    Some(v) => cmd.env(x, v),
                    None => &mut cmd,
                },
            };
        }
        if args.tag_output {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        let (cpus, nodes) = bind::raw(b);
        unsafe {
            cmd.pre_exec(move || {
                // Die with the launcher, even if it is SIGKILLed; and catch a launcher that died before this line.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if libc::getppid() != launcher_pid {
                    libc::_exit(1);
                }
                let empty: libc::sigset_t = std::mem::zeroed();
                libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
                // A refused binding was already reported by the launcher; the rank still runs.
                let _ = bind::apply(&cpus, &nodes);
                Ok(())
            });
        }
        match cmd.spawn() {
            Ok(mut child) => {
                if args.tag_output {
                    tags.push(tag_stream(r.rank, child.stdout.take().unwrap(), false));
                    tags.push(tag_stream(r.rank, child.stderr.take().unwrap(), true));
                }
                pids.insert(child.id() as i32, r.rank);
            }
            Err(e) => {
                let code = if e.kind() == std::io::ErrorKind::NotFound {
                    127
                } else {
                    126
                };
                failure = Some(Failure {
                    message: format!(
                        "cannot start rank {} ({}): {e}",
                        r.rank,
                        args.program[0].to_string_lossy()
                    ),
                    code,
                });
                break;
            }
        }
    }

    let start = Instant::now();
    let timeout = args.timeout.map(Duration::from_secs_f64);
    let mut kill_at: Option<Instant> = None;
    let mut term_at: Option<Instant> = None;
    let mut last_sigint: Option<Instant> = None;
    if failure.is_some() {
        terminate(&pids, Signal::SIGTERM);
        kill_at = Some(Instant::now() + GRACE);
    }
    while !pids.is_empty() {
        // Reap everything that has exited.
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => {
                    if let Some(rank) = pids.remove(&pid.as_raw()) {
                        if code != 0 && failure.is_none() {
                            failure = Some(Failure {
                                message: format!("rank {rank} (pid {pid}) exited with code {code}; ending the job"),
                                code: code as u8,
                            });
                        }
                    }
                }
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    if let Some(rank) = pids.remove(&pid.as_raw()) {
                        if failure.is_none() {
                            failure = Some(Failure {
                                message: format!(
                                    "rank {rank} (pid {pid}) was killed by {}; ending the job",
                                    sig.as_str()
                                ),
                                code: 128 + sig as i32 as u8,
                            });
                        }
                    }
                }
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => {}
            }
        }
        if pids.is_empty() {
            break;
        }
        if failure.is_some() && kill_at.is_none() {
            // A rank's failure usually makes its peers fail too, each printing why; give them a moment to
            // finish that on their own before SIGTERM cuts a message (the cause) short.
            let at = *term_at.get_or_insert_with(|| Instant::now() + SETTLE);
            if Instant::now() >= at {
                terminate(&pids, Signal::SIGTERM);
                kill_at = Some(Instant::now() + GRACE);
            }
        }
        if let (Some(limit), None) = (timeout, &failure) {
            if start.elapsed() > limit {
                failure = Some(Failure {
                    message: format!(
                        "the job ran longer than --timeout {} s; ending it",
                        limit.as_secs_f64()
                    ),
                    code: 124,
                });
                terminate(&pids, Signal::SIGTERM);
                kill_at = Some(Instant::now() + GRACE);
            }
        }
        if let Some(at) = kill_at {
            if Instant::now() >= at {
                terminate(&pids, Signal::SIGKILL);
                kill_at = Some(Instant::now() + Duration::from_secs(3600));
            }
        }
        // Sleep until a signal arrives (SIGCHLD included) or 50 ms pass, whichever is first.
        let ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 50_000_000,
        };
        let sig = unsafe { libc::sigtimedwait(handled.as_ref(), std::ptr::null_mut(), &ts) };
        if sig == libc::SIGINT
            && failure.is_none()
            && last_sigint.is_none_or(|t| t.elapsed() > Duration::from_secs(2))
        {
            // Ctrl-C is passed on, not acted on: a program that handles it (ringlm chat stops the current
            // answer) keeps running, one that does not dies of it and ends the job the usual way. A second
            // Ctrl-C within 2 s ends the job.
            last_sigint = Some(Instant::now());
            terminate(&pids, Signal::SIGINT);
        } else if sig == libc::SIGINT || sig == libc::SIGTERM || sig == libc::SIGHUP {
            let s = Signal::try_from(sig).unwrap();
            if failure.is_none() {
                failure = Some(Failure {
                    message: format!("received {}; ending the job", signal_name(sig)),
                    code: 128 + sig as u8,
                });
                terminate(&pids, s);
                kill_at = Some(Instant::now() + GRACE);
            } else {
                // A second request: no more grace.
                terminate(&pids, Signal::SIGKILL);
            }
        }
    }
    for t in tags {
        let _ = t.join();
    }
    // Ranks unlink their segment once attached; this covers a job that died before or during attaching.
    for name in segments::job_segments(&job) {
        let _ = segments::remove(&name);
    }
    match failure {
        Some(f) => {
            eprintln!("ringrun: {}", f.message);
            Ok(f.code.max(1))
        }
        None => Ok(0),
    }
}

/// Sends `sig` to every live rank and to everything the ranks started (a shell's children would otherwise
/// outlive the job and keep its output pipes open).
fn terminate(pids: &HashMap<i32, usize>, sig: Signal) {
    let mut targets: Vec<i32> = pids.keys().copied().collect();
    targets.extend(descendants(&targets));
    for pid in targets {
        let _ = kill(Pid::from_raw(pid), sig);
    }
}

/// All processes below `roots` in the process tree, read from /proc.
fn descendants(roots: &[i32]) -> Vec<i32> {
    let mut parent_of: Vec<(i32, i32)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // Fields after the parenthesised command name: state, ppid, ...
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().nth(1)?.parse().ok());
            if let Some(ppid) = ppid {
                parent_of.push((pid, ppid));
            }
        }
    }
    let mut found: Vec<i32> = Vec::new();
    let mut frontier: Vec<i32> = roots.to_vec();
    while let Some(p) = frontier.pop() {
        for &(child, parent) in &parent_of {
            if parent == p && !found.contains(&child) {
                found.push(child);
                frontier.push(child);
            }
        }
    }
    found
}
