//! Shell completions and the man page, generated from the same clap definitions the binary
//! parses with, so they cannot drift from it. The Debian package ships their output
//! (`.ci/package`); `keap-sync completions <shell>` serves a source install.

use std::io::{self, Write};

use clap::CommandFactory;

use super::Cli;

/// Writes `shell`'s completion script for `keap-sync` to standard output.
pub(super) fn completions(shell: clap_complete::Shell) -> io::Result<()> {
    let mut stdout = io::stdout().lock();
    clap_complete::generate(shell, &mut Cli::command(), "keap-sync", &mut stdout);
    stdout.flush()
}

/// Writes the man page, `keap-sync(1)`, in roff to standard output.
pub(super) fn manpage() -> io::Result<()> {
    let mut stdout = io::stdout().lock();
    clap_mangen::Man::new(Cli::command()).render(&mut stdout)?;
    stdout.flush()
}
