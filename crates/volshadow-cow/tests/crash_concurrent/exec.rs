//! Running a workload on a volume: the writer threads and the snapshot thread, power cut anywhere.

use super::*;

pub(crate) fn is_full(e: &volshadow_block::Error) -> bool {
    e.to_string().contains("diff area is full")
}

/// One writer thread's round. Stops at the first failure of the power.
pub(crate) fn writer(
    vol: &Volume,
    m: &Model,
    rig: &PowerRig,
    w: usize,
    round: usize,
    ops: &[WOp],
    turns: Option<&Turns>,
) {
    let mut stopped = false;
    for op in ops {
        if let Some(t) = turns {
            t.wait(w);
        }
        if !stopped && !rig.rail.is_off() {
            stopped = !writer_op_run(vol, m, rig, w, round, op);
        }
        if let Some(t) = turns {
            t.done();
        }
    }
}

/// Runs one writer operation; false once the power failed under it.
pub(crate) fn writer_op_run(
    vol: &Volume,
    m: &Model,
    rig: &PowerRig,
    w: usize,
    round: usize,
    op: &WOp,
) -> bool {
    let flush = || {
        let start = m.tick();
        match vol.flush() {
            Ok(()) => {
                m.flushed(start);
                true
            }
            Err(e) => {
                if !rig.rail.is_off() {
                    m.unexpected(format!("writer {w}: flush failed: {e}"));
                }
                false
            }
        }
    };
    match *op {
        WOp::Flush => flush(),
        WOp::Write {
            off,
            len,
            byte,
            fua,
        } => {
            let idx = {
                let mut r = lock(&m.regions[w]);
                r.writes.push(WRec {
                    off,
                    len,
                    byte,
                    ack: None,
                });
                r.writes.len() - 1
            };
            match vol.write_at(&vec![byte; len], off as u64) {
                Ok(()) => {
                    let ack = m.tick();
                    let mut r = lock(&m.regions[w]);
                    r.writes[idx].ack = Some(ack);
                    let s = r.start;
                    r.image[off - s..off - s + len].fill(byte);
                    for c in off / CHUNK..=(off + len - 1) / CHUNK {
                        r.touched.push((round, c));
                    }
                }
                // In flight when the power failed: may have landed.
                Err(_) if rig.rail.is_off() => return false,
                Err(e) if is_full(&e) => {
                    // Refused: nothing changed.
                    lock(&m.regions[w]).writes.pop();
                    m.refused.fetch_add(1, Ordering::Relaxed);
                    return true;
                }
                Err(e) => {
                    m.unexpected(format!("writer {w}: write of {len} at {off} failed: {e}"));
                    return false;
                }
            }
            if fua { flush() } else { true }
        }
    }
}

/// Runs the workload until the power fails.
pub(crate) fn run(vol: &Volume, rig: &PowerRig, rounds: &[Round], m: &mut Model) {
    for (i, round) in rounds.iter().enumerate() {
        m.forget_auto_deleted(vol);
        for op in &round.barrier {
            m.creating = None;
            m.deleting = None;
            match *op {
                BOp::Flush => {
                    let start = m.tick();
                    match vol.flush() {
                        Ok(()) => m.flushed(start),
                        Err(e) => {
                            if !rig.rail.is_off() {
                                m.unexpected(format!("flush failed: {e}"));
                            }
                            return;
                        }
                    }
                }
                BOp::Create { persistent } => {
                    let data = m.image();
                    m.creating = Some((persistent, data.clone()));
                    let start = m.tick();
                    match vol.create_snapshot(SnapshotOptions {
                        persistent,
                        ..Default::default()
                    }) {
                        Ok(info) => {
                            if persistent {
                                m.flushed(start);
                            }
                            m.snaps.push(Snap {
                                id: info.id,
                                persistent,
                                data,
                                round: i,
                            });
                        }
                        Err(e) => {
                            if !rig.rail.is_off() {
                                m.unexpected(format!("create failed: {e}"));
                            }
                            return;
                        }
                    }
                }
                BOp::Delete { pick } => {
                    if m.snaps.is_empty() {
                        continue;
                    }
                    let i = pick % m.snaps.len();
                    let id = m.snaps[i].id;
                    m.deleting = Some(id);
                    match vol.delete_snapshot(id) {
                        Ok(()) => {
                            m.snaps.remove(i);
                            m.gone.push(id);
                        }
                        Err(e) => {
                            if !rig.rail.is_off() {
                                m.unexpected(format!("delete failed: {e}"));
                            }
                            return;
                        }
                    }
                }
            }
        }
        m.creating = None;
        m.deleting = None;
        // Keep the snapshot count bounded: the oldest goes.
        while m.snaps.len() >= MAX_SNAPS {
            let id = m.snaps[0].id;
            m.deleting = Some(id);
            if vol.delete_snapshot(id).is_err() {
                if !rig.rail.is_off() {
                    m.unexpected("bounding delete failed".into());
                }
                return;
            }
            m.snaps.remove(0);
            m.gone.push(id);
            m.deleting = None;
        }
        m.in_writers = true;
        let turns = round.turns.as_ref().map(|order| Turns {
            order: order.clone(),
            pos: Mutex::new(0),
            next: Condvar::new(),
        });
        let model: &Model = m;
        std::thread::scope(|s| {
            for (w, ops) in round.writers.iter().enumerate() {
                let turns = turns.as_ref();
                s.spawn(move || writer(vol, model, rig, w, i, ops, turns));
            }
        });
        if rig.rail.is_off() {
            // The power failed under a writer; completed deletes for room
            // are known, an in-flight one is allowed by `check`.
            m.forget_auto_deleted(vol);
            return;
        }
        m.in_writers = false;
    }
    m.forget_auto_deleted(vol);
    let start = m.tick();
    match vol.flush() {
        Ok(()) => m.flushed(start),
        Err(e) => {
            if !rig.rail.is_off() {
                m.unexpected(format!("final flush failed: {e}"));
            }
        }
    }
}
