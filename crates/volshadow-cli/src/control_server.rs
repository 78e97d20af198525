//! The server side of the control channel: one thread per connection,
//! bounded in number and idle time, each request carried out on the
//! served volume (or, for `SetJoin`, a snapshot set's conversation).

use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Result, bail};

use crate::channel::{Listener, Stream};
use crate::control::{Envelope, MAX_REQUEST_LINE, receive, send};
use crate::ops::Request;
use crate::report::Reporter;

/// Control connections served at once; more get "busy" rather than a
/// thread and a buffer each.
const MAX_CONNECTIONS: usize = 32;
/// A client that sends nothing for this long is dropped, so idle
/// connections cannot hold every slot.
const IDLE: std::time::Duration = std::time::Duration::from_secs(30);
/// Pause after a failed accept.
const ACCEPT_RETRY: std::time::Duration = std::time::Duration::from_millis(10);

/// Serves control requests for the reporter's volume (image `img`) until
/// the process ends.
pub fn serve(img: &Path, reporter: Arc<Reporter>) -> Result<()> {
    let sets = Arc::new(crate::member::SetsInProgress::new(
        img,
        reporter.volume().clone(),
    ));
    let mut listener = Listener::bind(img, reporter.volume().id())?;
    let open = Arc::new(AtomicUsize::new(0));
    std::thread::spawn(move || {
        loop {
            let stream = match listener.accept() {
                Ok(s) => s,
                Err(e) => {
                    // A client that went before it was served; a failure
                    // that repeats must not spin.
                    tracing::debug!(error = %e, "control accept failed");
                    std::thread::sleep(ACCEPT_RETRY);
                    continue;
                }
            };
            if open.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
                open.fetch_sub(1, Ordering::AcqRel);
                let _ = send::<crate::ops::Reply>(
                    &mut &stream,
                    &Envelope {
                        ok: None,
                        error: Some("the server is busy; try again".into()),
                        payload_len: 0,
                        auto_deleted: Vec::new(),
                    },
                    &[],
                );
                continue;
            }
            let (reporter, open, sets) = (reporter.clone(), open.clone(), sets.clone());
            let spawned = std::thread::Builder::new().spawn(move || {
                let _ = stream.set_read_timeout(Some(IDLE));
                let _ = stream.set_write_timeout(Some(IDLE));
                if let Err(e) = handle(&reporter, &sets, &stream) {
                    tracing::warn!(error = %crate::one_line(&e), "control request failed");
                }
                open.fetch_sub(1, Ordering::AcqRel);
            });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start a control thread");
            }
        }
    });
    Ok(())
}

fn handle(
    reporter: &Reporter,
    sets: &crate::member::SetsInProgress,
    stream: &Stream,
) -> Result<()> {
    let mut w = stream;
    let mut r = BufReader::new(stream);
    let answer = receive::<Request>(&mut r, MAX_REQUEST_LINE).and_then(|(env, payload)| {
        let Some(req) = env.ok else {
            bail!("request without an operation");
        };
        Ok((req, payload))
    });
    let (req, payload) = match answer {
        Ok(r) => r,
        Err(e) => {
            // Tell the client why, then log it.
            let _ = send::<crate::ops::Reply>(
                &mut w,
                &Envelope {
                    ok: None,
                    error: Some(crate::one_line(&e)),
                    payload_len: 0,
                    auto_deleted: Vec::new(),
                },
                &[],
            );
            return Err(e);
        }
    };
    let (result, auto_deleted) = match req {
        Request::SetJoin => return sets.converse(stream, &mut r),
        Request::SetOutcome { set_id } if sets.contains(set_id) => (
            Ok((
                crate::ops::Reply::SetOutcome {
                    outcome: crate::ops::SetOutcome::InProgress,
                },
                Vec::new(),
            )),
            Vec::new(),
        ),
        _ => reporter.during(|| crate::ops::execute(reporter.volume(), &req, &payload)),
    };
    match result {
        Ok((reply, data)) => send(
            &mut w,
            &Envelope {
                ok: Some(reply),
                error: None,
                payload_len: data.len() as u64,
                auto_deleted,
            },
            &data,
        ),
        Err(e) => send::<crate::ops::Reply>(
            &mut w,
            &Envelope {
                ok: None,
                error: Some(crate::one_line(&e)),
                payload_len: 0,
                auto_deleted,
            },
            &[],
        ),
    }
}
