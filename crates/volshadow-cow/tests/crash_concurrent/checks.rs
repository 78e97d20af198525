//! Checking a volume after a crash against the model.

use super::*;

pub(crate) fn read_all(d: &dyn BlockDevice) -> Result<Vec<u8>, String> {
    let mut b = vec![0u8; LEN];
    d.read_at(&mut b, 0).map_err(|e| format!("read: {e}"))?;
    Ok(b)
}

/// Live bytes: per region, the writes acknowledged before the durable mark
/// are a prefix of its history and must read back; the rest may or may not
/// have landed (torn at any sector).
pub(crate) fn check_live(live: &[u8], m: &Model) -> Result<(), String> {
    let durable = m.durable.load(Ordering::SeqCst);
    for region in &m.regions {
        let r = lock(region);
        let s = r.start;
        let n = r.image.len();
        let mut want = vec![0u8; n];
        let mut maybe = vec![false; n];
        let mut prefix = true;
        for w in &r.writes {
            let (lo, hi) = (w.off - s, w.off - s + w.len);
            prefix &= w.ack.is_some_and(|a| a < durable);
            if prefix {
                want[lo..hi].fill(w.byte);
            } else {
                for (b, ok) in live[s + lo..s + hi].iter().zip(&mut maybe[lo..hi]) {
                    *ok |= *b == w.byte;
                }
            }
        }
        for b in 0..n {
            if live[s + b] != want[b] && !maybe[b] {
                let later: BTreeSet<u8> = r
                    .writes
                    .iter()
                    .filter(|w| w.off <= s + b && s + b < w.off + w.len)
                    .filter(|w| w.ack.is_none_or(|a| a >= durable))
                    .map(|w| w.byte)
                    .collect();
                return Err(format!(
                    "live byte {} is {:#x}; flushed value {:#x}, later writes {later:x?}",
                    s + b,
                    live[s + b],
                    want[b]
                ));
            }
        }
    }
    Ok(())
}

/// Checks a recovered volume against the model.
pub(crate) fn check(vol: &Volume, m: &Model, policy: FullPolicy) -> Result<(), String> {
    if let Some(e) = lock(&m.unexpected).first() {
        return Err(format!("unexpected failure before the crash: {e}"));
    }
    check_live(&read_all(vol)?, m)?;
    let listed = vol.snapshots();
    // A delete for room may have been in flight: the oldest left.
    let auto = (m.in_writers && policy == FullPolicy::DeleteOldest)
        .then(|| m.snaps.first().map(|s| s.id))
        .flatten();
    let mut unknown = 0;
    for s in &listed {
        if !s.persistent {
            return Err(format!("non-persistent snapshot {} survived", s.id));
        }
        let data = read_all(&vol.snapshot(s.id).map_err(|e| e.to_string())?)?;
        match m.snaps.iter().find(|x| x.id == s.id) {
            Some(x) if !x.persistent => {
                return Err(format!("non-persistent snapshot {} survived", s.id));
            }
            Some(x) if *x.data != data => {
                let at = x
                    .data
                    .iter()
                    .zip(&data)
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                let diff = x.data.iter().zip(&data).filter(|(a, b)| a != b).count();
                return Err(format!(
                    "snapshot {} (round {}) differs at byte {at} ({diff} bytes differ): reads {:#x}, took {:#x}",
                    s.seq, x.round, data[at], x.data[at]
                ));
            }
            Some(_) => {}
            None if m.gone.contains(&s.id) => {
                return Err(format!("deleted snapshot {} came back", s.seq));
            }
            None => {
                unknown += 1;
                match &m.creating {
                    Some((true, want)) if **want == data => {}
                    Some((true, _)) => {
                        return Err(format!("half-made snapshot {} reads wrong bytes", s.seq));
                    }
                    _ => return Err(format!("unexpected snapshot {}", s.seq)),
                }
            }
        }
    }
    if unknown > 1 {
        return Err("more than one unknown snapshot".into());
    }
    for x in m.snaps.iter().filter(|x| x.persistent) {
        if !listed.iter().any(|s| s.id == x.id) && m.deleting != Some(x.id) && auto != Some(x.id) {
            return Err(format!("persistent snapshot of round {} was lost", x.round));
        }
    }
    // Changed extents between surviving known snapshots.
    let mut touched: Vec<(u64, usize)> = Vec::new();
    for r in &m.regions {
        touched.extend(
            lock(r)
                .touched
                .iter()
                .map(|&(round, c)| (2 * round as u64 + 1, c)),
        );
    }
    let known: Vec<&Snap> = m
        .snaps
        .iter()
        .filter(|x| listed.iter().any(|s| s.id == x.id))
        .collect();
    for (i, a) in known.iter().enumerate() {
        for b in &known[i..] {
            let got = vol
                .changed_extents(a.id, Target::Snapshot(b.id))
                .map_err(|e| e.to_string())?;
            let want =
                common::model_changed(&touched, 2 * a.round as u64, 2 * b.round as u64, CHUNK);
            if got != want {
                return Err(format!(
                    "changed extents rounds {}..{}: {got:?}, expected {want:?}",
                    a.round, b.round
                ));
            }
        }
    }
    let report = vol.verify().map_err(|e| format!("verify: {e}"))?;
    if !report.mismatches.is_empty() {
        return Err(format!("verify: {:?}", report.mismatches));
    }
    Ok(())
}
