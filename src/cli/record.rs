//! `shell --record FILE`: an asciicast v2 transcript of what the terminal showed.
//!
//! The session itself runs unchanged in a child process (this binary, the same argv less
//! `--record FILE`) on a pseudo-terminal of ours, as `script(1)` and asciinema do: what
//! the child writes to the pty goes to our stdout and, as `[seconds, "o", text]` events,
//! to FILE; our stdin goes to the pty, window-size changes too (as `"r"` events). The
//! exit status is the child's. Input is not recorded (passwords typed are not kept).

#[cfg(not(unix))]
pub fn record(_file: &std::path::Path, _target: &str) -> Result<u8, super::Failure> {
    Err(super::Failure::usage("--record needs a Unix terminal"))
}

/// argv without `--record FILE` / `--record=FILE`.
#[cfg_attr(not(unix), allow(dead_code))]
fn child_args(args: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut skip = false;
    for a in args {
        if skip {
            skip = false;
        } else if a == "--record" {
            skip = true;
        } else if !a.starts_with("--record=") {
            out.push(a.clone());
        }
    }
    out
}

/// Splits `pending` into the longest valid UTF-8 prefix (invalid bytes replaced) and an
/// incomplete trailing sequence kept for the next read.
#[cfg_attr(not(unix), allow(dead_code))]
fn take_text(pending: &mut Vec<u8>) -> String {
    let keep = match std::str::from_utf8(pending) {
        Ok(_) => 0,
        Err(e) if e.error_len().is_none() => pending.len() - e.valid_up_to(),
        Err(_) => 0,
    };
    let tail = pending.split_off(pending.len() - keep);
    let text = String::from_utf8_lossy(pending).into_owned();
    *pending = tail;
    text
}

#[cfg(unix)]
pub use unix::record;

#[cfg(unix)]
mod unix {
    use std::fs::File;
    use std::io::{Read, Write};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::process::CommandExt;
    use std::path::Path;
    use std::process::{Command, Stdio};
    use std::sync::{Arc, Mutex};
    use std::time::{Instant, SystemTime, UNIX_EPOCH};

    use serde_json::json;

    use super::{child_args, take_text};
    use crate::cli::Failure;
    use crate::terminal;

    /// The transcript file and the clock its events are timed by.
    struct Cast {
        file: std::io::BufWriter<File>,
        start: Instant,
    }

    impl Cast {
        fn event(&mut self, kind: &str, data: &str) {
            let t = self.start.elapsed().as_secs_f64();
            let line = json!([(t * 1e6).round() / 1e6, kind, data]);
            let _ = writeln!(self.file, "{line}");
        }
    }

    fn lock(c: &Mutex<Cast>) -> std::sync::MutexGuard<'_, Cast> {
        c.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_winsize(fd: i32, cols: u32, rows: u32) {
        let ws = libc::winsize {
            ws_row: rows.min(u16::MAX as u32) as u16,
            ws_col: cols.min(u16::MAX as u32) as u16,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one `winsize` through a valid pointer.
        unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) };
    }

    pub fn record(path: &Path, target: &str) -> Result<u8, Failure> {
        let file = File::create(path)
            .map_err(|e| Failure::usage(format!("--record {}: {e}", path.display())))?;
        let (cols, rows) = terminal::size_or_fallback();
        let mut master: libc::c_int = -1;
        let mut slave: libc::c_int = -1;
        // SAFETY: openpty writes two descriptors through valid pointers; name, termios and
        // winsize may be null.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        };
        if rc != 0 {
            return Err(Failure::failed(format!(
                "--record: cannot open a pseudo-terminal: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: both descriptors were just returned by openpty and are owned here.
        let (master, slave) =
            unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        set_winsize(master.as_raw_fd(), cols, rows);

        let args: Vec<String> = std::env::args().collect();
        let exe = std::env::current_exe()
            .map_err(|e| Failure::failed(format!("--record: cannot find this program: {e}")))?;
        let stdio = |fd: &OwnedFd| -> Result<Stdio, Failure> {
            fd.try_clone()
                .map(Stdio::from)
                .map_err(|e| Failure::failed(format!("--record: {e}")))
        };
        let mut cmd = Command::new(exe);
        cmd.args(child_args(&args[1..]))
            .stdin(stdio(&slave)?)
            .stdout(stdio(&slave)?)
            .stderr(stdio(&slave)?);
        // SAFETY: only async-signal-safe calls between fork and exec: a new session with
        // the pty (fd 0 by now) as its controlling terminal.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| Failure::failed(format!("--record: cannot start the session: {e}")))?;
        // Only the child holds the slave now (the Command kept copies for the child's
        // stdio): its exit gives us EIO on the master.
        drop(cmd);
        drop(slave);

        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let header = json!({
            "version": 2,
            "width": cols,
            "height": rows,
            "timestamp": timestamp,
            "title": format!("session-manager-plugin shell {target}"),
            "env": {
                "TERM": std::env::var("TERM").unwrap_or_default(),
                "SHELL": std::env::var("SHELL").unwrap_or_default(),
            },
        });
        let mut file = std::io::BufWriter::new(file);
        writeln!(file, "{header}")
            .map_err(|e| Failure::failed(format!("--record {}: {e}", path.display())))?;
        let cast = Arc::new(Mutex::new(Cast {
            file,
            start: Instant::now(),
        }));

        let raw = terminal::RawModeGuard::stdin().ok().flatten();
        let master_fd = master.as_raw_fd();
        let mut to_pty = File::from(
            master
                .try_clone()
                .map_err(|e| Failure::failed(format!("--record: {e}")))?,
        );
        std::thread::spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = [0u8; 4096];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if to_pty.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        spawn_resize_watcher(master_fd, cast.clone(), (cols, rows));

        let mut from_pty = File::from(master);
        let mut out = std::io::stdout();
        let mut buf = [0u8; 16 * 1024];
        let mut pending = Vec::new();
        loop {
            match from_pty.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let _ = out.write_all(&buf[..n]);
                    let _ = out.flush();
                    pending.extend_from_slice(&buf[..n]);
                    let text = take_text(&mut pending);
                    if !text.is_empty() {
                        lock(&cast).event("o", &text);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // EIO: the child and everything it started have closed the terminal.
                Err(_) => break,
            }
        }
        if !pending.is_empty() {
            let text = String::from_utf8_lossy(&pending).into_owned();
            lock(&cast).event("o", &text);
        }
        let _ = lock(&cast).file.flush();
        drop(raw);
        let status = child
            .wait()
            .map_err(|e| Failure::failed(format!("--record: {e}")))?;
        Ok(status
            .code()
            .map(|c| c as u8)
            .unwrap_or(crate::exit::SESSION_FAILED))
    }

    /// Forwards window-size changes (SIGWINCH) to the pty and records them.
    fn spawn_resize_watcher(master: i32, cast: Arc<Mutex<Cast>>, mut last: (u32, u32)) {
        std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                use tokio::signal::unix::{signal, SignalKind};
                let Ok(mut winch) = signal(SignalKind::window_change()) else {
                    return;
                };
                while winch.recv().await.is_some() {
                    let Some(now) = terminal::size() else {
                        continue;
                    };
                    if now != last {
                        last = now;
                        set_winsize(master, now.0, now.1);
                        lock(&cast).event("r", &format!("{}x{}", now.0, now.1));
                    }
                }
            });
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_and_text() {
        let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            child_args(&a(&["shell", "web", "--record", "x.cast", "--region", "r"])),
            a(&["shell", "web", "--region", "r"])
        );
        assert_eq!(
            child_args(&a(&["shell", "--record=x", "web"])),
            a(&["shell", "web"])
        );
        let mut p = "é".as_bytes()[..1].to_vec();
        assert_eq!(take_text(&mut p), "");
        p.push("é".as_bytes()[1]);
        p.extend_from_slice(b"a");
        assert_eq!(take_text(&mut p), "éa");
        assert!(p.is_empty());
        let mut bad = vec![0xff, b'x'];
        assert_eq!(take_text(&mut bad), "\u{fffd}x");
    }
}
