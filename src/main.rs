//! The `balancer` binary: parse flags, load the config, then hand over to `app::run`.

use std::process::ExitCode;

use balancer::app;
use balancer::cli::{Cli, Command};
use balancer::config::{self, ConfigSource, Loaded};
use balancer::server::Workers;

fn main() -> ExitCode {
    let cli = Cli::parse_args();
    if let Some(Command::Completions { shell }) = cli.command {
        Cli::print_completions(shell);
        return ExitCode::SUCCESS;
    }
    if cli.man {
        return match Cli::print_man() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: cannot print the man page: {e}");
                ExitCode::from(1)
            }
        };
    }
    let source = ConfigSource { path: cli.config.clone(), required: cli.config_explicit, overrides: cli.overrides() };
    let loaded = match config::load(&source.path, source.required, &source.overrides) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    if cli.print_config {
        match toml::to_string_pretty(&loaded.raw) {
            Ok(text) => print!("{text}"),
            Err(e) => {
                eprintln!("error: cannot print the config: {e}");
                return ExitCode::from(1);
            }
        }
        return ExitCode::SUCCESS;
    }
    if cli.check {
        return match &cli.diff {
            Some(url) => print_diff(&source, &loaded, url),
            None => {
                print_summary(&source, &loaded);
                ExitCode::SUCCESS
            }
        };
    }

    let log = balancer::logging::init(&loaded.config.log);
    // Client connections are served by the workers; the admin listener, health checks and
    // reloads run on this thread's own runtime.
    let runtimes = Workers::start(loaded.config.server.workers)
        .and_then(|w| Ok((w, tokio::runtime::Builder::new_current_thread().enable_all().build()?)));
    let (workers, runtime) = match runtimes {
        Ok(pair) => pair,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(app::run(loaded, source, log, workers)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// `--check --diff URL`: the diff on stdout (nothing when the same), one line on stderr;
/// 2 when the running balancer cannot be asked.
fn print_diff(source: &ConfigSource, loaded: &Loaded, url: &str) -> ExitCode {
    let running = match balancer::diff::fetch_running(url) {
        Ok(text) => text,
        Err(e) => {
            eprintln!("error: cannot read the running config: {e}");
            return ExitCode::from(2);
        }
    };
    let file = if source.path.exists() { source.path.display().to_string() } else { "(no config file)".into() };
    let diff = balancer::diff::unified(&running, &loaded.config.effective_toml, &format!("running ({url})"), &file);
    print!("{diff}");
    if diff.is_empty() {
        eprintln!("config ok: {file}; the same as the running config");
    } else {
        eprintln!("config ok: {file}; differs from the running config as shown");
    }
    ExitCode::SUCCESS
}

fn print_summary(source: &ConfigSource, loaded: &Loaded) {
    let c = &loaded.config;
    let file = if source.path.exists() { source.path.display().to_string() } else { "(no config file)".into() };
    println!("config ok: {file}");
    let listen: Vec<String> = c.server.listen.iter().map(ToString::to_string).collect();
    println!("  listen: {}", listen.join(", "));
    println!("  admin: {}", c.admin.map_or("off".to_owned(), |a| a.to_string()));
    for up in &c.upstreams {
        let backends: Vec<String> = up.backends.iter().map(|b| format!("{} (weight {})", b.url, b.weight)).collect();
        println!("  upstream {} ({}): {}", up.name, up.strategy, backends.join(", "));
    }
    for r in &c.routes {
        let host = r.host.as_ref().map_or("*".to_owned(), |h| h.to_string());
        println!("  route host={host} path_prefix={} -> {}", r.path_prefix, r.upstream);
    }
    if c.routes.is_empty() {
        println!("  routes: none (every request goes to the only upstream)");
    }
    for (name, rl) in &c.rate_limits {
        let shared = if rl.shared { ", shared" } else { "" };
        println!("  rate limit {name}: {} per {:?}, burst {}{shared}", rl.rate, rl.per, rl.burst);
    }
    if let Some(store) = &c.limit_store {
        // Checked, not connected: the store need not be up for --check.
        println!("  limit store: {} (on_error {:?})", config::hide_password(&store.url), store.on_error);
    }
}
