//! The `ftpgate` command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use ftpgate::{daemon, nft};

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
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ftpgate: {e:#}");
            ExitCode::from(2)
        }
    }
}
