//! The command line (SPEC section 1) and its translation into config [`Overrides`].

use std::path::PathBuf;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

use crate::config::{LogFormat, LogLevel, Overrides, StrategyName};

#[derive(Debug, Parser)]
#[command(
    name = "balancer",
    version,
    about = "A reverse-proxy HTTP load balancer configured by one TOML file",
    disable_help_subcommand = true
)]
pub struct Cli {
    /// Config file
    #[arg(short, long, env = "BALANCER_CONFIG", default_value = "balancer.toml", value_name = "FILE")]
    pub config: PathBuf,
    /// Replaces server.listen (repeatable)
    #[arg(short, long, value_name = "ADDR")]
    pub listen: Vec<String>,
    /// Replaces the backends of the only upstream (repeatable); with no config file it
    /// creates upstream "default"
    #[arg(short, long, value_name = "URL")]
    pub backend: Vec<String>,
    /// Sets the strategy of every upstream
    #[arg(short, long, value_name = "NAME")]
    pub strategy: Option<StrategyName>,
    /// Replaces admin.listen
    #[arg(long, value_name = "ADDR|off")]
    pub admin: Option<String>,
    /// Overrides any config key by dotted path; VALUE is read as a TOML value, and as a
    /// plain string when it is not one (--set timeouts.connect=1s)
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub set: Vec<(String, String)>,
    #[arg(long, env = "BALANCER_LOG", value_name = "LEVEL")]
    pub log_level: Option<LogLevel>,
    #[arg(long, value_name = "FMT")]
    pub log_format: Option<LogFormat>,
    /// Validate the effective config, print a summary, exit 0 or 1
    #[arg(long, conflicts_with = "print_config")]
    pub check: bool,
    /// Print the effective config (file + overrides) as TOML, then exit
    #[arg(long)]
    pub print_config: bool,
    /// With --check: print a unified diff of the effective config against the one running
    /// behind the admin listener at URL (secrets as "***"); exit 2 when it cannot be reached
    #[arg(long, value_name = "URL", requires = "check")]
    pub diff: Option<String>,
    /// Print the man page (roff, for `man -l -`), then exit
    #[arg(long)]
    pub man: bool,
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Whether `--config` (or BALANCER_CONFIG) was given, so a missing file is an error.
    #[arg(skip)]
    pub config_explicit: bool,
}

/// What balancer can do besides serving; none of it reads the config.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print a completion script for SHELL, generated from these flags
    ///
    /// bash: `balancer completions bash > /etc/bash_completion.d/balancer`;
    /// zsh: `balancer completions zsh > "${fpath[1]}/_balancer"`;
    /// fish: `balancer completions fish > ~/.config/fish/completions/balancer.fish`
    Completions {
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
}

impl Cli {
    /// Writes the completion script for `shell` to stdout.
    pub fn print_completions(shell: clap_complete::Shell) {
        clap_complete::generate(shell, &mut Cli::command(), "balancer", &mut std::io::stdout());
    }

    /// Writes the man page (section 1, roff) to stdout.
    pub fn print_man() -> std::io::Result<()> {
        clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())
    }

    /// Parses `std::env::args`, exiting with status 2 on bad usage.
    pub fn parse_args() -> Cli {
        let matches = Cli::command().get_matches();
        let explicit =
            matches!(matches.value_source("config"), Some(ValueSource::CommandLine | ValueSource::EnvVariable));
        let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
        cli.config_explicit = explicit;
        cli
    }

    pub fn overrides(&self) -> Overrides {
        fn name<T: ValueEnum>(v: &Option<T>) -> Option<String> {
            v.as_ref().and_then(|v| v.to_possible_value()).map(|p| p.get_name().to_owned())
        }
        Overrides {
            listen: self.listen.clone(),
            backends: self.backend.clone(),
            strategy: name(&self.strategy),
            admin: self.admin.clone(),
            log_level: name(&self.log_level),
            log_format: name(&self.log_format),
            set: self.set.clone(),
        }
    }
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}
