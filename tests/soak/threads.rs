//! The writers, the shadow-copy churn and the reader.

use super::*;

/// One writer: its own connection, its own region, one request at a time.
pub(crate) fn writer(sh: &Shared, w: usize, mut rng: Rng) {
    let mut conn = match Raw::try_go(&sh.socket, "live", IO_TIMEOUT) {
        Ok(c) => Some(c),
        Err(e) => {
            if !sh.killed() {
                sh.violation(format!("writer {w}: cannot connect: {e}"));
            }
            None
        }
    };
    if let Some(conn) = &mut conn {
        write_loop(sh, w, &mut rng, conn);
    }
    let mut p = lock(&sh.pause);
    p.alive -= 1;
    sh.pause_cv.notify_all();
}

pub(crate) fn write_loop(sh: &Shared, w: usize, rng: &mut Rng, conn: &mut Raw) {
    let mut buf = Vec::with_capacity(MAX_BLOCKS as usize * BLOCK);
    let mut reply = Vec::new();
    loop {
        if sh.killed() {
            return;
        }
        if sh.pause_flag.load(Ordering::SeqCst) && !park(sh, w, conn) {
            return;
        }
        let op = if rng.one_in(12) {
            Op::Flush
        } else {
            let n = rng.blocks();
            let first = (w * REGION) as u64 + rng.below(REGION as u64 - n + 1);
            Op::Write {
                id: sh.next_id.fetch_add(1, Ordering::Relaxed),
                first: first as u32,
                n: n as u32,
                fua: rng.one_in(5),
            }
        };
        if !send(sh, w, conn, op, &mut buf, &mut reply) {
            return;
        }
    }
}

/// Logs `op`, sends it, waits for the reply; false if the connection is
/// over.
pub(crate) fn send(
    sh: &Shared,
    w: usize,
    conn: &mut Raw,
    op: Op,
    buf: &mut Vec<u8>,
    reply: &mut Vec<u8>,
) -> bool {
    lock(&sh.lanes[w]).log.push(op);
    let r = match op {
        Op::Write { id, first, n, fua } => {
            buf.resize(n as usize * BLOCK, 0);
            for (i, b) in buf.chunks_exact_mut(BLOCK).enumerate() {
                fill_block(b, id, first + i as u32);
            }
            let flags = if fua { NBD_CMD_FLAG_FUA } else { 0 };
            conn.cmd(
                NBD_CMD_WRITE,
                flags,
                u64::from(first) * BLOCK as u64,
                buf.len() as u32,
                buf,
                reply,
            )
        }
        Op::Flush => conn.cmd(NBD_CMD_FLUSH, 0, 0, 0, &[], reply),
    };
    match r {
        Ok(0) => {
            let mut l = lock(&sh.lanes[w]);
            l.acked += 1;
            if let Op::Write { id, first, n, .. } = op {
                let start = w * REGION;
                for b in first..first + n {
                    l.cur[b as usize - start] = id;
                }
            }
            true
        }
        Ok(e) => {
            sh.violation(format!("writer {w}: {op:?} failed with NBD error {e}"));
            false
        }
        Err(e) => {
            if !sh.killed() {
                sh.violation(format!(
                    "writer {w}: {op:?} got no reply from a running server: {e}"
                ));
            }
            false
        }
    }
}

/// Parks until the churn thread resumes the writers; false if the
/// connection is over.
pub(crate) fn park(sh: &Shared, w: usize, conn: &mut Raw) -> bool {
    let (flush, epoch) = {
        let p = lock(&sh.pause);
        if !p.requested {
            return true;
        }
        (p.flush, p.epoch)
    };
    if flush && !send(sh, w, conn, Op::Flush, &mut Vec::new(), &mut Vec::new()) {
        return false;
    }
    let mut p = lock(&sh.pause);
    if p.epoch != epoch {
        return true;
    }
    p.parked += 1;
    sh.pause_cv.notify_all();
    while p.epoch == epoch && !sh.killed() {
        p = sh
            .pause_cv
            .wait_timeout(p, Duration::from_millis(50))
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
    !sh.killed()
}

pub(crate) fn sleep_unless_killed(sh: &Shared, ms: u64) -> bool {
    let until = Instant::now() + Duration::from_millis(ms);
    while Instant::now() < until {
        if sh.killed() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    !sh.killed()
}

/// Creates and deletes shadow copies through the command line.
pub(crate) fn churn(sh: &Shared, mut rng: Rng) {
    while sleep_unless_killed(sh, rng.range(100, 700)) {
        let (live, deletable) = {
            let b = lock(&sh.book);
            let live = b.shadows.iter().filter(|s| s.life == Life::Live).count();
            let deletable = b
                .shadows
                .iter()
                .filter(|s| s.life == Life::Live && s.pins == 0)
                .count();
            (live, deletable)
        };
        let pick = rng.below(10);
        if live >= MAX_SHADOWS || (deletable > 0 && pick < 3) {
            if deletable > 0 {
                delete_one(sh, &mut rng);
            }
        } else if pick < 6 {
            create_quiesced(sh, &mut rng, true);
        } else if pick < 8 {
            create_while_writing(sh);
        } else if sh.non_persistent {
            create_quiesced(sh, &mut rng, false);
        } else {
            create_quiesced(sh, &mut rng, true);
        }
    }
}

pub(crate) fn create_cmd(sh: &Shared, persistent: bool) -> Result<String, String> {
    let mut args = vec!["create", "shadow", "--for", IMG, "--json"];
    if !persistent {
        args.push("--non-persistent");
    }
    let out = sh.churn_cmd(CREATING, &args);
    if !out.status.success() {
        return Err(stderr(&out));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("create printed no JSON ({e})"))?;
    let shadow = &v["shadow"];
    if shadow["persistent"].as_bool() != Some(persistent) {
        return Err(format!("create answered {v}"));
    }
    shadow["id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("create answered {v}"))
}

/// Writers parked (after a FLUSH or not), then a create: the copy's
/// contents are the acknowledged state.
pub(crate) fn create_quiesced(sh: &Shared, rng: &mut Rng, persistent: bool) {
    if sh.quiesce(rng.one_in(2)) {
        let (state, at) = sh.acked_state();
        for (w, lane) in sh.lanes.iter().enumerate() {
            let l = lock(lane);
            assert_eq!(l.acked, l.log.len(), "writer {w} not parked");
            assert_eq!(l.acked, at[w]);
        }
        let want = Arc::new(state);
        lock(&sh.book).pending = Some(Pending::Known {
            persistent,
            expect: Expect::Exact(want.clone()),
        });
        let r = create_cmd(sh, persistent);
        finish_create(sh, r, persistent, Expect::Exact(want));
    }
    sh.resume();
}

/// A create while the writers keep writing.
pub(crate) fn create_while_writing(sh: &Shared) {
    let (base, from) = sh.acked_state();
    lock(&sh.book).pending = Some(Pending::Open {
        base: base.clone(),
        from: from.clone(),
    });
    let r = create_cmd(sh, true);
    let steps = sh
        .lanes
        .iter()
        .zip(&from)
        .map(|(lane, &f)| {
            let l = lock(lane);
            l.steps(f, l.log.len())
        })
        .collect();
    let expect = Expect::Range(Arc::new(RangeExpect { base, steps }));
    let Some(id) = finish_create(sh, r, true, expect.clone()) else {
        return;
    };
    add(&sh.stats.created_while_writing, 1);
    // Pin down its contents now, before any crash.
    match read_export(&sh.socket, &id) {
        Ok(got) => match check_shadow(&expect, &got) {
            Ok(exact) => set_expect(sh, &id, Expect::Exact(exact)),
            Err(e) => {
                sh.violation(format!(
                    "shadow copy {id} taken while writers ran, read at once: {e}"
                ));
                set_expect(sh, &id, Expect::Exact(Arc::new(got.ids)));
            }
        },
        Err(e) => {
            if !sh.killed() {
                sh.violation(format!("shadow copy {id}: cannot read it: {e}"));
            }
        }
    }
}

pub(crate) fn set_expect(sh: &Shared, id: &str, expect: Expect) {
    if let Some(s) = lock(&sh.book).shadows.iter_mut().find(|s| s.id == id) {
        s.expect = expect;
    }
}

pub(crate) fn finish_create(
    sh: &Shared,
    r: Result<String, String>,
    persistent: bool,
    expect: Expect,
) -> Option<String> {
    let mut b = lock(&sh.book);
    match r {
        Ok(id) => {
            b.pending = None;
            b.shadows.push(Shadow {
                id: id.clone(),
                persistent,
                expect,
                life: Life::Live,
                pins: 0,
            });
            if persistent {
                add(&sh.stats.created_persistent, 1);
            } else {
                add(&sh.stats.created_non_persistent, 1);
            }
            Some(id)
        }
        Err(e) => {
            // Killed meanwhile: it stays pending (it may exist).
            if !sh.killed() {
                b.pending = None;
                drop(b);
                sh.violation(format!("create shadow failed while serve ran: {e}"));
            }
            None
        }
    }
}

pub(crate) fn delete_one(sh: &Shared, rng: &mut Rng) {
    let id = {
        let mut b = lock(&sh.book);
        let idle: Vec<usize> = (0..b.shadows.len())
            .filter(|&i| b.shadows[i].life == Life::Live && b.shadows[i].pins == 0)
            .collect();
        if idle.is_empty() {
            return;
        }
        let i = idle[rng.below(idle.len() as u64) as usize];
        b.shadows[i].life = Life::Deleting;
        b.shadows[i].id.clone()
    };
    let out = sh.churn_cmd(
        DELETING,
        &["delete", "shadows", "--for", IMG, "--shadow", &id],
    );
    let mut b = lock(&sh.book);
    if out.status.success() {
        let i = b.shadows.iter().position(|s| s.id == id).unwrap();
        let s = b.shadows.remove(i);
        let round = sh.round.load(Ordering::SeqCst);
        b.deleted.push(Gone {
            id,
            how: format!("its delete succeeded in round {round}"),
            expect: s.expect,
        });
        add(&sh.stats.deleted, 1);
    } else if !sh.killed() {
        if let Some(s) = b.shadows.iter_mut().find(|s| s.id == id) {
            s.life = Life::Live;
        }
        drop(b);
        sh.violation(format!(
            "delete of shadow copy {id} failed while serve ran: {}",
            stderr(&out)
        ));
    }
}

/// Reads shadow copies over NBD while the writers and the churn run.
pub(crate) fn reader(sh: &Shared, mut rng: Rng) {
    while !sh.killed() {
        let picked = {
            let mut b = lock(&sh.book);
            let ready: Vec<usize> = (0..b.shadows.len())
                .filter(|&i| {
                    b.shadows[i].life == Life::Live
                        && matches!(b.shadows[i].expect, Expect::Exact(_))
                })
                .collect();
            match ready.len() {
                0 => None,
                n => {
                    let s = &mut b.shadows[ready[rng.below(n as u64) as usize]];
                    match &s.expect {
                        Expect::Exact(want) => {
                            s.pins += 1;
                            Some((s.id.clone(), want.clone()))
                        }
                        Expect::Range(_) => None,
                    }
                }
            }
        };
        let Some((id, want)) = picked else {
            sleep_unless_killed(sh, 50);
            continue;
        };
        if let Err(e) = read_some(sh, &mut rng, &id, &want)
            && !sh.killed()
        {
            sh.violation(format!("shadow copy {id} read while serving: {e}"));
        }
        let mut b = lock(&sh.book);
        if let Some(s) = b.shadows.iter_mut().find(|s| s.id == id) {
            s.pins -= 1;
        }
    }
}

/// A few random reads of shadow copy `id`, each compared with `want`.
pub(crate) fn read_some(sh: &Shared, rng: &mut Rng, id: &str, want: &[u32]) -> Result<(), String> {
    let mut conn =
        Raw::try_go(&sh.socket, id, IO_TIMEOUT).map_err(|e| format!("cannot open it: {e}"))?;
    let (mut data, mut scratch) = (Vec::new(), vec![0u8; BLOCK]);
    for _ in 0..rng.range(4, 16) {
        let n = rng.blocks() as usize;
        let first = rng.below((BLOCKS - n + 1) as u64) as usize;
        let len = (n * BLOCK) as u32;
        let offset = (first * BLOCK) as u64;
        match conn.cmd(NBD_CMD_READ, 0, offset, len, &[], &mut data) {
            Ok(0) => {}
            Ok(e) => return Err(format!("READ at {offset} failed with NBD error {e}")),
            Err(e) => return Err(format!("READ at {offset} got no reply: {e}")),
        }
        add(&sh.stats.read_under_load, u64::from(len));
        for (i, blk) in data.chunks_exact(BLOCK).enumerate() {
            let b = first + i;
            let got = decode_block(blk, b as u32, &mut scratch);
            if got != want[b] {
                let what = match got {
                    GARBAGE => describe_garbage(blk, b as u32),
                    id => show(id),
                };
                return Err(format!(
                    "block {b} (offset {}) holds {what}, expected {}",
                    b * BLOCK,
                    show(want[b])
                ));
            }
        }
    }
    Ok(())
}
