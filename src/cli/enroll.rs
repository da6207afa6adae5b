//! `outpost enroll`: the bundle file reserved first, the enrollment through
//! the running box or, with the box stopped, straight on the data dir.

use super::*;

/// `outpost enroll`'s arguments.
#[derive(Debug, clap::Args)]
pub struct EnrollArgs {
    /// The device's id: letters, digits, `-`, `_`, `.`, up to 64.
    pub device: String,
    /// A tag for routing (repeatable).
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// A capability (repeatable).
    #[arg(long = "cap")]
    pub caps: Vec<String>,
    /// Where to write the bundle [default: ./<device>.bundle]
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Enroll a box below this one (an edge), whose devices are then
    /// addressed as <device>/DEVICE; give it the bundle as its
    /// --upstream-bundle.
    #[arg(long)]
    pub gateway: bool,
    /// Enroll an id that already exists (enrolled or revoked): issues a
    /// new bundle, and every earlier bundle of the id is refused from
    /// now on. Also lets `--out` replace an existing regular file.
    #[arg(long)]
    pub force: bool,
}

/// Enroll a device and write its bundle file.
pub(super) async fn run(
    a: EnrollArgs,
    data_dir: &Path,
    file: &crate::shell::config::FileConfig,
    file_path: Option<&Path>,
) -> anyhow::Result<i32> {
    let EnrollArgs {
        device,
        tags,
        caps,
        out,
        gateway,
        force,
    } = a;
    let path = out.unwrap_or_else(|| PathBuf::from(format!("{device}.bundle")));
    // The file first: a path that cannot be written refuses the
    // enrollment, instead of enrolling a device whose key is then
    // nowhere.
    let pending = crate::identity::PendingSecret::reserve(&path, force)
        .with_context(|| format!("{device} was not enrolled"))?;
    let (text, mode) = match AdminClient::connect(data_dir).await {
        Ok(mut c) => {
            let r = c
                .call(&AdminRequest::Enroll {
                    id: device.clone(),
                    tags,
                    caps,
                    gateway,
                    force,
                })
                .await
                .with_context(|| format!("{device} was not enrolled"))?;
            let AdminResponse::Bundle { text } = r else {
                bail!("unexpected answer from the box: {r:?}")
            };
            (text, "via the running box".to_string())
        }
        Err(AdminError::NoBox { .. }) => {
            let req = crate::shell::enroll::EnrollRequest {
                id: device.clone(),
                tags,
                caps,
                gateway,
                force,
            };
            let b = enroll_offline(data_dir, file, file_path, &req)
                .await
                .with_context(|| format!("{device} was not enrolled"))?;
            (
                b.to_text(),
                format!("offline in {} (the box is not running)", data_dir.display()),
            )
        }
        Err(e) => return Err(anyhow::Error::new(e).context(format!("{device} was not enrolled"))),
    };
    if let Err(e) = pending.commit(text.as_bytes()) {
        bail!(
            "{device} is enrolled, but its bundle could not be written: {e}; its key exists nowhere else, so issue a new one with `outpost enroll {device} --force --out FILE`"
        );
    }
    crate::outln!("{device} enrolled {mode}");
    crate::outln!(
        "bundle written to {} (keep it secret: it holds the device's key)",
        path.display()
    );
    if gateway {
        crate::outln!(
            "on the edge box, run: outpost serve --upstream quic://{} --upstream-bundle {}",
            crate::identity::Bundle::read(&path)
                .map(|b| b.server)
                .unwrap_or_else(|_| "HUB:7443".into()),
            path.display()
        );
    } else {
        crate::outln!(
            "run the device with: outpost device --bundle {} --echo",
            path.display()
        );
    }
    Ok(0)
}

/// `enroll` with the box stopped (pre-provisioning bundles before it is
/// deployed): the data dir's identity and store, opened here, and the same
/// enrollment the box does, with the settings it would start with.
async fn enroll_offline(
    data_dir: &Path,
    file: &crate::shell::config::FileConfig,
    file_path: Option<&Path>,
    req: &crate::shell::enroll::EnrollRequest,
) -> anyhow::Result<crate::identity::Bundle> {
    // Before the store: a data dir without an identity is not created.
    let identity = crate::identity::Identity::load(data_dir)?;
    let c = crate::shell::config::resolve_without_flags(file, file_path)?;
    // sled's lock refuses this while a box holds the database.
    let store = crate::shell::store::Store::open(
        data_dir,
        &crate::shell::store::StoreOptions {
            cache_bytes: c.cache_bytes,
        },
    )?;
    let trust = store.trust()?;
    let queue = crate::shell::queue::open(
        store,
        crate::shell::queue::ServiceOptions {
            limits: c.limits.clone(),
            acl: c.acl.clone(),
            outbox_max: c
                .upstream
                .as_ref()
                .map(|u| u.outbox_max)
                .or(c.nats.as_ref().map(|n| n.outbox_max)),
            gate: std::sync::Arc::new(crate::engine::trust::Gate::new(
                crate::shell::serve::box_name(
                    c.name.as_deref(),
                    Some(
                        &c.upstream
                            .as_ref()
                            .and_then(|u| u.bundle.clone())
                            .unwrap_or_else(|| data_dir.join(crate::shell::serve::UPSTREAM_BUNDLE)),
                    ),
                    c.nats.as_ref().map(|n| n.name.as_str()),
                ),
                c.require_signed,
                trust,
            )),
            ..Default::default()
        },
    )?;
    let advertise = crate::shell::serve::advertise_for(c.listen, c.advertise.as_deref());
    // The box loads the new certificate's pin from the record at its next
    // start: nothing is serving now that would need it live.
    let r = crate::shell::enroll::enroll(&queue, &identity, &advertise, req).await;
    // An enrollment with the box stopped is as much an entry as one through
    // its socket; `shutdown` writes it.
    // SAFETY: getuid(2) cannot fail and touches no memory.
    let uid = unsafe { libc::getuid() };
    queue.audit(crate::engine::audit::Note {
        at: crate::now_millis(),
        who: format!("uid {uid}"),
        from: "offline".into(),
        what: "enroll".into(),
        target: req.id.clone(),
        command: None,
        payload_sha256: None,
        allowed: r.is_ok(),
        why: r.as_ref().err().map(|e| e.to_string()),
    });
    // Durable before the store closes, either way.
    queue.shutdown().await;
    Ok(r?.bundle)
}
