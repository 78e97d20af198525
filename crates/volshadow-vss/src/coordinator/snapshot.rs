//! DoSnapshotSet: the snapshot set made exactly as VSS sequences it.
//!
//! prepare-snapshot (vetoes) -> providers' begin/end prepare -> freeze
//! (front, back, system level; each writer's window starts at its
//! freeze) -> providers' pre-commit -> every provider holds, commits and
//! keeps holding until all have committed (one instant, one hold limit),
//! then all release -> post-commit -> each writer's window checked ->
//! thaw (reverse order) -> post-snapshot (vetoes).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tracing::{info, warn};
use uuid::Uuid;

use crate::error::{VssError, VssResult};
use crate::provider::{CommitOptions, ProviderError, ProviderResult, SnapshotRef};
use crate::writer::{FailureKind, Phase, WriterFailure, WriterState};

use super::Coordinator;
use super::backup::{BackupSession, BackupState};

/// What the nested commits made, and where it went wrong.
#[derive(Default)]
struct Commits {
    made: Vec<SnapshotRef>,
    /// The provider whose own commit failed first (deepest).
    failed: Option<(usize, String)>,
    /// The hold ran past its limit.
    hold_exceeded: bool,
}

impl Coordinator {
    /// Commits `providers[0]`, and inside its hold the rest, and inside
    /// the last one's hold `innermost`: no provider releases before all
    /// have committed.
    fn commit_nested(
        &self,
        providers: &[usize],
        set: Uuid,
        options: &CommitOptions,
        out: &mut Commits,
        innermost: &mut dyn FnMut(&mut Commits) -> ProviderResult,
    ) -> ProviderResult {
        let Some((&p, rest)) = providers.split_first() else {
            return innermost(out);
        };
        let provider = &self.providers[p];
        let mut inner = |out: &mut Commits| self.commit_nested(rest, set, options, out, innermost);
        let mut out_inner = std::mem::take(out);
        let result = provider.commit(set, options, &mut || inner(&mut out_inner));
        *out = out_inner;
        match result {
            Ok(refs) => {
                out.made.extend(refs);
                Ok(())
            }
            Err(e) => {
                if out.failed.is_none() && !out.hold_exceeded {
                    out.failed = Some((p, e.0.clone()));
                }
                Err(e)
            }
        }
    }
}

impl BackupSession {
    /// Creates the snapshot set. Returns its snapshots; writers that
    /// vetoed on the way are in [`BackupSession::vetoes`].
    pub fn do_snapshot_set(&mut self) -> VssResult<Vec<SnapshotRef>> {
        self.expect("do_snapshot_set", &[BackupState::Prepared])?;
        let set = self.set_id.unwrap_or_default();
        for idx in self.active() {
            self.coord
                .set_status(idx, WriterState::WaitingForFreeze, None);
            if let Err(e) = self.call_writer(idx, Phase::PrepareSnapshot, |w, c| {
                w.prepare_for_snapshot(c)
            }) {
                self.veto(idx, Phase::PrepareSnapshot, e);
            }
        }
        for (vol, p) in self.volumes.clone() {
            if let Err(e) = self.coord.providers[p].begin_prepare_snapshot(set, &vol) {
                return Err(self.abort_provider(p, "begin-prepare", e.0, &[]));
            }
        }
        for p in self.providers_used() {
            if let Err(e) = self.coord.providers[p].end_prepare_snapshot(set) {
                return Err(self.abort_provider(p, "end-prepare", e.0, &[]));
            }
        }
        // Freeze: front, back, then system level. Each writer's own window
        // runs from its freeze.
        let mut order = self.active();
        order.sort_by_key(|&i| self.coord.writers[i].writer.freeze_level());
        let mut windows: Vec<(usize, Instant)> = Vec::new();
        for &idx in &order {
            let deadline = Instant::now() + self.coord.window_of(idx);
            windows.push((idx, deadline));
            let ctx = self.event_for(idx);
            if let Err(e) = self
                .coord
                .call(idx, Phase::Freeze, deadline, &ctx, true, |w, c| w.freeze(c))
            {
                return Err(self.abort_with(idx, Phase::Freeze, e, &[]));
            }
            self.coord
                .set_status(idx, WriterState::WaitingForThaw, None);
        }
        for p in self.providers_used() {
            if let Err(e) = self.coord.providers[p].pre_commit(set) {
                return Err(self.abort_provider(p, "pre-commit", e.0, &[]));
            }
        }
        let options = CommitOptions {
            persistent: self.context.persistent(),
            attributes: self.context.attributes(),
            hold_timeout: self.coord.timeouts.hold,
        };
        let mut commits = Commits::default();
        let started = Instant::now();
        let hold = options.hold_timeout;
        let committed = self.coord.commit_nested(
            &self.providers_used(),
            set,
            &options,
            &mut commits,
            &mut |out: &mut Commits| {
                if started.elapsed() > hold {
                    out.hold_exceeded = true;
                    return Err(ProviderError(format!("writes held longer than {hold:?}")));
                }
                Ok(())
            },
        );
        if committed.is_err() {
            return Err(self.abort_commit(commits, hold));
        }
        let made = commits.made;
        for p in self.providers_used() {
            if let Err(e) = self.coord.providers[p].post_commit(set) {
                return Err(self.abort_provider(p, "post-commit", e.0, &made));
            }
        }
        // The writer whose own window ran out first is the one named.
        let now = Instant::now();
        if let Some(&(idx, _)) = windows
            .iter()
            .filter(|(_, d)| now > *d)
            .min_by_key(|(_, d)| *d)
        {
            let e = WriterFailure::new(
                FailureKind::Timeout,
                format!(
                    "frozen longer than the writer's limit of {:?}",
                    self.coord.window_of(idx)
                ),
            );
            return Err(self.abort_with(idx, Phase::Freeze, e, &made));
        }
        for &(idx, deadline) in windows.iter().rev() {
            let ctx = self.event_for(idx);
            if let Err(e) = self
                .coord
                .call(idx, Phase::Thaw, deadline, &ctx, false, |w, c| w.thaw(c))
            {
                return Err(self.abort_with(idx, Phase::Thaw, e, &made));
            }
            self.coord
                .set_status(idx, WriterState::WaitingForPostSnapshot, None);
        }
        for idx in self.active() {
            match self.call_writer(idx, Phase::PostSnapshot, |w, c| w.post_snapshot(c)) {
                Ok(()) => self
                    .coord
                    .set_status(idx, WriterState::WaitingForBackupComplete, None),
                Err(e) => self.veto(idx, Phase::PostSnapshot, e),
            }
        }
        self.coord.set_in_progress.store(false, Ordering::Release);
        info!(%set, snapshots = made.len(), vetoes = self.vetoes.len(), "snapshot set created");
        self.snapshots = made.clone();
        self.state = BackupState::SnapshotDone;
        Ok(made)
    }

    fn abort_commit(&mut self, commits: Commits, hold: Duration) -> VssError {
        let Commits {
            made,
            failed,
            hold_exceeded,
        } = commits;
        if hold_exceeded {
            warn!(
                ?hold,
                "writes were held too long; aborting the snapshot set"
            );
            self.abort_all(&made);
            return VssError::HoldTimedOut(hold);
        }
        let (p, message) = failed.unwrap_or((0, "commit failed".into()));
        self.abort_provider(p, "commit", message, &made)
    }

    /// Aborts after writer `idx` failed at `phase`; returns the error.
    fn abort_with(
        &mut self,
        idx: usize,
        phase: Phase,
        failure: WriterFailure,
        made: &[SnapshotRef],
    ) -> VssError {
        let name = self.coord.name_of(idx);
        warn!(writer = %name, %phase, error = %failure, "writer failed; aborting the snapshot set");
        self.abort_all(made);
        self.coord.set_status(
            idx,
            WriterState::FailedAt(phase),
            Some((phase, failure.clone())),
        );
        VssError::WriterFailed {
            writer: name,
            phase,
            failure,
        }
    }

    fn abort_provider(
        &mut self,
        provider: usize,
        phase: &'static str,
        message: String,
        made: &[SnapshotRef],
    ) -> VssError {
        let name = self
            .coord
            .providers
            .get(provider)
            .map_or_else(|| "?".to_string(), |p| p.name().to_string());
        warn!(provider = %name, phase, error = %message, "provider failed; aborting the snapshot set");
        self.abort_all(made);
        VssError::ProviderFailed {
            provider: name,
            phase,
            message,
        }
    }
}
