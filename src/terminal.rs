//! The local terminal: raw mode for shell sessions and the window size.
//!
//! # Raw mode
//!
//! [`RawModeGuard::stdin`] switches the terminal on stdin to raw mode the way `ssh` does
//! (OpenSSH `enter_raw_mode`): no echo, no canonical line editing, no signal keys (ISIG off,
//! so Ctrl-C, Ctrl-Z and Ctrl-\ arrive as the bytes 0x03, 0x1a, 0x1c and are forwarded to
//! the remote pty, which turns them into signals there), no input CR/NL translation and no
//! output post-processing (the remote pty already sends `\r\n`). On BSD and macOS the
//! delayed-suspend character (Ctrl-Y, `dsusp`) is also disabled, the fix of official issue
//! #29. The official plugin runs `stty cbreak -echo` instead, which leaves ISIG, ICRNL and
//! IXON on; see `modes::shell` for what that changes.
//!
//! The guard restores the saved settings when dropped or when [`RawModeGuard::restore`] is
//! called (idempotent, callable through a shared reference from any task). The guard for
//! stdin also registers the saved settings for [`restore_global`], which a panic hook
//! installed on first use calls before the default hook prints the panic message, so a panic
//! anywhere in the process (even in another task) leaves a usable terminal behind. Code that
//! ends the process with `std::process::exit` (which runs no destructors) should call
//! [`restore_global`] first.
//!
//! On Windows the console input mode loses echo, line input and processed input (Ctrl-C
//! becomes a 0x03 key) and gains `ENABLE_VIRTUAL_TERMINAL_INPUT` (keys arrive as VT
//! sequences); the output mode gains `ENABLE_VIRTUAL_TERMINAL_PROCESSING`. Both modes are
//! restored the same way.
//!
//! # Window size
//!
//! [`size`] reads the size of the terminal on stdout, then stdin, then `/dev/tty` (Windows:
//! the console screen buffer of stdout, then stderr). [`size_or_fallback`] returns the
//! official plugin's 300 × 100 when none can be read.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Once};

/// (columns, rows) the official plugin sends when the size cannot be read (PROTOCOL.md §8.1).
pub const FALLBACK_SIZE: (u32, u32) = (300, 100);

/// The first candidate with both dimensions non-zero, as `(cols, rows)`.
///
/// A terminal that reports 0 × 0 (a pty nobody sized yet, some CI runners) counts as
/// unknown: sending it would give the remote shell a zero-width window.
pub fn first_usable<I>(candidates: I) -> Option<(u32, u32)>
where
    I: IntoIterator<Item = Option<(u16, u16)>>,
{
    candidates
        .into_iter()
        .flatten()
        .find(|&(c, r)| c > 0 && r > 0)
        .map(|(c, r)| (u32::from(c), u32::from(r)))
}

/// The window size as `(cols, rows)`, or `None` when no terminal reports one.
pub fn size() -> Option<(u32, u32)> {
    sys::size()
}

/// [`size`], or [`FALLBACK_SIZE`] when it is unknown.
pub fn size_or_fallback() -> (u32, u32) {
    size().unwrap_or(FALLBACK_SIZE)
}

/// Saved settings of the stdin terminal while a [`RawModeGuard::stdin`] is active; read by
/// [`restore_global`] (panic hook, process exit).
static GLOBAL: Mutex<Option<sys::Saved>> = Mutex::new(None);
static PANIC_HOOK: Once = Once::new();

/// Restores the terminal settings saved by the active [`RawModeGuard::stdin`], if any.
///
/// Safe to call at any time and more than once, from a panic hook or before
/// `std::process::exit`. Never blocks: if another thread is restoring at this moment it
/// does nothing (that thread finishes the job).
pub fn restore_global() {
    let saved = match GLOBAL.try_lock() {
        Ok(mut g) => g.take(),
        // A panic while the lock was held: the data is still valid.
        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner().take(),
        Err(std::sync::TryLockError::WouldBlock) => None,
    };
    if let Some(saved) = saved {
        let _ = sys::apply(&saved);
    }
}

fn install_panic_hook() {
    PANIC_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_global();
            previous(info);
        }));
    });
}

/// Raw mode on a terminal, undone when dropped.
pub struct RawModeGuard {
    saved: sys::Saved,
    /// Registered in [`GLOBAL`] (the process's stdin terminal).
    global: bool,
    active: AtomicBool,
}

impl RawModeGuard {
    /// Puts the terminal on stdin into raw mode. `Ok(None)` when stdin is not a terminal
    /// (piped input); `Err` when it is one but its settings cannot be read or changed.
    pub fn stdin() -> io::Result<Option<RawModeGuard>> {
        let Some(saved) = sys::save_stdin()? else {
            return Ok(None);
        };
        install_panic_hook();
        // Register before switching, so a panic in between still restores.
        if let Ok(mut g) = GLOBAL.lock() {
            *g = Some(saved.clone());
        }
        if let Err(e) = sys::apply(&sys::make_raw(&saved)) {
            restore_global();
            return Err(e);
        }
        Ok(Some(RawModeGuard {
            saved,
            global: true,
            active: AtomicBool::new(true),
        }))
    }

    /// Puts the terminal open on `fd` into raw mode (tests, or a terminal other than stdin).
    /// Not registered for [`restore_global`].
    #[cfg(unix)]
    #[allow(dead_code)] // used by tests; kept public for other terminals
    pub fn from_fd(fd: std::os::unix::io::RawFd) -> io::Result<RawModeGuard> {
        let saved = sys::save(fd)?;
        sys::apply(&sys::make_raw(&saved))?;
        Ok(RawModeGuard {
            saved,
            global: false,
            active: AtomicBool::new(true),
        })
    }

    /// Restores the saved settings now. Later calls (and the drop) do nothing.
    pub fn restore(&self) {
        if !self.active.swap(false, Ordering::AcqRel) {
            return;
        }
        if self.global {
            // Take it out of the global slot first so the panic hook does not apply it
            // again later (harmless, but a stale restore could undo a later change).
            if let Ok(mut g) = GLOBAL.lock() {
                *g = None;
            }
        }
        if let Err(e) = sys::apply(&self.saved) {
            tracing::debug!("restoring terminal settings failed: {e}");
        }
    }
}

impl Drop for RawModeGuard {
    fn drop(&mut self) {
        self.restore();
    }
}

#[cfg(unix)]
mod sys {
    use std::io;
    use std::os::unix::io::{AsRawFd, RawFd};

    /// A terminal's settings and the descriptor they belong to.
    #[derive(Clone)]
    pub struct Saved {
        pub fd: RawFd,
        pub termios: libc::termios,
    }

    pub fn save_stdin() -> io::Result<Option<Saved>> {
        // SAFETY: isatty only inspects the descriptor number.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
            return Ok(None);
        }
        save(libc::STDIN_FILENO).map(Some)
    }

    pub fn save(fd: RawFd) -> io::Result<Saved> {
        // SAFETY: termios is plain old data; all-zero is a valid value that tcgetattr
        // overwrites completely on success.
        let mut termios: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `termios` is a valid, writable termios for the duration of the call.
        if unsafe { libc::tcgetattr(fd, &mut termios) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Saved { fd, termios })
    }

    /// OpenSSH's raw mode (sshtty.c `enter_raw_mode`), plus the BSD `dsusp` fix.
    pub fn make_raw(saved: &Saved) -> Saved {
        let mut t = saved.termios;
        t.c_iflag |= libc::IGNPAR;
        t.c_iflag &= !(libc::ISTRIP
            | libc::INLCR
            | libc::IGNCR
            | libc::ICRNL
            | libc::IXON
            | libc::IXANY
            | libc::IXOFF);
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            t.c_iflag &= !libc::IUCLC;
        }
        t.c_lflag &= !(libc::ISIG
            | libc::ICANON
            | libc::ECHO
            | libc::ECHOE
            | libc::ECHOK
            | libc::ECHONL
            | libc::IEXTEN);
        t.c_oflag &= !libc::OPOST;
        t.c_cc[libc::VMIN] = 1;
        t.c_cc[libc::VTIME] = 0;
        #[cfg(any(
            target_os = "macos",
            target_os = "ios",
            target_os = "freebsd",
            target_os = "openbsd",
            target_os = "netbsd",
            target_os = "dragonfly"
        ))]
        {
            // Ctrl-Y would otherwise suspend the reader at its next read (official #29).
            t.c_cc[libc::VDSUSP] = libc::_POSIX_VDISABLE;
        }
        Saved {
            fd: saved.fd,
            termios: t,
        }
    }

    pub fn apply(s: &Saved) -> io::Result<()> {
        loop {
            // SAFETY: `s.termios` is a valid termios obtained from tcgetattr.
            if unsafe { libc::tcsetattr(s.fd, libc::TCSANOW, &s.termios) } == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    pub fn winsize(fd: RawFd) -> Option<(u16, u16)> {
        // SAFETY: winsize is plain old data; all-zero is valid.
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: TIOCGWINSZ writes one `winsize` through the pointer, which is valid and
        // writable for the call.
        let rc = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
        (rc == 0).then_some((ws.ws_col, ws.ws_row))
    }

    fn dev_tty() -> Option<(u16, u16)> {
        use std::os::unix::fs::OpenOptionsExt;
        let tty = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOCTTY)
            .open("/dev/tty")
            .ok()?;
        winsize(tty.as_raw_fd())
    }

    pub fn size() -> Option<(u32, u32)> {
        super::first_usable(
            [winsize(libc::STDOUT_FILENO), winsize(libc::STDIN_FILENO)]
                .into_iter()
                .chain(std::iter::once_with(dev_tty)),
        )
    }
}

#[cfg(windows)]
mod sys {
    use std::io;
    use windows_sys::Win32::Foundation::{HANDLE, INVALID_HANDLE_VALUE};
    use windows_sys::Win32::System::Console::{
        GetConsoleMode, GetConsoleScreenBufferInfo, GetStdHandle, SetConsoleMode, CONSOLE_MODE,
        CONSOLE_SCREEN_BUFFER_INFO, ENABLE_ECHO_INPUT, ENABLE_LINE_INPUT, ENABLE_PROCESSED_INPUT,
        ENABLE_PROCESSED_OUTPUT, ENABLE_VIRTUAL_TERMINAL_INPUT, ENABLE_VIRTUAL_TERMINAL_PROCESSING,
        STD_ERROR_HANDLE, STD_HANDLE, STD_INPUT_HANDLE, STD_OUTPUT_HANDLE,
    };

    /// Console modes of stdin and (when it is a console) stdout.
    #[derive(Clone)]
    pub struct Saved {
        pub input: CONSOLE_MODE,
        pub output: Option<CONSOLE_MODE>,
    }

    fn handle(which: STD_HANDLE) -> Option<HANDLE> {
        // SAFETY: GetStdHandle has no preconditions.
        let h = unsafe { GetStdHandle(which) };
        (!h.is_null() && h != INVALID_HANDLE_VALUE).then_some(h)
    }

    /// The console mode of a standard handle; `None` when it is not a console.
    pub fn mode(which: STD_HANDLE) -> Option<CONSOLE_MODE> {
        let h = handle(which)?;
        let mut m: CONSOLE_MODE = 0;
        // SAFETY: `h` is a standard handle, `m` a valid out pointer.
        (unsafe { GetConsoleMode(h, &mut m) } != 0).then_some(m)
    }

    fn set_mode(which: STD_HANDLE, m: CONSOLE_MODE) -> io::Result<()> {
        let h = handle(which).ok_or_else(|| io::Error::other("no standard handle"))?;
        // SAFETY: `h` is a standard handle; SetConsoleMode validates the mode.
        if unsafe { SetConsoleMode(h, m) } == 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn save_stdin() -> io::Result<Option<Saved>> {
        Ok(mode(STD_INPUT_HANDLE).map(|input| Saved {
            input,
            output: mode(STD_OUTPUT_HANDLE),
        }))
    }

    pub fn make_raw(saved: &Saved) -> Saved {
        Saved {
            input: raw_input_mode(saved.input),
            output: saved.output.map(vt_output_mode),
        }
    }

    pub fn raw_input_mode(m: CONSOLE_MODE) -> CONSOLE_MODE {
        (m & !(ENABLE_ECHO_INPUT | ENABLE_LINE_INPUT | ENABLE_PROCESSED_INPUT))
            | ENABLE_VIRTUAL_TERMINAL_INPUT
    }

    pub fn vt_output_mode(m: CONSOLE_MODE) -> CONSOLE_MODE {
        m | ENABLE_PROCESSED_OUTPUT | ENABLE_VIRTUAL_TERMINAL_PROCESSING
    }

    pub fn apply(s: &Saved) -> io::Result<()> {
        let input = set_mode(STD_INPUT_HANDLE, s.input);
        if let Some(out) = s.output {
            // Consoles older than Windows 10 1511 refuse VT processing; the session still
            // works (escape sequences show up literally), so this is not an error.
            if let Err(e) = set_mode(STD_OUTPUT_HANDLE, out) {
                tracing::debug!("console output mode {out:#x} refused: {e}");
            }
        }
        input
    }

    fn buffer_size(which: STD_HANDLE) -> Option<(u16, u16)> {
        let h = handle(which)?;
        let mut info = CONSOLE_SCREEN_BUFFER_INFO::default();
        // SAFETY: `h` is a standard handle, `info` a valid out pointer.
        if unsafe { GetConsoleScreenBufferInfo(h, &mut info) } == 0 {
            return None;
        }
        let w = i32::from(info.srWindow.Right) - i32::from(info.srWindow.Left) + 1;
        let h = i32::from(info.srWindow.Bottom) - i32::from(info.srWindow.Top) + 1;
        Some((u16::try_from(w).ok()?, u16::try_from(h).ok()?))
    }

    pub fn size() -> Option<(u32, u32)> {
        super::first_usable([
            buffer_size(STD_OUTPUT_HANDLE),
            buffer_size(STD_ERROR_HANDLE),
        ])
    }
}

/// Whether stdin is a Windows console (its input can be read with `ReadConsoleW`).
#[cfg(windows)]
pub fn stdin_is_console() -> bool {
    sys::mode(windows_sys::Win32::System::Console::STD_INPUT_HANDLE).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_usable_skips_unknown_and_zero_sizes() {
        assert_eq!(first_usable([None, Some((80, 24))]), Some((80, 24)));
        assert_eq!(
            first_usable([Some((0, 0)), Some((120, 0)), Some((0, 40)), Some((100, 30))]),
            Some((100, 30))
        );
        assert_eq!(
            first_usable([Some((132, 43)), Some((80, 24))]),
            Some((132, 43))
        );
        assert_eq!(first_usable([None, Some((0, 0))]), None);
        assert_eq!(first_usable(std::iter::empty()), None);
        assert_eq!(first_usable([Some((u16::MAX, 1))]), Some((65535, 1)));
    }

    #[test]
    fn first_usable_is_lazy() {
        // The /dev/tty probe is only made when the standard descriptors gave nothing.
        let mut probed = false;
        let got = first_usable([Some((80, 24))].into_iter().chain(std::iter::once_with(|| {
            probed = true;
            Some((1, 1))
        })));
        assert_eq!(got, Some((80, 24)));
        assert!(!probed);
    }

    #[test]
    fn fallback_is_the_official_one() {
        assert_eq!(FALLBACK_SIZE, (300, 100));
        let (c, r) = size_or_fallback();
        assert!(c > 0 && r > 0);
    }

    #[cfg(unix)]
    mod pty {
        use super::super::*;
        use std::os::unix::io::RawFd;

        struct Pty {
            master: RawFd,
            slave: RawFd,
        }

        impl Drop for Pty {
            fn drop(&mut self) {
                // SAFETY: both descriptors were opened by openpty and are closed once.
                unsafe {
                    libc::close(self.slave);
                    libc::close(self.master);
                }
            }
        }

        fn openpty() -> Option<Pty> {
            let (mut master, mut slave) = (-1, -1);
            // SAFETY: out pointers are valid; name, termios and winsize may be null.
            let rc = unsafe {
                libc::openpty(
                    &mut master,
                    &mut slave,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                )
            };
            (rc == 0).then_some(Pty { master, slave })
        }

        fn attrs(fd: RawFd) -> libc::termios {
            sys::save(fd).expect("tcgetattr on pty slave").termios
        }

        #[test]
        fn raw_mode_is_set_and_restored() {
            let Some(pty) = openpty() else {
                eprintln!("no pty available; skipping");
                return;
            };
            let before = attrs(pty.slave);
            // A fresh pty is in cooked mode.
            assert_ne!(before.c_lflag & libc::ICANON, 0);
            assert_ne!(before.c_lflag & libc::ISIG, 0);
            {
                let guard = RawModeGuard::from_fd(pty.slave).expect("raw mode");
                let raw = attrs(pty.slave);
                for flag in [libc::ICANON, libc::ECHO, libc::ISIG, libc::IEXTEN] {
                    assert_eq!(raw.c_lflag & flag, 0, "lflag {flag:#x} still set");
                }
                for flag in [libc::ICRNL, libc::IXON, libc::INLCR, libc::IGNCR] {
                    assert_eq!(raw.c_iflag & flag, 0, "iflag {flag:#x} still set");
                }
                assert_eq!(raw.c_oflag & libc::OPOST, 0);
                assert_eq!(raw.c_cc[libc::VMIN], 1);
                assert_eq!(raw.c_cc[libc::VTIME], 0);
                guard.restore();
                let back = attrs(pty.slave);
                assert_eq!(back.c_lflag, before.c_lflag);
                // Raw again, then restored by the drop only.
                drop(guard);
                let guard = RawModeGuard::from_fd(pty.slave).expect("raw mode");
                assert_eq!(attrs(pty.slave).c_lflag & libc::ICANON, 0);
                drop(guard);
            }
            let after = attrs(pty.slave);
            assert_eq!(after.c_iflag, before.c_iflag);
            assert_eq!(after.c_oflag, before.c_oflag);
            assert_eq!(after.c_lflag, before.c_lflag);
            assert_eq!(after.c_cflag, before.c_cflag);
            assert_eq!(after.c_cc, before.c_cc);
        }

        #[test]
        fn ctrl_c_is_a_byte_in_raw_mode() {
            let Some(pty) = openpty() else {
                return;
            };
            let _guard = RawModeGuard::from_fd(pty.slave).expect("raw mode");
            let input = [0x03u8, 0x1a, 0x1c, b'\r'];
            // SAFETY: writing a valid buffer to the master descriptor.
            let n = unsafe { libc::write(pty.master, input.as_ptr().cast(), input.len()) };
            assert_eq!(n, 4);
            let mut buf = [0u8; 16];
            // SAFETY: reading into a valid buffer from the slave descriptor (VMIN=1: the
            // bytes are already there, so this returns at once).
            let n = unsafe { libc::read(pty.slave, buf.as_mut_ptr().cast(), buf.len()) };
            assert_eq!(usize::try_from(n).ok(), Some(4));
            assert_eq!(&buf[..4], &input, "no signal, no CR→NL translation");
        }

        #[test]
        fn size_reads_a_pty() {
            let Some(pty) = openpty() else {
                return;
            };
            let ws = libc::winsize {
                ws_row: 42,
                ws_col: 133,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            // SAFETY: TIOCSWINSZ reads one valid winsize.
            let rc = unsafe { libc::ioctl(pty.master, libc::TIOCSWINSZ, &ws) };
            assert_eq!(rc, 0);
            let got = first_usable([sys::winsize(pty.slave)]);
            assert_eq!(got, Some((133, 42)));
        }
    }
}
