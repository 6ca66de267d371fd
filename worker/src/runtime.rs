//! What every model-running command shares: the job (communicator, pool, kernels) and loading a model
//! shard for this rank.

use std::path::{Path, PathBuf};

use std::sync::atomic::Ordering;

use anyhow::{Context, Result};
use collective::{Communicator, Pipeline};
use model::arch::{Collective, Shard};
use model::arch::{KvType, Model};
use model::kernels::{KernelChoice, Kernels};
use model::pool::Pool;
use model::weight::Format;

/// Options of every command that runs a model.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// The model: a Yuan 2.0 Hugging Face directory (config.json, safetensors, tokenizer.model), a Llama
    /// GGUF file, or a directory written by `ringlm convert`.
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// How weights are kept in memory: as loaded (f32), or quantized at load time.
    #[arg(long, value_parser = parse_arg::<Format>, default_value = "f32")]
    pub weights: Format,
    /// Format of the lm_head (default: f32 with f32 weights, else bf16).
    #[arg(long, value_parser = parse_arg::<Format>)]
    pub lm_head: Option<Format>,
    /// Key/value cache: f32; f16 at half the memory per position and half the bytes attention reads; or
    /// q8, 8-bit codes with a scale per head row, about half of f16 again, for long contexts (default: f32
    /// when the layers are f32, else f16).
    #[arg(long, value_parser = parse_arg::<KvType>)]
    pub kv_cache: Option<KvType>,
    /// Kernels: reference (scalar, f32), fast, fast-i16 or fast-i8 (decode's NF4 GEMV on 16- or 8-bit
    /// activation codes, and with 8-bit ones prefill's NF4 GEMM too where there is no AMX; fast takes 8-bit ones on Zen 4 and
    /// Intel, 16-bit ones on Zen 5). Also RINGLM_KERNELS.
    #[arg(long, value_parser = parse_arg::<KernelChoice>)]
    pub kernels: Option<KernelChoice>,
    /// Worker threads per rank (default: RINGLM_THREADS from ringrun, else every CPU allowed).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print, per rank, the CPUs its threads run on and the NUMA nodes its weight pages sit on.
    #[arg(long)]
    pub report_placement: bool,
    /// Pipeline stages: consecutive ranges of layers, tensor parallel inside each stage of
    /// np / pp ranks (one stage per server when mpirun starts np / pp ranks per server). Lets a model
    /// larger than one server's memory run; with one sequence it adds one hand-off per stage to every
    /// step and no throughput.
    #[arg(long, default_value_t = 1, value_name = "P")]
    pub pp: usize,
    /// Ranks: starts them through ringrun, which places one per socket (under ringrun, mpirun or srun the
    /// job decides, and a different N is an error).
    #[arg(long, value_name = "N")]
    pub np: Option<usize>,
}

/// What `--model` names, by which the model is loaded.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ModelKind {
    /// A directory written by `ringlm convert` (it has manifest.json).
    Shards,
    /// A GGUF file.
    Gguf,
    /// A Hugging Face checkpoint directory.
    Checkpoint,
}

impl ModelKind {
    fn of(path: &Path) -> ModelKind {
        if path.join("manifest.json").exists() {
            ModelKind::Shards
        } else if path.extension().is_some_and(|e| e == "gguf") {
            ModelKind::Gguf
        } else {
            ModelKind::Checkpoint
        }
    }
}

impl ModelArgs {
    /// [`relaunch_with_np`] for this model, after checking what can be checked before any rank starts:
    /// a converted directory made for another np, or a model that np does not split, fails here with one
    /// line instead of in every rank.
    pub fn relaunch(&self) -> Result<Option<i32>> {
        let Some(np) = self.np else { return Ok(None) };
        if collective::JobEnv::from_env()?.launcher == "none" {
            self.check_np(np)
                .with_context(|| format!("--np {np} for {}", self.model.display()))?;
        }
        relaunch_with_np(Some(np))
    }

    fn check_np(&self, np: usize) -> Result<()> {
        if self.pp == 0 || !np.is_multiple_of(self.pp) {
            anyhow::bail!("--np {np} does not split into --pp {} stages", self.pp);
        }
        let tp = np / self.pp;
        let config = match ModelKind::of(&self.model) {
            ModelKind::Shards => {
                let m = model::shards::Manifest::load(&self.model)?;
                return Ok(m.check_np(tp, self.pp)?);
            }
            ModelKind::Gguf => {
                model::arch::Config::from_gguf(&model::gguf::Gguf::open(&self.model)?)?
            }
            ModelKind::Checkpoint => model::arch::Config::load(&self.model)?,
        };
        config.check_np(tp)?;
        Ok(())
    }
}

/// A command-line value read by the model crate's own parser (weight format, cache type, kernels), its
/// error message as clap prints it.
pub fn parse_arg<T: std::str::FromStr<Err = model::Error>>(
    s: &str,
) -> std::result::Result<T, String> {
    s.parse().map_err(|e: model::Error| e.to_string())
}

/// The collective library as the model's hook: the whole job (`.0`, for the commands' own broadcasts) and,
/// with pipeline stages, this rank's stage (`.1`), whose group carries the tensor-parallel collectives.
pub struct Comm(pub Communicator, pub Option<Pipeline>);

fn model_err(e: collective::Error) -> model::Error {
    model::Error::Format(e.to_string())
}

impl Comm {
    /// The communicator of this rank's tensor-parallel group.
    fn tp(&mut self) -> &mut Communicator {
        match &mut self.1 {
            Some(p) => p.group(),
            None => &mut self.0,
        }
    }

    /// With pipeline stages, the world rank of the last stage's first rank (the stage that has the logits).
    fn logits_root(&self) -> Option<usize> {
        self.1.as_ref().map(|p| p.last_root())
    }

    /// With pipeline stages, replaces `bytes` on every rank by the last stage's first rank's; without,
    /// leaves them as they are.
    pub fn share_from_last(&mut self, bytes: &mut Vec<u8>) -> collective::Result<()> {
        match self.logits_root() {
            Some(root) => self.0.broadcast(root, bytes),
            None => Ok(()),
        }
    }
}

impl Collective for Comm {
    fn allreduce_sum(&mut self, x: &mut [f32]) -> model::Result<()> {
        self.tp().allreduce_sum(x).map_err(model_err)
    }
    fn allgather_f32(&mut self, x: &[f32]) -> model::Result<Vec<f32>> {
        self.tp().allgather_f32(x).map_err(model_err)
    }
    fn recv_prev(&mut self, x: &mut [f32]) -> model::Result<()> {
        match &mut self.1 {
            Some(p) => p.recv_prev(&mut self.0, x).map_err(model_err),
            None => Err(model::Error::Format("no pipeline stages".into())),
        }
    }
    fn send_next(&mut self, x: &[f32]) -> model::Result<()> {
        match &mut self.1 {
            Some(p) => p.send_next(&mut self.0, x).map_err(model_err),
            None => Err(model::Error::Format("no pipeline stages".into())),
        }
    }
    fn broadcast_from_last(&mut self, x: &mut Vec<f32>) -> model::Result<()> {
        match self.logits_root() {
            Some(root) => self.0.broadcast_f32(root, x).map_err(model_err),
            None => Ok(()),
        }
    }
}

/// A rank ready to run a model.
pub struct Job {
    /// Communicator (a job of one without a launcher).
    pub comm: Comm,
    /// Thread pool pinned to this rank's cores.
    pub pool: Pool,
    /// The model slice.
    pub model: Model,
}

impl Job {
    /// Joins the job and loads this rank's shard.
    pub fn start(a: &ModelArgs) -> Result<Job> {
        // Before any thread or weight exists, so that both follow the binding.
        let env = collective::JobEnv::from_env()?;
        if let Some(b) = crate::selfbind::apply(&env)? {
            if a.report_placement {
                rank_line(&format!(
                    "[rank {}] {} left it unbound: bound to CPUs {:?}, memory to NUMA nodes {:?} (RINGLM_SELF_BIND=0 to skip)",
                    env.rank, env.launcher, b.cpus, b.nodes
                ));
            }
        }
        let (comm, shard) = join(env, a.pp)?;
        let pool = match a.threads {
            Some(t) => Pool::new(t, comm.0.env().cpuset.as_deref()),
            None => Pool::from_env(),
        };
        let kernels = Kernels::from_choice_or_env(a.kernels)?;
        let start = std::time::Instant::now();
        let kind = ModelKind::of(&a.model);
        let model = load_model(a, &a.model, shard, kernels)?;
        let secs = start.elapsed().as_secs_f64();
        let mut job = Job { comm, pool, model };
        if kind == ModelKind::Shards || a.report_placement {
            let bytes = job.model.weight_bytes() as f64;
            rank_line(&format!(
                "[rank {}] loaded {:.2} GB of weights in {:.2} s ({:.2} GB/s); resident {:.2} GB",
                shard.rank,
                bytes / 1e9,
                secs,
                bytes / 1e9 / secs.max(1e-9),
                crate::placement::resident_bytes() as f64 / 1e9
            ));
        }
        if a.report_placement {
            crate::placement::report(&mut job);
        }
        Ok(job)
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.comm.0.rank()
    }
}

/// This rank's slice of the model at `path` (the target or a draft model), kept as `a` says: weight and
/// lm_head formats, cache type.
pub fn load_model(a: &ModelArgs, path: &Path, shard: Shard, kernels: Kernels) -> Result<Model> {
    let head = a.lm_head.unwrap_or(if a.weights == Format::F32 {
        Format::F32
    } else {
        Format::Bf16
    });
    let mut model = match ModelKind::of(path) {
        ModelKind::Shards => Model::load_shards(path, shard, kernels),
        ModelKind::Gguf => Model::load_gguf(path, shard, a.weights, head, kernels),
        ModelKind::Checkpoint => Model::load(path, shard, a.weights, head, kernels),
    }
    .with_context(|| format!("rank {}: loading {}", shard.rank, path.display()))?;
    // The loaded layers decide, so that converted NF4 shards (no --weights) get the fast cache too.
    model.kv_cache = a.kv_cache.unwrap_or(match model.layer_format() {
        Some(Format::F32) => KvType::F32,
        _ => KvType::F16,
    });
    Ok(model)
}

/// Prints one line of a rank's report to stderr in a single write: launchers forward every rank's stderr
/// into one stream, where a line written in pieces (as `eprintln!` may) interleaves with other ranks'.
pub fn rank_line(line: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
}

/// Joins the job of `env` and, with `pp` stages, the pipeline; returns the communicators and which slice of
/// the model this rank holds.
pub fn join(env: collective::JobEnv, pp: usize) -> Result<(Comm, Shard)> {
    let mut comm = Communicator::new(env).context("joining the job")?;
    let pipe = if pp != 1 {
        Some(Pipeline::new(&mut comm, pp).context("setting up the pipeline stages")?)
    } else {
        None
    };
    let shard = match &pipe {
        Some(p) => Shard {
            rank: comm.rank() % p.tp(),
            size: p.tp(),
            stage: p.stage(),
            stages: p.stages(),
        },
        None => Shard::tensor(comm.rank(), comm.size()),
    };
    Ok((Comm(comm, pipe), shard))
}

/// The launcher started for `--np`, for [`forward_term`].
static JOB_PID: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn forward_term(_: libc::c_int) {
    let pid = JOB_PID.load(Ordering::SeqCst);
    if pid > 0 {
        // kill(2) is async-signal-safe.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
}

/// `--np N` outside a launcher: starts N ranks of this same command under ringrun (found next to this
/// binary, else on PATH) and returns its exit code. Under a launcher, checks that N matches the job.
pub fn relaunch_with_np(np: Option<usize>) -> Result<Option<i32>> {
    let Some(np) = np else { return Ok(None) };
    let env = collective::JobEnv::from_env()?;
    if env.launcher != "none" {
        if env.size != np {
            anyhow::bail!(
                "--np {np} but the launcher started {} ranks: drop --np or make them agree",
                env.size
            );
        }
        return Ok(None);
    }
    let exe = std::env::current_exe().context("locating the ringlm binary")?;
    let ringrun = exe
        .parent()
        .map(|d| d.join("ringrun"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("ringrun"));
    // Arguments pass through as bytes: a path need not be UTF-8.
    let mut args: Vec<std::ffi::OsString> = Vec::new();
    let mut skip = false;
    for a in std::env::args_os().skip(1) {
        if skip {
            skip = false;
            continue;
        }
        if a == "--np" {
            skip = true;
            continue;
        }
        if a.as_encoded_bytes().starts_with(b"--np=") {
            continue;
        }
        args.push(a);
    }
    let mut cmd = std::process::Command::new(&ringrun);
    cmd.arg("-np")
        .arg(np.to_string())
        .arg("--")
        .arg(&exe)
        .args(&args);
    let parent = std::process::id() as libc::pid_t;
    // The job belongs to this process: when it dies, by a service manager's SIGTERM or by SIGKILL, the
    // kernel sends ringrun SIGTERM and ringrun ends the ranks. (PR_SET_PDEATHSIG fires on the death of the
    // thread that forked, here the main thread, which waits for the job.)
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            if libc::getppid() != parent {
                libc::raise(libc::SIGTERM);
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {} (needed for --np)", ringrun.display()))?;
    // Ctrl-C reaches ringrun from the terminal as it reaches this process; ringrun passes it on to the ranks
    // (chat stops its answer, serve stops) and decides when the job ends. Dying of it here would end the
    // job at once through the death signal above.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
    // A service manager's SIGTERM goes to this process alone: pass it on and wait for the job, so that when
    // this process is gone the ranks are too (a stop that returned first would let a new server meet the
    // old one still on its port).
    JOB_PID.store(child.id() as i32, Ordering::SeqCst);
    unsafe {
        libc::signal(
            libc::SIGTERM,
            forward_term as *const () as libc::sighandler_t,
        )
    };
    let status = child
        .wait()
        .with_context(|| format!("waiting for {}", ringrun.display()))?;
    let signal = std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0);
    Ok(Some(status.code().unwrap_or(128 + signal)))
}
