//! Standard output for the CLI, with the closed-pipe rule of Unix tools.
//!
//! `println!` panics when stdout is a pipe whose reader has gone
//! (`outpost queue dev-1 | head`): exit 101 and a backtrace. Rust ignores
//! SIGPIPE so that a write to a closed socket is an error instead of a
//! silent death, which the box and the admin client rely on; so the
//! signal cannot simply be restored for the whole process. Instead every
//! write to stdout goes through [`Stdout`], which, on a closed pipe, ends
//! the process the way coreutils end: killed by SIGPIPE, quietly (a shell
//! sees status 141, as for `seq 1000000 | head -1`).
//!
//! The library denies `clippy::print_stdout`, so a new `println!` cannot
//! bring the panic back: use [`outln!`](crate::outln) and
//! [`out!`](crate::out).

use std::io::{self, Write};

/// Standard output that turns a closed pipe into a quiet exit and any other
/// write error into a panic naming it (as `println!` does).
#[derive(Debug, Default, Clone, Copy)]
pub struct Stdout;

impl Stdout {
    /// Write formatted text (the macros' back end).
    pub fn print(args: std::fmt::Arguments<'_>) {
        let mut out = io::stdout().lock();
        if let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) {
            fail(e)
        }
    }
}

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        io::stdout().write(buf).map_err(fail_if_closed)
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stdout().flush().map_err(fail_if_closed)
    }
}

fn fail_if_closed(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::BrokenPipe {
        closed_pipe()
    }
    e
}

fn fail(e: io::Error) -> ! {
    let e = fail_if_closed(e);
    panic!("failed printing to stdout: {e}")
}

/// The reader of our stdout has gone: nobody will read another line, so
/// stop now, as a tool killed by SIGPIPE does.
pub fn closed_pipe() -> ! {
    // SAFETY: restoring the default disposition and raising the signal is
    // what a process that never ignored SIGPIPE would have undergone on its
    // write; nothing runs after it.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        libc::raise(libc::SIGPIPE);
    }
    // Only reached if the signal was blocked: the same status a shell
    // reports for a tool killed by it.
    std::process::exit(128 + libc::SIGPIPE)
}

/// `println!` for the CLI: see the module doc.
#[macro_export]
macro_rules! outln {
    () => { $crate::stdout::Stdout::print(format_args!("\n")) };
    ($($arg:tt)*) => {
        $crate::stdout::Stdout::print(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` for the CLI: see the module doc.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => { $crate::stdout::Stdout::print(format_args!($($arg)*)) };
}
