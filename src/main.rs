//! Command line: `run` (the default), `check` and `probe`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use sni_router::config::{self, Config};
use sni_router::server::{self, ConfigSource};

#[derive(Parser)]
#[command(
    name = "sni-router",
    version,
    about = "Layer-4 SNI router for a fleet of edge nodes",
    long_about = "Layer-4 SNI router for a fleet of edge nodes. On its TLS port it reads the \
ClientHello without decrypting, takes the SNI, and terminates TLS for names this node holds a \
valid certificate for (sending the plaintext to the site's upstream), splices the raw stream to a \
node that holds the name or to a passthrough backend (with a PROXY header), or refuses names it \
does not know. On its HTTP port it answers ACME HTTP-01 challenges and redirects the rest to \
https. Certificates come from files, ACME (HTTP-01, or DNS-01 through RFC 2136) or an internal \
CA. The configuration is one TOML file for the whole fleet, by default \
/etc/sni-router/sni-router.toml under systemd; SIGHUP reloads it and SIGUSR2 upgrades the \
binary in place without dropping a connection."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Log format. The level comes from RUST_LOG, info when unset.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the router (the default).
    Run(ConfigArgs),
    /// Validate a config and print this node's route table.
    Check(ConfigArgs),
    /// TLS-handshake with a server, print the chain it presents, optionally save it.
    Probe(ProbeArgs),
    /// Write the man page and shell completions into a directory (for packaging).
    #[command(hide = true)]
    Generate {
        /// Where to write sni-router.8 and the bash, zsh and fish completions.
        out: PathBuf,
    },
}

#[derive(Args)]
struct ProbeArgs {
    /// HOST:PORT to connect to.
    target: String,
    /// Server name to send (SNI) and verify the chain for.
    #[arg(long)]
    sni: String,
    /// Write the presented chain to DIR/chain.pem.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Verify against the roots in this PEM file instead of the system roots.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Give up after this long.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: std::time::Duration,
}

#[derive(Args, Default)]
struct ConfigArgs {
    /// Config file; without it, config/sni-router.toml if present, else the embedded default.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Which [[nodes]] entry this host is (overrides `this_node`).
    #[arg(long)]
    node: Option<String>,
}

impl ConfigArgs {
    fn source(&self) -> ConfigSource {
        let default = PathBuf::from(config::EMBEDDED_PATH);
        let path = self
            .config
            .clone()
            .or_else(|| default.exists().then_some(default));
        ConfigSource {
            path,
            node: self.node.clone(),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let flush = init_logging(cli.log_format);
    let result = match cli.command.unwrap_or(Command::Run(ConfigArgs::default())) {
        Command::Run(args) => run(args),
        Command::Check(args) => check(args),
        Command::Probe(args) => probe(args),
        Command::Generate { out } => generate(&out),
    };
    // Every line logged so far goes out before the error that ends us.
    drop(flush);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr through a batching writer thread; the returned guard
/// writes out what is left when `main` returns.
fn init_logging(format: LogFormat) -> sni_router::log_sink::Flush {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (sink, flush) = sni_router::log_sink::LogSink::start(std::io::stderr());
    // Colours only on a terminal: journald and log files get plain text,
    // and there the connection line is written without tracing's fmt layer.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    if !ansi {
        let format = match format {
            LogFormat::Text => sni_router::conn_log::Format::Text,
            LogFormat::Json => sni_router::conn_log::Format::Json,
        };
        sni_router::conn_log::direct(sink.clone(), format);
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(sink);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    flush
}

/// The man page sni-router(8) and completions, from the clap definitions.
fn generate(out: &std::path::Path) -> anyhow::Result<()> {
    use clap::CommandFactory;
    use clap_complete::Shell;
    std::fs::create_dir_all(out).with_context(|| format!("{}", out.display()))?;
    let command = Cli::command();
    let man = clap_mangen::Man::new(command.clone()).section("8");
    let mut page = Vec::new();
    man.render(&mut page)?;
    std::fs::write(out.join("sni-router.8"), page)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut command.clone(), "sni-router", out)?;
    }
    Ok(())
}

fn check(args: ConfigArgs) -> anyhow::Result<()> {
    let config = args.source().load()?;
    print!("{}", config.route_table());
    for warning in &config.warnings {
        println!(
            "warning: {}: {}: {}",
            config.source, warning.field, warning.message
        );
    }
    // The files the config names, as the router would load them now.
    let problems = sni_router::certs::disk::check_files(&config, std::time::SystemTime::now());
    for problem in &problems {
        eprintln!("{}: {}: {}", config.source, problem.field, problem.message);
    }
    if !problems.is_empty() {
        anyhow::bail!("{} problem(s) with certificate files", problems.len());
    }
    Ok(())
}

fn run(args: ConfigArgs) -> anyhow::Result<()> {
    // Every connection costs a descriptor (two when routed): use all we may.
    let nofile = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => {
            tracing::debug!(limit, "open file limit");
            limit
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not raise the open file limit");
            rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft)
        }
    };
    // First, before anything opens a descriptor: sockets handed over by
    // systemd or by the process this one replaces.
    let inherited = sni_router::listen::Inherited::from_env();
    let source = args.source();
    let config: Config = source.load()?;
    eprint!("{}", config.route_table());
    for warning in &config.warnings {
        tracing::warn!(field = %warning.field, "{}", warning.message);
    }
    let wanted = (config.limits.max_connections as u64)
        .saturating_mul(2)
        .saturating_add(DESCRIPTORS_BESIDE_CONNECTIONS);
    if let Err(e) = reserve_descriptors(wanted.min(nofile)) {
        tracing::debug!(error = %e, "could not size the descriptor table");
    }
    // The multi-thread scheduler even for one worker: on the current-thread
    // one, full TLS handshakes ran 8% fewer per second here
    // (docs/benchmarks.md), though short spliced connections took 3% fewer
    // instructions.
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.worker_threads(config.worker_threads());
    let runtime = runtime
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.spawn(trim_allocator());
    runtime.block_on(server::serve(source, config, inherited))?;
    Ok(())
}

/// Descriptors beyond two per connection: listeners, pipes of connections
/// being spliced, certificate and log files, the admin port's clients.
const DESCRIPTORS_BESIDE_CONNECTIONS: u64 = 1024;

/// Grows the descriptor table to hold `count` descriptors now. The kernel
/// grows it by doubling when a new descriptor does not fit, and in a process
/// with more than one thread it then waits out an RCU grace period inside
/// that `accept` or `socket` call (`synchronize_rcu` in `expand_fdtable`):
/// 10-30 ms on the benchmark machine, during which the worker serves
/// nothing, and the queue that builds up needs more descriptors, so the next
/// doubling follows. A router started under load (an upgrade, a restart)
/// took one such pause per doubling (docs/benchmarks.md). The table is
/// kernel memory, 8 bytes a descriptor, and never shrinks anyway.
fn reserve_descriptors(count: u64) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let Some(highest) = count.checked_sub(1).and_then(|n| i32::try_from(n).ok()) else {
        return Ok(());
    };
    let probe = std::fs::File::open("/dev/null")?;
    // SAFETY: F_DUPFD_CLOEXEC takes a descriptor we own and an int; it
    // returns a new descriptor we then own, or -1.
    let fd = unsafe { libc::fcntl(probe.as_raw_fd(), libc::F_DUPFD_CLOEXEC, highest) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just returned to us and nothing else holds it; dropping
    // it closes it, and the table keeps its size.
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
    Ok(())
}

/// mimalloc hands freed memory back to the OS only a while after it was
/// freed, and only when it is next called: a router that goes quiet after
/// a burst of connections would hold their memory for good. A tick does
/// what jemalloc's background thread does, returning what has been free
/// for a second (`purge_delay`) without touching the per-connection path.
async fn trim_allocator() {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        // SAFETY: mi_collect takes no pointers and may be called from any
        // thread at any time; it only walks the allocator's own state.
        unsafe { libmimalloc_sys::mi_collect(false) };
    }
}

fn probe(args: ProbeArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let target = tokio::net::lookup_host(&args.target)
            .await
            .with_context(|| format!("resolving {}", args.target))?
            .next()
            .with_context(|| format!("{} has no address", args.target))?;
        let report =
            sni_router::probe::probe(target, &args.sni, args.ca.as_deref(), args.timeout).await?;
        print!(
            "{}",
            sni_router::probe::render(&report, std::time::SystemTime::now())
        );
        if let Some(dir) = &args.out {
            let path = sni_router::probe::write_chain(dir, &report.chain)?;
            println!("chain written to {}", path.display());
        }
        Ok(())
    })
}

/// mimalloc over glibc malloc: 18% fewer instructions per routed connection
/// and less memory per idle one (docs/benchmarks.md), for a C build of
/// seconds.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
