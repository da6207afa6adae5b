//! `outpost artifact add | list | show | rm | push`: files for devices,
//! stored once on the box in content-defined chunks (issue 24), and staged
//! on edges below ahead of any command (issue 25).
//!
//! `add` reads the file twice, never whole: once to chunk and hash it (the
//! manifest), then to send only the chunks the box lacks. A second
//! version of a file sends only the chunks that changed, and an `add`
//! cut short sends, when run again, only what did not arrive.

use super::*;
use crate::engine::artifact::chunker::Chunker;
use crate::engine::artifact::{Digest, Manifest};
use crate::shell::artifact::shelf::ArtifactView;
use std::io::IsTerminal;

#[derive(Debug, clap::Subcommand)]
pub enum ArtifactCmd {
    /// Store a file on the box: `added` once every chunk and the manifest
    /// are on disk.
    #[command(disable_version_flag = true)]
    Add {
        file: PathBuf,
        /// The name devices and `send --artifact` know it by [default: the
        /// file name]
        #[arg(long)]
        name: Option<String>,
        /// Its version [default: the file's modification time, as
        /// YYYYMMDD.HHMMSS]
        #[arg(long)]
        version: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// The artifacts on the box, oldest first.
    List {
        #[arg(long)]
        json: bool,
    },
    /// One artifact: name@version, name (its newest) or sha256:DIGEST.
    Show {
        artifact: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove an artifact no live command names, and the chunks no other
    /// artifact shares.
    #[command(alias = "remove")]
    Rm {
        artifact: String,
        #[arg(long)]
        json: bool,
    },
    /// Stage an artifact on an edge below this hub, ahead of any command:
    /// the edge fetches the chunks it lacks while the link is up. Prints
    /// the staging's command id; it ends `succeeded` once the edge holds
    /// the file whole.
    Push {
        /// The edge, by the id this hub enrolled it under.
        edge: String,
        /// name@version, name (its newest) or sha256:DIGEST.
        artifact: String,
        /// Wait for the staging to end (default 10m) and exit 0 only if it
        /// succeeded. TIMEOUT: 90s, 10m, or a number of seconds.
        #[arg(long, num_args = 0..=1, default_missing_value = "10m", value_name = "TIMEOUT", allow_negative_numbers = true)]
        wait: Option<crate::engine::duration::DurationArg>,
        #[arg(long)]
        json: bool,
    },
}

pub(super) async fn run(cmd: ArtifactCmd, data_dir: &Path) -> anyhow::Result<i32> {
    match cmd {
        ArtifactCmd::Add {
            file,
            name,
            version,
            json,
        } => add(&file, name, version, json, data_dir).await,
        ArtifactCmd::List { json } => {
            let mut c = client(data_dir).await?;
            let AdminResponse::Artifacts(all) = c.call(&AdminRequest::ArtifactList).await? else {
                bail!("unexpected answer")
            };
            if json {
                for a in &all {
                    crate::outln!("{}", view_json(a));
                }
                return Ok(0);
            }
            if all.is_empty() {
                crate::outln!("no artifacts; `outpost artifact add FILE` adds one");
                return Ok(0);
            }
            let rows: Vec<Vec<String>> = all
                .iter()
                .map(|a| {
                    vec![
                        format!("{}@{}", a.name, a.version),
                        size(a.size),
                        a.chunks.to_string(),
                        a.digest.short(),
                        ago(a.added_at),
                    ]
                })
                .collect();
            print_table(&["ARTIFACT", "SIZE", "CHUNKS", "DIGEST", "ADDED"], &rows);
            Ok(0)
        }
        ArtifactCmd::Push {
            edge,
            artifact,
            wait,
            json,
        } => {
            crate::engine::route::check_name(&edge, "edge")
                .map_err(|e| UsageError(format!("{edge}: {e}")))?;
            let req = SendRequest {
                target: format!("{edge}/{}", crate::shell::upstream::STAGE),
                payload: b"stage".to_vec(),
                opts: SendOptions::default(),
                origin: "cli".into(),
                signature: Some(reference(&artifact, data_dir).await?),
            };
            super::send::deliver(req, wait, json, data_dir).await
        }
        ArtifactCmd::Show { artifact, json } => {
            let mut c = client(data_dir).await?;
            let AdminResponse::Artifact(a) = c.call(&AdminRequest::ArtifactShow(artifact)).await?
            else {
                bail!("unexpected answer")
            };
            print_view(&a, json);
            Ok(0)
        }
        ArtifactCmd::Rm { artifact, json } => {
            let mut c = client(data_dir).await?;
            let AdminResponse::ArtifactRemoved { view, freed } =
                c.call(&AdminRequest::ArtifactRemove(artifact)).await?
            else {
                bail!("unexpected answer")
            };
            if json {
                let mut o = view_json(&view);
                o["freed"] = json!(freed);
                crate::outln!("{o}");
            } else {
                crate::outln!(
                    "removed {}@{} ({} freed)",
                    view.name,
                    view.version,
                    size(freed)
                );
            }
            Ok(0)
        }
    }
}

/// The unsigned envelope naming `spec` as the box resolves it, for a
/// command that carries the artifact (`send --artifact`).
pub(super) async fn reference(spec: &str, data_dir: &Path) -> anyhow::Result<Vec<u8>> {
    crate::engine::artifact::ArtifactSpec::parse(spec)
        .map_err(|e| UsageError(format!("--artifact: {e}")))?;
    let mut c = client(data_dir).await?;
    let AdminResponse::Artifact(a) = c.call(&AdminRequest::ArtifactShow(spec.into())).await? else {
        bail!("unexpected answer")
    };
    Ok(crate::engine::trust::envelope::unsigned(Some(a.digest.0)))
}

fn print_view(a: &ArtifactView, json: bool) {
    if json {
        crate::outln!("{}", view_json(a));
        return;
    }
    crate::outln!("artifact  {}@{}", a.name, a.version);
    crate::outln!("digest    {}", a.digest);
    crate::outln!("size      {} in {} chunks", size(a.size), a.chunks);
    crate::outln!("sha256    {}", a.sha256.hex());
    crate::outln!("added     {}", crate::engine::command::rfc3339(a.added_at));
}

fn view_json(a: &ArtifactView) -> Value {
    json!({
        "name": a.name,
        "version": a.version,
        "digest": a.digest.to_string(),
        "size": a.size,
        "sha256": a.sha256.hex(),
        "chunks": a.chunks,
        "added_at": crate::engine::command::rfc3339(a.added_at),
    })
}

fn size(b: u64) -> String {
    indicatif::HumanBytes(b).to_string()
}

fn open(file: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::File::open(file).with_context(|| format!("cannot read {}", file.display()))
}

async fn add(
    file: &Path,
    name: Option<String>,
    version: Option<String>,
    json: bool,
    data_dir: &Path,
) -> anyhow::Result<i32> {
    let meta = open(file)?.metadata()?;
    if !meta.is_file() {
        return Err(UsageError(format!("{} is not a file", file.display())).into());
    }
    let name = match name {
        Some(n) => n,
        None => file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    let version = version.unwrap_or_else(|| {
        let t = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
        let s = humantime::format_rfc3339_seconds(t).to_string();
        // 2026-12-02T03:04:05Z → 20261202.030405
        s.replace(['-', ':'], "")
            .replace('T', ".")
            .trim_end_matches('Z')
            .to_string()
    });
    for (what, v) in [("--name", &name), ("--version", &version)] {
        crate::engine::artifact::manifest::check_label(v)
            .map_err(|e| UsageError(format!("{what} {e}")))?;
    }
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(meta.len() * 2).with_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .expect("a valid template"),
        )
    } else {
        indicatif::ProgressBar::hidden()
    };
    // Pass 1: the manifest (hashing only; one chunk in memory).
    bar.set_message("hashing");
    let (path, b) = (file.to_path_buf(), bar.clone());
    let (name2, version2) = (name.clone(), version.clone());
    let manifest: Manifest = tokio::task::spawn_blocking(move || -> anyhow::Result<Manifest> {
        let mut c = Chunker::new(std::io::BufReader::new(open(&path)?));
        while let Some(next) = c.next_chunk() {
            let (r, _) = next.with_context(|| format!("reading {}", path.display()))?;
            b.inc(u64::from(r.len));
        }
        Ok(c.finish(&name2, &version2))
    })
    .await??;
    let bytes = manifest.encode();
    let mut c = client(data_dir).await?;
    let AdminResponse::ArtifactLacks(lacks) = c
        .call(&AdminRequest::ArtifactLacks {
            manifest: bytes.clone(),
        })
        .await?
    else {
        bail!("unexpected answer")
    };
    // Pass 2: only the chunks the box lacks (chunked again, identically).
    bar.set_message("sending");
    let lacks: std::collections::HashSet<Digest> = lacks
        .iter()
        .map(|&i| manifest.chunks[i as usize].sha256)
        .collect();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<anyhow::Result<Vec<u8>>>(4);
    let (path, b, want) = (file.to_path_buf(), bar.clone(), lacks.clone());
    let expected = manifest.sha256;
    let reader = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let mut c = Chunker::new(std::io::BufReader::new(open(&path)?));
        while let Some(next) = c.next_chunk() {
            let (r, data) = next?;
            b.inc(u64::from(r.len));
            if want.contains(&r.sha256) && tx.blocking_send(Ok(data)).is_err() {
                return Ok(());
            }
        }
        if c.finish("", "").sha256 != expected {
            let _ = tx.blocking_send(Err(anyhow::anyhow!(
                "{} changed while it was being added; add it again once it is written",
                path.display()
            )));
        }
        Ok(())
    });
    let mut sent = 0u64;
    while let Some(chunk) = rx.recv().await {
        let chunk = chunk?;
        sent += chunk.len() as u64;
        c.call(&AdminRequest::ArtifactChunk { bytes: chunk })
            .await?;
    }
    reader.await??;
    let AdminResponse::Artifact(view) = c
        .call(&AdminRequest::ArtifactCommit { manifest: bytes })
        .await?
    else {
        bail!("unexpected answer")
    };
    bar.finish_and_clear();
    if json {
        let mut o = view_json(&view);
        o["sent"] = json!(sent);
        crate::outln!("{o}");
    } else {
        crate::outln!(
            "added {}@{} {} ({}, {} chunks; {} sent, the rest already on the box)",
            view.name,
            view.version,
            view.digest,
            size(view.size),
            view.chunks,
            size(sent)
        );
    }
    Ok(0)
}
