//! Finding the PostgreSQL server programs (`initdb`, `postgres`, `pg_ctl`) and the tools the
//! cluster needs, on `PATH` and in the usual install directories.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::ClusterError;

/// The two server binaries needed.
#[derive(Debug)]
pub(super) struct Binaries {
    pub(super) initdb: PathBuf,
    pub(super) postgres: PathBuf,
}

/// Find `initdb` and `postgres`: on `PATH` (both), else in the highest
/// version under `/usr/lib/postgresql/*/bin`, where Debian and Ubuntu put them
/// without linking them onto `PATH`.
pub(super) fn find_binaries() -> Result<Binaries, ClusterError> {
    let on_path = (find_on_path("initdb"), find_on_path("postgres"));
    if let (Some(initdb), Some(postgres)) = on_path {
        return Ok(Binaries { initdb, postgres });
    }
    let mut versions: Vec<(Vec<u64>, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let version =
                name.split('.').map(|part| part.parse::<u64>().ok()).collect::<Option<Vec<u64>>>()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, bin)| is_executable(&bin.join("initdb")) && is_executable(&bin.join("postgres")))
        .collect();
    versions.sort();
    let (_, bin) = versions.pop().ok_or(ClusterError::BinariesNotFound)?;
    Ok(Binaries { initdb: bin.join("initdb"), postgres: bin.join("postgres") })
}

pub(super) fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

/// Like [`find_on_path`], plus the sbin directories, which are often missing
/// from `PATH` in containers and under `cargo test` yet hold `runuser`.
pub(super) fn find_tool(name: &str) -> Option<PathBuf> {
    find_on_path(name).or_else(|| {
        ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
            .iter()
            .map(|dir| Path::new(dir).join(name))
            .find(|candidate| is_executable(candidate))
    })
}

pub(super) fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}
