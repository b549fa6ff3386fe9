//! Diagnostic logging to a file, the way a packaged tool does it.
//!
//! The official plugin logs through seelog, configured by `seelog.xml` next to its install
//! directory, **off by default**, and never to the terminal. We keep those facts and replace
//! the XML with two environment variables and a small `key = value` file.
//!
//! # Turning it on
//!
//! | Source | Meaning |
//! | --- | --- |
//! | `SSM_PLUGIN_LOG=<level>` | `off`, `error`, `warn`, `info`, `debug` or `trace` (case-insensitive; `warning` is accepted for `warn`). Overrides the file. |
//! | `SSM_PLUGIN_LOG_FILE=<path>` | log file to write; overrides the file's `file`. Does not by itself enable logging. |
//! | `<exe dir>/../session-manager-plugin.conf` | config file of an installed plugin (`/usr/local/sessionmanagerplugin/session-manager-plugin.conf`, `%ProgramFiles%\Amazon\SessionManagerPlugin\session-manager-plugin.conf`) |
//! | `<exe dir>/session-manager-plugin.conf` | config file next to the binary, used when the one above does not exist |
//!
//! Only the first config file that exists is read. Its format is one `key = value` per line;
//! blank lines and lines starting with `#` or `;` are ignored; values may be quoted:
//!
//! ```text
//! # session-manager-plugin.conf
//! level = debug
//! file = /tmp/ssm-plugin.log     # relative paths are relative to this file's directory
//! ```
//!
//! Unknown keys and bad values are reported as warnings *in the log* (there is nowhere else to
//! report them: stdout is the user's data stream, stderr is the user's terminal) and ignored.
//!
//! # Where the log goes
//!
//! The first of these that can be opened for appending:
//!
//! 1. `SSM_PLUGIN_LOG_FILE`, else the config file's `file` (parent directories are created);
//! 2. the official log directory, only when it already exists and is writable:
//!    `/usr/local/sessionmanagerplugin/logs/session-manager-plugin.log` on Linux and macOS,
//!    `%ProgramFiles%\Amazon\SessionManagerPlugin\Logs\session-manager-plugin.log` on Windows
//!    (the packages create that directory; it is writable by root/Administrators only);
//! 3. a per-user directory (created on demand): `$XDG_STATE_HOME/session-manager-plugin/` or
//!    `~/.local/state/session-manager-plugin/` on Linux and other Unix,
//!    `~/Library/Logs/session-manager-plugin/` on macOS,
//!    `%LOCALAPPDATA%\session-manager-plugin\Logs\` on Windows.
//!
//! If nothing can be opened, the plugin runs without logging. Log files are created with mode
//! `0600` on Unix. Several plugin processes may append to one file; every line carries the
//! process id.
//!
//! # What must never be logged
//!
//! **Never log the session token (`TokenValue`), the StartSession response JSON or the value of
//! the `AWS_SSM_START_SESSION_RESPONSE*` variable, argv (argv\[1\] holds the token in the
//! non-env-var form), KMS data keys or any key material, credentials, or data payloads
//! (terminal bytes, tunnelled TCP or SSH bytes).** Log their sizes, sequence numbers, message and
//! payload types, session ids, stream URLs without their query strings, and error texts. This
//! module cannot enforce the rule; every `tracing` call site in the crate must follow it.
//!
//! # Not here
//!
//! Nothing is written to stdout or stderr from this module. `log`-crate records (rustls,
//! tungstenite) are not bridged: the `tracing-log` feature is left off to keep the build lean.

use std::ffi::OsString;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};

/// Environment variable selecting the log level.
pub const ENV_LEVEL: &str = "SSM_PLUGIN_LOG";
/// Environment variable selecting the log file.
pub const ENV_FILE: &str = "SSM_PLUGIN_LOG_FILE";
/// Name of the config file, looked up relative to the executable.
pub const CONFIG_FILE_NAME: &str = "session-manager-plugin.conf";
/// Name of the log file in the default directories.
pub const LOG_FILE_NAME: &str = "session-manager-plugin.log";

/// Install directory of the official packages on Linux and macOS.
const UNIX_INSTALL_DIR: &str = "/usr/local/sessionmanagerplugin";
/// Directory name used under the per-user state/log directories.
const USER_DIR_NAME: &str = "session-manager-plugin";
/// Longest slice of a bad value quoted back in a warning.
const MAX_QUOTED: usize = 40;

/// Keeps logging alive; hold it until `main` returns. Dropping it writes a last line.
///
/// Every event is written to the file as one `write` call, unbuffered, so nothing is lost when
/// the process ends through `std::process::exit` without dropping the guard.
#[derive(Debug)]
pub struct LogGuard {
    _private: (),
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        tracing::debug!("log closed");
    }
}

/// Sets up logging from the environment and the config file. Returns `None` when logging is
/// off (the default), when no log file can be opened, or when a global subscriber already
/// exists. Never prints anything. Call it once, early in `main`, before threads are spawned.
pub fn init() -> Option<LogGuard> {
    let exe = current_exe();
    let settings = resolve(
        &|name| std::env::var_os(name),
        exe.as_deref(),
        &read_config,
        Platform::CURRENT,
    );
    if settings.level == LevelFilter::OFF {
        return None;
    }
    let mut failures = Vec::new();
    let mut opened = None;
    for target in &settings.targets {
        match open_log(&target.path, target.create_dirs()) {
            Ok(file) => {
                opened = Some((file, target));
                break;
            }
            Err(e) => failures.push((target, e)),
        }
    }
    let (file, target) = opened?;
    let subscriber = tracing_subscriber::fmt()
        .with_writer(Mutex::new(file))
        .with_ansi(false)
        .with_timer(TimeAndPid)
        .with_target(true)
        .with_max_level(settings.level)
        .finish();
    tracing::subscriber::set_global_default(subscriber).ok()?;

    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        level = %settings.level,
        level_from = %settings.level_source,
        file = %target.path.display(),
        config = %settings.config_path.as_deref().map_or_else(|| "none".into(), |p| p.display().to_string()),
        "session-manager-plugin log opened"
    );
    for warning in &settings.warnings {
        tracing::warn!("logging configuration: {warning}");
    }
    for (failed, e) in failures {
        let path = failed.path.display();
        match failed.kind {
            // Expected whenever the plugin is not installed by a package, or runs unprivileged.
            TargetKind::Official => tracing::debug!("not logging to {path}: {e}"),
            TargetKind::Explicit | TargetKind::User => {
                tracing::warn!("cannot open log file {path}: {e}")
            }
        }
    }
    Some(LogGuard { _private: () })
}

/// The running executable with symlinks resolved (`/usr/local/bin/session-manager-plugin` is a
/// symlink into the install directory, and the config file lives next to the real binary).
fn current_exe() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    if cfg!(windows) {
        // canonicalize() yields `\\?\` verbatim paths on Windows; current_exe is already real.
        Some(exe)
    } else {
        Some(std::fs::canonicalize(&exe).unwrap_or(exe))
    }
}

fn read_config(path: &Path) -> Option<String> {
    let bytes = std::fs::read(path).ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

fn open_log(path: &Path, create_dirs: bool) -> io::Result<File> {
    if create_dirs {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
    }
    let mut options = OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path)
}

/// RFC 3339 UTC timestamp followed by `[pid]`, so lines of concurrent processes can be told apart.
struct TimeAndPid;

impl FormatTime for TimeAndPid {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        SystemTime.format_time(w)?;
        write!(w, " [{}]", std::process::id())
    }
}

/// Which platform's default paths to use. A parameter (not only a `cfg`) so every platform's
/// resolution is unit-tested on every host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Platform {
    /// Linux and other Unix systems except macOS.
    Unix,
    MacOs,
    Windows,
}

impl Platform {
    pub(crate) const CURRENT: Platform = if cfg!(windows) {
        Platform::Windows
    } else if cfg!(target_os = "macos") {
        Platform::MacOs
    } else {
        Platform::Unix
    };
}

/// A place the log may be written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct LogTarget {
    pub(crate) path: PathBuf,
    pub(crate) kind: TargetKind,
}

/// Why a [`LogTarget`] is a candidate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TargetKind {
    /// Named by `SSM_PLUGIN_LOG_FILE` or the config file's `file`.
    Explicit,
    /// The official packages' log directory; used only if it already exists.
    Official,
    /// The per-user fallback directory.
    User,
}

impl LogTarget {
    /// Missing parent directories are created, except the official directory's: only the
    /// package creates that one.
    fn create_dirs(&self) -> bool {
        self.kind != TargetKind::Official
    }
}

/// The outcome of [`resolve`]: everything `init` needs, decided without touching the disk.
#[derive(Debug)]
pub(crate) struct Settings {
    pub(crate) level: LevelFilter,
    /// Where the level came from, for the first log line.
    pub(crate) level_source: String,
    /// The config file that was read, if any.
    pub(crate) config_path: Option<PathBuf>,
    /// Candidates in order; the first that opens wins. Empty when logging is off.
    pub(crate) targets: Vec<LogTarget>,
    /// Problems found in the configuration, written to the log once it is open.
    pub(crate) warnings: Vec<String>,
}

/// Settings read from the config file.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct FileConfig {
    pub(crate) level: Option<LevelFilter>,
    pub(crate) file: Option<PathBuf>,
}

/// Decides the logging settings from the environment (`env`), the executable's path and the
/// config file contents (`read_config` returns a file's text, `None` when it does not exist).
/// Pure apart from what the two closures do.
pub(crate) fn resolve(
    env: &dyn Fn(&str) -> Option<OsString>,
    exe: Option<&Path>,
    read_config: &dyn Fn(&Path) -> Option<String>,
    platform: Platform,
) -> Settings {
    let mut warnings = Vec::new();

    let mut config_path = None;
    let mut file_config = FileConfig::default();
    for candidate in exe.map(config_candidates).unwrap_or_default() {
        if let Some(text) = read_config(&candidate) {
            file_config = parse_config(&text, &mut warnings);
            config_path = Some(candidate);
            break;
        }
    }

    let env_level = env(ENV_LEVEL).filter(|v| !v.is_empty());
    let mut level = None;
    let mut level_source = String::from("default");
    if let Some(value) = env_level {
        match parse_level(&value.to_string_lossy()) {
            Some(l) => {
                level = Some(l);
                level_source = ENV_LEVEL.to_string();
            }
            None => warnings.push(format!(
                "{ENV_LEVEL}={}: not a level (off, error, warn, info, debug, trace); ignored",
                quote(&value.to_string_lossy())
            )),
        }
    }
    if level.is_none() {
        if let (Some(l), Some(path)) = (file_config.level, &config_path) {
            level = Some(l);
            level_source = path.display().to_string();
        }
    }
    let level = level.unwrap_or(LevelFilter::OFF);
    if level == LevelFilter::OFF {
        return Settings {
            level,
            level_source,
            config_path,
            targets: Vec::new(),
            warnings,
        };
    }

    let mut targets = Vec::new();
    let explicit = env(ENV_FILE)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            // A relative `file` in the config file is relative to the config file.
            let file = file_config.file.as_ref()?;
            let base = config_path.as_deref().and_then(Path::parent);
            Some(base.map_or_else(|| file.clone(), |b| b.join(file)))
        });
    if let Some(path) = explicit {
        targets.push(LogTarget {
            path,
            kind: TargetKind::Explicit,
        });
    }
    if let Some(dir) = official_log_dir(env, platform) {
        targets.push(LogTarget {
            path: dir.join(LOG_FILE_NAME),
            kind: TargetKind::Official,
        });
    }
    if let Some(dir) = user_log_dir(env, platform) {
        targets.push(LogTarget {
            path: dir.join(LOG_FILE_NAME),
            kind: TargetKind::User,
        });
    }
    Settings {
        level,
        level_source,
        config_path,
        targets,
        warnings,
    }
}

/// Config file locations for an executable, in lookup order.
pub(crate) fn config_candidates(exe: &Path) -> Vec<PathBuf> {
    let Some(dir) = exe.parent() else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(2);
    if let Some(install_root) = dir.parent() {
        out.push(install_root.join(CONFIG_FILE_NAME));
    }
    out.push(dir.join(CONFIG_FILE_NAME));
    out
}

/// Parses the `key = value` config format. Problems are appended to `warnings`.
pub(crate) fn parse_config(text: &str, warnings: &mut Vec<String>) -> FileConfig {
    let mut config = FileConfig::default();
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    for (index, raw) in text.lines().enumerate() {
        let line_no = index + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            warnings.push(format!(
                "config line {line_no}: expected `key = value`, found {}",
                quote(line)
            ));
            continue;
        };
        let key = key.trim().to_ascii_lowercase();
        let value = unquote(strip_trailing_comment(value.trim()));
        match key.as_str() {
            "level" => match parse_level(value) {
                Some(l) => config.level = Some(l),
                None => warnings.push(format!(
                    "config line {line_no}: level {}: not a level (off, error, warn, info, debug, trace)",
                    quote(value)
                )),
            },
            "file" => config.file = (!value.is_empty()).then(|| PathBuf::from(value)),
            _ => warnings.push(format!(
                "config line {line_no}: unknown key {} (known: level, file)",
                quote(&key)
            )),
        }
    }
    config
}

/// `off|error|warn|info|debug|trace`, case-insensitive; `warning` means `warn`.
pub(crate) fn parse_level(value: &str) -> Option<LevelFilter> {
    Some(match value.trim().to_ascii_lowercase().as_str() {
        "off" | "none" => LevelFilter::OFF,
        "error" => LevelFilter::ERROR,
        "warn" | "warning" => LevelFilter::WARN,
        "info" => LevelFilter::INFO,
        "debug" => LevelFilter::DEBUG,
        "trace" => LevelFilter::TRACE,
        _ => return None,
    })
}

/// ` # comment` after a value; a `#` not preceded by whitespace is part of the value.
fn strip_trailing_comment(value: &str) -> &str {
    if value.starts_with('"') || value.starts_with('\'') {
        // Quoted values: cut after the closing quote only.
        let quote_char = &value[..1];
        if let Some(end) = value[1..].find(quote_char) {
            return &value[..end + 2];
        }
        return value;
    }
    match value.find(" #").or_else(|| value.find("\t#")) {
        Some(i) => value[..i].trim_end(),
        None => value,
    }
}

fn unquote(value: &str) -> &str {
    for q in ['"', '\''] {
        if let Some(inner) = value.strip_prefix(q).and_then(|rest| rest.strip_suffix(q)) {
            return inner;
        }
    }
    value
}

/// Quotes a user-supplied value for a warning, shortened.
fn quote(value: &str) -> String {
    let short: String = value.chars().take(MAX_QUOTED).collect();
    if short.len() < value.len() {
        format!("{short:?}…")
    } else {
        format!("{short:?}")
    }
}

/// The official packages' log directory.
fn official_log_dir(env: &dyn Fn(&str) -> Option<OsString>, platform: Platform) -> Option<PathBuf> {
    match platform {
        Platform::Unix | Platform::MacOs => Some(Path::new(UNIX_INSTALL_DIR).join("logs")),
        Platform::Windows => {
            let program_files = env("ProgramFiles")
                .filter(|v| !v.is_empty())
                .map_or_else(|| PathBuf::from(r"C:\Program Files"), PathBuf::from);
            Some(
                program_files
                    .join("Amazon")
                    .join("SessionManagerPlugin")
                    .join("Logs"),
            )
        }
    }
}

/// The per-user fallback directory; `None` when the environment names no home.
fn user_log_dir(env: &dyn Fn(&str) -> Option<OsString>, platform: Platform) -> Option<PathBuf> {
    let absolute = |name: &str| {
        env(name)
            .map(PathBuf::from)
            .filter(|p| is_absolute_for(p, platform))
    };
    match platform {
        Platform::Unix => absolute("XDG_STATE_HOME")
            .or_else(|| absolute("HOME").map(|h| h.join(".local").join("state")))
            .map(|d| d.join(USER_DIR_NAME)),
        Platform::MacOs => {
            absolute("HOME").map(|h| h.join("Library").join("Logs").join(USER_DIR_NAME))
        }
        Platform::Windows => absolute("LOCALAPPDATA").map(|d| d.join(USER_DIR_NAME).join("Logs")),
    }
}

/// `Path::is_absolute` for the *target* platform (tests resolve Windows paths on Unix hosts).
fn is_absolute_for(path: &Path, platform: Platform) -> bool {
    match platform {
        Platform::Windows => {
            let s = path.to_string_lossy();
            let b = s.as_bytes();
            (b.len() >= 3
                && b[0].is_ascii_alphabetic()
                && b[1] == b':'
                && matches!(b[2], b'\\' | b'/'))
                || s.starts_with(r"\\")
        }
        Platform::Unix | Platform::MacOs => path.to_string_lossy().starts_with('/'),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let map: HashMap<String, OsString> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        move |name| map.get(name).cloned()
    }

    fn files_of(pairs: &[(&str, &str)]) -> impl Fn(&Path) -> Option<String> {
        let map: HashMap<PathBuf, String> = pairs
            .iter()
            .map(|(k, v)| (PathBuf::from(k), v.to_string()))
            .collect();
        move |path| map.get(path).cloned()
    }

    const EXE: &str = "/usr/local/sessionmanagerplugin/bin/session-manager-plugin";
    const INSTALLED_CONF: &str = "/usr/local/sessionmanagerplugin/session-manager-plugin.conf";
    const OFFICIAL_LOG: &str = "/usr/local/sessionmanagerplugin/logs/session-manager-plugin.log";

    fn paths(s: &Settings) -> Vec<(String, TargetKind)> {
        s.targets
            .iter()
            .map(|t| (t.path.to_string_lossy().into_owned(), t.kind))
            .collect()
    }

    #[test]
    fn off_by_default() {
        let s = resolve(
            &env_of(&[("HOME", "/home/u")]),
            Some(Path::new(EXE)),
            &files_of(&[]),
            Platform::Unix,
        );
        assert_eq!(s.level, LevelFilter::OFF);
        assert!(s.targets.is_empty());
        assert!(s.warnings.is_empty());
        assert_eq!(s.config_path, None);
    }

    #[test]
    fn log_file_alone_does_not_enable() {
        let s = resolve(
            &env_of(&[(ENV_FILE, "/tmp/x.log")]),
            Some(Path::new(EXE)),
            &files_of(&[]),
            Platform::Unix,
        );
        assert_eq!(s.level, LevelFilter::OFF);
        assert!(s.targets.is_empty());
    }

    #[test]
    fn env_level_uses_official_then_user_dir() {
        let s = resolve(
            &env_of(&[(ENV_LEVEL, "DEBUG"), ("HOME", "/home/u")]),
            Some(Path::new(EXE)),
            &files_of(&[]),
            Platform::Unix,
        );
        assert_eq!(s.level, LevelFilter::DEBUG);
        assert_eq!(s.level_source, ENV_LEVEL);
        assert_eq!(
            paths(&s),
            vec![
                (OFFICIAL_LOG.to_string(), TargetKind::Official),
                (
                    "/home/u/.local/state/session-manager-plugin/session-manager-plugin.log"
                        .to_string(),
                    TargetKind::User
                ),
            ]
        );
    }

    #[test]
    fn xdg_state_home_wins_over_home_when_absolute() {
        let env = env_of(&[
            (ENV_LEVEL, "info"),
            ("HOME", "/h"),
            ("XDG_STATE_HOME", "/st"),
        ]);
        let s = resolve(&env, None, &files_of(&[]), Platform::Unix);
        assert_eq!(
            s.targets[1].path,
            Path::new("/st/session-manager-plugin/session-manager-plugin.log")
        );
        // A relative XDG_STATE_HOME is invalid per the spec and ignored.
        let env = env_of(&[
            (ENV_LEVEL, "info"),
            ("HOME", "/h"),
            ("XDG_STATE_HOME", "st"),
        ]);
        let s = resolve(&env, None, &files_of(&[]), Platform::Unix);
        assert_eq!(
            s.targets[1].path,
            Path::new("/h/.local/state/session-manager-plugin/session-manager-plugin.log")
        );
    }

    #[test]
    fn no_home_leaves_only_official_dir() {
        let s = resolve(
            &env_of(&[(ENV_LEVEL, "warn")]),
            None,
            &files_of(&[]),
            Platform::Unix,
        );
        assert_eq!(
            paths(&s),
            vec![(OFFICIAL_LOG.to_string(), TargetKind::Official)]
        );
    }

    #[test]
    fn installed_config_file_enables_and_sets_file() {
        let s = resolve(
            &env_of(&[("HOME", "/home/u")]),
            Some(Path::new(EXE)),
            &files_of(&[(
                INSTALLED_CONF,
                "# comment\nlevel = trace\nfile = custom/p.log\n",
            )]),
            Platform::Unix,
        );
        assert_eq!(s.level, LevelFilter::TRACE);
        assert_eq!(s.level_source, INSTALLED_CONF);
        assert_eq!(s.config_path.as_deref(), Some(Path::new(INSTALLED_CONF)));
        assert_eq!(
            s.targets[0],
            LogTarget {
                path: PathBuf::from("/usr/local/sessionmanagerplugin/custom/p.log"),
                kind: TargetKind::Explicit
            }
        );
        assert_eq!(s.targets[1].path, Path::new(OFFICIAL_LOG));
        assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    }

    #[test]
    fn config_next_to_exe_is_second_choice() {
        let exe = "/opt/x/bin/session-manager-plugin";
        let both = files_of(&[
            ("/opt/x/session-manager-plugin.conf", "level = error"),
            ("/opt/x/bin/session-manager-plugin.conf", "level = trace"),
        ]);
        let s = resolve(&env_of(&[]), Some(Path::new(exe)), &both, Platform::Unix);
        assert_eq!(s.level, LevelFilter::ERROR);
        let only_next = files_of(&[("/opt/x/bin/session-manager-plugin.conf", "level = trace")]);
        let s = resolve(
            &env_of(&[]),
            Some(Path::new(exe)),
            &only_next,
            Platform::Unix,
        );
        assert_eq!(s.level, LevelFilter::TRACE);
        assert_eq!(
            s.config_path.as_deref(),
            Some(Path::new("/opt/x/bin/session-manager-plugin.conf"))
        );
    }

    #[test]
    fn env_overrides_config() {
        let files = files_of(&[(INSTALLED_CONF, "level = debug\nfile = /var/a.log")]);
        let env = env_of(&[(ENV_LEVEL, "off")]);
        let s = resolve(&env, Some(Path::new(EXE)), &files, Platform::Unix);
        assert_eq!(s.level, LevelFilter::OFF);
        assert!(s.targets.is_empty());

        let env = env_of(&[(ENV_LEVEL, "info"), (ENV_FILE, "rel.log")]);
        let s = resolve(&env, Some(Path::new(EXE)), &files, Platform::Unix);
        assert_eq!(s.level, LevelFilter::INFO);
        assert_eq!(s.targets[0].path, Path::new("rel.log"));
    }

    #[test]
    fn bad_env_level_falls_back_to_config_and_warns() {
        let files = files_of(&[(INSTALLED_CONF, "level = warn")]);
        let env = env_of(&[(ENV_LEVEL, "verbose")]);
        let s = resolve(&env, Some(Path::new(EXE)), &files, Platform::Unix);
        assert_eq!(s.level, LevelFilter::WARN);
        assert_eq!(s.warnings.len(), 1);
        assert!(s.warnings[0].contains("\"verbose\""), "{:?}", s.warnings);
    }

    #[test]
    fn empty_env_values_are_unset() {
        let files = files_of(&[(INSTALLED_CONF, "level = info\nfile = /x.log")]);
        let env = env_of(&[(ENV_LEVEL, ""), (ENV_FILE, "")]);
        let s = resolve(&env, Some(Path::new(EXE)), &files, Platform::Unix);
        assert_eq!(s.level, LevelFilter::INFO);
        assert_eq!(s.targets[0].path, Path::new("/x.log"));
    }

    #[test]
    fn macos_paths() {
        let env = env_of(&[(ENV_LEVEL, "debug"), ("HOME", "/Users/u")]);
        let s = resolve(&env, None, &files_of(&[]), Platform::MacOs);
        assert_eq!(
            paths(&s),
            vec![
                (OFFICIAL_LOG.to_string(), TargetKind::Official),
                (
                    "/Users/u/Library/Logs/session-manager-plugin/session-manager-plugin.log"
                        .to_string(),
                    TargetKind::User
                ),
            ]
        );
    }

    #[test]
    fn windows_paths() {
        let env = env_of(&[
            (ENV_LEVEL, "debug"),
            ("ProgramFiles", r"D:\Programs"),
            ("LOCALAPPDATA", r"C:\Users\u\AppData\Local"),
        ]);
        let s = resolve(&env, None, &files_of(&[]), Platform::Windows);
        let expected_official = PathBuf::from(r"D:\Programs")
            .join("Amazon")
            .join("SessionManagerPlugin")
            .join("Logs")
            .join(LOG_FILE_NAME);
        let expected_user = PathBuf::from(r"C:\Users\u\AppData\Local")
            .join("session-manager-plugin")
            .join("Logs")
            .join(LOG_FILE_NAME);
        assert_eq!(s.targets.len(), 2);
        assert_eq!(s.targets[0].path, expected_official);
        assert!(!s.targets[0].create_dirs());
        assert!(s.targets[1].create_dirs());
        assert_eq!(s.targets[1].path, expected_user);

        // Without ProgramFiles the default is used; a relative LOCALAPPDATA is ignored.
        let env = env_of(&[(ENV_LEVEL, "debug"), ("LOCALAPPDATA", "relative")]);
        let s = resolve(&env, None, &files_of(&[]), Platform::Windows);
        assert_eq!(s.targets.len(), 1);
        assert!(s.targets[0]
            .path
            .to_string_lossy()
            .starts_with(r"C:\Program Files"));
    }

    #[test]
    fn config_candidates_order() {
        assert_eq!(
            config_candidates(Path::new(EXE)),
            vec![
                PathBuf::from(INSTALLED_CONF),
                PathBuf::from("/usr/local/sessionmanagerplugin/bin/session-manager-plugin.conf"),
            ]
        );
        assert_eq!(
            config_candidates(Path::new("/spm")),
            vec![PathBuf::from("/session-manager-plugin.conf")]
        );
        assert!(config_candidates(Path::new("")).is_empty());
    }

    #[test]
    fn parse_config_syntax() {
        let mut w = Vec::new();
        let text = "\u{feff}; ini comment\r\n\
                    # hash comment\n\
                    \n\
                    LEVEL = \"Debug\"   \n\
                    file='/a b/c.log' # trailing\n\
                    color = yes\n\
                    garbage\n\
                    level = loud\n";
        let c = parse_config(text, &mut w);
        assert_eq!(c.level, Some(LevelFilter::DEBUG)); // "loud" ignored, previous kept
        assert_eq!(c.file, Some(PathBuf::from("/a b/c.log")));
        assert_eq!(w.len(), 3, "{w:?}");
        assert!(
            w[0].starts_with("config line 6: unknown key \"color\""),
            "{w:?}"
        );
        assert!(w[1].starts_with("config line 7: expected"), "{w:?}");
        assert!(w[2].starts_with("config line 8: level \"loud\""), "{w:?}");
    }

    #[test]
    fn parse_config_values() {
        let mut w = Vec::new();
        let c = parse_config("file = /x#y.log\nfile2=\n", &mut w);
        assert_eq!(c.file, Some(PathBuf::from("/x#y.log")));
        assert_eq!(w.len(), 1);
        let c = parse_config("level=off\nfile =\n", &mut w);
        assert_eq!(c.level, Some(LevelFilter::OFF));
        assert_eq!(c.file, None);
        let c = parse_config("file = \"unterminated\n", &mut w);
        assert_eq!(c.file, Some(PathBuf::from("\"unterminated")));
    }

    #[test]
    fn levels() {
        for (text, level) in [
            ("off", LevelFilter::OFF),
            ("ERROR", LevelFilter::ERROR),
            ("warn", LevelFilter::WARN),
            ("Warning", LevelFilter::WARN),
            (" info ", LevelFilter::INFO),
            ("debug", LevelFilter::DEBUG),
            ("trace", LevelFilter::TRACE),
        ] {
            assert_eq!(parse_level(text), Some(level), "{text}");
        }
        assert_eq!(parse_level("5"), None);
        assert_eq!(parse_level(""), None);
    }

    #[test]
    fn long_bad_values_are_shortened() {
        let mut w = Vec::new();
        let long = "x".repeat(500);
        parse_config(&format!("level = {long}"), &mut w);
        assert!(w[0].len() < 150, "{}", w[0]);
        assert!(w[0].ends_with("(off, error, warn, info, debug, trace)"));
    }

    #[test]
    fn open_log_creates_dirs_and_appends() {
        let base = std::env::temp_dir().join(format!(
            "spm-logging-test-{}-{}",
            std::process::id(),
            line!()
        ));
        let path = base.join("a").join("b.log");
        assert!(open_log(&path, false).is_err());
        {
            use std::io::Write;
            let mut f = open_log(&path, true).expect("open");
            f.write_all(b"one\n").expect("write");
            let mut f = open_log(&path, false).expect("reopen");
            f.write_all(b"two\n").expect("write");
        }
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "one\ntwo\n");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let _ = std::fs::remove_dir_all(&base);
    }
}
