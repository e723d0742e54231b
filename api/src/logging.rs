//! How both binaries log: text for people, with colour only on a terminal (`kubectl logs` shows
//! escape codes as they are), or one JSON object a line for log collectors. `RUST_LOG` picks what
//! is logged (`info` by default).

use std::io::IsTerminal;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The logging flag both binaries take (flattened into their command lines, for every
/// subcommand too).
#[derive(Clone, Debug, clap::Args)]
pub struct LogArgs {
    /// `text` (colour only on a terminal) or `json` (one object a line, for log collectors).
    #[arg(
        long,
        env = "OUTRIGGER_LOG_FORMAT",
        value_enum,
        default_value_t,
        global = true
    )]
    pub log_format: LogFormat,
}

/// Installs the process's logger, writing to standard output.
pub fn init(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logger = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => logger.with_ansi(std::io::stdout().is_terminal()).init(),
        LogFormat::Json => logger.json().init(),
    }
}
