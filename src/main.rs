//! The `ftpgate` command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use ftpgate::{daemon, denials, nft};

#[derive(Parser)]
#[command(version, about = "FTP application-level gateway for the network edge")]
struct Cli {
    /// Diagnostics on standard error: error, warn, info, debug, trace.
    #[arg(long, global = true, default_value = "info")]
    log_level: tracing::Level,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a configuration file and report every problem in it.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print the nftables rules the configuration needs.
    NftRules {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print a load balancer's configuration for several instances, each
    /// owning a slice of the data-port range (README "Running more than
    /// one"); the notes at its top say what each instance's config needs.
    BalancerConfig {
        /// haproxy (PROXY protocol v2) or ipvs (ipvsadm and nftables).
        #[arg(long, value_enum)]
        format: BalancerFormat,
        /// The address clients connect to.
        #[arg(long)]
        vip: std::net::IpAddr,
        /// The control port clients connect to.
        #[arg(long, default_value_t = 21)]
        port: u16,
        /// The control port of the instances (default: --port).
        #[arg(long)]
        instance_port: Option<u16>,
        /// The whole data-port range, cut into one slice per instance.
        #[arg(long, default_value = "50000-50999")]
        ports: String,
        /// An instance's address; repeat, in order (instance N owns slice N).
        #[arg(long = "instance", required = true)]
        instances: Vec<std::net::IpAddr>,
        /// The instances' admin port (/readyz).
        #[arg(long, default_value_t = 9121)]
        admin_port: u16,
        /// How often the balancer checks /readyz.
        #[arg(long, default_value = "200ms")]
        check_interval: humantime::Duration,
    },
    /// Summarise a deny log: counts by reason, top clients, top targets.
    /// List the kernel data plane's live pinhole elements (read over netlink
    /// from the nftables table `inet ftpgate`).
    Pinholes,
    Denials {
        /// Only denials newer than this ("1h", "30m", "2d").
        #[arg(long)]
        since: Option<String>,
        /// Only this reason (e.g. bounce, pasv_theft, pinhole_expired).
        #[arg(long)]
        reason: Option<String>,
        /// Print new denials as they are written, one line each.
        #[arg(long, short)]
        follow: bool,
        /// The deny log (JSON lines).
        file: PathBuf,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum BalancerFormat {
    Haproxy,
    Ipvs,
}

#[allow(clippy::too_many_arguments)]
fn balancer_config(
    format: BalancerFormat,
    vip: std::net::IpAddr,
    port: u16,
    instance_port: Option<u16>,
    ports: &str,
    instances: Vec<std::net::IpAddr>,
    admin_port: u16,
    check_interval: humantime::Duration,
) -> anyhow::Result<()> {
    let range = ports
        .split_once('-')
        .and_then(|(a, b)| Some((a.trim().parse().ok()?, b.trim().parse().ok()?)))
        .ok_or_else(|| anyhow::anyhow!("--ports {ports:?}: write a range LOW-HIGH"))?;
    let (name, instance_port) = match (format, instance_port) {
        (BalancerFormat::Haproxy, p) => ("haproxy", p.unwrap_or(port)),
        (BalancerFormat::Ipvs, p) => ("ipvs", p.unwrap_or(port)),
    };
    let mut command = format!(
        "ftpgate balancer-config --format {name} --vip {vip} --port {port} --instance-port {instance_port} --ports {ports}"
    );
    for i in &instances {
        command.push_str(&format!(" --instance {i}"));
    }
    command.push_str(&format!(
        " --admin-port {admin_port} --check-interval {check_interval}"
    ));
    let layout = ftpgate::balancer::Layout {
        vip,
        port,
        instance_port,
        ports: range,
        instances,
        admin_port,
        check_interval: check_interval.into(),
    };
    let text = match format {
        BalancerFormat::Haproxy => layout.haproxy(&command)?,
        BalancerFormat::Ipvs => layout.ipvs(&command)?,
    };
    print!("{text}");
    Ok(())
}

fn show_denials(
    since: Option<String>,
    reason: Option<String>,
    follow: bool,
    file: &std::path::Path,
) -> anyhow::Result<()> {
    let filter = denials::Filter {
        since: since
            .as_deref()
            .map(denials::since)
            .transpose()
            .map_err(anyhow::Error::msg)?,
        reason,
    };
    if follow {
        denials::follow(file, &filter, |line| println!("{line}"))?;
        return Ok(());
    }
    let summary = denials::summarize_file(file, &filter)?;
    print!("{}", summary.render(&file.display().to_string()));
    Ok(())
}

#[cfg(target_os = "linux")]
fn list_pinholes() -> anyhow::Result<()> {
    print!("{}", ftpgate::dataplane::kernel::list_pinholes()?);
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn list_pinholes() -> anyhow::Result<()> {
    anyhow::bail!("the kernel data plane needs Linux")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(cli.log_level)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Run { config } => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(daemon::run(config))),
        Command::CheckConfig { config } => daemon::load(&config).map(|cfg| {
            println!(
                "{}: ok ({} listener(s), data ports {}-{})",
                config.display(),
                cfg.listeners.len(),
                cfg.data.ports.0,
                cfg.data.ports.1
            );
        }),
        Command::NftRules { config } => daemon::load(&config).map(|cfg| {
            print!("{}", nft::ruleset(&cfg, &config.display().to_string()));
        }),
        Command::Pinholes => list_pinholes(),
        Command::BalancerConfig {
            format,
            vip,
            port,
            instance_port,
            ports,
            instances,
            admin_port,
            check_interval,
        } => balancer_config(
            format,
            vip,
            port,
            instance_port,
            &ports,
            instances,
            admin_port,
            check_interval,
        ),
        Command::Denials {
            since,
            reason,
            follow,
            file,
        } => show_denials(since, reason, follow, &file),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ftpgate: {e:#}");
            ExitCode::from(2)
        }
    }
}
