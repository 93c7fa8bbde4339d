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
