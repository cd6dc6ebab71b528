//! Command-line handlers on the embedded default: a local state dir and file locks.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use crate::lock::FileLock;
use crate::mount::{probe, SysMounter};
use crate::ops::{Engine, Released, Restored};
use crate::store::commit::NotPublished;
use crate::store::squash::{SquashMode, DEFAULT_MAX_DEPTH};
use crate::store::{atomic, CacheKey, LayerId, Layout, NewVolume, OnStale, Owner, Policy, RootSpec, Store, VolumeId};

/// A persistent, copy-on-write build cache mounted with overlayfs.
#[derive(Debug, Parser)]
#[command(name = "jobcachefs", version, about)]
pub struct Cli {
    /// Where caches, layers and volumes live (one filesystem that can hold overlay uppers).
    #[arg(long, global = true, env = "JOBCACHEFS_STATE_DIR", default_value = "/var/lib/jobcachefs")]
    pub state_dir: PathBuf,
    /// Log filter (RUST_LOG syntax; default info for serve, warn otherwise); RUST_LOG wins when set.
    #[arg(long, global = true)]
    pub log_level: Option<String>,
    /// A filesystem every node mounts (NFS, CephFS, EFS) for caches/ and layers/; volumes stay local.
    #[arg(long, global = true, env = "JOBCACHEFS_SHARED_DIR")]
    pub shared_dir: Option<PathBuf>,
    /// How long a publish waits for the cache's lock.
    #[arg(long, global = true, default_value = "30s", value_parser = humantime::parse_duration)]
    pub lock_timeout: Duration,
    /// Versions every cache keeps (HEAD included) for `cache show` and `cache rollback`.
    #[arg(long, global = true, default_value_t = crate::store::history::DEFAULT_KEEP_VERSIONS, value_parser = parse_keep)]
    pub keep_versions: usize,
    #[command(flatten)]
    pub registry: RegistryArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Sharing caches between nodes through an OCI registry.
#[derive(Debug, Clone, Args)]
pub struct RegistryArgs {
    /// The registry and repository prefix caches are shared through (REGISTRY/PREFIX, e.g.
    /// registry.example:5000/ci-caches); cache NS/NAME lives in PREFIX/NS/NAME.
    #[arg(long, global = true, env = "JOBCACHEFS_REGISTRY")]
    pub registry: Option<String>,
    /// Credentials: a Docker config file (the format of a kubernetes.io/dockerconfigjson Secret).
    #[arg(long, global = true, env = "JOBCACHEFS_REGISTRY_AUTH")]
    pub registry_auth: Option<PathBuf>,
    /// A PEM bundle of CAs to trust for the registry, besides the system's.
    #[arg(long, global = true)]
    pub registry_ca: Option<PathBuf>,
    /// Speak plain HTTP to the registry.
    #[arg(long, global = true)]
    pub registry_insecure: bool,
    /// Versions that keep their `v<N>` tag in the registry (older ones lose it).
    #[arg(long, global = true, default_value_t = 5, value_parser = parse_keep)]
    pub registry_keep: usize,
    /// How long a restore waits to learn the registry's newest version before it restores
    /// this node's own.
    #[arg(long, global = true, default_value = "3s", value_parser = humantime::parse_duration)]
    pub registry_timeout: Duration,
}

impl RegistryArgs {
    /// The registry configuration, `None` without `--registry`.
    pub fn config(&self, prefetch: Option<Duration>) -> Result<Option<crate::ops::remote::RemoteConfig>, CliError> {
        let Some(spec) = &self.registry else { return Ok(None) };
        let bad = |e: crate::registry::client::ClientError| CliError::Usage(format!("--registry {spec:?}: {e}"));
        let mut config = crate::registry::RegistryConfig::parse(spec).map_err(bad)?;
        config.auth_file = self.registry_auth.clone();
        config.ca_file = self.registry_ca.clone();
        config.insecure = self.registry_insecure;
        config.timeout = self.registry_timeout.max(Duration::from_secs(10));
        let registry = crate::registry::Registry::new(config).map_err(bad)?;
        Ok(Some(crate::ops::remote::RemoteConfig {
            registry,
            restore_timeout: self.registry_timeout,
            keep: self.registry_keep,
            limits: crate::registry::archive::Limits::default(),
            prefetch,
        }))
    }
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Mount a cache, run a command in it, publish what it changed.
    Run(RunArgs),
    /// Mount a cache on PATH (first half of `run`, for CI runners).
    Mount(MountArgs),
    /// Unmount the cache at PATH and publish what changed (second half of `run`).
    Release(ReleaseArgs),
    /// Inspect and maintain caches.
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Serve the CSI driver (Identity, Controller, Node) on a unix socket.
    Serve(ServeArgs),
    /// A small CSI client: walk a volume through its life by hand.
    Csi(crate::csi::client::CsiArgs),
}

/// `jobcachefs serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Where to listen: unix:///absolute/path/csi.sock.
    #[arg(long)]
    pub endpoint: String,
    /// This node's name (the topology value of the volumes it holds).
    #[arg(long, env = "NODE_NAME")]
    pub node_id: String,
    /// Namespaces whose inline ephemeral volumes may publish (repeat or comma-separate); default none.
    #[arg(long = "allow-inline-publish", value_delimiter = ',')]
    pub allow_inline_publish: Vec<String>,
    /// After this long without the publish lock, a release drops its change and succeeds.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub publish_deadline: Duration,
    /// The driver config file (JSON, from a ConfigMap): {"inlinePublishNamespaces": [...]}.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The publish lock: a file lock (one node) or a Kubernetes Lease (a shared store).
    #[arg(long, value_enum, default_value = "file")]
    pub lock: LockBackend,
    /// Kubelet's directory: every staging and target path must lie inside it ("" allows any path).
    #[arg(long, default_value = "/var/lib/kubelet")]
    pub kubelet_dir: PathBuf,
    /// Squash a cache in the background once a commit makes it deeper than this.
    #[arg(long, default_value_t = DEFAULT_MAX_DEPTH)]
    pub max_depth: usize,
    /// How often to collect garbage and evict (also once at start-up).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub gc_interval: Duration,
    /// Evict caches unused for longer than this (e.g. 14d).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub max_idle: Option<Duration>,
    /// Evict least recently used caches until the rest fit in this many bytes (e.g. 200GiB).
    #[arg(long, value_parser = parse_size)]
    pub budget: Option<u64>,
    /// How long a Lease stays valid without renewal (a dead holder blocks others this long).
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,
    /// Serve Prometheus metrics (OpenMetrics text) at http://ADDRESS/metrics; off when not given.
    #[arg(long)]
    pub metrics_address: Option<std::net::SocketAddr>,
    /// Label cache-level series with the cache's name too, not only its namespace (one
    /// series per cache: mind the cardinality).
    #[arg(long)]
    pub metrics_cache_label: bool,
    /// Free bytes of the state filesystem GetCapacity keeps back (e.g. 1GiB), so the
    /// scheduler stops sending volumes before the node is full.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    pub capacity_reserve: u64,
    /// Give every cache used without a `cacheSize` an image file of this size (e.g. 20Gi), so
    /// no job can fill the node's disk. Off by default: such caches live on the state dir.
    #[arg(long, value_parser = parse_cache_size)]
    pub default_cache_size: Option<u64>,
    /// With --registry: poll the registry for new versions of the caches this node holds and
    /// pull their layers in the background, so the next restore is a mount.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub prefetch: bool,
    /// How often prefetch polls (each poll jittered by up to a fifth).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub prefetch_interval: Duration,
}

/// The publish-lock backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LockBackend {
    /// flock(2) on a file in the state dir.
    File,
    /// A coordination.k8s.io/v1 Lease in the cache's namespace.
    Lease,
}

/// Which cache and how it may publish.
#[derive(Debug, Clone, Args)]
pub struct VolumeArgs {
    /// The cache's name.
    #[arg(long = "cache")]
    pub cache: String,
    /// The cache's namespace.
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// Start from an empty cache; a publish replaces its content.
    #[arg(long)]
    pub fresh: bool,
    /// Never publish this volume's changes.
    #[arg(long)]
    pub no_publish: bool,
    /// Caches to restore from while this one has no version (NAME or NAMESPACE/NAME; repeat or comma-separate).
    #[arg(long = "fallback", value_delimiter = ',')]
    pub fallbacks: Vec<String>,
    /// When the cache moved on meanwhile: skip the publish, or stack the change on top.
    #[arg(long, default_value = "skip", value_parser = parse_on_stale)]
    pub on_stale: OnStale,
    /// Do not publish a change bigger than this (e.g. 500MiB).
    #[arg(long, value_parser = parse_size)]
    pub max_bytes: Option<u64>,
    /// Keep the cache's layers and this job's changes in an image file of this size (e.g. 20Gi):
    /// a job that writes past it gets ENOSPC and the node's disk is untouched. Only grows.
    #[arg(long, value_parser = parse_cache_size)]
    pub cache_size: Option<u64>,
    /// Give the cache's root directory to this user and group (UID:GID) before the job sees it.
    #[arg(long, value_parser = parse_ids)]
    pub owner: Option<(u32, u32)>,
    /// Permission bits of the cache's root directory, in octal (e.g. 0775).
    #[arg(long, value_parser = parse_mode)]
    pub mode: Option<u32>,
}

impl VolumeArgs {
    /// The root's owner and mode; `user` (run --user) owns it unless --owner says otherwise.
    fn root(&self, user: Option<(u32, u32)>) -> RootSpec {
        let owner = self.owner.or(user);
        RootSpec { uid: owner.map(|o| o.0), gid: owner.map(|o| o.1), mode: self.mode }
    }
}

/// `jobcachefs run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub volume: VolumeArgs,
    /// Publish even when the command fails.
    #[arg(long)]
    pub publish_on_failure: bool,
    /// Do not start a background squash when the cache gets deep.
    #[arg(long)]
    pub no_maintenance: bool,
    /// Run the command as this user and group (UID:GID), with no supplementary groups; the
    /// cache's root is theirs too unless --owner says otherwise.
    #[arg(long, value_parser = parse_ids)]
    pub user: Option<(u32, u32)>,
    /// The command and its arguments; it finds the cache in $JOBCACHE_DIR.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// `jobcachefs mount`.
#[derive(Debug, Args)]
pub struct MountArgs {
    #[command(flatten)]
    pub volume: VolumeArgs,
    /// Where to mount (created if missing).
    pub path: PathBuf,
}

/// `jobcachefs release`.
#[derive(Debug, Args)]
pub struct ReleaseArgs {
    /// A path given to `jobcachefs mount`.
    pub path: PathBuf,
    /// Unmount and drop the changes instead of publishing them.
    #[arg(long)]
    pub no_publish: bool,
}

/// `jobcachefs cache ...`.
#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// List caches: version, depth, size, last use.
    Ls(JsonArg),
    /// Show one cache and its layers.
    Show(CacheArg),
    /// Evict idle or over-budget caches and delete what nothing uses.
    Gc(GcArgs),
    /// Flatten a deep cache into one layer.
    Squash(SquashArgs),
    /// Remove a cache (its layers go once no volume uses them).
    Rm(CacheArg),
    /// Make a kept version's content the cache's next version (undo a poisoned publish).
    Rollback(RollbackArgs),
    /// Pull the registry's newest version of a cache onto this node (needs --registry).
    Pull(CacheArg),
    /// Push this node's current version of a cache to the registry (needs --registry).
    Push(CacheArg),
}

/// `jobcachefs cache rollback`.
#[derive(Debug, Args)]
pub struct RollbackArgs {
    #[command(flatten)]
    pub cache: CacheArg,
    /// The version whose content comes back (see `cache show` for the kept ones).
    #[arg(long)]
    pub to: u64,
}

/// `--json`.
#[derive(Debug, Args)]
pub struct JsonArg {
    /// Print JSON for scripts.
    #[arg(long)]
    pub json: bool,
}

/// A cache named on the command line.
#[derive(Debug, Args)]
pub struct CacheArg {
    /// The cache's name.
    pub name: String,
    /// The cache's namespace.
    #[arg(long, default_value = "default")]
    pub namespace: String,
    #[command(flatten)]
    pub json: JsonArg,
}

/// `jobcachefs cache gc`.
#[derive(Debug, Args)]
pub struct GcArgs {
    /// Evict caches unused for longer than this (e.g. 7d).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub max_idle: Option<Duration>,
    /// Evict least recently used caches until the rest fit in this many bytes (e.g. 50GiB).
    #[arg(long, value_parser = parse_size)]
    pub budget: Option<u64>,
    #[command(flatten)]
    pub json: JsonArg,
}

/// `jobcachefs cache squash`.
#[derive(Debug, Args)]
pub struct SquashArgs {
    #[command(flatten)]
    pub cache: CacheArg,
    /// Squash only when deeper than this many layers.
    #[arg(long, default_value_t = DEFAULT_MAX_DEPTH)]
    pub max_depth: usize,
    /// Flatten the whole stack into one layer (gives back at once the bytes later layers hide)
    /// instead of merging only the layers above the deepest big one.
    #[arg(long)]
    pub flatten: bool,
}

/// `UID:GID`, both decimal; `4294967295` is chown's "no change", never an id.
fn parse_ids(s: &str) -> Result<(u32, u32), String> {
    let rule = || format!("{s:?} must be UID:GID, two decimal ids from 0 to 4294967294 (e.g. 1000:1000)");
    let (uid, gid) = s.split_once(':').ok_or_else(rule)?;
    let id = |v: &str| match v.parse::<u32>() {
        Ok(n) if n != u32::MAX && !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => Ok(n),
        _ => Err(rule()),
    };
    Ok((id(uid)?, id(gid)?))
}

/// A number of versions to keep: 1 to 1000.
fn parse_keep(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(k @ 1..=1000) => Ok(k),
        _ => Err(format!("{s:?} must be a number of versions from 1 to 1000")),
    }
}

/// Octal permission bits, at most 07777.
fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o7777 && !digits.is_empty() && digits.len() <= 5 => Ok(m),
        _ => Err(format!("{s:?} must be octal permission bits such as 0775 (at most 07777)")),
    }
}

fn parse_on_stale(s: &str) -> Result<OnStale, String> {
    match s {
        "skip" => Ok(OnStale::Skip),
        "stack" => Ok(OnStale::Stack),
        _ => Err("must be skip or stack".into()),
    }
}

/// A cache size: a Kubernetes quantity (20Gi) or a size like 500MiB, at least 16Mi.
fn parse_cache_size(s: &str) -> Result<u64, String> {
    let bytes = crate::store::image::parse_size(s).map_or_else(|| parse_size(s), Ok)?;
    if bytes < crate::store::image::MIN_CACHE_SIZE {
        return Err("must be at least 16Mi (an ext4 image with a journal)".into());
    }
    Ok(bytes)
}

fn parse_size(s: &str) -> Result<u64, String> {
    s.parse::<bytesize::ByteSize>().map(|b| b.as_u64()).map_err(|e| format!("not a size like 500MiB: {e}"))
}

/// A command's failure, printed once as `jobcachefs: <message>`.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// From the engine.
    #[error(transparent)]
    Ops(#[from] crate::ops::OpsError),
    /// From the store.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The state dir's filesystem cannot hold overlay uppers.
    #[error(transparent)]
    Probe(#[from] probe::ProbeError),
    /// Bad input or state the user can fix.
    #[error("{0}")]
    Usage(String),
    /// A file operation of the command line itself.
    #[error("{op} {path}: {source}")]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
}

/// Runs the parsed command line and returns the process's exit code.
pub fn run(cli: Cli) -> ExitCode {
    let default_level = if matches!(cli.command, Command::Serve(_)) { "info" } else { "warn" };
    let level = cli.log_level.clone().unwrap_or_else(|| default_level.to_string());
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        // File work runs on blocking threads; a bounded pool keeps a burst of calls from
        // spawning hundreds of threads (and their malloc arenas) on a 2-core node.
        .max_blocking_threads(32)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("jobcachefs: start async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("jobcachefs: {e}");
            ExitCode::from(1)
        }
    }
}

async fn dispatch(cli: Cli) -> Result<ExitCode, CliError> {
    let mut layout = Layout::new(&cli.state_dir).map_err(crate::store::StoreError::from)?;
    if let Some(shared) = &cli.shared_dir {
        layout = layout.with_shared(shared).map_err(crate::store::StoreError::from)?;
    }
    // Bad names are refused before anything on disk is touched.
    match &cli.command {
        Command::Run(RunArgs { volume, .. }) | Command::Mount(MountArgs { volume, .. }) => {
            cache_key(&volume.namespace, &volume.cache)?;
            fallbacks(volume)?;
        }
        Command::Cache(CacheCommand::Show(c) | CacheCommand::Rm(c) | CacheCommand::Pull(c) | CacheCommand::Push(c))
        | Command::Cache(CacheCommand::Squash(SquashArgs { cache: c, .. }))
        | Command::Cache(CacheCommand::Rollback(RollbackArgs { cache: c, .. })) => {
            cache_key(&c.namespace, &c.name)?;
        }
        Command::Serve(args) => {
            for ns in &args.allow_inline_publish {
                crate::store::Name::new(ns.as_str()).map_err(|e| {
                    crate::store::StoreError::from(crate::store::NameError { field: "--allow-inline-publish", ..e })
                })?;
            }
        }
        Command::Release(_) | Command::Csi(_) | Command::Cache(CacheCommand::Ls(_) | CacheCommand::Gc(_)) => {}
    }
    if cli.registry.registry.is_some() && cli.shared_dir.is_some() {
        return Err(CliError::Usage(
            "--registry and --shared-dir are two ways to share caches: give one of them".into(),
        ));
    }
    let prefetch = match &cli.command {
        Command::Serve(args) if args.prefetch => Some(args.prefetch_interval.max(Duration::from_secs(1))),
        _ => None,
    };
    let remote = cli.registry.config(prefetch)?;
    let with_remote = |engine: Engine| match &remote {
        Some(config) => engine.with_registry(config.clone()),
        None => engine,
    };
    let squasher = detached_squash(&cli);
    match cli.command {
        Command::Run(args) => {
            let mut engine = with_remote(engine(&layout, (cli.lock_timeout, cli.keep_versions), true)?);
            if !args.no_maintenance {
                engine = engine.with_background_squash(DEFAULT_MAX_DEPTH, squasher);
            }
            run_command(engine, args).await
        }
        Command::Mount(args) => {
            mount_command(with_remote(engine(&layout, (cli.lock_timeout, cli.keep_versions), true)?), args).await
        }
        Command::Release(args) => {
            release_command(with_remote(engine(&layout, (cli.lock_timeout, cli.keep_versions), false)?), args).await
        }
        Command::Serve(args) => {
            serve_command(with_remote(engine(&layout, (cli.lock_timeout, cli.keep_versions), true)?), args).await
        }
        Command::Csi(args) => {
            crate::csi::client::run(args).await.map_err(|e| CliError::Usage(e.to_string()))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Cache(cmd) => {
            let probe = matches!(cmd, CacheCommand::Squash(_));
            cache_command(with_remote(engine(&layout, (cli.lock_timeout, cli.keep_versions), probe)?), cmd).await
        }
    }
}

/// Opens the store and, for commands that mount, checks once per filesystem that it holds uppers.
/// `settings` are the lock timeout and the versions every cache keeps.
fn engine(layout: &Layout, settings: (Duration, usize), check_mounts: bool) -> Result<Engine, CliError> {
    let (lock_timeout, keep_versions) = settings;
    let store = Store::open(layout.clone())?.with_keep_versions(keep_versions);
    if check_mounts {
        check_filesystem(&store)?;
    }
    Ok(Engine::new(store, Arc::new(SysMounter), Arc::new(FileLock::new(layout.clone())), lock_timeout))
}

#[derive(Debug, Serialize, serde::Deserialize, PartialEq)]
struct ProbeRecord {
    device: u64,
    kernel: String,
}

fn check_filesystem(store: &Store) -> Result<(), CliError> {
    use std::os::unix::fs::MetadataExt;
    let layout = store.layout();
    let meta = std::fs::metadata(layout.root()).map_err(|source| CliError::Io {
        op: "stat",
        path: layout.root().to_path_buf(),
        source,
    })?;
    let kernel = nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default();
    let now = ProbeRecord { device: meta.dev(), kernel };
    if atomic::read_json::<ProbeRecord>(&layout.probe_record()).ok().flatten().as_ref() == Some(&now) {
        return Ok(());
    }
    {
        // Shared: gc must not sweep the probe's scratch out from under it.
        let _pin = store.state_lock(false)?;
        probe::check_overlay_support(&layout.tmp_dir())?;
    }
    atomic::write_json(&layout.probe_record(), &now)?;
    Ok(())
}

fn policy(args: &VolumeArgs) -> Policy {
    Policy {
        publish: !args.no_publish,
        fresh: args.fresh,
        on_stale: args.on_stale,
        max_bytes: args.max_bytes,
        read_only: false,
        // The command line knows no pods: the job's exit status decides (--publish-on-failure).
        publish_when: crate::store::PublishWhen::Always,
        keep_versions: None,
    }
}

fn cache_key(namespace: &str, name: &str) -> Result<CacheKey, CliError> {
    Ok(CacheKey::new(namespace, name).map_err(crate::store::StoreError::from)?)
}

fn fallbacks(args: &VolumeArgs) -> Result<Vec<CacheKey>, CliError> {
    args.fallbacks
        .iter()
        .filter(|s| !s.is_empty())
        .map(|s| match s.split_once('/') {
            Some((ns, name)) => cache_key(ns, name),
            None => cache_key(&args.namespace, s),
        })
        .collect()
}

fn new_volume_id(prefix: &str) -> VolumeId {
    // A layer id is 8 random [a-z0-9] characters: a valid volume id suffix too.
    VolumeId::new(format!("{prefix}-{}", LayerId::generate())).expect("prefix and random suffix are valid")
}

fn describe_restore(r: &Restored) -> String {
    let v = &r.volume;
    let mut line = if v.policy.fresh {
        format!("restored {} fresh (empty)", v.cache)
    } else if v.base.layers.is_empty() {
        format!("restored {} empty (no version yet)", v.cache)
    } else {
        format!(
            "restored {} v{} ({} layer{}, {} files, {})",
            v.base.from,
            v.base.from_version,
            v.base.layers.len(),
            if v.base.layers.len() == 1 { "" } else { "s" },
            r.files,
            bytesize::ByteSize(r.bytes).display().iec()
        )
    };
    if v.base.from != v.cache {
        line.push_str(&format!(" as fallback for {}", v.cache));
    }
    line
}

fn describe_release(r: &Released, policy: &Policy, command_failed: Option<i32>) -> String {
    match (r, command_failed) {
        (Released::NotPublished { why: NotPublished::NotAllowed }, Some(code)) if policy.publish => {
            format!("not published: the command failed (exit status {code}); --publish-on-failure publishes anyway")
        }
        (Released::NotPublished { why: NotPublished::NotAllowed }, _) => "not published: --no-publish".to_string(),
        (other, _) => other.to_string(),
    }
}

/// A squash the job does not wait for: this binary again, on the same store and lock settings.
fn detached_squash(cli: &Cli) -> crate::ops::Background {
    let Ok(program) = std::env::current_exe() else { return crate::ops::Background::Off };
    let mut args: Vec<std::ffi::OsString> = vec!["--state-dir".into(), cli.state_dir.clone().into()];
    if let Some(shared) = &cli.shared_dir {
        args.extend(["--shared-dir".into(), shared.clone().into()]);
    }
    args.extend(["--lock-timeout".into(), humantime::format_duration(cli.lock_timeout).to_string().into()]);
    crate::ops::Background::Detached { program, args }
}

async fn run_command(engine: Engine, args: RunArgs) -> Result<ExitCode, CliError> {
    let cache = cache_key(&args.volume.namespace, &args.volume.cache)?;
    let id = new_volume_id("run");
    let target = engine.store().layout().mount_dir(&id);
    std::fs::create_dir_all(&target).map_err(|source| CliError::Io {
        op: "create directory",
        path: target.clone(),
        source,
    })?;
    let policy = policy(&args.volume);
    let req = NewVolume {
        id: id.clone(),
        cache: cache.clone(),
        policy: policy.clone(),
        fallbacks: fallbacks(&args.volume)?,
        mount_path: Some(target.clone()),
        owner: Owner::current(),
        request: None,
        flags: crate::mount::MountOptions::default(),
        root: args.volume.root(args.user),
        content: None,
        cache_size: args.volume.cache_size,
    };
    let restored = match engine.restore(req).await {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_dir(&target);
            return Err(e.into());
        }
    };
    let status = run_child(&args.command, &target, args.user).await;
    let (code, failed) = match &status {
        Ok(code) => (*code, (*code != 0).then_some(*code)),
        Err(e) => {
            eprintln!("jobcachefs: {e}");
            (127, Some(127))
        }
    };
    let allow = failed.is_none() || args.publish_on_failure;
    let published = match release_through_registry(&engine, &id, allow).await {
        Ok(Some(released)) => {
            let _ = std::fs::remove_dir(&target);
            describe_release(&released, &policy, failed)
        }
        Ok(None) => "not published: the volume disappeared".to_string(),
        // A cache never fails a job: report and keep the job's exit status.
        Err(e) => format!("not published: {e}"),
    };
    eprintln!("jobcachefs: {}; {}", describe_restore(&restored), published);
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}

/// Releases, retrying a registry that fails the publish a few times (about half a minute);
/// then the change is dropped with the reason, so the job's volume never stays behind.
async fn release_through_registry(
    engine: &Engine,
    id: &VolumeId,
    allow: bool,
) -> Result<Option<crate::ops::Released>, crate::ops::OpsError> {
    let mut wait = Duration::from_secs(1);
    for _ in 0..5 {
        match engine.release(id, allow).await {
            Err(e @ crate::ops::OpsError::Remote { .. }) => {
                tracing::warn!(error = %e, retry_in = ?wait, "registry failed the publish");
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
            other => return other,
        }
    }
    engine.clone().with_publish_deadline(Duration::ZERO).release(id, allow).await
}

/// Runs the job with the cache in $JOBCACHE_DIR, as `user` when given (root is dropped before
/// exec: supplementary groups cleared, then gid, then uid); returns its exit code (128+N for
/// signal N).
async fn run_child(command: &[String], dir: &Path, user: Option<(u32, u32)>) -> Result<i32, CliError> {
    use std::os::unix::process::ExitStatusExt;
    use tokio::signal::unix::{signal, SignalKind};
    let (program, rest) = command.split_first().ok_or_else(|| CliError::Usage("no command given after --".into()))?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(rest).env("JOBCACHE_DIR", dir);
    if let Some((uid, gid)) = user {
        // std clears the supplementary groups itself when it changes the uid as root.
        cmd.uid(uid).gid(gid);
    }
    let mut child =
        cmd.spawn().map_err(|source| CliError::Io { op: "start command", path: PathBuf::from(program), source })?;
    let io_err = |source| CliError::Io { op: "wait for", path: PathBuf::from(program), source };
    // The terminal delivers ^C to the job too; we stay alive to unmount and report.
    let mut interrupt = signal(SignalKind::interrupt()).map_err(io_err)?;
    let mut terminate = signal(SignalKind::terminate()).map_err(io_err)?;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status.map_err(io_err)?,
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {
                if let Some(pid) = child.id() {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM);
                }
            }
        }
    };
    Ok(status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}

async fn mount_command(engine: Engine, args: MountArgs) -> Result<ExitCode, CliError> {
    let cache = cache_key(&args.volume.namespace, &args.volume.cache)?;
    std::fs::create_dir_all(&args.path).map_err(|source| CliError::Io {
        op: "create directory",
        path: args.path.clone(),
        source,
    })?;
    let path = std::fs::canonicalize(&args.path).map_err(|source| CliError::Io {
        op: "resolve",
        path: args.path.clone(),
        source,
    })?;
    if let Some(existing) = engine.volume_at(&path).await? {
        return Err(CliError::Usage(format!(
            "{} already holds volume {} of cache {}; release it first",
            path.display(),
            existing.id,
            existing.cache
        )));
    }
    let req = NewVolume {
        id: new_volume_id("mnt"),
        cache,
        policy: policy(&args.volume),
        fallbacks: fallbacks(&args.volume)?,
        mount_path: Some(path.clone()),
        owner: None,
        request: None,
        flags: crate::mount::MountOptions::default(),
        root: args.volume.root(None),
        content: None,
        cache_size: args.volume.cache_size,
    };
    let restored = engine.restore(req).await?;
    println!("jobcachefs: {} at {}", describe_restore(&restored), path.display());
    Ok(ExitCode::SUCCESS)
}

async fn release_command(engine: Engine, args: ReleaseArgs) -> Result<ExitCode, CliError> {
    let path = std::fs::canonicalize(&args.path).map_err(|source| CliError::Io {
        op: "resolve",
        path: args.path.clone(),
        source,
    })?;
    let volume = engine
        .volume_at(&path)
        .await?
        .ok_or_else(|| CliError::Usage(format!("no jobcachefs volume is mounted at {}", path.display())))?;
    let released = release_through_registry(&engine, &volume.id, !args.no_publish).await?;
    let line = match released {
        Some(r) => {
            let no_publish = Policy { publish: volume.policy.publish && !args.no_publish, ..volume.policy.clone() };
            describe_release(&r, &no_publish, None)
        }
        None => "not published: the volume was already released".to_string(),
    };
    println!("jobcachefs: released {} from {}; {line}", volume.cache, path.display());
    Ok(ExitCode::SUCCESS)
}

async fn serve_command(engine: Engine, args: ServeArgs) -> Result<ExitCode, CliError> {
    use tokio::signal::unix::{signal, SignalKind};
    let socket = crate::csi::socket_path(&args.endpoint).map_err(|e| CliError::Usage(e.to_string()))?;
    if args.node_id.is_empty() {
        return Err(CliError::Usage("--node-id is required: the name of this node".into()));
    }
    // In a pod (service env) or with a kubeconfig, the driver can look things up in the cluster.
    let wants_cluster = args.lock == LockBackend::Lease
        || std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
        || std::env::var_os("KUBECONFIG").is_some();
    let client = if wants_cluster {
        match kube::Client::try_default().await {
            Ok(c) => Some(c),
            Err(e) if args.lock == LockBackend::Lease => {
                return Err(CliError::Usage(format!("--lock lease needs Kubernetes access: {e}")))
            }
            Err(e) => {
                tracing::warn!(error = %e, "no Kubernetes access: PVC annotations and pod outcomes are not looked up");
                None
            }
        }
    } else {
        None
    };
    // Say once what limits a job's writes, so an admin does not assume more than is enforced.
    let (ext4_quota, xfs_quota) = crate::mount::probe::kernel_quotas();
    tracing::info!(
        default_cache_size = ?args.default_cache_size,
        ext4_project_quota_possible = ext4_quota,
        xfs_project_quota_possible = xfs_quota,
        "size limits: a cache with cacheSize (or --default-cache-size) lives in an image file of that size \
         and its jobs get ENOSPC past it; a volume's capacity_range is not enforced per volume"
    );
    let metrics = Arc::new(crate::metrics::Metrics::new(args.metrics_cache_label));
    let mut engine = engine
        .with_publish_deadline(args.publish_deadline)
        .with_metrics(metrics.clone())
        .with_default_cache_size(args.default_cache_size);
    if args.lock == LockBackend::Lease {
        let client = client.clone().ok_or_else(|| CliError::Usage("--lock lease needs Kubernetes access".into()))?;
        let timing = crate::lock::LeaseTiming { duration: args.lease_duration, ..Default::default() };
        let lease = crate::lock::LeaseLock::new(client, crate::lock::LeaseLock::holder_for(&args.node_id), timing);
        engine = engine.with_lock(Arc::new(lease));
    }
    let kubelet_dir = if args.kubelet_dir.as_os_str().is_empty() {
        None
    } else {
        Some(std::fs::canonicalize(&args.kubelet_dir).map_err(|source| CliError::Io {
            op: "resolve --kubelet-dir",
            path: args.kubelet_dir.clone(),
            source,
        })?)
    };
    let access = crate::csi::Access {
        kubelet_dir,
        inline_publish: args.allow_inline_publish.into_iter().collect(),
        config_file: args.config,
        cluster: client.map(|c| {
            Arc::new(crate::cluster::KubeCluster::new(c, Duration::from_secs(5)).with_events(&args.node_id))
                as Arc<dyn crate::cluster::Cluster>
        }),
    };
    let maintenance = crate::csi::Maintenance {
        max_depth: args.max_depth,
        gc_interval: args.gc_interval,
        max_idle: args.max_idle,
        budget_bytes: args.budget,
    };
    let metrics_task = match args.metrics_address {
        Some(address) => {
            let store = engine.clone();
            let gauges = metrics.clone();
            let refresh: crate::metrics::Refresh = Arc::new(move || {
                let (store, gauges) = (store.clone(), gauges.clone());
                Box::pin(async move {
                    match store.summary().await {
                        Ok(summary) => gauges.set_store(&summary),
                        Err(e) => tracing::warn!(error = %e, "metrics: cannot read the store; gauges kept"),
                    }
                })
            });
            let (bound, task) = crate::metrics::serve(address, metrics.clone(), refresh)
                .await
                .map_err(|e| CliError::Usage(e.to_string()))?;
            tracing::info!(address = %bound, "serving metrics at /metrics");
            Some(task)
        }
        None => None,
    };
    if let Some(registry) = engine.registry() {
        if args.lock == LockBackend::File {
            tracing::warn!(registry = %registry.config().host,
                "--registry with --lock file: only this node may publish; nodes sharing a registry need --lock lease");
        }
    }
    let prefetch = engine.spawn_prefetch();
    let driver = Arc::new(
        crate::csi::Driver::new(engine, args.node_id, access, maintenance).with_capacity_reserve(args.capacity_reserve),
    );
    let upkeep = tokio::spawn(driver.clone().run_maintenance());
    let io_err = |source| CliError::Io { op: "install signal handler", path: PathBuf::from("SIGTERM"), source };
    let mut term = signal(SignalKind::terminate()).map_err(io_err)?;
    let mut int = signal(SignalKind::interrupt()).map_err(io_err)?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutting down");
    };
    let served = crate::csi::serve(&socket, driver, shutdown).await;
    upkeep.abort();
    if let Some(task) = prefetch {
        task.abort();
    }
    if let Some(task) = metrics_task {
        task.abort();
    }
    served.map_err(|e| CliError::Usage(e.to_string()))?;
    Ok(ExitCode::SUCCESS)
}

fn progress_bar(what: &str) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_message(what.to_string());
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

fn print_json<T: Serialize>(value: &T) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| CliError::Usage(format!("encode JSON: {e}")))?;
    println!("{text}");
    Ok(())
}

fn age(unix: u64) -> String {
    if unix == 0 {
        return "never".into();
    }
    let secs = crate::store::head::now_unix().saturating_sub(unix);
    format!(
        "{} ago",
        humantime::format_duration(Duration::from_secs(secs)).to_string().split(' ').next().unwrap_or("0s")
    )
}

async fn cache_command(engine: Engine, cmd: CacheCommand) -> Result<ExitCode, CliError> {
    let store = engine.store().clone();
    match cmd {
        CacheCommand::Ls(json) => {
            let mut infos = Vec::new();
            for key in store.caches()? {
                let info = store.cache_info(&key)?;
                if info.version > 0 || info.volumes > 0 {
                    infos.push(info);
                }
            }
            let mut remotes = Vec::new();
            for i in &infos {
                remotes.push(remote_version(&engine, &i.cache).await);
            }
            if json.json {
                #[derive(Serialize)]
                struct Row<'a> {
                    #[serde(flatten)]
                    info: &'a crate::store::CacheInfo,
                    #[serde(skip_serializing_if = "Option::is_none")]
                    remote: Option<&'a RemoteColumn>,
                }
                let rows: Vec<Row> =
                    infos.iter().zip(&remotes).map(|(info, r)| Row { info, remote: r.as_ref() }).collect();
                print_json(&rows)?;
            } else {
                let remote_head = if engine.registry().is_some() { "  REGISTRY" } else { "" };
                println!(
                    "{:<40} {:>7} {:>5} {:>11} {:>9} {:>8} {:>12}{remote_head}",
                    "CACHE", "VERSION", "DEPTH", "SIZE", "FILES", "VOLUMES", "LAST USED"
                );
                for (i, r) in infos.into_iter().zip(remotes) {
                    println!(
                        "{:<40} {:>7} {:>5} {:>11} {:>9} {:>8} {:>12}{}",
                        i.cache.to_string(),
                        i.version,
                        i.layers.len(),
                        bytesize::ByteSize(i.bytes).display().iec().to_string(),
                        i.files,
                        i.volumes,
                        age(i.last_used_unix),
                        r.map(|r| format!("  {}", r.text())).unwrap_or_default()
                    );
                }
            }
        }
        CacheCommand::Pull(arg) => {
            let key = cache_key(&arg.namespace, &arg.name)?;
            let synced = engine.sync_cache(&key).await?;
            use crate::ops::remote::Synced;
            match synced {
                Synced::NoRemote => println!("cache {key}: the registry has no version"),
                Synced::Current(v) => println!("cache {key}: v{v} is current, nothing pulled"),
                Synced::Pulled { version, layers, bytes } => println!(
                    "cache {key}: pulled v{version} ({layers} layers, {})",
                    bytesize::ByteSize(bytes).display().iec()
                ),
            }
        }
        CacheCommand::Push(arg) => {
            let key = cache_key(&arg.namespace, &arg.name)?;
            match engine.push_cache(&key).await? {
                crate::ops::remote::Pushed::Already(v) => println!("cache {key}: the registry already has v{v}"),
                crate::ops::remote::Pushed::Head { version, digest } => {
                    println!("cache {key}: pushed v{version} ({digest})")
                }
            }
        }
        CacheCommand::Show(arg) => {
            let key = cache_key(&arg.namespace, &arg.name)?;
            let info = store.cache_info(&key)?;
            let mut layers = Vec::new();
            for id in &info.layers {
                layers.push(store.layer(id)?);
            }
            let versions = version_rows(&store, &key)?;
            let remote = remote_version(&engine, &key).await;
            if arg.json.json {
                #[derive(Serialize)]
                struct Show<'a> {
                    #[serde(flatten)]
                    info: &'a crate::store::CacheInfo,
                    layer_records: &'a [Option<crate::store::LayerRecord>],
                    versions: &'a [VersionRow],
                    #[serde(skip_serializing_if = "Option::is_none")]
                    remote: Option<&'a RemoteColumn>,
                }
                print_json(&Show {
                    info: &info,
                    layer_records: &layers,
                    versions: &versions,
                    remote: remote.as_ref(),
                })?;
            } else if info.version == 0 {
                println!("cache {key}: no version yet ({} volumes in use)", info.volumes);
                if let Some(r) = &remote {
                    println!("registry: {}", r.text());
                }
            } else {
                println!(
                    "cache {key}: version {}, {} layers, {}, {} files, {} volumes in use, last used {}",
                    info.version,
                    info.layers.len(),
                    bytesize::ByteSize(info.bytes).display().iec(),
                    info.files,
                    info.volumes,
                    age(info.last_used_unix)
                );
                if let Some(r) = &remote {
                    println!("registry: {}", r.text());
                }
                println!("layers, bottom to top:");
                for (id, rec) in info.layers.iter().zip(&layers) {
                    match rec {
                        Some(r) => println!(
                            "  {id}  {:<6} {:>11} {:>9} files  {}",
                            format!("{:?}", r.kind).to_lowercase(),
                            bytesize::ByteSize(r.bytes).display().iec().to_string(),
                            r.files,
                            age(r.created_unix)
                        ),
                        None => println!("  {id}  (no record)"),
                    }
                }
                println!("versions kept, newest first:");
                for v in &versions {
                    println!(
                        "  v{:<5} {:>12} {:>3} layers {:>11}  {}",
                        v.version,
                        age(v.created_unix),
                        v.depth,
                        bytesize::ByteSize(v.bytes).display().iec().to_string(),
                        v.by
                    );
                }
            }
        }
        CacheCommand::Rollback(args) => {
            let key = cache_key(&args.cache.namespace, &args.cache.name)?;
            // With a registry the rollback is a version like any other: made on top of the
            // registry's newest and put there, so every node takes it.
            if engine.registry().is_some() {
                engine.sync_cache(&key).await?;
            }
            let rolled = engine.rollback(&key, args.to).await?;
            if engine.registry().is_some() {
                engine.push_cache(&key).await?;
            }
            if args.cache.json.json {
                print_json(&rolled)?;
            } else {
                println!(
                    "cache {key}: rolled back to v{}'s content as v{} ({} layers); jobs that started from an older \
                     version will not publish over it",
                    rolled.to, rolled.version, rolled.depth
                );
            }
        }
        CacheCommand::Gc(args) => {
            let bar = progress_bar("collecting garbage");
            let (evicted, report) = engine.collect(args.max_idle, args.budget).await?;
            bar.finish_and_clear();
            if args.json.json {
                #[derive(Serialize)]
                struct Gc<'a> {
                    evicted: &'a [CacheKey],
                    #[serde(flatten)]
                    report: &'a crate::store::gc::GcReport,
                }
                print_json(&Gc { evicted: &evicted, report: &report })?;
            } else {
                println!(
                    "evicted {} caches, removed {} layers ({}), reclaimed {} volumes, cleared {} scratch entries",
                    evicted.len(),
                    report.layers_removed.len(),
                    bytesize::ByteSize(report.bytes_freed).display().iec(),
                    report.volumes_reclaimed.len(),
                    report.scratch_removed
                );
                for d in &report.deferred {
                    println!("deferred: {d}");
                }
            }
        }
        CacheCommand::Squash(args) => {
            let key = cache_key(&args.cache.namespace, &args.cache.name)?;
            let bar = progress_bar("squashing");
            let tick = bar.clone();
            let mode = if args.flatten { SquashMode::Flatten } else { SquashMode::Auto };
            let outcome = engine
                .squash_with(
                    &key,
                    args.max_depth,
                    mode,
                    Box::new(move |s| {
                        tick.set_message(format!(
                            "squashing: {} files, {}",
                            s.files,
                            bytesize::ByteSize(s.bytes).display().iec()
                        ))
                    }),
                )
                .await?;
            bar.finish_and_clear();
            // The replaced layers are garbage now unless a volume still pins them.
            let (_, report) = engine.collect(None, None).await?;
            if args.cache.json.json {
                print_json(&outcome)?;
            } else {
                use crate::store::squash::SquashOutcome::*;
                match outcome {
                    Squashed { version, replaced, depth } => println!(
                        "cache {key}: squashed {replaced} layers of v{version} into one (depth now {depth}); freed {}",
                        bytesize::ByteSize(report.bytes_freed).display().iec()
                    ),
                    Shallow { depth } => {
                        println!("cache {key}: {depth} layers, not deeper than {}; nothing to do", args.max_depth)
                    }
                    Lost => println!("cache {key}: changed while squashing (or has no version); nothing replaced"),
                }
            }
        }
        CacheCommand::Rm(arg) => {
            let key = cache_key(&arg.namespace, &arg.name)?;
            let (removed, report) = remove_cache(&engine, &key).await?;
            if arg.json.json {
                print_json(
                    &serde_json::json!({"cache": key, "removed": removed, "layers_removed": report.layers_removed.len()}),
                )?;
            } else if removed {
                println!("cache {key}: removed; freed {}", bytesize::ByteSize(report.bytes_freed).display().iec());
            } else {
                println!("cache {key}: no such cache; nothing removed");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One kept version as `cache show` prints it.
#[derive(Debug, Serialize)]
struct VersionRow {
    version: u64,
    created_unix: u64,
    depth: usize,
    bytes: u64,
    /// Who made it: `volume ID (pod NS/NAME)`, `rollback to vN`, or `unknown`.
    by: String,
}

/// A cache's version in the registry, as `cache ls|show` print it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case")]
enum RemoteColumn {
    /// The registry's `head`.
    Version { version: u64, lineage: String, manifest: String },
    /// The registry has no version of the cache.
    None,
    /// The registry could not be asked.
    Error(String),
}

impl RemoteColumn {
    fn text(&self) -> String {
        match self {
            RemoteColumn::Version { version, manifest, .. } => {
                format!("v{version} ({})", manifest.get(..19).unwrap_or(manifest))
            }
            RemoteColumn::None => "no version".into(),
            RemoteColumn::Error(e) => format!("unreachable: {e}"),
        }
    }
}

async fn remote_version(engine: &Engine, key: &CacheKey) -> Option<RemoteColumn> {
    engine.registry()?;
    Some(match engine.remote_head(key).await {
        Ok(Some((v, manifest))) => RemoteColumn::Version { version: v.version, lineage: v.lineage, manifest },
        Ok(None) => RemoteColumn::None,
        Err(e) => RemoteColumn::Error(e.to_string()),
    })
}

fn version_rows(store: &Store, key: &CacheKey) -> Result<Vec<VersionRow>, CliError> {
    use crate::store::history::Origin;
    let mut rows = Vec::new();
    for v in store.versions(key)? {
        let bytes = store.layers_size(&v.layers)?.0;
        let by = match &v.origin {
            Origin::Publish { volume, pod: Some(pod) } => format!("volume {volume} (pod {pod})"),
            Origin::Publish { volume, pod: None } => format!("volume {volume}"),
            Origin::Rollback { to } => format!("rollback to v{to}"),
            Origin::Pull { manifest } => format!("registry ({})", manifest.get(..19).unwrap_or(manifest)),
            Origin::Unknown => "unknown".into(),
        };
        rows.push(VersionRow { version: v.version, created_unix: v.created_unix, depth: v.layers.len(), bytes, by });
    }
    Ok(rows)
}

async fn remove_cache(engine: &Engine, key: &CacheKey) -> Result<(bool, crate::store::gc::GcReport), CliError> {
    let removed = engine.remove_cache(key).await?;
    let (_, report) = engine.collect(None, None).await?;
    Ok((removed, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_takes_the_command_after_double_dash() {
        let cli = Cli::try_parse_from([
            "jobcachefs",
            "run",
            "--cache",
            "m2",
            "--fallback",
            "main,other/x",
            "--",
            "mvn",
            "-q",
            "package",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else { panic!("not run") };
        assert_eq!(args.command, ["mvn", "-q", "package"]);
        let fb = fallbacks(&args.volume).unwrap();
        assert_eq!(fb[0].to_string(), "default/main");
        assert_eq!(fb[1].to_string(), "other/x");
    }

    #[test]
    fn the_helm_charts_serve_arguments_parse() {
        let cli = Cli::try_parse_from([
            "jobcachefs",
            "--state-dir=/var/lib/jobcachefs",
            "--log-level=info",
            "serve",
            "--endpoint=unix:///csi/csi.sock",
            "--node-id=node-1",
            "--config=/etc/jobcachefs/config.json",
            "--lock=lease",
            "--shared-dir=/shared",
            "--publish-deadline=10m",
            "--lock-timeout=30s",
        ])
        .unwrap();
        assert_eq!(cli.shared_dir.as_deref(), Some(Path::new("/shared")));
        let Command::Serve(args) = cli.command else { panic!("not serve") };
        assert_eq!(args.lock, LockBackend::Lease);
        assert_eq!(args.config.as_deref(), Some(Path::new("/etc/jobcachefs/config.json")));
    }

    #[test]
    fn bad_values_name_the_flag() {
        let err = Cli::try_parse_from(["jobcachefs", "run", "--cache", "m", "--on-stale", "merge", "--", "true"])
            .unwrap_err();
        assert!(err.to_string().contains("--on-stale"), "{err}");
        let err =
            Cli::try_parse_from(["jobcachefs", "mount", "--cache", "m", "--max-bytes", "lots", "/x"]).unwrap_err();
        assert!(err.to_string().contains("--max-bytes"), "{err}");
        let cli = Cli::try_parse_from(["jobcachefs", "mount", "--cache", "m", "--max-bytes", "500MiB", "/x"]).unwrap();
        let Command::Mount(args) = cli.command else { panic!("not mount") };
        assert_eq!(args.volume.max_bytes, Some(500 * 1024 * 1024));
    }

    #[test]
    fn bad_cache_names_are_refused_with_the_rule() {
        let err = cache_key("default", "../etc").unwrap_err();
        assert!(err.to_string().contains("cache name \"../etc\" is invalid"), "{err}");
    }
}
